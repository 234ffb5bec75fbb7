"""Segmentation data: three real layouts and the synthetic set -> (image, mask, prompt) records.

`scan(root, format=...)` lists the examples of a dataset as `SegExample`s (metadata only: files, the
slice, the prompt, the target's area), validating as it goes; `load_example` reads one as the model
sees it (uint8 image [S, S, 3], uint8 mask [S, S] of 0/1); `SegSource` holds a split in memory as the
trainer's random-access records {"images", "masks", "text_ids"}; `build_tfds` writes large data once as
ArrayRecord files and `RecordSegSource` reads them lazily (grain's random access).

Layouts (`FORMATS`):

* ``png``: either `root/metadata.csv` with columns image, mask, prompt (paths relative to root) and
  optionally split (default "train"), label (default: the prompt), organ, case_id; or `root/images/`
  and `root/masks/` paired by file name stem (`prompt=` gives the prompt of every pair). The synthetic
  set (`seg.synth.generate_synthetic`) is a metadata.csv folder. A mask pixel is foreground when it is
  non-zero (0/1 or 0/255 masks both work).
* ``msd``: a Medical Segmentation Decathlon task folder: `root/dataset.json` with "labels"
  ({"0": "background", "1": "liver", ...}), "modality" ({"0": "CT"} or one name per channel) and
  "training" ([{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]). Every axial
  slice (axis 2 of the closest canonical RAS+ orientation, as `vision.io.load_image` slices) that
  contains a label gives one example per label present on it, prompt "<label name> in <modality>
  scan" (the modality of the channel used). 4-D images (several modalities) use `channel` (default 0).
  The image's affine and spatial shape are kept on the example for writing predictions back.
* ``dicom``: `root/<case>/` holds one DICOM series (one file per slice, any file names) and its mask
  `root/<case>/mask.nii.gz` (or mask.nii). Slices are ordered by ImagePositionPatient along the slice
  normal (InstanceNumber when positions are missing), ascending; the mask's voxel array, as stored
  (not reoriented), is indexed [column, row, slice] in that order, the layout ITK, SimpleITK and
  3D Slicer write for a segmentation of that series. `prompt=` names the target of a binary mask;
  `labels={1: "liver", 2: "tumour"}` gives one target per label value, prompt "<name> in <Modality
  tag> scan". Each slice with the target present gives an example.

Bad input is a `SegDataError` (a ValueError) with a one-line message naming the file and the fix:
a mask whose shape differs from its image, a missing image or label file, missing dataset.json keys,
an unknown format, a mask with no foreground. An empty mask is an error by default
(`empty="error"`: an exported mask with nothing in it is usually a mistake); `empty="skip"` drops
such examples and logs how many were dropped. Slices without the label are not examples in the
volume layouts (a volume is only an error when its whole label volume is empty).

Resizing to the model's size S (`resize_image`, `resize_mask`): the image bilinearly (PIL), the mask
by nearest neighbour, except that a lesion nearest sampling would drop entirely (a connected
component with no pixel left, which happens to lesions of a few pixels when a 512 px slice goes to
128 px) keeps the one target pixel that holds the largest share of its area (box-filter coverage):
every lesion of the source mask stays present, at least one pixel large. `area_fraction` and
`bucket` are measured on the source mask (a fraction of the image is the same at every size).
The image is squashed to S x S when it is not square (no crop, no padding), so that a prediction
resized back to `source_shape` lies on the source grid.

Display window (`window=`): what `vision.io.load_image` takes; "auto" (the default) is the
soft-tissue preset (50 / 400 HU) for CT NIfTI volumes, which carry no window of their own, and the
file's own ("header": DICOM's WindowCenter/Width, PNG's stored values) otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mlx_med.seg.metrics import SIZE_BUCKETS, size_bucket

log = logging.getLogger(__name__)

FORMATS = ("png", "msd", "dicom")
METADATA = "metadata.csv"
PNG_COLUMNS = ("image", "mask", "prompt")
MSD_KEYS = ("labels", "modality", "training")
DICOM_MASK_NAMES = ("mask.nii.gz", "mask.nii")
EMPTY_POLICIES = ("error", "skip")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CT_WINDOW = "soft_tissue"

__all__ = [
  "CLIP_MEAN",
  "CLIP_STD",
  "FORMATS",
  "SIZE_BUCKETS",
  "RecordSegSource",
  "SegDataError",
  "SegExample",
  "SegSource",
  "build_tfds",
  "build_tfds_examples",
  "data_settings",
  "load_example",
  "make_source",
  "make_tokenizer",
  "model_spacing",
  "normalize",
  "normalize_device",
  "prepare_image",
  "read_example",
  "resize_image",
  "resize_mask",
  "resolve_window",
  "scan",
  "size_bucket",
]


class SegDataError(ValueError):
  """Bad segmentation input; the message is one line naming the file, the problem and the fix."""

  def __init__(self, path: str | os.PathLike, problem: str, fix: str = ""):
    self.path = str(path)
    super().__init__(" ".join((f"{self.path}: {problem}" + (f"; {fix}" if fix else "")).split()))


@dataclasses.dataclass(frozen=True)
class SegExample:
  """One (image, target) pair: where its pixels are and what it is.

  image_path / mask_path: the files (a PNG pair, a NIfTI volume and its label volume, a DICOM slice
  file and the series' mask volume); slice_index: the slice in the volume (None for 2-D files);
  source_shape: the image's shape on disk (2-D: (H, W); NIfTI: the volume's spatial shape);
  affine: the NIfTI image's 4x4 affine, or the DICOM slice's (LPS, mm) when its geometry tags are
  present, else None; label_value: the mask value of the target (None: any non-zero value);
  channel: the 4-D NIfTI channel; area_fraction: foreground pixels / slice pixels, at the source size.
  """

  image_path: str
  mask_path: str
  prompt: str
  label: str
  case_id: str
  slice_index: int | None
  area_fraction: float
  bucket: str
  source_shape: tuple[int, ...]
  affine: tuple[tuple[float, ...], ...] | None = None
  label_value: int | None = None
  channel: int | None = None
  format: str = "png"
  split: str = "train"
  organ: str = ""
  modality: str = ""
  window: str | tuple[float, float] = "auto"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> SegExample:
    d = dict(d)
    d["source_shape"] = tuple(int(v) for v in d["source_shape"])
    if d.get("affine") is not None:
      d["affine"] = tuple(tuple(float(v) for v in row) for row in d["affine"])
    if isinstance(d.get("window"), list):
      d["window"] = tuple(float(v) for v in d["window"])
    return cls(**d)


# ---------------------------------------------------------------------------------------------
# scan


def scan(root: str | os.PathLike, *, format: str, split: str | None = "train", prompt: str | None = None,
         labels: Mapping[int, str] | None = None, channel: int = 0, empty: str = "error",
         test_fraction: float = 0.0, seed: int = 0, window: Any = "auto") -> list[SegExample]:
  """The examples of one split (`split=None`: all) of the dataset at `root` (see the module docstring).

  prompt: png images/+masks/ pairs and binary DICOM masks: the prompt of every target.
  labels: dicom: {mask value: name}, one target per value. channel: msd 4-D images: the modality used.
  empty: "error" or "skip" for masks with no foreground. test_fraction, seed: msd and dicom, which have
  no split of their own: that share of the cases (chosen by a hash of the case name and seed, stable
  as cases are added) gets split "test", the others "train". window: the display window the examples
  are read with (kept on each example; see `resolve_window`).
  """
  if format not in FORMATS:
    raise SegDataError(root, f"unknown data format {format!r}", f"use one of {', '.join(FORMATS)}")
  if empty not in EMPTY_POLICIES:
    raise ValueError(f"empty={empty!r}: use 'error' (stop at an empty mask) or 'skip' (drop it, counted in the log)")
  base = Path(root)
  if not base.is_dir():
    raise SegDataError(base, "not a directory", f"pass the folder of a {format} dataset")
  if format == "png":
    examples, skipped = _scan_png(base, prompt, empty)
  elif format == "msd":
    examples, skipped = _scan_msd(base, channel, empty, test_fraction, seed)
  else:
    examples, skipped = _scan_dicom(base, prompt, labels, empty, test_fraction, seed)
  if skipped:
    log.warning("%s: skipped %d empty mask(s) (empty='skip')", base, skipped)
  if not (isinstance(window, str) and window == "auto"):
    window = window if isinstance(window, str) else tuple(float(v) for v in window)
    examples = [dataclasses.replace(e, window=window) for e in examples]
  chosen = [e for e in examples if split is None or e.split == split]
  if not chosen:
    have = sorted({e.split for e in examples})
    raise SegDataError(base, f"no examples in split {split!r} (splits present: {', '.join(have) or 'none'})",
                       "choose a split that exists" + ("; msd and dicom get a test split with test_fraction > 0"
                                                       if format != "png" else ""))
  log.info("%s (%s, split %s): %d example(s)", base, format, split, len(chosen))
  return chosen


def _case_split(case_id: str, test_fraction: float, seed: int) -> str:
  if test_fraction <= 0:
    return "train"
  h = zlib.crc32(f"{seed}:{case_id}".encode()) / 2**32
  return "test" if h < test_fraction else "train"


def _image_size_2d(path: Path) -> tuple[int, int]:
  """(H, W) of a 2-D image file from its header."""
  from mlx_med.vision.io import image_format, load_image

  if image_format(path) == "pil":
    from PIL import Image
    try:
      with Image.open(path) as im:
        return im.size[1], im.size[0]
    except Exception as e:
      raise SegDataError(path, f"unreadable image ({type(e).__name__})", "export it again") from None
  a = load_image(path)
  return a.shape[0], a.shape[1]


def _read_2d_mask(path: Path) -> np.ndarray:
  """bool [H, W]: non-zero pixels of a 2-D mask file (any channel)."""
  from mlx_med.vision.io import ImageLoadError, load_image

  try:
    m = load_image(path, window="none")
  except ImageLoadError as e:
    raise SegDataError(path, e.reason) from None
  if m.ndim == 3:
    m = m.any(axis=-1) if m.shape[-1] in (3, 4) else m[0]
  return np.asarray(m) != 0


def _scan_png(base: Path, prompt: str | None, empty: str) -> tuple[list[SegExample], int]:
  csv_path = base / METADATA
  rows: list[dict[str, str]] = []
  if csv_path.is_file():
    with open(csv_path, newline="") as f:
      reader = csv.DictReader(f)
      missing = [c for c in PNG_COLUMNS if c not in (reader.fieldnames or [])]
      if missing:
        raise SegDataError(csv_path, f"missing column(s) {', '.join(missing)}",
                           f"the header must name {', '.join(PNG_COLUMNS)} (and optionally split, label, organ)")
      for row in reader:
        row = {k: (v or "") for k, v in row.items() if k is not None}
        row["where"] = f"{csv_path}, line {reader.line_num}"
        rows.append(row)
    if not rows:
      raise SegDataError(csv_path, "no rows", "add one line per (image, mask, prompt)")
  elif (base / "images").is_dir() and (base / "masks").is_dir():
    if not prompt:
      raise SegDataError(base, "images/ + masks/ pairs carry no prompt", "pass prompt='<target> in <modality> scan'")
    masks = {_stem(p): p for p in sorted((base / "masks").iterdir()) if p.is_file() and not p.name.startswith(".")}
    for p in sorted((base / "images").iterdir()):
      if not p.is_file() or p.name.startswith("."):
        continue
      m = masks.get(_stem(p))
      if m is None:
        raise SegDataError(p, f"no mask named {_stem(p)}.* in {base / 'masks'}",
                           "add the mask under the image's file name, or remove the image")
      rows.append({"image": str(p.relative_to(base)), "mask": str(m.relative_to(base)), "prompt": prompt,
                   "where": str(p)})
    if not rows:
      raise SegDataError(base / "images", "no images", "put the images in images/ and their masks in masks/")
  else:
    raise SegDataError(base, f"neither {METADATA} nor images/ + masks/ folders",
                       "add a metadata.csv (image, mask, prompt[, split]) or images/ and masks/ paired by name")
  examples, skipped = [], 0
  for row in rows:
    image, mask = base / row["image"], base / row["mask"]
    for p, what in ((image, "image"), (mask, "mask")):
      if not row[what] or not p.is_file():
        raise SegDataError(p, f"{what} file not found ({row['where']})", f"fix the {what} path or add the file")
    if not row["prompt"].strip():
      raise SegDataError(mask, f"empty prompt ({row['where']})", "give every row a prompt")
    m = _read_2d_mask(mask)
    shape = _image_size_2d(image)
    if m.shape != shape:
      raise SegDataError(mask, f"mask shape {m.shape[0]}x{m.shape[1]} differs from the image's {shape[0]}x{shape[1]} "
                         f"({image})", "export the mask on the image's pixel grid")
    count = int(m.sum())
    if count == 0:
      if empty == "skip":
        skipped += 1
        continue
      raise SegDataError(mask, f"empty mask (no foreground pixel; {row['where']})",
                         "fix the export or remove the row, or pass empty='skip' to drop empty masks")
    fraction = count / m.size
    examples.append(SegExample(
        image_path=str(image), mask_path=str(mask), prompt=row["prompt"].strip(),
        label=(row.get("label") or row["prompt"]).strip(), case_id=row.get("case_id") or _stem(image),
        slice_index=None, area_fraction=fraction, bucket=size_bucket(fraction), source_shape=tuple(shape),
        format="png", split=(row.get("split") or "train").strip(), organ=row.get("organ", "")))
  return examples, skipped


def _stem(p: Path) -> str:
  name = p.name
  for suffix in (".nii.gz",):
    if name.lower().endswith(suffix):
      return name[: -len(suffix)]
  return p.stem


def _load_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    raise SegDataError(path, "not found", "an MSD task folder holds dataset.json beside imagesTr/ and labelsTr/")
  try:
    d = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise SegDataError(path, f"not valid JSON (line {e.lineno})", "fix or restore the file") from None
  if not isinstance(d, dict):
    raise SegDataError(path, "is not a JSON object", "restore the task's dataset.json")
  return d


def _nifti(path: Path):
  import nibabel as nib

  try:
    return nib.load(path)
  except Exception as e:
    raise SegDataError(path, f"unreadable NIfTI ({type(e).__name__})", "the file is truncated or not NIfTI") from None


def _scan_msd(base: Path, channel: int, empty: str, test_fraction: float, seed: int) -> tuple[list[SegExample], int]:
  import nibabel as nib

  meta_path = base / "dataset.json"
  meta = _load_json(meta_path)
  for key in MSD_KEYS:
    if key not in meta:
      raise SegDataError(meta_path, f"missing key {key!r}",
                         'the Decathlon format needs "labels" ({"0": "background", "1": ...}), "modality" '
                         '({"0": "CT"}) and "training" ([{"image": ..., "label": ...}])')
  try:
    names = {int(k): str(v) for k, v in dict(meta["labels"]).items() if int(k) != 0}
    modalities = {int(k): str(v) for k, v in dict(meta["modality"]).items()}
  except (TypeError, ValueError):
    raise SegDataError(meta_path, '"labels" and "modality" must map integer strings to names',
                       'e.g. "labels": {"0": "background", "1": "liver"}') from None
  if not names:
    raise SegDataError(meta_path, '"labels" names no foreground label', 'add e.g. "1": "liver"')
  modality = modalities.get(int(channel))
  if modality is None:
    raise SegDataError(meta_path, f"channel {channel} is not in \"modality\" ({modalities})",
                       f"choose channel among {sorted(modalities)}")
  training = meta["training"]
  if not isinstance(training, list) or not training:
    raise SegDataError(meta_path, '"training" is empty or not a list', 'list {"image": ..., "label": ...} pairs')
  examples, skipped = [], 0
  for i, entry in enumerate(training):
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
      raise SegDataError(meta_path, f'training[{i}] lacks "image" or "label"', 'give both paths for every case')
    image, label = base / entry["image"], base / entry["label"]
    if not image.is_file():
      raise SegDataError(image, f"image file not found (dataset.json training[{i}])", "add it or remove the entry")
    if not label.is_file():
      raise SegDataError(label, f"label file not found (dataset.json training[{i}])",
                         "add the label volume to labelsTr/ or remove the entry")
    img, lab = _nifti(image), _nifti(label)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and not 0 <= channel < shape[3]:
      raise SegDataError(image, f"channel {channel} is out of range: the image has {shape[3]} channels",
                         f"pass channel between 0 and {shape[3] - 1}")
    lshape = tuple(int(s) for s in lab.shape)
    if lshape[:3] != shape[:3] or not (len(lshape) == 3 or (len(lshape) == 4 and lshape[3] == 1)):
      raise SegDataError(label, f"label shape {lshape} differs from the image's {shape[:3]} ({image})",
                         "the label volume must lie on the image's voxel grid")
    if nib.aff2axcodes(lab.affine) != nib.aff2axcodes(img.affine):
      raise SegDataError(label, f"label orientation {''.join(nib.aff2axcodes(lab.affine))} differs from the image's "
                         f"{''.join(nib.aff2axcodes(img.affine))} ({image})", "save the label with the image's affine")
    canonical = nib.as_closest_canonical(lab)
    values = np.rint(np.asarray(canonical.dataobj)).astype(np.int32).reshape(canonical.shape[:3])
    if not values.any():
      if empty == "skip":
        skipped += 1
        continue
      raise SegDataError(label, "empty label volume (no foreground voxel)",
                         "fix the label or remove the case, or pass empty='skip' to drop empty cases")
    case = _stem(image)
    split = _case_split(case, test_fraction, seed)
    affine = tuple(tuple(float(v) for v in row) for row in np.asarray(img.affine))
    plane = values.shape[0] * values.shape[1]
    for value, name in sorted(names.items()):
      counts = (values == value).sum(axis=(0, 1))
      for k in np.flatnonzero(counts):
        fraction = float(counts[k]) / plane
        examples.append(SegExample(
            image_path=str(image), mask_path=str(label), prompt=f"{name} in {modality} scan", label=name,
            case_id=case, slice_index=int(k), area_fraction=fraction, bucket=size_bucket(fraction),
            source_shape=shape[:3], affine=affine, label_value=value, channel=channel if len(shape) == 4 else None,
            format="msd", split=split, modality=modality))
  return examples, skipped


def _dicom_series(case: Path) -> list[tuple[Path, Any]]:
  """(file, header) of the case folder's DICOM slices, in slice order."""
  import pydicom

  from mlx_med.vision.io import ImageLoadError, image_format

  found = []
  for p in sorted(case.iterdir()):
    if not p.is_file() or p.name.startswith(".") or p.name in DICOM_MASK_NAMES:
      continue
    try:
      if image_format(p) != "dicom":
        continue
    except ImageLoadError:
      continue
    try:
      ds = pydicom.dcmread(p, stop_before_pixels=True)
    except Exception as e:
      raise SegDataError(p, f"unreadable DICOM ({type(e).__name__})", "export it again or remove it") from None
    found.append((p, ds))
  if not found:
    return found

  def position(item) -> tuple[float, float]:
    ds = item[1]
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None:
      normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
      return float(np.dot(normal, np.asarray(ipp, float))), 0.0
    return float(ds.get("InstanceNumber", 0) or 0), 0.0

  return sorted(found, key=position)


def _dicom_affine(ds) -> tuple[tuple[float, ...], ...] | None:
  """The slice's voxel (column, row) -> patient (LPS, mm) 4x4 affine, from its geometry tags."""
  ipp, iop, spacing = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
  if ipp is None or iop is None or spacing is None:
    return None
  row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
  a = np.eye(4)
  a[:3, 0] = row_dir * float(spacing[1])  # along a row: column index, column spacing
  a[:3, 1] = col_dir * float(spacing[0])
  a[:3, 2] = np.cross(row_dir, col_dir) * float(ds.get("SliceThickness", 1.0) or 1.0)
  a[:3, 3] = np.asarray(ipp, float)
  return tuple(tuple(float(v) for v in row) for row in a)


def _scan_dicom(base: Path, prompt: str | None, labels: Mapping[int, str] | None, empty: str, test_fraction: float,
                seed: int) -> tuple[list[SegExample], int]:
  if labels is None and not prompt:
    raise SegDataError(base, "a DICOM mask carries no target name",
                       "pass prompt='<target> in CT scan' (binary masks) or labels={1: 'liver', ...}")
  cases = [p for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")]
  if not cases:
    raise SegDataError(base, "no case folders", "put each DICOM series in root/<case>/ with its mask.nii.gz")
  examples, skipped = [], 0
  for case in cases:
    series = _dicom_series(case)
    if not series:
      raise SegDataError(case, "no DICOM files in the case folder", "put the series' slices here, or remove the folder")
    mask_path = next((case / n for n in DICOM_MASK_NAMES if (case / n).is_file()), None)
    if mask_path is None:
      raise SegDataError(case / DICOM_MASK_NAMES[0], "mask file not found",
                         "save the series' mask as mask.nii.gz in the case folder (voxels [column, row, slice])")
    data = _mask_volume(mask_path)
    rows, cols = int(series[0][1].Rows), int(series[0][1].Columns)
    expected = (cols, rows, len(series))
    if data.shape != expected:
      raise SegDataError(mask_path, f"mask shape {data.shape} differs from the series' (columns, rows, slices) "
                         f"{expected} ({case})", "export the mask on the series' voxel grid, one slice per DICOM file")
    if not data.any():
      if empty == "skip":
        skipped += 1
        continue
      raise SegDataError(mask_path, "empty mask (no foreground voxel)",
                         "fix the mask or remove the case, or pass empty='skip' to drop empty cases")
    targets = {None: prompt} if labels is None else {int(v): str(n) for v, n in labels.items()}
    split = _case_split(case.name, test_fraction, seed)
    for k, (path, ds) in enumerate(series):
      modality = str(ds.get("Modality", "") or "CT")
      plane = data[:, :, k]
      for value, name in targets.items():
        hit = plane != 0 if value is None else plane == value
        count = int(hit.sum())
        if not count:
          continue
        fraction = count / plane.size
        examples.append(SegExample(
            image_path=str(path), mask_path=str(mask_path), prompt=name if value is None else f"{name} in {modality} scan",
            label=name, case_id=case.name, slice_index=k, area_fraction=fraction, bucket=size_bucket(fraction),
            source_shape=(rows, cols), affine=_dicom_affine(ds), label_value=value, format="dicom", split=split,
            modality=modality))
  return examples, skipped


def _mask_volume(path: Path) -> np.ndarray:
  """int32 voxel array of a NIfTI mask as stored (3-D; a trailing axis of 1 dropped)."""
  arr = np.asarray(_nifti(path).dataobj)
  if arr.ndim == 4 and arr.shape[3] == 1:
    arr = arr[..., 0]
  if arr.ndim != 3:
    raise SegDataError(path, f"mask has {arr.ndim} dimensions {arr.shape}", "save a 3-D mask volume")
  return np.rint(arr).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Reading one example


def resolve_window(ex: SegExample, window: Any = None) -> Any:
  """The `vision.io.load_image` window for `ex`: `window`, or the example's own when None; "auto" ->
  the soft-tissue preset for CT NIfTI volumes, else "header"."""
  window = ex.window if window is None else window
  if isinstance(window, str) and window == "auto":
    return CT_WINDOW if ex.format == "msd" and ex.modality.strip().upper() == "CT" else "header"
  return window


class _VolumeCache:
  """The last NIfTI volume read per path, so a source loads each volume once, not once per slice."""

  def __init__(self):
    self._data: dict[tuple[str, Any], Any] = {}

  def get(self, key: tuple[str, Any], make: Callable[[], Any]) -> Any:
    if key not in self._data:
      if len(self._data) >= 4:
        self._data.pop(next(iter(self._data)))
      self._data[key] = make()
    return self._data[key]


def _canonical(path: str, channel: int | None) -> tuple[np.ndarray, Any]:
  """(the volume's values in the closest canonical orientation [X, Y, Z], the canonical header)."""
  import nibabel as nib

  img = nib.as_closest_canonical(_nifti(Path(path)))
  data = np.asarray(img.dataobj)
  if data.ndim == 4:
    data = data[..., 0 if channel is None else channel]
  return data, img.header


def _window_slice(values: np.ndarray, header: Any, window: Any) -> np.ndarray:
  """One canonical slice -> the display as `vision.io.load_image` gives it (same orientation and window)."""
  from mlx_med.vision.io import WINDOW_PRESETS, apply_window

  data = np.flip(np.asarray(values, np.float64).T)
  if isinstance(window, str) and window == "none":
    return data.astype(np.float32)
  if isinstance(window, str) and window != "header":
    return apply_window(data, *WINDOW_PRESETS[window.strip().lower()])
  if not isinstance(window, str):
    return apply_window(data, *(float(v) for v in window))
  cal_min, cal_max = float(header.get("cal_min", 0) or 0), float(header.get("cal_max", 0) or 0)
  if cal_max > cal_min:
    return apply_window(data, (cal_min + cal_max) / 2, cal_max - cal_min, "LINEAR_EXACT")
  lo, hi = float(np.min(data)), float(np.max(data))
  return np.zeros(data.shape, np.float32) if hi <= lo else ((data - lo) / (hi - lo)).astype(np.float32)


def read_example(ex: SegExample, *, window: Any = None, cache: _VolumeCache | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(image float32 [H, W] or [H, W, 3] in [0, 1], mask bool [H, W]) at the source size.

  Images go through `vision.io.load_image` (or, with a `cache`, one read of the volume windowed the
  same way, equal to it); the mask is the target's pixels (`label_value`, or any non-zero value)."""
  from mlx_med.vision.io import ImageLoadError, load_image

  window = resolve_window(ex, window)
  try:
    if ex.format == "png":
      image = load_image(ex.image_path, window=window)
      mask = _read_2d_mask(Path(ex.mask_path))
    elif ex.format == "msd":
      if cache is not None:
        values, header = cache.get((ex.image_path, ex.channel), lambda: _canonical(ex.image_path, ex.channel))
        image = _window_slice(values[:, :, ex.slice_index], header, window)
        labels, _ = cache.get((ex.mask_path, None), lambda: _canonical(ex.mask_path, None))
        plane = np.flip(np.rint(labels[:, :, ex.slice_index]).astype(np.int32).T)
      else:
        image = load_image(ex.image_path, window=window, frame=ex.channel, slice_index=ex.slice_index, axis=2)
        plane = np.rint(load_image(ex.mask_path, window="none", slice_index=ex.slice_index, axis=2)).astype(np.int32)
      mask = plane != 0 if ex.label_value is None else plane == ex.label_value
    elif ex.format == "dicom":
      image = load_image(ex.image_path, window=window)
      volume = cache.get((ex.mask_path, "raw"), lambda: _mask_volume(Path(ex.mask_path))) if cache is not None \
          else _mask_volume(Path(ex.mask_path))
      plane = volume[:, :, ex.slice_index].T
      mask = plane != 0 if ex.label_value is None else plane == ex.label_value
    else:
      raise SegDataError(ex.image_path, f"unknown data format {ex.format!r}", f"use one of {', '.join(FORMATS)}")
  except ImageLoadError as e:
    raise SegDataError(e.path, e.reason) from None
  if image.ndim == 3 and image.shape[-1] not in (3, 4):
    raise SegDataError(ex.image_path, f"{image.shape[0]} frames where one image is needed", "export one frame per file")
  if mask.shape != image.shape[:2]:
    raise SegDataError(ex.mask_path, f"mask shape {mask.shape} differs from the image's {image.shape[:2]} "
                       f"({ex.image_path})", "export the mask on the image's pixel grid")
  return image, mask


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """float [0, 1] or uint8 image ([H, W] or [H, W, 3|4]) -> uint8 [size, size, 3], bilinear (PIL)."""
  from PIL import Image

  from mlx_med.vision.io import to_rgb

  a = np.asarray(image)
  if a.dtype != np.uint8:
    a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
  a = np.ascontiguousarray(to_rgb(a))
  if a.shape[:2] != (size, size):
    a = np.asarray(Image.fromarray(a, "RGB").resize((size, size), Image.Resampling.BILINEAR))
  return a


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """bool/0-1 mask [H, W] -> uint8 [size, size] of 0/1: nearest neighbour (pixel centres), keeping every
  connected component that nearest sampling would drop as its best-covered target pixel (module doc)."""
  from PIL import Image
  from scipy import ndimage

  m = np.asarray(mask) != 0
  h, w = m.shape
  if (h, w) == (size, size):
    return m.astype(np.uint8)
  rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
  out = m[rows][:, cols].copy()
  if size < h or size < w:
    components, n = ndimage.label(m)
    if n:
      kept = np.zeros(n + 1, bool)
      kept[np.unique(components[rows][:, cols])] = True
      for c in np.flatnonzero(~kept[1:]) + 1:
        part = Image.fromarray((components == c).astype(np.float32), "F")
        coverage = np.asarray(part.resize((size, size), Image.Resampling.BOX))
        out[np.unravel_index(int(np.argmax(coverage)), coverage.shape)] = True
  return out.astype(np.uint8)


def load_example(ex: SegExample, *, image_size: int, window: Any = None, cache: _VolumeCache | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [S, S, 3] image, uint8 [S, S] mask of 0/1) at the model's size S = image_size."""
  image, mask = read_example(ex, window=window, cache=cache)
  return resize_image(image, int(image_size)), resize_mask(mask, int(image_size))


def normalize(images: Any, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Any:
  """uint8 images [..., 3] (numpy or jax) -> float32 (x / 255 - mean) / std, CLIP's mean/std by default."""
  x = images.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize_device(images: Any) -> Any:
  """`normalize` inside a jitted step: uint8 jax array [..., 3] -> float32 with CLIP's mean/std."""
  import jax.numpy as jnp

  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def prepare_image(image: np.ndarray, *, image_size: int) -> np.ndarray:
  """A source image (uint8, or floats in [0, 1]) -> the model's uint8 [S, S, 3], as the records have it."""
  return resize_image(image, int(image_size))


def model_spacing(ex: SegExample, image_size: int) -> tuple[float, float]:
  """(row, column) pixel spacing of the model-size mask of `ex`: millimetres for NIfTI (the affine's
  voxel sizes, in vision.io's display orientation) and DICOM with geometry tags, else source pixels."""
  s = float(image_size)
  if ex.format == "msd" and ex.affine is not None:
    import nibabel as nib

    affine = np.asarray(ex.affine, float)
    vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = nib.io_orientation(affine)
    spacing, shape = [1.0] * 3, [1] * 3
    for i in range(3):
      spacing[int(ornt[i, 0])], shape[int(ornt[i, 0])] = float(vox[i]), int(ex.source_shape[i])
    return spacing[1] * shape[1] / s, spacing[0] * shape[0] / s  # display rows: canonical axis 1, columns: 0
  rows, cols = int(ex.source_shape[0]), int(ex.source_shape[1])
  if ex.format == "dicom" and ex.affine is not None:
    affine = np.asarray(ex.affine, float)
    return float(np.linalg.norm(affine[:3, 1])) * rows / s, float(np.linalg.norm(affine[:3, 0])) * cols / s
  return rows / s, cols / s


def data_settings(config: Any, image_size: int) -> dict[str, Any]:
  """What a run's data.json records for inference: the model's size, the normalisation and the resolved
  display window ("auto" becomes the soft-tissue preset for a CT Decathlon task, else "header")."""
  d = config.data
  window = d.get("window", "auto")
  fmt = d.get("format", "png") if d.get("root") else "png"
  if window == "auto":
    window = "header"
    if fmt == "msd":
      try:
        modality = json.loads((Path(d.root) / "dataset.json").read_text()).get("modality", {})
        if str(dict(modality).get(str(int(d.get("channel", 0))), "")).strip().upper() == "CT":
          window = CT_WINDOW
      except (OSError, ValueError, TypeError, AttributeError):
        pass  # scan reports a bad dataset.json with its own message
  return {"image_size": int(image_size), "normalisation": {"name": "clip", "mean": list(CLIP_MEAN),
          "std": list(CLIP_STD)}, "window": window, "format": fmt, "channel": int(d.get("channel", 0))}


# ---------------------------------------------------------------------------------------------
# Tokenizer and in-memory source


def make_tokenizer(prompts: Sequence[str], path: str | os.PathLike, *, tokenizer_file: str | os.PathLike | None = None,
                   vocab_size: int = 512, context_length: int = 16, style: str = "clip"):
  """The run's prompt tokenizer at `path` (a tokenizer.json): a copy of `tokenizer_file` (e.g. CLIP's)
  when given, else a byte-level BPE trained on the prompts (`vision.train_text_tokenizer`). An existing
  `path` is reused. Returns a `vision.TextTokenizer` encoding to [B, context_length]."""
  from mlx_med.vision.text import TextTokenizer, train_text_tokenizer

  target = Path(path)
  if not target.is_file():
    target.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer_file:
      src = Path(tokenizer_file)
      if not src.is_file():
        raise SegDataError(src, "tokenizer file not found", "pass a Hugging Face tokenizer.json (e.g. CLIP's)")
      tmp = target.with_name(target.name + ".tmp")
      tmp.write_bytes(src.read_bytes())
      os.replace(tmp, target)
    else:
      texts = sorted(set(prompts))
      if not texts:
        raise ValueError("make_tokenizer needs at least one prompt (or a tokenizer_file)")
      return train_text_tokenizer(texts, int(vocab_size), str(target), style=style, context_length=context_length)
  return TextTokenizer.from_file(str(target), context_length=context_length, style=style)


def _encoder(tokenizer: Any) -> Callable[[list[str]], np.ndarray]:
  encode = getattr(tokenizer, "encode", None)
  if callable(encode):
    return encode
  if callable(tokenizer):
    return tokenizer
  raise ValueError(f"tokenizer {tokenizer!r}: pass a TextTokenizer or a callable list[str] -> int32 [B, L]")


class SegSource:
  """One split held in memory as the trainer's records {"images": uint8 [S, S, 3], "masks": uint8 [S, S],
  "text_ids": int32 [L]}; `.examples[i]` is record i's metadata. An image shared by several targets
  (the synthetic set, a slice with several labels) is stored once."""

  def __init__(self, examples: Sequence[SegExample], *, image_size: int, tokenizer: Any, window: Any = None,
               progress: bool = False):
    self.examples = list(examples)
    if not self.examples:
      raise ValueError("SegSource needs at least one example")
    self.image_size = int(image_size)
    s = self.image_size
    keys: dict[tuple, int] = {}
    self.image_index = np.zeros(len(self.examples), np.int32)
    images: list[np.ndarray] = []
    self.masks = np.zeros((len(self.examples), s, s), np.uint8)
    cache = _VolumeCache()
    items: Iterator[tuple[int, SegExample]] | Any = enumerate(self.examples)
    if progress:
      from tqdm.auto import tqdm
      items = tqdm(items, total=len(self.examples), desc="loading examples", unit="ex", leave=False)
    for i, ex in items:
      image, mask = read_example(ex, window=window, cache=cache)
      key = (ex.image_path, ex.slice_index, ex.channel)
      if key not in keys:
        keys[key] = len(images)
        images.append(resize_image(image, s))
      self.image_index[i] = keys[key]
      self.masks[i] = resize_mask(mask, s)
    self.images = np.stack(images)
    self.text_ids = np.asarray(_encoder(tokenizer)([e.prompt for e in self.examples]), np.int32)

  @classmethod
  def from_root(cls, root: str | os.PathLike, *, format: str, image_size: int, tokenizer: Any, split: str = "train",
                window: Any = "auto", progress: bool = False, **scan_kwargs: Any) -> SegSource:
    return cls(scan(root, format=format, split=split, window=window, **scan_kwargs), image_size=image_size,
               tokenizer=tokenizer, progress=progress)

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    return {"images": self.images[self.image_index[i]], "masks": self.masks[i], "text_ids": self.text_ids[i]}


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord) for large data, read through grain


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


def _builder_class():
  """The builder class, defined on first use (tensorflow_datasets is a heavy import)."""
  global _SegSlices, _SegSlicesConfig
  if _SegSlices is not None:
    return _SegSlices, _SegSlicesConfig
  tfds = _tfds()

  @dataclasses.dataclass(eq=False)
  class SegSlicesConfig(tfds.core.BuilderConfig):
    """root, format, image_size, window (JSON) and the scan options (JSON) of the dataset to convert."""

    root: str = ""
    format: str = "png"
    image_size: int = 128
    window: str = "null"
    scan_options: str = "{}"

  class SegSlices(tfds.core.GeneratorBasedBuilder):
    """A segmentation dataset (any of FORMATS) -> ArrayRecord records: image uint8 [S, S, 3], mask
    uint8 [S, S], prompt, example (the SegExample as JSON)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "image, mask, prompt, example metadata"}

    def __init__(self, *, config: SegSlicesConfig | None = None, examples: Sequence[SegExample] | None = None,
                 **kwargs: Any):
      self._examples = list(examples) if examples is not None else None
      if self._examples is None and isinstance(config, SegSlicesConfig) and config.root:
        self._examples = scan(config.root, format=config.format, split=None, **json.loads(config.scan_options))
      kwargs.setdefault("file_format", "array_record")
      super().__init__(config=config, **kwargs)

    def _info(self):
      s = int(self.builder_config.image_size)
      return tfds.core.DatasetInfo(
          builder=self,
          description="Images, target masks and text prompts of a segmentation dataset (mlx_med.seg.data).",
          disable_shuffling=True,  # records in scan order (grain shuffles when reading)
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding="zlib"),
              "mask": tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding="zlib"),
              "prompt": tfds.features.Text(),
              "example": tfds.features.Text(),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      if self._examples is None:
        raise SegDataError("SegSlices", "no dataset to build", "use build_tfds(root, data_dir, format=...)")
      splits = sorted({e.split for e in self._examples})
      return {sp: self._generate_examples(sp) for sp in splits}

    def _generate_examples(self, split: str):
      cfg = self.builder_config
      window, cache = json.loads(cfg.window), _VolumeCache()
      window = tuple(window) if isinstance(window, list) else window  # None: each example's own
      for i, ex in enumerate(self._examples):
        if ex.split != split:
          continue
        image, mask = load_example(ex, image_size=int(cfg.image_size), window=window, cache=cache)
        yield f"{i:08d}", {"image": image, "mask": mask, "prompt": ex.prompt, "example": json.dumps(ex.to_dict())}

  _SegSlices, _SegSlicesConfig = SegSlices, SegSlicesConfig
  return SegSlices, SegSlicesConfig


_SegSlices: Any = None
_SegSlicesConfig: Any = None


def build_tfds(root: str | os.PathLike, data_dir: str | os.PathLike, *, format: str, image_size: int,
               window: Any = None, config_name: str = "default", overwrite: bool = False, **scan_kwargs: Any):
  """Converts the dataset at `root` once into ArrayRecord files under `data_dir` (every split the scan
  finds) and returns the TFDS builder; `builder.as_data_source(split)` gives grain's random access,
  `RecordSegSource` the training records. An existing build is reused unless `overwrite`. window: None
  reads each example with its own (the scan's `window` option, in scan_kwargs)."""
  tfds = _tfds()
  builder_cls, config_cls = _builder_class()
  if format not in FORMATS:
    raise SegDataError(root, f"unknown data format {format!r}", f"use one of {', '.join(FORMATS)}")
  options = {k: ({str(a): b for a, b in v.items()} if k == "labels" and v is not None else v)
             for k, v in scan_kwargs.items()}
  config = config_cls(name=config_name, root=str(root), format=format, image_size=int(image_size),
                      window=json.dumps(window), scan_options=json.dumps(options, sort_keys=True))
  builder = builder_cls(config=config, data_dir=str(data_dir))
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


def build_tfds_examples(examples: Sequence[SegExample], data_dir: str | os.PathLike, *, image_size: int,
                        window: Any = None, config_name: str | None = None, overwrite: bool = False):
  """`build_tfds` for a given list of examples (any subset, any layout): one split per example split.
  The default config name is a fingerprint of the examples and settings, so a changed list builds anew
  and an unchanged one is reused."""
  tfds = _tfds()
  builder_cls, config_cls = _builder_class()
  examples = list(examples)
  if not examples:
    raise ValueError("build_tfds_examples needs at least one example")
  if config_name is None:
    digest = zlib.crc32(json.dumps([e.to_dict() for e in examples] + [int(image_size), window],
                                   sort_keys=True, default=str).encode())
    config_name = f"examples-{digest:08x}"
  config = config_cls(name=config_name, format=examples[0].format, image_size=int(image_size),
                      window=json.dumps(window))
  builder = builder_cls(config=config, examples=examples, data_dir=str(data_dir))
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


class RecordSegSource:
  """The records of one split of a `build_tfds` dataset, read lazily (ArrayRecord through TFDS's data
  source: random access, as grain needs); prompts are tokenized per record. Same records as SegSource."""

  def __init__(self, records: Any, tokenizer: Any):
    self.records, self._encode = records, _encoder(tokenizer)
    self._examples: list[SegExample] | None = None

  @classmethod
  def from_builder(cls, builder: Any, split: str, tokenizer: Any) -> RecordSegSource:
    if split not in builder.info.splits:
      raise SegDataError(builder.data_dir, f"split {split!r} not built (have {', '.join(sorted(builder.info.splits))})",
                         "choose a built split")
    return cls(builder.as_data_source(split), tokenizer)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    rec = self.records[int(i)]
    return {"images": np.asarray(rec["image"], np.uint8), "masks": np.asarray(rec["mask"], np.uint8),
            "text_ids": np.asarray(self._encode([_text(rec["prompt"])])[0], np.int32)}

  @property
  def examples(self) -> list[SegExample]:
    if self._examples is None:
      self._examples = [SegExample.from_dict(json.loads(_text(self.records[i]["example"]))) for i in range(len(self))]
    return self._examples


def _text(v: Any) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def make_source(config: Any, workdir: str | os.PathLike, examples: Sequence[SegExample], tokenizer: Any, *,
                image_size: int, split: str = "train", progress: bool = False, train: bool = True) -> Any:
  """The records of `examples` by `config.data.source`: "memory" (`SegSource`, decoded once) or "tfds"
  (`RecordSegSource` over ArrayRecord files built once into data.tfds_dir, default <workdir>/tfds, by
  process 0 while the others wait). Records are never augmented here (`train` is accepted for the
  callers' symmetry)."""
  del train
  d = config.data
  kind = d.get("source", "memory")
  if kind == "memory":
    return SegSource(examples, image_size=image_size, tokenizer=tokenizer, progress=progress)
  if kind != "tfds":
    raise ValueError(f"data.source={kind!r}: choose memory (decoded once, held in RAM) or tfds (ArrayRecord, lazy)")
  import jax

  data_dir = d.get("tfds_dir") or os.path.join(os.fspath(workdir), "tfds")
  if jax.process_index() == 0:
    build_tfds_examples(examples, data_dir, image_size=image_size)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"seg_tfds_{split}")
  builder = build_tfds_examples(examples, data_dir, image_size=image_size)
  return RecordSegSource.from_builder(builder, split, tokenizer)
