"""ExactIndex against a brute-force float64 numpy top-k, on 8 fake CPU devices."""

import json

import jax
import numpy as np
import pytest

from mlx_med.embed.index import ExactIndex, IndexInputError

N, DIM, Q = 203, 16, 37  # N is not a multiple of the 8 devices


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return rng.normal(size=(N, DIM)).astype(np.float32), rng.normal(size=(Q, DIM)).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
  x, q = x.astype(np.float64), q.astype(np.float64)
  if metric == "cosine":
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
  if metric == "l2":
    key = -np.sum((q[:, None, :] - x[None, :, :]) ** 2, axis=-1)
  else:
    key = q @ x.T
  order = np.argsort(-key, axis=1, kind="stable")[:, :k]  # ties: lower index first
  scores = np.take_along_axis(key, order, axis=1)
  return (-scores if metric == "l2" else scores), order


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("block_rows", [16384, 8])  # one block per device / several blocks per device
def test_matches_brute_force(data, metric, block_rows):
  x, q = data
  index = ExactIndex(x, metric=metric, batch_size=16, block_rows=block_rows)  # batches of 16, 16, 8 (5 used)
  assert index.num_shards == 8
  for k in (1, 10):
    scores, indices = index.search(q, k)
    ref_scores, ref_indices = brute_force(x, q, metric, k)
    assert scores.shape == indices.shape == (Q, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_bf16_prefilter_matches_brute_force(data, metric):
  x, q = data
  index = ExactIndex(x, metric=metric, batch_size=16, block_rows=8, prefilter=True, prefilter_k=12)
  for k in (1, 10, 30):  # 30 > prefilter_k: the prefilter keeps k per device
    scores, indices = index.search(q, k)
    ref_scores, ref_indices = brute_force(x, q, metric, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert 0 <= index.last_certified_fraction <= 1


def test_bf16_prefilter_falls_back_when_it_cannot_certify():
  # Rows that differ below bf16 resolution: the prefilter cannot separate them, so the
  # uncertified queries are answered by the fp32 search, and the results stay exact.
  rng = np.random.default_rng(2)
  base = rng.normal(size=(1, 32)).astype(np.float32)
  x = np.concatenate([base + 1e-4 * rng.normal(size=(150, 32)), rng.normal(size=(50, 32))]).astype(np.float32)
  q = np.concatenate([base + 1e-4 * rng.normal(size=(6, 32)), rng.normal(size=(6, 32))]).astype(np.float32)
  for metric in ("ip", "l2"):
    index = ExactIndex(x, metric=metric, prefilter=True, prefilter_k=10)
    scores, indices = index.search(q, 5)
    assert 0 < index.last_certified_fraction < 1
    plain = ExactIndex(x, metric=metric).search(q, 5)
    np.testing.assert_array_equal(indices, plain[1])
    # Certified rows were rescored by another fp32 product (another summation order): last-bit differences.
    np.testing.assert_allclose(scores, plain[0], rtol=1e-6)


def test_k_equal_to_n_returns_every_row(data):
  x, q = data
  scores, indices = ExactIndex(x, metric="ip").search(q[:3], N)
  np.testing.assert_array_equal(np.sort(indices, axis=1), np.tile(np.arange(N), (3, 1)))
  np.testing.assert_array_equal(indices, brute_force(x, q[:3], "ip", N)[1])
  assert np.all(np.isfinite(scores))  # padding rows (-inf) are never returned


def test_ties_go_to_the_lower_index():
  # Row 2 repeats across shards: 8 copies at indices spread over devices, all with equal scores.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(50, 8)).astype(np.float32)
  copies = [3, 11, 17, 30, 44]
  x[copies] = x[2]
  for metric in ("cosine", "ip", "l2"):
    _, indices = ExactIndex(x, metric=metric).search(x[2], 6)
    np.testing.assert_array_equal(indices[0], [2] + copies)


def test_add_equals_one_build(data):
  x, q = data
  index = ExactIndex(x[:100], ids=[f"a{i}" for i in range(100)], metric="l2")
  index.search(q, 5)  # the device copy must be refreshed after add
  index.add(x[100:], ids=[f"b{i}" for i in range(N - 100)])
  scores, indices = index.search(q, 5)
  ref_scores, ref_indices = ExactIndex(x, metric="l2").search(q, 5)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
  hits = index.search_ids(q[:1], 2)[0]
  assert hits[0][0] == index.ids[indices[0, 0]] and abs(hits[0][1] - scores[0, 0]) < 1e-6


def test_bfloat16_database(data):
  x, q = data
  import ml_dtypes
  index = ExactIndex(x, metric="ip", dtype="bfloat16")
  scores, indices = index.search(q, 5)
  # Reference on the bf16-rounded rows and queries, accumulated in float64.
  xb = x.astype(ml_dtypes.bfloat16).astype(np.float64)
  qb = q.astype(ml_dtypes.bfloat16).astype(np.float64)
  ref_scores, ref_indices = brute_force(xb, qb, "ip", 5)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_errors(data):
  x, q = data
  index = ExactIndex(x, metric="cosine")
  with pytest.raises(IndexInputError, match=r"k=204 is larger than the index \(203 rows\)"):
    index.search(q, N + 1)
  with pytest.raises(IndexInputError, match="the index is empty"):
    ExactIndex(None, dim=DIM).search(q, 1)
  with pytest.raises(IndexInputError, match="dimension 15 but the index holds dimension 16"):
    index.search(q[:, :15], 1)
  with pytest.raises(IndexInputError, match="row 1 holds NaN"):
    index.search(np.stack([q[0], np.full(DIM, np.nan, np.float32)]), 1)
  with pytest.raises(IndexInputError, match="unknown metric 'dot'"):
    ExactIndex(x, metric="dot")
  with pytest.raises(IndexInputError, match="3 ids"):
    ExactIndex(x[:4], ids=["a", "b", "c"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip(data, tmp_path, dtype):
  x, q = data
  ids = [f"images/{i:04d}.png" for i in range(N)]
  index = ExactIndex(x, ids=ids, metric="cosine", dtype=dtype)
  index.save(tmp_path / "idx")
  index.save(tmp_path / "idx")  # replacing a saved index is allowed
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary left behind
  loaded = ExactIndex.load(tmp_path / "idx")
  assert (loaded.metric, loaded.dtype, loaded.ids, len(loaded)) == ("cosine", dtype, ids, N)
  for a, b in zip(index.search(q, 7), loaded.search(q, 7)):
    np.testing.assert_array_equal(a, b)
  prefiltered = ExactIndex.load(tmp_path / "idx", prefilter=True)
  assert prefiltered.prefilter == (dtype == "float32")
  np.testing.assert_array_equal(prefiltered.search(q, 7)[1], index.search(q, 7)[1])


def test_load_errors(data, tmp_path):
  x, _ = data
  with pytest.raises(IndexInputError, match="not an index directory"):
    ExactIndex.load(tmp_path)
  (tmp_path / "stuff.txt").write_text("x")
  with pytest.raises(IndexInputError, match="exists and is not an index directory"):
    ExactIndex(x).save(tmp_path)
  root = ExactIndex(x).save(tmp_path / "idx")
  meta = json.loads((root / "meta.json").read_text())
  (root / "meta.json").write_text(json.dumps(dict(meta, version=99)))
  with pytest.raises(IndexInputError, match="version 99"):
    ExactIndex.load(root)
  (root / "meta.json").write_text(json.dumps(dict(meta, count=N + 1)))
  with pytest.raises(IndexInputError, match=r"has shape \(203, 16\) but meta.json says \(204, 16\)"):
    ExactIndex.load(root)
  (root / "meta.json").write_text(json.dumps(meta))
  (root / "ids.json").write_text(json.dumps(["a"]))
  with pytest.raises(IndexInputError, match="holds 1 ids but the index has 203 rows"):
    ExactIndex.load(root)
