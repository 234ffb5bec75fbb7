"""BoltzFormer's key sampling and the four decoder attention modes.

The decoder's masked cross-attention restricts each object query to some of
the pixel keys of one pixel-decoder level. Which keys is decided from the
query's own predicted mask at that level (`scores`: sigmoid probabilities,
never differentiated) by one of four modes:

  'threshold'      Mask2Former: keep the keys with s >= threshold.
  'boltzmann'      BoltzFormer: keep the foreground (s >= threshold) and, from
                   the background, a Boltzmann sample: p ∝ exp(s / T) over the
                   background keys of the row, T = base_temp / (2 + layer_id),
                   n = int(N * sample_ratio) draws with replacement, a key kept
                   iff drawn at least once. Attention runs through the sparse
                   kernels (`mlx_med.core.sparse_attention.boltzmann_attend_mask`).
  'dense_sampled'  the same samples, attended densely under the mask -- the
                   public release's computation, kept as the equality check and
                   the speed baseline of the kernel.
  'full'           no mask.

Every mode applies the guard "a (batch, head, query) row with nothing kept
attends to every key" (`pallas_kernels.boltzmann_sampling.effective_mask`).

Samples are drawn independently per head, as the release does (it repeats the
mask over heads before drawing). Two samplers give the same per-key marginal
P(kept) = 1 - (1 - p)^n:
  'bernoulli' (default, the release's) decides every key independently with
              that probability (one uniform per key);
  'draws'     draws the n categorical samples literally (the inverse-CDF draw
              of the kernels' sampler), so at most n keys are kept per row and
              the keep decisions of a row are correlated.

The count of kept (head, query, key) triples is what the kept-key attention
costs (`kept_pairs`, `attention_flops`); 'full' keeps H * Q * N of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mlx_med.core import sparse_attention as _sparse
from pallas_kernels import boltzmann_sampling as _bs

ATTENTION_MODES = ("boltzmann", "dense_sampled", "threshold", "full")
SAMPLERS = ("bernoulli", "draws")
SAMPLED_MODES = ("boltzmann", "dense_sampled")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is unknown; choose one of {choices}.")


def layer_temperature(layer_id: int, base_temp: float = 1.0) -> float:
  """T = base_temp / (2 + layer_id); layer_id -1 (the mask before layer 0) gives base_temp."""
  if isinstance(layer_id, int) and layer_id < -1:
    raise ValueError(f"layer_id={layer_id}: must be >= -1 (-1 is the prediction before layer 0).")
  if not base_temp > 0:
    raise ValueError(f"base_temp={base_temp}: the Boltzmann temperature must be positive.")
  return base_temp / (2.0 + layer_id)


def num_draws(num_keys: int, sample_ratio: float) -> int:
  """n = int(num_keys * sample_ratio): Python's truncation, as the release computes it (may be 0)."""
  if num_keys < 0:
    raise ValueError(f"num_keys={num_keys}: must be >= 0.")
  if not 0.0 <= sample_ratio <= 1.0:
    raise ValueError(f"sample_ratio={sample_ratio}: must be in [0, 1].")
  return int(num_keys * sample_ratio)


def sampling_probabilities(scores: jax.Array, *, temperature, threshold: float = 0.5) -> jax.Array:
  """Boltzmann distribution over the masked (background) keys of each row, fp32.

  p_j ∝ exp(s_j / T) for s_j < threshold, 0 elsewhere, normalised over the last
  axis. A row without a finite background key (all foreground, or NaN / -inf
  scores) is all zeros: it has nothing to sample.
  """
  s = lax.stop_gradient(scores).astype(jnp.float32)
  logits = jnp.where(s < threshold, s / temperature, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m)  # exp(-inf) = 0 for the foreground and -inf scores
  z = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(z > 0, z, 1.0)


def keep_probability(scores: jax.Array, *, layer_id: int | jax.Array, sample_ratio: float = 0.1,
                     base_temp: float = 1.0, threshold: float = 0.5) -> jax.Array:
  """Exact P(key attended) under the sampled modes, fp32, shaped like `scores` (no guard).

  1 for the foreground (s >= threshold); 1 - (1 - p)^n for the background,
  p from `sampling_probabilities` at the layer's temperature and n =
  `num_draws(N, sample_ratio)`. Both samplers have this marginal; it is the
  noise-free picture of where a query looks (plots) and the expected kept count.
  """
  n = num_draws(scores.shape[-1], sample_ratio)
  s = lax.stop_gradient(scores).astype(jnp.float32)
  p = sampling_probabilities(s, temperature=base_temp / (2.0 + layer_id), threshold=threshold)
  # -expm1(n log1p(-p)) = 1 - (1 - p)^n without cancellation for small p.
  marginal = -jnp.expm1(n * jnp.log1p(-jnp.minimum(p, 1.0))) if n > 0 else jnp.zeros_like(p)
  return jnp.where(s >= threshold, 1.0, marginal)


def _heads_scores(scores: jax.Array, num_heads: int) -> jax.Array:
  """[B, Q, N] or [B, 1|H, Q, N] -> [B, H, Q, N] (broadcast; no copy under jit)."""
  if scores.ndim == 3:
    scores = scores[:, None]
  if scores.ndim != 4 or scores.shape[1] not in (1, num_heads):
    raise ValueError(
        f"scores must be [batch, queries, keys] or [batch, 1 or {num_heads} heads, queries, keys],"
        f" got shape {scores.shape}.")
  return jnp.broadcast_to(scores, (scores.shape[0], num_heads) + scores.shape[2:])


@functools.partial(jax.jit, static_argnames=("mode", "num_heads", "sample_ratio", "sampler"))
def _keep_mask(rng, scores, layer_id, base_temp, threshold, *, mode, num_heads, sample_ratio, sampler):
  s = _heads_scores(lax.stop_gradient(scores), num_heads).astype(jnp.float32)
  if mode == "full":
    return jnp.ones(s.shape, jnp.bool_)
  keep = s >= threshold
  if mode in SAMPLED_MODES:
    n = num_draws(s.shape[-1], sample_ratio)
    if n > 0:
      if sampler == "bernoulli":
        # Each key on its own with P(drawn at least once in n draws); one
        # uniform per (batch, head, query, key), drawn flat (threefry compiles
        # much faster for a 1-D shape).
        marginal = keep_probability(s, layer_id=layer_id, sample_ratio=sample_ratio,
                                    base_temp=base_temp, threshold=threshold)
        u = jax.random.uniform(rng, (s.size,), jnp.float32).reshape(s.shape)
        sampled = u < marginal
      else:
        # The kernels' inverse-CDF draws; rows without mass get the sentinel N
        # (no draw), which the scatter drops.
        p = sampling_probabilities(s, temperature=base_temp / (2.0 + layer_id), threshold=threshold)
        draws = _bs._inverse_cdf_draws(rng, p, n)
        sampled = _bs._indices_to_mask(draws, s.shape[-1])
      keep = keep | sampled
  return _bs.effective_mask(keep)


def keep_mask(
    rng: jax.Array | None,
    scores: jax.Array,
    *,
    mode: str,
    layer_id: int | jax.Array,
    num_heads: int,
    sample_ratio: float = 0.1,
    base_temp: float = 1.0,
    threshold: float = 0.5,
    sampler: str = "bernoulli",
) -> jax.Array:
  """Which keys each (batch, head, query) attends, under one attention mode.

  Args:
    rng: PRNG key for the samples (modes 'boltzmann', 'dense_sampled'); unused
      (may be None) for 'threshold' and 'full'. The same rng gives the same
      samples, whichever of the two sampled modes asks.
    scores: sigmoid mask probabilities [B, Q, N] at the level's resolution
      (or [B, 1 | num_heads, Q, N]); stop-gradiented here.
    mode: one of ATTENTION_MODES.
    layer_id: -1 for the mask before decoder layer 0, else the layer that
      produced it; sets T = base_temp / (2 + layer_id). May be traced.
    num_heads: heads of the attention; samples are independent per head.
    sample_ratio: draws as a fraction of the N keys (n = int(N * ratio)).
    sampler: 'bernoulli' or 'draws' (see the module docstring).

  Returns:
    bool [B, num_heads, Q, N], True = attend, with the all-masked guard applied.
  """
  _check_choice("attention mode", mode, ATTENTION_MODES)
  _check_choice("sampler", sampler, SAMPLERS)
  if isinstance(layer_id, int):
    layer_temperature(layer_id, base_temp)  # validates
  num_draws(scores.shape[-1], sample_ratio)  # validates
  if mode in SAMPLED_MODES and rng is None:
    raise ValueError(f"attention mode {mode!r} samples keys: pass an rng (the model's sample_rng).")
  if rng is None:
    rng = jax.random.PRNGKey(0)  # unused by threshold / full
  return _keep_mask(rng, scores, layer_id, base_temp, threshold, mode=mode, num_heads=int(num_heads),
                    sample_ratio=float(sample_ratio), sampler=sampler)


def dense_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None, *,
                           sm_scale: float | None = None) -> jax.Array:
  """The release's dense masked attention: full score matrix, -inf where not kept, fp32 softmax.

  Args:
    q: [B, H, Q, D]; k, v: [B, Hkv, N, D] (Hkv dividing H).
    keep: bool [B, H | 1, Q, N] or [B, Q, N], True = attend; None = every key.
      Rows with nothing kept attend everywhere.
  Returns:
    [B, H, Q, D] in q.dtype.
  """
  b, h, nq, d = q.shape
  if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, H, Q, D] and k, v"
                     " [B, Hkv, N, D] with Hkv dividing H.")
  group = h // k.shape[1]
  k = jnp.repeat(k, group, axis=1) if group > 1 else k
  v = jnp.repeat(v, group, axis=1) if group > 1 else v
  scale = d ** -0.5 if sm_scale is None else sm_scale
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if keep is not None:
    keep = keep[:, None] if keep.ndim == 3 else keep
    if keep.shape[0] != b or keep.shape[2:] != (nq, k.shape[2]) or keep.shape[1] not in (1, h):
      raise ValueError(f"keep mask {keep.shape} does not fit q {q.shape} / k {k.shape}; expected"
                       f" [{b}, 1 or {h}, {nq}, {k.shape[2]}].")
    keep = _bs.effective_mask(keep.astype(jnp.bool_))
    s = s + jnp.where(keep, 0.0, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bhqk,bhkd->bhqd", p, v.astype(jnp.float32), preferred_element_type=jnp.float32)
  return o.astype(q.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None, *, mode: str,
           kernel_backend: str = "auto", sm_scale: float | None = None) -> jax.Array:
  """Attention under `mode`: 'boltzmann' through the sparse kernels, the others dense.

  q [B, H, Q, D], k/v [B, Hkv, N, D], keep from `keep_mask` (None only for
  'full'). `kernel_backend` picks the Boltzmann backend (auto | xla | pallas |
  pallas_interpret | reference; auto = Pallas on GPU/TPU, XLA on CPU).
  """
  _check_choice("attention mode", mode, ATTENTION_MODES)
  if mode == "boltzmann":
    if keep is None:
      raise ValueError("attention mode 'boltzmann' needs the keep mask from keep_mask().")
    return _sparse.boltzmann_attend_mask(q, k, v, keep, backend=kernel_backend, sm_scale=sm_scale)
  return dense_masked_attention(q, k, v, keep, sm_scale=sm_scale)


def kept_pairs(keep: jax.Array) -> jax.Array:
  """float32 [B]: kept (head, query, key) triples per example (keep [B, H, Q, N])."""
  return jnp.sum(keep, axis=tuple(range(1, keep.ndim)), dtype=jnp.int32).astype(jnp.float32)


def attention_flops(kept, head_dim: int):
  """FLOPs of attention over `kept` pairs: 2 matmuls (QK^T, PV) x 2 FLOPs per multiply-add x head_dim."""
  return 4 * head_dim * kept
