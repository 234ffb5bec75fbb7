"""ROC evaluation of per-label scores: AUC with bootstrap intervals, operating points, decisions.

What MedImageInsight reports per finding, computed in numpy (every figure is checked against
scikit-learn in the tests):

- `roc_curve(scores, labels)`: (fpr, tpr, thresholds), identical to
  `sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`: one point per distinct
  score, thresholds descending, a first point (0, 0) at threshold +inf. `drop_intermediate=True`
  drops the points on straight segments, as scikit-learn's default does.
- `roc_auc`: area under that curve (ties count one half), = `sklearn.metrics.roc_auc_score`;
  NaN when only one class is present (scikit-learn raises instead).
- `bootstrap_auc_ci`: percentile 95% interval from a stratified bootstrap: positives and
  negatives are resampled separately with replacement, so every resample keeps both classes and
  the class balance. Seeded; vectorised over resamples.
- `operating_points`: rule-in = the threshold maximising Youden's J = sensitivity + specificity
  - 1 (the highest such threshold on ties); rule-out = the highest threshold whose sensitivity is
  at least 90%. A score counts as positive when it is >= the threshold (scikit-learn's rule).
- `three_way_decision`: "positive" (score >= rule-in), "negative" (score < rule-out), otherwise
  "possible". The rule-in test comes first: when the rule-out threshold lies above the rule-in
  one (Youden's point already has >= 90% sensitivity) the "possible" band is empty and every
  score is positive (>= rule-in) or negative (< rule-in).
- `precision_at_k`: retrieval precision of image-image search.
- `evaluate_scores`: all of the above per label, written to `eval.json` and ROC PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RULE_OUT_SENSITIVITY = 0.9


class EvaluationInputError(ValueError):
  """Bad scores/labels given to the evaluation (one-line message)."""


def _binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if scores.shape != labels.shape:
    raise EvaluationInputError(f"{scores.size} scores but {labels.size} labels; give one label per score")
  if not np.all(np.isfinite(scores)):
    raise EvaluationInputError(f"{int(np.sum(~np.isfinite(scores)))} scores are NaN or inf; fix or drop those rows")
  values = np.unique(labels)
  if not np.all(np.isin(values, (0, 1))):
    raise EvaluationInputError(f"labels must be 0/1 (or bool); found values {values[:5].tolist()}")
  return scores, labels.astype(bool)


# ------------------------------------------------------------------------------------ curves


def _counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cumulative (false positives, true positives) at each distinct score, descending."""
  order = np.argsort(-scores, kind="mergesort")
  s, y = scores[order], labels[order]
  last_of_value = np.append(np.flatnonzero(np.diff(s)), len(s) - 1)
  tps = np.cumsum(y)[last_of_value]
  fps = (last_of_value + 1) - tps
  return fps, tps, s[last_of_value]


def roc_curve(scores: Any, labels: Any, *, drop_intermediate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds) with thresholds descending and a first point at +inf.

  NaN rates for a class that is absent (as scikit-learn, which also warns).
  """
  scores, labels = _binary(scores, labels)
  fps, tps, thresholds = _counts(scores, labels)
  if drop_intermediate and len(fps) > 2:
    # Keep the ends and every point where the curve changes direction.
    keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
  fps = np.r_[0, fps]
  tps = np.r_[0, tps]
  thresholds = np.r_[np.inf, thresholds]
  with np.errstate(invalid="ignore", divide="ignore"):
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
  return fpr, tpr, thresholds


def roc_auc(scores: Any, labels: Any) -> float:
  """Area under the ROC curve (Mann-Whitney U / (P N), ties one half); NaN with one class."""
  scores, labels = _binary(scores, labels)
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  neg = np.sort(scores[~labels])
  pos = scores[labels]
  below = np.searchsorted(neg, pos, side="left")
  ties = np.searchsorted(neg, pos, side="right") - below
  return float((below.sum() + 0.5 * ties.sum()) / (n_pos * n_neg))


RESAMPLE_CHUNK = 64  # resamples drawn and scored together (bounds memory at [64, N] per chunk)


def stratified_resamples(n_pos: int, n_neg: int, n_boot: int, seed: int):
  """Yields (positive indices [c, n_pos], negative indices [c, n_neg]) for chunks of resamples.

  One generator `np.random.default_rng(seed)` draws, chunk by chunk of RESAMPLE_CHUNK
  resamples, the positives' indices and then the negatives'.
  """
  rng = np.random.default_rng(seed)
  for start in range(0, n_boot, RESAMPLE_CHUNK):
    c = min(RESAMPLE_CHUNK, n_boot - start)
    yield rng.integers(0, n_pos, (c, n_pos)), rng.integers(0, n_neg, (c, n_neg))


def bootstrap_auc_ci(scores: Any, labels: Any, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the AUC (stratified: both classes in every resample).

  Returns (nan, nan) when a class is absent.
  """
  scores, labels = _binary(scores, labels)
  pos, neg = scores[labels], scores[~labels]
  if pos.size == 0 or neg.size == 0:
    return float("nan"), float("nan")
  # Each resample weights the originals by how often they were drawn. With the negatives sorted,
  # a positive's (ties-half) count of lower negatives is a difference of cumulative weights.
  neg_order = np.argsort(neg, kind="mergesort")
  neg_sorted = neg[neg_order]
  rank_of = np.empty(neg.size, np.int64)
  rank_of[neg_order] = np.arange(neg.size)
  lo = np.searchsorted(neg_sorted, pos, side="left")
  hi = np.searchsorted(neg_sorted, pos, side="right")
  aucs = []
  for pos_idx, neg_idx in stratified_resamples(pos.size, neg.size, n_boot, seed):
    c = len(pos_idx)
    offsets = (np.arange(c) * neg.size)[:, None]
    weights = np.bincount((rank_of[neg_idx] + offsets).ravel(), minlength=c * neg.size).reshape(c, neg.size)
    cumulative = np.concatenate([np.zeros((c, 1)), np.cumsum(weights, axis=1)], axis=1)
    wins = cumulative[:, lo] + 0.5 * (cumulative[:, hi] - cumulative[:, lo])  # [c, n_pos]
    aucs.append(np.take_along_axis(wins, pos_idx, axis=1).sum(axis=1) / (pos.size * neg.size))
  aucs = np.concatenate(aucs)
  tail = 100 * (1 - level) / 2
  return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


# ---------------------------------------------------------------------------- operating points


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  threshold: float
  sensitivity: float
  specificity: float


@dataclasses.dataclass(frozen=True)
class OperatingPoints:
  """Rule-in (Youden's J) and rule-out (>= 90% sensitivity) thresholds of one label."""

  rule_in: OperatingPoint
  rule_out: OperatingPoint

  def to_dict(self) -> dict[str, dict[str, float]]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Mapping[str, float]]) -> OperatingPoints:
    return cls(OperatingPoint(**d["rule_in"]), OperatingPoint(**d["rule_out"]))


def operating_points(scores: Any, labels: Any, *, sensitivity: float = RULE_OUT_SENSITIVITY) -> OperatingPoints:
  """Youden-J rule-in and the highest threshold reaching `sensitivity` (rule-out)."""
  fpr, tpr, thresholds = roc_curve(scores, labels)
  if np.isnan(fpr[-1]) or np.isnan(tpr[-1]):
    raise EvaluationInputError("operating points need both positive and negative labels; this label has only one class")
  # Skip the +inf point (J = 0 there, and +inf is not a usable threshold).
  j = tpr[1:] - fpr[1:]
  best = 1 + int(np.argmax(j))  # first maximum = highest threshold among equal J
  out = 1 + int(np.argmax(tpr[1:] >= sensitivity))  # tpr reaches 1 at the last point, so one exists
  point = lambda i: OperatingPoint(float(thresholds[i]), float(tpr[i]), float(1.0 - fpr[i]))
  return OperatingPoints(point(best), point(out))


def three_way_decision(score: Any, points: OperatingPoints | Mapping[str, Any]) -> Any:
  """"positive" / "possible" / "negative" for a score (a str) or an array of scores (array of str)."""
  if not isinstance(points, OperatingPoints):
    points = OperatingPoints.from_dict(points)
  s = np.asarray(score, np.float64)
  out = np.where(s >= points.rule_in.threshold, "positive",
                 np.where(s < points.rule_out.threshold, "negative", "possible"))
  return str(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------- retrieval


def precision_at_k(query_labels: Any, retrieved_labels: Any, *, per_query: bool = False) -> float | np.ndarray:
  """Share of retrieved items relevant to their query, averaged over queries.

  query_labels [Q] (class ids) with retrieved_labels [Q, k]: relevant = same class.
  query_labels [Q, K] (multi-hot) with retrieved_labels [Q, k, K]: relevant = the label sets
  share a label, or both are empty (a normal image retrieving a normal image).
  """
  q = np.asarray(query_labels)
  r = np.asarray(retrieved_labels)
  if q.ndim == 1 and r.ndim == 2 and r.shape[0] == q.shape[0]:
    relevant = r == q[:, None]
  elif q.ndim == 2 and r.ndim == 3 and r.shape[0] == q.shape[0] and r.shape[2] == q.shape[1]:
    qb, rb = q.astype(bool), r.astype(bool)
    shared = np.any(qb[:, None, :] & rb, axis=-1)
    both_empty = (~qb.any(-1))[:, None] & ~rb.any(-1)
    relevant = shared | both_empty
  else:
    raise EvaluationInputError(f"query labels {q.shape} and retrieved labels {r.shape} do not match; give [Q] with "
                               "[Q, k] (class ids) or [Q, K] with [Q, k, K] (multi-hot)")
  precision = relevant.mean(axis=1)
  return precision if per_query else float(precision.mean())


# -------------------------------------------------------------------------------- the report


def _none_if_nan(x: float) -> float | None:
  return None if x is None or not math.isfinite(x) else float(x)


def _safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "label"


def _write_json_atomic(path: Path, data: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(data, indent=2) + "\n")
  os.replace(tmp, path)


def _save_figure_atomic(fig: Any, path: Path) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  os.replace(tmp, path)


def _plot(curves: list[tuple[str, np.ndarray, np.ndarray, float, OperatingPoints]], out_dir: Path,
          title: str) -> list[str]:
  # Figure objects without pyplot: no global backend switch, no figure registry to leak into.
  from matplotlib.figure import Figure

  written = []
  fig = Figure(figsize=(6.4, 6.0))
  ax = fig.subplots()
  for i, (name, fpr, tpr, auc, _) in enumerate(curves):
    # ten colours, then the same colours dashed, dotted...: every label stays distinguishable
    ax.plot(fpr, tpr, lw=1.4, color=f"C{i % 10}", ls=("-", "--", ":", "-.")[(i // 10) % 4],
            label=f"{name} (AUC {auc:.3f})")
  ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
  ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)", title=title,
         xlim=(0, 1), ylim=(0, 1.01))
  if curves:
    ax.legend(fontsize=7, loc="lower right")
  _save_figure_atomic(fig, out_dir / "roc.png")
  written.append("roc.png")
  (out_dir / "roc").mkdir(exist_ok=True)
  for name, fpr, tpr, auc, points in curves:
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.subplots()
    ax.plot(fpr, tpr, lw=1.6, color="C0")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    for label, point, color in (("rule-in (Youden J)", points.rule_in, "C3"),
                                (f"rule-out ({RULE_OUT_SENSITIVITY:.0%} sens.)", points.rule_out, "C2")):
      ax.scatter([1 - point.specificity], [point.sensitivity], color=color, zorder=3,
                 label=f"{label}: t={point.threshold:.3g}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{name}: AUC {auc:.3f}", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    path = out_dir / "roc" / f"{_safe_name(name)}.png"
    _save_figure_atomic(fig, path)
    written.append(str(path.relative_to(out_dir)))
  return written


def evaluate_scores(scores: Any, labels: Any, names: Sequence[str], out_dir: str | os.PathLike[str] | None, *,
                    mask: Any = None, n_boot: int = 1000, seed: int = 0, title: str = "ROC",
                    plots: bool = True) -> dict[str, Any]:
  """Per-label ROC AUC, bootstrap 95% CI, operating points and decision counts.

  Args:
    scores: [N, K] scores (higher = more likely positive).
    labels: [N, K] 0/1 ground truth.
    names: K label names.
    out_dir: where `eval.json`, `roc.png` (all labels) and `roc/<label>.png` go (None: write nothing).
    mask: optional [N, K] bool: which rows count for each label (e.g. only images of the label's
      domain); default every row.
  Returns a dict: {"labels": {name: {...}}, "mean_auc", "n_labels_scored", "skipped"}. A label
  whose rows hold a single class gets auc None and is listed in "skipped" (not in the mean).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 2 or scores.shape != labels.shape:
    raise EvaluationInputError(f"scores {scores.shape} and labels {labels.shape} must both be [N, K]")
  if len(names) != scores.shape[1]:
    raise EvaluationInputError(f"{len(names)} label names for {scores.shape[1]} score columns; give one name per column")
  if mask is None:
    mask = np.ones(scores.shape, bool)
  mask = np.asarray(mask, bool)
  if mask.shape != scores.shape:
    raise EvaluationInputError(f"mask {mask.shape} must match scores {scores.shape}")
  report: dict[str, Any] = {"labels": {}, "n_boot": n_boot, "seed": seed, "rule_out_sensitivity": RULE_OUT_SENSITIVITY}
  curves = []
  skipped = []
  for j, name in enumerate(names):
    s, y = _binary(scores[mask[:, j], j], labels[mask[:, j], j])
    entry: dict[str, Any] = {"n": int(y.size), "n_positive": int(y.sum())}
    if y.all() or not y.any():
      entry.update(auc=None, auc_ci=None, operating_points=None)
      skipped.append(name)
    else:
      auc = roc_auc(s, y)
      ci = bootstrap_auc_ci(s, y, n_boot=n_boot, seed=seed)
      points = operating_points(s, y)
      decisions = three_way_decision(s, points)
      entry.update(auc=auc, auc_ci=[ci[0], ci[1]], operating_points=points.to_dict(),
                   decisions={d: {"count": int(np.sum(decisions == d)),
                                  "positives": int(np.sum((decisions == d) & y))}
                              for d in ("positive", "possible", "negative")})
      fpr, tpr, _ = roc_curve(s, y)
      curves.append((name, fpr, tpr, auc, points))
    report["labels"][name] = entry
  aucs = [e["auc"] for e in report["labels"].values() if e["auc"] is not None]
  report["mean_auc"] = _none_if_nan(float(np.mean(aucs))) if aucs else None
  report["n_labels_scored"] = len(aucs)
  report["skipped"] = skipped
  if out_dir is not None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = _plot(curves, out, title) if plots else []
    _write_json_atomic(out / "eval.json", report)
  return report
