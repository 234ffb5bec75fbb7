"""Pieces shared by the vision and text towers: outputs, activations, attention, MLP, blocks.

The ViT (CLIP and SigLIP styles) and the text transformer are the same pre-LN
transformer block around different embeddings and poolings, so the block lives here
once. Parameters carry logical axis names (see `mlx_med.core.sharding`): dense
kernels ("embed", "mlp") / ("mlp", "embed"), attention projections
("embed", "heads", "head_dim") and ("heads", "head_dim", "embed"), norms ("norm",).
Activations are computed in `dtype` (bf16-capable); softmax and LayerNorm
statistics are fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlx_med.core import attention as attention_lib
from mlx_med.core import sharding as sharding_lib
from mlx_med.core.layers import cpu_dense_dot_general, logical_init
from mlx_med.core.transformer import as_dtype

Dtype = Any

__all__ = [
  "ACTIVATIONS",
  "MLP",
  "Encoder",
  "EncoderBlock",
  "LayerNorm",
  "MultiHeadAttention",
  "VisionOutput",
  "activation",
  "as_dtype",
  "hf_activation_name",
]


class VisionOutput(NamedTuple):
  """What every image encoder returns.

  pooled: [B, D], the vector a CLIP-style projection consumes.
  tokens: [B, N, D], the last hidden state (as HF's `last_hidden_state`).
  feature_maps: one [B, h, w, C] map per stage (a ViT has one: its patch grid).
  """

  pooled: jax.Array
  tokens: jax.Array
  feature_maps: tuple


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Hugging Face `hidden_act` names -> ours.
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def hf_activation_name(hidden_act: str) -> str:
  if hidden_act not in _HF_ACTIVATIONS:
    raise ValueError(f"hidden_act {hidden_act!r} is not supported (supported: {sorted(_HF_ACTIVATIONS)})")
  return _HF_ACTIVATIONS[hidden_act]


def LayerNorm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  """nn.LayerNorm with logical axes on its scale and bias."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      scale_init=logical_init(nn.initializers.ones, ("norm",)),
                      bias_init=logical_init(nn.initializers.zeros, ("norm",)), name=name)


_DENSE_INIT = nn.initializers.xavier_uniform()


class MultiHeadAttention(nn.Module):
  """Multi-head attention with biased q/k/v/out projections (CLIP / SigLIP / torch MHA layout).

  `__call__(x_q [B,T,D], x_kv [B,S,D], mask [B,T,S] bool or None)`.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    d = x_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    hd = d // self.num_heads

    def proj(name, x):
      return nn.DenseGeneral(
          (self.num_heads, hd), dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=logical_init(_DENSE_INIT, ("embed", "heads", "head_dim")),
          bias_init=logical_init(nn.initializers.zeros, ("heads", "head_dim")),
          dot_general=cpu_dense_dot_general, name=name)(x)

    q, k, v = proj("query", x_q), proj("key", x_kv), proj("value", x_kv)
    q = sharding_lib.constrain(self.rules, q, ("batch", "length", "act_heads", None))
    k = sharding_lib.constrain(self.rules, k, ("batch", "length", "act_heads", None))
    v = sharding_lib.constrain(self.rules, v, ("batch", "length", "act_heads", None))
    if mask is None:
      mask = jnp.ones((q.shape[0], q.shape[1], k.shape[1]), jnp.bool_)
    out = attention_lib.attend(q, k, v, mask, "xla")
    out = sharding_lib.constrain(self.rules, out, ("batch", "length", "act_heads", None))
    return nn.DenseGeneral(
        d, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=logical_init(_DENSE_INIT, ("heads", "head_dim", "embed")),
        bias_init=logical_init(nn.initializers.zeros, ("embed",)),
        dot_general=cpu_dense_dot_general, name="out")(out)


class MLP(nn.Module):
  """fc2(act(fc1(x))) with biases."""

  mlp_dim: int
  act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = nn.DenseGeneral(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical_init(_DENSE_INIT, ("embed", "mlp")),
                        bias_init=logical_init(nn.initializers.zeros, ("mlp",)),
                        dot_general=cpu_dense_dot_general, name="fc1")(x)
    h = activation(self.act)(h)
    # [B, L, F] token sequences, or [B, H, W, F] feature maps (DaViT)
    axes = ("batch", "length", "act_mlp") if h.ndim == 3 else ("batch",) + (None,) * (h.ndim - 2) + ("act_mlp",)
    h = sharding_lib.constrain(self.rules, h, axes)
    return nn.DenseGeneral(d, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=logical_init(_DENSE_INIT, ("mlp", "embed")),
                           bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                           dot_general=cpu_dense_dot_general, name="fc2")(h)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  num_heads: int
  mlp_dim: int
  act: str
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    h = LayerNorm(self.layer_norm_eps, self.dtype, self.param_dtype, "ln1")(x)
    x = x + MultiHeadAttention(self.num_heads, self.dtype, self.param_dtype, self.rules, name="attn")(h, h, mask)
    h = LayerNorm(self.layer_norm_eps, self.dtype, self.param_dtype, "ln2")(x)
    x = x + MLP(self.mlp_dim, self.act, self.dtype, self.param_dtype, self.rules, name="mlp")(h)
    return sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))


class Encoder(nn.Module):
  """`depth` blocks named layers_0..layers_{depth-1}; each one rematerialised when `remat`.

  A plain loop rather than `nn.scan`: the towers are shallow next to the decoder, and
  per-layer parameter names keep Hugging Face conversion a one-to-one mapping.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  act: str
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    block = nn.remat(EncoderBlock, prevent_cse=False) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.act, self.layer_norm_eps, self.dtype, self.param_dtype,
                self.rules, name=f"layers_{i}")(x, mask)
    return x
