"""Attention masks and the attention backend switch.

Every decoder call describes its attention with four small arrays instead of a
dense mask argument: segment ids for queries and keys (0 = padding; equal ids may
attend, so packed patients or requests never see each other) and slot indices
(the position of each query/key in the sequence or KV cache, for causality).
Backends turn that description into attention; `xla` is the default everywhere,
`cpu` is a blocked, memory-frugal formulation that trains several times faster
under XLA:CPU, `cudnn` uses the fused GPU kernel, and Pallas kernels register
themselves here.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_BACKENDS: dict[str, AttentionFn] = {}
# Backends that accept the keyword `mask_is_causal` (see `attend`). Others are
# called with (q, k, v, mask) only, so existing kernels need no change.
_CAUSAL_AWARE: set[str] = set()


def register_backend(name: str, causal_aware: bool = False):
  def wrap(fn: AttentionFn) -> AttentionFn:
    _BACKENDS[name] = fn
    if causal_aware:
      _CAUSAL_AWARE.add(name)
    return fn
  return wrap


def available_backends() -> tuple[str, ...]:
  return tuple(sorted(_BACKENDS))


def make_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
              q_slots: jax.Array, kv_slots: jax.Array, causal: bool = True) -> jax.Array:
  """Boolean [batch, q_len, kv_len]: same non-zero segment and (if causal) kv slot <= q slot."""
  same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if causal:
    same &= kv_slots[:, None, :] <= q_slots[:, :, None]
  return same


def _scores_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum` with fp32 accumulation and an fp32 result.

  XLA:CPU has no dot for bf16 x bf16 -> f32 outside its YNNPACK fusions (the
  generic DotThunk rejects it at run time, e.g. at decode batch > 1), so when
  tracing for CPU low-precision operands are widened to fp32 first. That is the
  same arithmetic (the widening is exact and the products are accumulated in
  fp32 either way); other backends keep the mixed-precision dot.
  """
  if jax.default_backend() == "cpu" and (a.dtype != jnp.float32 or b.dtype != jnp.float32):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@register_backend("xla")
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query softmax attention as two einsums, fp32 scores.

  q: [B, T, H, D]; k, v: [B, S, K, D] with K dividing H; mask: [B, T, S] bool.
  Query heads are grouped as [K, H/K] so K/V are never repeated in memory.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  group = h // kv_heads
  q = q.reshape(b, t, kv_heads, group, d) * jnp.asarray(d ** -0.5, q.dtype)
  scores = _scores_einsum("btkgd,bskd->bkgts", q, k)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


@register_backend("cudnn")
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """jax.nn.dot_product_attention's fused cuDNN kernel (GPU, bf16/fp16 only)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="cudnn")


@register_backend("jax")
def jax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """jax.nn.dot_product_attention, letting JAX pick the implementation."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])


def decode_attention(q: jax.Array, k_t: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """One query token per row against a head-major KV cache (the decode step).

  q: [B, 1, H, D]; k_t: [B, K, D, S] (keys transposed); v: [B, K, S, D]; mask:
  [B, 1, S] bool. Same conventions as `xla_attention` (fp32 scores, masked scores
  replaced by the most negative float), written for the per-layer cache layout
  so neither operand needs a transpose.
  """
  b, t, h, d = q.shape
  if t != 1:
    raise ValueError(f"decode_attention takes one query token per row, got {t}")
  kv_heads = k_t.shape[1]
  q = q.reshape(b, kv_heads, h // kv_heads, d) * jnp.asarray(d ** -0.5, q.dtype)
  scores = _scores_einsum("bkgd,bkds->bkgs", q, k_t)
  scores = jnp.where(mask[:, :, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, h, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, backend: str = "xla", *,
           mask_is_causal: bool = False) -> jax.Array:
  """Dispatches to a backend.

  mask_is_causal: a promise by the caller that queries and keys share slots
    0..T-1 and `mask[b, t, s]` is False whenever s > t (the decoder's no-cache
    path). Backends that know how may then skip the all-masked upper blocks; the
    mask is still applied inside the blocks they compute, so results equal the
    dense computation. Backends that do not declare `causal_aware` never see it.
  """
  try:
    fn = _BACKENDS[backend]
  except KeyError:
    raise ValueError(f"attention backend {backend!r} is unknown; choose one of {available_backends()}") from None
  if backend in _CAUSAL_AWARE:
    return fn(q, k, v, mask, mask_is_causal=mask_is_causal)
  return fn(q, k, v, mask)


# ----------------------------------------------------------------------------
# `cpu`: blocked attention with a hand-written backward pass.
#
# Why: XLA:CPU runs the dense formulation above as a chain of separate ops over
# the [B, H, T, S] fp32 score tensor (select, max, exp, sum, divide, and in the
# backward pass several transposed copies of it), stores the probabilities of
# every layer for the backward pass, and computes the all-masked causal half.
# On a 2-core CPU that made attention most of the training step. Here
#   * one batch row at a time (a loop), so every [heads, rows, keys] intermediate
#     is a few MB and stays in cache between the ops that XLA cannot fuse;
#   * queries in blocks of `CPU_BLOCK` rows; under a causal mask a block only
#     looks at keys up to its own last row (the upper triangle is skipped);
#   * the backward pass recomputes the probabilities from the saved log-sum-exp
#     (flash-attention style), so nothing of size T*S is kept between passes,
#     and uses delta = rowsum(dO * O) instead of a T*S reduction;
#   * dK and dV are produced transposed ([.., head_dim, keys]) from row-major
#     Q^T / dO^T, the operand layout XLA:CPU's fast matmul accepts, instead of
#     letting XLA transpose the [rows, keys] probability blocks.
# Numerics equal the `xla` backend up to float rounding, including rows whose
# mask is all False (padding queries), which the reference maps to the mean of
# all values (a uniform softmax over `finfo.min` scores).
# ----------------------------------------------------------------------------

CPU_BLOCK = 128  # query rows per block (measured on a 2-core AVX2 CPU at T=512)
_NEG = float(jnp.finfo(jnp.float32).min)


def _blocks(t: int, s: int, block: int, causal: bool) -> list[tuple[int, int, int]]:
  """(first query row, end query row, end key) per query block."""
  out = []
  for start in range(0, t, block):
    end = min(start + block, t)
    out.append((start, end, end if causal else s))
  return out


def _row_forward(q, k, v, mask, causal, block):
  """One batch row. q [K,T,G,D] (pre-scaled), k/v [K,S,D], mask [T,S] -> out, lse [K,T,G]."""
  t, s = q.shape[1], k.shape[1]
  outs, lses = [], []
  for start, end, kv_end in _blocks(t, s, block, causal):
    valid = mask[None, start:end, None, :kv_end]
    scores = jnp.einsum("kcgd,ksd->kcgs", q[:, start:end], k[:, :kv_end], preferred_element_type=jnp.float32)
    row_max = jnp.max(jnp.where(valid, scores, _NEG), axis=-1)
    probs = jnp.where(valid, jnp.exp(scores - row_max[..., None]), 0.0)
    denom = jnp.sum(probs, axis=-1)
    # An all-masked row has denom 0: it gets output 0 and a -inf-like lse here
    # and is replaced by the reference's uniform average in `cpu_attention`.
    safe = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("kcgs,ksd->kcgd", probs.astype(v.dtype), v[:, :kv_end], preferred_element_type=jnp.float32)
    outs.append((out / safe[..., None]).astype(q.dtype))
    lses.append(row_max + jnp.log(safe))
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _row_backward(q, k, v, mask, out, lse, d_out, causal, block):
  """One batch row of the backward pass; returns dq [K,T,G,D], dk, dv [K,S,D]."""
  t, s = q.shape[1], k.shape[1]
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [K,T,G]
  # Row-major transposes of the two small [rows, head_dim] operands; the barrier
  # keeps XLA from folding them back into the dots below.
  q_t, do_t = jax.lax.optimization_barrier((q.transpose(0, 3, 1, 2), d_out.transpose(0, 3, 1, 2)))  # [K,D,T,G]
  dqs, dk_parts, dv_parts = [], [], []
  for start, end, kv_end in _blocks(t, s, block, causal):
    valid = mask[None, start:end, None, :kv_end]
    k_blk, v_blk = k[:, :kv_end], v[:, :kv_end]
    scores = jnp.einsum("kcgd,ksd->kcgs", q[:, start:end], k_blk, preferred_element_type=jnp.float32)
    probs = jnp.where(valid, jnp.exp(scores - lse[:, start:end, :, None]), 0.0)
    d_probs = jnp.einsum("kcgd,ksd->kcgs", d_out[:, start:end], v_blk, preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - delta[:, start:end, :, None])).astype(q.dtype)
    probs = probs.astype(d_out.dtype)
    dv_parts.append(jnp.einsum("kdcg,kcgs->kds", do_t[:, :, start:end], probs, preferred_element_type=jnp.float32))
    dk_parts.append(jnp.einsum("kdcg,kcgs->kds", q_t[:, :, start:end], d_scores, preferred_element_type=jnp.float32))
    dqs.append(jnp.einsum("kcgs,ksd->kcgd", d_scores, k_blk, preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dqs, axis=1)
  dk = _sum_prefix_parts(dk_parts, s).transpose(0, 2, 1)
  dv = _sum_prefix_parts(dv_parts, s).transpose(0, 2, 1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _sum_prefix_parts(parts: list[jax.Array], s: int) -> jax.Array:
  """Sums [..., E_i] arrays covering key prefixes of length E_i into [..., S] (last axis)."""
  ends = [p.shape[-1] for p in parts]
  if all(e == s for e in ends):
    return functools.reduce(jnp.add, parts)
  pieces, start = [], 0
  for end in sorted(set(ends)):
    covering = [p[..., start:end] for p in parts if p.shape[-1] >= end]
    pieces.append(functools.reduce(jnp.add, covering))
    start = end
  if start < s:  # keys no block reaches (cannot happen for causal T == S)
    pieces.append(jnp.zeros(parts[0].shape[:-1] + (s - start,), parts[0].dtype))
  return jnp.concatenate(pieces, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_attention(q, k, v, mask, causal: bool, block: int):
  """q: [B,K,T,G,D] (pre-scaled), k/v: [B,K,S,D], mask [B,T,S] -> [B,K,T,G,D]."""
  return _blocked_fwd(q, k, v, mask, causal, block)[0]


def _blocked_fwd(q, k, v, mask, causal, block):
  out, lse = jax.lax.map(lambda a: _row_forward(*a, causal, block), (q, k, v, mask))
  return out, (q, k, v, mask, out, lse)


def _blocked_bwd(causal, block, residuals, d_out):
  dq, dk, dv = jax.lax.map(lambda a: _row_backward(*a, causal, block), residuals + (d_out,))
  return dq, dk, dv, None


_blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)
@register_backend("cpu", causal_aware=True)
def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                  mask_is_causal: bool = False) -> jax.Array:
  """Blocked grouped-query attention for XLA:CPU training (see the notes above).

  Same contract and numerics as `xla_attention`; `mask_is_causal` (from `attend`)
  lets it skip key blocks that lie entirely above the diagonal.
  """
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  causal = bool(mask_is_causal) and t == s
  qh = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv_heads, group, d).transpose(0, 2, 1, 3, 4)
  kh = k.transpose(0, 2, 1, 3)
  vh = v.transpose(0, 2, 1, 3)
  out = _blocked_attention(qh, kh, vh, mask, causal, CPU_BLOCK)
  out = out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
  # Rows with no valid key: the dense reference softmaxes equal `finfo.min`
  # scores into a uniform average of all values; reproduce that exactly.
  any_valid = jnp.any(mask, axis=-1)  # [B, T]
  uniform = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), group, axis=1).astype(out.dtype)  # [B, H, D]
  return jnp.where(any_valid[:, :, None, None], out, uniform[:, None])
