"""Boltzmann attention: kernel (interpret mode) and XLA fallback vs the reference.

Tolerances (max abs error, scaled by max(1, max|reference|)):
  fp32: forward 2e-5, gradients 1e-4.
  bf16 inputs (reference computed in fp32 on the same bf16 values): forward
  3e-2, gradients 6e-2 -- the kernel rounds probabilities to bf16 before the
  P @ V and dS @ K matmuls, as flash attention does.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import BF16, FP32, assert_close, assert_matches_reference, qkv, randn, with_reference
from pallas_kernels import boltzmann_attention as ba
from pallas_kernels import boltzmann_sampling as bs
from pallas_kernels.common import BlockSizes


def _check_against_reference(fn, q, k, v, mask, tol, grads=True):
  """Forward and (q, k, v) gradients of fn against the dense reference, jitted
  together (one compile instead of hundreds of eager op compiles)."""
  ref_fn = lambda q, k, v: ba.boltzmann_attention_reference(q, k, v, mask)

  both = jax.jit(lambda q, k, v: with_reference(fn, ref_fn, q, k, v, grads=grads))
  assert_matches_reference(*both(q, k, v), tol)


def _key_sample(scores_shape, ratio=0.1, temperature=0.5, seed=1):
  scores = jax.nn.sigmoid(randn(seed, scores_shape))
  return bs.sample_kept_keys(jax.random.PRNGKey(seed + 1), scores,
                             temperature=temperature, sample_ratio=ratio)


# ------------------------------------------------------------------ kernels
# Interpret-mode compiles dominate test time (~5-10 s each, runs take ~0.1 s),
# so every case of one shape family goes through the same jitted function with
# the layout as a traced argument: one compile serves many cases.
def _grads_fn(attn):
  """jit(q, k, v, layout, mask) -> (out, grads, ref_out, ref_grads)."""

  @jax.jit
  def run(q, k, v, layout, mask):
    return with_reference(lambda q, k, v: attn(q, k, v, layout),
                          lambda q, k, v: ba.boltzmann_attention_reference(q, k, v, mask), q, k, v)

  return run


_gpu_kernel = _grads_fn(functools.partial(ba.boltzmann_attention, interpret=True))
_tpu_kernel = _grads_fn(functools.partial(ba.boltzmann_attention, lowering="tpu", interpret=True))


def _check(run, q, k, v, layout, mask, tol):
  results = run(q, k, v, layout, mask)
  assert_matches_reference(*results, tol)
  return results[0]


# Family A: fp32, batch 2, 4 q heads over 2 kv heads, Q=40 and N=70 (neither a
# multiple of the 16x16 tiles), per-key layouts with in-block masks.
_A = dict(shape_q=(2, 4, 40, 32), kv_heads=2, num_keys=70)


def _layout_a(mask):
  return bs.block_sparse_layout_from_mask(mask, block_q=16, block_k=16)


def test_kernel_per_key_gqa_ragged_lengths_fp32():
  q, k, v = qkv(**_A)
  kept = _key_sample((2, 40, 70), ratio=0.15)
  mask = kept.to_mask()
  _check(_gpu_kernel, q, k, v, _layout_a(mask), mask, FP32)


def test_kernel_all_kept_equals_dense_attention():
  """k = N: every key kept -> exactly dense softmax attention."""
  q, k, v = qkv(**_A, seed=8)
  mask = jnp.ones((2, 1, 40, 70), bool)
  out = _check(_gpu_kernel, q, k, v, _layout_a(mask), mask, FP32)
  dense = jax.nn.dot_product_attention(
      q.swapaxes(1, 2), jnp.repeat(k, 2, 1).swapaxes(1, 2), jnp.repeat(v, 2, 1).swapaxes(1, 2))
  assert_close(out, dense.swapaxes(1, 2), 2e-5, "k=N vs dense")


def test_kernel_single_kept_key_and_all_dropped_rows():
  """k = 1 returns that key's value; a row with nothing kept attends everywhere."""
  q, k, v = qkv(**_A, seed=9)
  choice = np.random.default_rng(0).integers(0, 70, size=(2, 40))
  mask = np.zeros((2, 1, 40, 70), bool)
  for b in range(2):
    mask[b, 0, np.arange(40), choice[b]] = True
  dropped = [4, 17, 39]
  mask[:, :, dropped] = False
  mask = jnp.asarray(mask)
  out = _check(_gpu_kernel, q, k, v, _layout_a(mask), mask, FP32)
  kept_rows = [i for i in range(40) if i not in dropped]
  for b in range(2):
    for h in range(4):
      assert_close(out[b, h, kept_rows], v[b, h // 2, choice[b, kept_rows]], 1e-6, "k=1")
  dense = ba.boltzmann_attention_reference(q, k, v, jnp.ones((2, 40, 70), bool))
  assert_close(out[:, :, dropped], dense[:, :, dropped], 2e-5, "all-dropped rows")


def test_kernel_bf16_block_granularity_per_head_scores_odd_head_dim():
  """bf16; whole-block layout (no in-block mask); one sample per q head;
  head_dim 24, which the Triton lowering pads to 32 with zero columns."""
  q, k, v = qkv((1, 2, 33, 24), 1, 100, dtype=jnp.bfloat16, seed=3)
  scores = randn(4, (1, 2, 33, 100))
  layout = bs.sample_kept_blocks(jax.random.PRNGKey(5), scores, temperature=0.5,
                                 sample_ratio=0.3, block_q=16, block_k=32)
  assert layout.mask is None and layout.max_blocks == 2
  out = _check(_gpu_kernel, q, k, v, layout, layout.to_dense_mask(), BF16)
  assert out.dtype == jnp.bfloat16


def test_kernel_tpu_lowering_interpret():
  """The Mosaic kernels (scalar prefetch + pipelined K/V blocks) in the TPU
  interpreter, which also checks out-of-bounds accesses."""
  q, k, v = qkv((1, 2, 13, 16), 1, 40, seed=12)
  kept = _key_sample((1, 13, 40), ratio=0.2, seed=13)
  layout = bs.block_sparse_layout(kept, block_q=8, block_k=16)
  _check(_tpu_kernel, q, k, v, layout, kept.to_mask(), FP32)


def test_kernel_rejects_mismatched_tiles():
  q, k, v = qkv((1, 1, 16, 16), 1, 32)
  layout = bs.block_sparse_layout_from_mask(jnp.ones((1, 16, 32), bool), block_q=16, block_k=16)
  with pytest.raises(ValueError, match="tiling"):
    ba.boltzmann_attention(q, k, v, layout, block_sizes=BlockSizes(32, 16), interpret=True)
  with pytest.raises(ValueError, match="power"):
    BlockSizes(24, 16).validate("gpu")
  with pytest.raises(ValueError, match="128"):
    BlockSizes(128, 64).validate("tpu")


# ------------------------------------------------------------- XLA fallback
@pytest.mark.parametrize("formulation", ["dense", "gather", "adaptive"])
def test_xla_fallback_per_key(formulation):
  q, k, v = qkv((2, 4, 21, 16), 2, 50, seed=14)
  kept = _key_sample((2, 2, 21, 50), ratio=0.1, seed=15)  # per-kv-head samples
  fn = lambda q, k, v: ba.boltzmann_attention_xla(q, k, v, kept, formulation=formulation)
  _check_against_reference(fn, q, k, v, kept.to_mask(), FP32)


def test_xla_fallback_blocks():
  q, k, v = qkv((1, 4, 30, 16), 2, 90, seed=16)
  scores = randn(17, (1, 30, 90))
  layout = bs.sample_kept_blocks(jax.random.PRNGKey(18), scores, temperature=0.5,
                                 sample_ratio=0.2, block_q=8, block_k=16)
  fn = lambda q, k, v: ba.boltzmann_attention_xla(q, k, v, layout, formulation="blocks")
  _check_against_reference(fn, q, k, v, layout.to_dense_mask(), FP32)
  key_layout = bs.block_sparse_layout_from_mask(jnp.ones((1, 30, 90), bool), block_q=8, block_k=16)
  with pytest.raises(ValueError, match="whole-block"):
    ba.boltzmann_attention_xla(q, k, v, key_layout, formulation="blocks")


def test_xla_fallback_adaptive_takes_either_branch():
  """Low T concentrates the draws: the run-time gather branch; high T: dense."""
  q, k, v = qkv((1, 2, 8, 16), 1, 1920, seed=22)
  yy = jnp.arange(1920.0)
  bump = jax.nn.sigmoid(20.0 * (1.0 - ((yy[None] - 200.0 * jnp.arange(1, 9)[:, None]) / 15.0) ** 2))
  run = jax.jit(lambda q, k, v, kept: ba.boltzmann_attention_xla(q, k, v, kept,
                                                                 formulation="adaptive"))
  for t, narrow in ((0.05, True), (1.0, False)):
    kept = bs.sample_kept_keys(jax.random.PRNGKey(1), bump[None], temperature=t, sample_ratio=0.1)
    assert bool(jnp.max(kept.counts) <= ba._gather_width(1920)) == narrow
    assert_close(run(q, k, v, kept), ba.boltzmann_attention_reference(q, k, v, kept.to_mask()), 2e-5,
           f"adaptive T={t}")


def test_xla_fallback_memory_stays_within_dense_score_matrix():
  """10% of 4096 keys, D=64: per-query gathered K/V would be 13x the scores."""
  b, h, nq, n, d = 1, 1, 64, 4096, 64
  q, k, v = qkv((b, h, nq, d), 1, n, seed=20)
  kept = _key_sample((b, nq, n), ratio=0.1, seed=21)
  gathered_bytes = 2 * nq * kept.indices.shape[-1] * d * 4
  scores_bytes = nq * n * 4
  assert gathered_bytes > 10 * scores_bytes
  f = jax.jit(functools.partial(ba.boltzmann_attention_xla, formulation="gather"))
  stats = f.lower(q, k, v, kept).compile().memory_analysis()
  if stats is None:
    pytest.skip("backend reports no memory analysis")
  # Chunking keeps the live gathered slab at <= the score matrix (plus the
  # chunk's scores, masks and outputs).
  assert stats.temp_size_in_bytes <= 4 * scores_bytes, stats.temp_size_in_bytes
  out = f(q, k, v, kept)
  assert_close(out, ba.boltzmann_attention_reference(q, k, v, kept.to_mask()), 2e-5, "chunked gather")


def test_choose_formulation_uses_static_bounds():
  sparse = bs.sample_kept_blocks(jax.random.PRNGKey(0), randn(1, (1, 8, 1024)),
                                 temperature=0.5, sample_ratio=0.1, block_q=8, block_k=64)
  assert ba._choose_formulation(sparse, 1024) == "blocks"  # 2 of 16 blocks
  half = bs.sample_kept_blocks(jax.random.PRNGKey(0), randn(1, (1, 8, 1024)),
                               temperature=0.5, sample_ratio=0.5, block_q=8, block_k=64)
  assert ba._choose_formulation(half, 1024) == "dense"
  kept_small = bs.KeptKeys(jnp.zeros((1, 1, 4, 10), jnp.int32), jnp.ones((1, 1, 4), jnp.int32), 1000)
  kept_big = bs.KeptKeys(jnp.zeros((1, 1, 4, 100), jnp.int32), jnp.ones((1, 1, 4), jnp.int32), 1000)
  assert ba._choose_formulation(kept_small, 1000) == "gather"
  assert ba._choose_formulation(kept_big, 1000) == "dense"
  assert ba._choose_formulation(jnp.ones((1, 4, 1000), bool), 1000) == "dense"
