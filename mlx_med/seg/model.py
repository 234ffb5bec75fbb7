"""BoltzFormer: text-prompted segmentation with Boltzmann-sampled masked attention.

The model follows the public BoltzFormer release (a Mask2Former / SEEM-style decoder):

* **Image encoder** from `mlx_med.vision.build_image_encoder`: DaViT gives four stage maps
  (1/4 .. 1/32 of the input); a ViT gives one map at its patch stride, from which a
  ViTDet-style simple feature pyramid makes the four (stride-2 deconvolutions up, identity,
  max-pool down).
* **Pixel decoder** (SEEM's "transformer_encoder_fpn"): a 1x1 projection and a
  `pixel_decoder_layers`-layer post-norm transformer encoder (2D sine positions) on the 1/32
  map, then an FPN top-down path (lateral 1x1 conv + GroupNorm, nearest upsampling, 3x3
  conv + GroupNorm + ReLU) to 1/16, 1/8 and 1/4; `mask_features` is a 3x3 conv of the 1/4
  map. The decoder reads the levels [1/32, 1/16, 1/8].
* **Text prompt tower** from `mlx_med.vision.build_text_encoder`; its token states are
  projected to `hidden_dim` and join the queries in every self-attention (padding tokens
  are never attended to as keys).
* **Query decoder**: `dec_layers` post-norm layers; layer i = masked cross-attention to level
  i % 3 -> self-attention over [queries | text tokens] -> FFN. The cross-attention's keep
  mask comes from the previous prediction (`mlx_med.seg.sampling.keep_mask`: Boltzmann
  sampling with temperature base_temp / (2 + layer_id), Mask2Former's threshold, or no
  mask) and the attention itself from `mlx_med.seg.sampling.attend` (our kernel for
  `boltzmann`, the release's dense masked computation otherwise). The attention mode
  changes no parameter, so one checkpoint runs under every mode.
* **Mask head**: decoder_norm -> 3-layer MLP -> einsum with `mask_features` (1/4 res).
* **Output fusion** (the release's `convolute_outputs`): the query masks and the image go
  through a stride-2 transposed convolution and a 1x1 conv; the result is averaged with the
  upsampled mean of the query masks and resized to the input size.

Layout is NHWC; parameters carry logical axis names; activations run in `dtype`
(bf16-capable) with softmax, norms' statistics, mask logits and the loss in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.layers import cpu_dense_dot_general, logical_init
from mlx_med.core.transformer import as_dtype
from mlx_med.seg import sampling
from mlx_med.vision import build_image_encoder, build_text_encoder
from mlx_med.vision.encoders import image_encoder_config, text_encoder_config

Dtype = Any

__all__ = ["BoltzFormer", "BoltzFormerConfig", "SegOutput", "init_params", "resize_bilinear", "seg_loss",
           "sine_position_embedding", "text_key_mask"]

NUM_LEVELS = 3  # the decoder always reads three pixel-decoder levels (1/32, 1/16, 1/8)
_STRIDES = (4, 8, 16, 32)
_INHERITED = ("dtype", "param_dtype", "remat")  # top-level numerics the towers take unless they set their own


def _default_encoder() -> dict:
  return {"kind": "davit", "preset": "tiny"}


def _default_text() -> dict:
  # CLIP's text transformer as the release uses it: 12 layers, 512 wide, 8 heads, context 77.
  return {"vocab_size": 49408, "context_length": 77, "width": 512, "depth": 12, "num_heads": 8, "mlp_dim": 2048}


def _freeze(value: Any) -> Any:
  """Mappings -> FrozenDict and lists -> tuples, recursively (so the config stays hashable)."""
  if isinstance(value, Mapping) or hasattr(value, "to_dict"):
    items = value.to_dict() if hasattr(value, "to_dict") else value
    return FrozenDict({str(k): _freeze(v) for k, v in items.items()})
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value: Any) -> Any:
  """The inverse of `_freeze` for JSON: plain dicts and lists."""
  if isinstance(value, Mapping):
    return {k: _thaw(v) for k, v in value.items()}
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class BoltzFormerConfig:
  """Architecture, attention mode and numerics of one BoltzFormer. Hashable.

  encoder: vision encoder config with `kind` "davit" | "vit" (the other keys are the
    encoder dataclass's fields, e.g. DaViT's `preset`); `dtype`, `param_dtype` and `remat`
    default to this config's values, and a ViT's `image_size` to `image_size`.
  text: `mlx_med.vision.TextConfig` fields (set `vocab_size` from the tokenizer); numerics
    inherited as for the encoder.
  attention: one of `mlx_med.seg.sampling.ATTENTION_MODES`; `with_attention` swaps it
    without touching any parameter.
  kernel_backend: the sparse-attention backend for mode `boltzmann`.
  """

  image_size: int = 512
  encoder: Mapping = dataclasses.field(default_factory=_default_encoder)
  text: Mapping = dataclasses.field(default_factory=_default_text)
  hidden_dim: int = 512
  num_queries: int = 101
  num_heads: int = 8
  dec_layers: int = 9
  dim_feedforward: int = 2048
  mask_dim: int = 512
  pixel_decoder_layers: int = 6
  pixel_decoder_dim: int = 512
  pixel_decoder_heads: int = 8
  pixel_decoder_ffn: int = 2048
  attention: str = "boltzmann"
  sample_ratio: float = 0.1
  base_temp: float = 1.0
  mask_threshold: float = 0.5
  sampler: str = "bernoulli"
  kernel_backend: str = "auto"
  fusion: bool = True
  fusion_channels: int = 10
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "encoder", _freeze(self.encoder))
    object.__setattr__(self, "text", _freeze(self.text))
    if self.attention not in sampling.ATTENTION_MODES:
      raise ValueError(f"BoltzFormerConfig: attention={self.attention!r} is not one of {sampling.ATTENTION_MODES}")
    if self.sampler not in sampling.SAMPLERS:
      raise ValueError(f"BoltzFormerConfig: sampler={self.sampler!r} is not one of {sampling.SAMPLERS}")
    if self.image_size <= 0 or self.image_size % 32:
      raise ValueError(f"BoltzFormerConfig: image_size={self.image_size} must be a positive multiple of 32 "
                       "(the pixel decoder's coarsest level is 1/32)")
    for name, width, heads in (("hidden_dim", self.hidden_dim, self.num_heads),
                               ("pixel_decoder_dim", self.pixel_decoder_dim, self.pixel_decoder_heads)):
      if heads <= 0 or width % heads:
        raise ValueError(f"BoltzFormerConfig: {name}={width} is not divisible by its {heads} heads")
    if self.pixel_decoder_dim % 2 or self.hidden_dim % 2:
      raise ValueError("BoltzFormerConfig: hidden_dim and pixel_decoder_dim must be even (2D sine positions)")
    positive = ("num_queries", "dec_layers", "dim_feedforward", "mask_dim", "pixel_decoder_ffn", "fusion_channels")
    bad = [f for f in positive if getattr(self, f) <= 0]
    if bad or self.pixel_decoder_layers < 0:
      raise ValueError(f"BoltzFormerConfig: {bad or ['pixel_decoder_layers']} must be positive")
    if not 0.0 <= self.sample_ratio <= 1.0:
      raise ValueError(f"BoltzFormerConfig: sample_ratio={self.sample_ratio} must be in [0, 1]")
    if self.base_temp <= 0.0:
      raise ValueError(f"BoltzFormerConfig: base_temp={self.base_temp} must be positive")
    if not 0.0 < self.mask_threshold < 1.0:
      raise ValueError(f"BoltzFormerConfig: mask_threshold={self.mask_threshold} must be in (0, 1)")
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)
    kind = self.encoder.get("kind")
    if kind not in ("davit", "vit"):
      raise ValueError(f"BoltzFormerConfig: encoder kind {kind!r} is not one of ('davit', 'vit'); set encoder.kind")

  # -- the towers' configs, with the inherited numerics -------------------------------

  def encoder_config(self):
    """The image encoder's config dataclass (ViTConfig / DaViTConfig)."""
    values = _thaw(self.encoder)
    for key in _INHERITED:
      values.setdefault(key, getattr(self, key))
    values.setdefault("image_size", self.image_size)
    return image_encoder_config(values)

  def text_config(self):
    """The text tower's `TextConfig`."""
    values = _thaw(self.text)
    for key in _INHERITED:
      values.setdefault(key, getattr(self, key))
    return text_encoder_config(values)

  # -- serialisation ----------------------------------------------------------------

  def to_dict(self) -> dict:
    """Plain JSON-ready dict (what a run directory's model.json holds)."""
    return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: Mapping) -> BoltzFormerConfig:
    """From a mapping / ConfigDict of field names; unknown keys are an error."""
    values = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"BoltzFormer config has unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)

  def with_attention(self, mode: str) -> BoltzFormerConfig:
    """The same model under another attention mode (parameters are identical for every mode)."""
    return dataclasses.replace(self, attention=mode)


class SegOutput(NamedTuple):
  """What `BoltzFormer.__call__` returns.

  logits: [B, S, S] float32, the fused mask logits at the input size.
  layer_logits: one [B, Q, S/4, S/4] float32 mask-logit map per prediction (1 + dec_layers:
    the initial queries, then after each layer).
  kept: [B, dec_layers] float32, kept (head, query, key) triples per cross-attention layer.
  total: per layer, num_heads * num_queries * keys of the layer's level (the `full` count): python
    ints inside a traced function, int32 scalars once returned from `jax.jit`.
  keep_masks: per layer bool [B, heads, Q, keys] when asked for, else None.
  """

  logits: jax.Array
  layer_logits: tuple
  kept: jax.Array
  total: tuple
  keep_masks: tuple | None


# ----------------------------------------------------------------------------
# Small functional pieces
# ----------------------------------------------------------------------------


def resize_bilinear(x: jax.Array, size: tuple[int, int], *, channels_last: bool = True) -> jax.Array:
  """Bilinear resize of the two spatial axes with half-pixel centres and no antialiasing
  (torch's F.interpolate(mode="bilinear", align_corners=False), downsampling included)."""
  if channels_last:
    shape = x.shape[:-3] + tuple(size) + x.shape[-1:]
  else:
    shape = x.shape[:-2] + tuple(size)
  if shape == x.shape:
    return x
  return jax.image.resize(x, shape, method="bilinear", antialias=False)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch's F.interpolate(mode="nearest") on NHWC: source index floor(i * in / out)."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == tuple(size):
    return x
  if size[0] % h == 0 and size[1] % w == 0:  # whole factors (the FPN's 2x): a broadcast, no gather
    fh, fw = size[0] // h, size[1] // w
    y = jnp.broadcast_to(x[:, :, None, :, None, :], (x.shape[0], h, fh, w, fw, x.shape[-1]))
    return y.reshape(x.shape[0], size[0], size[1], x.shape[-1])
  rows = (jnp.arange(size[0]) * h) // size[0]
  cols = (jnp.arange(size[1]) * w) // size[1]
  return x[:, rows][:, :, cols]


def sine_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0) -> jax.Array:
  """DETR's normalised 2D sine embedding [h, w, dim]: dim/2 channels for y then dim/2 for x,
  each interleaving sin (even) and cos (odd) over frequencies temperature^(2 floor(j/2) / (dim/2))."""
  half = dim // 2
  eps, scale = 1e-6, 2 * math.pi
  y = jnp.arange(1, h + 1, dtype=jnp.float32) / (h + eps) * scale
  x = jnp.arange(1, w + 1, dtype=jnp.float32) / (w + eps) * scale
  j = jnp.arange(half, dtype=jnp.float32)
  dim_t = temperature ** (2 * jnp.floor(j / 2) / half)

  def encode(v):
    t = v[:, None] / dim_t  # [n, half]
    return jnp.stack([jnp.sin(t[:, 0::2]), jnp.cos(t[:, 1::2])], axis=-1).reshape(v.shape[0], -1)

  pos_y = jnp.broadcast_to(encode(y)[:, None, :], (h, w, half))
  pos_x = jnp.broadcast_to(encode(x)[None, :, :], (h, w, half))
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def text_key_mask(text_ids: jax.Array, pad_token_id: int, eos_token_id: int) -> jax.Array:
  """bool [B, L]: the prompt tokens that may be attended to (the tokenizer's attention mask).

  When the pad id is the end id (CLIP's and SigLIP's tokenizers pad with the end token),
  the tokens up to and including the first end token are real; otherwise every non-pad id.
  """
  if pad_token_id == eos_token_id:
    is_end = text_ids == eos_token_id
    first = jnp.where(jnp.any(is_end, axis=-1), jnp.argmax(is_end, axis=-1), text_ids.shape[-1] - 1)
    return jnp.arange(text_ids.shape[-1])[None, :] <= first[:, None]
  return text_ids != pad_token_id


def _dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v on BHLD with an fp32 softmax; key_mask bool [B, S] (True = attend)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

_XAVIER = nn.initializers.xavier_uniform()
_CONV_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # c2_xavier_fill: kaiming_uniform(a=1)


def _dense(features, axes: tuple, dtype, pdtype, name: str, *, axis=-1, use_bias=True, init=_XAVIER):
  return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=pdtype,
                         kernel_init=logical_init(init, axes),
                         bias_init=logical_init(nn.initializers.zeros, axes[-1:] if isinstance(features, int)
                                                else axes[-len(features):]),
                         dot_general=cpu_dense_dot_general, name=name)


def _layer_norm(dtype, pdtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=pdtype,
                      scale_init=logical_init(nn.initializers.ones, ("norm",)),
                      bias_init=logical_init(nn.initializers.zeros, ("norm",)), name=name)


def _group_norm(channels: int, dtype, pdtype, name: str) -> nn.GroupNorm:
  # detectron2's "GN" is 32 groups; narrower smoke models use the largest divisor of 32 that fits.
  return nn.GroupNorm(num_groups=math.gcd(32, channels), epsilon=1e-5, dtype=dtype, param_dtype=pdtype,
                      scale_init=logical_init(nn.initializers.ones, ("norm",)),
                      bias_init=logical_init(nn.initializers.zeros, ("norm",)), name=name)


def _conv(features: int, k: int, dtype, pdtype, name: str, *, use_bias=True) -> nn.Conv:
  p = k // 2
  return nn.Conv(features, (k, k), padding=((p, p), (p, p)), use_bias=use_bias, dtype=dtype, param_dtype=pdtype,
                 kernel_init=logical_init(_CONV_INIT, (None, None, "embed", "mlp")),
                 bias_init=logical_init(nn.initializers.zeros, ("mlp",)), name=name)


class Attention(nn.Module):
  """torch-MHA-style attention with separate query / key / value inputs (so positions can be
  added to q and k but not to v), heads split as [B, heads, L, head_dim].

  `attend_fn(q, k, v) -> [B, heads, T, head_dim]` does the attention itself, so the same
  parameters serve the dense self-attentions and the masked / sampled cross-attention.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x_q: jax.Array, x_k: jax.Array, x_v: jax.Array, attend_fn) -> jax.Array:
    d = x_q.shape[-1]
    hd = d // self.num_heads

    def proj(name, x):
      y = _dense((self.num_heads, hd), ("embed", "heads", "head_dim"), self.dtype, self.param_dtype, name)(x)
      y = sharding_lib.constrain(self.rules, y, ("batch", "length", "act_heads", None))
      return y.transpose(0, 2, 1, 3)  # BLHD -> BHLD

    q, k, v = proj("query", x_q), proj("key", x_k), proj("value", x_v)
    out = attend_fn(q, k, v).astype(self.dtype).transpose(0, 2, 1, 3)  # BHLD -> BLHD
    out = sharding_lib.constrain(self.rules, out, ("batch", "length", "act_heads", None))
    return _dense(d, ("heads", "head_dim", "embed"), self.dtype, self.param_dtype, "out", axis=(-2, -1))(out)


class FFN(nn.Module):
  """Linear -> ReLU -> Linear (the release's FFN / transformer-encoder MLP)."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = nn.relu(_dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(x))
    h = sharding_lib.constrain(self.rules, h, ("batch", "length", "act_mlp"))
    return _dense(d, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(h)


class PixelEncoderLayer(nn.Module):
  """Post-norm transformer encoder layer: x = LN(x + attn(q=k=x+pos, v=x)); x = LN(x + FFN(x))."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:
    qk = x + pos
    a = Attention(self.num_heads, self.dtype, self.param_dtype, self.rules, name="self_attn")(
        qk, qk, x, lambda q, k, v: _dense_attention(q, k, v, None))
    x = _layer_norm(self.dtype, self.param_dtype, "norm1")(x + a)
    x = _layer_norm(self.dtype, self.param_dtype, "norm2")(
        x + FFN(self.mlp_dim, self.dtype, self.param_dtype, self.rules, name="ffn")(x))
    return sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))


class SimpleFeaturePyramid(nn.Module):
  """ViTDet's simple pyramid: one [B, g, g, C] map at stride `patch_size` -> maps at 1/4 .. 1/32.

  Each factor of 2 up is a 2x2 stride-2 transposed conv (LayerNorm + GELU between two of
  them, the width halving each time); each factor of 2 down is a 2x2 max-pool.
  """

  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    maps = []
    for stride in _STRIDES:
      y, c = x, x.shape[-1]
      if stride < self.patch_size:
        ups = round(math.log2(self.patch_size // stride))
        for u in range(ups):
          if u:
            y = nn.gelu(_layer_norm(self.dtype, self.param_dtype, f"up{stride}_norm{u}")(y), approximate=False)
          c = max(c // 2, 1)
          y = nn.ConvTranspose(c, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               kernel_init=logical_init(_CONV_INIT, (None, None, "embed", "mlp")),
                               bias_init=logical_init(nn.initializers.zeros, ("mlp",)),
                               name=f"up{stride}_deconv{u}")(y)
      elif stride > self.patch_size:
        f = stride // self.patch_size
        y = nn.max_pool(y, (f, f), strides=(f, f), padding="VALID")
      maps.append(y)
    return maps


class PixelDecoder(nn.Module):
  """SEEM's transformer-encoder FPN: maps [1/4, 1/8, 1/16, 1/32] ->
  (mask_features [B, S/4, S/4, mask_dim], levels [1/32, 1/16, 1/8] each [B, h, w, dim])."""

  dim: int
  mask_dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, maps: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    dtype, pdtype = self.dtype, self.param_dtype
    top = maps[-1]
    b, h, w, _ = top.shape
    x = _conv(self.dim, 1, dtype, pdtype, "input_proj")(top)
    x = sharding_lib.constrain(self.rules, x, ("batch", None, None, "act_embed"))
    # Constrained on both sides of the reshape: with the batch and the conv's channels both sharded,
    # XLA's partitioner otherwise produced wrong values through the encoder layers (found with 8 fake
    # devices, data x fsdp x tensor = 2 x 2 x 2).
    x = sharding_lib.constrain(self.rules, x.reshape(b, h * w, self.dim), ("batch", "length", "act_embed"))
    pos = sine_position_embedding(h, w, self.dim).reshape(1, h * w, self.dim).astype(dtype)
    layer_cls = nn.remat(PixelEncoderLayer, prevent_cse=False) if self.remat else PixelEncoderLayer
    for i in range(self.num_layers):
      x = layer_cls(self.num_heads, self.mlp_dim, dtype, pdtype, self.rules, name=f"encoder_{i}")(x, pos)
    y = x.reshape(b, h, w, self.dim)
    y = nn.relu(_group_norm(self.dim, dtype, pdtype, "output_norm_3")(
        _conv(self.dim, 3, dtype, pdtype, "output_conv_3", use_bias=False)(y)))
    y = sharding_lib.constrain(self.rules, y, ("batch", None, None, "act_embed"))
    levels = [y]
    for idx in (2, 1, 0):  # 1/16, 1/8, 1/4
      f = maps[idx]
      lateral = _group_norm(self.dim, dtype, pdtype, f"lateral_norm_{idx}")(
          _conv(self.dim, 1, dtype, pdtype, f"lateral_conv_{idx}", use_bias=False)(f))
      lateral = sharding_lib.constrain(self.rules, lateral, ("batch", None, None, "act_embed"))
      y = lateral + resize_nearest(y, lateral.shape[1:3])
      y = nn.relu(_group_norm(self.dim, dtype, pdtype, f"output_norm_{idx}")(
          _conv(self.dim, 3, dtype, pdtype, f"output_conv_{idx}", use_bias=False)(y)))
      y = sharding_lib.constrain(self.rules, y, ("batch", None, None, "act_embed"))
      levels.append(y)
    mask_features = _conv(self.mask_dim, 3, dtype, pdtype, "mask_features")(y)
    return mask_features, levels[:NUM_LEVELS]


class DecoderLayer(nn.Module):
  """One query-decoder layer (post-norm): masked cross-attention to a pixel level ->
  self-attention over [queries | text tokens] -> FFN on the queries.

  queries [B, Q, D], query_pos [B, Q, D], memory / memory_pos [B, N, D] (keys = memory + pos,
  values = memory), keep bool [B, heads, Q, N] (None = attend everywhere), text [B, L, D],
  text_pos [B, L, D], text_valid bool [B, L]. Returns (queries, text).
  """

  num_heads: int
  mlp_dim: int
  mode: str
  kernel_backend: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, queries, query_pos, memory, memory_pos, keep, text, text_pos, text_valid):
    dtype, pdtype = self.dtype, self.param_dtype
    mode, backend = self.mode, self.kernel_backend

    def cross(q, k, v):
      return sampling.attend(q, k, v, keep, mode=mode, kernel_backend=backend)

    a = Attention(self.num_heads, dtype, pdtype, self.rules, name="cross_attn")(
        queries + query_pos, memory + memory_pos, memory, cross)
    queries = _layer_norm(dtype, pdtype, "cross_norm")(queries + a)

    q = queries.shape[1]
    both = jnp.concatenate([queries, text.astype(dtype)], axis=1)
    both_pos = jnp.concatenate([query_pos, text_pos.astype(dtype)], axis=1)
    key_mask = jnp.concatenate([jnp.ones(queries.shape[:2], jnp.bool_), text_valid], axis=1)
    a = Attention(self.num_heads, dtype, pdtype, self.rules, name="self_attn")(
        both + both_pos, both + both_pos, both, lambda q_, k_, v_: _dense_attention(q_, k_, v_, key_mask))
    both = _layer_norm(dtype, pdtype, "self_norm")(both + a)
    queries, text = both[:, :q], both[:, q:]

    queries = _layer_norm(dtype, pdtype, "ffn_norm")(
        queries + FFN(self.mlp_dim, dtype, pdtype, self.rules, name="ffn")(queries))
    return sharding_lib.constrain(self.rules, queries, ("batch", "length", "act_embed")), text


class MaskHead(nn.Module):
  """decoder_norm -> 3-layer MLP (ReLU between) -> einsum with mask_features: [B, Q, h4, w4] float32."""

  hidden_dim: int
  mask_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, mask_features: jax.Array) -> jax.Array:
    x = _layer_norm(self.dtype, self.param_dtype, "decoder_norm")(queries)
    dims = (self.hidden_dim, self.hidden_dim, self.mask_dim)
    for i, d in enumerate(dims):
      axes = ("mlp", "embed") if i % 2 else ("embed", "mlp")
      x = _dense(d, axes, self.dtype, self.param_dtype, f"mask_embed_{i}")(x)
      if i < len(dims) - 1:
        x = nn.relu(x)
    return jnp.einsum("bqc,bhwc->bqhw", x, mask_features.astype(x.dtype), preferred_element_type=jnp.float32)


class OutputFusion(nn.Module):
  """The release's `convolute_outputs`, at 1/4 -> 1/2 of the input: [B, Q, h4, w4] masks and
  the image -> [B, 2 h4, 2 w4] logits."""

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, masks: jax.Array, images: jax.Array) -> jax.Array:
    h4, w4 = masks.shape[2], masks.shape[3]
    size2 = (2 * h4, 2 * w4)
    img = images.astype(jnp.float32)
    img4, img2 = resize_bilinear(img, (h4, w4)), resize_bilinear(img, size2)
    stack = jnp.concatenate([img4, masks.transpose(0, 2, 3, 1)], axis=-1).astype(self.dtype)
    # torch ConvTranspose2d(k=4, s=2, p=1) = lax.conv_transpose with (k - 1 - p) = 2 padding: exactly 2x.
    up = nn.ConvTranspose(self.channels, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          kernel_init=logical_init(_CONV_INIT, (None, None, "embed", "mlp")),
                          bias_init=logical_init(nn.initializers.zeros, ("mlp",)), name="deconv")(stack)
    stack2 = jnp.concatenate([img2.astype(self.dtype), up], axis=-1)
    out = _conv(1, 1, self.dtype, self.param_dtype, "conv")(stack2)[..., 0].astype(jnp.float32)
    mean2 = resize_bilinear(jnp.mean(masks, axis=1), size2, channels_last=False)
    return 0.5 * (out + mean2)


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


class BoltzFormer(nn.Module):
  """images [B, S, S, 3] (normalised) + prompt ids [B, L] -> SegOutput. See the module docstring."""

  cfg: BoltzFormerConfig
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, images: jax.Array, text_ids: jax.Array, *, sample_rng: jax.Array | None = None,
               train: bool = False, return_keep_masks: bool = False) -> SegOutput:
    cfg = self.cfg
    dtype, pdtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f"BoltzFormer expects normalised NHWC images [B, S, S, 3] with S a multiple of 32; "
                       f"got {tuple(images.shape)}")
    if text_ids.ndim != 2 or text_ids.shape[0] != images.shape[0]:
      raise ValueError(f"BoltzFormer expects prompt ids [B, L] with the images' batch {images.shape[0]}; "
                       f"got {tuple(text_ids.shape)}")
    sampled = cfg.attention in ("boltzmann", "dense_sampled")
    if sampled and sample_rng is None:
      raise ValueError(f"attention mode {cfg.attention!r} samples keys: pass sample_rng=jax.random.key(...)")
    b = images.shape[0]

    # Image encoder -> four maps at 1/4 .. 1/32.
    enc_cfg = cfg.encoder_config()
    # The towers are named "encoder" and "text_encoder" in the parameter tree (a run may load the image
    # tower of an embedding run into params["encoder"]).
    vision = build_image_encoder(enc_cfg, self.rules).clone(parent=self, name="encoder")
    feats = list(vision(images, train=train).feature_maps)
    if cfg.encoder["kind"] == "vit":
      if enc_cfg.patch_size not in _STRIDES:
        raise ValueError(f"BoltzFormer with a ViT encoder needs patch_size in {_STRIDES} (the feature pyramid "
                         f"rescales its map by powers of 2); got {enc_cfg.patch_size}")
      feats = SimpleFeaturePyramid(enc_cfg.patch_size, dtype, pdtype, name="pyramid")(feats[0])
    if len(feats) != 4:
      raise ValueError(f"BoltzFormer needs four encoder maps (1/4 .. 1/32); the encoder gave {len(feats)}")
    mask_features, levels = PixelDecoder(cfg.pixel_decoder_dim, cfg.mask_dim, cfg.pixel_decoder_layers,
                                         cfg.pixel_decoder_heads, cfg.pixel_decoder_ffn, dtype, pdtype, cfg.remat,
                                         self.rules, name="pixel_decoder")(feats)

    # Prompt tokens -> hidden_dim; the release's text positions are a detached copy of them.
    text_cfg = cfg.text_config()
    text_out = build_text_encoder(text_cfg, self.rules).clone(parent=self, name="text_encoder")(text_ids, train=train)
    text = _dense(cfg.hidden_dim, ("mlp", "embed"), dtype, pdtype, "text_proj")(text_out.tokens)
    text_pos = jax.lax.stop_gradient(text)
    text_valid = text_key_mask(text_ids, text_cfg.pad_token_id, text_cfg.eos_token_id)

    # Decoder inputs: per level, keys/values (projected + level embedding) and sine positions.
    level_embed = self.param("level_embed", logical_init(nn.initializers.normal(1.0), (None, "embed")),
                             (NUM_LEVELS, cfg.hidden_dim), pdtype)
    memories, positions, sizes = [], [], []
    for i, lv in enumerate(levels):
      _, h, w, c = lv.shape
      if c != cfg.hidden_dim:
        lv = _conv(cfg.hidden_dim, 1, dtype, pdtype, f"input_proj_{i}")(lv)
      lv = sharding_lib.constrain(self.rules, lv + level_embed[i].astype(dtype), ("batch", None, None, "act_embed"))
      memories.append(sharding_lib.constrain(self.rules, lv.reshape(b, h * w, cfg.hidden_dim),
                                             ("batch", "length", "act_embed")))
      positions.append(sine_position_embedding(h, w, cfg.hidden_dim).reshape(1, h * w, cfg.hidden_dim).astype(dtype))
      sizes.append((h, w))

    query_feat = self.param("query_feat", logical_init(nn.initializers.normal(1.0), (None, "embed")),
                            (cfg.num_queries, cfg.hidden_dim), pdtype)
    query_embed = self.param("query_embed", logical_init(nn.initializers.normal(1.0), (None, "embed")),
                             (cfg.num_queries, cfg.hidden_dim), pdtype)
    queries = jnp.broadcast_to(query_feat.astype(dtype)[None], (b, cfg.num_queries, cfg.hidden_dim))
    query_pos = jnp.broadcast_to(query_embed.astype(dtype)[None], (b, cfg.num_queries, cfg.hidden_dim))

    head = MaskHead(cfg.hidden_dim, cfg.mask_dim, dtype, pdtype, name="mask_head")
    rngs = jax.random.split(sample_rng if sample_rng is not None else jax.random.key(0), cfg.dec_layers)

    def keep_for(logits: jax.Array, layer: int) -> jax.Array:
      """Keep mask of decoder layer `layer` from the prediction made before it (layer_id = layer - 1)."""
      h, w = sizes[layer % NUM_LEVELS]
      scores = jax.nn.sigmoid(resize_bilinear(logits, (h, w), channels_last=False)).reshape(b, cfg.num_queries, h * w)
      return sampling.keep_mask(rngs[layer], jax.lax.stop_gradient(scores), mode=cfg.attention, layer_id=layer - 1,
                                num_heads=cfg.num_heads, sample_ratio=cfg.sample_ratio, base_temp=cfg.base_temp,
                                threshold=cfg.mask_threshold, sampler=cfg.sampler)

    layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if cfg.remat else DecoderLayer
    logits = head(queries, mask_features)
    layer_logits, kept, totals, keeps = [logits], [], [], []
    for i in range(cfg.dec_layers):
      lvl = i % NUM_LEVELS
      keep = keep_for(logits, i)
      kept.append(sampling.kept_pairs(keep))
      totals.append(cfg.num_heads * cfg.num_queries * sizes[lvl][0] * sizes[lvl][1])
      if return_keep_masks:
        keeps.append(keep)
      queries, text = layer_cls(cfg.num_heads, cfg.dim_feedforward, cfg.attention, cfg.kernel_backend, dtype, pdtype,
                                self.rules, name=f"decoder_{i}")(
          queries, query_pos, memories[lvl], positions[lvl], keep, text, text_pos, text_valid)
      logits = head(queries, mask_features)
      layer_logits.append(logits)

    size = images.shape[1:3]
    if cfg.fusion:
      fused = OutputFusion(cfg.fusion_channels, dtype, pdtype, name="fusion")(logits, images)
    else:
      fused = jnp.mean(logits, axis=1)
    out = resize_bilinear(fused, size, channels_last=False).astype(jnp.float32)
    return SegOutput(logits=out, layer_logits=tuple(layer_logits), kept=jnp.stack(kept, axis=1).astype(jnp.float32),
                     total=tuple(totals), keep_masks=tuple(keeps) if return_keep_masks else None)


def init_params(cfg: BoltzFormerConfig, rng: jax.Array, *, batch: int = 1, text_length: int | None = None):
  """Parameters of `BoltzFormer(cfg)` (boxed with their logical axes), from dummy inputs.

  Initialised under mode "full" (no sampling): the tree is the same for every mode.
  """
  length = text_length or min(8, cfg.text_config().context_length)
  images = jnp.zeros((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
  ids = jnp.zeros((batch, length), jnp.int32)
  model = BoltzFormer(cfg.with_attention("full"))
  return model.init(rng, images, ids)["params"]


def seg_loss(logits: jax.Array, masks: jax.Array) -> tuple[jax.Array, dict]:
  """Dice (squared denominators) + BCE, per example.

  logits [B, H, W] (any float dtype), masks [B, H, W] in {0, 1}. Returns
  (loss [B], {"dice_loss": [B], "bce": [B], "dice": [B]}) where
  dice_loss = 1 - (2 sum(p g) + 1) / (sum(p^2) + sum(g^2) + 1) with p = sigmoid(logits),
  bce = mean over pixels of the binary cross-entropy with logits, and `dice` the hard
  Dice of p > 0.5 (monitoring only; 1 when both masks are empty).
  """
  if logits.shape != masks.shape:
    raise ValueError(f"seg_loss: logits {tuple(logits.shape)} and masks {tuple(masks.shape)} differ in shape")
  x = logits.astype(jnp.float32).reshape(logits.shape[0], -1)
  g = masks.astype(jnp.float32).reshape(masks.shape[0], -1)
  p = jax.nn.sigmoid(x)
  dice_loss = 1.0 - (2.0 * jnp.sum(p * g, -1) + 1.0) / (jnp.sum(p * p, -1) + jnp.sum(g * g, -1) + 1.0)
  # Stable BCE with logits: max(x, 0) - x g + log(1 + exp(-|x|)).
  bce = jnp.mean(jnp.maximum(x, 0.0) - x * g + jnp.log1p(jnp.exp(-jnp.abs(x))), -1)
  hard = (x > 0.0).astype(jnp.float32)
  inter, denom = jnp.sum(hard * g, -1), jnp.sum(hard, -1) + jnp.sum(g, -1)
  dice = jnp.where(denom > 0, 2.0 * inter / jnp.maximum(denom, 1.0), 1.0)
  return dice_loss + bce, {"dice_loss": dice_loss, "bce": bce, "dice": dice}
