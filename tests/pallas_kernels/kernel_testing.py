"""Helpers shared by the kernel tests: numpy-seeded inputs and a scaled max-error check.

Inputs come from numpy rather than jax.random, so no PRNG program is compiled
(threefry compiles slowly on CPU). Tolerances are relative to
max(1, max|reference|).
"""

import jax.numpy as jnp
import numpy as np

FP32 = dict(fwd=2e-5, grad=1e-4)
BF16 = dict(fwd=3e-2, grad=6e-2)


def randn(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(dtype)


def qkv(shape_q, kv_heads, num_keys, dtype=jnp.float32, seed=0):
  """q [B, H, Nq, D] and k, v [B, kv_heads, num_keys, D]."""
  b, _, _, d = shape_q
  return (randn(seed, shape_q, dtype),
          randn(seed + 100, (b, kv_heads, num_keys, d), dtype),
          randn(seed + 200, (b, kv_heads, num_keys, d), dtype))


def assert_close(actual, expected, tol, what):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  err = float(np.max(np.abs(actual - expected)))
  scale = max(1.0, float(np.max(np.abs(expected))))
  assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"
