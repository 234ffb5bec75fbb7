"""Helpers shared by the kernel tests: numpy-seeded inputs and a scaled max-error check.

Inputs come from numpy rather than jax.random, so no PRNG program is compiled
(threefry compiles slowly on CPU). Tolerances are relative to
max(1, max|reference|).
"""

import jax
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


def with_reference(fn, ref_fn, q, k, v, grads=True):
  """(out, grads, ref, ref_grads) of `fn` and `ref_fn` at (q, k, v).

  Gradients are the q/k/v pullbacks of one fixed, non-trivial cotangent (empty
  tuples with grads=False). Traceable: call it under one jit, so a case costs
  one compile instead of many eager op compiles.
  """
  out, vjp = jax.vjp(fn, q, k, v)
  ref, ref_vjp = jax.vjp(ref_fn, q, k, v)
  if not grads:
    return out, (), ref, ()
  ct = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape).astype(out.dtype)
  return out, vjp(ct), ref, ref_vjp(ct)


def assert_matches_reference(out, grads, ref, ref_grads, tol, check_dtypes=True):
  """Output within tol["fwd"], each of dq, dk, dv within tol["grad"] (and of the reference's dtype)."""
  assert_close(out, ref, tol["fwd"], "output")
  for name, g, r in zip("qkv", grads, ref_grads):
    if check_dtypes:
      assert g.dtype == r.dtype
    assert_close(g, r, tol["grad"], f"d{name}")
