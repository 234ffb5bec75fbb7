"""mlx_med.seg.sampling against the public BoltzFormer release's sampling rules.

The rules are written out here a second time, in numpy (`_release_*`): the
temperature schedule T = base_temp / (2 + layer_id), n = int(N * ratio) draws,
p ∝ exp(s / T) over the background (s < thr) keys of a row, a background key
kept iff drawn at least once (marginal 1 - (1 - p)^n), foreground always kept,
a row with nothing kept attending everywhere. Sampling is checked by its
empirical keep frequency over many independent draws, within 5 binomial
standard deviations per (query, key) cell. The attention is checked against a
plain numpy softmax, and the kernel path ('boltzmann') against the dense
masked path on the same keep mask, forward and gradients, on three backends.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.core import sparse_attention as sa
from mlx_med.seg import sampling as smp

FWD_TOL = 2e-5   # fp32, relative to max(1, max|reference|)
GRAD_TOL = 1e-4


# --------------------------------------------------------------- numpy twin
def _release_temperature(layer_id, base_temp=1.0):
  return base_temp / (2 + layer_id)


def _release_probs(s, temperature, thr=0.5):
  s = np.asarray(s, np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    bg = s < thr
    w = np.where(bg, np.exp(np.where(bg, s, 0.0) / temperature), 0.0)
  z = w.sum(-1, keepdims=True)
  return np.where(z > 0, w / np.where(z > 0, z, 1.0), 0.0)


def _release_keep_probability(s, layer_id, ratio, base_temp=1.0, thr=0.5):
  """P(key attended) per (query, key) under the release's rules (no guard)."""
  n = int(s.shape[-1] * ratio)
  p = _release_probs(s, _release_temperature(layer_id, base_temp), thr)
  return np.where(np.asarray(s) >= thr, 1.0, 1.0 - (1.0 - p) ** n)


def _np_attention(q, k, v, keep=None, scale=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  if k.shape[1] != q.shape[1]:
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
  s = np.einsum("bhqd,bhkd->bhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
  if keep is not None:
    keep = np.broadcast_to(np.asarray(keep, bool), s.shape)
    keep = keep | ~keep.any(-1, keepdims=True)  # nothing kept -> everywhere
    s = np.where(keep, s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bhkd->bhqd", p, v)


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(actual, expected, tol, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  err = float(np.max(np.abs(actual - expected)))
  scale = max(1.0, float(np.max(np.abs(expected))))
  assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"


# ------------------------------------------------------- schedule and counts
def test_temperature_schedule_follows_the_release():
  assert smp.layer_temperature(-1) == 1.0  # the mask before layer 0
  for i in range(9):
    assert smp.layer_temperature(i) == pytest.approx(1.0 / (2 + i), rel=0, abs=1e-15)
    assert smp.layer_temperature(i, base_temp=2.0) == pytest.approx(_release_temperature(i, 2.0))
  with pytest.raises(ValueError, match="layer_id"):
    smp.layer_temperature(-2)
  with pytest.raises(ValueError, match="base_temp"):
    smp.layer_temperature(0, base_temp=0.0)


def test_draw_count_is_python_int_truncation():
  assert smp.num_draws(1024, 0.1) == 102
  assert smp.num_draws(16, 0.1) == 1
  assert smp.num_draws(9, 0.1) == 0
  assert smp.num_draws(4096, 0.1) == 409
  for n in range(0, 3000, 7):
    assert smp.num_draws(n, 0.1) == int(n * 0.1)
    assert smp.num_draws(n, 0.37) == int(n * 0.37)
  with pytest.raises(ValueError, match="sample_ratio"):
    smp.num_draws(10, 1.5)


def test_sampling_probabilities_are_the_background_boltzmann_distribution():
  rng = np.random.default_rng(0)
  s = rng.uniform(0, 1, (2, 3, 20)).astype(np.float32)
  s[1, 0] = 0.9           # all foreground: nothing to sample
  s[1, 1] = np.nan        # no defined distribution
  for t in (1.0, 0.5, 0.1):
    p = np.asarray(smp.sampling_probabilities(jnp.asarray(s), temperature=t))
    _close(p, _release_probs(s, t), 1e-6, f"p at T={t}")
    assert np.all(p[s >= 0.5] == 0.0)
    assert np.all(p[1, :2] == 0.0)
    np.testing.assert_allclose(p[0].sum(-1), 1.0, atol=1e-6)


# ------------------------------------------------------- keep-iff-drawn law
B_REP, H_REP, Q_S, N_S, RATIO = 128, 16, 4, 40, 0.1   # 2048 draws per cell, n = 4


@pytest.fixture(scope="module")
def sample_scores():
  """Q_S rows of N_S scores: mixed fore/background, one row with one background key."""
  s = np.random.default_rng(1).uniform(0.0, 1.0, (Q_S, N_S)).astype(np.float32)
  s[3] = 0.8
  s[3, 5] = 0.3  # its only background key: p = 1, kept for sure
  return s


@pytest.mark.parametrize("sampler", smp.SAMPLERS)
@pytest.mark.parametrize("layer_id", [-1, 6])
def test_keep_frequency_matches_one_minus_one_minus_p_to_the_n(sample_scores, sampler, layer_id):
  s = sample_scores
  scores = jnp.broadcast_to(jnp.asarray(s), (B_REP, Q_S, N_S))
  keep = smp.keep_mask(jax.random.PRNGKey(7), scores, mode="boltzmann", layer_id=layer_id,
                       num_heads=H_REP, sample_ratio=RATIO, sampler=sampler)
  keep = np.asarray(keep)
  assert keep.shape == (B_REP, H_REP, Q_S, N_S) and keep.dtype == bool
  m = B_REP * H_REP
  freq = keep.reshape(m, Q_S, N_S).mean(0)
  want = _release_keep_probability(s, layer_id, RATIO)
  _close(smp.keep_probability(jnp.asarray(s), layer_id=layer_id, sample_ratio=RATIO), want, 1e-6,
         "keep_probability")
  sigma = np.sqrt(want * (1 - want) / m)
  err = np.abs(freq - want)
  assert np.all(err <= 5 * sigma + 1e-12), (
      f"keep frequency off by {np.max(err / np.maximum(sigma, 1e-12)):.1f} sigma")
  # Foreground always kept; p over the background only (a Boltzmann over all
  # keys would put mass on the foreground and be far off).
  assert np.all(keep[..., s >= 0.5])
  assert np.all(keep[:, :, 3, 5])
  p_all = np.exp(s / _release_temperature(layer_id))
  p_all /= p_all.sum(-1, keepdims=True)
  wrong = 1 - (1 - p_all) ** int(N_S * RATIO)
  bg = s < 0.5
  assert np.max(np.abs(freq - wrong)[bg] / np.maximum(sigma[bg], 1e-3)) > 10
  if sampler == "draws":
    sampled = (keep & (s < 0.5)).sum(-1)
    assert sampled.max() <= int(N_S * RATIO)


def test_same_rng_same_samples_and_heads_independent(sample_scores):
  scores = jnp.asarray(sample_scores)[None].repeat(2, 0)
  kw = {"layer_id": 0, "num_heads": 4, "sample_ratio": 0.2}
  a = np.asarray(smp.keep_mask(jax.random.PRNGKey(3), scores, mode="boltzmann", **kw))
  b = np.asarray(smp.keep_mask(jax.random.PRNGKey(3), scores, mode="dense_sampled", **kw))
  c = np.asarray(smp.keep_mask(jax.random.PRNGKey(4), scores, mode="boltzmann", **kw))
  np.testing.assert_array_equal(a, b)  # both sampled modes see the same samples
  typed = smp.keep_mask(jax.random.key(3), scores, mode="boltzmann", **kw)  # new-style key, same bits
  np.testing.assert_array_equal(np.asarray(typed), a)
  assert not np.array_equal(a, c)
  for h in range(1, 4):
    assert not np.array_equal(a[:, 0], a[:, h]), "heads must get independent samples"
  assert not np.array_equal(a[0], a[1]), "examples must get independent samples"
  thr = np.asarray(smp.keep_mask(None, scores, mode="threshold", **kw))
  np.testing.assert_array_equal(thr, np.broadcast_to((sample_scores >= 0.5)[None, None], thr.shape))
  assert np.asarray(smp.keep_mask(None, scores, mode="full", **kw)).all()


def test_all_masked_guard():
  s = np.full((1, 4, 9), 0.2, np.float32)   # N = 9: int(0.9) = 0 draws
  s[0, 1, 3] = 0.7                         # one foreground key
  s[0, 2] = np.nan                         # no probability mass
  s[0, 3] = 0.0
  for mode in ("threshold", "boltzmann", "dense_sampled"):
    keep = np.asarray(smp.keep_mask(jax.random.PRNGKey(0), jnp.asarray(s), mode=mode, layer_id=2,
                                    num_heads=2, sample_ratio=0.1))
    assert keep[:, :, 0].all() and keep[:, :, 2].all() and keep[:, :, 3].all(), mode
    np.testing.assert_array_equal(keep[0, :, 1], np.eye(9, dtype=bool)[[3, 3]])
  # An all-NaN row with draws to spend still has nothing to draw from.
  s2 = np.full((1, 2, 20), np.nan, np.float32)
  s2[0, 1] = 0.1
  keep = np.asarray(smp.keep_mask(jax.random.PRNGKey(0), jnp.asarray(s2), mode="boltzmann",
                                  layer_id=0, num_heads=3, sample_ratio=0.1, sampler="draws"))
  assert keep[0, :, 0].all()
  assert (keep[0, :, 1].sum(-1) <= 2).all() and (keep[0, :, 1].sum(-1) >= 1).all()


def test_bad_inputs_are_one_line_errors():
  s = jnp.full((1, 2, 8), 0.3)
  with pytest.raises(ValueError, match="attention mode"):
    smp.keep_mask(None, s, mode="sparse", layer_id=0, num_heads=1)
  with pytest.raises(ValueError, match="sampler"):
    smp.keep_mask(jax.random.PRNGKey(0), s, mode="boltzmann", layer_id=0, num_heads=1, sampler="x")
  with pytest.raises(ValueError, match="rng"):
    smp.keep_mask(None, s, mode="dense_sampled", layer_id=0, num_heads=1)
  with pytest.raises(ValueError, match="scores must be"):
    smp.keep_mask(None, jnp.zeros((8,)), mode="threshold", layer_id=0, num_heads=1)
  with pytest.raises(ValueError, match="layer_id"):
    smp.keep_mask(None, s, mode="threshold", layer_id=-3, num_heads=1)
  q = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="keep mask"):
    smp.dense_masked_attention(q, q, q, jnp.ones((1, 2, 3, 2), bool))
  with pytest.raises(ValueError, match="keep mask"):
    smp.attend(q, q, q, None, mode="boltzmann")


# ------------------------------------------------------------- attention
B, H, Q, N, D = 1, 2, 5, 24, 8


@pytest.fixture(scope="module")
def qkv_keep():
  q, k, v = _randn(0, (B, H, Q, D)), _randn(1, (B, H, N, D)), _randn(2, (B, H, N, D))
  s = np.array(jax.nn.sigmoid(2 * _randn(3, (B, Q, N))))
  s[0, 4] = 0.0   # background only; 2 draws keep 1-2 keys
  keep = smp.keep_mask(jax.random.PRNGKey(5), jnp.asarray(s), mode="boltzmann", layer_id=1,
                       num_heads=H, sample_ratio=0.1)
  keep = np.asarray(keep).copy()
  keep[0, 1, 2] = False  # a raw empty row: the attention's own guard must apply
  return q, k, v, jnp.asarray(keep), s


def test_dense_masked_attention_matches_numpy(qkv_keep):
  q, k, v, keep, s = qkv_keep
  _close(smp.dense_masked_attention(q, k, v, keep), _np_attention(q, k, v, keep), FWD_TOL, "masked")
  _close(smp.dense_masked_attention(q, k, v, None), _np_attention(q, k, v), FWD_TOL, "unmasked")
  _close(smp.dense_masked_attention(q, k, v, keep, sm_scale=0.3),
         _np_attention(q, k, v, keep, scale=0.3), FWD_TOL, "sm_scale")
  # grouped k/v heads and a head-shared [B, Q, N] mask
  _close(smp.dense_masked_attention(q, k[:, :1], v[:, :1], keep[:, 0]),
         _np_attention(q, k[:, :1], v[:, :1], np.asarray(keep)[:, :1]), FWD_TOL, "gqa")
  # threshold mode end to end: the keep mask is s >= 0.5, attended densely
  thr = smp.keep_mask(None, jnp.asarray(s), mode="threshold", layer_id=0, num_heads=H)
  _close(smp.attend(q, k, v, thr, mode="threshold"),
         _np_attention(q, k, v, (s >= 0.5)[:, None]), FWD_TOL, "threshold")
  full = smp.keep_mask(None, jnp.asarray(s), mode="full", layer_id=0, num_heads=H)
  _close(smp.attend(q, k, v, full, mode="full"), _np_attention(q, k, v), FWD_TOL, "full")
  _close(smp.attend(q, k, v, None, mode="full"), _np_attention(q, k, v), FWD_TOL, "full, no mask")
  out = smp.dense_masked_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                   v.astype(jnp.bfloat16), keep)
  assert out.dtype == jnp.bfloat16
  _close(out, _np_attention(q, k, v, keep), 3e-2, "bf16")


@pytest.mark.parametrize("backend", ["xla", "reference", "pallas_interpret"])
def test_boltzmann_attend_equals_dense_sampled(qkv_keep, backend):
  q, k, v, keep, _ = qkv_keep
  ct = jnp.cos(jnp.arange(B * H * Q * D, dtype=jnp.float32)).reshape(B, H, Q, D)

  @jax.jit
  def both(q, k, v, keep):
    kern = lambda q, k, v: smp.attend(q, k, v, keep, mode="boltzmann", kernel_backend=backend)
    dense = lambda q, k, v: smp.attend(q, k, v, keep, mode="dense_sampled")
    out, vjp = jax.vjp(kern, q, k, v)
    ref, ref_vjp = jax.vjp(dense, q, k, v)
    return out, vjp(ct), ref, ref_vjp(ct)

  out, grads, ref, ref_grads = both(q, k, v, keep)
  _close(out, ref, FWD_TOL, f"{backend} output")
  for name, g, r in zip("qkv", grads, ref_grads):
    _close(g, r, GRAD_TOL, f"{backend} d{name}")


def test_boltzmann_attend_mask_layouts_and_shared_mask(qkv_keep):
  q, k, v, keep, _ = qkv_keep
  shared = keep[:, 0]
  want = _np_attention(q, k, v, np.asarray(shared)[:, None])
  _close(sa.boltzmann_attend_mask(q, k, v, shared, backend="xla"), want, FWD_TOL, "shared mask")
  blhd = sa.boltzmann_attend_mask(*(x.swapaxes(1, 2) for x in (q, k, v)), shared, backend="xla",
                                  layout="BLHD")
  _close(blhd.swapaxes(1, 2), want, FWD_TOL, "BLHD")
  with pytest.raises(ValueError, match="mask shape"):
    sa.boltzmann_attend_mask(q, k, v, shared[:, :, :3], backend="xla")


# ------------------------------------------------------------- accounting
def test_kept_pairs_and_attention_flops_by_hand():
  keep = np.zeros((2, 2, 3, 4), bool)
  keep[0] = True                 # 2 heads x 3 queries x 4 keys = 24
  keep[1, 0, 0, :2] = True       # 2
  keep[1, 1, 2, 3] = True        # 1
  kept = np.asarray(smp.kept_pairs(jnp.asarray(keep)))
  assert kept.dtype == np.float32
  np.testing.assert_array_equal(kept, [24.0, 3.0])
  np.testing.assert_array_equal(np.asarray(smp.attention_flops(smp.kept_pairs(jnp.asarray(keep)), 64)),
                                [4 * 64 * 24, 4 * 64 * 3])
  assert smp.attention_flops(10, 32) == 1280


# ------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_equals_dense_sampled_at_decoder_shapes(dtype):
  """The compiled Triton kernel at a decoder layer's shapes (101 queries, 8 heads, a 32x32 level)."""
  b, h, nq, n, d = 2, 8, 101, 1024, 64
  q, k, v = (_randn(i, shape).astype(dtype) for i, shape in
             enumerate([(b, h, nq, d), (b, h, n, d), (b, h, n, d)]))
  scores = jax.nn.sigmoid(3 * _randn(9, (b, nq, n)))
  keep = smp.keep_mask(jax.random.PRNGKey(0), scores, mode="boltzmann", layer_id=3, num_heads=h)
  ct = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape).astype(dtype)

  @jax.jit
  def both(q, k, v):
    out, vjp = jax.vjp(lambda *a: smp.attend(*a, keep, mode="boltzmann", kernel_backend="pallas"),
                       q, k, v)
    ref, ref_vjp = jax.vjp(lambda *a: smp.attend(*a, keep, mode="dense_sampled"), q, k, v)
    return out, vjp(ct), ref, ref_vjp(ct)

  assert "triton" in both.lower(q, k, v).as_text()
  out, grads, ref, ref_grads = both(q, k, v)
  fwd, grad = (2e-3, 1e-2) if dtype == jnp.float32 else (3e-2, 8e-2)  # TF32 / bf16 matmuls
  _close(out, ref, fwd, "output")
  for name, g, r in zip("qkv", grads, ref_grads):
    _close(g, r, grad, f"d{name}")
