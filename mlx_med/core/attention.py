"""Attention masks, the decoder's attention backends, and the one backend registry.

Every decoder call describes its attention with four small arrays instead of a
dense mask argument: segment ids for queries and keys (0 = padding; equal ids may
attend, so packed patients or requests never see each other) and slot indices
(the position of each query/key in the sequence or KV cache, for causality).
`make_mask` turns them into a boolean [B, T, S] mask and `attend` hands it to a
backend chosen by name from `DECODER_BACKENDS`:

  xla    grouped-query softmax attention as two einsums (the default everywhere;
         defines the conventions the others match)
  cpu    blocked, memory-frugal attention with a hand-written backward pass that
         trains several times faster under XLA:CPU
  cudnn  jax.nn.dot_product_attention's fused cuDNN kernel (GPU; bf16/fp16 only)
  jax    the same call with JAX's XLA implementation (any platform; it runs the
         cudnn backend's mask logic where no GPU is present)
  auto   'cpu' on CPU, 'xla' elsewhere (cudnn is never picked automatically: it
         rejects fp32)

`BackendRegistry` is the single mechanism for choosing implementations by name:
the decoder's backends above and the sparse attentions of
`mlx_med.core.sparse_attention` (whose Pallas kernels take a sample rather than
a mask, so they live in registries of their own, defined in that module) are all
registered with it and resolve `auto` through `resolve_auto`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]


def resolve_auto(per_platform: Mapping[str, str], platform: str | None = None) -> str:
  """The backend `per_platform` names for `platform` (default: JAX's default backend).

  Platforms not named fall back to the entry for 'cpu'.
  """
  platform = platform or jax.default_backend()
  return per_platform.get(platform, per_platform["cpu"])


@dataclasses.dataclass(frozen=True)
class Backend:
  """One registered implementation: its function and free-form traits."""
  name: str
  fn: Callable[..., Any]
  traits: Mapping[str, Any]


class BackendRegistry:
  """Named implementations of one operation, plus an `auto` choice per platform.

  `register(name, **traits)` is a decorator; `resolve(name)` maps 'auto' to a
  concrete name and rejects unknown names with a one-line error listing the
  choices; `get(name)` returns the resolved `Backend`.
  """

  def __init__(self, what: str, auto: Mapping[str, str]):
    if "cpu" not in auto:
      raise ValueError(f"{what}: the auto table needs a 'cpu' entry (the fallback), got {dict(auto)}")
    self.what = what
    self.auto = dict(auto)
    self._backends: dict[str, Backend] = {}

  def register(self, name: str, **traits):
    if name == "auto":
      raise ValueError(f"{self.what}: 'auto' is resolved per platform and cannot be registered")

    def wrap(fn):
      self._backends[name] = Backend(name, fn, dict(traits))
      return fn
    return wrap

  def names(self) -> tuple[str, ...]:
    """Registered backends (without 'auto'), sorted."""
    return tuple(sorted(self._backends))

  def choices(self) -> tuple[str, ...]:
    return ("auto",) + self.names()

  def resolve(self, name: str, platform: str | None = None) -> str:
    if name == "auto":
      name = resolve_auto(self.auto, platform)
    if name not in self._backends:
      raise ValueError(f"{self.what} backend {name!r} is unknown; choose one of {self.choices()}")
    return name

  def get(self, name: str, platform: str | None = None) -> Backend:
    return self._backends[self.resolve(name, platform)]


# Backends that accept the keyword `mask_is_causal` register with causal_aware=True
# (see `attend`); the others are called with (q, k, v, mask) only.
DECODER_BACKENDS = BackendRegistry("attention", auto={"cpu": "cpu", "gpu": "xla", "tpu": "xla"})


def register_backend(name: str, causal_aware: bool = False):
  """Registers a decoder attention backend fn(q, k, v, mask[, mask_is_causal=])."""
  return DECODER_BACKENDS.register(name, causal_aware=causal_aware)


def available_backends() -> tuple[str, ...]:
  return DECODER_BACKENDS.choices()


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


# ----------------------------------------------------------------------------
# `cudnn` and `jax`: jax.nn.dot_product_attention.
#
# Under the decoder's causal promise (`mask_is_causal`, T == S) both call it with
# is_causal=True, so cuDNN runs its causal mask type and skips the tiles above
# the diagonal. The segment part of the mask is then passed one of two ways,
# chosen at run time by `lax.cond`:
#   * every row is one sequence followed by padding (segment ids 1..1 0..0, the
#     usual unpacked batch): as per-row sequence lengths (cuDNN's padding-causal
#     mask type), with no [B, 1, T, S] mask or bias in the call at all;
#   * otherwise (packed rows, left padding, empty rows): as the boolean mask,
#     which jax turns into a dense additive bias -- jax.nn.dot_product_attention
#     has no segment-id input for cuDNN.
# Query rows that see no key (padding) are set to the uniform average of the
# values, the `xla` backend's convention, so every backend gives the same output
# everywhere. cuDNN's fused attention supports only bf16/fp16 inputs: the
# `cudnn` backend raises on anything else instead of casting behind the caller's
# back (use DecoderConfig.dtype='bfloat16', or the `xla` backend for fp32).
# ----------------------------------------------------------------------------

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def causal_prefix_lengths(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(lengths [B] int32, ok scalar bool) for a square causal mask [B, T, T].

  ok is True when every row of the mask is exactly `causal & (q < len) & (k < len)`
  with len >= 1 -- one sequence followed by padding -- so per-row lengths
  describe it completely.
  """
  t = mask.shape[1]
  lengths = jnp.sum(jnp.diagonal(mask, axis1=1, axis2=2), axis=-1, dtype=jnp.int32)
  idx = jnp.arange(t, dtype=jnp.int32)
  prefix = (idx[None, None, :] <= idx[None, :, None]) & (idx[None, :, None] < lengths[:, None, None])
  ok = jnp.all(mask == prefix) & jnp.all(lengths >= 1)
  return lengths, ok


def _fused_attention(q, k, v, mask, mask_is_causal: bool, implementation: str | None) -> jax.Array:
  b, t, h, d = q.shape
  s = k.shape[1]
  dpa = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
  if bool(mask_is_causal) and t == s:
    lengths, prefix_ok = causal_prefix_lengths(mask)
    out = jax.lax.cond(
        prefix_ok,
        lambda q, k, v: dpa(q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths),
        lambda q, k, v: dpa(q, k, v, mask=mask[:, None], is_causal=True),
        q, k, v)
  else:
    out = dpa(q, k, v, mask=mask[:, None])
  any_valid = jnp.any(mask, axis=-1)  # [B, T]
  uniform = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), h // k.shape[2], axis=1).astype(out.dtype)
  return jnp.where(any_valid[:, :, None, None], out, uniform[:, None])


@register_backend("cudnn", causal_aware=True)
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                    mask_is_causal: bool = False) -> jax.Array:
  """jax.nn.dot_product_attention's fused cuDNN kernel (GPU; bf16/fp16 inputs only; see the notes above)."""
  if q.dtype not in CUDNN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(
        f"attention backend 'cudnn' needs bfloat16 or float16 q/k/v, got {q.dtype}/{k.dtype}/{v.dtype}; "
        "set DecoderConfig.dtype='bfloat16' or use attention backend 'xla'")
  return _fused_attention(q, k, v, mask, mask_is_causal, "cudnn")


@register_backend("jax", causal_aware=True)
def jax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                  mask_is_causal: bool = False) -> jax.Array:
  """jax.nn.dot_product_attention with its XLA implementation, same mask handling as `cudnn`."""
  return _fused_attention(q, k, v, mask, mask_is_causal, "xla")


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
  """Runs the decoder attention backend named `backend` ('auto' resolves per platform).

  mask_is_causal: a promise by the caller that queries and keys share slots
    0..T-1 and `mask[b, t, s]` is False whenever s > t (the decoder's no-cache
    path). Backends that know how may then skip the all-masked upper blocks; the
    mask is still applied inside the blocks they compute, so results equal the
    dense computation. Backends that do not declare `causal_aware` never see it.
  """
  entry = DECODER_BACKENDS.get(backend)
  if entry.traits.get("causal_aware"):
    return entry.fn(q, k, v, mask, mask_is_causal=mask_is_causal)
  return entry.fn(q, k, v, mask)


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
