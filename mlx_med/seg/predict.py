"""Inference for a trained BoltzFormer run: probability maps at each image's own size, and masks written
back as files a viewer opens over the source (PNG for 2D images, a NIfTI label volume for a NIfTI volume).

A run directory (written by `mlx-med seg train`) holds everything needed to reproduce what the model saw
in training: model.json (the BoltzFormerConfig), tokenizer.json, data.json (image size, normalisation,
intensity window) and checkpoints/ (Orbax, the core trainer's state). `Segmenter.load` reads it once;
`attention=` evaluates the same parameters under another attention mode (boltzmann, dense_sampled,
threshold, full), which is how one checkpoint is compared across modes.

Images pass through the same reader (`mlx_med.vision.io`) and the same preparation and normalisation
(`mlx_med.seg.data`) as the training records, so a PNG, a DICOM slice and a NIfTI slice of one scan give
the model the same pixels. The model's logits at the input size are resized bilinearly (half-pixel
centres, no antialias) back to the source image's shape and only then passed through the sigmoid, so a
thin structure is not blurred twice.

Batches are padded to a fixed `batch_size`, so a run compiles once however many images come. The
Boltzmann samples are drawn per image from `fold_in(key(sample_seed), position)`, so an image's map does
not depend on the batch size or on which other images share its batch.

NIfTI volumes: every axial slice (or the `slices` asked for) is read through `mlx_med.vision.io` in the
radiological view the model was trained on; the predicted slice is mapped back through the reader's
view and reorientation, so the label volume has the input's voxel grid, shape, affine and header
(qform and sform with their codes), and overlays the scan in any viewer.

Outputs are written under a temporary name and renamed into place; `manifest.json` lists every input
with its mask, prompt, shape and foreground fraction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
DATA_FILE = "data.json"
CHECKPOINT_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"

PathLike = str | os.PathLike
ImageInput = Any  # a path, or an image array (uint8, or floats in [0, 1]) [H, W] / [H, W, 3]


class SegmenterError(ValueError):
  """Bad input to inference; the message is one line naming the path or argument and the fix."""

  def __init__(self, message: str):
    super().__init__(" ".join(message.split()))


class PredictResult(NamedTuple):
  masks: list[Path]   # one written mask per input path, in input order
  manifest: Path      # out_dir/manifest.json


def _read_json(path: Path, what: str, fix: str) -> dict:
  if not path.is_file():
    raise SegmenterError(f"{path}: missing {what}; {fix}")
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise SegmenterError(f"{path}: unreadable {what} ({type(e).__name__}); {fix}") from None
  if not isinstance(value, dict):
    raise SegmenterError(f"{path}: {what} is not a JSON object; {fix}")
  return value


def _window_from_json(value: Any) -> Any:
  """data.json's window: a preset name / "header" / "none", or [center, width] -> the io argument."""
  if value is None or value == "auto":
    return "header"
  if isinstance(value, (list, tuple)):
    return (float(value[0]), float(value[1]))
  if isinstance(value, dict) and {"center", "width"} <= set(value):
    return (float(value["center"]), float(value["width"]))
  return str(value)


def _bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """[n, h, w] float -> [n, height, width]: the model's own resize (bilinear, half-pixel centres, no
  antialias: torch's F.interpolate(align_corners=False))."""
  from mlx_med.seg.model import resize_bilinear

  return np.asarray(resize_bilinear(jnp.asarray(x, jnp.float32), (int(height), int(width)), channels_last=False))


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return np.asarray(jax.nn.sigmoid(jnp.asarray(x, jnp.float32)))


class Segmenter:
  """A trained BoltzFormer with its tokenizer and input preparation; `predict` maps images to probabilities."""

  def __init__(self, cfg, params, tokenizer, *, image_size: int | None = None, window: Any = "header",
               channel: int = 0, normalisation: dict | None = None, batch_size: int = 8, source: str = "",
               step: int | None = None):
    from mlx_med.seg.model import BoltzFormer

    if int(batch_size) < 1:
      raise SegmenterError(f"batch_size={batch_size} must be at least 1")
    self.cfg = cfg
    self.params = jax.device_put(params)  # on the device once, not with every batch
    self.tokenizer = tokenizer
    self.image_size = int(image_size or cfg.image_size)
    self.window = window
    self.channel = int(channel)
    norm = normalisation or {}
    self.mean, self.std = norm.get("mean"), norm.get("std")
    self.batch_size = int(batch_size)
    self.source = source
    self.step = step
    self.model = BoltzFormer(cfg)
    model = self.model
    needs_rng = cfg.attention in ("boltzmann", "dense_sampled")

    def one(p, image, ids, key):
      out = model.apply({"params": p}, image[None], ids[None], sample_rng=key if needs_rng else None)
      return out.logits[0]

    # One image per vmapped call: each image has its own sampling key, so its map does not depend on
    # the rest of the batch; the batch is still one compiled program.
    self._logits_fn = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))

  # ---------------------------------------------------------------- loading
  @classmethod
  def load(cls, workdir: PathLike, *, attention: str | None = None, use_ema: bool = True,
           batch_size: int = 8) -> Segmenter:
    """Reads a run directory (see the module doc); `attention` overrides the trained attention mode."""
    from mlx_med.core import checkpoint as checkpoint_lib
    from mlx_med.seg.model import BoltzFormerConfig
    from mlx_med.seg.sampling import ATTENTION_MODES
    from mlx_med.vision.text import TextTokenizer

    path = Path(workdir)
    fix = f"pass the --workdir of a finished `mlx-med seg train` run (train one with `mlx-med seg train --workdir {path}`)"
    if not path.is_dir():
      raise SegmenterError(f"{path}: no such run directory; {fix}")
    model_dict = _read_json(path / MODEL_FILE, "model config", fix)
    try:
      cfg = BoltzFormerConfig.from_dict(model_dict)
    except (TypeError, ValueError, KeyError) as e:
      raise SegmenterError(f"{path / MODEL_FILE}: not a BoltzFormer config ({str(e).splitlines()[0] if str(e) else type(e).__name__}); {fix}") from None
    if attention is not None:
      if attention not in ATTENTION_MODES:
        raise SegmenterError(f"attention={attention!r} is not one of {list(ATTENTION_MODES)}")
      cfg = cfg.with_attention(attention)
    data = _read_json(path / DATA_FILE, "data settings (image size, normalisation, window)", fix)
    image_size = int(data.get("image_size", cfg.image_size))
    if image_size != cfg.image_size:
      raise SegmenterError(f"{path / DATA_FILE}: image_size={image_size} differs from model.json's "
                           f"{cfg.image_size}; the run directory is inconsistent, train it again")
    normalisation = _normalisation(data.get("normalisation", data.get("normalization")), path / DATA_FILE)
    tok_path = path / TOKENIZER_FILE
    if not tok_path.is_file():
      raise SegmenterError(f"{tok_path}: missing tokenizer; {fix}")
    text = dict(cfg.text)
    tokenizer = TextTokenizer.from_file(tok_path, context_length=int(text.get("context_length", 77)),
                                        style=str(text.get("style", "clip")))
    ckpt_dir = (path / CHECKPOINT_DIR).absolute()
    restored = checkpoint_lib.restore_latest_state(ckpt_dir)
    if restored is None:
      raise SegmenterError(f"{ckpt_dir}: no checkpoint; train the run first (`mlx-med seg train --workdir {path}`) "
                           "or wait for its first checkpoint")
    state, step = restored
    params = state["ema_params"] if use_ema and "ema_params" in state else state["params"]
    return cls(cfg, params, tokenizer, image_size=image_size, window=_window_from_json(data.get("window")),
               channel=int(data.get("channel", 0)), normalisation=normalisation, batch_size=batch_size,
               source=str(path), step=int(step))

  # ---------------------------------------------------------------- inputs
  def load_image(self, path: PathLike, *, slice_index: int | None = None) -> np.ndarray:
    """One file -> the windowed float image [H, W] or [H, W, 3] in [0, 1] as training read it (NIfTI: an
    axial slice, default the middle one; a 4-D volume: the run's channel). The run's window applies to
    DICOM and NIfTI values; a PNG/JPEG is already a display, so its stored values are used."""
    from mlx_med.vision.io import image_format, load_image

    kind = image_format(path)
    window = "header" if kind == "pil" and not (isinstance(self.window, str) and self.window == "none") \
        else self.window
    if kind == "nifti":
      img = self._nifti_slice(path, window, slice_index)
    else:
      img = load_image(path, window=window)
    if img.ndim == 3 and img.shape[-1] not in (3, 4):
      raise SegmenterError(f"{path}: a multi-frame DICOM ({img.shape[0]} frames); export its frames as "
                           "single-frame files and pass those")
    return img

  def _nifti_slice(self, path: PathLike, window: Any, slice_index: int | None) -> np.ndarray:
    from mlx_med.vision.io import load_image

    # `frame` picks the channel of a 4-D (multi-modality) volume, as training did; 3-D volumes ignore it.
    return load_image(path, window=window, frame=self.channel, slice_index=slice_index, axis=2)

  def normalize(self, images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3] -> float32 model input, with the run's normalisation (`seg.data.normalize`)."""
    from mlx_med.seg import data as seg_data

    if self.mean is not None and self.std is not None:
      return np.asarray(seg_data.normalize(images_uint8, self.mean, self.std), np.float32)
    return np.asarray(seg_data.normalize(images_uint8), np.float32)

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """A source image (uint8, or floats in [0, 1]) -> the model's uint8 [S, S, 3], as the training records."""
    from mlx_med.seg import data as seg_data

    return seg_data.prepare_image(image, image_size=self.image_size)

  def _encode(self, prompts: Sequence[str], n: int) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) == 1:
      prompts = prompts * n
    if len(prompts) != n:
      raise SegmenterError(f"{len(prompts)} prompts for {n} images; pass one prompt for all images or one per image")
    for i, p in enumerate(prompts):
      if not isinstance(p, str) or not p.strip():
        raise SegmenterError(f"prompt {i} is empty; give a text prompt such as 'lung nodule in CT scan'")
    return np.asarray(self.tokenizer.encode(prompts), np.int32)

  # ---------------------------------------------------------------- inference
  def logits(self, images: Sequence[np.ndarray], text_ids: np.ndarray, *, sample_seed: int = 0,
             offset: int = 0) -> np.ndarray:
    """Prepared uint8 [n, S, S, 3] images and [n, L] token ids -> float32 logits [n, S, S].
    Image i draws its samples from fold_in(key(sample_seed), offset + i)."""
    n = len(images)
    s = self.image_size
    if n == 0:
      return np.zeros((0, s, s), np.float32)
    base = jax.random.key(int(sample_seed))
    outs = []
    for start in range(0, n, self.batch_size):
      stop = min(start + self.batch_size, n)
      chunk = self.normalize(np.stack(images[start:stop]))
      ids = text_ids[start:stop]
      pad = self.batch_size - (stop - start)
      if pad:  # repeat the last row: a fixed shape compiles once
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
      keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(offset + start, offset + start + len(chunk)))
      outs.append(np.asarray(self._logits_fn(self.params, chunk, ids, keys))[:stop - start])
    return np.concatenate(outs).astype(np.float32)

  def predict(self, images: Sequence[ImageInput] | ImageInput, prompts: Sequence[str] | str, *,
              sample_seed: int = 0) -> list[np.ndarray]:
    """Images (paths or arrays) and one prompt or one per image -> float32 probability maps, each at its
    source image's [H, W] (bilinear on the logits, then the sigmoid). A NIfTI path gives its middle
    axial slice (use `predict_files` for whole volumes)."""
    single_array = isinstance(images, np.ndarray) and (images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4)))
    if isinstance(images, (str, os.PathLike)) or single_array:
      images = [images]
    sources = [self.load_image(x) if isinstance(x, (str, os.PathLike)) else self._check_array(x, i)
               for i, x in enumerate(images)]
    ids = self._encode(prompts, len(sources))
    logits = self.logits([self.prepare(x) for x in sources], ids, sample_seed=sample_seed)
    return [_sigmoid(_bilinear(lg[None], *x.shape[:2])[0]) for lg, x in zip(logits, sources)]

  @staticmethod
  def _check_array(x: Any, i: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
      raise SegmenterError(f"image {i} has shape {a.shape}; pass [H, W] or [H, W, 3] arrays (uint8 or floats in [0, 1])")
    return a


def _normalisation(value: Any, where: Path) -> dict | None:
  """data.json's normalisation -> {"mean", "std"} (None: `seg.data.normalize`'s CLIP default)."""
  if value is None or (isinstance(value, str) and value.lower() == "clip"):
    return None
  if isinstance(value, dict) and "mean" in value and "std" in value:
    mean, std = [float(v) for v in value["mean"]], [float(v) for v in value["std"]]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
      raise SegmenterError(f"{where}: normalisation mean/std must be three numbers each (std > 0); "
                           "the run directory is damaged, train it again")
    return {"mean": mean, "std": std}
  if isinstance(value, dict) and str(value.get("name", "")).lower() == "clip":
    return None
  raise SegmenterError(f"{where}: normalisation {value!r} is not understood (expected 'clip' or mean/std); "
                       "train the run with this version of mlx_med")


# ---------------------------------------------------------------- writing masks


def _nifti_suffix(path: Path) -> str | None:
  name = path.name.lower()
  return ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else None


def _stem(path: Path) -> str:
  suffix = _nifti_suffix(path)
  return path.name[:-len(suffix)] if suffix else path.stem


def _temporary(target: Path, suffix: str = ".tmp") -> Path:
  """A hidden name beside `target` (same file system, so the rename is atomic); created by the writer with
  the process's usual permissions."""
  return target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}{suffix}"


def _atomic_write(target: Path, write, suffix: str = ".tmp") -> None:
  tmp = _temporary(target, suffix)
  try:
    write(tmp)
    os.replace(tmp, target)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def _atomic_png(mask: np.ndarray, target: Path) -> None:
  from PIL import Image

  _atomic_write(target, lambda tmp: Image.fromarray(mask.astype(np.uint8), mode="L").save(tmp, format="PNG"))


def _atomic_nifti(img, target: Path) -> None:
  import nibabel as nib

  # nibabel picks the format (and gzip) from the name: the temporary name ends like the target.
  _atomic_write(target, lambda tmp: nib.save(img, tmp), suffix=f".tmp{_nifti_suffix(target) or '.nii.gz'}")


def _atomic_json(value: Any, target: Path) -> None:
  _atomic_write(target, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))


def canonical_index(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
  """For a 3D voxel grid: the flat index (into the file's own C-ordered grid) of every voxel of the
  closest-canonical (RAS+) grid nibabel's `as_closest_canonical` gives -- the reader's reorientation as
  an index map, so a label volume built on the canonical grid goes back to the file's grid exactly."""
  import nibabel as nib

  shape = tuple(int(s) for s in shape)
  index = np.arange(int(np.prod(shape))).reshape(shape)
  ornt = nib.orientations.io_orientation(affine)
  return nib.orientations.apply_orientation(index, ornt)


def view_to_canonical(view: np.ndarray) -> np.ndarray:
  """A slice in the reader's radiological view [rows, cols] -> the canonical slice [x, y] (the inverse of
  `mlx_med.vision.io`'s `flip(slice.T)`)."""
  return np.flip(view).T


@dataclasses.dataclass
class _Job:
  index: int
  path: Path
  prompt: str
  kind: str              # "image" | "volume"
  out: Path | None = None


def _canonical_copy(img, tmpdir: str) -> Path:
  """The volume read once, in the reader's closest-canonical orientation, saved uncompressed with the
  same intensity header (cal_min/cal_max) and already-scaled values. `vision.io.load_image` reads a slice
  of it exactly as it reads that slice of the original (its reorientation is then the identity), but
  without reading and reorienting the whole (compressed) volume once per slice."""
  import nibabel as nib

  canon = nib.as_closest_canonical(img)
  data = np.asanyarray(canon.dataobj)  # the stored values scaled by scl_slope / scl_inter (float when scaled)
  header = canon.header.copy()
  header.set_data_dtype(data.dtype)
  header.set_slope_inter(1.0, 0.0)
  copy = type(img)(data, canon.affine, header=header)
  path = Path(tmpdir) / f"canonical-{uuid.uuid4().hex[:8]}.nii"
  nib.save(copy, path)
  return path


def _predict_volume(seg: Segmenter, path: Path, prompt: str, slices: Sequence[int] | None, threshold: float,
                    sample_seed: int, offset: int, tmpdir: str) -> tuple[Any, dict]:
  import nibabel as nib

  from mlx_med.vision.io import ImageLoadError

  try:
    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
  except Exception as e:  # noqa: BLE001 - nibabel raises many types for a damaged file; one message for all
    raise ImageLoadError(path, f"unreadable NIfTI ({type(e).__name__})",
                         "the file is truncated or not NIfTI; export it again") from None
  if len(shape) < 3 or (len(shape) > 4 and any(s > 1 for s in shape[4:])):
    raise SegmenterError(f"{path}: a NIfTI of shape {shape}; pass a 3-D volume (or a 4-D one whose 4th axis "
                         "holds the channels)")
  if len(shape) == 4 and not 0 <= seg.channel < shape[3]:
    raise SegmenterError(f"{path}: channel {seg.channel} (the run's data.channel) is out of range for {shape[3]} "
                         "channels; pass volumes with the modality the model was trained on")
  spatial = shape[:3]
  # Slices index the axial axis of the reader's canonical (RAS+) grid, as `load_image(slice_index=)` does.
  canon_index = canonical_index(spatial, img.affine)
  canon_shape = canon_index.shape
  depth = canon_shape[2]
  chosen = list(range(depth)) if slices is None else sorted({int(k) for k in slices})
  bad = [k for k in chosen if not 0 <= k < depth]
  if bad:
    raise SegmenterError(f"{path}: slice {bad[0]} is out of range (the volume has {depth} axial slices); "
                         f"pass slices between 0 and {depth - 1}")
  try:
    readable = _canonical_copy(img, tmpdir)
  except Exception as e:  # noqa: BLE001 - as above: truncated data surfaces as zlib, EOF or value errors
    raise ImageLoadError(path, f"NIfTI voxel data cannot be read ({type(e).__name__})",
                         "the file is truncated or corrupt; export it again") from None
  sources = [seg.load_image(readable, slice_index=k) for k in chosen]
  os.remove(readable)
  ids = seg._encode(prompt, len(sources))
  logits = seg.logits([seg.prepare(x) for x in sources], ids, sample_seed=sample_seed, offset=offset)
  view_shape = sources[0].shape[:2] if sources else (canon_shape[1], canon_shape[0])
  probs = _sigmoid(_bilinear(logits, *view_shape)) if len(logits) else np.zeros((0,) + view_shape, np.float32)
  canon = np.zeros(canon_shape, np.uint8)
  for k, p in zip(chosen, probs):
    canon[:, :, k] = view_to_canonical(p >= threshold).astype(np.uint8)
  labels = np.zeros(int(np.prod(spatial)), np.uint8)
  labels[canon_index.ravel()] = canon.ravel()
  labels = labels.reshape(spatial)  # a 4-D (multi-channel) input gets one 3-D label volume
  header = img.header.copy()
  out = type(img)(labels, img.affine, header=header)
  out.header.set_data_dtype(np.uint8)
  out.header.set_slope_inter(1.0, 0.0)  # labels are stored values, never scaled
  out.header["cal_min"], out.header["cal_max"] = 0, 1
  # The constructor may re-code the transforms from `affine`; the input's matrices and codes are restored.
  out.set_sform(img.header.get_sform(), int(img.header["sform_code"]))
  out.set_qform(img.header.get_qform(), int(img.header["qform_code"]))
  info = {"shape": list(labels.shape), "slices": chosen, "foreground_fraction": float(labels.mean()) if labels.size else 0.0}
  return out, info


def predict_files(workdir: PathLike | Segmenter, paths: Sequence[PathLike], prompt: Sequence[str] | str,
                  out_dir: PathLike, *, threshold: float = 0.5, attention: str | None = None,
                  slices: Sequence[int] | None = None, sample_seed: int = 0, batch_size: int = 8,
                  use_ema: bool = True) -> PredictResult:
  """Writes one mask per input into `out_dir` and a manifest.json; returns the mask paths and the manifest.

  2D inputs (PNG/JPEG/TIFF, single-frame DICOM) -> `<stem>.png`, 0/255 uint8 at the source size.
  NIfTI inputs are volumes -> `<stem>.nii.gz` (or .nii like the input): a uint8 0/1 label volume with the
  input's shape, affine and header; every axial slice is predicted, or only `slices` (the others stay 0).
  `workdir` is a run directory or an already loaded Segmenter (then `attention` must be None).
  """
  from mlx_med.vision.io import image_format

  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [Path(p) for p in paths]
  if not paths:
    raise SegmenterError("no input images; pass one or more image paths")
  prompts = [prompt] * len(paths) if isinstance(prompt, str) else list(prompt)
  if len(prompts) == 1:
    prompts = prompts * len(paths)
  if len(prompts) != len(paths):
    raise SegmenterError(f"{len(prompts)} prompts for {len(paths)} images; pass one prompt for all images or one per image")
  if not 0.0 <= float(threshold) <= 1.0:
    raise SegmenterError(f"threshold={threshold} must be a probability in [0, 1]")
  for p in paths:  # every input is checked before the model loads or anything is written
    if not p.exists():
      raise SegmenterError(f"{p}: file not found; check the path")
    if not p.is_file():
      raise SegmenterError(f"{p}: not a file; pass image files (PNG, DICOM, NIfTI), not a directory")
    image_format(p)  # unsupported types: ImageLoadError naming the file
  if isinstance(workdir, Segmenter):
    if attention is not None:
      raise SegmenterError("attention= applies when loading a run; load the Segmenter with attention= instead")
    seg = workdir
  else:
    seg = Segmenter.load(workdir, attention=attention, use_ema=use_ema, batch_size=batch_size)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  jobs = [_Job(i, p, prompts[i], "volume" if image_format(p) == "nifti" else "image") for i, p in enumerate(paths)]
  used: set[str] = set()
  for job in jobs:  # unique output names, even for inputs of the same name from different folders
    suffix = (_nifti_suffix(job.path) or ".nii.gz") if job.kind == "volume" else ".png"
    stem, n = _stem(job.path), 1
    name = stem + suffix
    while name in used:
      name = f"{stem}_{n}{suffix}"
      n += 1
    used.add(name)
    job.out = out_dir / name

  entries: list[dict] = []
  started = time.time()
  images = [j for j in jobs if j.kind == "image"]
  group = 16 * seg.batch_size  # images held in memory at once
  for lo in range(0, len(images), group):
    part = images[lo:lo + group]
    sources = [seg.load_image(j.path) for j in part]
    ids = seg._encode([j.prompt for j in part], len(part))
    logits = seg.logits([seg.prepare(x) for x in sources], ids, sample_seed=sample_seed, offset=lo)
    done = lo + len(part)
    if len(images) > group:
      rate = done / max(time.time() - started, 1e-9)
      log.info("predicted %d/%d images (%.1f/s, ETA %.0f s)", done, len(images), rate, (len(images) - done) / rate)
    for job, src, lg in zip(part, sources, logits):
      prob = _sigmoid(_bilinear(lg[None], *src.shape[:2])[0])
      mask = np.where(prob >= threshold, 255, 0).astype(np.uint8)
      _atomic_png(mask, job.out)
      entries.append({"index": job.index, "input": str(job.path), "mask": str(job.out), "prompt": job.prompt,
                      "kind": "png", "shape": list(src.shape[:2]), "foreground_fraction": float((mask > 0).mean())})
  # The canonical copies of volumes go beside the outputs (a large volume may not fit a small /tmp).
  with tempfile.TemporaryDirectory(prefix=".seg-predict-", dir=out_dir) as tmpdir:
    offset = len(images)
    for job in (j for j in jobs if j.kind == "volume"):
      vol, info = _predict_volume(seg, job.path, job.prompt, slices, threshold, sample_seed, offset, tmpdir)
      offset += len(info["slices"])
      _atomic_nifti(vol, job.out)
      log.info("%s: %d slices -> %s (%.1f s so far)", job.path, len(info["slices"]), job.out, time.time() - started)
      entries.append({"index": job.index, "input": str(job.path), "mask": str(job.out), "prompt": job.prompt,
                      "kind": "nifti", **info})
  entries.sort(key=lambda e: e["index"])
  manifest = {
      "run": seg.source, "step": seg.step, "attention": seg.cfg.attention, "threshold": float(threshold),
      "sample_seed": int(sample_seed), "image_size": seg.image_size, "seconds": round(time.time() - started, 3),
      "items": [{k: v for k, v in e.items() if k != "index"} for e in entries],
  }
  manifest_path = out_dir / MANIFEST_FILE
  _atomic_json(manifest, manifest_path)
  return PredictResult([Path(e["mask"]) for e in entries], manifest_path)


__all__ = ["PredictResult", "Segmenter", "SegmenterError", "canonical_index", "predict_files", "view_to_canonical"]
