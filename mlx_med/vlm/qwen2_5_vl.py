"""Qwen2.5-VL in JAX: a windowed-attention ViT with a 2x2 patch merger feeding the Qwen2 decoder.

What the model computes (read from the published architecture; layouts match
Hugging Face's `Qwen2_5_VLForConditionalGeneration` so its checkpoints load as they are):

* Vision tower. An image is cut by the processor into patches of C x T x P x P values
  (T = temporal_patch_size copies of a still image), listed block-major over
  merge x merge groups. The patch embedding (a Conv3d whose stride equals its kernel)
  is a dense layer over each flattened patch. Each block is pre-RMSNorm attention
  + a gated SiLU MLP with biases. Attention rotates q/k with a 2-D rotary embedding:
  the first half of the rotary frequencies turn with the patch's row, the second half
  with its column. Most blocks attend only inside windows of
  `window_size / patch_size` patches square (counted in merged groups); the blocks in
  `fullatt_block_indexes` attend over the whole image (each frame separately). The
  tokens are permuted so every window is contiguous (the "window index"); the merger
  (RMSNorm, then an MLP over each merge x merge group concatenated) maps to the
  decoder's width, and the inverse permutation restores the processor's order.
* Decoder: Qwen2 (q/k/v biases) with multimodal rotary positions (M-RoPE): each token
  carries (t, h, w) positions; text tokens carry three equal ones. `get_rope_index`
  builds them on the host: image tokens get their merged grid coordinates offset by
  the current position, and text after an image continues from the start position
  + max(h, w) / merge.

Window and full attention are dense softmax attention under a block-diagonal mask
built from per-token segment ids (window id / frame id), which the host derives from
the static `grid_thw`. That is O(N^2) in the number of patches of all images in the
call: fine at the sizes this project runs (hundreds to a few thousand patches), and
the price of one fused dense kernel instead of per-window ragged ones.

`images` = (patches [N_patches, C*T*P*P] float, grid_thw: tuple of (t, h, w) int
tuples, static); grid_thw is in patches (h, w divisible by the merge size).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import attention as attention_lib
from mlx_med.core import sharding as sharding_lib
from mlx_med.core.fileio import replace_dir
from mlx_med.core.layers import RMSNorm, apply_rope, cpu_dense_dot_general, logical_init
from mlx_med.core.transformer import (
  Decoder,
  DecoderConfig,
  as_dtype,
  stack_layers,
  unstack_layers,
)
from mlx_med.llm import checkpoint as checkpoint_lib
from mlx_med.llm import hf_config as hf_config_lib
from mlx_med.llm.checkpoint import HFWeights
from mlx_med.llm.safetensors_io import CheckpointError, write_safetensors

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
Grid = tuple[int, int, int]


# ------------------------------------------------------------------------ configs


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig:
  """The vision tower's architecture (Hugging Face `vision_config` field names where they exist)."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 3584
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # pixels
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: float = 2.0
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    if not isinstance(self.fullatt_block_indexes, tuple):
      object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"vision hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.head_dim % 4:
      raise ValueError(f"vision head_dim={self.head_dim} must be a multiple of 4 (2-D rotary over h and w)")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"fullatt_block_indexes {bad} are outside the {self.depth} vision blocks")
    if self.window_size < self.patch_size * self.spatial_merge_size:
      raise ValueError(f"window_size={self.window_size} px is smaller than one merged patch "
                       f"({self.patch_size * self.spatial_merge_size} px)")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @property
  def window_groups(self) -> int:
    """Window side in merged groups."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """A whole Qwen2.5-VL model. Hashable: a static jit argument."""

  decoder: DecoderConfig
  vision: Qwen25VisionConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  def __post_init__(self):
    if self.decoder.mrope_section is None:
      raise ValueError("Qwen2.5-VL's decoder needs DecoderConfig.mrope_section (multimodal rotary)")
    if self.vision.out_hidden_size != self.decoder.d_model:
      raise ValueError(f"vision out_hidden_size={self.vision.out_hidden_size} != decoder d_model={self.decoder.d_model}")

  @classmethod
  def from_hf(cls, hf: dict, *, dtype: str = "float32", param_dtype: str | None = None,
              max_seq_len: int | None = None, attention_backend: str = "xla", remat: str = "none",
              scan_layers: bool = True) -> Qwen25VLConfig:
    """From a `config.json` dict: transformers 5.x (nested `text_config`, `rope_parameters`) or 4.x
    (text fields at the top level, `rope_scaling` with type "mrope")."""
    if hf.get("model_type") not in (MODEL_TYPE, None):
      raise hf_config_lib.UnsupportedConfigError(
          f"config.json field model_type={hf.get('model_type')!r}: expected {MODEL_TYPE!r}")
    text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k != "vision_config"})
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    for key in ("rope_parameters", "rope_scaling"):  # older files keep them next to each other
      if key in hf and isinstance(hf[key], dict) and "mrope_section" in hf[key] and "mrope_section" not in rope:
        rope.update(hf[key])
    section = rope.pop("mrope_section", None)
    if section is None:
      raise hf_config_lib.UnsupportedConfigError(
          "config.json has no rope_parameters.mrope_section (rope_scaling.mrope_section in 4.x files): "
          "not a Qwen2.5-VL config")
    if rope.pop("mrope_interleaved", False):
      raise hf_config_lib.UnsupportedConfigError("config.json field mrope_interleaved=True: interleaved M-RoPE "
                                                 "(Qwen3-VL) is not supported")
    if rope.get("rope_type", rope.get("type")) == "mrope":
      rope["rope_type"] = "default"
      rope.pop("type", None)
    if "rope_theta" not in rope and "rope_theta" in text:
      rope["rope_theta"] = text["rope_theta"]
    rope.setdefault("rope_theta", 1000000.0)
    text.pop("rope_scaling", None)
    text["rope_parameters"] = rope
    text["model_type"] = "qwen2"
    text.setdefault("rms_norm_eps", 1e-6)
    if hf.get("tie_word_embeddings"):
      text["tie_word_embeddings"] = True
    decoder = hf_config_lib.decoder_config_from_hf(
        text, dtype=dtype, param_dtype=param_dtype, max_seq_len=max_seq_len, attention_backend=attention_backend,
        remat=remat, scan_layers=scan_layers)
    decoder = dataclasses.replace(decoder, mrope_section=tuple(int(s) for s in section))
    v = dict(hf.get("vision_config") or {})
    act = v.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise hf_config_lib.UnsupportedConfigError(f"config.json field vision_config.hidden_act={act!r}: only SiLU")
    vrope = v.get("rope_parameters") or {}
    defaults = Qwen25VisionConfig()
    vision = Qwen25VisionConfig(
        depth=int(v.get("depth", defaults.depth)),
        hidden_size=int(v.get("hidden_size", defaults.hidden_size)),
        intermediate_size=int(v.get("intermediate_size", defaults.intermediate_size)),
        num_heads=int(v.get("num_heads", defaults.num_heads)),
        out_hidden_size=int(v.get("out_hidden_size", decoder.d_model)),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=int(v.get("patch_size", v.get("spatial_patch_size", defaults.patch_size))),
        temporal_patch_size=int(v.get("temporal_patch_size", defaults.temporal_patch_size)),
        spatial_merge_size=int(v.get("spatial_merge_size", defaults.spatial_merge_size)),
        window_size=int(v.get("window_size", defaults.window_size)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", defaults.fullatt_block_indexes)),
        tokens_per_second=float(v.get("tokens_per_second", defaults.tokens_per_second)),
        rope_theta=float(vrope.get("rope_theta", 10000.0)))
    ids = {k: int(hf[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id") if hf.get(k) is not None}
    return cls(decoder=decoder, vision=vision, **ids)

  def to_hf(self, base: dict | None = None) -> dict:
    """A transformers 5.x `config.json` dict (nested text_config / vision_config)."""
    d, v = self.decoder, self.vision
    text = hf_config_lib.hf_config_from_decoder(dataclasses.replace(d, mrope_section=None), model_type="qwen2")
    for key in ("architectures", "torch_dtype", "rope_theta", "rope_scaling", "transformers_version"):
      text.pop(key, None)
    text.update(model_type="qwen2_5_vl_text", use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta,
                                 "mrope_section": list(d.mrope_section)})
    vision = {"model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
              "hidden_act": "silu", "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
              "in_channels": v.in_channels, "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
              "temporal_patch_size": v.temporal_patch_size,
              "tokens_per_second": int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
              else v.tokens_per_second,
              "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
              "fullatt_block_indexes": list(v.fullatt_block_indexes),
              "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    out = {k: val for k, val in (base or {}).items() if k not in ("text_config", "vision_config", "rope_scaling",
                                                                   "rope_parameters")}
    if base and not base.get("text_config"):  # a 4.x flat file: drop the text fields now nested
      out = {k: val for k, val in out.items() if k not in text}
    out.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], text_config=text, vision_config=vision,
               image_token_id=self.image_token_id, video_token_id=self.video_token_id,
               vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
               tie_word_embeddings=d.tie_embeddings)
    return out


# ------------------------------------------------------------ host-side geometry


def _check_grids(grid_thw: Sequence[Grid], vcfg: Qwen25VisionConfig) -> tuple[Grid, ...]:
  grids = tuple(tuple(int(x) for x in g) for g in grid_thw)
  m = vcfg.spatial_merge_size
  for g in grids:
    if len(g) != 3 or min(g) < 1 or g[1] % m or g[2] % m:
      raise ValueError(f"image grid (t, h, w)={g}: needs three positive sizes with h and w divisible by the "
                       f"merge size {m} (grid_thw is counted in patches, as the processor returns it)")
  return grids


@functools.lru_cache(maxsize=64)
def vision_layout(grid_thw: tuple[Grid, ...], vcfg: Qwen25VisionConfig) -> dict[str, np.ndarray]:
  """The window permutation and per-token tables for the vision tower, from the static grids.

  Returns (all for tokens in *window order*, the order the blocks run in):
    order [N]: patch index (processor order) of each token;
    positions [N, 2]: the (row, column) rotary positions of each token;
    window_segments [N], frame_segments [N]: ids >= 1, equal within one attention window / one
      image frame (the block-diagonal masks of windowed and full attention);
    restore [N / merge^2]: the inverse permutation of merged groups (back to processor order).
  """
  grids = _check_grids(grid_thw, vcfg)
  m, wg = vcfg.spatial_merge_size, vcfg.window_groups
  group_order, window_ids, frame_ids, positions = [], [], [], []
  offset, next_window, next_frame = 0, 1, 1
  for t, h, w in grids:
    gh, gw = h // m, w // m
    # Rotary positions in processor order: block-major over merge x merge groups.
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    hh = hh.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).reshape(-1)
    ww = ww.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).reshape(-1)
    frame_pos = np.stack([hh, ww], -1).reshape(gh * gw, m * m, 2)
    for f in range(t):
      index = np.arange(gh * gw).reshape(gh, gw)
      for wr in range(0, gh, wg):
        for wc in range(0, gw, wg):
          block = index[wr:wr + wg, wc:wc + wg].reshape(-1)
          group_order.extend(offset + f * gh * gw + block)
          window_ids.extend([next_window] * len(block))
          frame_ids.extend([next_frame] * len(block))
          positions.append(frame_pos[block])
          next_window += 1
      next_frame += 1
    offset += t * gh * gw
  group_order = np.asarray(group_order, np.int64)
  mu = vcfg.merge_unit
  order = (group_order[:, None] * mu + np.arange(mu)[None]).reshape(-1)
  return {
      "order": order.astype(np.int32),
      "positions": np.concatenate(positions).reshape(-1, 2).astype(np.int32),
      "window_segments": np.repeat(np.asarray(window_ids, np.int32), mu),
      "frame_segments": np.repeat(np.asarray(frame_ids, np.int32), mu),
      "restore": np.argsort(group_order).astype(np.int32),
  }


def num_image_tokens(grid: Grid, cfg: Qwen25VLConfig) -> int:
  """Decoder tokens one image contributes: t * h * w / merge^2."""
  t, h, w = (int(x) for x in grid)
  return t * h * w // cfg.vision.merge_unit


def get_rope_index(token_ids: Sequence[int], image_grids: Sequence[Grid], cfg: Qwen25VLConfig, *,
                   video_grids: Sequence[Grid] = (), second_per_grid_ts: Sequence[float] | None = None
                   ) -> np.ndarray:
  """M-RoPE positions np.int32 [T, 3] (temporal, height, width) of one expanded token sequence.

  Text tokens count up by one on all three components. Each run of image (video) tokens
  takes the next grid; its tokens get (start + t', start + row, start + column) over the
  merged grid, with t' = frame for images and int(frame * tokens_per_second *
  second_per_grid_t) for videos; text after it continues from start + max(h, w) / merge.
  """
  ids = np.asarray(token_ids, np.int64).reshape(-1)
  m = cfg.vision.spatial_merge_size
  grids = {cfg.image_token_id: list(map(tuple, image_grids)), cfg.video_token_id: list(map(tuple, video_grids))}
  used = {cfg.image_token_id: 0, cfg.video_token_id: 0}
  seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else [1.0] * len(grids[cfg.video_token_id])
  out = np.zeros((len(ids), 3), np.int64)
  pos, i = 0, 0
  while i < len(ids):
    tok = int(ids[i])
    if tok not in grids:
      out[i] = pos
      pos += 1
      i += 1
      continue
    kind = "image" if tok == cfg.image_token_id else "video"
    if used[tok] >= len(grids[tok]):
      raise ValueError(f"the prompt has more {kind} token runs than the {len(grids[tok])} {kind} grid(s) given "
                       "(expand each placeholder with expand_image_tokens)")
    k = used[tok]
    t, h, w = (int(x) for x in grids[tok][k])
    used[tok] += 1
    gh, gw = h // m, w // m
    n = t * gh * gw
    if i + n > len(ids) or np.any(ids[i:i + n] != tok):
      raise ValueError(f"{kind} {k} with grid {(t, h, w)} needs {n} consecutive {kind} tokens at index {i}; "
                       "the prompt has fewer (expand placeholders with expand_image_tokens)")
    interval = 1.0 if kind == "image" else cfg.vision.tokens_per_second * float(seconds[k])
    tt = (np.arange(t) * interval).astype(np.int64)
    tg, hg, wg = np.meshgrid(tt, np.arange(gh), np.arange(gw), indexing="ij")
    out[i:i + n] = np.stack([tg.reshape(-1), hg.reshape(-1), wg.reshape(-1)], -1) + pos
    pos += max(gh, gw)
    i += n
  for tok, kind in ((cfg.image_token_id, "image"), (cfg.video_token_id, "video")):
    if used[tok] != len(grids[tok]):
      raise ValueError(f"{len(grids[tok])} {kind} grid(s) given but the prompt has {used[tok]} {kind} token run(s)")
  return out.astype(np.int32)


def expand_image_tokens(token_ids: Sequence[int], image_inputs: Sequence, cfg: Qwen25VLConfig) -> list[int]:
  """Each `<|image_pad|>` (cfg.image_token_id) placeholder -> t*h*w/merge^2 copies, one image per placeholder.

  `image_inputs` items are processor outputs (patches, (t, h, w)) or bare (t, h, w) grids.
  """
  grids = [_grid_of(item) for item in image_inputs]
  found = sum(1 for t in token_ids if int(t) == cfg.image_token_id)
  if found != len(grids):
    raise ValueError(f"the prompt has {found} image placeholder token(s) (id {cfg.image_token_id}) but "
                     f"{len(grids)} image(s) were given; put one placeholder per image")
  out, k = [], 0
  for t in token_ids:
    if int(t) == cfg.image_token_id:
      out.extend([cfg.image_token_id] * num_image_tokens(grids[k], cfg))
      k += 1
    else:
      out.append(int(t))
  return out


def _grid_of(item) -> Grid:
  if isinstance(item, (tuple, list)) and len(item) == 2 and not np.isscalar(item[0]):
    item = item[1]
  grid = tuple(int(x) for x in np.asarray(item).reshape(-1))
  if len(grid) != 3:
    raise ValueError(f"an image input must be (patches, (t, h, w)) or a (t, h, w) grid, got grid {grid}")
  return grid


# --------------------------------------------------------------------- modules


class VisionMLP(nn.Module):
  """down(silu(gate(x)) * up(x)), every projection with a bias."""

  hidden_dim: int
  dtype: Any
  param_dtype: Any
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init = nn.initializers.normal(self.init_std)

    def dense(name, feats, axes):
      return nn.Dense(feats, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=logical_init(init, axes), bias_init=logical_init(nn.initializers.zeros, axes[1:]),
                      dot_general=cpu_dense_dot_general, name=name)

    h = nn.silu(dense("gate_proj", self.hidden_dim, ("embed", "mlp"))(x)) * dense(
        "up_proj", self.hidden_dim, ("embed", "mlp"))(x)
    return dense("down_proj", d, ("mlp", "embed"))(h)


class VisionBlock(nn.Module):
  """Pre-norm attention (2-D rotary, block-diagonal mask) + gated MLP. Scanned over blocks."""

  vcfg: Qwen25VisionConfig
  dtype: Any
  param_dtype: Any
  backend: str = "xla"
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x, is_full, positions, full_mask, window_mask):
    v = self.vcfg
    init = nn.initializers.normal(self.init_std)
    h = RMSNorm(v.norm_eps, self.dtype, self.param_dtype, name="norm1")(x)
    qkv = nn.DenseGeneral((3, v.num_heads, v.head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=logical_init(init, ("embed", None, "heads", "head_dim")),
                          bias_init=logical_init(nn.initializers.zeros, (None, "heads", "head_dim")),
                          dot_general=cpu_dense_dot_general, name="qkv")(h)  # [N, 3, H, D]
    q, k, val = qkv[:, 0][None], qkv[:, 1][None], qkv[:, 2][None]
    # 2-D rotary: frequencies 0..D/4-1 turn with the row, D/4..D/2-1 with the column.
    quarter = v.head_dim // 4
    inv = 1.0 / (v.rope_theta ** (jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter)))
    inv = jnp.concatenate([inv, inv])
    q = apply_rope(q, positions[None], inv, (quarter, quarter))
    k = apply_rope(k, positions[None], inv, (quarter, quarter))
    mask = jnp.where(is_full, full_mask, window_mask)[None]
    out = attention_lib.attend(q, k, val, mask, self.backend)[0]
    out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=logical_init(init, ("heads", "head_dim", "embed")),
                          bias_init=logical_init(nn.initializers.zeros, ("embed",)),
                          dot_general=cpu_dense_dot_general, name="proj")(out)
    x = x + out
    h = RMSNorm(v.norm_eps, self.dtype, self.param_dtype, name="norm2")(x)
    x = x + VisionMLP(v.intermediate_size, self.dtype, self.param_dtype, self.init_std, name="mlp")(h)
    return x, None


class PatchMerger(nn.Module):
  """RMSNorm, then an MLP over each merge x merge group of tokens concatenated -> d_model."""

  vcfg: Qwen25VisionConfig
  dtype: Any
  param_dtype: Any
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x):
    v = self.vcfg
    init = nn.initializers.normal(self.init_std)
    x = RMSNorm(1e-6, self.dtype, self.param_dtype, name="ln_q")(x)
    x = x.reshape(-1, v.hidden_size * v.merge_unit)
    width = x.shape[-1]
    x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=logical_init(init, (None, "mlp")),
                 bias_init=logical_init(nn.initializers.zeros, ("mlp",)), dot_general=cpu_dense_dot_general,
                 name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(v.out_hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical_init(init, ("mlp", "embed")),
                    bias_init=logical_init(nn.initializers.zeros, ("embed",)), dot_general=cpu_dense_dot_general,
                    name="fc2")(x)


class VisionTower(nn.Module):
  """patches [N, C*T*P*P] + static grids -> merged visual tokens [N / merge^2, d_model] in processor order."""

  vcfg: Qwen25VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  backend: str = "xla"
  remat: str = "none"
  init_std: float = 0.02

  @nn.compact
  def __call__(self, patches, grid_thw: tuple[Grid, ...]):
    v = self.vcfg
    layout = vision_layout(tuple(tuple(int(x) for x in g) for g in grid_thw), v)
    n = layout["order"].shape[0]
    if patches.shape != (n, v.patch_dim):
      raise ValueError(f"image patches have shape {tuple(patches.shape)}; the grids {tuple(grid_thw)} need "
                       f"({n}, {v.patch_dim}) = (sum t*h*w, channels*temporal_patch_size*patch_size^2)")
    x = nn.Dense(v.hidden_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical_init(nn.initializers.normal(self.init_std), (None, "embed")),
                 dot_general=cpu_dense_dot_general, name="patch_embed")(patches.astype(self.dtype))
    x = x[layout["order"]]
    segments = jnp.asarray(layout["frame_segments"])
    full_mask = segments[:, None] == segments[None, :]
    windows = jnp.asarray(layout["window_segments"])
    window_mask = windows[:, None] == windows[None, :]
    is_full = jnp.asarray([i in v.fullatt_block_indexes for i in range(v.depth)])
    block = VisionBlock
    if self.remat != "none":
      block = nn.remat(block, policy=None if self.remat == "full" else
                       jax.checkpoint_policies.dots_with_no_batch_dims_saveable, prevent_cse=False)
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=v.depth,
                     metadata_params={nn.PARTITION_NAME: "layers"})(
                         v, self.dtype, self.param_dtype, self.backend, self.init_std, name="blocks")
    x, _ = blocks(x, is_full, jnp.asarray(layout["positions"]), full_mask, window_mask)
    merged = PatchMerger(v, self.dtype, self.param_dtype, self.init_std, name="merger")(x)
    return merged[layout["restore"]]


class Qwen25VL(nn.Module):
  """Qwen2.5-VL: tokens [B, T] + images -> logits [B, T, V] (fp32).

  Parameters: {"vision_tower": {"patch_embed", "blocks" (stacked), "merger"}, "language_model":
  the core `Decoder`'s tree}.
  """

  cfg: Qwen25VLConfig
  rules: sharding_lib.ShardingRules | None = None

  def setup(self):
    d = self.cfg.decoder
    self.vision_tower = VisionTower(self.cfg.vision, as_dtype(d.dtype), as_dtype(d.param_dtype), d.attention_backend,
                                    d.remat, d.init_std)
    self.language_model = Decoder(d, self.rules)

  def image_features(self, images) -> jax.Array:
    """[N_image_tokens_total, d_model]: merged visual tokens, images in order."""
    patches, grid_thw = images
    return self.vision_tower(patches, tuple(tuple(int(x) for x in g) for g in grid_thw))

  def embed(self, tokens, images) -> jax.Array:
    """Token embeddings [B, T, E] with the image features written over the image tokens (row-major)."""
    emb = self.language_model.embed_tokens(tokens)
    if images is None:
      return emb
    feats = self.image_features(images).astype(emb.dtype)
    is_image = tokens == self.cfg.image_token_id
    if not isinstance(is_image, jax.core.Tracer):
      found = int(np.asarray(is_image).sum())
      if found != feats.shape[0]:
        raise ValueError(f"the tokens hold {found} image tokens (id {self.cfg.image_token_id}) but the images give "
                         f"{feats.shape[0]} features; expand placeholders with expand_image_tokens")
    flat = is_image.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, feats.shape[0] - 1)
    spliced = jnp.where(flat[:, None], feats[index], emb.reshape(-1, emb.shape[-1]))
    return spliced.reshape(emb.shape)

  def __call__(self, tokens, images, positions=None, segment_ids=None) -> jax.Array:
    if positions is None:
      if isinstance(tokens, jax.core.Tracer):
        raise ValueError("Qwen25VL needs M-RoPE positions [B, T, 3] under jit: pass positions from get_rope_index")
      grids = list(images[1]) if images is not None else []
      rows, k = [], 0
      for row in np.asarray(tokens):
        n = len(_runs(row, self.cfg.image_token_id))
        rows.append(get_rope_index(row, grids[k:k + n], self.cfg))
        k += n
      positions = jnp.asarray(np.stack(rows))
    emb = self.embed(tokens, images)
    return self.language_model(None, positions=positions, segment_ids=segment_ids, embeddings=emb)


def _runs(row: np.ndarray, token: int) -> list[int]:
  """Start indices of runs of `token` in a 1-D id array."""
  hit = np.asarray(row) == token
  return [i for i in range(len(hit)) if hit[i] and (i == 0 or not hit[i - 1])]


# ------------------------------------------------------------------ parameters


def _dummy_inputs(cfg: Qwen25VLConfig):
  m = cfg.vision.spatial_merge_size
  grid = ((1, m, m),)
  patches = jnp.zeros((m * m, cfg.vision.patch_dim), jnp.float32)
  tokens = jnp.asarray([[cfg.image_token_id, 0]], jnp.int32)
  positions = jnp.zeros((1, 2, 3), jnp.int32)
  return tokens, (patches, grid), positions


def init_params(cfg: Qwen25VLConfig, rng: jax.Array, rules: sharding_lib.ShardingRules | None = None) -> Any:
  """Random parameters (an unboxed plain tree) for `cfg`."""
  tokens, images, positions = _dummy_inputs(cfg)

  @jax.jit
  def init(key):
    return nn.meta.unbox(Qwen25VL(cfg, rules).init(key, tokens, images, positions)["params"])

  return init(rng)


def abstract_params(cfg: Qwen25VLConfig) -> Any:
  tokens, images, positions = _dummy_inputs(cfg)
  return jax.eval_shape(lambda k: nn.meta.unbox(Qwen25VL(cfg).init(k, tokens, images, positions)["params"]),
                        jax.random.PRNGKey(0))


# Hugging Face tensor names -> our parameter paths. "t": our value is the HF tensor flattened to
# [out, in] and transposed, then reshaped (linear layers, the Conv3d patch embedding, q/k/v heads);
# "copy": reshaped only (biases, norms, embeddings).
@dataclasses.dataclass(frozen=True)
class _Tensor:
  path: tuple[str, ...]
  name: str  # with {i} for a stacked layer index
  kind: str
  layers: int  # 0: not stacked


def _tensor_table(cfg: Qwen25VLConfig, prefixes: dict[str, str]) -> list[_Tensor]:
  vis, lm, head = prefixes["visual"], prefixes["language_model"], prefixes["lm_head"]
  d, v = cfg.decoder, cfg.vision
  out = [_Tensor(("vision_tower", "patch_embed", "kernel"), vis + "patch_embed.proj.weight", "t", 0)]
  blk = vis + "blocks.{i}."
  for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
    out.append(_Tensor(("vision_tower", "blocks", ours, "scale"), blk + theirs + ".weight", "copy", v.depth))
  for ours, theirs in (("attn_qkv", "attn.qkv"), ("proj", "attn.proj"), ("mlp/gate_proj", "mlp.gate_proj"),
                       ("mlp/up_proj", "mlp.up_proj"), ("mlp/down_proj", "mlp.down_proj")):
    path = ("vision_tower", "blocks") + (("qkv",) if ours == "attn_qkv" else tuple(ours.split("/")))
    out.append(_Tensor(path + ("kernel",), blk + theirs + ".weight", "t", v.depth))
    out.append(_Tensor(path + ("bias",), blk + theirs + ".bias", "copy", v.depth))
  out.append(_Tensor(("vision_tower", "merger", "ln_q", "scale"), vis + "merger.ln_q.weight", "copy", 0))
  for ours, theirs in (("fc1", "mlp.0"), ("fc2", "mlp.2")):
    out.append(_Tensor(("vision_tower", "merger", ours, "kernel"), vis + f"merger.{theirs}.weight", "t", 0))
    out.append(_Tensor(("vision_tower", "merger", ours, "bias"), vis + f"merger.{theirs}.bias", "copy", 0))
  out.append(_Tensor(("language_model", "embed", "embedding"), lm + "embed_tokens.weight", "copy", 0))
  layer = lm + "layers.{i}."
  L = d.num_layers
  for proj in ("q_proj", "k_proj", "v_proj"):
    out.append(_Tensor(("language_model", "layers", "attn", proj, "kernel"), layer + f"self_attn.{proj}.weight", "t", L))
    out.append(_Tensor(("language_model", "layers", "attn", proj, "bias"), layer + f"self_attn.{proj}.bias", "copy", L))
  out.append(_Tensor(("language_model", "layers", "attn", "o_proj", "kernel"), layer + "self_attn.o_proj.weight",
                     "t", L))
  out.append(_Tensor(("language_model", "layers", "input_norm", "scale"), layer + "input_layernorm.weight", "copy", L))
  out.append(_Tensor(("language_model", "layers", "post_attn_norm", "scale"),
                     layer + "post_attention_layernorm.weight", "copy", L))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    out.append(_Tensor(("language_model", "layers", "mlp", proj, "kernel"), layer + f"mlp.{proj}.weight", "t", L))
  out.append(_Tensor(("language_model", "final_norm", "scale"), lm + "norm.weight", "copy", 0))
  if not d.tie_embeddings:
    out.append(_Tensor(("language_model", "lm_head", "kernel"), head + "lm_head.weight", "t", 0))
  return out


_PREFIXES_5X = {"visual": "model.visual.", "language_model": "model.language_model.", "lm_head": ""}
_PREFIXES_4X = {"visual": "visual.", "language_model": "model.", "lm_head": ""}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


def _hf_shape(cfg: Qwen25VLConfig, entry: _Tensor, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape for one (per-layer) parameter of ours."""
  if entry.kind == "copy":
    if entry.path[-1] == "bias":
      return (int(np.prod(ours)),)
    return ours
  if entry.path[-2] == "patch_embed":
    v = cfg.vision
    return (ours[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  if entry.path[-2] in ("o_proj", "proj"):  # [H, D, E] -> [E, H*D]
    return (ours[-1], int(np.prod(ours[:-1])))
  return (int(np.prod(ours[1:])), ours[0])  # [in, ...out] -> [out, in]


def _to_ours(x: np.ndarray, entry: _Tensor, ours: tuple[int, ...]) -> np.ndarray:
  if entry.kind == "copy":
    return x.reshape(ours)
  return x.reshape(x.shape[0], -1).T.reshape(ours)


def _to_hf(x: np.ndarray, entry: _Tensor, hf_shape: tuple[int, ...]) -> np.ndarray:
  if entry.kind == "copy":
    return x.reshape(hf_shape)
  n_in = int(np.prod(hf_shape[1:]))
  return x.reshape(n_in, -1).T.reshape(hf_shape)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def load_hf(model_dir: str, *, dtype: str = "float32", param_dtype: str | None = None,
            max_seq_len: int | None = None, attention_backend: str = "xla",
            scan_layers: bool = True) -> tuple[Qwen25VLConfig, Any]:
  """(config, parameters) from a local Hugging Face Qwen2.5-VL directory (config.json + safetensors,
  one file or a sharded index; transformers 4.x or 5.x tensor names). Host numpy, then device arrays."""
  cfg = Qwen25VLConfig.from_hf(hf_config_lib.read_hf_config(model_dir), dtype=dtype, param_dtype=param_dtype,
                               max_seq_len=max_seq_len, attention_backend=attention_backend)
  weights = HFWeights(model_dir)
  names = set(weights.names())
  prefixes = _PREFIXES_5X if any(n.startswith("model.visual.") for n in names) else _PREFIXES_4X
  table = _tensor_table(cfg, prefixes)
  abstract = abstract_params(cfg)
  expected: dict[str, tuple[int, ...]] = {}
  for entry in table:
    shape = tuple(_get(abstract, entry.path).shape)
    inner = shape[1:] if entry.layers else shape
    for i in range(max(entry.layers, 1)):
      expected[entry.name.format(i=i)] = _hf_shape(cfg, entry, inner)
  missing = [n for n in expected if n not in names]
  if missing:
    raise CheckpointError(f"{model_dir}: missing tensor {missing[0]!r}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} (config.json says "
                          f"{cfg.vision.depth} vision blocks, {cfg.decoder.num_layers} decoder layers, "
                          f"tie_word_embeddings={cfg.decoder.tie_embeddings})")
  ignorable = {"lm_head.weight"} if cfg.decoder.tie_embeddings else set()
  unexpected = sorted(n for n in names - set(expected) if n not in ignorable and not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise CheckpointError(f"{model_dir}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}: "
                          "the checkpoint does not match config.json")
  for name, shape in expected.items():
    if tuple(weights.shape(name)) != shape:
      raise CheckpointError(f"tensor {weights.describe(name)} has shape {list(weights.shape(name))}, expected "
                            f"{list(shape)} from config.json")
  target = np.dtype(as_dtype(cfg.decoder.param_dtype))
  params: dict = {}
  for entry in table:
    shape = tuple(_get(abstract, entry.path).shape)
    if entry.layers:
      value = np.stack([_to_ours(np.asarray(weights.tensor(entry.name.format(i=i))), entry, shape[1:])
                        for i in range(entry.layers)])
    else:
      value = _to_ours(np.asarray(weights.tensor(entry.name)), entry, shape)
    _set(params, entry.path, jnp.asarray(value.astype(target)))
  if not scan_layers:
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, scan_layers=False))
    params["language_model"] = unstack_layers(params["language_model"], cfg.decoder.num_layers)
  return cfg, params


def save_hf(out_dir: str, cfg: Qwen25VLConfig, params: Any, hf_config: dict | None = None, *,
            dtype: str | None = None, copy_files_from: str | None = None) -> str:
  """Writes a directory transformers' `Qwen2_5_VLForConditionalGeneration.from_pretrained` loads
  (config.json in the 5.x layout + one model.safetensors with 5.x tensor names). Written to a
  temporary directory next to `out_dir`, then renamed into place."""
  from mlx_med.llm.checkpoint import SIDECAR_FILES
  out_dir = os.path.abspath(out_dir)
  disk = np.dtype(as_dtype(dtype or cfg.decoder.param_dtype))
  if "layers" not in params["language_model"]:
    params = {**params, "language_model": stack_layers(params["language_model"], cfg.decoder.num_layers)}
  specs, producers = [], []
  for entry in _tensor_table(cfg, _PREFIXES_5X):
    leaf = _get(params, entry.path)
    inner = tuple(leaf.shape[1:]) if entry.layers else tuple(leaf.shape)
    hf_shape = _hf_shape(cfg, entry, inner)
    for i in range(max(entry.layers, 1)):
      specs.append((entry.name.format(i=i), hf_shape, disk))
      take = (lambda leaf=leaf, i=i: leaf[i]) if entry.layers else (lambda leaf=leaf: leaf)
      producers.append(lambda take=take, entry=entry, hf_shape=hf_shape:
                       _to_hf(np.asarray(jax.device_get(take()), np.float32), entry, hf_shape).astype(disk))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    write_safetensors(os.path.join(tmp, "model.safetensors"), specs, (p() for p in producers))
    config = cfg.to_hf(hf_config)
    config["dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(disk, "bfloat16")
    checkpoint_lib.write_config_and_sidecars(tmp, config, copy_files_from, SIDECAR_FILES + (
        "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"))
    replace_dir(tmp, out_dir)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


# ------------------------------------------------------------------- inference


@functools.lru_cache(maxsize=8)
def _embed_fn(cfg: Qwen25VLConfig):
  def run(params, tokens, patches, grids):
    return Qwen25VL(cfg).apply({"params": params}, tokens, (patches, grids), method=Qwen25VL.embed)

  return jax.jit(run, static_argnums=(3,))


def prompt_inputs(cfg: Qwen25VLConfig, params: Any, token_ids: Sequence[int], image_inputs: Sequence
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings np.float32 [T, E], M-RoPE positions np.int32 [T, 3]) of one expanded prompt, for the
  sampler's `prompt_embeds` / `prompt_positions`. Compiled once per (token count, image grids)."""
  grids = tuple(_grid_of(item) for item in image_inputs)
  positions = get_rope_index(token_ids, grids, cfg)
  tokens = jnp.asarray(np.asarray(token_ids, np.int32)[None])
  if not grids:
    emb = Decoder(cfg.decoder).apply({"params": params["language_model"]}, tokens, method=Decoder.embed_tokens)
    return np.asarray(emb[0], np.float32), positions
  found = sum(1 for t in token_ids if int(t) == cfg.image_token_id)
  needed = sum(num_image_tokens(g, cfg) for g in grids)
  if found != needed:
    raise ValueError(f"the prompt holds {found} image tokens but its {len(grids)} image(s) need {needed}; "
                     "expand placeholders with expand_image_tokens")
  patches = np.concatenate([np.asarray(item[0], np.float32) for item in image_inputs])
  emb = _embed_fn(cfg)(params, tokens, jnp.asarray(patches), grids)
  return np.asarray(emb[0], np.float32), positions
