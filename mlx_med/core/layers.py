"""Building blocks of the decoder: RMSNorm, rotary embeddings, a gated MLP.

Parameters carry logical axis names (flax `with_logical_partitioning`), which
`mlx_med.core.sharding` maps onto the mesh.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlx_med.core import sharding as sharding_lib

Dtype = Any


def logical_init(init_fn, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init_fn, tuple(axes))


class RMSNorm(nn.Module):
  """Root-mean-square norm in fp32, scaled by a learned weight (Llama/Qwen form)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("scale", logical_init(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Cast back before scaling, as the HF Llama/Qwen implementations do.
    return weight.astype(self.dtype) * normed.astype(self.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
  """Inverse frequencies for rotary embeddings, with optional Llama-3 / linear scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return inv_freq / float(scaling["factor"])
  if kind == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original / low
    high_freq_wavelen = original / high
    # Long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (Llama 3.1 context extension).
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)
  raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates [batch, length, heads, head_dim] by positions [batch, length] (half-split layout)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class GatedMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  rules: sharding_lib.ShardingRules | None = None
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    dense = lambda n, feats, axes: nn.DenseGeneral(
        feats, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=logical_init(self.kernel_init, axes), name=n)
    gate = dense("gate_proj", self.hidden_dim, ("embed", "mlp"))(x)
    up = dense("up_proj", self.hidden_dim, ("embed", "mlp"))(x)
    h = nn.silu(gate) * up
    h = sharding_lib.constrain(self.rules, h, ("batch", "length", "act_mlp"))
    return dense("down_proj", d_model, ("mlp", "embed"))(h)
