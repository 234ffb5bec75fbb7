"""Figures and the comparison table of the BoltzFormer experiment.

  plot_kept_keys              the figure a reader of the BoltzFormer paper expects: one panel per decoder layer
                              showing, over the image, which keys that layer's masked cross-attention kept (the
                              share of heads -- and of queries, or of one chosen query -- keeping each key of the
                              layer's feature level, upsampled nearest to the image), the ground-truth contour,
                              and the layer's temperature and kept fraction in the panel title. As the
                              temperature anneals (T = 1 / (2 + layer)) the kept keys should close in on the object.
                              query="object" picks the query focusing on the ground truth (`object_query`);
                              `kept_key_maps` gives the per-layer maps themselves.
  plot_dice_by_bucket         grouped bars: Dice with its 95% bootstrap interval per lesion-size bucket, one bar
                              per attention mode.
  plot_flops_vs_dice          attention GFLOPs per image (log scale) against Dice, one point per mode and bucket.
  comparison_table_markdown   the comparison table (mode, steps, Dice per bucket, attention GFLOPs per image and
                              ratio to `full`, training and evaluation wall time) as markdown.

Rows and tables use one shape (what `mlx-med seg compare` collects per attention mode):
  {"mode": "boltzmann", "steps": 300,
   "dice": {"<0.1%": {"mean": 0.61, "lo": 0.55, "hi": 0.66, "n": 40}, "0.1-1%": ..., ">1%": ..., "all": ...},
   "attention_gflops": 0.42, "ratio_vs_full": 0.098, "train_s": 512.0, "eval_s": 14.2}
A bucket's statistic may also be a bare float (no interval), a (mean, lo, hi) triple, a dict with
"ci": [lo, hi] (or "ci_lo"/"ci_hi"), or a metrics group ({"n", "dice": {"mean", "lo", "hi"}, "iou": ...}).
Rows shaped as `mlx_med.seg.compare` collects them are read too: "buckets" ({bucket: metrics group}) and
"overall" (shown as "all") instead of "dice", "attention_gflops_per_image", "flops_ratio_vs_full" (full / mode,
the inverse of "ratio_vs_full"), "train_seconds" and "predict_seconds". Dice values are fractions in [0, 1]; the figures and the table show them
in percent, the unit the paper's "+3 to +12 Dice" speaks in.

Drawn with matplotlib's Agg backend (no display); every PNG is written under a temporary name in the target
directory and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The size buckets in the order a reader expects (smallest objects first); "all" last. Other bucket names
# (e.g. per prompt) follow in first-seen order.
BUCKET_ORDER = ("<0.1%", "0.1-1%", ">1%", "all")
MODE_COLOURS = {"boltzmann": "tab:red", "dense_sampled": "tab:orange", "threshold": "tab:blue",
                "full": "tab:grey"}


def _mode_colour(mode: str) -> str | None:
  """A row's colour by its attention mode: "full (boltzmann checkpoint)" is drawn as `full`."""
  return MODE_COLOURS.get(str(mode).split(" ", 1)[0])


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, out_png: str | os.PathLike, dpi: int = 110) -> str:
  out_png = os.fspath(out_png)
  parent = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out_png)}.{os.getpid()}.tmp.png")
  try:
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, out_png)
  finally:
    _pyplot().close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
  return out_png


# ------------------------------------------------------------------ kept keys
def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
  """[S, S] or [S, S, 1|3] uint8/float -> an array imshow draws sensibly, and its colormap."""
  img = np.asarray(image)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
    raise ValueError(f"plot_kept_keys: image has shape {img.shape}; give [S, S] or [S, S, 3] (uint8 or float).")
  if img.dtype == np.uint8:
    return img, ("gray" if img.ndim == 2 else None)
  img = img.astype(np.float32)
  lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
  # Normalised (mean/std) or HU-like floats: stretch to [0, 1] for display only.
  img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
  return img, ("gray" if img.ndim == 2 else None)


def _resolve_grids(level_shapes, num_layers: int, key_counts: Sequence[int]) -> list[tuple[int, int]]:
  """Per-layer (h, w): level_shapes per layer, or per level (layer i uses level i % len), or None for
  square grids inferred from the key count."""
  if level_shapes is None:
    grids = []
    for i, n in enumerate(key_counts):
      side = math.isqrt(n)
      if side * side != n:
        raise ValueError(f"plot_kept_keys: layer {i} has {n} keys, not a square grid; pass level_shapes="
                         "[(h, w) per level] (layer i uses level i % len(level_shapes)).")
      grids.append((side, side))
    return grids
  shapes = [tuple(int(x) for x in s) for s in level_shapes]
  if not shapes or any(len(s) != 2 for s in shapes):
    raise ValueError(f"plot_kept_keys: level_shapes={level_shapes!r}; give a list of (h, w) pairs.")
  if len(shapes) == num_layers:
    grids = shapes
  else:
    grids = [shapes[i % len(shapes)] for i in range(num_layers)]
  for i, ((h, w), n) in enumerate(zip(grids, key_counts)):
    if h * w != n:
      raise ValueError(f"plot_kept_keys: layer {i} keeps a mask over {n} keys but its level grid is {h}x{w} "
                       f"= {h * w}; level_shapes must list the levels in the decoder's order "
                       "(layer i uses level i % 3: 1/32, 1/16, 1/8).")
  return grids


def _upsample_nearest(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[h, w] -> [H, W] by nearest neighbour (each image pixel takes the key whose cell contains its centre)."""
  h, w = grid.shape
  rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
  return grid[rows][:, cols]


def kept_key_maps(keep_masks: Sequence[Any], level_shapes=None, *, query: int | None = None,
                  example: int = 0) -> list[np.ndarray]:
  """Per layer float [h_l, w_l]: the share of heads (x queries, or the given query) that keep each key.

  keep_masks: per layer bool [H, Q, N_l] (or [B, H, Q, N_l]: `example` picks the batch row).
  """
  maps = []
  arrays = []
  for i, m in enumerate(keep_masks):
    a = np.asarray(m)
    if a.ndim == 4:
      a = a[example]
    if a.ndim != 3:
      raise ValueError(f"plot_kept_keys: keep mask of layer {i} has shape {np.shape(m)}; give [H, Q, N] "
                       "(or [B, H, Q, N]).")
    if query is not None and not -a.shape[1] <= query < a.shape[1]:
      raise ValueError(f"plot_kept_keys: query={query} but layer {i} has {a.shape[1]} queries.")
    arrays.append(a)
  grids = _resolve_grids(level_shapes, len(arrays), [a.shape[-1] for a in arrays])
  for a, (h, w) in zip(arrays, grids):
    sel = a[:, query] if query is not None else a.reshape(-1, a.shape[-1])
    maps.append(sel.astype(np.float32).mean(axis=0).reshape(h, w))
  return maps


def object_query(keep_masks: Sequence[Any], gt_mask, level_shapes=None, *, example: int = 0) -> int:
  """The query whose last-layer kept keys favour the object: argmax over queries of (share of heads keeping
  keys inside gt_mask) - (share keeping keys outside), the mask taken to the level's grid by nearest sampling."""
  last = np.asarray(keep_masks[-1])
  last = last[example] if last.ndim == 4 else last
  h, w = _resolve_grids(level_shapes, len(keep_masks), [np.shape(m)[-1] for m in keep_masks])[-1]
  gt = np.asarray(gt_mask) != 0
  rows = np.minimum(((np.arange(h) + 0.5) * gt.shape[0] / h).astype(np.int64), gt.shape[0] - 1)
  cols = np.minimum(((np.arange(w) + 0.5) * gt.shape[1] / w).astype(np.int64), gt.shape[1] - 1)
  inside = gt[rows][:, cols].reshape(-1)
  if not inside.any():  # an object smaller than one key cell: the cell holding most of it
    ys, xs = np.nonzero(gt)
    inside = np.zeros(h * w, bool)
    inside[int(ys.mean() * h / gt.shape[0]) * w + int(xs.mean() * w / gt.shape[1])] = True
  share = last.astype(np.float32).mean(axis=0)  # [Q, N]
  out = share[:, ~inside].mean(axis=1) if (~inside).any() else 0.0
  return int(np.argmax(share[:, inside].mean(axis=1) - out))


def plot_kept_keys(image, gt_mask, keep_masks: Sequence[Any], layer_temperatures: Sequence[float],
                   out_png: str | os.PathLike, *, level_shapes: Sequence[tuple[int, int]] | None = None,
                   query: int | str | None = None, example: int = 0, title: str | None = None,
                   ncols: int = 3, grids: Sequence[tuple[int, int]] | None = None) -> str:
  """One panel per decoder layer: the kept keys of that layer over the image.

  Args:
    image: [S, S] or [S, S, 3] (uint8, or float of any range: stretched for display).
    gt_mask: [S, S] ground truth (nonzero = object); drawn as a contour. None to omit.
    keep_masks: per layer bool [H, Q, N_l] (or [B, H, Q, N_l], `example` picks the row): True = attend.
    layer_temperatures: per layer the sampling temperature (None or nan for modes without one).
    out_png: where the PNG goes (written atomically).
    level_shapes: (h, w) per level (layer i uses level i % len) or per layer; None = square grids.
    query: average over the heads of this query only; None = over heads and all queries; "object" = the
      query whose last-layer kept keys favour the ground truth most (share of heads keeping keys inside
      the object minus the share outside; needs a non-empty gt_mask).
    title: the figure title (default names the query choice).
    grids: another name for level_shapes (give one of the two).
  Returns:
    out_png.
  """
  plt = _pyplot()
  if grids is not None:
    if level_shapes is not None:
      raise ValueError("plot_kept_keys: give level_shapes= or grids= (the same thing), not both.")
    level_shapes = grids
  if len(layer_temperatures) != len(keep_masks):
    raise ValueError(f"plot_kept_keys: {len(keep_masks)} keep masks but {len(layer_temperatures)} temperatures; "
                     "give one temperature per decoder layer.")
  if not keep_masks:
    raise ValueError("plot_kept_keys: no keep masks given (one per decoder layer expected).")
  img, cmap = _display_image(image)
  size = img.shape[:2]
  gt = None
  if gt_mask is not None:
    gt = np.asarray(gt_mask)
    if gt.shape[:2] != size or gt.ndim != 2:
      raise ValueError(f"plot_kept_keys: gt_mask has shape {gt.shape} but the image is {size}; give a [S, S] "
                       "mask at the image's size.")
  if isinstance(query, str):
    if query != "object":
      raise ValueError(f"plot_kept_keys: query={query!r}; give an index, None (all queries) or 'object'.")
    if gt is None or not gt.any():
      raise ValueError("plot_kept_keys: query='object' needs a non-empty gt_mask to pick the query.")
    query = object_query(keep_masks, gt, level_shapes, example=example)
    chosen = f"query {query} (the one focusing on the object at the last layer)"
  else:
    chosen = "all queries" if query is None else f"query {query}"
  maps = kept_key_maps(keep_masks, level_shapes, query=query, example=example)
  n = len(maps)
  ncols = max(1, min(ncols, n))
  nrows = math.ceil(n / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols + 0.8, 3.3 * nrows), squeeze=False)
  im = None
  for i, ax in enumerate(axes.flat):
    ax.set_axis_off()
    if i >= n:
      continue
    m = maps[i]
    ax.imshow(img, cmap=cmap, interpolation="nearest")
    # Keys nobody keeps stay transparent, so the image shows through where attention does not reach.
    up = np.ma.masked_less_equal(_upsample_nearest(m, size), 0.0)
    im = ax.imshow(up, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
    if gt is not None and gt.any():
      ax.contour(gt.astype(np.float32), levels=[0.5], colors="cyan", linewidths=1.0)
    t = layer_temperatures[i]
    t_txt = "T = -" if t is None or (isinstance(t, float) and math.isnan(t)) else f"T = {float(t):.3g}"
    ax.set_title(f"layer {i} ({m.shape[0]}x{m.shape[1]} keys)\n{t_txt}, kept {float(m.mean()):.1%}",
                 fontsize=9)
  if title is None:
    title = f"Kept keys per decoder layer (share of heads x {chosen}); cyan = ground truth"
  else:
    title = f"{title}\n{chosen}"
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0, 0.92, 0.95))
  if im is not None:
    cax = fig.add_axes((0.93, 0.15, 0.015, 0.7))
    fig.colorbar(im, cax=cax, label="share keeping the key")
  return _save(fig, out_png)


# ------------------------------------------------------------- dice / table
def _stat(value: Any, where: str) -> tuple[float, float | None, float | None]:
  """A bucket statistic in any of the documented shapes -> (mean, lo, hi) as fractions."""
  if isinstance(value, Mapping) and isinstance(value.get("dice"), Mapping):
    value = value["dice"]  # a metrics group: {"n", "dice": {...}, "iou": {...}, ...}
  if isinstance(value, Mapping):
    mean = value.get("mean", value.get("dice"))
    if "ci" in value and value["ci"] is not None:
      lo, hi = value["ci"]
    else:
      lo, hi = value.get("lo", value.get("ci_lo")), value.get("hi", value.get("ci_hi"))
  elif isinstance(value, (tuple, list)) and len(value) == 3:
    mean, lo, hi = value
  else:
    mean, lo, hi = value, None, None
  try:
    out = (float(mean), None if lo is None else float(lo), None if hi is None else float(hi))
  except (TypeError, ValueError):
    raise ValueError(f"{where}: Dice statistic {value!r} is not a number, (mean, lo, hi) or "
                     "{'mean', 'lo', 'hi'}.") from None
  for x in out:
    if x is not None and not math.isnan(x) and not -1e-6 <= x <= 1.0 + 1e-6:
      raise ValueError(f"{where}: Dice {x} is outside [0, 1]; give Dice as a fraction (the table shows percent).")
  return out


def _row_dice(r: Mapping) -> Mapping:
  """A row's {bucket: stat}: its "dice", or its "buckets" (+ "overall" as "all")."""
  if "mode" not in r or ("dice" not in r and "buckets" not in r):
    raise ValueError(f"comparison row with keys {sorted(r)} lacks 'mode' or 'dice'/'buckets'; see "
                     "mlx_med.seg.plots for the row shape.")
  if "dice" in r:
    return r["dice"]
  out = dict(r["buckets"] or {})
  if r.get("overall") is not None:
    out.setdefault("all", r["overall"])
  return out


def _first(r: Mapping, *keys: str) -> Any:
  for k in keys:
    if r.get(k) is not None:
      return r[k]
  return None


def _gflops(r: Mapping) -> Any:
  return _first(r, "attention_gflops", "attention_gflops_per_image")


def _ratio_vs_full(r: Mapping) -> float | None:
  """Attention FLOPs of the row's mode / those of `full` (from either row shape)."""
  if r.get("ratio_vs_full") is not None:
    return float(r["ratio_vs_full"])
  if r.get("flops_ratio_vs_full") is not None:  # full / mode
    x = float(r["flops_ratio_vs_full"])
    return 1.0 / x if x > 0 else None
  return None


def _dice_table(table: Any) -> dict[str, dict[str, tuple[float, float | None, float | None]]]:
  """Rows (list of {"mode", "dice": {bucket: stat}}) or {mode: {bucket: stat}} -> {mode: {bucket: stat}}."""
  if isinstance(table, Mapping):
    items = list(table.items())
  else:
    items = []
    items = [(r["mode"], _row_dice(r)) for r in table]
  return {str(mode): {str(b): _stat(s, f"mode {mode!r}, bucket {b!r}") for b, s in (buckets or {}).items()}
          for mode, buckets in items}


def _bucket_order(names) -> list[str]:
  """The size buckets smallest first, then other names in first-seen order, then "all"."""
  names = list(dict.fromkeys(names))
  sizes = [b for b in BUCKET_ORDER[:-1] if b in names]
  others = [b for b in names if b not in BUCKET_ORDER]
  return sizes + others + (["all"] if "all" in names else [])


def plot_dice_by_bucket(table: Any, out_png: str | os.PathLike, *, title: str | None = None) -> str:
  """Grouped bars: Dice (%) per size bucket, one bar per attention mode, 95% intervals as error bars.

  table: comparison rows ({"mode", "dice": {bucket: stat}}) or {mode: {bucket: stat}} (see module docstring).
  """
  plt = _pyplot()
  data = _dice_table(table)
  if not data:
    raise ValueError("plot_dice_by_bucket: the table is empty (no attention modes).")
  buckets = _bucket_order(b for d in data.values() for b in d)
  modes = list(data)
  width = 0.8 / len(modes)
  fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(buckets) * max(1, len(modes)) / 2 + 2), 4.2))
  x = np.arange(len(buckets))
  for j, mode in enumerate(modes):
    means, err = [], [[], []]
    for b in buckets:
      m, lo, hi = data[mode].get(b, (math.nan, None, None))
      means.append(100 * m)
      err[0].append(0.0 if lo is None or math.isnan(m) else 100 * max(m - lo, 0.0))
      err[1].append(0.0 if hi is None or math.isnan(m) else 100 * max(hi - m, 0.0))
    pos = x - 0.4 + width * (j + 0.5)
    ax.bar(pos, means, width, yerr=np.array(err), capsize=3, label=mode, color=_mode_colour(mode),
           hatch="//" if " " in str(mode) else None, edgecolor="black", linewidth=0.4)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{b}\nof the image" if b != "all" else "all" for b in buckets])
  ax.set_ylabel("Dice (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title or "Dice by object size (bars: mean; whiskers: 95% bootstrap interval)", fontsize=10)
  ax.legend(title="attention", fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return _save(fig, out_png)


def plot_flops_vs_dice(rows: Sequence[Mapping], out_png: str | os.PathLike, *,
                       buckets: Sequence[str] | None = None) -> str:
  """Attention GFLOPs per image (log x) against Dice (%), one marker per mode and bucket."""
  plt = _pyplot()
  data = _dice_table(rows)
  flops = {}
  for r in rows:
    g = _gflops(r)
    if g is None or not float(g) > 0:
      raise ValueError(f"plot_flops_vs_dice: mode {r.get('mode')!r} has attention_gflops={g!r}; need a "
                       "positive number per row.")
    flops[r["mode"]] = float(g)
  buckets = list(buckets) if buckets is not None else _bucket_order(b for d in data.values() for b in d)
  markers = ["o", "s", "^", "D", "v", "P"]
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for i, b in enumerate(buckets):
    for mode in data:
      if b not in data[mode]:
        continue
      m, lo, hi = data[mode][b]
      yerr = None if lo is None or hi is None else [[100 * max(m - lo, 0)], [100 * max(hi - m, 0)]]
      ax.errorbar([flops[mode]], [100 * m], yerr=yerr, fmt=markers[i % len(markers)], capsize=3,
                  color=_mode_colour(mode), label=f"{mode}, {b}")
  ax.set_xscale("log")
  ax.set_xlabel("attention GFLOPs per image (counted from the kept keys)")
  ax.set_ylabel("Dice (%)")
  ax.set_title("Attention compute against Dice", fontsize=10)
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, out_png)


def _fmt_dice(stat: tuple[float, float | None, float | None] | None) -> str:
  if stat is None or math.isnan(stat[0]):
    return "-"
  m, lo, hi = stat
  if lo is None or hi is None:
    return f"{100 * m:.1f}"
  return f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _fmt_num(x: Any, fmt: str) -> str:
  if x is None:
    return "-"
  x = float(x)
  return "-" if math.isnan(x) else format(x, fmt)


def comparison_table_markdown(rows: Sequence[Mapping]) -> str:
  """The comparison as a markdown table: one row per attention mode.

  Columns: mode, steps, Dice % (mean [95% CI]) per bucket, attention GFLOPs/image, FLOPs relative to `full`
  (the row's "ratio_vs_full", else computed from the `full` row's GFLOPs), train wall time (s), eval time (s).
  """
  if not rows:
    raise ValueError("comparison_table_markdown: no rows (one per attention mode expected).")
  data = _dice_table(rows)
  buckets = _bucket_order(b for d in data.values() for b in d)
  full = next((r for r in rows if r["mode"] == "full"), None)
  full_g = float(_gflops(full)) if full and _gflops(full) else None
  header = (["mode", "steps"] + [f"Dice % {b}" for b in buckets]
            + ["attn GFLOPs/image", "FLOPs vs full", "train s", "eval s"])
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
  for r in rows:
    mode = str(r["mode"])
    ratio = _ratio_vs_full(r)
    if ratio is None and full_g and _gflops(r) is not None:
      ratio = float(_gflops(r)) / full_g
    ratio_txt = "-" if ratio is None else (
        f"{float(ratio):.3f}" + (f" ({1 / float(ratio):.1f}x fewer)" if 0 < float(ratio) < 1 else ""))
    cells = ([mode, _fmt_num(r.get("steps"), "g")] + [_fmt_dice(data[mode].get(b)) for b in buckets]
             + [_fmt_num(_gflops(r), ".4g"), ratio_txt, _fmt_num(_first(r, "train_s", "train_seconds"), ".1f"),
                _fmt_num(_first(r, "eval_s", "predict_seconds"), ".1f")])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
