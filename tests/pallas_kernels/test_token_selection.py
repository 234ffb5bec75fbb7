"""Token-selection attention: selection, kernel (interpret mode), XLA fallback.

Tolerances as in test_boltzmann_attention: fp32 forward 2e-5 / gradients 1e-4;
bf16 forward 3e-2 / gradients 6e-2 (relative to max(1, max|reference|)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_testing import BF16, FP32, assert_close, assert_matches_reference, qkv, randn, with_reference
from pallas_kernels import token_selection as ts
from pallas_kernels.common import BlockSizes



def _grads_fn(attn):
  """jit(q, k, v, indices, counts) -> (out, grads, ref, ref_grads); selections
  are traced, so every case of one shape shares a compile."""

  @jax.jit
  def run(q, k, v, indices, counts):
    return with_reference(lambda q, k, v: attn(q, k, v, indices, counts),
                          lambda q, k, v: ts.token_selection_attention_reference(q, k, v, indices, counts), q, k, v)

  return run


def _check(run, q, k, v, indices, counts, tol):
  results = run(q, k, v, indices, counts)
  assert_matches_reference(*results, tol)
  return results[0]


_GPU_16 = BlockSizes(block_q=16, block_k=16)
_gpu_kernel = _grads_fn(functools.partial(
    ts.token_selection_attention, block_sizes=_GPU_16, interpret=True))
_tpu_kernel = _grads_fn(functools.partial(
    ts.token_selection_attention, block_sizes=BlockSizes(8, 8), lowering="tpu", interpret=True))
_xla = _grads_fn(ts.token_selection_attention_xla)


# ---------------------------------------------------------------- selection
def test_select_top_k_sorted_positions_of_the_largest():
  rel = randn(0, (2, 3, 30))
  idx, cnt = ts.select_top_k(rel, 7)
  assert idx.shape == (2, 3, 7) and np.all(np.asarray(cnt) == 7)
  for b in range(2):
    for h in range(3):
      want = np.sort(np.argsort(-np.asarray(rel[b, h]))[:7])
      np.testing.assert_array_equal(np.asarray(idx[b, h]), want)


def test_select_by_budget_threshold_min_and_max():
  rel = jnp.array([[0.9, 0.1, 0.8, 0.7, 0.2, 0.95], [0.1, 0.2, 0.3, 0.0, 0.1, 0.05]])
  idx, cnt = ts.select_by_budget(rel, max_tokens=3, threshold=0.5)
  np.testing.assert_array_equal(np.asarray(cnt), [[3], [1]])  # budget cap / at least one
  np.testing.assert_array_equal(np.asarray(idx[0, 0]), [0, 2, 5])
  np.testing.assert_array_equal(np.asarray(idx[1, 0]), [2, 0, 0])


def test_cosine_relevance():
  tokens = randn(1, (2, 10, 8))
  query = tokens[:, 3] * 2.0
  rel = ts.cosine_relevance(query, tokens)
  assert rel.shape == (2, 10)
  np.testing.assert_allclose(np.asarray(rel[:, 3]), 1.0, rtol=1e-5)
  assert int(jnp.argmax(rel[0])) == 3


# ------------------------------------------------------------------ kernels
# Family: fp32, batch 2, 4 q heads over 2 kv heads, Q=36 (not a multiple of the
# 16-query tile), N=40 keys, selection width K=40 (so K=N and K=1 reuse it).
_A = dict(shape_q=(2, 4, 36, 32), kv_heads=2, num_keys=40)


def test_kernel_budget_selection_gqa_fp32():
  q, k, v = qkv(**_A)
  idx, cnt = ts.select_by_budget(randn(1, (2, 40)), max_tokens=40, threshold=0.8)
  assert 1 <= int(cnt.min()) < 40  # ragged last chunk, varying counts
  _check(_gpu_kernel, q, k, v, idx, cnt, FP32)


def test_kernel_k_equals_n_is_dense_attention():
  q, k, v = qkv(**_A, seed=2)
  idx, cnt = ts.select_top_k(randn(3, (2, 40)), 40)
  out = _check(_gpu_kernel, q, k, v, idx, cnt, FP32)
  dense = jax.nn.dot_product_attention(
      q.swapaxes(1, 2), jnp.repeat(k, 2, 1).swapaxes(1, 2), jnp.repeat(v, 2, 1).swapaxes(1, 2))
  assert_close(out, dense.swapaxes(1, 2), 2e-5, "k=N vs dense")


def test_kernel_k_equals_one_copies_that_value():
  q, k, v = qkv(**_A, seed=4)
  idx = jnp.zeros((2, 1, 40), jnp.int32).at[:, 0, 0].set(jnp.array([7, 31]))
  cnt = jnp.ones((2, 1), jnp.int32)
  out = _check(_gpu_kernel, q, k, v, idx, cnt, FP32)
  for b, tok in enumerate([7, 31]):
    for h in range(4):
      assert_close(out[b, h], jnp.broadcast_to(v[b, h // 2, tok], (36, 32)), 1e-6, "k=1")


def test_kernel_bf16_per_head_selection():
  """bf16, a different selection per q head (Hs = H)."""
  q, k, v = qkv((1, 2, 24, 32), 1, 64, dtype=jnp.bfloat16, seed=5)
  idx, cnt = ts.select_top_k(randn(6, (1, 2, 64)), 8)  # k = N/8
  out = _check(_gpu_kernel, q, k, v, idx, cnt, BF16)
  assert out.dtype == jnp.bfloat16


def test_kernel_tpu_lowering_interpret():
  """Mosaic kernels: scalar-prefetched indices, per-row DMA gathers from HBM
  into double-buffered VMEM, in the TPU interpreter (bounds-checked)."""
  q, k, v = qkv((1, 2, 12, 16), 1, 30, seed=7)
  idx, cnt = ts.select_by_budget(randn(8, (1, 30)), max_tokens=11, threshold=0.3)
  _check(_tpu_kernel, q, k, v, idx, cnt, FP32)


def test_xla_fallback_matches_reference():
  q, k, v = qkv(**_A, seed=9)
  idx, cnt = ts.select_by_budget(randn(10, (2, 2, 40)), max_tokens=40, threshold=0.5)
  _check(_xla, q, k, v, idx, cnt, FP32)


def test_empty_selection_gives_zero_output():
  q, k, v = qkv((1, 1, 4, 16), 1, 8, seed=11)
  idx = jnp.zeros((1, 1, 4), jnp.int32)
  cnt = jnp.zeros((1, 1), jnp.int32)
  for fn in (ts.token_selection_attention_reference, ts.token_selection_attention_xla):
    out = jax.jit(fn)(q, k, v, idx, cnt)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_bad_selection_shape_is_a_clear_error():
  q, k, v = qkv((1, 4, 4, 16), 1, 8)
  with pytest.raises(ValueError, match="indices must be"):
    ts.token_selection_attention_xla(q, k, v, jnp.zeros((1, 3, 2), jnp.int32))
