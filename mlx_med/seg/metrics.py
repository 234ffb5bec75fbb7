"""Segmentation metrics: Dice, IoU and the 95% Hausdorff distance, aggregated with bootstrap intervals.

The definitions are the ones medical segmentation papers report (nnU-Net's Dice and IoU; HD95 as
`medpy.metric.binary.hd95` computes it, which nnU-Net's first evaluator called), so figures here compare with
published ones:

- `dice(pred, gt)` = 2|P∩G| / (|P| + |G|); `iou(pred, gt)` = |P∩G| / |P∪G|.
- `hd95(pred, gt, spacing)`: the surface of a mask is the mask minus its binary erosion with the
  connectivity-1 structuring element (`scipy.ndimage.generate_binary_structure(ndim, 1)`: the 4-neighbourhood
  in 2D, 6 in 3D; medpy's default), the outside of the array counting as background, so a mask touching the
  border has its border voxels on its surface. Each surface voxel of one mask gets its Euclidean distance, in
  the units of `spacing` (mm for a NIfTI or DICOM spacing, pixels by default), to the nearest surface voxel of
  the other mask (`scipy.ndimage.distance_transform_edt(..., sampling=spacing)`); HD95 is the 95th percentile
  (numpy's linear interpolation) of the union of both directed distance sets. 2D and 3D alike.

Empty masks (stated in every report):
- both empty: Dice 1, IoU 1, HD95 0: a prompt for an absent target answered with nothing is a correct answer.
  (nnU-Net leaves this case undefined, 0/0, and skips it in its means; medpy refuses empty masks.)
- exactly one empty: Dice 0, IoU 0, HD95 undefined (NaN): it is counted per group (`n_undefined`) and left out
  of the HD95 mean and its interval, never replaced by an arbitrary penalty distance.

Aggregation (`evaluate_masks`): one row per image, then the mean of each metric with a percentile bootstrap
95% interval (images resampled with replacement, `n_boot` resamples, seeded, vectorised over resamples),
overall, per size bucket of the GROUND-TRUTH area (`SIZE_BUCKETS`; an image whose target is empty goes to its
own bucket "empty", since it is no small object) and per prompt. `paired_difference` is the paired
bootstrap of a difference of means on the same images, for comparing two attention modes of one checkpoint.
`write_report` writes report.json, per_image.csv and summary.md (each to a temporary name, then renamed).

HD95 is computed on the bounding box of the two masks grown by one voxel: the erosion inside that box equals
the erosion of the full array and the distance between two surface voxels does not depend on the voxels
around them, so the figure is exact while a small lesion in a large image costs a few hundred voxels.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from mlx_med.core import stats as stats_lib

# Size buckets of the target, as a fraction of the image area (lower bound inclusive, upper exclusive; the last
# one closed). The one definition: the synthetic generator and the data readers label targets with it.
SIZE_BUCKETS = (("<0.1%", 0.0, 0.001), ("0.1-1%", 0.001, 0.01), (">1%", 0.01, 1.0))
EMPTY_BUCKET = "empty"
METRICS = ("dice", "iou", "hd95")
CONVENTIONS = ("both masks empty: Dice 1, IoU 1, HD95 0; exactly one empty: Dice 0, IoU 0, HD95 undefined "
               "(counted as n_undefined, left out of the HD95 mean and interval); surface = mask minus its "
               "erosion (connectivity 1, outside = background); HD95 = 95th percentile of both directed "
               "surface-distance sets together; size bucket by the ground-truth area; 95% percentile bootstrap "
               "intervals over images")


class SegMetricsError(ValueError):
  """Bad masks, spacing or metadata given to the segmentation metrics (one-line message)."""


def size_bucket(area_fraction: float) -> str:
  """The SIZE_BUCKETS name of a target covering `area_fraction` (0..1) of the image."""
  a = float(area_fraction)
  if not (0.0 <= a <= 1.0):
    raise SegMetricsError(f"area fraction {a!r} is outside [0, 1]; give the target's area divided by the image area")
  for name, lo, hi in SIZE_BUCKETS:
    if lo <= a < hi:
      return name
  return SIZE_BUCKETS[-1][0]  # a == 1.0


# ------------------------------------------------------------------------------------ inputs


def _as_mask(x: Any, what: str, threshold: float | None = None) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim == 0:
    raise SegMetricsError(f"{what} is a scalar; give a 2D or 3D mask array")
  if threshold is not None:
    return a >= threshold
  if a.dtype == np.bool_:
    return a
  if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
    raise SegMetricsError(f"{what} has dtype {a.dtype}; give a bool or 0/1 numeric mask")
  if np.any((a != 0) & (a != 1)):
    bad = a[(a != 0) & (a != 1)].ravel()[:3].tolist()
    raise SegMetricsError(f"{what} holds values other than 0/1 (e.g. {bad}); threshold probabilities first "
                          "(mask = prob >= 0.5) or pass threshold=")
  return a != 0


def _pair(pred: Any, gt: Any, what: str = "", threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  p = _as_mask(pred, f"prediction{what}", threshold)
  g = _as_mask(gt, f"ground truth{what}")
  if p.shape != g.shape:
    raise SegMetricsError(f"prediction{what} has shape {p.shape} but its ground truth {g.shape}; resize the "
                          "prediction to the mask's grid before scoring")
  return p, g


def _spacing(spacing: Any, ndim: int, what: str = "") -> np.ndarray:
  if spacing is None:
    return np.ones(ndim, np.float64)
  s = np.asarray(spacing, np.float64).reshape(-1)
  if s.size == 1:
    s = np.repeat(s, ndim)
  if s.size != ndim:
    raise SegMetricsError(f"spacing{what} {tuple(s.tolist())} has {s.size} entries for a {ndim}D mask; "
                          f"give one spacing per axis")
  if not np.all(np.isfinite(s)) or np.any(s <= 0):
    raise SegMetricsError(f"spacing{what} {tuple(s.tolist())} must be positive and finite")
  return s


def spacing_from_affine(affine: Any, axes: Sequence[int] = (0, 1)) -> tuple[float, ...]:
  """Voxel spacing along the array `axes` of an image with a 4x4 (NIfTI-style) `affine`: column norms."""
  a = np.asarray(affine, np.float64)
  if a.shape != (4, 4):
    raise SegMetricsError(f"affine has shape {a.shape}; give the 4x4 voxel-to-world matrix")
  return tuple(float(np.linalg.norm(a[:3, i])) for i in axes)


# ------------------------------------------------------------------------------------ per image


def _counts(p: np.ndarray, g: np.ndarray) -> tuple[int, int, int]:
  return int(np.count_nonzero(p & g)), int(np.count_nonzero(p)), int(np.count_nonzero(g))


def _dice_from(tp: int, ps: int, gs: int) -> float:
  return 1.0 if ps + gs == 0 else 2.0 * tp / (ps + gs)


def _iou_from(tp: int, ps: int, gs: int) -> float:
  union = ps + gs - tp
  return 1.0 if union == 0 else tp / union


def dice(pred: Any, gt: Any) -> float:
  """Dice coefficient of two binary masks; 1.0 when both are empty."""
  return _dice_from(*_counts(*_pair(pred, gt)))


def iou(pred: Any, gt: Any) -> float:
  """Intersection over union (Jaccard) of two binary masks; 1.0 when both are empty."""
  return _iou_from(*_counts(*_pair(pred, gt)))


def surface(mask: Any, connectivity: int = 1) -> np.ndarray:
  """The surface voxels of a binary mask: the mask minus its erosion (outside the array = background)."""
  m = _as_mask(mask, "mask")
  structure = ndimage.generate_binary_structure(m.ndim, connectivity)
  return m & ~ndimage.binary_erosion(m, structure=structure, iterations=1, border_value=0)


def _crop(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both masks cut to the bounding box of their union grown by one voxel (clipped to the array)."""
  union = p | g
  box = []
  for axis in range(union.ndim):
    others = tuple(i for i in range(union.ndim) if i != axis)
    idx = np.flatnonzero(union.any(axis=others) if others else union)
    box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
  box = tuple(box)
  return p[box], g[box]


def _directed(a_surface: np.ndarray, b_surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
  # distance_transform_edt measures, for every non-zero voxel, the distance to the nearest zero voxel:
  # b's surface must be the zeros.
  return ndimage.distance_transform_edt(~b_surface, sampling=spacing)[a_surface]


def surface_distances(pred: Any, gt: Any, spacing: Any = None, connectivity: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(pred surface -> gt surface, gt surface -> pred surface) distances, in the units of `spacing`.

  Both masks must be non-empty (an empty mask has no surface to measure from).
  """
  p, g = _pair(pred, gt)
  if not p.any() or not g.any():
    raise SegMetricsError("surface distances need two non-empty masks; check emptiness first (hd95 handles it)")
  s = _spacing(spacing, p.ndim)
  p, g = _crop(p, g)
  structure = ndimage.generate_binary_structure(p.ndim, connectivity)
  ps = p & ~ndimage.binary_erosion(p, structure=structure, iterations=1, border_value=0)
  gs = g & ~ndimage.binary_erosion(g, structure=structure, iterations=1, border_value=0)
  return _directed(ps, gs, s), _directed(gs, ps, s)


def hausdorff(pred: Any, gt: Any, spacing: Any = None, *, percentile: float = 95.0, connectivity: int = 1) -> float:
  """The `percentile`-th percentile of the symmetric surface distances (100 = the Hausdorff distance).

  Both empty -> 0.0; exactly one empty -> NaN (undefined).
  """
  p, g = _pair(pred, gt)
  s = _spacing(spacing, p.ndim)  # checked even when the masks make it unused
  pe, ge = not p.any(), not g.any()
  if pe and ge:
    return 0.0
  if pe or ge:
    return math.nan
  d1, d2 = surface_distances(p, g, s, connectivity)
  return float(np.percentile(np.concatenate([d1, d2]), percentile))


def hd95(pred: Any, gt: Any, spacing: Any = None, connectivity: int = 1) -> float:
  """95th percentile Hausdorff distance (medpy / nnU-Net definition); spacing default 1 per axis (pixels).

  Both empty -> 0.0; exactly one empty -> NaN (undefined; excluded from means and counted by evaluate_masks).
  """
  return hausdorff(pred, gt, spacing, percentile=95.0, connectivity=connectivity)


# ------------------------------------------------------------------------------------ bootstrap


def bootstrap_mean_ci(values: Any, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
  """`mlx_med.core.stats.bootstrap_mean_ci` (mean of the finite values, percentile bootstrap interval),
  with its errors as `SegMetricsError`."""
  try:
    return stats_lib.bootstrap_mean_ci(values, n_boot=n_boot, seed=seed, level=level)
  except ValueError as e:
    raise SegMetricsError(str(e)) from None


def paired_difference(a: Any, b: Any, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
  """`mlx_med.core.stats.paired_difference` (mean of a - b over the same images, paired bootstrap
  interval; NaN pairs dropped and counted), with its errors as `SegMetricsError`."""
  try:
    return stats_lib.paired_difference(a, b, n_boot=n_boot, seed=seed, level=level)
  except ValueError as e:
    raise SegMetricsError(str(e)) from None


# ------------------------------------------------------------------------------------ evaluation


def _meta(example: Any, key: str, default: Any = None) -> Any:
  if example is None:
    return default
  if isinstance(example, Mapping):
    return example.get(key, default)
  return getattr(example, key, default)


def _per_image_spacing(spacing: Any, n: int) -> list[Any]:
  if spacing is None:
    return [None] * n
  arr = np.asarray(spacing, dtype=object)
  # one spacing for every image: a scalar or a flat tuple of numbers
  if arr.ndim == 0 or (arr.ndim == 1 and all(np.isscalar(x) for x in arr)):
    return [spacing] * n
  if len(spacing) != n:
    raise SegMetricsError(f"spacing lists {len(spacing)} entries for {n} images; give one spacing tuple per "
                          "image, or a single tuple for all")
  return list(spacing)


def _group_summary(rows: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
  out: dict[str, Any] = {"n": len(rows)}
  for m in METRICS:
    out[m] = bootstrap_mean_ci([r[m] for r in rows], n_boot=n_boot, seed=seed)
  empties = [r["empty"] for r in rows]
  out["n_both_empty"] = empties.count("both")
  out["n_pred_empty"] = empties.count("pred")
  out["n_gt_empty"] = empties.count("gt")
  return out


def evaluate_masks(preds: Sequence[Any], gts: Sequence[Any], examples: Sequence[Any] | None = None, *,
                   spacing: Any = None, n_boot: int = 1000, seed: int = 0, threshold: float | None = None,
                   connectivity: int = 1) -> dict[str, Any]:
  """Dice, IoU and HD95 per image and their means with bootstrap 95% CIs, overall, per size bucket, per prompt.

  Args:
    preds: predicted masks, one per image (a list, or a stacked array whose first axis indexes images);
      bool or 0/1 (or probabilities with `threshold`).
    gts: ground-truth masks, the same shapes.
    examples: optional metadata per image (SegExample or a mapping): `prompt`, `label`, `case_id`,
      `slice_index` and `image_path` are copied into the rows; the size bucket always comes from `gts`.
    spacing: None (pixels), one tuple for all images, or a list with one tuple per image (e.g. mm from the
      NIfTI header); HD95 is in those units.
    n_boot, seed: bootstrap resamples and their seed (the same seed for every group: deterministic).
    threshold: when given, prediction = pred >= threshold.
  Returns {"n_images", "hd95_unit", "conventions", "n_boot", "seed", "overall", "buckets", "prompts",
  "per_image"}; each group is {"n", "dice"/"iou"/"hd95": {"mean", "lo", "hi", "n", "n_undefined"},
  "n_both_empty", "n_pred_empty", "n_gt_empty"}.
  """
  if int(n_boot) < 1:
    raise SegMetricsError(f"n_boot={n_boot}; give at least 1 bootstrap resample (1000 is usual)")
  n = len(preds)
  if len(gts) != n:
    raise SegMetricsError(f"{n} predictions but {len(gts)} ground-truth masks; give one mask per prediction")
  if examples is not None and len(examples) != n:
    raise SegMetricsError(f"{len(examples)} examples for {n} masks; give one metadata entry per mask (or None)")
  spacings = _per_image_spacing(spacing, n)
  rows = []
  for i in range(n):
    ex = None if examples is None else examples[i]
    where = f" {i}" + (f" ({_meta(ex, 'image_path')})" if _meta(ex, "image_path") else "")
    p, g = _pair(preds[i], gts[i], where, threshold)
    s = _spacing(spacings[i], g.ndim, where)
    tp, ps, gs = _counts(p, g)
    empty = "both" if ps == 0 and gs == 0 else "pred" if ps == 0 else "gt" if gs == 0 else ""
    gt_area = gs / g.size
    rows.append({
        "index": i, "case_id": _meta(ex, "case_id", ""), "slice_index": _meta(ex, "slice_index", ""),
        "image": str(_meta(ex, "image_path", "") or ""), "prompt": _meta(ex, "prompt", "") or "",
        "label": _meta(ex, "label", "") or "",
        "bucket": EMPTY_BUCKET if gs == 0 else size_bucket(gt_area),
        "gt_area_fraction": gt_area, "pred_area_fraction": ps / p.size,
        "tp": tp, "fp": ps - tp, "fn": gs - tp, "dice": _dice_from(tp, ps, gs), "iou": _iou_from(tp, ps, gs),
        "hd95": hausdorff(p, g, s, percentile=95.0, connectivity=connectivity), "empty": empty,
    })
  bucket_names = [b[0] for b in SIZE_BUCKETS] + [EMPTY_BUCKET]
  buckets = {b: _group_summary([r for r in rows if r["bucket"] == b], n_boot, seed)
               for b in bucket_names if any(r["bucket"] == b for r in rows)}
  prompts = sorted({r["prompt"] for r in rows})
  prompt_groups = {p: _group_summary([r for r in rows if r["prompt"] == p], n_boot, seed) for p in prompts}
  unit = "pixel" if all(sp is None for sp in spacings) else "spacing units (mm for NIfTI/DICOM)"
  return {"n_images": n, "hd95_unit": unit,
          "conventions": CONVENTIONS, "n_boot": int(n_boot), "seed": int(seed),
          "overall": _group_summary(rows, n_boot, seed), "buckets": buckets, "prompts": prompt_groups,
          "per_image": rows}


def compare_results(a: Mapping[str, Any], b: Mapping[str, Any], *, metric: str = "dice", n_boot: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
  """Paired differences (a - b) of `metric` between two evaluate_masks results on the same images.

  Overall and per size bucket (the bucket comes from the ground truth, so it is the same on both sides).
  """
  if metric not in METRICS:
    raise SegMetricsError(f"unknown metric {metric!r}; choose one of {METRICS}")
  ra, rb = a["per_image"], b["per_image"]
  if len(ra) != len(rb) or any(x["index"] != y["index"] or x["bucket"] != y["bucket"] for x, y in zip(ra, rb)):
    raise SegMetricsError("the two results cover different images (count, order or ground truth differ); "
                          "evaluate both on the same masks in the same order")
  out = {"metric": metric, "overall": paired_difference([r[metric] for r in ra], [r[metric] for r in rb],
                                                         n_boot, seed), "buckets": {}}
  for name in [x[0] for x in SIZE_BUCKETS] + [EMPTY_BUCKET]:
    idx = [i for i, r in enumerate(ra) if r["bucket"] == name]
    if idx:
      out["buckets"][name] = paired_difference([ra[i][metric] for i in idx], [rb[i][metric] for i in idx],
                                                 n_boot, seed)
  return out


# ------------------------------------------------------------------------------------ the report


class ReportPaths(NamedTuple):
  report: Path      # report.json: the whole result (NaN written as null)
  per_image: Path   # per_image.csv: one row per image
  summary: Path     # summary.md: the tables a reader looks at


def _json_safe(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.ndarray):
    return _json_safe(x.tolist())
  if isinstance(x, Path):
    return str(x)
  return x


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def _fmt(x: float, digits: int) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _cell(stats: Mapping[str, Any], digits: int) -> str:
  if not math.isfinite(stats["mean"]):
    return "n/a"
  return f"{_fmt(stats['mean'], digits)} [{_fmt(stats['lo'], digits)}, {_fmt(stats['hi'], digits)}]"


def _table(groups: Mapping[str, Mapping[str, Any]], first: str) -> list[str]:
  lines = [f"| {first} | n | Dice [95% CI] | IoU [95% CI] | HD95 [95% CI] | HD95 undefined |",
           "|---|---:|---|---|---|---:|"]
  for name, g in groups.items():
    label = str(name).replace("|", "\\|") or "(none)"
    lines.append(f"| {label} | {g['n']} | {_cell(g['dice'], 3)} | {_cell(g['iou'], 3)} | {_cell(g['hd95'], 2)} "
                 f"| {g['hd95']['n_undefined']} |")
  return lines


def summary_markdown(result: Mapping[str, Any]) -> str:
  """The summary.md text: overall, per size bucket and per prompt tables."""
  lines = ["# Segmentation evaluation", "",
           (f"{result['n_images']} images; HD95 in {result['hd95_unit']}; intervals: percentile bootstrap over "
            f"images, {result['n_boot']} resamples, seed {result['seed']}."), "",
           *_table({"all": result["overall"]}, "images"), "", "## By size of the ground-truth target", "",
           *_table(result["buckets"], "bucket"), "", "## By prompt", "", *_table(result["prompts"], "prompt"),
           "", f"Conventions: {result['conventions']}.", ""]
  return "\n".join(lines)


PER_IMAGE_COLUMNS = ("index", "case_id", "slice_index", "image", "prompt", "label", "bucket", "gt_area_fraction",
                     "pred_area_fraction", "tp", "fp", "fn", "dice", "iou", "hd95", "empty")


def write_report(result: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> ReportPaths:
  """Writes report.json, per_image.csv and summary.md of an evaluate_masks result into `out_dir`."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = ReportPaths(out / "report.json", out / "per_image.csv", out / "summary.md")
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=PER_IMAGE_COLUMNS, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in result["per_image"]:
    writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
  _write_atomic(paths.per_image, buf.getvalue())
  _write_atomic(paths.report, json.dumps(_json_safe(dict(result)), indent=2) + "\n")
  _write_atomic(paths.summary, summary_markdown(result))
  return paths
