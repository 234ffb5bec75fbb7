"""Building blocks of the decoder: RMSNorm, rotary embeddings, a gated MLP.

Parameters carry logical axis names (flax `with_logical_partitioning`), which
`mlx_med.core.sharding` maps onto the mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sharding as sharding_lib

Dtype = Any


def logical_init(init_fn, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init_fn, tuple(axes))


# ----------------------------------------------------------------------------
# Dense-layer matmul with a CPU-friendly backward pass.
#
# Why: the weight gradient of y = x @ W is x^T @ dy, a contraction over the
# *major* (token) axis of both operands. XLA:CPU's fast matmul path (YNNPACK)
# only takes a left operand whose contracted axis is minor, so autodiff's
# dot_general falls back to the slower Eigen path and layout assignment inserts
# transposed copies of [tokens, features] activations, often fused into
# elementwise producers (e.g. the SwiGLU gradient) that then write with a large
# stride. That was a quarter of the decoder's CPU train step. Here the smaller
# of x and dy is transposed explicitly and pinned with an optimization barrier
# (so XLA cannot fold it back into the dot), and the matmul runs in the fast
# path. Same math; only the summation order of the weight gradient can differ.
# Used only when tracing for CPU; GPU/TPU matmuls take transposes for free.
# ----------------------------------------------------------------------------


def _dense_dims(lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> int | None:
  """Number of contracted axes if this is a plain dense layer, else None.

  Plain: no batch dims, lhs contracts its trailing axes, rhs its leading axes.
  """
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  n = len(lhs_c)
  if lhs_b or rhs_b or n == 0 or len(rhs_c) != n:
    return None
  if tuple(int(a) % lhs_ndim for a in lhs_c) != tuple(range(lhs_ndim - n, lhs_ndim)):
    return None
  if tuple(int(a) % rhs_ndim for a in rhs_c) != tuple(range(n)):
    return None
  return n


def _matmul_2d(x2: jax.Array, w2: jax.Array, precision) -> jax.Array:
  return jax.lax.dot_general(x2, w2, (((1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_matmul(x2: jax.Array, w2: jax.Array, precision=None) -> jax.Array:
  """[N, K] @ [K, F] with the backward pass described above."""
  return _matmul_2d(x2, w2, precision)


def _dense_matmul_fwd(x2, w2, precision):
  return _matmul_2d(x2, w2, precision), (x2, w2)


def _dense_matmul_bwd(precision, residuals, dy):
  x2, w2 = residuals
  dy = dy.astype(x2.dtype) if dy.dtype != x2.dtype else dy
  dx = jax.lax.dot_general(dy, w2, (((1,), (1,)), ((), ())), precision=precision)  # dy @ W^T
  if x2.shape[1] <= dy.shape[1]:
    # dW = x^T @ dy with x^T (the smaller operand) materialised row-major.
    x_t = jax.lax.optimization_barrier(x2.T)
    dw = jax.lax.dot_general(x_t, dy, (((1,), (0,)), ((), ())), precision=precision)
  else:
    # dW^T = dy^T @ x, then a transpose of the (weight-sized) result.
    dy_t = jax.lax.optimization_barrier(dy.T)
    dw = jax.lax.dot_general(dy_t, x2, (((1,), (0,)), ((), ())), precision=precision).T
  return dx.astype(x2.dtype), dw.astype(w2.dtype)


_dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


def cpu_dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                          preferred_element_type=None, **kwargs) -> jax.Array:
  """Drop-in `dot_general` for `nn.DenseGeneral` (see the notes above).

  Falls back to `lax.dot_general` for anything but a plain dense layer traced
  for CPU, and whenever an output dtype is requested.
  """
  n = _dense_dims(lhs.ndim, rhs.ndim, dimension_numbers)
  if n is None or preferred_element_type is not None or kwargs or jax.default_backend() != "cpu":
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  k = math.prod(lhs.shape[lhs.ndim - n:])
  out_shape = lhs.shape[:lhs.ndim - n] + rhs.shape[n:]
  y = _dense_matmul(lhs.reshape(-1, k), rhs.reshape(k, -1), precision)
  return y.reshape(out_shape)


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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               sections: Sequence[int] | None = None) -> jax.Array:
  """Rotates [batch, length, heads, head_dim] by positions [batch, length] (half-split layout).

  Multimodal rotary (Qwen2-VL's M-RoPE): with `sections` = (s_t, s_h, s_w), summing to
  head_dim / 2, positions are [batch, length, 3] (temporal, height, width) and the first
  s_t frequencies rotate by the temporal position, the next s_h by the height position,
  the last s_w by the width position. Text tokens carry three equal positions, which
  reduces to ordinary rotary.
  """
  if sections is None:
    if positions.ndim != 2:
      raise ValueError(f"rotary positions must be [batch, length], got shape {positions.shape}")
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  else:
    if positions.ndim != 3 or positions.shape[-1] != len(sections):
      raise ValueError(f"multimodal rotary positions must be [batch, length, {len(sections)}], got {positions.shape}")
    if sum(sections) != inv_freq.shape[0]:
      raise ValueError(f"rotary sections {tuple(sections)} sum to {sum(sections)}, not head_dim/2 = {inv_freq.shape[0]}")
    component = np.repeat(np.arange(len(sections)), sections)  # which position each frequency reads
    angles = positions.astype(jnp.float32)[..., component] * inv_freq  # [B, T, D/2]
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
        kernel_init=logical_init(self.kernel_init, axes), dot_general=cpu_dense_dot_general, name=n)
    gate = dense("gate_proj", self.hidden_dim, ("embed", "mlp"))(x)
    up = dense("up_proj", self.hidden_dim, ("embed", "mlp"))(x)
    h = nn.silu(gate) * up
    h = sharding_lib.constrain(self.rules, h, ("batch", "length", "act_mlp"))
    return dense("down_proj", d_model, ("mlp", "embed"))(h)
