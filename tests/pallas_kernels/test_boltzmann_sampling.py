"""Boltzmann sampling: exact semantics, statistics, annealing, block layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import boltzmann_sampling as bs


def _binomial_ok(freq, prob, samples, sigmas=5.0):
  """|freq - prob| within `sigmas` binomial standard errors (plus float slack)."""
  tol = sigmas * np.sqrt(prob * (1.0 - prob) / samples) + 2e-3
  return np.all(np.abs(freq - prob) <= tol), np.max(np.abs(freq - prob) - tol)


def test_num_draws_and_temperature_schedule():
  assert bs.num_draws(100, 0.1) == 10  # not 11 from 0.1 * 100 = 10.000000000000002
  assert bs.num_draws(1024, 0.1) == 103
  assert bs.num_draws(5, 0.01) == 1
  with pytest.raises(ValueError):
    bs.num_draws(10, 0.0)
  assert [bs.boltzmann_temperature(l) for l in range(3)] == [0.5, 1 / 3, 0.25]


def test_kept_keys_are_distinct_sorted_and_match_mask():
  scores = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 37)), jnp.float32)
  kept = bs.sample_kept_keys(jax.random.PRNGKey(1), scores, temperature=0.3, sample_ratio=0.2)
  n = bs.num_draws(37, 0.2)
  assert kept.indices.shape == (2, 1, 5, n) and kept.counts.shape == (2, 1, 5)
  idx, cnt = np.asarray(kept.indices), np.asarray(kept.counts)
  mask = np.asarray(kept.to_mask())  # the mask the sampler built
  rebuilt = bs.KeptKeys(kept.indices, kept.counts, 37).to_mask()  # scattered from indices
  np.testing.assert_array_equal(np.asarray(rebuilt), mask)
  for b in range(2):
    for q in range(5):
      row = idx[b, 0, q]
      c = cnt[b, 0, q]
      assert 1 <= c <= n
      assert np.all(np.diff(row[:c]) > 0) and np.all(row[c:] == 37)
      np.testing.assert_array_equal(np.flatnonzero(mask[b, 0, q]), row[:c])


@pytest.mark.parametrize("sampler", ["scalable", "reference"])
def test_keep_frequencies_match_one_minus_one_minus_p_to_the_n(sampler):
  """Empirical P(key kept) over many draws equals 1 - (1 - p)^n for every key."""
  scores = jnp.linspace(-1.0, 2.0, 3 * 12).reshape(1, 3, 12)
  temperature, ratio, samples = 0.7, 0.25, 4000
  keys = jax.random.split(jax.random.PRNGKey(2), samples)
  if sampler == "scalable":
    draw = lambda r: bs.sample_kept_keys(r, scores, temperature=temperature,
                                         sample_ratio=ratio).to_mask()
  else:
    draw = lambda r: bs.sample_kept_keys_reference(r, scores, temperature=temperature,
                                                   sample_ratio=ratio)[:, None]
  freq = np.asarray(jnp.mean(jax.jit(jax.vmap(draw))(keys).astype(jnp.float32), axis=0))
  expected = np.asarray(bs.keep_probability(scores, temperature, ratio))[:, None]
  ok, worst = _binomial_ok(freq, expected, samples)
  assert ok, f"keep frequency off by {worst:.4f} beyond 5 sigma"


def test_zero_probability_keys_are_never_kept_and_nonfinite_rows_attend_everywhere():
  scores = jnp.array([[[0.0, -jnp.inf, 1.0, -jnp.inf], [-jnp.inf] * 4]])
  kept = bs.sample_kept_keys(jax.random.PRNGKey(3), scores, temperature=1.0, sample_ratio=1.0)
  mask = np.asarray(kept.to_mask())[0, 0]
  assert not mask[0, 1] and not mask[0, 3]
  assert int(kept.counts[0, 0, 1]) == 0  # no defined distribution: nothing drawn
  eff = np.asarray(bs.effective_mask(kept.to_mask()))[0, 0]
  assert eff[1].all()


def test_annealing_reduces_distinct_kept_keys():
  """A small object on a 32x32 map: as T_l = 1/(2+l) falls, fewer distinct keys."""
  yy, xx = jnp.meshgrid(jnp.arange(32.0), jnp.arange(32.0), indexing="ij")
  bump = jnp.exp(-((yy - 10) ** 2 + (xx - 20) ** 2) / 8.0)
  scores = jax.nn.sigmoid(12.0 * (bump - 0.3)).reshape(1, 1, 1024)
  scores = jnp.broadcast_to(scores, (1, 4, 1024))
  means = []
  for layer in range(0, 9, 2):
    t = bs.boltzmann_temperature(layer)
    keys = jax.random.split(jax.random.PRNGKey(layer), 16)
    counts = jax.vmap(lambda r: bs.sample_kept_keys(
        r, scores, temperature=t, sample_ratio=0.1).counts)(keys)
    means.append(float(jnp.mean(counts)))
    expected = float(jnp.sum(bs.keep_probability(scores[0, 0], t, 0.1)))
    assert abs(means[-1] - expected) < 0.05 * expected + 2.0
  assert all(a > b for a, b in zip(means, means[1:])), means
  assert means[-1] < 0.5 * means[0]


def test_layout_from_mask_lists_exactly_the_touched_blocks():
  rng = np.random.default_rng(0)
  mask = rng.random((2, 2, 21, 45)) < 0.05
  mask[0, 0, 3] = False  # an empty row: attends everywhere
  layout = bs.block_sparse_layout_from_mask(jnp.asarray(mask), block_q=8, block_k=16)
  eff = np.asarray(bs.effective_mask(jnp.asarray(mask)))
  np.testing.assert_array_equal(np.asarray(layout.to_dense_mask()), eff)
  assert layout.num_q_tiles == 3 and layout.num_k_blocks == 3 and layout.max_blocks == 3
  flags = np.asarray(layout.block_flags())
  padded = np.zeros((2, 2, 24, 48), bool)
  padded[:, :, :21, :45] = eff
  np.testing.assert_array_equal(flags, padded.reshape(2, 2, 3, 8, 3, 16).any(axis=(3, 5)))
  idx, cnt = np.asarray(layout.block_indices), np.asarray(layout.block_counts)
  qidx, qcnt = np.asarray(layout.q_tile_indices), np.asarray(layout.q_tile_counts)
  for b in range(2):
    for h in range(2):
      for t in range(3):
        listed = idx[b, h, t, :cnt[b, h, t]]
        np.testing.assert_array_equal(listed, np.flatnonzero(flags[b, h, t]))
        assert np.all(idx[b, h, t, cnt[b, h, t]:] == listed[-1])  # padded by repeat
      for k in range(3):
        np.testing.assert_array_equal(qidx[b, h, k, :qcnt[b, h, k]],
                                      np.flatnonzero(flags[b, h, :, k]))


def test_block_sampling_bounds_and_block_keep_frequencies():
  """Per (tile, block): P(kept) = 1 - (1 - P_tile(block))^n_b, at most n_b blocks."""
  scores = jnp.linspace(0.0, 3.0, 20 * 50).reshape(1, 20, 50)
  t, ratio, bq, bk, samples = 0.8, 0.3, 8, 16, 3000
  n_b = bs.num_draws(4, ratio)
  keys = jax.random.split(jax.random.PRNGKey(4), samples)
  layouts = jax.jit(jax.vmap(lambda r: bs.sample_kept_blocks(
      r, scores, temperature=t, sample_ratio=ratio, block_q=bq, block_k=bk)))(keys)
  assert layouts.block_indices.shape[-1] == n_b  # max_blocks (vmapped: extra axis)
  assert int(jnp.max(layouts.block_counts)) <= n_b
  flags = jax.vmap(lambda l: l.block_flags())(layouts)
  freq = np.asarray(jnp.mean(flags.astype(jnp.float32), axis=0))[0, 0]
  p = np.asarray(bs.boltzmann_probabilities(scores, t))[0]
  p = np.pad(p, ((0, 4), (0, 14)))
  mass = p.reshape(24, 4, 16).sum(-1)
  tile_mass = np.stack([mass[0:8].mean(0), mass[8:16].mean(0), mass[16:20].mean(0)])
  expected = 1.0 - (1.0 - tile_mass) ** n_b
  ok, worst = _binomial_ok(freq, expected, samples)
  assert ok, worst
  one = jax.tree.map(lambda x: x[0], layouts)
  dense = np.asarray(one.to_dense_mask())[0, 0]
  assert dense.shape == (20, 50)
  for tile in range(3):  # whole blocks, shared by the tile's queries
    rows = dense[tile * 8:(tile + 1) * 8]
    assert (rows == rows[:1]).all()


def test_patch_major_permutation_groups_square_patches():
  perm = np.asarray(bs.patch_major_permutation(8, 8, 4))
  assert sorted(perm.tolist()) == list(range(64))
  first = perm[:16]
  assert set((first // 8).tolist()) == {0, 1, 2, 3} and set((first % 8).tolist()) == {0, 1, 2, 3}
