"""The real GPU (Pallas Triton) and TPU (Mosaic) lowerings, at realistic sizes.

Skipped on CPU (markers); `bench/gpu_suite.sh` runs the GPU ones first. Each
test compiles the kernels for the device and compares forward and gradients
with the fp32 reference computed on the same device, for bf16 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from kernel_testing import assert_close, assert_matches_reference, randn, with_reference
from mlx_med.core import sparse_attention as sa
from pallas_kernels import boltzmann_attention as ba
from pallas_kernels import boltzmann_sampling as bs
from pallas_kernels import token_selection as ts
from pallas_kernels.common import BlockSizes

TOL = dict(fwd=3e-2, grad=8e-2)  # bf16 inputs, fp32 accumulation


def _randn(seed, shape, dtype=jnp.bfloat16):  # bf16 by default: the device kernels' input type
  return randn(seed, shape, dtype)


# What each compiled (not interpreted) lowering leaves in the lowered module: the
# Pallas Triton call on GPU, the Mosaic call on TPU. Interpret mode leaves neither.
_KERNEL_CALL = {"gpu": ("__gpu$xla.gpu.triton", "triton_kernel_call"), "tpu": ("tpu_custom_call",)}


def _assert_kernel_lowered(jitted, lowering, *args):
  text = jitted.lower(*args).as_text()
  assert any(name in text for name in _KERNEL_CALL[lowering]), (
      f"no {lowering} Pallas kernel call ({_KERNEL_CALL[lowering]}) in the lowered module")


def _compare(fn, ref_fn, q, k, v, lowering):
  run = jax.jit(lambda q, k, v: with_reference(fn, ref_fn, q, k, v))
  _assert_kernel_lowered(run, lowering, q, k, v)
  assert_matches_reference(*run(q, k, v), TOL, check_dtypes=False)


def _boltzmann_case(lowering, block_sizes, granularity):
  b, h, hkv, nq, n, d = 2, 8, 2, 300, 4096 + 40, 64
  q = _randn(0, (b, h, nq, d))
  k, v = _randn(1, (b, hkv, n, d)), _randn(2, (b, hkv, n, d))
  scores = jax.nn.sigmoid(_randn(3, (b, nq, n), jnp.float32))
  if granularity == "key":
    kept = bs.sample_kept_keys(jax.random.PRNGKey(0), scores, temperature=0.25, sample_ratio=0.1)
    layout = bs.block_sparse_layout(kept, block_q=block_sizes.block_q, block_k=block_sizes.block_k)
  else:
    layout = bs.sample_kept_blocks(jax.random.PRNGKey(0), scores, temperature=0.25,
                                   sample_ratio=0.1, block_q=block_sizes.block_q,
                                   block_k=block_sizes.block_k)
  mask = layout.to_dense_mask()
  fn = functools.partial(ba.boltzmann_attention, layout=layout, block_sizes=block_sizes,
                         lowering=lowering)
  ref_fn = lambda q, k, v: ba.boltzmann_attention_reference(q, k, v, mask)
  _compare(lambda q, k, v: fn(q, k, v), ref_fn, q, k, v, lowering)


def _token_case(lowering, block_sizes):
  b, h, hkv, nq, n, d = 2, 8, 2, 500, 2304, 64
  q = _randn(4, (b, h, nq, d))
  k, v = _randn(5, (b, hkv, n, d)), _randn(6, (b, hkv, n, d))
  idx, cnt = ts.select_by_budget(_randn(7, (b, n), jnp.float32), max_tokens=n // 8,
                                 threshold=1.0)
  fn = lambda q, k, v: ts.token_selection_attention(
      q, k, v, idx, cnt, block_sizes=block_sizes, lowering=lowering)
  ref_fn = lambda q, k, v: ts.token_selection_attention_reference(q, k, v, idx, cnt)
  _compare(fn, ref_fn, q, k, v, lowering)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["key", "block"])
def test_gpu_boltzmann_kernel(granularity):
  _boltzmann_case("gpu", BlockSizes.get_default("gpu"), granularity)


@pytest.mark.gpu
def test_gpu_token_selection_kernel():
  _token_case("gpu", BlockSizes.get_default("gpu"))


@pytest.mark.gpu
def test_gpu_dispatch_auto_uses_pallas():
  assert sa.resolve_backend("auto") == "pallas"
  q = _randn(8, (1, 4, 100, 64))
  k, v = _randn(9, (1, 4, 1024, 64)), _randn(10, (1, 4, 1024, 64))
  scores = jax.nn.sigmoid(_randn(11, (1, 100, 1024), jnp.float32))
  rng = jax.random.PRNGKey(1)
  auto = jax.jit(lambda q, k, v: sa.boltzmann_attend(q, k, v, scores, rng=rng, layer=0))
  _assert_kernel_lowered(auto, "gpu", q, k, v)
  out = auto(q, k, v)
  ref = jax.jit(lambda q, k, v: sa.boltzmann_attend(
      q, k, v, scores, rng=rng, layer=0, backend="reference"))(q, k, v)
  assert_close(out, ref, TOL["fwd"], "dispatch")


@pytest.mark.tpu
@pytest.mark.parametrize("granularity", ["key", "block"])
def test_tpu_boltzmann_kernel(granularity):
  _boltzmann_case("tpu", BlockSizes.get_default("tpu"), granularity)


@pytest.mark.tpu
def test_tpu_token_selection_kernel():
  _token_case("tpu", BlockSizes.get_default("tpu"))
