"""The decoder-only transformer shared by the EHR foundation model and the LLMs.

Llama/Qwen family: RMSNorm, SwiGLU, rotary embeddings (with Llama-3 scaling),
grouped-query attention, optional q/k/v bias (Qwen2) and per-head q/k norm
(Qwen3), tied or untied embeddings. Layers are stacked with `nn.scan` (one
compile per block regardless of depth; parameters carry a leading "layers"
axis), optionally rematerialised.

The model is functional: `Decoder(cfg).apply({"params": p}, tokens, ...)`.
A KV cache is an explicit pytree passed in and returned, never hidden state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlx_med.core import attention as attention_lib
from mlx_med.core import sharding as sharding_lib
from mlx_med.core.layers import GatedMLP, RMSNorm, apply_rope, cpu_dense_dot_general, logical_init, rope_inverse_frequencies

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype) -> Any:
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in _DTYPES:
      raise ValueError(f"dtype {name_or_dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name_or_dtype]
  return name_or_dtype


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture and numerics of one decoder. Hashable: it is a static jit argument."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: Optional[int] = None  # default d_model // num_heads (Qwen3 sets it explicitly)
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple[tuple[str, Any], ...]] = None  # e.g. (("rope_type","llama3"), ("factor", 8.0), ...)
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots
  attention_backend: str = "xla"
  init_std: float = 0.02

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}: choose none, full or dots")
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def rope_scaling_dict(self) -> dict | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @classmethod
  def from_config(cls, cfg) -> "DecoderConfig":
    """From an ml_collections ConfigDict / mapping with the same field names."""
    values = dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"model config has unknown keys {unknown}; known: {sorted(known)}")
    if values.get("rope_scaling") is not None and not isinstance(values["rope_scaling"], tuple):
      values["rope_scaling"] = tuple(sorted(dict(values["rope_scaling"]).items()))
    return cls(**values)

  def num_params(self, include_embeddings: bool = True) -> int:
    d, hd = self.d_model, self.resolved_head_dim
    attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += hd * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * hd
    layer = attn + 3 * d * self.mlp_dim + 2 * d
    total = self.num_layers * layer + d
    if include_embeddings:
      total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    elif not self.tie_embeddings:
      total += 0
    return total


KVCache = dict  # {"k": [L,B,S,K,D], "v": [L,B,S,K,D], "segment_ids": [B,S] int32}


def init_cache(cfg: DecoderConfig, batch: int, length: int, dtype=None) -> KVCache:
  """An empty static KV cache; `segment_ids` 0 marks empty slots."""
  dtype = as_dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "segment_ids": jnp.zeros((batch, length), jnp.int32),
  }


class Attention(nn.Module):
  cfg: DecoderConfig
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None):
    cfg = self.cfg
    dtype, pdtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    hd = cfg.resolved_head_dim
    init = nn.initializers.normal(cfg.init_std)

    def proj(name, heads, axes):
      return nn.DenseGeneral(
          (heads, hd), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype,
          kernel_init=logical_init(init, ("embed",) + axes),
          bias_init=logical_init(nn.initializers.zeros, axes), dot_general=cpu_dense_dot_general, name=name)(x)

    q = proj("q_proj", cfg.num_heads, ("heads", "head_dim"))
    k = proj("k_proj", cfg.num_kv_heads, ("kv_heads", "head_dim"))
    v = proj("v_proj", cfg.num_kv_heads, ("kv_heads", "head_dim"))
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, dtype, pdtype, name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, dtype, pdtype, name="k_norm")(k)
    inv_freq = rope_inverse_frequencies(hd, cfg.rope_theta, cfg.rope_scaling_dict)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    q = sharding_lib.constrain(self.rules, q, ("batch", "length", "act_heads", None))
    k = sharding_lib.constrain(self.rules, k, ("batch", "length", "act_kv_heads", None))
    v = sharding_lib.constrain(self.rules, v, ("batch", "length", "act_kv_heads", None))

    new_cache = None
    if layer_cache is not None:
      # Write this call's keys/values into the static cache at cache_index and
      # attend over the whole cache (the mask hides empty slots).
      ck = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), cache_index, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), cache_index, axis=1)
      new_cache = {"k": ck, "v": cv}
      k, v = ck.astype(dtype), cv.astype(dtype)

    # Without a cache the decoder's mask is causal over slots 0..T-1 (see
    # Decoder.__call__), which lets blocked backends skip the upper triangle.
    out = attention_lib.attend(q, k, v, mask, cfg.attention_backend, mask_is_causal=layer_cache is None)
    out = sharding_lib.constrain(self.rules, out, ("batch", "length", "act_heads", None))
    out = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype,
        kernel_init=logical_init(init, ("heads", "head_dim", "embed")), dot_general=cpu_dense_dot_general,
        name="o_proj")(out)
    return out, new_cache


class DecoderLayer(nn.Module):
  cfg: DecoderConfig
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x, layer_cache, positions, mask, cache_index):
    cfg = self.cfg
    dtype, pdtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    h = RMSNorm(cfg.norm_eps, dtype, pdtype, axis_name="norm", name="input_norm")(x)
    attn_out, new_cache = Attention(cfg, self.rules, name="attn")(h, positions, mask, layer_cache, cache_index)
    x = x + attn_out
    h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="post_attn_norm")(x)
    x = x + GatedMLP(cfg.mlp_dim, dtype, pdtype, self.rules, nn.initializers.normal(cfg.init_std), name="mlp")(h)
    x = sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))
    return x, new_cache


_SCAN_UNROLL = 1  # experiment knob

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nn.Module):
  """tokens [B, T] -> logits [B, T, V] (fp32), and the updated cache when one is given.

  positions: rotary positions [B, T] (default 0..T-1).
  segment_ids: [B, T] (default all 1; 0 = padding). Tokens attend only within their
    segment, which is how packed sequences never cross patients/requests.
  cache / cache_index: a KV cache from `init_cache`; this call's tokens occupy slots
    cache_index .. cache_index+T-1 and attend to every filled slot of the same segment.
  """

  cfg: DecoderConfig
  rules: sharding_lib.ShardingRules | None = None

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
        embedding_init=logical_init(nn.initializers.normal(cfg.init_std), ("vocab", "embed")), name="embed")
    block = DecoderLayer
    if cfg.remat != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=_SCAN_UNROLL,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, self.rules, name="layers")
    self.final_norm = RMSNorm(cfg.norm_eps, as_dtype(cfg.dtype), as_dtype(cfg.param_dtype), name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = nn.DenseGeneral(
          cfg.vocab_size, use_bias=False, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
          kernel_init=logical_init(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
          dot_general=cpu_dense_dot_general, name="lm_head")

  def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
               cache_index=None, return_hidden: bool = False):
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if cache is None:
      slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      mask = attention_lib.make_mask(segment_ids, segment_ids, slots, slots, causal=True)
      layer_caches = None
      new_cache = None
      cache_index = 0
    else:
      cache_index = jnp.asarray(cache_index, jnp.int32)
      length = cache["segment_ids"].shape[1]
      kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32), cache_index, axis=1)
      q_slots = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
      kv_slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
      mask = attention_lib.make_mask(segment_ids, kv_segments, q_slots, kv_slots, causal=True)
      layer_caches = {"k": cache["k"], "v": cache["v"]}
    if positions is None:
      positions = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32) + jnp.arange(t, dtype=jnp.int32), (b, t))

    x = self.embed(tokens)
    x = sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))
    x, stacked = self.layers(x, layer_caches, positions, mask, cache_index)
    x = self.final_norm(x)
    if return_hidden:
      hidden = x
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    logits = sharding_lib.constrain(self.rules, logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    if cache is not None:
      new_cache = {"k": stacked["k"], "v": stacked["v"], "segment_ids": kv_segments}
    outputs = (logits, new_cache) if cache is not None else logits
    if return_hidden:
      return outputs, hidden
    return outputs
