"""Evaluate an embedding model on a labelled image folder: the one path behind `mlx-med embed
evaluate` and the demo.

A folder holds `metadata.csv` (path, split, labels ";"-joined, optional domain, report) and its
images. `evaluate_folder` embeds the evaluation split with the model's own image processor, scores
every label by one method, and hands the scores to `evaluate.evaluate_scores` (per-label ROC AUC,
bootstrap CI, operating points, ROC plots):

- zeroshot: prompt-ensembled text classifier (`zeroshot.py`); the score of a label is the cosine
  between image and label embedding for a CLIP-style model (no logit bias), the sigmoid
  probability for a SigLIP-style one (calibrated by its bias); operating points are thresholds
  on that score;
- knn / probe: the support split's embeddings and labels (`adapters.py`).

Labels written "domain/finding" are scored, by default, only on rows of their own domain (an
x-ray nodule detector is not credited for telling x-rays from skin photos); `same_domain=False`
scores every label on every row. Image-image search precision@k (same-domain neighbours sharing a
label with the query, by the exact index) is reported beside the AUCs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mlx_med.embed")

METHODS = ("zeroshot", "knn", "probe")


def domain_mask(rows: Sequence[dict[str, str]], names: Sequence[str]) -> np.ndarray | None:
  """[N, K] bool: row i counts for label k when the label's domain prefix equals the row's domain.

  None when the labels carry no domain prefix or the rows no domain column (every row counts)."""
  if not all("/" in n for n in names) or not all(row.get("domain") for row in rows):
    return None
  label_domain = np.array([n.split("/", 1)[0] for n in names])
  row_domain = np.array([row["domain"] for row in rows])
  return row_domain[:, None] == label_domain[None, :]


def embed_rows(embedder, folder: Path, rows: Sequence[dict[str, str]], *, batch_size: int = 64,
               progress: bool = True) -> np.ndarray:
  """[N, E] normalised embeddings of the rows' images (every row must load: the folder was validated)."""
  from mlx_med.vision import io as vio

  out = []
  start = time.perf_counter()
  for lo in range(0, len(rows), batch_size):
    chunk = rows[lo:lo + batch_size]
    batch = np.stack([vio.load_and_preprocess(folder / r["path"], processor=embedder.processor) for r in chunk])
    out.append(np.asarray(embedder.embed_images(batch), np.float32))
    if progress and lo + batch_size < len(rows):
      done = lo + len(chunk)
      rate = done / max(time.perf_counter() - start, 1e-9)
      log.info("embedded %d/%d images (%.1f/s, ETA %.0f s)", done, len(rows), rate, (len(rows) - done) / rate)
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def search_precision(embeddings: np.ndarray, y: np.ndarray, rows: Sequence[dict[str, str]], k: int = 10) -> float:
  """Mean image-image precision@k: a held-out image queries the others (itself excluded) by cosine;
  a neighbour is relevant when it has the query's domain and shares a label with it, or, for a
  normal query (no label), is a normal image of the query's domain. Queries of every row."""
  from mlx_med.embed.evaluate import precision_at_k
  from mlx_med.embed.index import ExactIndex

  n = len(embeddings)
  if n <= k:
    raise ValueError(f"precision@{k} needs more than {k} images; got {n}")
  index = ExactIndex(embeddings, metric="cosine")
  _, nbr = index.search(embeddings, k + 1)
  # drop the query itself (rank 0 unless an exact duplicate outranks it)
  keep = np.array([[j for j in row if j != i][:k] for i, row in enumerate(nbr)])
  # relevance sets: the labels, plus "normal image of domain d" for rows without a label, so a
  # normal query is answered by normal images of its own modality only
  domains = sorted({r.get("domain", "") for r in rows})
  normal_of = np.zeros((n, len(domains)), y.dtype)
  normal = y.sum(1) == 0
  normal_of[np.flatnonzero(normal), [domains.index(rows[i].get("domain", "")) for i in np.flatnonzero(normal)]] = 1
  sets = np.concatenate([y, normal_of], axis=1)
  return float(precision_at_k(sets, sets[keep]))


def evaluate_folder(model: Any, data: str | os.PathLike, *, method: str = "zeroshot", split: str = "test",
                    train_split: str = "train", out_dir: str | os.PathLike | None = None, k: int = 10,
                    same_domain: bool = True, n_boot: int = 1000, templates: Sequence[str] | None = None,
                    search_k: int = 10, progress: bool = True) -> dict[str, Any]:
  """Scores `split` of the folder with `method` and evaluates them; returns the report dict (also
  written to out_dir/eval.json with ROC plots). `model` is an Embedder or a path Embedder.load takes."""
  from mlx_med.embed import data as data_lib
  from mlx_med.embed import evaluate as evaluate_lib

  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
  if isinstance(model, (str, os.PathLike)):
    from mlx_med.embed.model import Embedder
    model = Embedder.load(model)
  folder = Path(data)
  rows = data_lib.read_metadata(folder)
  names = data_lib.vocabulary(rows)
  if not names:
    raise ValueError(f"{folder / 'metadata.csv'}: no labels in the labels column; nothing to evaluate")
  test = [r for r in rows if r["split"] == split]
  if not test:
    raise ValueError(f"{folder / 'metadata.csv'}: no rows with split {split!r}")
  y = data_lib.label_matrix(test, names)
  emb = embed_rows(model, folder, test, progress=progress)

  if method == "zeroshot":
    from mlx_med.embed import zeroshot
    classifier = zeroshot.text_classifier(model.embed_texts, names, templates)
    bias = getattr(model, "logit_bias", None)
    if bias is None:
      # A CLIP-style (UniCL) model has no calibrated per-label probability: sigmoid(exp(scale) *
      # cos) saturates near 1, so operating points would read 0.9999. The cosine ranks images the
      # same way (same AUC) and its thresholds stay readable.
      scores = zeroshot.zeroshot_scores(emb, classifier, 0.0, mode="sigmoid").logits
    else:
      scores = zeroshot.zeroshot_scores(emb, classifier, model.logit_scale, mode="sigmoid", logit_bias=bias).probs
  else:
    from mlx_med.embed import adapters
    support = [r for r in rows if r["split"] == train_split]
    if not support:
      raise ValueError(f"{folder / 'metadata.csv'}: no rows with split {train_split!r} for {method}")
    s_emb = embed_rows(model, folder, support, progress=progress)
    s_y = data_lib.label_matrix(support, names)
    if method == "knn":
      scores = adapters.KNNClassifier(k=k).fit(s_emb, s_y).predict_scores(emb)
    else:
      scores = adapters.LinearProbe(multi_label=True).fit(s_emb, s_y).predict_scores(emb)

  mask = domain_mask(test, names) if same_domain else None
  report = evaluate_lib.evaluate_scores(scores, y, names, out_dir, mask=mask, n_boot=n_boot,
                                        title=f"{method} ROC ({split})")
  report["method"] = method
  report["split"] = split
  report["n_images"] = len(test)
  if len(test) > search_k:
    report[f"search_precision_at_{search_k}"] = search_precision(emb, y, test, search_k)
  if out_dir is not None:
    path = Path(out_dir) / "eval.json"
    tmp = path.with_name("eval.json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, path)
  return report


def format_report(report: dict[str, Any]) -> str:
  """A plain-text table of per-label AUCs, CIs and operating points."""
  lines = [f"{'label':32s} {'AUC':>6s} {'95% CI':>15s} {'rule-in thr':>11s} {'rule-out thr':>12s}"]
  for name, r in report.get("labels", {}).items():
    auc = r.get("auc")
    if auc is None:
      lines.append(f"{name:32s} {'n/a':>6s}")
      continue
    lo, hi = r["auc_ci"]
    points = r.get("operating_points", {})
    rule_in = points.get("rule_in", {}).get("threshold", float("nan"))
    rule_out = points.get("rule_out", {}).get("threshold", float("nan"))
    lines.append(f"{name:32s} {auc:6.3f} [{lo:.3f}, {hi:.3f}] {rule_in:11.4g} {rule_out:12.4g}")
  lines.append(f"mean AUC {report.get('mean_auc', float('nan')):.3f} over {report.get('n_labels_scored', 0)} labels")
  for key, value in report.items():
    if key.startswith("search_precision_at_"):
      lines.append(f"image-image search precision@{key.rsplit('_', 1)[-1]}: {value:.3f}")
  return "\n".join(lines)
