"""Images inside chat messages: decode OpenAI `image_url` parts safely, build them, and split them out.

A vision-language chat arrives as OpenAI-style messages whose `content` may be a list of parts:
`{"type": "text", "text": ...}` and `{"type": "image_url", "image_url": {"url": ...}}`. This module
turns such parts into pixels under a strict policy, because a server that opens whatever URL or path
a request names leaks files and makes outbound requests on a client's behalf:

  * `data:image/...;base64,...` URLs are always decoded (the way a client should send an image);
  * `file://...` URLs and absolute paths are read only when the resolved file (symlinks and `..`
    followed first) lies inside `allowed_local_dir` (the server's `--allowed-local-media-path`);
  * `http://` / `https://` URLs are never fetched.
A refusal is an `ImageRefused`; any other bad image (malformed base64, not an image, too large) is an
`ImageInputError`; both are ValueErrors with a one-line message saying what is wrong and what to do.

Decoding: PIL for PNG/JPEG/WebP/GIF/BMP/TIFF (EXIF rotation applied, as transformers' `load_image`
does; transparent pixels composited onto white, as transformers' `convert_to_rgb` and vLLM do; 16-bit
grayscale scaled from 0..65535 to 0..255 rather than clipped), and DICOM / NIfTI files through
`mlx_med.vision.io.load_image` (the header's display window; a multi-frame DICOM gives its first frame,
a NIfTI volume its middle axial slice) rounded to 8 bits. Every image comes back as uint8 [H, W, 3].
Size caps (`MAX_IMAGE_BYTES`, `MAX_IMAGE_PIXELS`) are checked from the encoded size and the header's
dimensions before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import os
import pathlib
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_IMAGE_BYTES = 50 * 1024 * 1024  # encoded size (file or decoded base64)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # width x height

REMOTE_REFUSED = ("remote image URLs are not fetched: send a data: URL (see mlx_med.vlm.messages.image_part) "
                  "or a local file path")

_DATA_URL = re.compile(r"^data:(?P<media>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF",
                "tiff": "TIFF"}


class ImageInputError(ValueError):
  """An image in a message that cannot be used (malformed data URL, not an image, too large, missing file)."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))  # always one line


class ImageRefused(ImageInputError):
  """An image source this process will not read: a remote URL, or a local path outside the allowed directory."""


def _short_url(url: str, n: int = 60) -> str:
  """The start of a URL for messages (a data URL's payload is never echoed)."""
  if url.startswith("data:"):
    return url.split(",", 1)[0][:n] + ",..."
  return url if len(url) <= n else url[:n] + "..."


# ----------------------------------------------------------------------------------------------------
# Decoding


def _pil_to_uint8(im, source: str) -> np.ndarray:
  """A loaded PIL image -> uint8 [H, W, 3]: alpha over white, 16-bit grey scaled, palette expanded."""
  from PIL import Image

  mode = im.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    a = np.asarray(im).astype(np.float64)
    top = 65535.0 if mode != "I" or a.max(initial=0) > 255 else 255.0
    g = np.round(np.clip(a / top, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)
  if mode == "F":
    a = np.asarray(im).astype(np.float64)
    lo, hi = float(np.min(a)), float(np.max(a))
    g = np.zeros(a.shape, np.uint8) if hi <= lo else np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)
  if mode == "RGB":
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
  has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in im.info)
  if has_alpha:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.ascontiguousarray(np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8))
  try:
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
  except (ValueError, OSError) as e:
    raise ImageInputError(f"{source}: image mode {mode} cannot be converted to RGB ({type(e).__name__}); "
                          "save it as an 8-bit RGB or grayscale PNG") from None


def decode_image_bytes(data: bytes, *, source: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """Encoded image bytes (PNG, JPEG, WebP, GIF, BMP, TIFF) -> uint8 [H, W, 3] (see the module doc).

  source names the image in error messages (a file name or the start of a URL).
  """
  from PIL import Image, ImageOps, UnidentifiedImageError

  if not data:
    raise ImageInputError(f"{source}: the image is empty (0 bytes); send the encoded file's bytes")
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      if w * h > max_pixels:
        raise ImageInputError(f"{source}: the image is {w}x{h} = {w * h / 1e6:.1f} Mpx, over the "
                              f"{max_pixels / 1e6:.1f} Mpx limit; downscale it before sending")
      if w == 0 or h == 0:
        raise ImageInputError(f"{source}: the image has no pixels ({w}x{h})")
      im.load()
      im = ImageOps.exif_transpose(im)
      return _pil_to_uint8(im, source)
  except ImageInputError:
    raise
  except Image.DecompressionBombError:
    raise ImageInputError(f"{source}: the image's dimensions exceed the decoder's safety limit (a possible "
                          "decompression bomb); downscale it before sending") from None
  except UnidentifiedImageError:
    raise ImageInputError(f"{source}: not an image PIL can decode (expected PNG, JPEG, WebP, GIF, BMP or TIFF "
                          "bytes); encode the image in one of those formats") from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
    raise ImageInputError(f"{source}: the image data is truncated or corrupt ({type(e).__name__}"
                          f"{': ' + first if first else ''}); encode it again") from None


def _float_to_uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(np.asarray(x, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _load_medical(path: pathlib.Path, kind: str) -> np.ndarray:
  """DICOM / NIfTI through mlx_med.vision.io (display window, [0, 1]) -> uint8 [H, W, 3]."""
  from mlx_med.vision import io as vio

  try:
    img = vio.load_image(path, frame=0) if kind == "dicom" else vio.load_image(path)
  except vio.ImageLoadError as e:
    raise ImageInputError(str(e)) from None
  img = np.asarray(img)
  if img.ndim == 3 and img.shape[-1] not in (1, 3, 4):
    raise ImageInputError(f"{path}: a {img.shape} array where one 2D image is needed; export a single slice")
  return np.ascontiguousarray(vio.to_rgb(_float_to_uint8(img)))


def _load_file(path: pathlib.Path, *, max_bytes: int, max_pixels: int) -> np.ndarray:
  """Read a local image file (no path policy here: callers check it first)."""
  from mlx_med.vision import io as vio

  if not path.exists():
    raise ImageInputError(f"{path}: file not found; check the path")
  if not path.is_file():
    raise ImageInputError(f"{path}: not a regular file; pass an image file")
  size = path.stat().st_size
  if size > max_bytes:
    raise ImageInputError(f"{path}: the file is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                          "limit; downscale or compress it")
  name = path.name.lower()
  if name.endswith(vio.NIFTI_SUFFIXES):
    return _load_medical(path, "nifti")
  if name.endswith(vio.DICOM_SUFFIXES) or vio._is_part10_dicom(path):
    return _load_medical(path, "dicom")
  return decode_image_bytes(path.read_bytes(), source=str(path), max_pixels=max_pixels)


# ----------------------------------------------------------------------------------------------------
# URL policy


def _decode_data_url(url: str, *, max_bytes: int, max_pixels: int) -> np.ndarray:
  m = _DATA_URL.match(url)
  if m is None:
    raise ImageInputError(f"malformed data URL {_short_url(url)!r}: expected data:image/<format>;base64,<data>")
  media = m.group("media").strip().lower()
  params = [p.strip().lower() for p in m.group("params").split(";") if p.strip()]
  if "base64" not in params:
    raise ImageInputError(f"data URL {_short_url(url)!r} is not base64-encoded: "
                          "use data:image/<format>;base64,<data>")
  if media and not media.startswith("image/") and media not in ("application/dicom", "application/octet-stream"):
    raise ImageInputError(f"data URL media type {media!r} is not an image: use data:image/<format>;base64,<data>")
  payload = re.sub(r"\s+", "", urllib.parse.unquote(m.group("data")) if "%" in m.group("data") else m.group("data"))
  if len(payload) * 3 // 4 > max_bytes:
    raise ImageInputError(f"data URL image is about {len(payload) * 3 / 4 / 2**20:.1f} MiB, over the "
                          f"{max_bytes / 2**20:.0f} MiB limit; downscale or compress it")
  try:
    data = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=b"-_" if ("-" in payload or "_" in payload)
                            else None, validate=True)
  except (binascii.Error, ValueError):
    raise ImageInputError(f"data URL {_short_url(url)!r} holds invalid base64; encode the image bytes with "
                          "standard base64 (see mlx_med.vlm.messages.image_part)") from None
  source = f"data URL ({media or 'no media type'})"
  if media == "application/dicom" or data[128:132] == b"DICM":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
      p = pathlib.Path(d) / "image.dcm"
      p.write_bytes(data)
      try:
        return _load_medical(p, "dicom")
      except ImageInputError as e:
        raise ImageInputError(str(e).replace(str(p), source)) from None
  return decode_image_bytes(data, source=source, max_pixels=max_pixels)


def _local_path(url: str) -> pathlib.Path:
  if url.startswith("file:"):
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
      raise ImageRefused(f"file URL {_short_url(url)!r} names host {parsed.netloc!r}: only local files "
                         "(file:///absolute/path) are read")
    return pathlib.Path(urllib.request.url2pathname(parsed.path))
  return pathlib.Path(url)


def resolve_local_path(url: str, allowed_local_dir: str | os.PathLike | None) -> pathlib.Path:
  """The real path a `file://` URL or absolute path names, if it lies inside `allowed_local_dir`.

  Symlinks and `..` are resolved before the check, so neither can lead outside the directory.
  Raises ImageRefused otherwise (also when `allowed_local_dir` is None).
  """
  p = _local_path(url)
  if not p.is_absolute():
    raise ImageRefused(f"image path {_short_url(url)!r} is relative: send an absolute path or a file:// URL "
                       "inside the allowed directory, or a data: URL")
  if allowed_local_dir is None:
    raise ImageRefused(f"local image paths are refused ({_short_url(url)!r}): no allowed local directory is set "
                       "(allowed_local_dir / the server's --allowed-local-media-path); send a data: URL instead")
  root = pathlib.Path(allowed_local_dir).expanduser().resolve()
  real = p.resolve()  # follows every symlink and collapses `..` (strict=False: a missing file still resolves)
  if real != root and root not in real.parents:
    raise ImageRefused(f"image path {_short_url(url)!r} is outside the allowed directory {str(root)!r} "
                       "(after resolving symlinks and '..'); move the file there or send a data: URL")
  return real


def load_image_url(url: str, *, allowed_local_dir: str | os.PathLike | None = None,
                   max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """An image part's URL -> uint8 [H, W, 3] under the policy in the module doc.

  data: URLs always; file:// URLs and absolute paths only inside `allowed_local_dir`; http(s) never
  (ImageRefused). Other problems raise ImageInputError (both are ValueErrors with one-line messages).
  """
  if not isinstance(url, str):
    raise ImageInputError(f"an image URL must be a string, got {type(url).__name__}")
  url = url.strip()
  scheme = url.split(":", 1)[0].lower() if ":" in url else ""
  if scheme == "data":
    return _decode_data_url(url, max_bytes=max_bytes, max_pixels=max_pixels)
  if scheme in ("http", "https"):
    raise ImageRefused(REMOTE_REFUSED)
  if scheme == "file" or url.startswith(("/", "\\")) or (os.name == "nt" and os.path.isabs(url)):
    return _load_file(resolve_local_path(url, allowed_local_dir), max_bytes=max_bytes, max_pixels=max_pixels)
  if scheme and len(scheme) > 1:
    raise ImageRefused(f"image URL scheme {scheme!r} is not supported ({_short_url(url)!r}); send a data: URL "
                       "or a local file path")
  raise ImageRefused(f"image URL {_short_url(url)!r} is neither a data: URL nor an absolute path; send a data: URL "
                     "(see mlx_med.vlm.messages.image_part) or an absolute path inside the allowed directory")


# ----------------------------------------------------------------------------------------------------
# Building and splitting messages


def _to_pil(image: Any):
  """A path, numpy array (uint8, or floats in [0, 1]; [H, W] or [H, W, 1|3|4]) or PIL image -> PIL image."""
  from PIL import Image

  if hasattr(image, "mode") and hasattr(image, "save"):
    return image
  if isinstance(image, (str, os.PathLike)):
    p = pathlib.Path(image).expanduser()
    return Image.fromarray(_load_file(p.resolve(), max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS))
  a = np.asarray(image)
  if a.dtype != np.uint8:
    if not np.issubdtype(a.dtype, np.floating):
      raise ImageInputError(f"image_part takes uint8 arrays or floats in [0, 1]; got dtype {a.dtype}")
    lo, hi = float(np.min(a)), float(np.max(a))
    if lo < -1e-6 or hi > 1 + 1e-6:
      raise ImageInputError(f"image_part takes floats in [0, 1]; got values in [{lo:.4g}, {hi:.4g}] "
                            "(scale the image to [0, 1] or pass uint8)")
    a = _float_to_uint8(a)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[:, :, 0]
  if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
    raise ImageInputError(f"image_part takes an [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] array; got {a.shape}")
  return Image.fromarray(np.ascontiguousarray(a))


def encode_image(image: Any, *, format: str = "png") -> str:
  """An image (path, array or PIL) -> a `data:image/<format>;base64,...` URL."""
  from PIL import Image

  fmt = _PIL_FORMATS.get(format.lower())
  if fmt is None:
    raise ValueError(f"image format {format!r} is not supported; use one of {', '.join(sorted(_PIL_FORMATS))}")
  im = _to_pil(image)
  if fmt == "JPEG" and im.mode not in ("RGB", "L"):
    im = Image.fromarray(_pil_to_uint8(im, "image"))  # JPEG has no alpha: composite onto white
  buf = io.BytesIO()
  im.save(buf, format=fmt)
  media = "jpeg" if fmt == "JPEG" else fmt.lower()
  return f"data:image/{media};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_part(image: Any, *, format: str = "png") -> dict:
  """An OpenAI chat content part carrying `image` inline:
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}.

  image: a file path (PNG/JPEG/..., DICOM, NIfTI; decoded here, so the receiver needs no file access),
  a numpy array (uint8, or floats in [0, 1]) or a PIL image. format: "png" (lossless, default), "jpeg", "webp".
  """
  return {"type": "image_url", "image_url": {"url": encode_image(image, format=format)}}


def _part_url(part: dict, where: str) -> str:
  value = part.get("image_url")
  if isinstance(value, dict):
    value = value.get("url")
  if not isinstance(value, str) or not value:
    raise ImageInputError(f"{where}: an image_url part needs {{'image_url': {{'url': '<data: URL or path>'}}}}")
  return value


def split_messages(messages: Sequence[dict], **load_kwargs: Any) -> tuple[list[dict], list[np.ndarray]]:
  """OpenAI chat messages with image parts -> (messages for an HF chat template, images in order).

  Each {"type": "image_url", ...} part becomes {"type": "image"} (the placeholder HF chat templates
  expect) and its image is decoded with `load_image_url(url, **load_kwargs)` (e.g. allowed_local_dir=).
  Text parts and string contents are kept as they are; the input is not modified.
  """
  out: list[dict] = []
  images: list[np.ndarray] = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ImageInputError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
    content = message.get("content")
    if not isinstance(content, list):
      out.append(copy.deepcopy(dict(message)))
      continue
    parts = []
    for j, part in enumerate(content):
      where = f"messages[{i}].content[{j}]"
      if isinstance(part, str):
        parts.append({"type": "text", "text": part})
        continue
      if not isinstance(part, dict):
        raise ImageInputError(f"{where}: a content part must be a dict, got {type(part).__name__}")
      kind = part.get("type")
      if kind == "image_url":
        images.append(load_image_url(_part_url(part, where), **load_kwargs))
        parts.append({"type": "image"})
      elif kind == "text":
        parts.append(copy.deepcopy(dict(part)))
      else:
        raise ImageInputError(f"{where}: content part type {kind!r} is not supported; use 'text' or 'image_url'")
    new = copy.deepcopy({k: v for k, v in message.items() if k != "content"})
    new["content"] = parts
    out.append(new)
  return out, images


__all__ = [
  "MAX_IMAGE_BYTES",
  "MAX_IMAGE_PIXELS",
  "REMOTE_REFUSED",
  "ImageInputError",
  "ImageRefused",
  "decode_image_bytes",
  "encode_image",
  "image_part",
  "load_image_url",
  "resolve_local_path",
  "split_messages",
]
