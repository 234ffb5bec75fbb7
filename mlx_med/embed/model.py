"""MedImageInsight's two-tower model, its training Task, and the loaded-model `Embedder`.

`TwoTower` = an image encoder (DaViT or ViT, from `mlx_med.vision`) and a CLIP-style text
transformer, each followed by a linear projection (no bias) into the shared embedding space,
plus a learnable temperature `logit_scale` (log space, CLIP's init log(1/0.07)) and, for the
sigmoid loss, a learnable `logit_bias` (SigLIP's init -10). Zero-shot logits are
`exp(logit_scale) * cos(image, text)`.

`EmbedTask` hands the model to the shared trainer. Its loss is batch-level (UniCL over the
image-text-label space, or SigLIP's sigmoid loss, optionally chunked across the batch devices),
so it is declared non-decomposable and implements `features` (the two normalised embeddings of
each example) + `loss_on_features` (the loss of the whole batch from them): with
`train.grad_accum > 1` the trainer then accumulates exactly (cached-feature accumulation:
features of every micro-batch first, the loss's gradient w.r.t. them, one backward per
micro-batch). CLIP clamps the scale at exp(logit_scale) <= 100; we do the same for UniCL (in the
forward pass, so the raw parameter is untouched) and leave SigLIP's scale free, as SigLIP does.

`Embedder.load(path)` opens a run directory of `mlx_med.embed.train` (model.json, tokenizer.json,
processor.json, the newest checkpoint; the EMA parameters when the run kept them) or a Hugging
Face CLIP / SigLIP directory, and embeds images and texts in fixed-size jitted batches, returning
L2-normalised float32 numpy arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.layers import logical_init
from mlx_med.core.task import LossOutput, Task
from mlx_med.embed import losses as losses_lib

log = logging.getLogger("mlx_med.embed")

LOSSES = ("unicl", "siglip")
MODEL_FILE, TOKENIZER_FILE, PROCESSOR_FILE, LABELS_FILE = "model.json", "tokenizer.json", "processor.json", "labels.json"


# ----------------------------------------------------------------------------- config


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _dataclass_from(cls, values: Mapping[str, Any], what: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"{what}: unknown keys {unknown}; {cls.__name__} takes {sorted(names)}")
  return cls(**{k: _tuples(v) for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
  """The two towers and the shared space.

  image: a `ViTConfig` or a `DaViTConfig`; text: a `TextConfig`; embed_dim: the shared
  dimension (1024 at paper scale). `image_projection` / `text_projection` False: the tower's
  pooled output is the embedding (SigLIP checkpoints, whose towers end in their own heads).
  `logit_bias` adds the sigmoid loss's bias parameter.
  """

  image: Any
  text: Any
  embed_dim: int = 512
  image_projection: bool = True
  text_projection: bool = True
  logit_scale_init: float = math.log(1 / 0.07)
  logit_bias: bool = False
  logit_bias_init: float = -10.0

  @property
  def image_kind(self) -> str:
    from mlx_med.vision.vit import ViTConfig
    return "vit" if isinstance(self.image, ViTConfig) else "davit"

  @property
  def image_size(self) -> int:
    return int(self.image.image_size)

  @property
  def context_length(self) -> int:
    return int(self.text.context_length)

  @property
  def dtype(self) -> str:
    """Activation dtype of the image tower (for the trainer's peak-FLOPs lookup)."""
    return str(getattr(self.image, "dtype", "float32"))

  def to_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image", "text")}
    out["image"] = {"kind": self.image_kind, **dataclasses.asdict(self.image)}
    out["text"] = dataclasses.asdict(self.text)
    return json.loads(json.dumps(out, default=str))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> TwoTowerConfig:
    from mlx_med.vision.text import TextConfig
    values = dict(values)
    image = dict(values.pop("image"))
    kind = image.pop("kind", "vit")
    image_cls = _image_config_class(kind)
    return _dataclass_from(cls, {**values, "image": _dataclass_from(image_cls, image, f"model image ({kind})"),
                                 "text": _dataclass_from(TextConfig, values.pop("text"), "model text")},
                           "model")


def _image_config_class(kind: str):
  if kind == "vit":
    from mlx_med.vision.vit import ViTConfig
    return ViTConfig
  if kind == "davit":
    from mlx_med.vision.davit import DaViTConfig
    return DaViTConfig
  raise ValueError(f"model.image.kind={kind!r}: choose vit or davit")


def two_tower_config(model: Mapping[str, Any], tokenizer=None) -> TwoTowerConfig:
  """TwoTowerConfig from a config's `model` section; text vocab/eos/pad of 0/-1 come from `tokenizer`."""
  from mlx_med.vision.text import TextConfig

  image = dict(model["image"])
  kind = image.pop("kind", "vit")
  image_cfg = _dataclass_from(_image_config_class(kind), image, f"model.image ({kind})")
  text = dict(model["text"])
  if tokenizer is not None:
    if not text.get("vocab_size"):
      text["vocab_size"] = int(tokenizer.vocab_size)
    elif int(text["vocab_size"]) < int(tokenizer.vocab_size):
      raise ValueError(f"model.text.vocab_size={text['vocab_size']} is smaller than the tokenizer's "
                       f"{tokenizer.vocab_size} tokens; set it to 0 to follow the tokenizer")
    for key in ("eos_token_id", "pad_token_id"):
      if int(text.get(key, -1)) < 0:
        text[key] = int(getattr(tokenizer, key))
  elif not text.get("vocab_size"):
    raise ValueError("model.text.vocab_size=0 needs a tokenizer to take the size from")
  text_cfg = _dataclass_from(TextConfig, text, "model.text")
  loss = str(model.get("loss", "unicl"))
  if loss not in LOSSES:
    raise ValueError(f"model.loss={loss!r}: choose one of {list(LOSSES)}")
  return TwoTowerConfig(image=image_cfg, text=text_cfg, embed_dim=int(model["embed_dim"]),
                        logit_scale_init=float(model.get("logit_scale_init", math.log(1 / 0.07))),
                        logit_bias=loss == "siglip", logit_bias_init=float(model.get("logit_bias_init", -10.0)))


def config_from_hf(towers) -> TwoTowerConfig:
  """The TwoTowerConfig of a Hugging Face CLIP / SigLIP checkpoint (`vision.load_hf_towers`)."""
  img_proj, txt_proj = towers.image_projection, towers.text_projection
  if (img_proj is None) != (txt_proj is None):
    raise ValueError("a checkpoint with a projection on one tower only is not supported")
  embed_dim = int(img_proj.shape[1]) if img_proj is not None else int(towers.image_config.width)
  return TwoTowerConfig(image=towers.image_config, text=towers.text_config, embed_dim=embed_dim,
                        image_projection=img_proj is not None, text_projection=txt_proj is not None,
                        logit_scale_init=float(towers.logit_scale), logit_bias=towers.logit_bias is not None,
                        logit_bias_init=float(towers.logit_bias or 0.0))


def hf_params(cfg: TwoTowerConfig, towers) -> dict:
  """Our (unboxed) parameter tree filled with a Hugging Face checkpoint's weights."""
  params = {"image_encoder": towers.image_params, "text_encoder": towers.text_params,
            "logit_scale": jnp.asarray(towers.logit_scale, jnp.float32)}
  if cfg.image_projection:
    params["image_projection"] = {"kernel": jnp.asarray(towers.image_projection)}
    params["text_projection"] = {"kernel": jnp.asarray(towers.text_projection)}
  if cfg.logit_bias:
    params["logit_bias"] = jnp.asarray(towers.logit_bias, jnp.float32)
  return jax.tree.map(jnp.asarray, params)


def check_same_structure(expected, got, what: str) -> None:
  """One-line error when two parameter trees differ in paths or shapes."""
  def flat(tree):
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  a, b = flat(expected), flat(got)
  missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  shapes = sorted(k for k in set(a) & set(b) if a[k] != b[k])
  if missing or extra or shapes:
    detail = "; ".join(x for x in (
        f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
        f"shape of {shapes[0]} is {b[shapes[0]]}, the model wants {a[shapes[0]]}" if shapes else "") if x)
    raise ValueError(f"{what}: parameters do not fit the model ({detail})")


# ----------------------------------------------------------------------------- model


def make_image_encoder(cfg, rules=None) -> nn.Module:
  from mlx_med.vision.vit import ViT, ViTConfig
  if isinstance(cfg, ViTConfig):
    cls = ViT
  else:
    from mlx_med.vision.davit import DaViT
    cls = DaViT
  return cls(cfg, rules=rules) if "rules" in {f.name for f in dataclasses.fields(cls)} else cls(cfg)


def make_text_encoder(cfg, rules=None) -> nn.Module:
  from mlx_med.vision.text import TextTransformer
  cls = TextTransformer
  return cls(cfg, rules=rules) if "rules" in {f.name for f in dataclasses.fields(cls)} else cls(cfg)


class TwoTower(nn.Module):
  """Image and text towers, projections into the shared space, and the learnable temperature.

  `__call__(images [B,S,S,3], text_ids [B,L], train)` -> (image embeddings, text embeddings),
  float32 [B, embed_dim], not normalised. `encode_image` / `encode_text` run one tower.
  """

  cfg: TwoTowerConfig
  rules: sharding_lib.ShardingRules | None = None

  def setup(self):
    c = self.cfg
    self.image_encoder = make_image_encoder(c.image, self.rules)
    self.text_encoder = make_text_encoder(c.text, self.rules)
    if c.image_projection:
      self.image_projection = self._projection(getattr(c.image, "dtype", "float32"))
    if c.text_projection:
      self.text_projection = self._projection(getattr(c.text, "dtype", "float32"))
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), (), jnp.float32)
    if c.logit_bias:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(c.logit_bias_init), (), jnp.float32)

  def _projection(self, dtype) -> nn.Dense:
    # CLIP initialises the projections with std width^-0.5; lecun_normal is that.
    return nn.Dense(self.cfg.embed_dim, use_bias=False, dtype=jnp.dtype(dtype), param_dtype=jnp.float32,
                    kernel_init=logical_init(nn.initializers.lecun_normal(), ("embed", None)))

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    pooled = self.image_encoder(images, train=train).pooled
    if self.cfg.image_projection:
      pooled = self.image_projection(pooled)
    return sharding_lib.constrain(self.rules, pooled.astype(jnp.float32), ("batch", None))

  def encode_text(self, text_ids: jax.Array, train: bool = False) -> jax.Array:
    pooled = self.text_encoder(text_ids, train=train).pooled
    if self.cfg.text_projection:
      pooled = self.text_projection(pooled)
    return sharding_lib.constrain(self.rules, pooled.astype(jnp.float32), ("batch", None))

  def __call__(self, images: jax.Array, text_ids: jax.Array, train: bool = False):
    return self.encode_image(images, train), self.encode_text(text_ids, train)


def init_two_tower(cfg: TwoTowerConfig, rng: jax.Array):
  """Boxed parameters (logical axes attached) of a fresh TwoTower."""
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, cfg.context_length), jnp.int32)
  return TwoTower(cfg).init(rng, images, ids, train=False)["params"]


# ----------------------------------------------------------------------------- task


# Activation memory of training (an estimate for the trainer's pre-compile memory check).
#
# Counted per example, in bytes, as what the backward pass holds at its peak: every tensor
# autodiff saves from the forward pass (the residuals), plus the transient buffers of the one
# block whose backward runs (its activation gradients, about the size of its residuals).
# Without remat a block's residuals are its inputs and the outputs of its norms, projections,
# activations and (in `dtype` and fp32) its attention probabilities; with remat only the block's
# input is kept and the block being differentiated recomputes its residuals (counted twice:
# recomputed values plus gradients). Tensors outside the blocks (the input image, stem,
# downsampling, embeddings, final norms) are kept in both modes. The contrastive loss's [B, B]
# logits are left out (a few bytes per example at any practical batch). XLA may fuse some of
# these away on an accelerator, so the estimate leans high; tests/embed/test_model.py checks it
# against XLA's compiled memory analysis.


def _act_bytes(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def _block_memory(kept_all: float, input_bytes: float, remat: bool) -> tuple[float, float]:
  """(bytes kept until the backward pass, peak transient bytes while it runs) of one block."""
  return (input_bytes, 2.0 * kept_all) if remat else (kept_all, kept_all)


def _encoder_activation_bytes(n: int, d: int, mlp: int, heads: int, depth: int, b: int, remat: bool,
                              masked: bool = False) -> tuple[float, float]:
  """(kept, peak transient) of `depth` pre-LN blocks (mlx_med.vision.common.EncoderBlock) on n tokens.

  Per token: block input, ln1, q/k/v, attention output, out projection, residual sum, ln2
  (9 x width) and fc1, activation, its gate (3 x mlp). Per head: fp32 scores softmax output and
  the `dtype` probabilities [n, n]; a masked tower (the causal text tower) saves its bool mask.
  """
  per_block = n * (9 * d + 3 * mlp) * b + heads * n * n * (4 + b) + (n * n if masked else 0)
  kept, peak = _block_memory(per_block, n * d * b, remat)
  return depth * kept, (peak if depth else 0.0)


def _vit_activation_bytes(cfg) -> float:
  b, d, s = _act_bytes(cfg.dtype), cfg.width, cfg.image_size
  n = cfg.num_tokens
  kept, peak = _encoder_activation_bytes(n, d, cfg.mlp_dim, cfg.num_heads, cfg.depth, b, cfg.remat)
  outside = s * s * 3 * (4 + 2 * b)  # fp32 input, its `dtype` cast and the patchified copy
  outside += 3 * n * d * b  # patch embedding, + position, pre/post norm
  if cfg.pool == "map":  # the probe's keys/values over every token, one query
    outside += n * (2 * d * b + cfg.num_heads * (4 + b))
  return float(kept + peak + outside)


def _text_activation_bytes(cfg, length: int | None = None) -> float:
  b, d, n = _act_bytes(cfg.dtype), cfg.width, int(length or cfg.context_length)
  kept, peak = _encoder_activation_bytes(n, d, cfg.mlp_dim, cfg.num_heads, cfg.depth, b, cfg.remat,
                                         masked=cfg.style == "clip")
  return float(kept + peak + 3 * n * d * b)  # token + position embeddings, final norm


def _conv_out(size: int, k: int, s: int, pad: int) -> int:
  return (size + pad - k) // s + 1


def _davit_activation_bytes(cfg) -> float:
  """DaViT (mlx_med.vision.davit): the stem, then per stage spatial + channel blocks.

  Spatial block per token: two depthwise-conv residuals (input, conv output each), two norms,
  the window-padded copy and its window reshape, q/k/v, attention output, projection, crop,
  residual sums (about 16 x width) and the MLP (fc1, GELU: 2 x mlp); per token and head the
  window's fp32 + `dtype` probabilities (window_size**2 keys). Channel block: the same without
  the window copies (13 x width + 2 x mlp per token) and its [head_dim, head_dim] attention per
  group and example.
  """
  b, s = _act_bytes(cfg.dtype), cfg.image_size
  h = w = s
  k, st = cfg.patch_sizes[0], cfg.strides[0]
  h = _conv_out(h, k, st, 2 * (k // 2) + (st - h % st) % st)
  w = _conv_out(w, k, st, 2 * (k // 2) + (st - w % st) % st)
  outside = s * s * 3 * (4 + b) + 2 * h * w * cfg.dims[0] * b  # input, its cast; stem conv + norm
  kept_total, peak = 0.0, 0.0
  ws = cfg.window_size
  for i, (c, depth, heads) in enumerate(zip(cfg.dims, cfg.depths, cfg.heads)):
    if i > 0:
      k, st = cfg.patch_sizes[i], cfg.strides[i]
      outside += h * w * cfg.dims[i - 1] * b  # the downsample's norm
      pad_h = (k - h % k) % k if k % 2 == 0 else 2 * (k // 2)
      pad_w = (k - w % k) % k if k % 2 == 0 else 2 * (k // 2)
      h, w = _conv_out(h, k, st, pad_h), _conv_out(w, k, st, pad_w)
      outside += h * w * c * b
    n, mlp = h * w, int(c * cfg.mlp_ratio)
    padded = (-(-h // ws) * ws) * (-(-w // ws) * ws)
    spatial = n * (16 * c + 2 * mlp) * b + padded * (2 * c * b + heads * ws * ws * (4 + b))
    channel = n * (13 * c + 2 * mlp) * b + c * (c // heads) * (4 + b)
    for block in (spatial, channel):
      kept, transient = _block_memory(block, n * c * b, cfg.remat)
      kept_total += depth * kept
      if depth:
        peak = max(peak, transient)
  outside += h * w * cfg.dims[-1] * 4  # the fp32 copy the global average pools
  return float(kept_total + peak + outside)


class EmbedTask(Task):
  """Two-tower contrastive training for the shared trainer (see the module docstring).

  Batches: images float32 [B,S,S,3] (normalised), text_ids int32 [B,L], labels int32 [B,K]
  (multi-hot; an all-zero row has no label and is positive with its own pair only).
  """

  decomposable = False

  def __init__(self, cfg: TwoTowerConfig, *, loss: str = "unicl", siglip_chunked: bool = False,
               max_logit_scale: float = 100.0, num_labels: int = 1):
    if loss not in LOSSES:
      raise ValueError(f"model.loss={loss!r}: choose one of {list(LOSSES)}")
    if loss == "siglip" and not cfg.logit_bias:
      cfg = dataclasses.replace(cfg, logit_bias=True)
    self.cfg, self.loss_kind, self.siglip_chunked = cfg, loss, bool(siglip_chunked)
    self.max_logit_scale = float(max_logit_scale)
    self.num_labels = int(num_labels)

  @property
  def batch_axes(self):
    return {"images": ("batch", None, None, None), "text_ids": ("batch", "length"), "labels": ("batch", None)}

  def init(self, rng):
    return init_two_tower(self.cfg, rng)

  def _model(self, rules) -> TwoTower:
    return TwoTower(self.cfg, rules)

  def features(self, params, batch, rng, *, rules=None, train=True):
    rngs = {"dropout": rng} if train else {}  # stochastic depth (DaViT) and any dropout
    img, txt = self._model(rules).apply({"params": params}, batch["images"], batch["text_ids"], train=train,
                                        rngs=rngs)
    return {"image": losses_lib.l2_normalize(img), "text": losses_lib.l2_normalize(txt)}

  def scale(self, params) -> jax.Array:
    """The log-space temperature the loss uses (clamped at log(max_logit_scale) for UniCL)."""
    scale = params["logit_scale"].astype(jnp.float32)
    if self.loss_kind == "unicl" and self.max_logit_scale > 0:
      scale = jnp.minimum(scale, math.log(self.max_logit_scale))
    return scale

  def _chunk_axes(self, rules, batch_size: int):
    if rules is None:
      return None
    spec = rules.spec(("batch",), (batch_size,))[0]
    if spec is None:
      return None
    return spec

  def loss_on_features(self, params, features, batch, *, rules=None):
    img, txt, labels = features["image"], features["text"], batch["labels"]
    b = img.shape[0]
    scale = self.scale(params)
    if self.loss_kind == "unicl":
      loss, m = losses_lib.unicl_loss(img, txt, labels, scale, return_metrics=True)
      metrics = {"i2t_top1": m["i2t_top1"] * b, "t2i_top1": m["t2i_top1"] * b}
    else:
      bias = params["logit_bias"]
      axes = self._chunk_axes(rules, b) if self.siglip_chunked else None
      if axes is not None:
        loss = losses_lib.siglip_loss_chunked(img, txt, scale, bias, rules.mesh, axes, labels=labels)
      else:
        loss = losses_lib.siglip_loss(img, txt, scale, bias, labels=labels)
      metrics = {}
    metrics["logit_scale"] = jnp.exp(scale) * b  # a sum, like every metric (reported / weight)
    n = jnp.float32(b)
    return LossOutput(loss * n, n, metrics)

  def loss(self, params, batch, rng, *, rules=None, train=True):
    return self.loss_on_features(params, self.features(params, batch, rng, rules=rules, train=train), batch,
                                 rules=rules)

  def eval_metrics(self, params, batch, *, rules=None):
    """Loss plus top-1 retrieval in both directions (a positive of the pair, shared labels counted)."""
    feats = self.features(params, batch, jax.random.key(0), rules=rules, train=False)
    out = self.loss_on_features(params, feats, batch, rules=rules)
    if "i2t_top1" in out.metrics:
      return out
    logits = feats["image"] @ feats["text"].T
    positives = losses_lib.positive_mask(batch["labels"], logits.shape[0])
    i2t = jnp.take_along_axis(positives, jnp.argmax(logits, 1)[:, None], 1).sum()
    t2i = jnp.take_along_axis(positives, jnp.argmax(logits, 0)[None, :], 0).sum()
    return LossOutput(out.loss_sum, out.weight, {**out.metrics, "i2t_top1": i2t.astype(jnp.float32),
                                                 "t2i_top1": t2i.astype(jnp.float32)})

  @functools.cached_property
  def _forward_flops(self) -> float | None:
    """Forward FLOPs of one example from XLA's cost analysis of the lowered forward pass."""
    try:
      params = jax.eval_shape(lambda: nn.unbox(self.init(jax.random.key(0))))
      images = jax.ShapeDtypeStruct((1, self.cfg.image_size, self.cfg.image_size, 3), jnp.float32)
      ids = jax.ShapeDtypeStruct((1, self.cfg.context_length), jnp.int32)
      lowered = jax.jit(lambda p, x, t: TwoTower(self.cfg).apply({"params": p}, x, t)).lower(params, images, ids)
      cost = lowered.cost_analysis()
      if isinstance(cost, (list, tuple)):
        cost = cost[0]
      flops = float(cost.get("flops", 0.0)) if cost else 0.0
      return flops or None
    except Exception as e:  # an estimate only: MFU is left out rather than the run stopped
      log.debug("no FLOPs estimate for the two-tower model: %s", e)
      return None

  @property
  def train_flops_per_example(self) -> float | None:
    flops = self._forward_flops
    return 3.0 * flops if flops else None  # backward ~ twice the forward

  throughput_unit = ("images", 1)

  def activation_bytes_per_example(self) -> float | None:
    """Training activation bytes of one image-text pair (both towers; see the estimate's notes
    above `EmbedTask`). Within 2x of XLA's compiled memory analysis on the tested configs."""
    c = self.cfg
    image = _vit_activation_bytes(c.image) if c.image_kind == "vit" else _davit_activation_bytes(c.image)
    return image + _text_activation_bytes(c.text)

  def describe(self) -> str:
    c = self.cfg
    image = (f"ViT {c.image.width}x{c.image.depth} /{c.image.patch_size}" if c.image_kind == "vit"
             else f"DaViT dims {list(c.image.dims)}")
    return (f"two-tower ({image} at {c.image_size} px; text {c.text.width}x{c.text.depth}; "
            f"embed {c.embed_dim}; {self.loss_kind})")


# ----------------------------------------------------------------------------- embedder


def _bucket(n: int, batch_size: int) -> int:
  """Padded size of a batch of n: the next power of two up to batch_size (few compiled shapes)."""
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


class Embedder:
  """A trained (or Hugging Face) two-tower model ready to embed images and texts.

  `embed_images(np [B,S,S,3] normalised, or paths)` and `embed_texts(list of str)` return
  L2-normalised float32 [B, embed_dim] numpy arrays. `logit_scale` is the log-space temperature
  (zero-shot logits are exp(logit_scale) * image @ text.T), `logit_bias` the sigmoid bias or None,
  `processor` the image preprocessing (`vision.io.ImageProcessorConfig`), `labels` the label names
  of the training data when known.
  """

  def __init__(self, cfg: TwoTowerConfig, params, tokenizer, processor, *, labels: Sequence[str] | None = None,
               batch_size: int = 64, source: str = "", step: int | None = None):
    self.cfg, self.tokenizer, self.processor = cfg, tokenizer, processor
    self.labels = list(labels) if labels is not None else None
    self.batch_size, self.source, self.step = int(batch_size), source, step
    self.params = jax.device_put(jax.tree.map(jnp.asarray, nn.unbox(params)))
    check_same_structure(jax.eval_shape(lambda: nn.unbox(init_two_tower(cfg, jax.random.key(0)))), self.params,
                         source or "Embedder")
    model = TwoTower(cfg)
    self._image_fn = jax.jit(lambda p, x: losses_lib.l2_normalize(
        model.apply({"params": p}, x, method=TwoTower.encode_image)))
    self._text_fn = jax.jit(lambda p, t: losses_lib.l2_normalize(
        model.apply({"params": p}, t, method=TwoTower.encode_text)))

  @property
  def logit_scale(self) -> float:
    return float(self.params["logit_scale"])

  @property
  def logit_bias(self) -> float | None:
    return float(self.params["logit_bias"]) if "logit_bias" in self.params else None

  @property
  def embed_dim(self) -> int:
    return int(self.cfg.embed_dim)

  @property
  def image_size(self) -> int:
    return self.cfg.image_size

  # ---------------------------------------------------------------- loading
  @classmethod
  def load(cls, path: str | os.PathLike, *, batch_size: int = 64, use_ema: bool = True) -> Embedder:
    """A run directory of `mlx-med embed train` (its EMA parameters when kept, unless use_ema=False)
    or a Hugging Face CLIP / SigLIP directory (config.json + model.safetensors + tokenizer.json)."""
    path = Path(path)
    if not path.is_dir():
      raise ValueError(f"{path}: not a directory; pass a training run directory or a Hugging Face CLIP/SigLIP "
                       "directory")
    if (path / MODEL_FILE).is_file():
      return cls._load_run(path, batch_size, use_ema)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
      return cls._load_hf(path, batch_size)
    raise ValueError(f"{path}: neither a training run (no {MODEL_FILE}) nor a Hugging Face directory "
                     "(config.json + *.safetensors); pass the --workdir of `mlx-med embed train` or a CLIP/SigLIP "
                     "checkpoint directory")

  @classmethod
  def _load_hf(cls, path: Path, batch_size: int) -> Embedder:
    from mlx_med.vision.hf import load_hf_towers
    from mlx_med.vision.io import ImageProcessorConfig
    from mlx_med.vision.text import TextTokenizer

    towers = load_hf_towers(str(path))
    cfg = config_from_hf(towers)
    tokenizer = None
    if towers.tokenizer_path:
      tokenizer = TextTokenizer.from_file(towers.tokenizer_path, context_length=cfg.context_length,
                                          style=towers.family)
    processor = ImageProcessorConfig.from_hf_dir(str(path))
    return cls(cfg, hf_params(cfg, towers), tokenizer, processor, batch_size=batch_size, source=str(path))

  @classmethod
  def _load_run(cls, path: Path, batch_size: int, use_ema: bool) -> Embedder:
    from mlx_med.core import checkpoint as checkpoint_lib

    cfg = TwoTowerConfig.from_dict(json.loads((path / MODEL_FILE).read_text()))
    tokenizer = load_tokenizer(path, cfg)
    processor = load_processor(path)
    labels = json.loads((path / LABELS_FILE).read_text()) if (path / LABELS_FILE).is_file() else None
    ckpt_dir = (path / "checkpoints").absolute()
    restored = checkpoint_lib.restore_latest_state(ckpt_dir)
    if restored is None:
      raise ValueError(f"{ckpt_dir}: no checkpoint; train the run first (`mlx-med embed train --workdir {path}`)")
    state, step = restored
    params = state["ema_params"] if use_ema and "ema_params" in state else state["params"]
    return cls(cfg, params, tokenizer, processor, labels=labels, batch_size=batch_size, source=str(path),
               step=int(step))

  # ---------------------------------------------------------------- embedding
  def preprocess(self, images) -> np.ndarray:
    """Paths (or raw [H,W] / [H,W,3] arrays) -> normalised float32 [B,S,S,3] via the processor."""
    from mlx_med.vision.io import load_image, preprocess
    out = []
    for item in images:
      img = load_image(item) if isinstance(item, (str, os.PathLike)) else np.asarray(item)
      out.append(preprocess(img, processor=self.processor))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, self.image_size, self.image_size, 3), np.float32)

  def _run(self, fn, x: np.ndarray) -> np.ndarray:
    n = len(x)
    if n == 0:
      return np.zeros((0, self.embed_dim), np.float32)
    outs = []
    for start in range(0, n, self.batch_size):
      chunk = x[start:start + self.batch_size]
      size = _bucket(len(chunk), self.batch_size)
      if len(chunk) < size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
      outs.append(np.asarray(fn(self.params, chunk))[:min(self.batch_size, n - start)])
    return np.concatenate(outs).astype(np.float32)

  def embed_images(self, images) -> np.ndarray:
    """Normalised [B,S,S,3] arrays (already preprocessed) or a list of image paths -> [B, E]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
      s = self.image_size
      if images.shape[1:] != (s, s, 3):
        raise ValueError(f"images of shape {images.shape[1:]}; the model takes preprocessed [{s}, {s}, 3] arrays "
                         "(pass paths to have them loaded and preprocessed)")
      return self._run(self._image_fn, images.astype(np.float32))
    return self._run(self._image_fn, self.preprocess(list(images)))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError(f"{self.source}: no tokenizer.json, so texts cannot be embedded; add the checkpoint's "
                       "tokenizer.json to the directory")
    if isinstance(texts, str):
      texts = [texts]
    ids = np.asarray(self.tokenizer.encode(list(texts)), np.int32)
    return self._run(self._text_fn, ids)

  def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Zero-shot logits exp(logit_scale) * cos (+ logit_bias for a sigmoid model)."""
    logits = math.exp(self.logit_scale) * image_emb @ text_emb.T
    return logits + (self.logit_bias or 0.0)


def load_tokenizer(run_dir: Path, cfg: TwoTowerConfig):
  from mlx_med.vision.text import TextTokenizer
  path = Path(run_dir) / TOKENIZER_FILE
  if not path.is_file():
    raise ValueError(f"{path}: missing; the run directory is incomplete (train it with `mlx-med embed train`)")
  return TextTokenizer.from_file(str(path), context_length=cfg.context_length, style=cfg.text.style)


def save_processor(run_dir: Path, processor) -> None:
  path = Path(run_dir) / PROCESSOR_FILE
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(dataclasses.asdict(processor), indent=2, default=list))
  os.replace(tmp, path)


def load_processor(run_dir: Path):
  from mlx_med.vision.io import ImageProcessorConfig
  path = Path(run_dir) / PROCESSOR_FILE
  if not path.is_file():
    raise ValueError(f"{path}: missing; the run directory is incomplete (train it with `mlx-med embed train`)")
  return _dataclass_from(ImageProcessorConfig, json.loads(path.read_text()), str(path))
