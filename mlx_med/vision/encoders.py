"""Image and text encoders from a config: the one place that maps `cfg.kind` to a module.

Configs are ml_collections ConfigDicts (or plain mappings) whose keys are the fields of
the encoder's config dataclass, plus `kind` for images ("vit" | "davit"). Models that
embed, segment or caption images build their towers here, so a new encoder becomes
available to all of them by adding one branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from mlx_med.core import sharding as sharding_lib
from mlx_med.vision.text import TextConfig, TextTransformer
from mlx_med.vision.vit import ViT, ViTConfig, _fields_from_mapping

IMAGE_ENCODER_KINDS = ("vit", "davit")


def _as_dict(cfg: Any) -> dict:
  if hasattr(cfg, "to_dict"):
    return dict(cfg.to_dict())
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise TypeError(f"encoder config must be a ConfigDict or a mapping; got {type(cfg).__name__}")


def image_encoder_config(cfg: Any):
  """ConfigDict with `kind` -> the encoder's config dataclass (ViTConfig or DaViTConfig).

  A dataclass instance is returned as it is.
  """
  if isinstance(cfg, ViTConfig):
    return cfg
  if type(cfg).__name__ == "DaViTConfig":
    return cfg
  values = _as_dict(cfg)
  kind = values.pop("kind", None)
  if kind == "vit":
    return ViTConfig.from_config(values)
  if kind == "davit":
    from mlx_med.vision.davit import DaViTConfig

    if hasattr(DaViTConfig, "from_config"):
      return DaViTConfig.from_config(values)
    return DaViTConfig(**_fields_from_mapping(DaViTConfig, values, "DaViT"))
  raise ValueError(f"image encoder kind {kind!r} is not one of {IMAGE_ENCODER_KINDS} (set config kind)")


def build_image_encoder(cfg: Any, rules: sharding_lib.ShardingRules | None = None) -> nn.Module:
  """ConfigDict (kind "vit" | "davit", the rest the dataclass fields) or a config dataclass -> linen module.

  The module maps images [B, H, W, 3] to a `VisionOutput`.
  """
  config = image_encoder_config(cfg)
  if isinstance(config, ViTConfig):
    return ViT(config, rules=rules)
  from mlx_med.vision.davit import DaViT

  try:
    return DaViT(config, rules=rules)
  except TypeError:  # a DaViT without a `rules` field
    return DaViT(config)


def text_encoder_config(cfg: Any) -> TextConfig:
  """ConfigDict (TextConfig fields; an optional `kind` of "text" is accepted) -> TextConfig."""
  if isinstance(cfg, TextConfig):
    return cfg
  values = _as_dict(cfg)
  kind = values.pop("kind", "text")
  if kind not in ("text", "transformer"):
    raise ValueError(f"text encoder kind {kind!r} is not supported (use 'text')")
  return TextConfig.from_config(values)


def build_text_encoder(cfg: Any, rules: sharding_lib.ShardingRules | None = None) -> TextTransformer:
  """ConfigDict with TextConfig fields (or a TextConfig) -> TextTransformer (token ids [B, L] -> TextOutput)."""
  return TextTransformer(text_encoder_config(cfg), rules=rules)
