"""ROC figures against scikit-learn on the same data (random and tied scores)."""

import json

import numpy as np
import pytest
from sklearn import metrics

from mlx_med.embed import evaluate as ev


def _data(kind: str, n: int = 300, seed: int = 0):
  rng = np.random.default_rng(seed)
  labels = rng.random(n) < 0.3
  scores = rng.normal(size=n) + 1.2 * labels
  if kind == "tied":
    scores = np.round(scores * 2) / 2  # a handful of distinct values, many ties across classes
  return scores, labels.astype(int)


KINDS = ["random", "tied"]


@pytest.mark.parametrize("kind", KINDS)
def test_roc_curve_and_auc_equal_sklearn(kind):
  scores, labels = _data(kind)
  fpr, tpr, thr = ev.roc_curve(scores, labels)
  ref = metrics.roc_curve(labels, scores, drop_intermediate=False)
  for ours, theirs in zip((fpr, tpr, thr), ref):
    np.testing.assert_array_equal(ours, theirs)
  dropped = ev.roc_curve(scores, labels, drop_intermediate=True)
  for ours, theirs in zip(dropped, metrics.roc_curve(labels, scores, drop_intermediate=True)):
    np.testing.assert_array_equal(ours, theirs)
  assert ev.roc_auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
  if kind == "tied":
    assert len(thr) < 20


@pytest.mark.parametrize("kind", KINDS)
def test_operating_points_equal_sklearn(kind):
  scores, labels = _data(kind, seed=3)
  points = ev.operating_points(scores, labels)
  fpr, tpr, thr = metrics.roc_curve(labels, scores, drop_intermediate=False)
  j = tpr - fpr
  best = int(np.flatnonzero(j == j.max())[0])  # highest threshold among equal J
  assert points.rule_in.threshold == thr[best]
  out = int(np.flatnonzero(tpr >= 0.9)[0])
  assert points.rule_out.threshold == thr[out]
  for point in (points.rule_in, points.rule_out):
    predicted = scores >= point.threshold
    assert point.sensitivity == pytest.approx(metrics.recall_score(labels, predicted), abs=1e-12)
    assert point.specificity == pytest.approx(metrics.recall_score(1 - labels, ~predicted), abs=1e-12)
  assert points.rule_out.sensitivity >= 0.9
  assert points.rule_in.sensitivity + points.rule_in.specificity - 1 == pytest.approx(j.max(), abs=1e-12)


def test_three_way_decision():
  points = ev.OperatingPoints(ev.OperatingPoint(0.7, 0.8, 0.9), ev.OperatingPoint(0.3, 0.95, 0.5))
  assert ev.three_way_decision(0.7, points) == "positive"
  assert ev.three_way_decision(0.5, points) == "possible"
  assert ev.three_way_decision(0.3, points) == "possible"
  assert ev.three_way_decision(0.29, points.to_dict()) == "negative"
  np.testing.assert_array_equal(ev.three_way_decision(np.array([0.9, 0.4, 0.1]), points),
                                ["positive", "possible", "negative"])
  # Rule-out above rule-in: the possible band is empty, the cut is the rule-in threshold.
  inverted = ev.OperatingPoints(ev.OperatingPoint(0.3, 0.95, 0.6), ev.OperatingPoint(0.5, 0.9, 0.7))
  np.testing.assert_array_equal(ev.three_way_decision(np.array([0.4, 0.3, 0.29]), inverted),
                                ["positive", "positive", "negative"])


@pytest.mark.parametrize("kind", KINDS)
def test_bootstrap_ci(kind):
  scores, labels = _data(kind, n=200, seed=5)
  lo, hi = ev.bootstrap_auc_ci(scores, labels, n_boot=300, seed=7)
  assert (lo, hi) == ev.bootstrap_auc_ci(scores, labels, n_boot=300, seed=7)  # deterministic
  assert (lo, hi) != ev.bootstrap_auc_ci(scores, labels, n_boot=300, seed=8)
  auc = ev.roc_auc(scores, labels)
  assert lo < auc < hi and hi - lo < 0.3
  # The vectorised resample AUCs equal scikit-learn's AUC of each explicit resample.
  pos, neg = scores[labels == 1], scores[labels == 0]
  chunks = list(ev.stratified_resamples(pos.size, neg.size, 300, 7))
  assert len(chunks) == 5  # 300 resamples in chunks of 64
  pos_idx = np.concatenate([p for p, _ in chunks])
  neg_idx = np.concatenate([q for _, q in chunks])
  ref = [metrics.roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos[p], neg[q]])
         for p, q in zip(pos_idx, neg_idx)]
  assert (lo, hi) == pytest.approx((np.percentile(ref, 2.5), np.percentile(ref, 97.5)), abs=1e-12)


def test_single_class_and_bad_input():
  assert np.isnan(ev.roc_auc([0.1, 0.2], [1, 1]))
  with pytest.raises(ev.EvaluationInputError, match="only one class"):
    ev.operating_points([0.1, 0.2], [0, 0])
  with pytest.raises(ev.EvaluationInputError, match="3 scores but 2 labels"):
    ev.roc_auc([0.1, 0.2, 0.3], [0, 1])
  with pytest.raises(ev.EvaluationInputError, match="labels must be 0/1"):
    ev.roc_auc([0.1, 0.2], [0, 2])
  with pytest.raises(ev.EvaluationInputError, match="NaN or inf"):
    ev.roc_auc([0.1, np.nan], [0, 1])


def test_precision_at_k():
  assert ev.precision_at_k([0, 1], [[0, 0, 1], [1, 0, 0]]) == pytest.approx(0.5)
  np.testing.assert_allclose(ev.precision_at_k([0, 1], [[0, 0, 1], [1, 0, 0]], per_query=True), [2 / 3, 1 / 3])
  q = np.array([[1, 0, 1], [0, 0, 0]])
  r = np.array([[[0, 0, 1], [0, 1, 0]], [[0, 0, 0], [1, 0, 0]]])
  assert ev.precision_at_k(q, r) == pytest.approx(0.5)
  with pytest.raises(ev.EvaluationInputError, match="do not match"):
    ev.precision_at_k(q, r[:, :, :2])


def test_evaluate_scores_report(tmp_path):
  rng = np.random.default_rng(0)
  n = 240
  labels = (rng.random((n, 3)) < 0.3).astype(int)
  scores = rng.normal(size=(n, 3)) + labels * np.array([2.0, 1.0, 0.0])
  labels[:, 2] = 0  # no positive at all: skipped
  mask = np.ones((n, 3), bool)
  mask[: n // 2, 1] = False  # label 1 counts only the second half (e.g. its own domain)
  report = ev.evaluate_scores(scores, labels, ["ct/nodule", "xray/effusion", "oct/drusen"], tmp_path / "out",
                              mask=mask, n_boot=200, seed=1)
  a, b = report["labels"]["ct/nodule"], report["labels"]["xray/effusion"]
  assert a["auc"] == pytest.approx(metrics.roc_auc_score(labels[:, 0], scores[:, 0]))
  assert b["n"] == n // 2 and b["auc"] == pytest.approx(metrics.roc_auc_score(labels[n // 2:, 1], scores[n // 2:, 1]))
  assert a["auc_ci"][0] < a["auc"] < a["auc_ci"][1]
  assert report["skipped"] == ["oct/drusen"] and report["labels"]["oct/drusen"]["auc"] is None
  assert report["mean_auc"] == pytest.approx((a["auc"] + b["auc"]) / 2)
  assert sum(d["count"] for d in a["decisions"].values()) == n
  assert sum(d["positives"] for d in a["decisions"].values()) == labels[:, 0].sum()
  on_disk = json.loads((tmp_path / "out" / "eval.json").read_text())
  assert on_disk["mean_auc"] == report["mean_auc"]
  for name in on_disk["plots"]:
    assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(on_disk["plots"]) == ["roc.png", "roc/ct_nodule.png", "roc/xray_effusion.png"]
  assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temporary files left
