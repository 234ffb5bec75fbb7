"""mlx_med.core.sparse_attention: config-driven dispatch into the kernels.

The same rng must give the same kept keys, hence the same output, on every
backend; 'auto' must pick the XLA fallback on CPU.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mlx_med.core import sparse_attention as sa
from pallas_kernels.common import BlockSizes


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


B, H, HKV, Q, N, D = 2, 4, 2, 20, 48, 16
_BS = BlockSizes(block_q=16, block_k=16)


@pytest.fixture(scope="module")
def qkv():
  return _randn(0, (B, H, Q, D)), _randn(1, (B, HKV, N, D)), _randn(2, (B, HKV, N, D))


@pytest.mark.parametrize("granularity", ["key", "block"])
def test_boltzmann_backends_agree(qkv, granularity):
  q, k, v = qkv
  scores = jax.nn.sigmoid(_randn(3, (B, Q, N)))
  rng = jax.random.PRNGKey(4)

  def run(backend):
    f = lambda q, k, v, s, r: sa.boltzmann_attend(
        q, k, v, s, rng=r, layer=1, sample_ratio=0.2, granularity=granularity,
        backend=backend, block_sizes=_BS)
    return jax.jit(f)(q, k, v, scores, rng)

  ref = run("reference")
  _close(run("xla"), ref)
  assert sa.resolve_backend("auto") == "xla"
  if granularity == "key":
    # The dispatch's per-key -> layout -> kernel path (block layouts straight
    # into the kernel are covered in test_boltzmann_attention).
    _close(run("pallas_interpret"), ref)
    return
  # 'auto' on CPU is the XLA fallback, differentiable end to end.
  grad = jax.jit(jax.grad(lambda q: jnp.sum(sa.boltzmann_attend(
      q, k, v, scores, rng=rng, layer=1, sample_ratio=0.2, granularity=granularity,
      block_sizes=_BS) ** 2)))(q)
  assert grad.shape == q.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_token_selection_backends_agree_and_blhd_layout(qkv):
  q, k, v = qkv
  relevance = _randn(5, (B, N))

  def run(backend, layout="BHLD", threshold=None):
    qq, kk, vv = (q, k, v) if layout == "BHLD" else (x.swapaxes(1, 2) for x in (q, k, v))
    f = lambda q, k, v, r: sa.token_selection_attend(
        q, k, v, r, num_selected=12, threshold=threshold, backend=backend,
        block_sizes=_BS, layout=layout)
    out = jax.jit(f)(qq, kk, vv, relevance)
    return out if layout == "BHLD" else out.swapaxes(1, 2)

  ref = run("reference")
  _close(run("xla"), ref)
  _close(run("pallas_interpret"), ref)
  _close(run("xla", layout="BLHD"), ref)
  _close(run("xla", threshold=0.5), run("reference", threshold=0.5))


def test_config_dict_drives_the_choice(qkv):
  q, k, v = qkv
  cd = ml_collections.ConfigDict(dict(backend="xla", granularity="block", sample_ratio=0.25,
                                      t0=1.0, block_q=16, block_k=16, num_selected=6))
  cfg = sa.SparseAttentionConfig.from_config(cd)
  assert cfg.block_sizes().block_q == 16
  scores = jax.nn.sigmoid(_randn(6, (B, Q, N)))
  rng = jax.random.PRNGKey(7)
  out = jax.jit(lambda q, k, v: sa.boltzmann_attend_from_config(
      cfg, q, k, v, scores, rng=rng, layer=3))(q, k, v)
  want = jax.jit(lambda q, k, v: sa.boltzmann_attend(
      q, k, v, scores, rng=rng, temperature=1.0 / 5.0, sample_ratio=0.25,
      granularity="block", backend="reference", block_sizes=_BS))(q, k, v)
  _close(out, want)
  out = sa.token_selection_attend_from_config(cfg, q, k, v, _randn(8, (B, N)))
  assert out.shape == q.shape


def test_bad_configuration_is_a_one_line_error(qkv):
  q, k, v = qkv
  with pytest.raises(ValueError, match="unknown sparse-attention config key"):
    sa.SparseAttentionConfig.from_config({"backend": "xla", "sample_rate": 0.1})
  with pytest.raises(ValueError, match="backend"):
    sa.SparseAttentionConfig(backend="cuda")
  with pytest.raises(ValueError, match="exactly one of temperature"):
    sa.boltzmann_attend(q, k, v, jnp.zeros((B, Q, N)), rng=jax.random.PRNGKey(0))
