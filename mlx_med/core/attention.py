"""Attention masks and the attention backend switch.

Every decoder call describes its attention with four small arrays instead of a
dense mask argument: segment ids for queries and keys (0 = padding; equal ids may
attend, so packed patients or requests never see each other) and slot indices
(the position of each query/key in the sequence or KV cache, for causality).
Backends turn that description into attention; `xla` is the default everywhere,
`cudnn` uses the fused GPU kernel, and Pallas kernels register themselves here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_BACKENDS: dict[str, AttentionFn] = {}


def register_backend(name: str):
  def wrap(fn: AttentionFn) -> AttentionFn:
    _BACKENDS[name] = fn
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
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, backend: str = "xla") -> jax.Array:
  try:
    fn = _BACKENDS[backend]
  except KeyError:
    raise ValueError(f"attention backend {backend!r} is unknown; choose one of {available_backends()}") from None
  return fn(q, k, v, mask)
