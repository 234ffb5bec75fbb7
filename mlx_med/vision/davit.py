"""DaViT: the dual-attention vision transformer (MedImageInsight's image tower).

Each stage alternates two blocks on an NHWC feature map:

* a *spatial* block: multi-head self-attention inside non-overlapping windows
  (the map is zero-padded on the right/bottom to whole windows after the norm, and
  cropped back), linear in the number of pixels;
* a *channel* block: attention between channels instead of tokens, in groups
  ("heads"); the attention matrix is [head_dim, head_dim] per group and every token
  contributes to it, so each block sees the whole image at linear cost.

Both blocks wrap their attention and MLP in residuals preceded by a depthwise 3x3
convolution residual (ConvPosEnc), the only positional signal, which is what makes
the network input-size agnostic. A convolutional stem (7x7, stride 4, conv then
norm) opens stage 0; each later stage opens with norm then a strided conv
(downsample). The image embedding is the global average of the last map followed
by a LayerNorm (pool then norm, as timm's head and Florence's encoder do).

Two channel-attention variants exist and both are kept:
* "v1" (timm's `davit_tiny`/`small`/`base`, the original DaViT code): keys scaled by
  head_dim**-0.5, softmax(k^T v) applied to the queries;
* "v2" (Florence / Florence-2 / MedImageInsight): queries scaled by N**-0.5 (N = the
  number of tokens), softmax(q^T k) applied to the values.

Layout follows timm's `davit` so `convert_timm_state_dict` maps a timm (or Florence,
after timm's own key filter) state dict onto these parameters one to one. Parameters
carry logical axis names (`mlx_med.core.sharding.DEFAULT_RULES`); activations run in
`cfg.dtype` with softmax and norms' statistics in float32; `remat` recomputes each
block in the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.layers import cpu_dense_dot_general, logical_init
from mlx_med.vision.common import MLP, VisionOutput

Dtype = Any

_CHANNEL_ATTENTION = ("v1", "v2")
_PRESETS = ("medimageinsight", "tiny", "smoke")


def _as_dtype(name) -> Any:
  return jnp.dtype(name) if isinstance(name, str) else name


@dataclasses.dataclass(frozen=True)
class DaViTConfig:
  """Sizes of a DaViT. Sequences have one entry per stage.

  patch_sizes[0] / strides[0] are the stem's conv kernel and stride; later entries
  are the downsampling convs (odd kernels pad k//2 on every side, even kernels pad
  the right/bottom up to a multiple of the kernel, as timm does).
  image_size is the resolution the checkpoint was trained at (for preprocessing);
  the network itself takes any size.
  channel_attention: "v1" (timm's DaViT) or "v2" (Florence / MedImageInsight), see
  the module docstring.
  """

  dims: tuple[int, ...] = (96, 192, 384, 768)
  depths: tuple[int, ...] = (1, 1, 3, 1)
  heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  patch_sizes: tuple[int, ...] = (7, 2, 2, 2)
  strides: tuple[int, ...] = (4, 2, 2, 2)
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  image_size: int = 224
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  channel_attention: str = "v1"
  qkv_bias: bool = True
  in_channels: int = 3

  def __post_init__(self):
    for field in ("dims", "depths", "heads", "patch_sizes", "strides"):
      value = getattr(self, field)
      if isinstance(value, (list, np.ndarray)):
        object.__setattr__(self, field, tuple(int(v) for v in value))
    n = len(self.dims)
    lengths = {f: len(getattr(self, f)) for f in ("depths", "heads", "patch_sizes", "strides")}
    bad = {f: k for f, k in lengths.items() if k != n}
    if n == 0 or bad:
      raise ValueError(f"DaViTConfig: dims has {n} stages but {bad} differ; give one entry per stage in each")
    for i, (d, h) in enumerate(zip(self.dims, self.heads)):
      if h <= 0 or d % h:
        raise ValueError(f"DaViTConfig: stage {i} width {d} is not divisible by its {h} heads; "
                         "choose heads that divide dims")
    if self.channel_attention not in _CHANNEL_ATTENTION:
      raise ValueError(f"DaViTConfig: channel_attention={self.channel_attention!r}; choose one of {_CHANNEL_ATTENTION}")
    if self.window_size <= 0 or min(self.patch_sizes) <= 0 or min(self.strides) <= 0 or min(self.depths) < 0:
      raise ValueError("DaViTConfig: window_size, patch_sizes and strides must be positive, depths non-negative")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"DaViTConfig: drop_path_rate={self.drop_path_rate} must be in [0, 1)")

  @property
  def width(self) -> int:
    """Width of the pooled embedding (the last stage's dims)."""
    return self.dims[-1]

  def drop_path_rates(self) -> list[float]:
    """Stochastic-depth rate per stage: linear from 0 to drop_path_rate over all blocks, and
    constant inside a stage at its first block's value (timm's stage-wise rule)."""
    total = sum(self.depths)
    rates = np.linspace(0.0, self.drop_path_rate, total) if total else np.zeros(0)
    out, start = [], 0
    for d in self.depths:
      out.append([float(r) for r in rates[start:start + d]])
      start += d
    return out

  def num_params(self) -> int:
    return num_params(self)

  @classmethod
  def from_config(cls, cfg) -> DaViTConfig:
    """From an ml_collections ConfigDict / mapping of field names; an optional `preset`
    ("medimageinsight" | "tiny" | "smoke") starts from that preset and the other keys
    override it. Unknown keys are an error."""
    values = dict(cfg)
    preset = values.pop("preset", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"DaViT config has unknown keys {unknown}; known: {sorted(known | {'preset'})}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if preset is None:
      return cls(**values)
    if preset not in _PRESETS:
      raise ValueError(f"DaViT config preset {preset!r} is not one of {_PRESETS}")
    return getattr(cls, preset)(**values)

  @classmethod
  def medimageinsight(cls, **overrides) -> DaViTConfig:
    """MedImageInsight's image tower (Florence's DaViT, ~360M parameters at 480 px)."""
    base = {"dims": (256, 512, 1024, 2048), "depths": (1, 1, 9, 1), "heads": (8, 16, 32, 64), "window_size": 12,
            "patch_sizes": (7, 3, 3, 3), "strides": (4, 2, 2, 2), "image_size": 480, "channel_attention": "v2",
            "drop_path_rate": 0.1}
    return cls(**{**base, **overrides})

  @classmethod
  def tiny(cls, **overrides) -> DaViTConfig:
    """timm's `davit_tiny` (28M parameters, 224 px)."""
    base = {"dims": (96, 192, 384, 768), "depths": (1, 1, 3, 1), "heads": (3, 6, 12, 24), "window_size": 7,
            "patch_sizes": (7, 2, 2, 2), "strides": (4, 2, 2, 2), "image_size": 224, "channel_attention": "v1"}
    return cls(**{**base, **overrides})

  @classmethod
  def smoke(cls, **overrides) -> DaViTConfig:
    """A MedImageInsight-shaped tower of about 1M parameters for CPU tests and demos (64 px)."""
    base = {"dims": (32, 64, 96, 128), "depths": (1, 1, 1, 1), "heads": (2, 2, 4, 4), "window_size": 4,
            "patch_sizes": (7, 3, 3, 3), "strides": (4, 2, 2, 2), "image_size": 64, "channel_attention": "v2"}
    return cls(**{**base, **overrides})


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


def _layer_norm(eps: float, dtype, pdtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=pdtype,
                      scale_init=logical_init(nn.initializers.ones, ("norm",)),
                      bias_init=logical_init(nn.initializers.zeros, ("norm",)), name=name)


_DENSE_INIT = nn.initializers.truncated_normal(0.02)  # timm's Linear init
_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch Conv2d default scale


def _dense(features, axes_in: tuple, axes_out: tuple, dtype, pdtype, name: str, axis=-1, use_bias=True):
  return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=pdtype,
                         kernel_init=logical_init(_DENSE_INIT, axes_in + axes_out),
                         bias_init=logical_init(nn.initializers.zeros, axes_out),
                         dot_general=cpu_dense_dot_general, name=name)


def _drop_path(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """Stochastic depth: zero a whole example's residual branch with probability `rate`,
  scaling the kept ones by 1/(1-rate). Active only when training with rate > 0."""
  if deterministic or rate == 0.0:
    return x
  if not module.has_rng("dropout"):
    raise ValueError("DaViT(train=True) with drop_path_rate > 0 needs a dropout key: "
                     "apply(..., train=True, rngs={'dropout': key}) (or set drop_path_rate=0)")
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)


class ConvPosEnc(nn.Module):
  """x + depthwise_conv3x3(x): the blocks' positional encoding (NHWC)."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x + DepthwiseConv3x3(self.dtype, self.param_dtype, name="proj")(x)


class DepthwiseConv3x3(nn.Module):
  """A depthwise 3x3 convolution (padding 1, bias) written as nine shifted multiply-adds.

  Parameters as `nn.Conv(c, (3, 3), feature_group_count=c)` (kernel [3, 3, 1, C], bias [C]), so
  checkpoints and the timm conversion are unchanged. Not `lax.conv` with feature groups: under a
  batch-sharded mesh XLA's SPMD partitioner computed that convolution's kernel gradient wrongly
  (about 100% relative error on 8 CPU devices, data x fsdp x tensor = 2 x 2 x 2), while these
  elementwise products partition like any other elementwise op.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param("kernel", logical_init(_CONV_INIT, (None, None, None, "embed")), (3, 3, 1, c),
                        self.param_dtype)
    bias = self.param("bias", logical_init(nn.initializers.zeros, ("embed",)), (c,), self.param_dtype)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = bias.astype(self.dtype)
    for i in range(3):
      for j in range(3):
        out = out + padded[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
    return out


def _qkv(x: jax.Array, heads: int, bias: bool, dtype, pdtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[..., N, C] -> q, k, v [..., N, heads, C/heads] (timm's (3, heads, head_dim) output order)."""
  c = x.shape[-1]
  qkv = _dense((3, heads, c // heads), ("embed",), (None, "heads", "head_dim"), dtype, pdtype, "qkv",
               use_bias=bias)(x)
  return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def _softmax32(logits: jax.Array, dtype) -> jax.Array:
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside each window: [windows, N, C] -> same."""

  heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    q, k, v = _qkv(x, self.heads, self.qkv_bias, self.dtype, self.param_dtype)
    q = q * jnp.asarray((c // self.heads) ** -0.5, q.dtype)
    attn = _softmax32(jnp.einsum("bqhd,bkhd->bhqk", q, k), v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
    return _dense(c, ("heads", "head_dim"), ("embed",), self.dtype, self.param_dtype, "proj", axis=(-2, -1))(out)


class ChannelAttention(nn.Module):
  """Group-wise attention between channels: [B, N, C] -> same (see the module docstring)."""

  heads: int
  variant: str = "v1"
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, c = x.shape[-2], x.shape[-1]
    q, k, v = _qkv(x, self.heads, self.qkv_bias, self.dtype, self.param_dtype)  # [B, N, G, D]
    if self.variant == "v1":
      k = k * jnp.asarray((c // self.heads) ** -0.5, k.dtype)
      attn = _softmax32(jnp.einsum("bngi,bngj->bgij", k, v), q.dtype)
      out = jnp.einsum("bgij,bngj->bngi", attn, q)
    else:
      q = q * jnp.asarray(n ** -0.5, q.dtype)
      attn = _softmax32(jnp.einsum("bngi,bngj->bgij", q, k), v.dtype)
      out = jnp.einsum("bgij,bngj->bngi", attn, v)
    return _dense(c, ("heads", "head_dim"), ("embed",), self.dtype, self.param_dtype, "proj", axis=(-2, -1))(out)


def _pad_hw(x: jax.Array, pad_b: int, pad_r: int) -> jax.Array:
  if pad_b == 0 and pad_r == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))


class _DualBlock(nn.Module):
  """cpe -> attention residual -> cpe -> MLP residual, on [B, H, W, C]; subclasses give the attention."""

  cfg: DaViTConfig
  heads: int
  drop_path: float = 0.0
  deterministic: bool = True
  rules: sharding_lib.ShardingRules | None = None

  def attend(self, y: jax.Array, dtype, pdtype) -> jax.Array:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype, pdtype = _as_dtype(cfg.dtype), _as_dtype(cfg.param_dtype)
    c = x.shape[-1]
    x = ConvPosEnc(dtype, pdtype, name="cpe1")(x)
    y = self.attend(_layer_norm(cfg.layer_norm_eps, dtype, pdtype, "norm1")(x), dtype, pdtype)
    x = x + _drop_path(self, y, self.drop_path, self.deterministic)
    x = ConvPosEnc(dtype, pdtype, name="cpe2")(x)
    y = _layer_norm(cfg.layer_norm_eps, dtype, pdtype, "norm2")(x)
    y = MLP(int(c * cfg.mlp_ratio), "gelu", dtype, pdtype, self.rules, name="mlp")(y)
    x = x + _drop_path(self, y, self.drop_path, self.deterministic)
    return sharding_lib.constrain(self.rules, x, ("batch", None, None, "act_embed"))


class SpatialBlock(_DualBlock):
  """The dual block with window attention."""

  def attend(self, y: jax.Array, dtype, pdtype) -> jax.Array:
    b, h, w, c = y.shape
    ws = self.cfg.window_size
    # Zero-pad the *normed* map to whole windows (as timm does), attend, crop.
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    y = _pad_hw(y, pad_b, pad_r)
    hp, wp = h + pad_b, w + pad_r
    y = y.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    y = WindowAttention(self.heads, self.cfg.qkv_bias, dtype, pdtype, name="attn")(y)
    y = y.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return y[:, :h, :w, :]


class ChannelBlock(_DualBlock):
  """The dual block with channel group attention."""

  def attend(self, y: jax.Array, dtype, pdtype) -> jax.Array:
    b, h, w, c = y.shape
    y = ChannelAttention(self.heads, self.cfg.channel_attention, self.cfg.qkv_bias, dtype, pdtype,
                         name="attn")(y.reshape(b, h * w, c))
    return y.reshape(b, h, w, c)


class Stem(nn.Module):
  """Patch embedding: pad right/bottom to a multiple of the stride, conv (k, stride, k//2), norm."""

  cfg: DaViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype, pdtype = _as_dtype(cfg.dtype), _as_dtype(cfg.param_dtype)
    k, s = cfg.patch_sizes[0], cfg.strides[0]
    h, w = x.shape[1], x.shape[2]
    p = k // 2
    pad = ((p, p + (s - h % s) % s), (p, p + (s - w % s) % s))
    x = nn.Conv(cfg.dims[0], (k, k), strides=(s, s), padding=pad, dtype=dtype, param_dtype=pdtype,
                kernel_init=logical_init(_CONV_INIT, (None, None, None, "embed")),
                bias_init=logical_init(nn.initializers.zeros, ("embed",)), name="conv")(x)
    return _layer_norm(cfg.layer_norm_eps, dtype, pdtype, "norm")(x)


class Downsample(nn.Module):
  """norm, then a strided conv to the next stage's width (odd k: pad k//2; even k: pad to a multiple of k)."""

  cfg: DaViTConfig
  stage: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype, pdtype = _as_dtype(cfg.dtype), _as_dtype(cfg.param_dtype)
    k, s = cfg.patch_sizes[self.stage], cfg.strides[self.stage]
    x = _layer_norm(cfg.layer_norm_eps, dtype, pdtype, "norm")(x)
    h, w = x.shape[1], x.shape[2]
    if k % 2 == 0:
      pad = ((0, (k - h % k) % k), (0, (k - w % k) % k))
    else:
      pad = ((k // 2, k // 2), (k // 2, k // 2))
    return nn.Conv(cfg.dims[self.stage], (k, k), strides=(s, s), padding=pad, dtype=dtype, param_dtype=pdtype,
                   kernel_init=logical_init(_CONV_INIT, (None, None, None, "embed")),
                   bias_init=logical_init(nn.initializers.zeros, ("embed",)), name="conv")(x)


class DaViT(nn.Module):
  """images [B, H, W, C] (normalised, NHWC) -> VisionOutput.

  pooled [B, D] (float32): LayerNorm of the global average of the last stage (timm's
  pre-logits); tokens [B, h*w, D]: the last stage's map, flattened row-major;
  feature_maps: the output of every stage, [B, h_i, w_i, dims[i]].
  train=True turns on stochastic depth (needs rngs={"dropout": key} when
  drop_path_rate > 0).
  """

  cfg: DaViTConfig
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> VisionOutput:
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"DaViT expects NHWC images [batch, height, width, {cfg.in_channels}], got shape "
                       f"{tuple(images.shape)}; transpose NCHW input with x.transpose(0, 2, 3, 1)")
    dtype = _as_dtype(cfg.dtype)
    x = images.astype(dtype)
    x = sharding_lib.constrain(self.rules, x, ("batch", None, None, None))
    x = Stem(cfg, name="stem")(x)
    spatial_cls, channel_cls = SpatialBlock, ChannelBlock
    if cfg.remat:
      spatial_cls = nn.remat(SpatialBlock, prevent_cse=False)
      channel_cls = nn.remat(ChannelBlock, prevent_cse=False)
    rates = cfg.drop_path_rates()
    maps = []
    for i, depth in enumerate(cfg.depths):
      if i > 0:
        x = Downsample(cfg, i, name=f"stages_{i}_downsample")(x)
      for j in range(depth):
        common = {"cfg": cfg, "heads": cfg.heads[i], "drop_path": rates[i][j], "deterministic": not train,
                  "rules": self.rules}
        x = spatial_cls(**common, name=f"stages_{i}_blocks_{j}_spatial")(x)
        x = channel_cls(**common, name=f"stages_{i}_blocks_{j}_channel")(x)
      maps.append(x)
    b, h, w, c = x.shape
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    pooled = _layer_norm(cfg.layer_norm_eps, jnp.float32, _as_dtype(cfg.param_dtype), "head_norm")(pooled)
    return VisionOutput(pooled=pooled, tokens=x.reshape(b, h * w, c), feature_maps=tuple(maps))


# ----------------------------------------------------------------------------
# timm checkpoints
# ----------------------------------------------------------------------------


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, without importing torch here
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def convert_timm_state_dict(state_dict: Mapping[str, Any], cfg: DaViTConfig | None = None) -> dict:
  """timm `DaVit` state dict (torch tensors or arrays) -> this module's (unboxed) params.

  Accepts timm's key layout with or without `named_blocks` (`blocks.J.0` or
  `blocks.J.spatial_block`). The classifier (`head.fc.*`) is dropped (DaViT here ends
  at the pooled embedding). For an original Microsoft / Florence checkpoint, pass it
  through `timm.models.davit.checkpoint_filter_fn(state_dict, None)` first. When
  `cfg` is given, every parameter's shape is checked against it and the heads are
  taken from it; without it, each stage has width // 32 heads (true of every published
  DaViT: timm's tiny..giant, Florence-2, MedImageInsight).
  Raises ValueError naming the first key that is not understood.
  """
  params: dict = {}

  def put(path: tuple[str, ...], value: np.ndarray):
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    if path[-1] in node:
      raise ValueError(f"convert_timm_state_dict: two keys map to {'/'.join(path)}")
    node[path[-1]] = value

  def linear(path, leaf, w, shape_in=None, shape_out=None):
    # torch Linear weight [out, in] -> kernel [in..., out...]
    if leaf == "weight":
      k = w.T
      in_shape = shape_in or (k.shape[0],)
      out_shape = shape_out or (k.shape[1],)
      put(path + ("kernel",), k.reshape(in_shape + out_shape))
    else:
      put(path + ("bias",), w.reshape(shape_out or w.shape))

  def conv(path, leaf, w):
    put(path + ("kernel" if leaf == "weight" else "bias",), w.transpose(2, 3, 1, 0) if leaf == "weight" else w)

  def norm(path, leaf, w):
    put(path + ("scale" if leaf == "weight" else "bias",), w)

  block_re = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(0|1|spatial_block|channel_block)\.(.+)\.(weight|bias)$")
  for key, value in state_dict.items():
    if key.startswith("head.fc.") or key.endswith("num_batches_tracked"):
      continue
    w = _to_numpy(value)
    if key.startswith("stem."):
      part, leaf = key.split(".")[1:]
      (conv if part == "conv" else norm)(("stem", part), leaf, w)
      continue
    if key.startswith("head.norm."):
      norm(("head_norm",), key.rsplit(".", 1)[1], w)
      continue
    m = re.match(r"^stages\.(\d+)\.downsample\.(conv|norm)\.(weight|bias)$", key)
    if m:
      stage, part, leaf = m.groups()
      (conv if part == "conv" else norm)((f"stages_{stage}_downsample", part), leaf, w)
      continue
    m = block_re.match(key)
    if not m:
      raise ValueError(f"convert_timm_state_dict: unexpected key {key!r}; is this a timm DaViT state dict?")
    stage, blk, kind, inner, leaf = m.groups()
    kind = "spatial" if kind in ("0", "spatial_block") else "channel"
    root = (f"stages_{stage}_blocks_{blk}_{kind}",)
    if inner in ("cpe1.proj", "cpe2.proj"):
      conv(root + (inner.split(".")[0], "proj"), leaf, w)
    elif inner in ("norm1", "norm2"):
      norm(root + (inner,), leaf, w)
    elif inner in ("mlp.fc1", "mlp.fc2"):
      linear(root + ("mlp", inner.split(".")[1]), leaf, w)
    elif inner == "attn.qkv":
      c = w.shape[-1] if leaf == "weight" else w.shape[0] // 3
      heads = _heads_for(cfg, int(stage), c, key)
      linear(root + ("attn", "qkv"), leaf, w, (c,), (3, heads, c // heads))
    elif inner == "attn.proj":
      c = w.shape[0]
      heads = _heads_for(cfg, int(stage), c, key)
      linear(root + ("attn", "proj"), leaf, w, (heads, c // heads), (c,))
    else:
      raise ValueError(f"convert_timm_state_dict: unexpected key {key!r}; is this a timm DaViT state dict?")
  if cfg is not None:
    _check_shapes(params, cfg)
  return params


def _heads_for(cfg: DaViTConfig | None, stage: int, width: int, key: str) -> int:
  if cfg is None:  # every published DaViT (timm, Florence, MedImageInsight) has 32 channels per head
    if width % 32:
      raise ValueError(f"convert_timm_state_dict: {key!r} has width {width}, not a multiple of 32 channels per "
                       "head; pass cfg= (the checkpoint's DaViTConfig) to say how many heads it has")
    return width // 32
  if stage >= len(cfg.heads) or cfg.dims[stage] != width:
    raise ValueError(f"convert_timm_state_dict: {key!r} has width {width} but the config's stage {stage} has "
                     f"dims {cfg.dims[stage] if stage < len(cfg.dims) else 'none'}; use the checkpoint's config")
  return cfg.heads[stage]


def _check_shapes(params: dict, cfg: DaViTConfig) -> None:
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      DaViT(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, cfg.in_channels))))["params"])
  want = {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(shapes)}
  got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"convert_timm_state_dict: checkpoint and config differ: missing {missing[:3]}, "
                     f"unexpected {extra[:3]}; check depths/dims against the checkpoint")
  for k, s in want.items():
    if tuple(got[k]) != tuple(s):
      raise ValueError(f"convert_timm_state_dict: {k} has shape {tuple(got[k])}, the config expects {tuple(s)}")


def num_params(cfg: DaViTConfig) -> int:
  """Parameter count of a DaViT built from `cfg` (shape evaluation only; nothing is allocated)."""
  shapes = jax.eval_shape(lambda: DaViT(cfg).init(jax.random.key(0), jnp.zeros((1, 64, 64, cfg.in_channels))))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"]))))


__all__ = ["DaViT", "DaViTConfig", "VisionOutput", "convert_timm_state_dict", "num_params"]
