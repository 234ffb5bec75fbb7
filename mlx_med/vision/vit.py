"""Vision Transformer in the two styles that public image-text checkpoints use.

* "clip" (OpenAI CLIP / HF `CLIPVisionModel`): a class token, learned position
  embeddings, a LayerNorm before the blocks ("pre_layrnorm"), and a LayerNorm on the
  pooled vector only; `tokens` are the last block's output (HF's last_hidden_state).
* "siglip" (big_vision / HF `SiglipVisionModel`): no class token, learned position
  embeddings, a LayerNorm on every output token, and a multi-head attention pooling
  head ("map": one learned probe attends over the tokens, then an MLP).

Both load Hugging Face weights one-to-one (`mlx_med.vision.hf`), which is how the
parity tests check them. Images are NHWC, already normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.layers import cpu_dense_dot_general, logical_init
from mlx_med.vision.common import (
  ACTIVATIONS,
  MLP,
  Encoder,
  LayerNorm,
  MultiHeadAttention,
  VisionOutput,
  as_dtype,
)

_STYLES = ("clip", "siglip")
_POOLS = ("cls", "map", "gap")


def _fields_from_mapping(cls, values: dict, what: str) -> dict:
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{what} config has unknown keys {unknown}; known: {sorted(known)}")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture and numerics of one ViT. Hashable (a static jit argument).

  pool: "cls" (class token; clip style only), "map" (attention pooling head) or
  "gap" (mean of the patch tokens); empty = the style's default (clip: cls, siglip: map).
  remat: rematerialise each block in the backward pass (memory for compute).
  """

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  style: str = "clip"
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pool: str = ""
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.style not in _STYLES:
      raise ValueError(f"ViT style {self.style!r} is not one of {_STYLES}")
    if not self.pool:
      object.__setattr__(self, "pool", "cls" if self.style == "clip" else "map")
    if self.pool not in _POOLS:
      raise ValueError(f"ViT pool {self.pool!r} is not one of {_POOLS}")
    if self.pool == "cls" and self.style != "clip":
      raise ValueError("ViT pool 'cls' needs style 'clip' (siglip-style ViTs have no class token); use 'map' or 'gap'")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"ViT act {self.act!r} is not one of {sorted(ACTIVATIONS)}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid ** 2 + (1 if self.style == "clip" else 0)

  @classmethod
  def from_config(cls, cfg) -> ViTConfig:
    """From an ml_collections ConfigDict / mapping with the same field names (unknown keys are an error)."""
    return cls(**_fields_from_mapping(cls, dict(cfg), "ViT"))

  def num_params(self) -> int:
    d, p = self.width, self.patch_size
    block = 4 * d * d + 4 * d + 2 * d * self.mlp_dim + self.mlp_dim + d + 4 * d
    total = self.depth * block + p * p * 3 * d + self.num_tokens * d
    if self.style == "clip":
      total += d + 2 * d + 2 * d  # class token, pre and post norm
    else:
      total += d + 2 * d  # patch bias, post norm
    if self.pool == "map":
      total += d + (4 * d * d + 4 * d) + 2 * d + (2 * d * self.mlp_dim + self.mlp_dim + d)
    return total


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends over the tokens, then LN + MLP residual."""

  num_heads: int
  mlp_dim: int
  act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, _, d = tokens.shape
    probe = self.param("probe", logical_init(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d), self.param_dtype)
    x = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
    x = MultiHeadAttention(self.num_heads, self.dtype, self.param_dtype, self.rules, name="attn")(x, tokens)
    h = LayerNorm(self.layer_norm_eps, self.dtype, self.param_dtype, "ln")(x)
    x = x + MLP(self.mlp_dim, self.act, self.dtype, self.param_dtype, self.rules, name="mlp")(h)
    return x[:, 0]


class ViT(nn.Module):
  """images [B, H, W, 3] (normalised, H = W = image_size) -> VisionOutput."""

  cfg: ViTConfig
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> VisionOutput:
    del train  # no dropout or stochastic depth in this encoder
    cfg = self.cfg
    dtype, pdtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"ViT expects images [B, {cfg.image_size}, {cfg.image_size}, 3] (NHWC); got {images.shape}")
    b, p, g = images.shape[0], cfg.patch_size, cfg.grid
    # Patchify, then one dense layer over (p, p, 3): the same map as a stride-p convolution
    # (kernel in HWIO layout), with the project's CPU-friendly dense backward pass.
    x = images.astype(dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = nn.DenseGeneral(
        cfg.width, axis=(-3, -2, -1), use_bias=cfg.style == "siglip", dtype=dtype, param_dtype=pdtype,
        kernel_init=logical_init(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=logical_init(nn.initializers.zeros, ("embed",)), dot_general=cpu_dense_dot_general,
        name="patch_embed")(x)
    x = x.reshape(b, g * g, cfg.width)
    if cfg.style == "clip":
      cls = self.param("cls_token", logical_init(nn.initializers.normal(0.02), ("embed",)), (cfg.width,), pdtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, cfg.width)), x], axis=1)
    pos = self.param("pos_embedding", logical_init(nn.initializers.normal(0.02), (None, "embed")),
                     (cfg.num_tokens, cfg.width), pdtype)
    x = x + pos.astype(dtype)[None]
    x = sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))
    if cfg.style == "clip":
      x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, "pre_norm")(x)
    x = Encoder(cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.act, cfg.layer_norm_eps, dtype, pdtype, cfg.remat,
                self.rules, name="encoder")(x)
    if cfg.style == "siglip":
      x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, "post_norm")(x)
    patches = x[:, 1:] if cfg.style == "clip" else x
    if cfg.pool == "cls":
      pooled = x[:, 0]
    elif cfg.pool == "gap":
      pooled = jnp.mean(patches.astype(jnp.float32), axis=1).astype(dtype)
    else:
      pooled = MAPHead(cfg.num_heads, cfg.mlp_dim, cfg.act, cfg.layer_norm_eps, dtype, pdtype, self.rules,
                       name="map_head")(x)
    if cfg.style == "clip":
      pooled = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, "post_norm")(pooled)
    return VisionOutput(pooled=pooled, tokens=x, feature_maps=(patches.reshape(b, g, g, cfg.width),))
