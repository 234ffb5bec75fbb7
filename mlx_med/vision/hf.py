"""Hugging Face CLIP and SigLIP checkpoints as our towers.

`load_hf_towers(dir)` reads a local `CLIPModel` / `SiglipModel` directory (config.json +
model.safetensors or a sharded index, optional tokenizer.json) with NumPy only (no torch
at run time) and returns our configs, parameter trees in our modules' layout, the
projections, and the logit scale/bias, so a user can start an embedding model from an
existing checkpoint. The per-tower converters (`vit_params_from_hf`,
`text_params_from_hf`) take any name -> array mapping, e.g. a torch state_dict turned
into NumPy, which is how the parity tests feed them.

Layout notes: torch Linear weights are [out, in] (ours [in, out], split per head for
attention); the patch convolution [D, 3, p, p] becomes our HWIO [p, p, 3, D] kernel;
SigLIP's pooling head is torch `nn.MultiheadAttention` (packed in_proj [3D, D]).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mlx_med.vision.common import hf_activation_name
from mlx_med.vision.text import TextConfig
from mlx_med.vision.vit import ViTConfig

FAMILIES = ("clip", "siglip")

# HF defaults for keys a config.json may leave out (configuration_clip.py / configuration_siglip.py).
_VISION_DEFAULTS = {
    "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "siglip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6, "vision_use_head": True},
}
_TEXT_DEFAULTS = {
    "clip": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                 "pad_token_id": 1, "eos_token_id": 49407},
    "siglip": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6, "pad_token_id": 1, "eos_token_id": 49407, "projection_size": None},
}


@dataclasses.dataclass
class HFTowers:
  """Both towers of a HF image-text checkpoint, in our layout (plain NumPy float32 trees).

  image_projection / text_projection: [D_img, E] / [D_txt, E] (CLIP), None for SigLIP
  (its text head is inside the text tower; its image pooling head is the embedding).
  logit_scale: log-space (logits = exp(logit_scale) * cosine + logit_bias).
  """

  family: str
  image_config: ViTConfig
  image_params: dict
  text_config: TextConfig
  text_params: dict
  image_projection: np.ndarray | None
  text_projection: np.ndarray | None
  logit_scale: float
  logit_bias: float | None
  tokenizer_path: str | None
  path: str | None = None


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


def _with_defaults(values: Mapping[str, Any] | None, defaults: dict) -> dict:
  out = dict(defaults)
  out.update({k: v for k, v in (values or {}).items() if v is not None or k not in defaults})
  return out


def vit_config_from_hf(vision_config: Mapping[str, Any], family: str, **overrides) -> ViTConfig:
  """HF CLIPVisionConfig / SiglipVisionConfig (as a dict) -> ViTConfig."""
  if family not in FAMILIES:
    raise ValueError(f"family {family!r} is not one of {FAMILIES}")
  c = _with_defaults(vision_config, _VISION_DEFAULTS[family])
  if int(c["num_channels"]) != 3:
    raise ValueError(f"vision config has num_channels={c['num_channels']}; only RGB (3) encoders are supported")
  pool = "cls" if family == "clip" else ("map" if c.get("vision_use_head", True) else "gap")
  values = {"image_size": int(c["image_size"]), "patch_size": int(c["patch_size"]), "width": int(c["hidden_size"]),
                "depth": int(c["num_hidden_layers"]), "num_heads": int(c["num_attention_heads"]),
                "mlp_dim": int(c["intermediate_size"]), "style": family, "act": hf_activation_name(c["hidden_act"]),
                "layer_norm_eps": float(c["layer_norm_eps"]), "pool": pool}
  values.update(overrides)
  return ViTConfig(**values)


def text_config_from_hf(text_config: Mapping[str, Any], family: str, **overrides) -> TextConfig:
  """HF CLIPTextConfig / SiglipTextConfig (as a dict) -> TextConfig."""
  if family not in FAMILIES:
    raise ValueError(f"family {family!r} is not one of {FAMILIES}")
  c = _with_defaults(text_config, _TEXT_DEFAULTS[family])
  eos = c["eos_token_id"]
  eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
  values = {"vocab_size": int(c["vocab_size"]), "context_length": int(c["max_position_embeddings"]),
                "width": int(c["hidden_size"]), "depth": int(c["num_hidden_layers"]),
                "num_heads": int(c["num_attention_heads"]), "mlp_dim": int(c["intermediate_size"]), "style": family,
                "act": hf_activation_name(c["hidden_act"]), "layer_norm_eps": float(c["layer_norm_eps"]),
                "eos_token_id": eos, "pad_token_id": int(c["pad_token_id"] if c["pad_token_id"] is not None else eos)}
  if family == "siglip":
    values["projection_size"] = int(c["projection_size"] or c["hidden_size"])
  values.update(overrides)
  return TextConfig(**values)


# ----------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------


class _State:
  """name -> float32 NumPy array, with a prefix and errors that name the source."""

  def __init__(self, get: Callable[[str], np.ndarray], names, prefix: str, source: str):
    self._get, self._names, self.prefix, self.source = get, set(names), prefix, source

  def __call__(self, name: str) -> np.ndarray:
    full = self.prefix + name
    if full not in self._names:
      raise KeyError(f"{self.source}: tensor {full!r} is missing; is this a matching CLIP/SigLIP checkpoint?")
    return np.asarray(self._get(full), dtype=np.float32)

  def has(self, name: str) -> bool:
    return self.prefix + name in self._names


def _as_state(state: Mapping[str, Any], anchor: str, source: str) -> _State:
  """Finds the tower's prefix from the key that ends in `anchor`."""
  matches = [k for k in state if k.endswith(anchor)]
  if not matches:
    raise KeyError(f"{source}: no tensor named '*{anchor}'; is this a CLIP/SigLIP checkpoint?")
  prefix = min(matches, key=len)[:-len(anchor)]

  def get(name):
    value = state[name]
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value

  return _State(get, state.keys(), prefix, source)


def _ln(s: _State, name: str) -> dict:
  return {"scale": s(name + ".weight"), "bias": s(name + ".bias")}


def _linear(s: _State, name: str, bias: bool = True) -> dict:
  out = {"kernel": s(name + ".weight").T.copy()}
  if bias:
    out["bias"] = s(name + ".bias")
  return out


def _heads_in(w: np.ndarray, b: np.ndarray, heads: int) -> dict:
  """torch [H*hd, D] / [H*hd] -> ours kernel [D, H, hd], bias [H, hd]."""
  d_out, d_in = w.shape
  return {"kernel": w.T.reshape(d_in, heads, d_out // heads).copy(), "bias": b.reshape(heads, d_out // heads)}


def _heads_out(w: np.ndarray, b: np.ndarray, heads: int) -> dict:
  """torch [D, H*hd] / [D] -> ours kernel [H, hd, D], bias [D]."""
  d_out, d_in = w.shape
  return {"kernel": w.T.reshape(heads, d_in // heads, d_out).copy(), "bias": b}


def _attention(s: _State, name: str, heads: int) -> dict:
  out = {}
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    out[ours] = _heads_in(s(f"{name}.{theirs}.weight"), s(f"{name}.{theirs}.bias"), heads)
  out["out"] = _heads_out(s(f"{name}.out_proj.weight"), s(f"{name}.out_proj.bias"), heads)
  return out


def _encoder(s: _State, depth: int, heads: int) -> dict:
  layers = {}
  for i in range(depth):
    p = f"encoder.layers.{i}."
    layers[f"layers_{i}"] = {
        "ln1": _ln(s, p + "layer_norm1"), "attn": _attention(s, p + "self_attn", heads),
        "ln2": _ln(s, p + "layer_norm2"), "mlp": {"fc1": _linear(s, p + "mlp.fc1"), "fc2": _linear(s, p + "mlp.fc2")},
    }
  return layers


def vit_params_from_hf(state: Mapping[str, Any], cfg: ViTConfig, *, source: str = "state dict") -> dict:
  """HF CLIPVisionModel / SiglipVisionModel weights (any prefix, e.g. 'vision_model.') -> our ViT params."""
  s = _as_state(state, "embeddings.patch_embedding.weight", source)
  patch = s("embeddings.patch_embedding.weight")  # [D, 3, p, p]
  if patch.shape != (cfg.width, 3, cfg.patch_size, cfg.patch_size):
    raise ValueError(f"{source}: patch embedding has shape {patch.shape}; the config expects "
                     f"{(cfg.width, 3, cfg.patch_size, cfg.patch_size)}")
  params: dict = {"patch_embed": {"kernel": patch.transpose(2, 3, 1, 0).copy()}}
  if cfg.style == "siglip":
    params["patch_embed"]["bias"] = s("embeddings.patch_embedding.bias")
  else:
    params["cls_token"] = s("embeddings.class_embedding")
    params["pre_norm"] = _ln(s, "pre_layrnorm")
  pos = s("embeddings.position_embedding.weight")
  if pos.shape != (cfg.num_tokens, cfg.width):
    raise ValueError(f"{source}: position embedding has shape {pos.shape}; the config expects {(cfg.num_tokens, cfg.width)}")
  params["pos_embedding"] = pos
  params["encoder"] = _encoder(s, cfg.depth, cfg.num_heads)
  params["post_norm"] = _ln(s, "post_layernorm")
  if cfg.pool == "map":
    d = cfg.width
    w, b = s("head.attention.in_proj_weight"), s("head.attention.in_proj_bias")
    params["map_head"] = {
        "probe": s("head.probe"),
        "attn": {"query": _heads_in(w[:d], b[:d], cfg.num_heads), "key": _heads_in(w[d:2 * d], b[d:2 * d], cfg.num_heads),
                 "value": _heads_in(w[2 * d:], b[2 * d:], cfg.num_heads),
                 "out": _heads_out(s("head.attention.out_proj.weight"), s("head.attention.out_proj.bias"), cfg.num_heads)},
        "ln": _ln(s, "head.layernorm"),
        "mlp": {"fc1": _linear(s, "head.mlp.fc1"), "fc2": _linear(s, "head.mlp.fc2")},
    }
  return params


def text_params_from_hf(state: Mapping[str, Any], cfg: TextConfig, *, source: str = "state dict") -> dict:
  """HF CLIPTextModel / SiglipTextModel weights (any prefix, e.g. 'text_model.') -> our TextTransformer params."""
  s = _as_state(state, "embeddings.token_embedding.weight", source)
  table = s("embeddings.token_embedding.weight")
  if table.shape != (cfg.vocab_size, cfg.width):
    raise ValueError(f"{source}: token embedding has shape {table.shape}; the config expects {(cfg.vocab_size, cfg.width)}")
  params: dict = {
      "token_embed": {"embedding": table},
      "pos_embedding": s("embeddings.position_embedding.weight")[:cfg.context_length],
      "encoder": _encoder(s, cfg.depth, cfg.num_heads),
      "final_norm": _ln(s, "final_layer_norm"),
  }
  if cfg.style == "siglip":
    params["head"] = _linear(s, "head")
  return params


# ----------------------------------------------------------------------------
# Directories
# ----------------------------------------------------------------------------


def _open_weights(path: str):
  """(lookup, names, description) over model.safetensors or a sharded safetensors index."""
  from mlx_med.llm.safetensors_io import SafetensorsFile

  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    f = SafetensorsFile(single)
    return f.tensor, f.keys(), single
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as fh:
      weight_map = json.load(fh).get("weight_map") or {}
    files = {name: SafetensorsFile(os.path.join(path, name)) for name in sorted(set(weight_map.values()))}
    return (lambda k: files[weight_map[k]].tensor(k)), list(weight_map), index
  if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    raise FileNotFoundError(f"{path}: only pytorch_model.bin is present; save the model with safetensors "
                            "(save_pretrained(..., safe_serialization=True)) to load it without torch")
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf_towers(path: str | os.PathLike) -> HFTowers:
  """Reads a local HF `CLIPModel` or `SiglipModel` directory into our towers."""
  path = os.fspath(path)
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face CLIP or SigLIP model directory)")
  with open(config_path, encoding="utf-8") as fh:
    try:
      config = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path}: not valid JSON ({e})") from None
  family = config.get("model_type")
  if family not in FAMILIES:
    raise ValueError(f"{path}: model_type {family!r} is not a CLIP or SigLIP image-text model "
                     f"(supported: {', '.join(FAMILIES)})")
  image_config = vit_config_from_hf(config.get("vision_config") or {}, family)
  text_config = text_config_from_hf(config.get("text_config") or {}, family)
  get, names, source = _open_weights(path)
  lookup = _State(get, names, "", source)
  # The converters find each tower's prefix themselves; give them a mapping that reads lazily.
  state = _LazyMapping(names, get)
  image_params = vit_params_from_hf(state, image_config, source=source)
  text_params = text_params_from_hf(state, text_config, source=source)
  image_projection = text_projection = None
  logit_bias = None
  if family == "clip":
    image_projection = lookup("visual_projection.weight").T.copy()
    text_projection = lookup("text_projection.weight").T.copy()
  else:
    logit_bias = float(lookup("logit_bias").reshape(-1)[0])
  logit_scale = float(lookup("logit_scale").reshape(-1)[0])
  tokenizer_path = os.path.join(path, "tokenizer.json")
  return HFTowers(family=family, image_config=image_config, image_params=image_params, text_config=text_config,
                  text_params=text_params, image_projection=image_projection, text_projection=text_projection,
                  logit_scale=logit_scale, logit_bias=logit_bias,
                  tokenizer_path=tokenizer_path if os.path.isfile(tokenizer_path) else None, path=path)


class _LazyMapping(Mapping):
  def __init__(self, names, get):
    self._names, self._get = list(names), get

  def __getitem__(self, key):
    return self._get(key)

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)
