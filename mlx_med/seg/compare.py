"""`mlx-med seg compare`: Boltzmann-sampled attention against Mask2Former's threshold and full attention.

For each mode in `modes` a model is trained with the same config and steps in <workdir>/<mode>/ (a
rerun resumes each unfinished run and skips finished ones; all runs share one synthetic dataset), then
evaluated under its own mode on the same images. `eval_only_modes` are evaluated on the FIRST trained
mode's checkpoint (the parameters are the same for every mode); `checkpoint=RUN` skips training and
evaluates one run under every mode.

Reported per mode: Dice (mean, bootstrap 95% interval) overall and per size bucket, attention GFLOPs per
image counted from the kept keys and the ratio to full attention, training wall time (summed over
resumptions) and prediction time; the paired bootstrap difference boltzmann - threshold for objects under
1% of the image. Figures: Dice by size bucket, and the kept keys per layer as the temperature anneals,
over the image, for a few small-object examples (from the boltzmann model). Files: comparison.json,
comparison.md, dice_by_bucket.png, kept_keys_<i>.png.

The goals (from the paper's claims): at least +3 Dice for objects under 1% against `threshold`, and at
least 8x fewer attention FLOPs than `full`. Both are reported as measured, met or not.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

log = logging.getLogger("mlx_med.seg.compare")

SMALL_BUCKETS = ("<0.1%", "0.1-1%")
GOAL_DICE_POINTS = 3.0
GOAL_FLOPS_RATIO = 8.0


def _mode_config(config: ml_collections.ConfigDict, mode: str, shared_data: str,
                 tokenizer: str = "") -> ml_collections.ConfigDict:
  """The comparison's config for one mode: same data (one synthetic folder) and the same tokenizer file."""
  c = copy.deepcopy(config)
  c.unlock()
  c.model.attention = mode
  if not c.data.root and not c.data.synthetic_dir:
    c.data.synthetic_dir = shared_data
  if tokenizer and not c.data.tokenizer:
    c.data.tokenizer = tokenizer
  c.lock()
  return c


def _finished(workdir: Path, steps: int) -> bool:
  path = workdir / "train_time.json"
  return path.is_file() and int(json.loads(path.read_text()).get("step", -1)) >= steps


def _train_seconds(workdir: Path) -> float | None:
  path = workdir / "train_time.json"
  return float(json.loads(path.read_text())["seconds"]) if path.is_file() else None


def _small_object_scores(result: dict[str, Any]) -> dict[str, float]:
  """Per-image Dice of objects under 1% of the image, keyed by image index."""
  return {int(r["index"]): float(r["dice"]) for r in result["per_image"] if r["bucket"] in SMALL_BUCKETS}


def _row(mode: str, result: dict[str, Any], train_seconds: float | None, steps: int | None, checkpoint: str) -> dict:
  cost = result["cost"]
  dice = {bucket: group["dice"] for bucket, group in result["buckets"].items()}
  dice["all"] = result["overall"]["dice"]
  return {"mode": mode, "checkpoint": checkpoint, "steps": steps, "dice": dice, "overall": result["overall"],
          "buckets": result["buckets"], "attention_gflops_per_image": cost["attention_gflops_per_image"],
          "flops_ratio_vs_full": cost["flops_ratio_vs_full"], "kept_fraction": cost["kept_fraction"],
          "kept_fraction_per_layer": cost["kept_fraction_per_layer"], "train_seconds": train_seconds,
          "predict_seconds": cost["predict_seconds"], "images": cost["images"]}


def _plot_kept_keys(run: Path, out_dir: Path, n_examples: int, seed: int) -> list[str]:
  """Kept-keys figures for the smallest targets of the eval split (from `run`, under its own mode)."""
  from mlx_med.seg import data as data_lib
  from mlx_med.seg import plots, sampling
  from mlx_med.seg import predict as predict_lib
  from mlx_med.seg import train as train_lib
  from mlx_med.seg.evaluate import load_run_config

  if n_examples <= 0:
    return []
  config = load_run_config(run)
  segmenter = predict_lib.Segmenter.load(run)
  cfg = segmenter.cfg
  examples = train_lib.scan_split(config, train_lib.data_root(config, str(run)), config.data.eval_split)
  order = sorted(range(len(examples)), key=lambda i: examples[i].area_fraction)[:n_examples]
  chosen = [examples[i] for i in order]
  source = data_lib.make_source(config, str(run), chosen, segmenter.tokenizer, image_size=cfg.image_size,
                                split=config.data.eval_split, progress=False, train=False)
  task = train_lib.SegTask(cfg)
  temps = [sampling.layer_temperature(layer - 1, cfg.base_temp) for layer in range(cfg.dec_layers)]
  paths = []
  for k, ex in enumerate(chosen):
    rec = source[k]
    batch = {key: np.asarray(rec[key])[None] for key in ("images", "masks", "text_ids")}
    out = task.apply(segmenter.params, batch, jax.random.key(seed + k), train=False, return_keep_masks=True)
    keep = [np.asarray(m[0]) for m in out.keep_masks]
    png = out_dir / f"kept_keys_{k}.png"
    plots.plot_kept_keys(rec["images"][..., 0], rec["masks"], keep, temps, str(png), query="object",
                         title=f"{ex.prompt} ({ex.area_fraction * 100:.2f}% of the image), {cfg.attention}")
    paths.append(str(png))
  return paths


def compare(config: ml_collections.ConfigDict, workdir: str | Path, modes: Sequence[str] = ("boltzmann", "threshold",
            "full"), *, checkpoint: str | None = None, eval_only_modes: Sequence[str] = (), progress: bool = True,
            n_boot: int | None = None) -> dict[str, Any]:
  """Trains (or reuses) one run per mode, evaluates, writes the table and the figures; returns them."""
  from mlx_med.seg import evaluate as eval_lib
  from mlx_med.seg import metrics as metrics_lib
  from mlx_med.seg import plots, sampling
  from mlx_med.seg import train as train_lib

  bad = [m for m in (*modes, *eval_only_modes) if m not in sampling.ATTENTION_MODES]
  if bad or not modes:
    raise ValueError(f"modes {bad or list(modes)}: choose from {list(sampling.ATTENTION_MODES)}")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  n_boot = int(config.eval.n_boot) if n_boot is None else int(n_boot)
  max_images = int(config.eval.max_images)
  steps = int(config.train.steps)
  rows, results = [], {}
  if checkpoint:
    for mode in modes:
      res = eval_lib.evaluate_run(checkpoint, attention=mode, out_dir=workdir / f"eval_{mode}", max_images=max_images,
                                  n_boot=n_boot, progress=progress)
      results[mode] = res
      rows.append(_row(mode, res, None, None, str(checkpoint)))
    plot_run = Path(checkpoint)
  else:
    shared = str(workdir / "synthetic")
    for k, mode in enumerate(modes):
      run_dir = workdir / mode
      # Every run after the first reads the first run's tokenizer: the same prompts, the same ids.
      tokenizer = str(workdir / modes[0] / train_lib.TOKENIZER_FILE) if k else ""
      if _finished(run_dir, steps):
        log.info("%s: finished run found in %s (skipping training)", mode, run_dir)
      else:
        log.info("training %s for %d steps in %s", mode, steps, run_dir)
        train_lib.run(_mode_config(config, mode, shared, tokenizer), str(run_dir), progress=progress, evaluate=False)
      res = eval_lib.evaluate_run(run_dir, out_dir=run_dir / f"eval_{mode}", max_images=max_images, n_boot=n_boot,
                                  progress=progress)
      results[mode] = res
      rows.append(_row(mode, res, _train_seconds(run_dir), steps, str(run_dir)))
    first = workdir / modes[0]
    for mode in eval_only_modes:
      res = eval_lib.evaluate_run(first, attention=mode, out_dir=first / f"eval_{mode}", max_images=max_images,
                                  n_boot=n_boot, progress=progress)
      results[f"{mode} ({modes[0]} checkpoint)"] = res
      rows.append(_row(f"{mode} ({modes[0]} checkpoint)", res, None, steps, str(first)))
    plot_run = workdir / ("boltzmann" if "boltzmann" in modes else modes[0])

  goals: dict[str, Any] = {}
  if "boltzmann" in results and "threshold" in results:
    a, b = _small_object_scores(results["boltzmann"]), _small_object_scores(results["threshold"])
    common = sorted(set(a) & set(b))
    if common:
      diff = metrics_lib.paired_difference(np.array([a[i] for i in common]), np.array([b[i] for i in common]),
                                           n_boot=n_boot, seed=0)
      points = {k: float(diff[k]) * 100 for k in ("mean", "lo", "hi")}
      goals["small_object_dice_gain"] = {**points, "images": len(common), "excluded": int(diff["n_excluded"]), "goal_points": GOAL_DICE_POINTS,
                                         "met": bool(points["mean"] >= GOAL_DICE_POINTS)}
  if "boltzmann" in results:
    ratio = float(results["boltzmann"]["cost"]["flops_ratio_vs_full"])
    goals["attention_flops_ratio"] = {"ratio": ratio, "goal": GOAL_FLOPS_RATIO, "met": bool(ratio >= GOAL_FLOPS_RATIO)}

  figures = {}
  png = workdir / "dice_by_bucket.png"
  plots.plot_dice_by_bucket(rows, str(png))
  figures["dice_by_bucket"] = str(png)
  examples = int(config.eval.plot_examples)
  if plot_run.is_dir():
    for k, path in enumerate(_plot_kept_keys(plot_run, workdir, examples, int(config.eval.sample_seed))):
      figures[f"kept_keys_{k}"] = path

  table = plots.comparison_table_markdown(rows)
  lines = [f"# Attention modes compared ({steps} training steps each)" if not checkpoint
           else f"# One checkpoint ({checkpoint}) under each attention mode", "", table, ""]
  gain = goals.get("small_object_dice_gain")
  if gain:
    lines.append(f"- objects under 1% of the image ({gain['images']} images): boltzmann - threshold = "
                 f"{gain['mean']:+.1f} Dice points [{gain['lo']:+.1f}, {gain['hi']:+.1f}] (goal >= +{GOAL_DICE_POINTS:.0f}):"
                 f" {'met' if gain['met'] else 'NOT met'}")
  fl = goals.get("attention_flops_ratio")
  if fl:
    lines.append(f"- attention FLOPs, full / boltzmann = {fl['ratio']:.1f}x (goal >= {GOAL_FLOPS_RATIO:.0f}x): "
                 f"{'met' if fl['met'] else 'NOT met'}")
  markdown = "\n".join(lines) + "\n"
  summary = {"modes": list(modes), "eval_only_modes": list(eval_only_modes), "steps": steps, "rows": rows,
             "goals": goals, "figures": figures}
  paths = {"table": str(workdir / "comparison.md"), "json": str(workdir / "comparison.json"), **figures}
  train_lib.write_json(workdir / "comparison.json", summary)
  tmp = workdir / "comparison.md.tmp"
  tmp.write_text(markdown)
  tmp.replace(workdir / "comparison.md")
  return {"markdown": markdown, "summary": summary, "paths": paths}
