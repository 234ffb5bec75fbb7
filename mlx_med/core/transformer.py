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
  # True: one `nn.scan` over layers, parameters and KV cache stacked on a leading
  # "layers" axis (one compile per block; the training layout and the checkpoint
  # layout). False: separate modules layers_0..layers_{L-1} and a per-layer cache.
  # Inference wants False: inside a scan every step slices each layer's weights
  # and cache out of the stacked arrays, and XLA copies those slices (measured on
  # CPU: ~40% of a batch-8 decode step). Convert with `unstack_layers`/`stack_layers`.
  scan_layers: bool = True
  # Multimodal rotary (Qwen2-VL / Qwen2.5-VL "mrope_section"): frequencies split into
  # (temporal, height, width) sections summing to head_dim/2; positions are then
  # [B, T, 3]. None: ordinary rotary over positions [B, T].
  mrope_section: Optional[tuple[int, ...]] = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}: choose none, full or dots")
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim")
    if self.mrope_section is not None:
      if not isinstance(self.mrope_section, tuple):
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
      if sum(self.mrope_section) * 2 != self.resolved_head_dim:
        raise ValueError(f"mrope_section={self.mrope_section} must sum to head_dim/2 = {self.resolved_head_dim // 2}")

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
    if values.get("mrope_section") is not None:
      values["mrope_section"] = tuple(int(v) for v in values["mrope_section"])
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
    return total


# scan_layers=True:  {"k": [L,B,S,K,D], "v": [L,B,S,K,D], "segment_ids": [B,S] int32}
# scan_layers=False: {"k": (L arrays [B,K,D,S]), "v": (L arrays [B,K,S,D]), "segment_ids": [B,S]}
#   (head-major, keys transposed: the layouts a decode step's GEMMs read directly)
KVCache = dict


def init_cache(cfg: DecoderConfig, batch: int, length: int, dtype=None) -> KVCache:
  """An empty static KV cache for `cfg`'s layer layout; `segment_ids` 0 marks empty slots."""
  dtype = as_dtype(dtype or cfg.dtype)
  kv, hd = cfg.num_kv_heads, cfg.resolved_head_dim
  if cfg.scan_layers:
    k = jnp.zeros((cfg.num_layers, batch, length, kv, hd), dtype)
    v = jnp.zeros((cfg.num_layers, batch, length, kv, hd), dtype)
  else:
    k = tuple(jnp.zeros((batch, kv, hd, length), dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros((batch, kv, length, hd), dtype) for _ in range(cfg.num_layers))
  return {"k": k, "v": v, "segment_ids": jnp.zeros((batch, length), jnp.int32)}


def unstack_layers(params: Any, num_layers: int, *, donate: bool = False) -> Any:
  """Scanned parameters ({"layers": leaves with a leading L axis}) -> layers_0..layers_{L-1}.

  For a `DecoderConfig` with scan_layers=False. With `donate=True` each stacked
  leaf is deleted once it is split, so the peak memory is one model plus one
  leaf rather than two models (the caller must not use `params` afterwards).
  """
  if "layers" not in params:
    raise ValueError("parameters have no stacked 'layers' entry; are they already unstacked (layers_0, ...)?")
  leaves, treedef = jax.tree_util.tree_flatten(params["layers"])
  split = []
  for leaf in leaves:
    if leaf.shape[0] != num_layers:
      raise ValueError(f"a stacked layer parameter has leading size {leaf.shape[0]}; the config has {num_layers} layers")
    split.append([leaf[i] for i in range(num_layers)])
    if donate and isinstance(leaf, jax.Array):
      leaf.delete()
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree_util.tree_unflatten(treedef, [parts[i] for parts in split])
  return out


def stack_layers(params: Any, num_layers: int) -> Any:
  """The inverse of `unstack_layers`: layers_0..layers_{L-1} -> {"layers": stacked leaves}."""
  names = [f"layers_{i}" for i in range(num_layers)]
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"parameters lack {missing[:3]}; are they already stacked ('layers')?")
  out = {k: v for k, v in params.items() if k not in names}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
  return out


def layers_are_stacked(params: Any) -> bool:
  return "layers" in params


def _write_rows(cache: jax.Array, new: jax.Array, cache_index: jax.Array, axis: int) -> jax.Array:
  """Writes `new` [B, ..., T, ...] into `cache` [B, ..., S, ...] at slot `cache_index` along `axis`.

  A scalar index writes every row at the same slot (one dynamic_update_slice); a [B]
  vector writes row b at its own slot (continuous batching: rows at different lengths).
  """
  if jnp.ndim(cache_index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, cache_index, axis=axis)
  write = lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=axis - 1)
  return jax.vmap(write)(cache, new, cache_index)


def _write_stacked(cache: jax.Array, new: jax.Array, layer: jax.Array, cache_index: jax.Array) -> jax.Array:
  """The stacked cache [L, B, S, K, D]: writes `new` [B, T, K, D] at (layer, :, cache_index)."""
  if jnp.ndim(cache_index) == 0:
    return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, cache_index, 0, 0))
  write = lambda c, u, i: jax.lax.dynamic_update_slice(c, u[None], (layer, i, 0, 0))
  return jax.vmap(write, in_axes=(1, 0, 0), out_axes=1)(cache, new, cache_index)


class Attention(nn.Module):
  cfg: DecoderConfig
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None, layer=None):
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
    q = apply_rope(q, positions, inv_freq, cfg.mrope_section)
    k = apply_rope(k, positions, inv_freq, cfg.mrope_section)
    q = sharding_lib.constrain(self.rules, q, ("batch", "length", "act_heads", None))
    k = sharding_lib.constrain(self.rules, k, ("batch", "length", "act_kv_heads", None))
    v = sharding_lib.constrain(self.rules, v, ("batch", "length", "act_kv_heads", None))

    new_cache = None
    if cache is None:
      # The decoder's mask is causal over slots 0..T-1 here (see Decoder.__call__),
      # which lets blocked backends skip the upper triangle.
      out = attention_lib.attend(q, k, v, mask, cfg.attention_backend, mask_is_causal=True)
    elif layer is None:
      # This layer's own cache (scan_layers=False), head-major: keys [B, K, D, S],
      # values [B, K, S, D] -- the operand layouts a batched GEMM takes as they are,
      # so a decode step reads the cache without transposing it (on CPU, per-step
      # transposes were ~15% of a batch-32 step). Only the new slots are written.
      ck = _write_rows(cache["k"], k.transpose(0, 2, 3, 1).astype(cache["k"].dtype), cache_index, 3)
      cv = _write_rows(cache["v"], v.transpose(0, 2, 1, 3).astype(cache["v"].dtype), cache_index, 2)
      new_cache = {"k": ck, "v": cv}
      if q.shape[1] == 1:  # one new token per row: the decode step
        out = attention_lib.decode_attention(q, ck.astype(dtype), cv.astype(dtype), mask)
      else:  # a prompt block: any backend, on the cache in [B, S, K, D]
        out = attention_lib.attend(q, ck.transpose(0, 3, 1, 2).astype(dtype), cv.transpose(0, 2, 1, 3).astype(dtype),
                                   mask, cfg.attention_backend)
    else:
      # The stacked cache [L, B, S, K, D] (scan_layers=True), carried through the
      # layer scan rather than scanned over: write this call's keys/values at
      # (layer, :, cache_index) in place, then attend over this layer's slice (the
      # mask hides empty slots).
      new_cache = {"k": _write_stacked(cache["k"], k.astype(cache["k"].dtype), layer, cache_index),
                   "v": _write_stacked(cache["v"], v.astype(cache["v"].dtype), layer, cache_index)}
      ck = jax.lax.dynamic_index_in_dim(new_cache["k"], layer, 0, keepdims=False)
      cv = jax.lax.dynamic_index_in_dim(new_cache["v"], layer, 0, keepdims=False)
      out = attention_lib.attend(q, ck.astype(dtype), cv.astype(dtype), mask, cfg.attention_backend)
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
  def __call__(self, carry, layer, positions, mask, cache_index):
    """carry = (x [B,T,E], cache {"k","v"} or None).

    layer: this layer's index into a stacked [L, ...] cache (scan_layers=True), or
    None when the cache is this layer's own [B, S, K, D] arrays.
    """
    x, cache = carry
    cfg = self.cfg
    dtype, pdtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    h = RMSNorm(cfg.norm_eps, dtype, pdtype, axis_name="norm", name="input_norm")(x)
    attn_out, new_cache = Attention(cfg, self.rules, name="attn")(h, positions, mask, cache, cache_index, layer)
    x = x + attn_out
    h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="post_attn_norm")(x)
    x = x + GatedMLP(cfg.mlp_dim, dtype, pdtype, self.rules, nn.initializers.normal(cfg.init_std), name="mlp")(h)
    x = sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))
    return (x, new_cache), None


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
    cache_index is a scalar (every row) or a [B] int32 vector (row b writes from its own
    slot: continuous batching keeps rows of different lengths in one cache).
  embeddings: [B, T, E] input embeddings used instead of looking up `tokens` (which may
    then be None): how a vision-language model feeds text embeddings with its image
    features spliced in (see `embed_tokens`). With `cfg.mrope_section`, positions may be
    [B, T, 3]; [B, T] positions are repeated over the three components.
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
    if not cfg.scan_layers:
      self.layers = [block(cfg, self.rules) for _ in range(cfg.num_layers)]  # named layers_0, layers_1, ...
    else:
      self.layers = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.rules, name="layers")
    self.final_norm = RMSNorm(cfg.norm_eps, as_dtype(cfg.dtype), as_dtype(cfg.param_dtype), name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = nn.DenseGeneral(
          cfg.vocab_size, use_bias=False, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
          kernel_init=logical_init(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
          dot_general=cpu_dense_dot_general, name="lm_head")

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """Token ids [B, T] -> input embeddings [B, T, E] in the compute dtype (what `__call__`
    feeds the first layer). A multimodal model calls this, overwrites the image-token
    positions with its visual features, and passes the result as `embeddings`."""
    if self.rules is None:
      return self.embed(tokens)
    # The lookup on a vocab-sharded table: gather the table's embed dim (fsdp)
    # first, so each tensor shard looks up the ids in its vocab range and XLA
    # combines them with one all-reduce. Left to itself, the SPMD partitioner
    # cannot reconcile an embed-sharded table with batch-sharded ids and
    # replicates the whole gather ("involuntary full rematerialization").
    table = sharding_lib.constrain(self.rules, self.embed.embedding, ("vocab", None))
    return jnp.take(table, tokens, axis=0).astype(as_dtype(self.cfg.dtype))

  def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
               cache_index=None, return_hidden: bool = False, embeddings=None):
    if embeddings is not None:
      b, t = embeddings.shape[:2]
    else:
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
      kv_segments = _write_rows(cache["segment_ids"], segment_ids.astype(jnp.int32), cache_index, 1)
      # A [B] cache_index: row b writes at its own slot (see `_write_rows`).
      first = cache_index[:, None] if cache_index.ndim else cache_index
      q_slots = jnp.broadcast_to(first + jnp.arange(t, dtype=jnp.int32), (b, t))
      kv_slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
      mask = attention_lib.make_mask(segment_ids, kv_segments, q_slots, kv_slots, causal=True)
      layer_caches = {"k": cache["k"], "v": cache["v"]}
    if positions is None:
      index = jnp.asarray(cache_index, jnp.int32)
      index = index[:, None] if index.ndim else index
      positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    if self.cfg.mrope_section is not None and positions.ndim == 2:
      # Text-only input: the three M-RoPE components are equal.
      positions = jnp.broadcast_to(positions[..., None], positions.shape + (len(self.cfg.mrope_section),))

    if embeddings is not None:
      x = embeddings.astype(as_dtype(self.cfg.dtype))
    else:
      x = self.embed_tokens(tokens)
    x = sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))
    if self.cfg.scan_layers:
      layer_ids = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
      (x, kv_out), _ = self.layers((x, layer_caches), layer_ids, positions, mask, cache_index)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        own = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
        (x, own), _ = layer((x, own), None, positions, mask, cache_index)
        if own is not None:
          new_k.append(own["k"])
          new_v.append(own["v"])
      kv_out = {"k": tuple(new_k), "v": tuple(new_v)}
    x = self.final_norm(x)
    if return_hidden:
      hidden = x
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    logits = sharding_lib.constrain(self.rules, logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    if cache is not None:
      new_cache = {"k": kv_out["k"], "v": kv_out["v"], "segment_ids": kv_segments}
    outputs = (logits, new_cache) if cache is not None else logits
    if return_hidden:
      return outputs, hidden
    return outputs


def project_to_vocab(module: Decoder, hidden: jax.Array) -> jax.Array:
  """The decoder's own output projection (tied embedding or lm_head) on selected final hidden
  states, fp32: `Decoder(cfg).apply({"params": p}, hidden, method=project_to_vocab)`. With
  `return_hidden=True` a caller that needs logits at a few positions only (the sampler's last
  prompt token, an RL update's completion tokens) projects just those; XLA drops the unused
  full logits."""
  if module.cfg.tie_embeddings:
    logits = module.embed.attend(hidden)
  else:
    logits = module.lm_head(hidden)
  return logits.astype(jnp.float32)
