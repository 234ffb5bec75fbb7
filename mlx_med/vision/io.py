"""Medical image I/O: DICOM, NIfTI and PNG/JPEG files to float arrays, and the HF image processors' preprocessing.

Every imaging capability (embeddings, segmentation, VLMs) reads its images through this module, so a
CT slice looks the same whether it arrived as DICOM, as a NIfTI volume or as a PNG export, and a model
sees exactly the pixels its Hugging Face image processor would have given it.

Loading (`load_image`) returns float32 arrays:
  * grayscale [H, W] (or [F, H, W] for every frame of a multi-frame DICOM), colour [H, W, 3];
  * with a display window (the default) values lie in [0, 1]: 0 is black, 1 is white;
  * with `window="none"` DICOM and NIfTI give their physical values (e.g. Hounsfield units: stored
    value x RescaleSlope + RescaleIntercept, or NIfTI's scl_slope/scl_inter), PNG/JPEG give [0, 1].

Windows (`window=`):
  * "header" (default): DICOM WindowCenter/WindowWidth (the first pair when several are given, per frame
    for enhanced multi-frame objects) through the header's VOI LUT function (LINEAR, LINEAR_EXACT or
    SIGMOID, DICOM PS3.3 C.11.2.1.2); NIfTI cal_min/cal_max; otherwise the image's own min..max.
    PNG/JPEG: the stored values divided by the format's maximum (255, 65535).
  * (center, width): an explicit window through the LINEAR function, in the modality's units (HU for CT).
  * a preset name from `WINDOW_PRESETS` (CT, Hounsfield units).
  * "none": no window (see above).
MONOCHROME1 images (bright = low value, common for CR/DX/mammography) are inverted after windowing so
bright always means high attenuation; with `window="none"` the physical values are left alone.

NIfTI volumes are put in the closest canonical (RAS+) orientation first; a slice is then returned as a
radiologist views it, the same layout as a DICOM slice: superior (axial: anterior) at the top, the
patient's right on the image's left (sagittal: anterior on the left).

Preprocessing (`preprocess`) reproduces transformers' image processors step for step on 8-bit images:
PIL resize (CLIP: shortest edge, bicubic; SigLIP: size x size, bicubic as HF's SiglipImageProcessor), a
centre crop, rescale by 1/255 in float64 then float32, (x - mean) / std in float32. On uint8 input the
output equals the PIL-backed processors (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`) to the last
bit; floats from `load_image` are first rounded to 8 bits, as a PNG export would store them.

Errors: anything wrong with a file is an `ImageLoadError` (a ValueError) whose one-line message names
the file, the problem and what to do. Messages and logs never contain pixel values or patient
attributes (names, IDs, dates): patient data stays on the machine that holds it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
Window = str | tuple[float, float]

# CT display windows as (center, width) in Hounsfield units: the values usually taught and shipped
# as viewer presets (e.g. Radiopaedia "Windowing (CT)"); institutions vary a little around them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
  "brain": (40.0, 80.0),
  "subdural": (75.0, 215.0),
  "stroke": (40.0, 40.0),
  "temporal_bone": (600.0, 2800.0),
  "lung": (-600.0, 1500.0),
  "mediastinum": (50.0, 350.0),
  "abdomen": (50.0, 400.0),
  "soft_tissue": (50.0, 400.0),
  "liver": (30.0, 150.0),
  "bone": (400.0, 1800.0),
  "spine_soft_tissue": (50.0, 250.0),
}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN_STD = (0.5, 0.5, 0.5)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SUPPORTED_SUFFIXES = DICOM_SUFFIXES + NIFTI_SUFFIXES + PIL_SUFFIXES


class ImageLoadError(ValueError):
  """A file that cannot be loaded as an image; the message is one line: file, problem, fix.

  `kind` sorts the problem for summaries: "missing", "empty", "unsupported", "corrupt",
  "no_pixel_data", "needs_decoder", "needs_index", "bad_argument".
  """

  def __init__(self, path: PathLike, problem: str, fix: str = "", *, kind: str = "corrupt"):
    self.path = str(path)
    self.problem = problem
    self.fix = fix
    self.kind = kind
    message = f"{self.path}: {problem}" + (f"; {fix}" if fix else "")
    super().__init__(" ".join(message.split()))  # one line, whatever the parts held

  @property
  def reason(self) -> str:
    """The message without the path (what `load_folder` records per skipped file)."""
    return " ".join((self.problem + (f"; {self.fix}" if self.fix else "")).split())


def _short(exc: BaseException) -> str:
  """Exception type and the first line of its text, bounded: a library's words, never pixel data."""
  text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
  text = text[:160] + ("..." if len(text) > 160 else "")
  return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------
# Windowing (DICOM PS3.3 C.11.2.1.2: the VOI LUT functions)


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
  """Map values through a display window to [0, 1] (float32).

  LINEAR (the DICOM default, built for integer inputs):
    x <= c - 0.5 - (w - 1) / 2 -> 0;  x > c - 0.5 + (w - 1) / 2 -> 1;
    otherwise ((x - (c - 0.5)) / (w - 1) + 0.5).      Requires w >= 1.
  LINEAR_EXACT: x <= c - w/2 -> 0; x > c + w/2 -> 1; otherwise (x - c) / w + 0.5.   Requires w > 0.
  SIGMOID: 1 / (1 + exp(-4 (x - c) / w)).   Requires w > 0.
  """
  x = np.asarray(values, dtype=np.float64)
  c, w = float(center), float(width)
  function = (function or "LINEAR").strip().upper()
  if function == "LINEAR":
    if w < 1:
      raise ValueError(f"window width {w} is below 1, the minimum of DICOM's LINEAR function; give a width >= 1")
    low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    if w == 1:  # a threshold: the ramp is empty
      y = (x > low).astype(np.float64)
    else:
      y = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
      y = np.where(x <= low, 0.0, np.where(x > high, 1.0, y))
  elif function == "LINEAR_EXACT":
    if w <= 0:
      raise ValueError(f"window width {w} must be positive for LINEAR_EXACT")
    y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))
  elif function == "SIGMOID":
    if w <= 0:
      raise ValueError(f"window width {w} must be positive for SIGMOID")
    y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
  else:
    raise ValueError(f"unknown VOI LUT function {function!r}; use LINEAR, LINEAR_EXACT or SIGMOID")
  return y.astype(np.float32)


def _minmax(values: np.ndarray) -> np.ndarray:
  """Full-range window: min -> 0, max -> 1 (a constant image -> 0)."""
  x = np.asarray(values, dtype=np.float64)
  lo, hi = float(np.min(x)), float(np.max(x))
  if hi <= lo:
    return np.zeros(x.shape, np.float32)
  return ((x - lo) / (hi - lo)).astype(np.float32)


def _explicit_window(window: Window, path: PathLike) -> tuple[float, float] | None:
  """(center, width) for an explicit window or a preset; None for "header" / "none"."""
  if isinstance(window, str):
    name = window.strip().lower()
    if name in ("header", "none"):
      return None
    if name in WINDOW_PRESETS:
      return WINDOW_PRESETS[name]
    raise ImageLoadError(path, f"unknown window {window!r}",
                         f"use 'header', 'none', (center, width) or a preset: {', '.join(WINDOW_PRESETS)}",
                         kind="bad_argument")
  try:
    center, width = (float(v) for v in window)
  except (TypeError, ValueError):
    raise ImageLoadError(path, f"window {window!r} is not (center, width)",
                         "pass two numbers, a preset name, 'header' or 'none'", kind="bad_argument") from None
  if width < 1:
    raise ImageLoadError(path, f"window width {width} is below 1", "give a width >= 1", kind="bad_argument")
  return center, width


def _window_mode(window: Window) -> str:
  if isinstance(window, str) and window.strip().lower() in ("header", "none"):
    return window.strip().lower()
  return "explicit"


# ----------------------------------------------------------------------------------------------------
# Format detection


def _has_suffix(path: pathlib.Path, suffixes: Sequence[str]) -> bool:
  name = path.name.lower()
  return any(name.endswith(s) for s in suffixes)


def _is_part10_dicom(path: pathlib.Path) -> bool:
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:132] == b"DICM"


def image_format(path: PathLike) -> str:
  """"dicom" | "nifti" | "pil" by file name; a file without a known suffix is DICOM if it has the
  Part 10 'DICM' marker (PACS exports often have no extension). Raises ImageLoadError otherwise."""
  p = pathlib.Path(path)
  if _has_suffix(p, NIFTI_SUFFIXES):
    return "nifti"
  if _has_suffix(p, DICOM_SUFFIXES):
    return "dicom"
  if _has_suffix(p, PIL_SUFFIXES):
    return "pil"
  if p.is_file() and _is_part10_dicom(p):
    return "dicom"
  suffix = "".join(p.suffixes[-2:]) or "no extension"
  raise ImageLoadError(p, f"unsupported file type ({suffix})",
                       f"convert it to one of {', '.join(SUPPORTED_SUFFIXES)} (or DICOM without an extension)",
                       kind="unsupported")


def _check_file(path: PathLike) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.exists():
    raise ImageLoadError(p, "file not found", "check the path", kind="missing")
  if not p.is_file():
    raise ImageLoadError(p, "not a regular file", "pass an image file (use load_folder for a directory)",
                         kind="unsupported")
  if p.stat().st_size == 0:
    raise ImageLoadError(p, "file is empty (0 bytes)", "the copy or export was interrupted; copy it again or remove it",
                         kind="empty")
  return p


# ----------------------------------------------------------------------------------------------------
# Public loaders


def load_image(path: PathLike, *, window: Window = "header", frame: int | None = None,
               slice_index: int | None = None, axis: int = 2) -> np.ndarray:
  """Load a DICOM, NIfTI (.nii/.nii.gz) or PNG/JPEG/TIFF/BMP file as float32 (see the module doc).

  frame: DICOM multi-frame: that frame (0-based) -> [H, W]; None -> every frame, [F, H, W] (a
    single-frame file gives [H, W]). NIfTI 4D: the time index (required when there are several).
  slice_index, axis: NIfTI 3D: the slice along `axis` (0 sagittal, 1 coronal, 2 axial in RAS+);
    default the middle slice.
  """
  p = _check_file(path)
  kind = image_format(p)
  if kind == "dicom":
    return _load_dicom(p, window, frame)
  if kind == "nifti":
    return _load_nifti(p, window, frame, slice_index, axis)
  return _load_pil(p, window)


def to_rgb(img: np.ndarray) -> np.ndarray:
  """Grayscale [H, W] or [H, W, 1] -> [H, W, 3] (the value copied to each channel); [H, W, 3] unchanged;
  [H, W, 4] drops alpha. Stack frames yourself for [F, H, W]."""
  a = np.asarray(img)
  if a.ndim == 2:
    return np.repeat(a[:, :, None], 3, axis=2)
  if a.ndim == 3 and a.shape[-1] == 1:
    return np.repeat(a, 3, axis=2)
  if a.ndim == 3 and a.shape[-1] == 3:
    return a
  if a.ndim == 3 and a.shape[-1] == 4:
    return a[..., :3]
  raise ValueError(f"to_rgb expects [H, W] or [H, W, 1|3|4]; got shape {a.shape} "
                   "(for [F, H, W] frames, convert one frame at a time)")


# ----------------------------------------------------------------------------------------------------
# DICOM


def _pip_names(missing: Sequence[str]) -> list[str]:
  """pydicom's missing-dependency lines ('pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1')
  -> pip commands, one per alternative."""
  commands = []
  for line in missing:
    _, _, needs = line.partition("requires")
    names = [re.split(r"[<>=!~ ]", part.strip())[0] for part in needs.split(" and ")]
    names = ["python-gdcm" if n == "gdcm" else n for n in names if n and n != "numpy"]
    if names:
      commands.append("pip install " + " ".join(names))
  return commands


def _check_decoder(ds, path: pathlib.Path) -> None:
  from pydicom.pixels import get_decoder

  meta = getattr(ds, "file_meta", None)
  ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
  if ts is None or not ts.is_compressed:
    return
  try:
    decoder = get_decoder(ts)
  except NotImplementedError:
    raise ImageLoadError(path, f"transfer syntax {ts.name} ({ts}) has no pixel-data decoder in pydicom",
                         "decompress it first (e.g. `gdcmconv --raw` or `dcmdjpeg`)", kind="needs_decoder") from None
  if not decoder.is_available:
    options = _pip_names(decoder.missing_dependencies) or ["pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"]
    raise ImageLoadError(path, f"compressed transfer syntax {ts.name} ({ts}) needs a pixel-data decoder",
                         " or ".join(f"`{c}`" for c in options), kind="needs_decoder")


def _read_dicom(path: pathlib.Path, *, defer: bool = False):
  import pydicom
  from pydicom.errors import InvalidDicomError

  try:
    ds = pydicom.dcmread(path, defer_size=1024 if defer else None)
  except InvalidDicomError:
    raise ImageLoadError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)",
                         "re-export it as a DICOM Part 10 file, or remove it", kind="corrupt") from None
  except Exception as e:
    raise ImageLoadError(path, f"unreadable DICOM ({_short(e)})", "the file is truncated or corrupt; export it again",
                         kind="corrupt") from None
  pixel_keys = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
  if not any(k in ds for k in pixel_keys):
    sop = ds.get("SOPClassUID")
    what = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
    raise ImageLoadError(path, f"DICOM without pixel data{what}",
                         "it is not an image (report, presentation state, DICOMDIR...); leave it out",
                         kind="no_pixel_data")
  _check_decoder(ds, path)
  return ds


def _functional_item(ds, frame: int, sequence: str):
  """The first item of `sequence` for `frame` in an enhanced multi-frame object (per-frame groups
  first, then the shared groups), or None."""
  for group_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
    groups = ds.get(group_name)
    items = getattr(groups[index], sequence, None) if groups and len(groups) > index else None
    if items:
      return items[0]
  return None


def _first(value) -> float:
  """First value of a possibly multi-valued DICOM number (WindowCenter may hold several)."""
  if value is None:
    raise ValueError("missing")
  if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
    return float(value[0])
  return float(value)


def _rescale_params(ds, frame: int) -> tuple[float, float]:
  item = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else _functional_item(
    ds, frame, "PixelValueTransformationSequence")
  if item is None:
    return 1.0, 0.0
  slope = item.get("RescaleSlope", 1.0)
  intercept = item.get("RescaleIntercept", 0.0)
  return _first(slope if slope not in (None, "") else 1.0), _first(intercept if intercept not in (None, "") else 0.0)


def _header_window(ds, frame: int) -> tuple[float, float, str] | None:
  item = ds if "WindowCenter" in ds and "WindowWidth" in ds else _functional_item(ds, frame, "FrameVOILUTSequence")
  if item is None or item.get("WindowCenter") in (None, "") or item.get("WindowWidth") in (None, ""):
    return None
  center, width = _first(item.WindowCenter), _first(item.WindowWidth)
  function = str(item.get("VOILUTFunction", "") or ds.get("VOILUTFunction", "") or "LINEAR")
  if width <= 0 or (width < 1 and function.strip().upper() == "LINEAR"):
    return None  # an invalid header window is ignored (full range instead) rather than failing the file
  return center, width, function


def _load_dicom(path: pathlib.Path, window: Window, frame: int | None) -> np.ndarray:
  from pydicom.pixels import pixel_array

  explicit = _explicit_window(window, path)
  mode = _window_mode(window)
  ds = _read_dicom(path)
  n_frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frame is not None and not 0 <= int(frame) < n_frames:
    raise ImageLoadError(path, f"frame {frame} is out of range: the file has {n_frames} frame(s)",
                         f"pass frame between 0 and {n_frames - 1}, or frame=None for all", kind="bad_argument")
  try:
    arr = pixel_array(ds, index=None if frame is None else int(frame))
  except Exception as e:
    raise ImageLoadError(path, f"pixel data cannot be decoded ({_short(e)})",
                         "the file is truncated or corrupt; export it again", kind="corrupt") from None
  frames = list(range(n_frames)) if frame is None else [int(frame)]
  multi = frame is None and n_frames > 1  # arr has a leading frame axis
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  samples = int(ds.get("SamplesPerPixel", 1) or 1)

  if photometric == "PALETTE COLOR":
    from pydicom.pixels import apply_color_lut
    arr = apply_color_lut(arr, ds)
    samples = 3
  if samples == 3:  # RGB (pydicom converts YBR and planar configuration 1 to interleaved RGB)
    if mode == "explicit":
      raise ImageLoadError(path, f"window {window!r} applies to grayscale images; this DICOM is colour ({photometric})",
                           "use window='header' (or 'none')", kind="bad_argument")
    if mode == "none":
      return arr.astype(np.float32)
    bits = int(ds.get("BitsStored", 8) or 8) if photometric != "PALETTE COLOR" else 8 * arr.dtype.itemsize
    return (arr.astype(np.float64) / float(2 ** bits - 1)).clip(0.0, 1.0).astype(np.float32)

  stack = arr if multi else arr[None]
  params = [_rescale_params(ds, f) for f in frames]

  def modality(i: int) -> np.ndarray:  # one frame at a time: a long series never sits in float64 at once
    slope, intercept = params[i]
    return stack[i].astype(np.float64) * slope + intercept

  out = np.empty(stack.shape, np.float32)
  header = [_header_window(ds, f) for f in frames] if mode == "header" else []
  if mode == "header" and not all(h is not None for h in header):  # full-range window over all frames
    lo = min(float(np.min(modality(i))) for i in range(len(frames)))
    hi = max(float(np.max(modality(i))) for i in range(len(frames)))
  for i in range(len(frames)):
    x = modality(i)
    if mode == "none":
      out[i] = x
    elif explicit is not None:
      out[i] = apply_window(x, *explicit)
    elif all(h is not None for h in header):
      out[i] = apply_window(x, *header[i])
    else:
      out[i] = (x - lo) / (hi - lo) if hi > lo else 0.0
  if mode != "none" and photometric == "MONOCHROME1":
    out = 1.0 - out
  return out if multi else out[0]


# ----------------------------------------------------------------------------------------------------
# NIfTI


def _load_nifti(path: pathlib.Path, window: Window, frame: int | None, slice_index: int | None,
                axis: int) -> np.ndarray:
  import nibabel as nib

  explicit = _explicit_window(window, path)
  mode = _window_mode(window)
  try:
    img = nib.as_closest_canonical(nib.load(path))
    shape = tuple(int(s) for s in img.shape)
  except Exception as e:
    raise ImageLoadError(path, f"unreadable NIfTI ({_short(e)})", "the file is truncated or not NIfTI; export it again",
                         kind="corrupt") from None
  index: list[Any] = [slice(None)] * len(shape)
  if len(shape) > 4 and any(s > 1 for s in shape[4:]):
    raise ImageLoadError(path, f"NIfTI with {len(shape)} dimensions {shape}", "only 2D, 3D and 4D (time) volumes load",
                         kind="unsupported")
  for d in range(4, len(shape)):
    index[d] = 0
  if len(shape) >= 4:
    n_t = shape[3]
    if frame is None and n_t > 1:
      raise ImageLoadError(path, f"4D NIfTI with {n_t} time points {shape}", "pass frame=<time index> to choose one",
                           kind="needs_index")
    t = 0 if frame is None else int(frame)
    if not 0 <= t < n_t:
      raise ImageLoadError(path, f"frame {t} is out of range: {n_t} time points", f"pass frame between 0 and {n_t - 1}",
                           kind="bad_argument")
    index[3] = t
  spatial = shape[:3] + (1,) * (3 - len(shape[:3]))
  if axis not in (0, 1, 2):
    raise ImageLoadError(path, f"axis {axis} is not a spatial axis", "use 0 (sagittal), 1 (coronal) or 2 (axial)",
                         kind="bad_argument")
  if len(shape) == 2 or spatial[axis] == 1 and slice_index in (None, 0):
    k = 0  # a single slice along this axis
  else:
    k = spatial[axis] // 2 if slice_index is None else int(slice_index)
    if not 0 <= k < spatial[axis]:
      raise ImageLoadError(path, f"slice_index {k} is out of range along axis {axis} (size {spatial[axis]})",
                           f"pass slice_index between 0 and {spatial[axis] - 1}", kind="bad_argument")
  if len(shape) >= 3:
    index[axis] = k
  try:
    data = np.asarray(img.dataobj[tuple(index)], dtype=np.float64)  # the proxy applies scl_slope / scl_inter
  except Exception as e:
    raise ImageLoadError(path, f"NIfTI voxel data cannot be read ({_short(e)})",
                         "the file is truncated or corrupt; export it again", kind="corrupt") from None
  if len(shape) == 2:
    data = data.reshape(shape)
  data = np.flip(data.reshape(data.shape[:2]).T)  # rows: superior/anterior first; columns: patient's right first

  if mode == "none":
    return data.astype(np.float32)
  if explicit is not None:
    return apply_window(data, *explicit)
  cal_min, cal_max = float(img.header.get("cal_min", 0) or 0), float(img.header.get("cal_max", 0) or 0)
  if cal_max > cal_min:
    return apply_window(data, (cal_min + cal_max) / 2, cal_max - cal_min, "LINEAR_EXACT")
  return _minmax(data)


# ----------------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF / BMP


def _load_pil(path: pathlib.Path, window: Window) -> np.ndarray:
  from PIL import Image, ImageOps, UnidentifiedImageError

  explicit = _explicit_window(window, path)
  if isinstance(window, str) and explicit is not None:
    raise ImageLoadError(path, f"window preset {window!r} is in Hounsfield units; a {path.suffix} file stores no HU",
                         "use 'header' or an explicit (center, width) in the file's stored values", kind="bad_argument")
  try:
    with Image.open(path) as im:
      im.load()
      im = ImageOps.exif_transpose(im)  # phone photos (dermatology) carry their rotation in EXIF
  except UnidentifiedImageError:
    raise ImageLoadError(path, f"not a readable {path.suffix or 'image'} file (unknown image format)",
                         "the file is corrupt or mislabelled; export it again", kind="corrupt") from None
  except Exception as e:
    raise ImageLoadError(path, f"unreadable image ({_short(e)})", "the file is truncated or corrupt; export it again",
                         kind="corrupt") from None
  mode = im.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    arr, top = np.asarray(im).astype(np.float64), 65535.0  # 16-bit grayscale PNG/TIFF
  elif mode == "F":
    arr, top = np.asarray(im).astype(np.float64), None
  elif mode in ("1", "L", "LA", "La"):
    arr, top = np.asarray(im.convert("L")).astype(np.float64), 255.0
  else:  # RGB, RGBA, P, CMYK, YCbCr, ...: 8-bit RGB (alpha dropped)
    arr, top = np.asarray(im.convert("RGB")).astype(np.float64), 255.0
  if explicit is not None:
    if arr.ndim == 3:
      raise ImageLoadError(path, "an explicit window applies to grayscale images; this file is colour",
                           "use window='header'", kind="bad_argument")
    return apply_window(arr, *explicit)
  if top is None:
    return arr.astype(np.float32) if _window_mode(window) == "none" else _minmax(arr)
  return (arr / top).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Folder scans


class FolderScan(NamedTuple):
  paths: list[pathlib.Path]  # loadable image files, sorted
  skipped: list[tuple[pathlib.Path, str]]  # (file, reason) for every other file


def _check_header(path: pathlib.Path) -> None:
  """Cheap validation: the file opens, its header parses, a DICOM has decodable pixel data."""
  p = _check_file(path)
  kind = image_format(p)
  if kind == "dicom":
    _read_dicom(p, defer=True)
  elif kind == "nifti":
    import nibabel as nib
    try:
      nib.load(p).header
    except Exception as e:
      raise ImageLoadError(p, f"unreadable NIfTI ({_short(e)})", "the file is truncated or not NIfTI; export it again",
                           kind="corrupt") from None
  else:
    from PIL import Image
    try:
      with Image.open(p) as im:
        im.verify()
    except Exception as e:
      raise ImageLoadError(p, f"unreadable image ({_short(e)})", "the file is truncated or corrupt; export it again",
                           kind="corrupt") from None


def load_folder(root: PathLike, *, recursive: bool = True, validate: str = "header",
                suffixes: Sequence[str] | None = None, **load_kwargs: Any) -> FolderScan:
  """Find the loadable images under `root`; every other file is listed in `skipped` with its reason.

  validate: "header" (default; opens each file and parses its header, fast), "full" (decodes every
    image with `load_image(path, **load_kwargs)`, catching truncated pixel data too) or "none" (by
    name only). suffixes: keep only files with these endings (others are skipped as unsupported).
  Hidden files and folders (names starting with '.') are ignored. Logs one summary line.
  """
  if validate not in ("header", "full", "none"):
    raise ValueError(f"validate={validate!r}; use 'header', 'full' or 'none'")
  base = pathlib.Path(root)
  if not base.is_dir():
    raise ImageLoadError(base, "not a directory", "pass the folder that holds the images", kind="missing")
  walker = base.rglob("*") if recursive else base.glob("*")
  files = sorted(p for p in walker if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts))
  wanted = tuple(s.lower() for s in suffixes) if suffixes else None
  paths, skipped, kinds = [], [], collections.Counter()
  for p in files:
    try:
      if wanted is not None and not p.name.lower().endswith(wanted):
        raise ImageLoadError(p, f"suffix not in {', '.join(wanted)}", kind="unsupported")
      if validate == "none":
        _check_file(p)
        image_format(p)
      elif validate == "header":
        _check_header(p)
      else:
        load_image(p, **load_kwargs)
    except ImageLoadError as e:
      skipped.append((p, e.reason))
      kinds[e.kind] += 1
      continue
    paths.append(p)
  detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
  log.info("%s: %d image(s) found, %d file(s) skipped%s", base, len(paths), len(skipped),
           f" ({detail})" if detail else "")
  return FolderScan(paths, skipped)


# ----------------------------------------------------------------------------------------------------
# Preprocessing (transformers' CLIP / SigLIP image processors)

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_RESAMPLE_NAMES = {v: k for k, v in _RESAMPLE.items()}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """What an HF image processor does, as data.

  resize: "shortest_edge" (the short side becomes `size`, the long side int(size * long / short), as
    HF), "exact" (to `size` x `size`, or (h, w) when `size` is a pair) or "none".
  crop_size: (h, w) centre crop after the resize (HF's rule: top = (H - h) // 2; zero padding when the
    image is smaller), or None.
  """
  size: int | tuple[int, int] = 224
  resize: str = "shortest_edge"
  crop_size: tuple[int, int] | None = (224, 224)
  resample: str = "bicubic"
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD

  def __post_init__(self):
    if self.resize not in ("shortest_edge", "exact", "none"):
      raise ValueError(f"resize={self.resize!r}; use 'shortest_edge', 'exact' or 'none'")
    if self.resample not in _RESAMPLE:
      raise ValueError(f"resample={self.resample!r}; use one of {', '.join(_RESAMPLE)}")
    if self.resize == "shortest_edge" and not isinstance(self.size, (int, np.integer)):
      raise ValueError(f"resize='shortest_edge' takes an int size, got {self.size!r}")
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ValueError("image_mean and image_std need 3 values (R, G, B)")

  @classmethod
  def clip(cls, size: int = 224) -> ImageProcessorConfig:
    """OpenAI CLIP / HF CLIPImageProcessor: shortest edge -> size (bicubic), centre crop, OpenAI mean/std."""
    return cls(size=size, resize="shortest_edge", crop_size=(size, size), resample="bicubic",
               image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)

  @classmethod
  def siglip(cls, size: int = 224, resample: str = "bicubic") -> ImageProcessorConfig:
    """HF SiglipImageProcessor: resize to size x size (bicubic, HF's default; big_vision itself resizes
    bilinearly: pass resample="bilinear"), no crop, mean = std = 0.5 (pixels to [-1, 1])."""
    return cls(size=size, resize="exact", crop_size=None, resample=resample,
               image_mean=HALF_MEAN_STD, image_std=HALF_MEAN_STD)

  @property
  def output_size(self) -> tuple[int, int] | None:
    """(h, w) of every output, or None when it depends on the input (no crop, no exact resize)."""
    if self.crop_size is not None:
      return tuple(int(v) for v in self.crop_size)
    if self.resize == "exact":
      return (self.size, self.size) if isinstance(self.size, (int, np.integer)) else tuple(self.size)
    return None

  def resize_to(self, height: int, width: int) -> tuple[int, int]:
    """(h, w) after the resize step for an input of (height, width)."""
    if self.resize == "none":
      return height, width
    if self.resize == "exact":
      return (self.size, self.size) if isinstance(self.size, (int, np.integer)) else tuple(int(v) for v in self.size)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(self.size), int(int(self.size) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)

  @classmethod
  def from_dict(cls, d: dict, *, source: str = "preprocessor config") -> ImageProcessorConfig:
    """From the fields of an HF preprocessor_config.json (CLIPImageProcessor, SiglipImageProcessor and
    the older *FeatureExtractor files)."""
    kind = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")
    clip_like = "siglip" not in kind.lower()
    size = d.get("size", 224)
    crop = d.get("crop_size")
    do_crop = bool(d.get("do_center_crop", clip_like and crop is not None))
    if not d.get("do_resize", True):
      resize, size_v = "none", 0
    elif isinstance(size, dict):
      if "longest_edge" in size or "max_height" in size:
        raise ValueError(f"{source}: size {size} (longest-edge resizing) is not supported; "
                         "use a processor with shortest_edge or height/width")
      if "shortest_edge" in size:
        resize, size_v = "shortest_edge", int(size["shortest_edge"])
      elif "height" in size and "width" in size:
        h, w = int(size["height"]), int(size["width"])
        resize, size_v = "exact", h if h == w else (h, w)
      else:
        raise ValueError(f"{source}: unrecognised size {size}")
    else:  # an int: the short side when a crop follows (CLIP's legacy files), else a square
      size_v = int(size)
      resize = "shortest_edge" if do_crop else "exact"
    if do_crop:
      if crop is None:
        raise ValueError(f"{source}: do_center_crop is set but crop_size is missing")
      crop_v = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
    else:
      crop_v = None
    resample = d.get("resample", 3)
    resample = _RESAMPLE_NAMES.get(int(resample), None) if not isinstance(resample, str) else resample.lower()
    if resample not in _RESAMPLE:
      raise ValueError(f"{source}: resample {d.get('resample')!r} is not a PIL filter code 0-5")
    default_mean, default_std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if clip_like else (HALF_MEAN_STD, HALF_MEAN_STD)
    mean, std = d.get("image_mean", default_mean), d.get("image_std", default_std)
    mean = (float(mean),) * 3 if isinstance(mean, (int, float)) else tuple(float(v) for v in mean)
    std = (float(std),) * 3 if isinstance(std, (int, float)) else tuple(float(v) for v in std)
    return cls(size=size_v, resize=resize, crop_size=crop_v, resample=resample,
               do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
               do_normalize=bool(d.get("do_normalize", True)), image_mean=mean, image_std=std)

  @classmethod
  def from_hf_dir(cls, path: PathLike) -> ImageProcessorConfig:
    """Read `preprocessor_config.json` from a Hugging Face model directory (or that file itself)."""
    p = pathlib.Path(path)
    f = p / "preprocessor_config.json" if p.is_dir() else p
    if not f.is_file():
      raise ValueError(f"{f}: no preprocessor_config.json; pass the model directory that holds it "
                       "(or use ImageProcessorConfig.clip() / .siglip(size))")
    try:
      d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{f}: not valid JSON (line {e.lineno}); restore the file from the checkpoint") from None
    return cls.from_dict(d, source=str(f))


def _as_uint8(img: Any) -> np.ndarray:
  """uint8 [H, W, 3] from uint8 or [0, 1] float arrays ([H, W], [H, W, 1|3|4]) or a PIL image."""
  if hasattr(img, "convert") and hasattr(img, "mode"):  # PIL image
    img = np.asarray(img.convert("RGB"))
  a = np.asarray(img)
  if a.dtype == np.uint8:
    return np.ascontiguousarray(to_rgb(a))
  if np.issubdtype(a.dtype, np.floating):
    lo, hi = float(np.min(a)), float(np.max(a))
    if lo < -1e-6 or hi > 1 + 1e-6:
      raise ValueError(f"preprocess takes uint8 or floats in [0, 1]; got values in [{lo:.4g}, {hi:.4g}] "
                       "(window the image first: load_image(path, window=...))")
    return np.ascontiguousarray(to_rgb(np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)))
  raise ValueError(f"preprocess takes uint8 or float images; got dtype {a.dtype} (scale it to [0, 1] first)")


def _center_crop(a: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
  h, w = a.shape[:2]
  if crop_h <= h and crop_w <= w:
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return a[top:top + crop_h, left:left + crop_w]
  new_h, new_w = max(crop_h, h), max(crop_w, w)  # too small: zero-pad (HF: ceil of half the gap on top/left)
  padded = np.zeros((new_h, new_w) + a.shape[2:], a.dtype)
  top, left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
  padded[top:top + h, left:left + w] = a
  top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
  return padded[top:top + crop_h, left:left + crop_w]


def preprocess(img: Any, *, processor: ImageProcessorConfig) -> np.ndarray:
  """Resize, crop, rescale and normalise one image as the HF image processor does -> float32 [h, w, 3].

  img: uint8 ([H, W] or [H, W, 3]), floats in [0, 1] (what load_image returns; rounded to 8 bits
  first) or a PIL image. Equals the PIL-backed HF processors' pixel_values (transposed to HWC).
  """
  from PIL import Image

  a = _as_uint8(img)
  p = processor
  if p.resize != "none":
    h, w = p.resize_to(*a.shape[:2])
    a = np.asarray(Image.fromarray(a).resize((w, h), resample=_RESAMPLE[p.resample]))
  if p.crop_size is not None:
    a = _center_crop(a, int(p.crop_size[0]), int(p.crop_size[1]))
  x = (a.astype(np.float64) * p.rescale_factor).astype(np.float32) if p.do_rescale else a.astype(np.float32)
  if p.do_normalize:
    x = (x - np.asarray(p.image_mean, np.float32)) / np.asarray(p.image_std, np.float32)
  return x.astype(np.float32)


def load_and_preprocess(path: PathLike, *, processor: ImageProcessorConfig, **load_kwargs: Any) -> np.ndarray:
  """`preprocess(load_image(path, **load_kwargs))`: one 2D image (pass `frame` for multi-frame DICOMs)."""
  img = load_image(path, **load_kwargs)
  if img.ndim == 3 and img.shape[-1] != 3:
    raise ImageLoadError(path, f"{img.shape[0]} frames loaded where one image is needed", "pass frame=<index>",
                         kind="needs_index")
  return preprocess(img, processor=processor)


__all__ = [
  "WINDOW_PRESETS",
  "FolderScan",
  "ImageLoadError",
  "ImageProcessorConfig",
  "apply_window",
  "image_format",
  "load_and_preprocess",
  "load_folder",
  "load_image",
  "preprocess",
  "to_rgb",
]
