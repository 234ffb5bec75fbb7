"""LLaVA (Hugging Face `LlavaForConditionalGeneration`) in JAX: a CLIP ViT, a two-layer
projector and the project's decoder.

The computation, as transformers does it:
  1. The CLIP vision tower runs on pixel values [N, H, W, 3] (NHWC here, normalised).
     Its hidden states are indexed like HF's `hidden_states`: index 0 is the embedding
     output after the pre-LayerNorm, index i the output of block i. `vision_feature_layer`
     picks one index (default -2, the second-to-last block) or several (concatenated on
     the feature axis). No post-LayerNorm is applied to these tokens.
  2. `vision_feature_select_strategy` "default" drops the class token, "full" keeps it.
  3. The projector maps each visual token: linear_2(act(linear_1(x))).
  4. The visual tokens replace, in order (row-major over the batch), the embeddings of
     the `image_token_id` positions of `Decoder.embed_tokens(tokens)`; the decoder runs
     on those embeddings with ordinary positions 0..T-1.

Only the blocks the features read are run and stored: with 24 blocks and layer -2, the
tower holds 23. `load_hf` ignores the unused blocks and the post-LayerNorm (they do not
affect LLaVA's output); `save_hf` writes the tower it holds, with `num_hidden_layers` and
`vision_feature_layer` re-expressed so transformers selects the same hidden state (and
an identity post-LayerNorm, which only CLIP's pooled output would read).

Parameters: {"vision_tower": ViT-layout tree (patch_embed, cls_token, pos_embedding,
pre_norm, encoder/layers_i), "projector": {linear_1, linear_2}, "language_model": the
core `Decoder`'s tree}. Checkpoints in transformers 4.x names (`vision_tower.vision_model.`,
`multi_modal_projector.`, `language_model.model.`, `language_model.lm_head.`) and 5.x
names (`model.vision_tower.`, `model.multi_modal_projector.`, `model.language_model.`,
`lm_head.`) both load; `save_hf` writes the 4.x names, which every transformers version
reads (5.x converts them on load and writes them itself).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.fileio import replace_dir
from mlx_med.core.layers import cpu_dense_dot_general, logical_init
from mlx_med.core.transformer import Decoder, DecoderConfig, as_dtype
from mlx_med.llm import checkpoint as checkpoint_lib
from mlx_med.llm import hf_config as hf_config_lib
from mlx_med.llm.safetensors_io import CheckpointError, write_safetensors
from mlx_med.vision.common import EncoderBlock, LayerNorm
from mlx_med.vision.hf import vit_config_from_hf, vit_params_from_hf
from mlx_med.vision.vit import ViTConfig

__all__ = [
  "Llava",
  "LlavaConfig",
  "LlavaVisionTower",
  "expand_image_tokens",
  "init_params",
  "load_hf",
  "prompt_inputs",
  "save_hf",
]

_STRATEGIES = ("default", "full")
# HF `projector_hidden_act` names -> functions (exact GELU for "gelu", as torch's nn.GELU).
_PROJECTOR_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}
_VIT_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# HF LlavaConfig's defaults for a vision_config that leaves fields out (a CLIP ViT-L/14 at 336).
_LLAVA_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
# Non-weight files a LLaVA directory carries (tokenizer, chat template, image processor).
SIDECAR_FILES = checkpoint_lib.SIDECAR_FILES + ("preprocessor_config.json", "processor_config.json")


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """A LLaVA model: CLIP vision tower, projector, decoder. Hashable (a static jit argument).

  vision: the CLIP-style ViT as the HF config describes it (depth may exceed the blocks
    the features read; see `vision_depth_used`).
  vision_feature_layer: HF hidden-state index (negative from the end), or a tuple of them
    whose states are concatenated.
  image_seq_length: visual tokens per image; 0 = computed ((image/patch)^2, +1 with "full").
  """

  vision: ViTConfig
  decoder: DecoderConfig
  image_token_id: int = 32000
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  projector_hidden_act: str = "gelu"
  multimodal_projector_bias: bool = True
  image_seq_length: int = 0

  def __post_init__(self):
    if self.vision.style != "clip":
      raise ValueError(f"LLaVA needs a CLIP-style vision tower (class token first); got style {self.vision.style!r}")
    if isinstance(self.vision_feature_layer, list):
      object.__setattr__(self, "vision_feature_layer", tuple(int(v) for v in self.vision_feature_layer))
    if isinstance(self.vision_feature_layer, tuple) and not self.vision_feature_layer:
      raise ValueError("vision_feature_layer is an empty list; give one hidden-state index or several")
    if self.vision_feature_select_strategy not in _STRATEGIES:
      raise ValueError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not one of "
                       f"{_STRATEGIES}")
    if self.projector_hidden_act not in _PROJECTOR_ACTS:
      raise ValueError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported "
                       f"(supported: {sorted(_PROJECTOR_ACTS)})")
    _ = self.feature_layers  # validates the indices
    if not self.image_seq_length:
      object.__setattr__(self, "image_seq_length", self.num_image_tokens)
    elif self.image_seq_length != self.num_image_tokens:
      raise ValueError(f"image_seq_length={self.image_seq_length} but the vision tower gives {self.num_image_tokens} "
                       f"tokens per image ({self.vision.image_size}/{self.vision.patch_size} patches per side, "
                       f"strategy {self.vision_feature_select_strategy!r}); leave it 0 to compute it")

  @property
  def feature_layers(self) -> tuple[int, ...]:
    """The selected hidden-state indices, non-negative (0 = embeddings, i = after block i)."""
    layers = self.vision_feature_layer if isinstance(self.vision_feature_layer, tuple) else (self.vision_feature_layer,)
    n = self.vision.depth + 1
    out = []
    for k in layers:
      if not -n <= int(k) < n:
        raise ValueError(f"vision_feature_layer {k} is out of range for a {self.vision.depth}-block vision tower "
                         f"(hidden states {-n}..{n - 1})")
      out.append(int(k) % n)
    return tuple(out)

  @property
  def vision_depth_used(self) -> int:
    """Blocks the features read (the tower runs and stores only these)."""
    return max(self.feature_layers)

  @property
  def vision_tower_config(self) -> ViTConfig:
    return dataclasses.replace(self.vision, depth=self.vision_depth_used)

  @property
  def num_image_tokens(self) -> int:
    return self.vision.grid ** 2 + (1 if self.vision_feature_select_strategy == "full" else 0)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str | None = None,
              max_seq_len: int | None = None, scan_layers: bool = True, attention_backend: str = "xla",
              remat: str = "none") -> LlavaConfig:
    """From a LLaVA `config.json` dict (transformers 4.x or 5.x)."""
    if hf.get("model_type", "llava") != "llava":
      raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; expected 'llava'")
    vision = {**_LLAVA_VISION_DEFAULTS, **dict(hf.get("vision_config") or {})}
    vision_type = vision.get("model_type", "clip_vision_model")
    if vision_type != "clip_vision_model":
      raise ValueError(f"config.json vision_config.model_type={vision_type!r}: only CLIP vision towers "
                       "('clip_vision_model') are supported")
    vit = vit_config_from_hf(vision, "clip", dtype=dtype, param_dtype=param_dtype or dtype)
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    # LlavaForConditionalGeneration ties its head when either config asks for it.
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    decoder = hf_config_lib.decoder_config_from_hf(text, dtype=dtype, param_dtype=param_dtype,
                                                   max_seq_len=max_seq_len, attention_backend=attention_backend,
                                                   remat=remat, scan_layers=scan_layers)
    token = hf.get("image_token_index", hf.get("image_token_id", 32000))
    layer = hf.get("vision_feature_layer", -2)
    layer = tuple(int(v) for v in layer) if isinstance(layer, (list, tuple)) else int(layer)
    # HF's image_seq_length is informational (its processor counts patches itself), so it
    # is recomputed here rather than trusted.
    return cls(vision=vit, decoder=decoder, image_token_id=int(token), vision_feature_layer=layer,
               vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
               projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
               multimodal_projector_bias=bool(hf.get("multimodal_projector_bias", True)))

  def to_hf(self, base: Mapping[str, Any] | None = None, *, torch_dtype: str = "float32") -> dict:
    """A LLaVA `config.json` dict for the model as stored (the tower's used blocks only),
    keeping unrelated fields of `base` (token ids, ...)."""
    base = dict(base or {})
    used = self.vision_depth_used
    layers = tuple(k - (used + 1) for k in self.feature_layers)  # same states, counted from the end
    vision = dict(base.get("vision_config") or {})
    for stale in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
      vision.pop(stale, None)
    v = self.vision
    vision.update({"model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
                   "num_hidden_layers": used, "num_attention_heads": v.num_heads, "image_size": v.image_size,
                   "patch_size": v.patch_size, "num_channels": 3, "hidden_act": _VIT_ACT_TO_HF[v.act],
                   "layer_norm_eps": v.layer_norm_eps})
    text = hf_config_lib.hf_config_from_decoder(self.decoder, base=base.get("text_config"), torch_dtype=torch_dtype)
    text.pop("architectures", None)
    out = {k: v for k, v in base.items() if k not in ("transformers_version", "_name_or_path", "dtype")}
    out.update({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text,
        "image_token_index": self.image_token_id,
        "image_seq_length": self.num_image_tokens,
        "vision_feature_layer": layers[0] if isinstance(self.vision_feature_layer, int) else list(layers),
        "vision_feature_select_strategy": self.vision_feature_select_strategy,
        "projector_hidden_act": self.projector_hidden_act,
        "multimodal_projector_bias": self.multimodal_projector_bias,
        "tie_word_embeddings": self.decoder.tie_embeddings,
        "torch_dtype": torch_dtype,
    })
    out.pop("image_token_id", None)
    return out


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------


class _HiddenStates(nn.Module):
  """CLIP encoder blocks layers_0..layers_{depth-1} (the ViT's `Encoder` names), returning
  every hidden state: [input, after block 1, ..., after block depth]."""

  cfg: ViTConfig
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    cfg = self.cfg
    block = nn.remat(EncoderBlock, prevent_cse=False) if cfg.remat else EncoderBlock
    states = [x]
    for i in range(cfg.depth):
      x = block(cfg.num_heads, cfg.mlp_dim, cfg.act, cfg.layer_norm_eps, as_dtype(cfg.dtype),
                as_dtype(cfg.param_dtype), self.rules, name=f"layers_{i}")(x, None)
      states.append(x)
    return states


class LlavaVisionTower(nn.Module):
  """pixel values [N, H, W, 3] -> selected CLIP hidden states [N, tokens, width * len(layers)].

  The parameters have the names of `mlx_med.vision.vit.ViT` (clip style), less the
  post-LayerNorm, so `vit_params_from_hf` loads them; the computation differs only in
  returning intermediate hidden states.
  """

  cfg: ViTConfig  # depth = blocks used
  feature_layers: tuple[int, ...]
  strategy: str = "default"
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype, pdtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"LLaVA expects pixel values [N, {cfg.image_size}, {cfg.image_size}, 3] (NHWC, normalised); "
                       f"got {images.shape}")
    b, p, g = images.shape[0], cfg.patch_size, cfg.grid
    x = images.astype(dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = nn.DenseGeneral(
        cfg.width, axis=(-3, -2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype,
        kernel_init=logical_init(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        dot_general=cpu_dense_dot_general, name="patch_embed")(x)
    x = x.reshape(b, g * g, cfg.width)
    cls = self.param("cls_token", logical_init(nn.initializers.normal(0.02), ("embed",)), (cfg.width,), pdtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, cfg.width)), x], axis=1)
    pos = self.param("pos_embedding", logical_init(nn.initializers.normal(0.02), (None, "embed")),
                     (cfg.num_tokens, cfg.width), pdtype)
    x = x + pos.astype(dtype)[None]
    x = sharding_lib.constrain(self.rules, x, ("batch", "length", "act_embed"))
    x = LayerNorm(cfg.layer_norm_eps, dtype, pdtype, "pre_norm")(x)
    states = _HiddenStates(cfg, self.rules, name="encoder")(x)
    picked = [states[k] for k in self.feature_layers]
    if self.strategy == "default":
      picked = [s[:, 1:] for s in picked]
    return picked[0] if len(picked) == 1 else jnp.concatenate(picked, axis=-1)


class LlavaProjector(nn.Module):
  """linear_2(act(linear_1(x))): visual tokens into the decoder's embedding space."""

  d_model: int
  act: str
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  rules: sharding_lib.ShardingRules | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def dense(name, axes):
      return nn.DenseGeneral(self.d_model, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=logical_init(nn.initializers.lecun_normal(), axes),
                             bias_init=logical_init(nn.initializers.zeros, axes[1:]),
                             dot_general=cpu_dense_dot_general, name=name)

    h = dense("linear_1", (None, "mlp"))(x)
    h = _PROJECTOR_ACTS[self.act](h)
    return dense("linear_2", ("mlp", "embed"))(h)


def scatter_image_features(embeddings: jax.Array, tokens: jax.Array, features: jax.Array,
                           image_token_id: int) -> jax.Array:
  """embeddings [B, T, E] with the image-token positions (row-major over the batch, in
  order) replaced by features [N, E]. Counts are checked by the callers on the host
  (`check_image_tokens`); under jit a mismatch cannot raise."""
  b, t, e = embeddings.shape
  mask = (tokens == image_token_id).reshape(-1)
  index = jnp.clip(jnp.cumsum(mask.astype(jnp.int32)) - 1, 0, max(features.shape[0] - 1, 0))
  gathered = jnp.take(features.astype(embeddings.dtype), index, axis=0)
  flat = jnp.where(mask[:, None], gathered, embeddings.reshape(-1, e))
  return flat.reshape(b, t, e)


def check_image_tokens(tokens: Any, num_images: int, cfg: LlavaConfig) -> None:
  """Raises if the concrete `tokens` hold a different number of image tokens than the images give."""
  found = int(np.sum(np.asarray(tokens) == cfg.image_token_id))
  want = num_images * cfg.num_image_tokens
  if found != want:
    raise ValueError(f"the tokens hold {found} image tokens (id {cfg.image_token_id}) but {num_images} image(s) give "
                     f"{want} ({cfg.num_image_tokens} each); expand each image placeholder with expand_image_tokens")


class Llava(nn.Module):
  """LLaVA: `__call__(tokens [B, T], images [N, H, W, 3] or None) -> logits [B, T, V]` (fp32)."""

  cfg: LlavaConfig
  rules: sharding_lib.ShardingRules | None = None

  def setup(self):
    cfg = self.cfg
    self.vision_tower = LlavaVisionTower(cfg.vision_tower_config, cfg.feature_layers,
                                         cfg.vision_feature_select_strategy, self.rules)
    self.projector = LlavaProjector(cfg.decoder.d_model, cfg.projector_hidden_act, cfg.multimodal_projector_bias,
                                    as_dtype(cfg.decoder.dtype), as_dtype(cfg.decoder.param_dtype), self.rules)
    self.language_model = Decoder(cfg.decoder, self.rules)

  def image_features(self, images: jax.Array) -> jax.Array:
    """Visual tokens after the projector, in image order: [N * image_seq_length, d_model]."""
    x = self.projector(self.vision_tower(images))
    return x.reshape(-1, x.shape[-1])

  def embed(self, tokens: jax.Array, images: jax.Array | None) -> jax.Array:
    """`embed_tokens(tokens)` with the image features in the image-token positions."""
    x = self.language_model.embed_tokens(tokens)
    n = 0 if images is None else images.shape[0]
    if not isinstance(tokens, jax.core.Tracer):
      check_image_tokens(tokens, n, self.cfg)
    if n == 0:
      return x
    return scatter_image_features(x, tokens, self.image_features(images), self.cfg.image_token_id)

  def __call__(self, tokens: jax.Array, images: jax.Array | None = None, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    x = self.embed(tokens, images)
    return self.language_model(None, positions=positions, segment_ids=segment_ids, embeddings=x)


def init_params(cfg: LlavaConfig, rng: jax.Array) -> Any:
  """Random parameters (plain, unboxed tree) for `cfg`."""
  s = cfg.vision.image_size
  tokens = jnp.full((1, cfg.num_image_tokens), cfg.image_token_id, jnp.int32)
  images = jnp.zeros((1, s, s, 3), jnp.float32)
  init = jax.jit(lambda r: nn.unbox(Llava(cfg).init(r, tokens, images)["params"]))
  return init(rng)


# ----------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------


def expand_image_tokens(token_ids: Sequence[int], image_inputs: Sequence[Any], cfg: LlavaConfig) -> list[int]:
  """Each `<image>` placeholder (cfg.image_token_id) -> image_seq_length copies, as HF's LlavaProcessor does."""
  found = sum(1 for t in token_ids if int(t) == cfg.image_token_id)
  if found != len(image_inputs):
    raise ValueError(f"the prompt has {found} image placeholder(s) (token id {cfg.image_token_id}) but "
                     f"{len(image_inputs)} image(s) were given; put one placeholder per image")
  out: list[int] = []
  for t in token_ids:
    out.extend([int(t)] * cfg.num_image_tokens if int(t) == cfg.image_token_id else [int(t)])
  return out


@functools.lru_cache(maxsize=16)
def _embed_fn(cfg: LlavaConfig):
  def fn(params, tokens, images):
    return Llava(cfg).apply({"params": params}, tokens, images, method=Llava.embed)
  return jax.jit(fn)


def prompt_inputs(cfg: LlavaConfig, params: Any, token_ids: Sequence[int],
                  image_inputs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings float32 [T, E], positions int32 [T]) of one expanded prompt and its images
  (each pixel values [H, W, 3]): the sampler's `prompt_embeds` / `prompt_positions`."""
  tokens = np.asarray([list(token_ids)], np.int32)
  check_image_tokens(tokens, len(image_inputs), cfg)
  s = cfg.vision.image_size
  for i, image in enumerate(image_inputs):
    if np.shape(image) != (s, s, 3):
      raise ValueError(f"image {i} has shape {np.shape(image)}; this LLaVA takes pixel values [{s}, {s}, 3] "
                       "(run the model's image processor)")
  images = np.stack([np.asarray(im, np.float32) for im in image_inputs]) if image_inputs else None
  embeds = _embed_fn(cfg)(params, jnp.asarray(tokens), None if images is None else jnp.asarray(images))
  return np.asarray(embeds[0], np.float32), np.arange(tokens.shape[1], dtype=np.int32)


# ----------------------------------------------------------------------------
# Hugging Face directories
# ----------------------------------------------------------------------------

# (projector prefix, language-model prefix for "model.*" names, lm_head name) per naming.
_NAMINGS = (
    ("multi_modal_projector.", "language_model.model.", "language_model.lm_head.weight"),  # transformers 4.x
    ("model.multi_modal_projector.", "model.language_model.", "lm_head.weight"),  # transformers 5.x
)
_VISION_ANCHOR = "embeddings.patch_embedding.weight"


def _naming(names: set[str], source: str) -> tuple[str, str, str, str]:
  """(vision prefix, projector prefix, language-model prefix, lm_head name) of a LLaVA checkpoint."""
  for projector, lm, head in _NAMINGS:
    if projector + "linear_1.weight" in names and lm + "embed_tokens.weight" in names:
      break
  else:
    raise CheckpointError(f"{source}: no 'multi_modal_projector.linear_1.weight' with a language model's "
                          "'embed_tokens.weight' under transformers 4.x or 5.x LLaVA names; is this a LLaVA checkpoint?")
  vision = sorted((n[:-len(_VISION_ANCHOR)] for n in names if n.endswith(_VISION_ANCHOR) and "vision_tower" in n),
                  key=len)
  if not vision:
    raise CheckpointError(f"{source}: no vision tower tensor '*vision_tower*.{_VISION_ANCHOR}'")
  return vision[0], projector, lm, head


def load_hf(model_dir: str, *, dtype: str = "float32", param_dtype: str | None = None,
            max_seq_len: int | None = None, scan_layers: bool = True,
            attention_backend: str = "xla") -> tuple[LlavaConfig, Any]:
  """(cfg, params) from a local HF LLaVA directory (config.json + safetensors, sharded OK)."""
  model_dir = os.fspath(model_dir)
  hf = hf_config_lib.read_hf_config(model_dir)
  cfg = LlavaConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype, max_seq_len=max_seq_len,
                            scan_layers=scan_layers, attention_backend=attention_backend)
  weights = checkpoint_lib.HFWeights(model_dir)
  names = set(weights.names())
  source = model_dir
  vision_prefix, projector_prefix, lm_prefix, head_name = _naming(names, source)
  target = np.dtype(as_dtype(cfg.decoder.param_dtype))

  lm_names = {}
  for n in names:
    if n.startswith(lm_prefix):
      lm_names["model." + n[len(lm_prefix):]] = n
  if head_name in names:
    lm_names["lm_head.weight"] = head_name
  try:
    language_model = checkpoint_lib.load_hf_params(
        model_dir, cfg.decoder, weights=checkpoint_lib.RenamedHFWeights(weights, lm_names))
  except CheckpointError as e:  # name the tensors as this directory spells them
    message = str(e).replace("'model.", f"'{lm_prefix}").replace("'lm_head.weight'", f"'{head_name}'")
    raise CheckpointError(message) from None

  vision_names = [n for n in names if n.startswith(vision_prefix)]
  lazy = _LazyState(vision_names, weights.tensor)
  tower = vit_params_from_hf(lazy, cfg.vision_tower_config, source=source)
  tower.pop("post_norm", None)  # read only by CLIP's pooled output, which LLaVA does not use

  projector = {}
  width_in = cfg.vision.width * len(cfg.feature_layers)
  for layer, shape_in in (("linear_1", width_in), ("linear_2", cfg.decoder.d_model)):
    name = f"{projector_prefix}{layer}.weight"
    if name not in names:
      raise CheckpointError(f"{source}: missing tensor {name!r}")
    w = np.asarray(weights.tensor(name), np.float32)
    if w.shape != (cfg.decoder.d_model, shape_in):
      raise CheckpointError(f"{source}: tensor {name!r} has shape {list(w.shape)}, expected "
                            f"{[cfg.decoder.d_model, shape_in]} from config.json")
    projector[layer] = {"kernel": w.T.copy()}
    bias = f"{projector_prefix}{layer}.bias"
    if cfg.multimodal_projector_bias:
      if bias not in names:
        raise CheckpointError(f"{source}: missing tensor {bias!r} (config.json has multimodal_projector_bias=true)")
      projector[layer]["bias"] = np.asarray(weights.tensor(bias), np.float32)
    elif bias in names:
      raise CheckpointError(f"{source}: tensor {bias!r} is present but config.json has multimodal_projector_bias=false")

  known = set(lm_names.values()) | {n for n in names if n.startswith((vision_prefix, projector_prefix))}
  unexpected = sorted(names - known)
  if unexpected:
    raise CheckpointError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}: "
                          "not part of a LLaVA model (a LLaVA variant this module does not implement?)")
  as_param = lambda x: jnp.asarray(np.asarray(x).astype(target))
  params = {"vision_tower": jax.tree.map(as_param, tower), "projector": jax.tree.map(as_param, projector),
            "language_model": language_model}
  return cfg, params


class _LazyState(Mapping):
  """name -> tensor, read on access (the vision converter reads only the blocks it needs)."""

  def __init__(self, names, get):
    self._names, self._get = list(names), get

  def __getitem__(self, key):
    if key not in self._names:
      raise KeyError(key)
    return self._get(key)

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)


def _vision_tensors(tower: Any, cfg: ViTConfig, prefix: str) -> list[tuple[str, Any]]:
  """Our tower tree -> (HF CLIPVisionModel name, host producer) pairs (the inverse of vit_params_from_hf)."""
  host = lambda x: np.asarray(jax.device_get(x), np.float32)
  out: list[tuple[str, Any]] = [
      ("embeddings.class_embedding", lambda: host(tower["cls_token"])),
      ("embeddings.patch_embedding.weight", lambda: host(tower["patch_embed"]["kernel"]).transpose(3, 2, 0, 1)),
      ("embeddings.position_embedding.weight", lambda: host(tower["pos_embedding"])),
      ("pre_layrnorm.weight", lambda: host(tower["pre_norm"]["scale"])),
      ("pre_layrnorm.bias", lambda: host(tower["pre_norm"]["bias"])),
  ]
  for i in range(cfg.depth):
    layer = tower["encoder"][f"layers_{i}"]
    p = f"encoder.layers.{i}."
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      a = layer["attn"][ours]
      out.append((p + f"self_attn.{theirs}.weight", lambda a=a: host(a["kernel"]).reshape(cfg.width, -1).T))
      out.append((p + f"self_attn.{theirs}.bias", lambda a=a: host(a["bias"]).reshape(-1)))
    o = layer["attn"]["out"]
    out.append((p + "self_attn.out_proj.weight", lambda o=o: host(o["kernel"]).reshape(-1, cfg.width).T))
    out.append((p + "self_attn.out_proj.bias", lambda o=o: host(o["bias"])))
    for ln_ours, ln_theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
      ln = layer[ln_ours]
      out.append((p + f"{ln_theirs}.weight", lambda ln=ln: host(ln["scale"])))
      out.append((p + f"{ln_theirs}.bias", lambda ln=ln: host(ln["bias"])))
    for fc in ("fc1", "fc2"):
      d = layer["mlp"][fc]
      out.append((p + f"mlp.{fc}.weight", lambda d=d: host(d["kernel"]).T))
      out.append((p + f"mlp.{fc}.bias", lambda d=d: host(d["bias"])))
  # CLIP's post-LayerNorm acts on the pooled class token only, which LLaVA never reads: identity.
  out.append(("post_layernorm.weight", lambda: np.ones((cfg.width,), np.float32)))
  out.append(("post_layernorm.bias", lambda: np.zeros((cfg.width,), np.float32)))
  return [(prefix + n, f) for n, f in out]


_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def save_hf(out_dir: str, cfg: LlavaConfig, params: Any, hf_config: Mapping[str, Any] | None = None, *,
            dtype: str | None = None, copy_files_from: str | None = None, overwrite: bool = False) -> str:
  """Writes a LLaVA directory (config.json + model.safetensors, transformers 4.x tensor names)
  that `LlavaForConditionalGeneration.from_pretrained` and `load_hf` read.

  hf_config: an original config.json dict whose unrelated fields (token ids, ...) are kept.
  dtype: tensor dtype on disk (default: the decoder's param_dtype).
  copy_files_from: a directory whose tokenizer / chat template / processor files are copied.
  Written into a temporary directory beside `out_dir`, then renamed into place.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
  for key in ("vision_tower", "projector", "language_model"):
    if key not in params:
      raise ValueError(f"params lack {key!r}; expected the tree of Llava / init_params / load_hf")
  dtype_name = dtype or cfg.decoder.param_dtype
  disk = np.dtype(as_dtype(dtype_name))
  items: list[tuple[str, tuple[int, ...], Any]] = []
  for name, shape, _, producer in checkpoint_lib.hf_tensor_stream(params["language_model"], cfg.decoder, disk):
    if name == "lm_head.weight":
      name = "language_model.lm_head.weight"
    else:
      name = "language_model." + name
    items.append((name, shape, producer))
  host = lambda x: np.asarray(jax.device_get(x), np.float32)
  for layer in ("linear_1", "linear_2"):
    d = params["projector"][layer]
    items.append((f"multi_modal_projector.{layer}.weight", tuple(d["kernel"].shape[::-1]),
                  lambda d=d: host(d["kernel"]).T))
    if cfg.multimodal_projector_bias:
      items.append((f"multi_modal_projector.{layer}.bias", tuple(d["bias"].shape), lambda d=d: host(d["bias"])))
  tower_cfg = cfg.vision_tower_config
  for name, producer in _vision_tensors(params["vision_tower"], tower_cfg, "vision_tower.vision_model."):
    array = producer()  # the tower is small next to the decoder: converted up front for its shape
    items.append((name, tuple(array.shape), lambda array=array: array))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    # One tensor in host memory at a time (the decoder's are produced as they are written).
    write_safetensors(os.path.join(tmp, checkpoint_lib.SINGLE_NAME), [(n, s, disk) for n, s, _ in items],
                      (np.ascontiguousarray(np.asarray(producer()).astype(disk)) for _, _, producer in items))
    config = cfg.to_hf(hf_config, torch_dtype=_TORCH_DTYPE_NAMES.get(str(dtype_name), "float32"))
    checkpoint_lib.write_config_and_sidecars(tmp, config, copy_files_from)
    replace_dir(tmp, out_dir)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
