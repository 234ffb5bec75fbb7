"""Image processors of the vision-language models: HF's CLIP (LLaVA) and Qwen2-VL preprocessing in numpy + PIL.

A VLM only answers as well as the pixels it is fed look like the ones it was trained on, so each
processor here reproduces its transformers counterpart step for step (no torch involved):

  * `ClipImageProcessor` (LLaVA-1.5's `CLIPImageProcessor`; with `do_pad`, transformers'
    `LlavaImageProcessor`, which first pads to a square of colour int(255 * image_mean), centred, as the
    original LLaVA-1.5 did): convert to RGB, resize the shortest edge
    to `size` (PIL bicubic; the long edge int(size * long / short)) or to height x width, centre crop
    (top = (H - h) // 2, zero padding when smaller), rescale by 1/255 (float64, then float32),
    normalise (x - mean) / std in float32. Output: float32 [h, w, 3] (NHWC per image).
  * `Qwen2VLImageProcessor` (Qwen2-VL / Qwen2.5-VL): `smart_resize` to multiples of
    factor = patch_size * merge_size with min_pixels <= h * w <= max_pixels, PIL bicubic resize,
    rescale, normalise, then patchify to [grid_h * grid_w, C * temporal_patch_size * P * P]: rows in
    merge-window-major order (window row, window column, row inside the window, column inside the
    window), each row (channel, temporal copy, patch row, patch column); one image is repeated over the
    temporal_patch_size frames, so grid_t = 1. Output: (patches float32, (t, h, w)).

Reference: transformers 5's PIL-backed processors (`CLIPImageProcessorPil`, `Qwen2VLImageProcessorPil`;
in transformers 4 the "slow" `CLIPImageProcessor` / `Qwen2VLImageProcessor`), which these equal to the
last bit on uint8 input. transformers 5's default classes of the same names resize with torchvision
instead (bicubic on tensors, antialiased). Their outputs agree with PIL's to one 8-bit level for
many size pairs but depart by up to ~20 levels for others (measured in the tests, e.g. 33x45 -> 32x48),
and when a centre crop is larger than the image they pad one row/column less on the top/left; with
no resampling to do, the two agree to float rounding. Hence both the name and the backend are stated.

RGB conversion follows transformers: grayscale is copied to three channels, transparency is
composited onto white (PIL images with PIL's integer blend, arrays with a rounded float blend), other
PIL modes go through `convert("RGB")`. Float arrays must lie in [0, 1] and are rounded to 8 bits first
(what a PNG export stores), so float and uint8 inputs of the same picture agree.

Configs are transformers' `preprocessor_config.json` (or the `image_processor` entry of a
`processor_config.json`, as transformers 5 saves processors); `to_dict()` / `save(dir)` write one
transformers loads back. `load_image_processor(model_dir)` picks the class from `image_processor_type`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from mlx_med.vision import io as vio

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"

# PIL's filter codes, as HF stores `resample`
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_RESAMPLE_NAMES = {v: k for k, v in _RESAMPLE.items()}


# ----------------------------------------------------------------------------------------------------
# Shared steps


def to_rgb_uint8(image: Any, *, do_convert_rgb: bool = True) -> np.ndarray:
  """uint8 [H, W, 3] from a PIL image or an array (uint8, or floats in [0, 1]; [H, W] or [H, W, 1|3|4]),
  converted as transformers' `convert_to_rgb` does (see the module doc)."""
  from PIL import Image

  if isinstance(image, Image.Image):
    if do_convert_rgb:
      has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
      if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
      if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = np.asarray(image)  # 16-bit / float grey: scaled below like an array, not clipped by PIL
      else:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    else:
      image = np.asarray(image)
  a = np.asarray(image)
  if a.dtype != np.uint8:
    if a.dtype in (np.uint16, np.int32) and a.ndim == 2:
      a = np.round(np.clip(a.astype(np.float64) / (65535.0 if a.max(initial=0) > 255 else 255.0), 0, 1) * 255)
      a = a.astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
      lo, hi = (float(np.min(a)), float(np.max(a))) if a.size else (0.0, 0.0)
      if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"image processors take uint8 images or floats in [0, 1]; got values in [{lo:.4g}, {hi:.4g}] "
                         "(scale the image to [0, 1], e.g. with mlx_med.vision.io.load_image's window)")
      a = np.round(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
      raise ValueError(f"image processors take uint8 images or floats in [0, 1]; got dtype {a.dtype}")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[:, :, 0]
  if a.ndim == 2:
    return np.repeat(a[:, :, None], 3, axis=2)
  if a.ndim != 3 or a.shape[-1] not in (3, 4):
    raise ValueError(f"image processors take [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] images (channels last); "
                     f"got shape {a.shape}")
  if a.shape[-1] == 4:
    if not do_convert_rgb:
      raise ValueError("an RGBA image needs do_convert_rgb=True (transparency is composited onto white)")
    alpha = a[..., 3:4].astype(np.float64) / 255.0
    a = np.round(alpha * a[..., :3] + (1.0 - alpha) * 255.0).astype(np.uint8)
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ValueError(f"the image has no pixels (shape {a.shape})")
  return np.ascontiguousarray(a)


def _pil_resize(a: np.ndarray, height: int, width: int, resample: str) -> np.ndarray:
  from PIL import Image

  return np.asarray(Image.fromarray(a).resize((int(width), int(height)), resample=_RESAMPLE[resample]))


def _rescale_normalize(a: np.ndarray, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                       mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """HF's numpy steps: rescale in float64 then float32; (x - mean) / std in float32."""
  x = (a.astype(np.float64) * rescale_factor).astype(np.float32) if do_rescale else a.astype(np.float32)
  if do_normalize:
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return x.astype(np.float32)


def _resample_name(value: Any, source: str) -> str:
  if isinstance(value, str):
    name = value.strip().lower()
  else:
    try:
      name = _RESAMPLE_NAMES.get(int(value), "")
    except (TypeError, ValueError):
      name = ""
  if name not in _RESAMPLE:
    raise ValueError(f"{source}: resample {value!r} is not a PIL filter (0-5 or one of {', '.join(_RESAMPLE)})")
  return name


def _triple(value: Any, name: str, source: str) -> tuple[float, float, float]:
  if isinstance(value, (int, float)):
    return (float(value),) * 3
  try:
    t = tuple(float(v) for v in value)
  except TypeError:
    t = ()
  if len(t) != 3:
    raise ValueError(f"{source}: {name} needs 3 values (R, G, B), got {value!r}")
  return t


def _atomic_write_json(path: pathlib.Path, d: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


_COMMON_KEYS = ("do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                "do_convert_rgb", "size", "image_processor_type", "feature_extractor_type")


# ----------------------------------------------------------------------------------------------------
# CLIP (LLaVA-1.5)


class _ConfigFile:
  """preprocessor_config.json in and out, for a processor with `from_dict(d, source=)` and `to_dict()`."""

  @classmethod
  def from_dir(cls, model_dir: str | os.PathLike):
    d, source = read_processor_config(model_dir)
    return cls.from_dict(d, source=source)

  def save(self, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write `preprocessor_config.json` in out_dir (temporary name, then rename); returns its path."""
    path = pathlib.Path(out_dir) / PREPROCESSOR_FILE
    _atomic_write_json(path, self.to_dict())
    return path


@dataclasses.dataclass(frozen=True)
class ClipImageProcessor(_ConfigFile):
  """transformers' CLIPImageProcessor as data (see the module doc).

  size: {"shortest_edge": s} (the short side becomes s) or {"height": h, "width": w} (exact);
  crop_size: {"height": h, "width": w}. Defaults are CLIP ViT-L/14's (224).
  """
  do_resize: bool = True
  size: tuple[tuple[str, int], ...] = (("shortest_edge", 224),)
  resample: str = "bicubic"
  do_center_crop: bool = True
  crop_size: tuple[int, int] = (224, 224)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = vio.OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = vio.OPENAI_CLIP_STD
  do_convert_rgb: bool = True
  do_pad: bool = False  # LlavaImageProcessor: pad to a square first
  extra: tuple[tuple[str, Any], ...] = ()  # other keys of the config file, written back by to_dict

  def __post_init__(self):
    keys = dict(self.size)
    if not (set(keys) == {"shortest_edge"} or set(keys) == {"height", "width"}):
      raise ValueError(f"ClipImageProcessor size {keys}: use {{'shortest_edge': n}} or {{'height': h, 'width': w}}")
    if any(int(v) <= 0 for v in keys.values()) or min(self.crop_size) <= 0:
      raise ValueError(f"ClipImageProcessor sizes must be positive: size {keys}, crop_size {self.crop_size}")
    if self.resample not in _RESAMPLE:
      raise ValueError(f"resample {self.resample!r}: use one of {', '.join(_RESAMPLE)}")

  @property
  def output_size(self) -> tuple[int, int] | None:
    """(h, w) of every output, or None when it follows the input (shortest-edge resize without a crop)."""
    if self.do_center_crop:
      return tuple(self.crop_size)
    keys = dict(self.size)
    if self.do_resize and "height" in keys:
      return int(keys["height"]), int(keys["width"])
    return None

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    """(h, w) after the resize step (HF's get_resize_output_image_size without max_size)."""
    if not self.do_resize:
      return height, width
    keys = dict(self.size)
    if "height" in keys:
      return int(keys["height"]), int(keys["width"])
    s = int(keys["shortest_edge"])
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(s * long / short)
    return (new_long, s) if width <= height else (s, new_long)

  def __call__(self, image: Any) -> np.ndarray:
    """One image (uint8 / [0, 1] float array, or PIL) -> float32 [h, w, 3] pixel values."""
    a = to_rgb_uint8(image, do_convert_rgb=self.do_convert_rgb)
    if self.do_pad:
      a = self.pad_to_square(a)
    if self.do_resize:
      a = _pil_resize(a, *self.resized_size(*a.shape[:2]), self.resample)
    if self.do_center_crop:
      a = vio._center_crop(a, int(self.crop_size[0]), int(self.crop_size[1]))
    return _rescale_normalize(a, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                              self.image_std)

  def pad_to_square(self, a: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3], S = max(H, W): the image centred (offset (S - side) // 2) on the
    colour int(255 * image_mean) (LlavaImageProcessor's background)."""
    h, w = a.shape[:2]
    if h == w:
      return a
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray([int(m * 255) for m in self.image_mean], np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = a
    return out

  @classmethod
  def from_dict(cls, d: dict, *, source: str = "image processor config") -> ClipImageProcessor:
    """From a transformers preprocessor_config.json dict (CLIPImageProcessor / CLIPFeatureExtractor, and
    LlavaImageProcessor, whose `do_pad` only that type honours)."""
    kind = str(d.get("image_processor_type") or "")
    llava = kind.startswith("LlavaImageProcessor")
    size = d.get("size", 224)
    if isinstance(size, (int, float)):  # CLIP's default_to_square=False: an int is the shortest edge
      size_t = (("shortest_edge", int(size)),)
    elif isinstance(size, (list, tuple)) and len(size) == 2:
      size_t = (("height", int(size[0])), ("width", int(size[1])))
    elif isinstance(size, dict):
      if "shortest_edge" in size and size.get("longest_edge") is None and "height" not in size:
        size_t = (("shortest_edge", int(size["shortest_edge"])),)
      elif "height" in size and "width" in size and "shortest_edge" not in size:
        size_t = (("height", int(size["height"])), ("width", int(size["width"])))
      else:
        raise ValueError(f"{source}: size {size} is not supported by ClipImageProcessor; "
                         "use {'shortest_edge': n} or {'height': h, 'width': w}")
    else:
      raise ValueError(f"{source}: size {size!r} is not an int, [h, w] or a dict")
    crop = d.get("crop_size", {"height": 224, "width": 224})
    if isinstance(crop, dict):
      if "height" not in crop or "width" not in crop:
        raise ValueError(f"{source}: crop_size {crop} needs 'height' and 'width'")
      crop_t = (int(crop["height"]), int(crop["width"]))
    elif isinstance(crop, (list, tuple)) and len(crop) == 2:
      crop_t = (int(crop[0]), int(crop[1]))
    else:
      crop_t = (int(crop), int(crop))
    known = set(_COMMON_KEYS) | {"do_center_crop", "crop_size"} | ({"do_pad"} if llava else set())
    extra = tuple(sorted((k, _freeze(v)) for k, v in d.items() if k not in known))
    try:
      return cls(do_resize=bool(d.get("do_resize", True)), size=size_t,
                 resample=_resample_name(d.get("resample", 3), source),
                 do_center_crop=bool(d.get("do_center_crop", True)), crop_size=crop_t,
                 do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                 do_normalize=bool(d.get("do_normalize", True)),
                 image_mean=_triple(d.get("image_mean", vio.OPENAI_CLIP_MEAN), "image_mean", source),
                 image_std=_triple(d.get("image_std", vio.OPENAI_CLIP_STD), "image_std", source),
                 do_convert_rgb=bool(d.get("do_convert_rgb", True)), do_pad=llava and bool(d.get("do_pad", False)),
                 extra=extra)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  def to_dict(self) -> dict:
    """A preprocessor_config.json dict transformers' CLIPImageProcessor (LlavaImageProcessor with do_pad) loads."""
    d = {k: _thaw(v) for k, v in self.extra}
    if self.do_pad:
      d["do_pad"] = True
    d.update({
      "image_processor_type": "LlavaImageProcessor" if self.do_pad else "CLIPImageProcessor", "do_resize": self.do_resize,
      "size": {k: int(v) for k, v in self.size}, "resample": _RESAMPLE[self.resample],
      "do_center_crop": self.do_center_crop, "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
      "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
      "image_mean": list(self.image_mean), "image_std": list(self.image_std), "do_convert_rgb": self.do_convert_rgb,
    })
    return d



# ----------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
  """Qwen2-VL's target size: both sides multiples of `factor`, min_pixels <= h * w <= max_pixels, the
  aspect ratio kept as closely as possible (Python's round: halves go to the even multiple)."""
  if height <= 0 or width <= 0:
    raise ValueError(f"smart_resize: the image has no pixels ({height}x{width})")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"the image is {height}x{width}: Qwen2-VL takes aspect ratios up to 200, got "
                     f"{max(height, width) / min(height, width):.1f}; crop or pad it first")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return int(h_bar), int(w_bar)


def patchify(x: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
  """float [H, W, C] (H, W multiples of patch_size * merge_size) -> [gh * gw, C * T * P * P] in Qwen2-VL's
  order: rows (window row, window column, row in window, column in window), columns (C, T, P, P)."""
  h, w, c = x.shape
  p, m, t = patch_size, merge_size, temporal_patch_size
  gh, gw = h // p, w // p
  if h % (p * m) or w % (p * m):
    raise ValueError(f"patchify: {h}x{w} is not a multiple of patch_size * merge_size = {p * m}")
  chw = np.transpose(x, (2, 0, 1)).reshape(c, gh // m, m, p, gw // m, m, p)
  rows = np.transpose(chw, (1, 4, 2, 5, 0, 3, 6))  # (gh/m, gw/m, m, m, C, P, P)
  rows = np.broadcast_to(rows[:, :, :, :, :, None], rows.shape[:5] + (t,) + rows.shape[5:])
  return np.ascontiguousarray(rows.reshape(gh * gw, c * t * p * p), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageProcessor(_ConfigFile):
  """transformers' Qwen2VLImageProcessor as data (see the module doc); min/max_pixels are the
  size={"shortest_edge", "longest_edge"} of newer configs. Defaults are Qwen2-VL's."""
  do_resize: bool = True
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  resample: str = "bicubic"
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = vio.OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = vio.OPENAI_CLIP_STD
  do_convert_rgb: bool = True
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  extra: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if min(self.patch_size, self.temporal_patch_size, self.merge_size) <= 0:
      raise ValueError("patch_size, temporal_patch_size and merge_size must be positive")
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(f"need 0 < min_pixels <= max_pixels; got {self.min_pixels} and {self.max_pixels}")
    if self.resample not in _RESAMPLE:
      raise ValueError(f"resample {self.resample!r}: use one of {', '.join(_RESAMPLE)}")

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    """(h, w) after smart_resize (the input size when do_resize is off)."""
    if not self.do_resize:
      return height, width
    return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

  def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of an input image of that size, without processing it."""
    h, w = self.resized_size(height, width)
    return 1, h // self.patch_size, w // self.patch_size

  def num_image_tokens(self, height: int, width: int) -> int:
    """Tokens the language model sees for such an image: t * h * w / merge_size^2."""
    t, h, w = self.grid_thw(height, width)
    return t * h * w // (self.merge_size ** 2)

  def __call__(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches float32 [grid_h * grid_w, C * T * P * P], (1, grid_h, grid_w))."""
    a = to_rgb_uint8(image, do_convert_rgb=self.do_convert_rgb)
    h, w = self.resized_size(*a.shape[:2])
    if self.do_resize:
      a = _pil_resize(a, h, w, self.resample)
    elif h % self.factor or w % self.factor:
      raise ValueError(f"do_resize is off but the image is {h}x{w}, not a multiple of patch_size * merge_size = "
                       f"{self.factor}; turn do_resize on or resize the image first")
    x = _rescale_normalize(a, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                           self.image_std)
    patches = patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)
    return patches, (1, h // self.patch_size, w // self.patch_size)

  @classmethod
  def from_dict(cls, d: dict, *, source: str = "image processor config") -> Qwen2VLImageProcessor:
    """From a transformers preprocessor_config.json dict (min_pixels/max_pixels win over size, as in HF)."""
    size = d.get("size") or {}
    if not isinstance(size, dict):
      raise ValueError(f"{source}: size {size!r} must be {{'shortest_edge': min_pixels, 'longest_edge': max_pixels}}")  # noqa: TRY004 (a bad config value)
    min_px = d.get("min_pixels") if d.get("min_pixels") is not None else size.get("shortest_edge", size.get("min_pixels"))
    max_px = d.get("max_pixels") if d.get("max_pixels") is not None else size.get("longest_edge", size.get("max_pixels"))
    known = set(_COMMON_KEYS) | {"min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"}
    extra = tuple(sorted((k, _freeze(v)) for k, v in d.items() if k not in known))
    try:
      return cls(do_resize=bool(d.get("do_resize", True)),
                 min_pixels=int(min_px if min_px is not None else 56 * 56),
                 max_pixels=int(max_px if max_px is not None else 28 * 28 * 1280),
                 resample=_resample_name(d.get("resample", 3), source),
                 do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                 do_normalize=bool(d.get("do_normalize", True)),
                 image_mean=_triple(d.get("image_mean", vio.OPENAI_CLIP_MEAN), "image_mean", source),
                 image_std=_triple(d.get("image_std", vio.OPENAI_CLIP_STD), "image_std", source),
                 do_convert_rgb=bool(d.get("do_convert_rgb", True)), patch_size=int(d.get("patch_size", 14)),
                 temporal_patch_size=int(d.get("temporal_patch_size", 2)), merge_size=int(d.get("merge_size", 2)),
                 extra=extra)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from None

  def to_dict(self) -> dict:
    """A preprocessor_config.json dict transformers' Qwen2VLImageProcessor loads (both spellings of the
    pixel bounds: min/max_pixels and size, which agree)."""
    d = {k: _thaw(v) for k, v in self.extra}
    d.update({
      "image_processor_type": "Qwen2VLImageProcessor", "do_resize": self.do_resize,
      "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
      "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
      "resample": _RESAMPLE[self.resample], "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
      "do_normalize": self.do_normalize, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
      "do_convert_rgb": self.do_convert_rgb, "patch_size": self.patch_size,
      "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
    })
    return d



# ----------------------------------------------------------------------------------------------------
# Config files and dispatch


def _freeze(v: Any) -> Any:
  """JSON values -> hashable (dicts and lists to tuples) for the frozen dataclasses' `extra`."""
  if isinstance(v, dict):
    return ("__dict__",) + tuple(sorted((k, _freeze(x)) for k, x in v.items()))
  if isinstance(v, list):
    return ("__list__",) + tuple(_freeze(x) for x in v)
  return v


def _thaw(v: Any) -> Any:
  if isinstance(v, tuple) and v and v[0] == "__dict__":
    return {k: _thaw(x) for k, x in v[1:]}
  if isinstance(v, tuple) and v and v[0] == "__list__":
    return [_thaw(x) for x in v[1:]]
  return v


def read_processor_config(model_dir: str | os.PathLike) -> tuple[dict, str]:
  """(image processor dict, file it came from) from a model directory: `preprocessor_config.json`, else
  the "image_processor" entry of transformers 5's `processor_config.json`. A file path is read directly."""
  p = pathlib.Path(model_dir)
  candidates = [p] if p.is_file() else [p / PREPROCESSOR_FILE, p / PROCESSOR_FILE]
  for f in candidates:
    if not f.is_file():
      continue
    try:
      d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{f}: not valid JSON ({type(e).__name__}); restore the file from the checkpoint") from None
    if not isinstance(d, dict):
      raise ValueError(f"{f}: expected a JSON object, got {type(d).__name__}")  # noqa: TRY004 (a bad file)
    if f.name == PROCESSOR_FILE or "image_processor" in d and isinstance(d["image_processor"], dict):
      sub = d.get("image_processor")
      if not isinstance(sub, dict):
        continue
      return sub, f"{f} (image_processor)"
    return d, str(f)
  raise ValueError(f"{p}: no {PREPROCESSOR_FILE} (nor an image_processor entry in {PROCESSOR_FILE}); copy the "
                   "checkpoint's processor files into the model directory")


_CLASSES = {
  "CLIPImageProcessor": ClipImageProcessor,
  "CLIPFeatureExtractor": ClipImageProcessor,
  "LlavaImageProcessor": ClipImageProcessor,
  "Qwen2VLImageProcessor": Qwen2VLImageProcessor,
}


def image_processor_from_dict(d: dict, *, source: str = "image processor config"):
  """A processor for the config's `image_processor_type` (transformers' "Fast" / "Pil" variants included)."""
  kind = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")
  base = kind
  for suffix in ("Fast", "Pil"):
    if base.endswith(suffix) and base[: -len(suffix)] in _CLASSES:
      base = base[: -len(suffix)]
  if base not in _CLASSES:
    shown = repr(kind) if kind else "missing"
    raise ValueError(f"{source}: image_processor_type {shown} is not supported; supported: "
                     f"{', '.join(sorted(_CLASSES))} (LLaVA-1.5 uses CLIPImageProcessor or LlavaImageProcessor, Qwen2/2.5-VL "
                     "Qwen2VLImageProcessor)")
  return _CLASSES[base].from_dict(d, source=source)


def load_image_processor(model_dir: str | os.PathLike) -> ClipImageProcessor | Qwen2VLImageProcessor:
  """The image processor a Hugging Face model directory declares (see read_processor_config)."""
  d, source = read_processor_config(model_dir)
  return image_processor_from_dict(d, source=source)


__all__ = [
  "ClipImageProcessor",
  "Qwen2VLImageProcessor",
  "image_processor_from_dict",
  "load_image_processor",
  "patchify",
  "read_processor_config",
  "smart_resize",
  "to_rgb_uint8",
]
