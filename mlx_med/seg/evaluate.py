"""Evaluate a segmentation run: the one path behind `mlx-med seg evaluate`, the end of training and `seg compare`.

`evaluate_run(workdir, attention=...)` rebuilds the run's eval split from its config.json, predicts every
target with the run's checkpoint under the given attention mode (default: the run's own; the parameters
are the same for every mode) and hands the thresholded masks to `seg.metrics.evaluate_masks`: Dice, IoU
and HD95 per image, means with bootstrap intervals overall, per size bucket and per prompt. It also
measures what the attention mode costs: kept (head, query, key) triples per decoder layer, averaged
over the images, turned into attention FLOPs per image, and the prediction wall time.

Metrics are computed at the model's resolution against the ground truth resized the way the training
records are (so training and evaluation see the same targets); HD95 is in pixels of that grid times
the source spacing when the layout provides one (NIfTI, DICOM), i.e. in millimetres.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

log = logging.getLogger("mlx_med.seg.evaluate")


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing; pass the --workdir of `mlx-med seg train`")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def predict_records(task, params, source, *, batch_size: int, sample_seed: int = 0, max_images: int = 0,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...], float]:
  """Runs the model over a record source -> (probabilities [N, S, S] float32, ground truth [N, S, S] uint8,
  kept triples [N, layers] float32, the `full` triple count per layer, seconds). One compiled function:
  the last batch is padded."""
  n = len(source) if not max_images else min(max_images, len(source))
  if n == 0:
    raise ValueError("the evaluation split has no targets")

  totals: list[tuple[int, ...]] = []

  @jax.jit
  def fn(params, batch, rng):
    out = task.apply(params, batch, rng, train=False)
    totals.append(tuple(int(t) for t in out.total))  # static shapes: python ints while tracing
    return jax.nn.sigmoid(out.logits.astype(jnp.float32)), out.kept

  probs, gts, kept = [], [], []
  start = time.perf_counter()
  base = jax.random.key(sample_seed)
  for b, lo in enumerate(range(0, n, batch_size)):
    idx = list(range(lo, min(lo + batch_size, n)))
    recs = [source[i] for i in idx]
    pad = batch_size - len(recs)
    recs = recs + [recs[-1]] * pad
    batch = {k: np.stack([r[k] for r in recs]) for k in ("images", "masks", "text_ids")}
    p, k = fn(params, batch, jax.random.fold_in(base, b))
    keep = len(idx)
    probs.append(np.asarray(p)[:keep])
    kept.append(np.asarray(k)[:keep])
    gts.append(batch["masks"][:keep])
    if progress and (b + 1) % 10 == 0:
      done = lo + keep
      rate = done / max(time.perf_counter() - start, 1e-9)
      log.info("predicted %d/%d (%.1f/s, ETA %.0f s)", done, n, rate, (n - done) / rate)
  seconds = time.perf_counter() - start
  return np.concatenate(probs), np.concatenate(gts).astype(np.uint8), np.concatenate(kept), totals[0], seconds


def attention_cost(cfg, kept: np.ndarray, total: tuple[int, ...]) -> dict[str, Any]:
  """Attention FLOPs per image from the kept triples (QK^T and PV: 4 * head_dim FLOPs per triple)."""
  from mlx_med.seg import sampling

  head_dim = cfg.hidden_dim // cfg.num_heads
  per_layer = kept.mean(axis=0)
  flops = float(np.sum(sampling.attention_flops(per_layer, head_dim)))
  full = float(np.sum(sampling.attention_flops(np.asarray(total, np.float64), head_dim)))
  return {"attention_gflops_per_image": flops / 1e9, "full_attention_gflops_per_image": full / 1e9,
          "flops_ratio_vs_full": full / max(flops, 1e-30),
          "kept_fraction_per_layer": [float(k / t) for k, t in zip(per_layer, total)],
          "kept_fraction": float(np.sum(per_layer) / np.sum(total))}


def evaluate_run(workdir: str | Path, *, attention: str | None = None, split: str | None = None,
                 out_dir: str | Path | None = None, max_images: int = 0, n_boot: int = 1000, progress: bool = True,
                 sample_seed: int | None = None, keep_predictions: bool = False) -> dict[str, Any]:
  """Predict the eval split of a run under `attention` and write the report; returns the result dict
  (metrics, cost, paths, summary_markdown; `predictions` when keep_predictions)."""
  from mlx_med.seg import data as data_lib
  from mlx_med.seg import metrics as metrics_lib
  from mlx_med.seg import predict as predict_lib
  from mlx_med.seg import train as train_lib

  workdir = Path(workdir)
  config = load_run_config(workdir)
  segmenter = predict_lib.Segmenter.load(workdir, attention=attention)
  cfg = segmenter.cfg
  mode = cfg.attention
  split = split or config.data.eval_split
  root = train_lib.data_root(config, str(workdir))
  examples = train_lib.scan_split(config, root, split)
  if max_images:
    examples = examples[:max_images]
  source = data_lib.make_source(config, str(workdir), examples, segmenter.tokenizer, image_size=cfg.image_size,
                                split=split, progress=False, train=False)
  task = train_lib.SegTask(cfg)
  seed = int(config.eval.sample_seed) if sample_seed is None else int(sample_seed)
  probs, gts, kept, total, seconds = predict_records(task, segmenter.params, source, batch_size=int(config.eval.batch_size),
                                              sample_seed=seed, progress=progress)
  preds = probs >= float(config.eval.threshold)
  cost = attention_cost(cfg, kept, total)
  spacing = [data_lib.model_spacing(ex, cfg.image_size) for ex in examples]
  result = metrics_lib.evaluate_masks(preds, gts, examples, spacing=spacing, n_boot=n_boot, seed=0)
  result["attention"] = mode
  result["cost"] = {**cost, "predict_seconds": seconds, "images": len(examples)}
  out = Path(out_dir) if out_dir else workdir / f"eval_{mode}"
  out.mkdir(parents=True, exist_ok=True)
  paths = metrics_lib.write_report(result, out)
  result["paths"] = {k: str(v) for k, v in paths._asdict().items()}
  result["summary_markdown"] = Path(result["paths"]["summary"]).read_text()
  if keep_predictions:
    result["predictions"] = {"probs": probs, "gts": gts, "kept": kept, "examples": examples}
  return result
