"""kNN and linear-probe adapters against scikit-learn on the same features."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from mlx_med.embed.adapters import AdapterInputError, KNNClassifier, LinearProbe

E = 16


@pytest.fixture(scope="module")
def data():
  """Normalised embeddings of 3 classes (noisy class centres) and a 2-label multi-hot target."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, E))
  y = rng.integers(0, 3, 300)
  x = centres[y] + 1.5 * rng.normal(size=(300, E))
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  multi = np.stack([(y == 0) | (x[:, 0] > 0.1), y == 2], axis=1).astype(int)
  return x[:200], y[:200], multi[:200], x[200:], y[200:], multi[200:]


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_matches_sklearn(data, weights):
  x, y, multi, xq, _, _ = data
  ours = KNNClassifier(k=7, weights=weights).fit(x, y + 10)  # class ids need not start at 0
  ref = KNeighborsClassifier(n_neighbors=7, weights=weights, algorithm="brute", metric="euclidean").fit(x, y + 10)
  # Neighbours and their (normalised-vector) distances match; probabilities within fp32 rounding.
  dist, idx = ours.kneighbors(xq)
  ref_dist, ref_idx = ref.kneighbors(xq)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(dist, ref_dist, atol=1e-3)  # sqrt(2 - 2 cos) from a fp32 cosine
  np.testing.assert_allclose(ours.predict_proba(xq), ref.predict_proba(xq), atol=1e-4)
  np.testing.assert_array_equal(ours.predict(xq), ref.predict(xq))
  # Multi-label: sklearn's multi-output classifier gives one [Q, 2] array per label.
  ours_m = KNNClassifier(k=7, weights=weights).fit(x, multi)
  ref_m = KNeighborsClassifier(n_neighbors=7, weights=weights, algorithm="brute").fit(x, multi)
  ref_proba = np.stack([p[:, 1] for p in ref_m.predict_proba(xq)], axis=1)
  np.testing.assert_allclose(ours_m.predict_proba(xq), ref_proba, atol=1e-4)


def test_knn_similarity_weights_and_cosine_of_unnormalised_inputs(data):
  x, y, _, xq, _, _ = data
  knn = KNNClassifier(k=5, weights="similarity", temperature=0.1).fit(3 * x, y)  # cosine ignores scale
  cos = xq @ x.T
  idx = np.argsort(-cos, axis=1, kind="stable")[:, :5]
  w = np.exp(np.take_along_axis(cos, idx, axis=1) / 0.1)
  expected = np.stack([(w * (y[idx] == c)).sum(1) for c in range(3)], axis=1) / w.sum(1, keepdims=True)
  np.testing.assert_allclose(knn.predict_proba(xq), expected, atol=1e-4)


def test_knn_duplicate_dominates_the_vote(data):
  # A query equal to a training row: its fp32 distance is ~1e-4 (||q||^2 - 2 q.x + ||x||^2 cancels
  # to rounding, not to 0), so it takes nearly the whole 1/distance vote; a distance of exactly 0
  # takes all of it (scikit-learn's rule).
  x, y, _, _, _, _ = data
  knn = KNNClassifier(k=3, weights="distance", metric="l2").fit(x, y)
  proba = knn.predict_proba(x[:5])
  np.testing.assert_array_equal(proba.argmax(1), y[:5])
  assert proba.max(1).min() > 0.99
  w = knn._vote_weights(np.array([[0.0, 0.5, 1.0], [0.25, 0.5, 1.0]]))
  np.testing.assert_array_equal(w, [[1, 0, 0], [4, 2, 1]])


@pytest.mark.parametrize("C", [1.0, 10.0])
def test_linear_probe_multiclass_matches_sklearn(data, C):
  x, y, _, xq, _, _ = data
  probe = LinearProbe(C=C).fit(x, y)
  ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
  assert probe.converged, (probe.n_iter, probe.grad_norm)
  # Both reach the same strictly convex optimum; fp32 L-BFGS leaves ~1e-5 in the probabilities.
  np.testing.assert_allclose(probe.predict_proba(xq), ref.predict_proba(xq), atol=2e-4)
  np.testing.assert_allclose(probe.w.T, ref.coef_, atol=2e-3 * max(1, np.abs(ref.coef_).max()))
  np.testing.assert_array_equal(probe.predict(xq), ref.predict(xq))


def test_linear_probe_binary_and_multilabel_match_sklearn(data):
  x, y, multi, xq, _, _ = data
  binary = LinearProbe(C=2.0).fit(x, y == 1)
  ref = LogisticRegression(C=2.0, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y == 1)
  np.testing.assert_allclose(binary.predict_proba(xq), ref.predict_proba(xq), atol=2e-4)
  probe = LinearProbe(C=2.0, multi_label=True).fit(x, multi)
  assert probe.converged
  np.testing.assert_array_equal(probe.predict_scores(xq), probe.predict_proba(xq))
  for j in range(multi.shape[1]):
    ref = LogisticRegression(C=2.0, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), multi[:, j])
    np.testing.assert_allclose(probe.predict_proba(xq)[:, j], ref.predict_proba(xq)[:, 1], atol=2e-4)


def test_linear_probe_one_vs_rest(data):
  x, y, _, xq, _, _ = data
  probe = LinearProbe(multi_label=True).fit(x, y)  # class ids -> one sigmoid per class
  assert probe.multi_label and probe.predict_scores(xq).shape == (len(xq), 3)
  ref = LogisticRegression(tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y == 2)
  np.testing.assert_allclose(probe.predict_proba(xq)[:, 2], ref.predict_proba(xq)[:, 1], atol=2e-4)


def test_adapter_errors(data):
  x, y, multi, _, _, _ = data
  with pytest.raises(AdapterInputError, match="single class"):
    LinearProbe().fit(x, np.zeros(len(x), int))
  with pytest.raises(AdapterInputError, match="label column 1 has a single class"):
    LinearProbe().fit(x, np.stack([multi[:, 0], np.zeros(len(x), int)], 1))
  with pytest.raises(AdapterInputError, match="200 embeddings but 5 label rows"):
    KNNClassifier().fit(x, y[:5])
  with pytest.raises(AdapterInputError, match="not fitted"):
    LinearProbe().predict(x)
  with pytest.raises(AdapterInputError, match="dimension 3 but the adapter was fitted on 16"):
    LinearProbe(max_iter=5).fit(x, y).predict(x[:, :3])
  with pytest.raises(AdapterInputError, match="multi_label=False needs class ids"):
    LinearProbe(multi_label=False).fit(x, multi)
  with pytest.raises(AdapterInputError, match="unknown weights"):
    KNNClassifier(weights="rank")
