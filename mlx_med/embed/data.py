"""Image-text-label datasets on disk: a TFDS builder writing ArrayRecord, read through grain.

A dataset is a local folder with images (any format `mlx_med.vision.io.load_image` reads: PNG,
JPEG, DICOM, NIfTI...) and a `metadata.csv` with the columns

  path     image file, relative to the folder
  split    train | validation | test
  labels   ";"-joined label names (empty for an image without findings)
  report   the image's text
  domain   (optional) the modality

`FolderImageText` (a tensorflow-datasets `GeneratorBasedBuilder`) converts it once into
ArrayRecord files (`build_tfds(folder, data_dir)`): random access by index, which is what
grain needs for a deterministic, shardable, checkpointable order. Each record holds
  image        uint8 [H, W, 3] (zlib-compressed tensor; resized on write when `image_size` is set:
               the short side to image_size, then a centre crop to a square)
  report       text
  labels       int32 multi-hot [K] over the label vocabulary
  label_names  the row's labels, ";"-joined as in the CSV
  domain, path text
The label vocabulary is the sorted set of labels in the CSV (or the list given in the config);
it is saved beside the records (`label_names(data_dir)`).

TFDS works here without TensorFlow: the builder lives in a real module, `_info` builds its
`DatasetInfo` directly, and images are `tfds.features.Tensor(..., encoding="zlib")` rather than
`tfds.features.Image` (whose PNG codec needs TF).

`make_loader` reads a split with `builder.as_data_source(split)` into grain's dataset API:
this host's shard (every shard_count-th record from shard_index, equal lengths on all hosts),
a seeded shuffle that changes every epoch, per-example augmentation and normalisation with the
image processor's mean/std (`ImageTransform`) with a random generator derived from (seed,
position in the stream) so a resumed or re-run pipeline draws the same crops, then batching
and tokenisation. Training (`embed.train`) goes through the trainer's loader instead, with the
same `ImageTransform` as its sources' `train_transform` (`TrainingTransform`): one
implementation of crop, flip, jitter and normalisation for both.
Iterators checkpoint with get_state/set_state. Batches are dicts of numpy arrays:
  images float32 [B, S, S, 3], text_ids int32 [B, L], labels int32 [B, K]
(the embedding task's batch keys); `with_metadata=True` adds "path" and "domain" string arrays.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

METADATA = "metadata.csv"
REQUIRED_COLUMNS = ("path", "split", "labels", "report")
SPLITS = ("train", "validation", "test")
LABELS_FILE = "label_names.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MetadataError(ValueError):
  """A problem in metadata.csv or the files it names; the message is one line naming file and row."""


# ---------------------------------------------------------------------------------------------
# metadata.csv


def _split_labels(text: str) -> list[str]:
  return [x.strip() for x in (text or "").split(";") if x.strip()]


def read_metadata(folder: str | os.PathLike, *, check_files: bool = True) -> list[dict[str, str]]:
  """Rows of `folder/metadata.csv`, validated: required columns, known splits, existing image files.

  Each row gets "line" (its line number in the file, for messages). Raises MetadataError."""
  csv_path = Path(folder) / METADATA
  if not csv_path.is_file():
    raise MetadataError(f"{csv_path}: not found; the folder must hold a metadata.csv with columns "
                        f"{', '.join(REQUIRED_COLUMNS)} (and optionally domain)")
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise MetadataError(f"{csv_path}: missing column(s) {missing}; the header must name "
                          f"{', '.join(REQUIRED_COLUMNS)} (and optionally domain), found {reader.fieldnames}")
    rows = []
    for row in reader:
      row = {k: (v if v is not None else "") for k, v in row.items() if k is not None}
      row["line"] = str(reader.line_num)
      rows.append(row)
  if not rows:
    raise MetadataError(f"{csv_path}: no rows; add one line per image")
  first_line: dict[str, str] = {}
  for row in rows:
    where = f"{csv_path}, line {row['line']}"
    if row["path"] in first_line:
      raise MetadataError(f"{where}: image {row['path']!r} is listed again (first on line {first_line[row['path']]}); "
                          "keep one row per image")
    first_line[row["path"]] = row["line"]
    if row["split"] not in SPLITS:
      raise MetadataError(f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}; fix the split column")
    if not row["path"]:
      raise MetadataError(f"{where}: empty path; give the image file relative to {Path(folder)}")
    if check_files and not (Path(folder) / row["path"]).is_file():
      raise MetadataError(f"{where}: image file {row['path']!r} not found under {Path(folder)}; "
                          "fix the path column (relative to the folder) or add the file")
  return rows


def vocabulary(rows: Sequence[dict[str, str]]) -> list[str]:
  """Every label that occurs in the rows, sorted."""
  return sorted({label for row in rows for label in _split_labels(row["labels"])})


def row_labels(row: dict[str, str]) -> list[str]:
  """The label names of one metadata row (its ";"-joined labels column; none when empty)."""
  return _split_labels(row.get("labels") or "")


def label_matrix(rows: Sequence[dict[str, str]], names: Sequence[str]) -> np.ndarray:
  """[N, K] int32 multi-hot labels of metadata rows over `names` (labels not in `names` are ignored)."""
  index = {n: k for k, n in enumerate(names)}
  y = np.zeros((len(rows), len(names)), np.int32)
  for i, row in enumerate(rows):
    for label in row_labels(row):
      if label in index:
        y[i, index[label]] = 1
  return y


def load_rgb_uint8(path: str | os.PathLike, image_size: int | None = None) -> np.ndarray:
  """uint8 [H, W, 3] through `vision.io.load_image` (display window, grayscale to RGB); with
  `image_size`, the short side resized to it (bicubic) and a centre crop to a square."""
  from mlx_med.vision.io import load_image, to_rgb

  img = load_image(path)
  if img.ndim == 3 and img.shape[-1] not in (1, 3, 4):
    raise MetadataError(f"{path}: {img.shape[0]} frames; store one frame per image (export the frame you want)")
  a = np.round(np.clip(to_rgb(img), 0.0, 1.0) * 255.0).astype(np.uint8)
  if image_size:
    a = _resize_square(a, int(image_size))
  return a


def _resize_square(a: np.ndarray, size: int) -> np.ndarray:
  h, w = a.shape[:2]
  if (h, w) == (size, size):
    return a
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (nh - size) // 2, (nw - size) // 2
  box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
  return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC, box=box))


# ---------------------------------------------------------------------------------------------
# The TFDS builder


@dataclasses.dataclass(eq=False)
class FolderImageTextConfig(tfds.core.BuilderConfig):
  """folder: the dataset folder; image_size: store images resized to this square (None: as they are);
  label_names: the label vocabulary (None: every label in the CSV, sorted)."""

  folder: str = ""
  image_size: int | None = None
  label_names: tuple[str, ...] | None = None


class FolderImageText(tfds.core.GeneratorBasedBuilder):
  """A local image folder with metadata.csv -> ArrayRecord records (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "image, report, multi-hot labels, label names, domain, path"}

  def __init__(self, *, config: FolderImageTextConfig | str | None = None, **kwargs: Any):
    self._rows: list[dict[str, str]] | None = None
    self._names: list[str] | None = None
    if isinstance(config, FolderImageTextConfig) and config.folder:
      self._rows = read_metadata(config.folder)
      self._names = list(config.label_names) if config.label_names is not None else vocabulary(self._rows)
      if not self._names:
        raise MetadataError(f"{Path(config.folder) / METADATA}: no labels in any row and no label_names given; "
                            "a label vocabulary of at least one name is needed")
      known = set(self._names)
      for row in self._rows:
        unknown = [x for x in _split_labels(row["labels"]) if x not in known]
        if unknown:
          raise MetadataError(f"{Path(config.folder) / METADATA}, line {row['line']}: labels {unknown} are not in "
                              "the given label_names; add them there or fix the row")
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    names = self._names
    if names is None:
      raise MetadataError("FolderImageText needs a FolderImageTextConfig with a folder to build; to read a built "
                          "dataset use make_loader(data_dir, ...) or tfds.builder_from_directory")
    image_shape = (self.builder_config.image_size, self.builder_config.image_size, 3) \
        if self.builder_config.image_size else (None, None, 3)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Images with reports and multi-hot labels from a local folder (metadata.csv).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=image_shape, dtype=np.uint8, encoding="zlib"),
            "report": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(len(names),), dtype=np.int32),
            "label_names": tfds.features.Text(),
            "domain": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(label_names=list(names)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    present = [s for s in SPLITS if any(r["split"] == s for r in self._rows)]
    return {s: self._generate_examples(s) for s in present}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from mlx_med.vision.io import ImageLoadError

    folder = Path(self.builder_config.folder)
    for row in self._rows:
      if row["split"] != split:
        continue
      try:
        image = load_rgb_uint8(folder / row["path"], self.builder_config.image_size)
      except ImageLoadError as e:
        raise MetadataError(f"{folder / METADATA}, line {row['line']}: {e}") from None
      labels = label_matrix([row], self._names)[0]
      names = row_labels(row)
      yield row["path"], {"image": image, "report": row["report"], "labels": labels,
                          "label_names": ";".join(names), "domain": row.get("domain", ""), "path": row["path"]}


def build_tfds(folder: str | os.PathLike, data_dir: str | os.PathLike, *, image_size: int | None = None,
               label_names: Sequence[str] | None = None, config_name: str = "default",
               overwrite: bool = False) -> tfds.core.DatasetBuilder:
  """Converts `folder` (images + metadata.csv) into ArrayRecord files under
  `data_dir/folder_image_text/<config_name>/<version>` and returns the builder;
  `builder.as_data_source(split)` reads it. An existing build is reused unless `overwrite`."""
  config = FolderImageTextConfig(name=config_name, folder=str(folder), image_size=image_size,
                                 label_names=tuple(label_names) if label_names is not None else None)
  builder = FolderImageText(config=config, data_dir=str(data_dir))
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  version_dir = Path(builder.data_dir)
  if overwrite or not (version_dir / LABELS_FILE).exists():
    tmp = version_dir / (LABELS_FILE + ".tmp")
    tmp.write_text(json.dumps(list(builder._names), indent=1) + "\n")
    os.replace(tmp, version_dir / LABELS_FILE)
  return builder


def _builder_dir(data_dir: str | os.PathLike) -> Path:
  """The version directory (the one holding dataset_info.json) under `data_dir`."""
  root = Path(data_dir)
  if (root / "dataset_info.json").is_file():
    return root
  found = sorted(p.parent for p in root.glob("**/dataset_info.json"))
  if not found:
    raise FileNotFoundError(f"{root}: no built dataset (no dataset_info.json below it); run build_tfds(folder, "
                            f"{str(root)!r}) first")
  if len(found) > 1:
    raise ValueError(f"{root}: holds {len(found)} built datasets ({', '.join(str(p) for p in found)}); pass one of "
                     "those directories or the builder")
  return found[0]


def open_tfds(data_dir_or_builder: Any) -> tfds.core.DatasetBuilder:
  """A builder from a builder, its version directory, or a data_dir holding exactly one built dataset."""
  if isinstance(data_dir_or_builder, tfds.core.DatasetBuilder):
    return data_dir_or_builder
  return tfds.builder_from_directory(str(_builder_dir(data_dir_or_builder)))


def label_names(data_dir_or_builder: Any) -> list[str]:
  """The label vocabulary of a built dataset, in the order of the multi-hot labels."""
  builder = open_tfds(data_dir_or_builder)
  f = Path(builder.data_dir) / LABELS_FILE
  if f.is_file():
    return list(json.loads(f.read_text()))
  meta = Path(builder.data_dir) / "metadata.json"
  if meta.is_file():
    return list(json.loads(meta.read_text())["label_names"])
  raise FileNotFoundError(f"{builder.data_dir}: no {LABELS_FILE}; rebuild the dataset with build_tfds")


# ---------------------------------------------------------------------------------------------
# The grain loader


def _mean_std(processor: Any) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) float32 [3] from an ImageProcessorConfig (image_mean/image_std), an object with
  .mean/.std, a (mean, std) pair, or None (OpenAI CLIP's)."""
  if processor is None:
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  elif hasattr(processor, "image_mean") and hasattr(processor, "image_std"):
    mean, std = processor.image_mean, processor.image_std
  elif hasattr(processor, "mean") and hasattr(processor, "std"):
    mean, std = processor.mean, processor.std
  elif isinstance(processor, (tuple, list)) and len(processor) == 2:
    mean, std = processor
  else:
    raise ValueError(f"processor {processor!r}: pass an ImageProcessorConfig, an object with .mean/.std or a "
                     "(mean, std) pair")
  mean = np.broadcast_to(np.asarray(mean, np.float32), (3,)).copy()
  std = np.broadcast_to(np.asarray(std, np.float32), (3,)).copy()
  if np.any(std <= 0):
    raise ValueError(f"processor std {std.tolist()} must be positive")
  return mean, std


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentation. scale: area fraction range of the random resized crop; ratio: its aspect
  range; flip: horizontal flips (off by default: left and right matter in medical images);
  brightness / contrast: multiplicative jitter half-widths."""

  scale: tuple[float, float] = (0.7, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = False
  brightness: float = 0.1
  contrast: float = 0.1

  def __post_init__(self):
    lo, hi = self.scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"augment scale={tuple(self.scale)}: need 0 < low <= high <= 1 (area fractions of the image)")
    if not 0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f"augment ratio={tuple(self.ratio)}: need 0 < low <= high (crop aspect ratios)")
    if not (0 <= self.brightness < 1 and 0 <= self.contrast < 1):
      raise ValueError(f"augment brightness={self.brightness}, contrast={self.contrast}: half-widths in [0, 1)")

  @classmethod
  def from_config(cls, cfg: Any) -> Augment | None:
    """From a config section (enabled, scale, ratio, flip, brightness, contrast; a missing field keeps
    its default); None when absent or `enabled` is false."""
    if cfg is None or not bool(cfg.get("enabled", False)):
      return None
    defaults = cls()
    return cls(scale=tuple(float(v) for v in cfg.get("scale", defaults.scale)),
               ratio=tuple(float(v) for v in cfg.get("ratio", defaults.ratio)),
               flip=bool(cfg.get("flip", defaults.flip)),
               brightness=float(cfg.get("brightness", defaults.brightness)),
               contrast=float(cfg.get("contrast", defaults.contrast)))


def _random_crop_box(rng: np.random.Generator, h: int, w: int, aug: Augment) -> tuple[float, float, float, float]:
  """torchvision's RandomResizedCrop box rule: up to 10 tries, else the whole image (centre, clamped ratio)."""
  area = h * w
  log_ratio = np.log(aug.ratio)
  for _ in range(10):
    target = area * rng.uniform(*aug.scale)
    ratio = np.exp(rng.uniform(*log_ratio))
    cw, ch = np.sqrt(target * ratio), np.sqrt(target / ratio)
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
      return left, top, left + cw, top + ch
  return 0.0, 0.0, float(w), float(h)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """uint8 [H, W, 3] image -> float32 [S, S, 3] model input: the one implementation of the image
  side of training and loading (`make_loader` and `embed.train`'s training records).

  Without `augment`: the short side resized to S and a centre crop (a no-op for an S x S image),
  rescaled and normalised exactly as `vision.io.preprocess` does (the float64 rescale, then float32
  (x - mean) / std), so an un-augmented S x S image equals the processor's output bitwise. With
  `augment`: a random resized crop (bicubic), an optional horizontal flip, brightness and contrast
  jitter (in pixel units, clipped to the 8-bit range), then the same rescale and normalisation.
  The generator `rng` is the only source of randomness (grain's per-example generator)."""

  image_size: int
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD
  augment: Augment | None = None
  rescale: float | None = 1 / 255  # None: no rescale (a processor with do_rescale=False)
  normalize: bool = True

  @classmethod
  def from_processor(cls, processor: Any, image_size: int, augment: Augment | None = None) -> ImageTransform:
    """From an ImageProcessorConfig (its mean/std, rescale and normalise switches) or any form
    `make_loader` takes (an object with .mean/.std, a (mean, std) pair, None = OpenAI CLIP's)."""
    mean, std = _mean_std(processor)
    rescale: float | None = 1 / 255
    if hasattr(processor, "do_rescale"):
      rescale = float(processor.rescale_factor) if processor.do_rescale else None
    return cls(int(image_size), tuple(float(v) for v in mean), tuple(float(v) for v in std), augment, rescale,
               bool(getattr(processor, "do_normalize", True)))

  def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
      raise ValueError(f"ImageTransform takes uint8 [H, W, 3] images, got {a.dtype} {list(a.shape)}")
    s, aug = self.image_size, self.augment
    if aug is None:
      x = _resize_square(a, s).astype(np.float32)
    else:
      if rng is None:
        raise ValueError("an augmenting ImageTransform needs a random generator (rng)")
      box = _random_crop_box(rng, a.shape[0], a.shape[1], aug)
      x = np.asarray(Image.fromarray(a).resize((s, s), Image.Resampling.BICUBIC, box=box)).astype(np.float32)
      if aug.flip and rng.random() < 0.5:
        x = x[:, ::-1]
      if aug.brightness:
        x = np.clip(x * np.float32(rng.uniform(1 - aug.brightness, 1 + aug.brightness)), 0.0, 255.0)
      if aug.contrast:
        c, m = np.float32(rng.uniform(1 - aug.contrast, 1 + aug.contrast)), x.mean(dtype=np.float32)
        x = np.clip((x - m) * c + m, 0.0, 255.0)
    if self.rescale is not None:
      x = (x.astype(np.float64) * self.rescale).astype(np.float32)
    if self.normalize:
      x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return np.ascontiguousarray(x, np.float32)


class TrainingTransform(grain.RandomMapTransform):
  """A training record {"images": uint8 [S, S, 3], "text_ids", "labels"} -> the embedding task's
  example (images through `image`, an ImageTransform): the `train_transform` of the training
  sources of `embed.train`, applied by the trainer's loader after shuffling (new crops each epoch)."""

  def __init__(self, image: ImageTransform):
    self.image = image
    self.plain = dataclasses.replace(image, augment=None)

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self._example(record, self.image(np.asarray(record["images"]), rng))

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Without augmentation (evaluation records): the normalised image."""
    return self._example(record, self.plain(np.asarray(record["images"])))

  @staticmethod
  def _example(record: dict[str, Any], image: np.ndarray) -> dict[str, np.ndarray]:
    return {"images": image, "text_ids": np.asarray(record["text_ids"], np.int32),
            "labels": np.asarray(record["labels"], np.int32)}


class _Prepare(grain.RandomMapTransform):
  """One record -> the normalised float32 image at the output size (augmented or not), report, labels,
  path, domain."""

  def __init__(self, image: ImageTransform):
    self.image = image

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {"image": self.image(np.asarray(record["image"]), rng), "report": _text(record["report"]),
            "labels": np.asarray(record["labels"], np.int32), "path": _text(record["path"]),
            "domain": _text(record["domain"])}


def _text(v: Any) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class _Collate(grain.MapTransform):
  """A list of prepared records -> the batch dict (stack, tokenise)."""

  def __init__(self, tokenizer: Callable[[list[str]], np.ndarray], with_metadata: bool):
    self.tokenizer, self.with_metadata = tokenizer, with_metadata

  def map(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    text_ids = np.asarray(self.tokenizer([r["report"] for r in records]), np.int32)
    batch = {"images": np.stack([r["image"] for r in records]).astype(np.float32), "text_ids": text_ids,
             "labels": np.stack([r["labels"] for r in records]).astype(np.int32)}
    if self.with_metadata:
      batch["path"] = np.asarray([r["path"] for r in records])
      batch["domain"] = np.asarray([r["domain"] for r in records])
    return batch


def _encode_fn(tokenizer: Any) -> Callable[[list[str]], np.ndarray]:
  """`tokenizer.encode` when it has one (TextTokenizer), else the tokenizer itself if callable."""
  encode = getattr(tokenizer, "encode", None)
  if callable(encode):
    return encode
  if callable(tokenizer):
    return tokenizer
  raise ValueError(f"tokenizer {tokenizer!r}: pass a callable list[str] -> int32 [B, L] (e.g. TextTokenizer.encode)")


def make_loader(data_dir_or_builder: Any, split: str, *, batch_size: int, image_size: int, processor: Any = None,
                tokenizer: Any, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                augment: bool | Augment = False, shard_index: int | None = None, shard_count: int | None = None,
                worker_count: int = 0, drop_remainder: bool = True, with_metadata: bool = False) -> grain.IterDataset:
  """This host's batches of `split` as a grain IterDataset; `iter()` of it checkpoints (get_state/set_state).

  batch_size is per shard (per host). shard_index/shard_count default to jax.process_index() /
  jax.process_count(); every shard gets the same number of records (the last len % shard_count
  are dropped) so hosts stay in step. num_epochs=None repeats forever. augment: True for the
  default `Augment()`, or an `Augment`. tokenizer: a callable list[str] -> int32 [B, L] or an
  object with such an `encode` (TextTokenizer). With `drop_remainder=False` the last batch of a
  finite stream may be smaller (evaluation)."""
  if shard_index is None or shard_count is None:
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  if batch_size < 1 or image_size < 1:
    raise ValueError(f"batch_size={batch_size} and image_size={image_size} must be positive")
  builder = open_tfds(data_dir_or_builder)
  splits = list(builder.info.splits)
  if split not in splits:
    raise ValueError(f"split {split!r} is not in {builder.data_dir} (it has {', '.join(sorted(splits))})")
  source = builder.as_data_source(split)
  per_shard = len(source) // shard_count
  if per_shard == 0:
    raise ValueError(f"split {split!r} has {len(source)} records, fewer than the {shard_count} shards")
  aug = Augment() if augment is True else (augment or None)
  image = ImageTransform.from_processor(processor, int(image_size), aug)
  ds = grain.MapDataset.source(source)[: per_shard * shard_count][shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  # The augmentation's generator comes from (seed, shard, position in the stream): identical on a rerun
  # and after a restore, different in every epoch.
  from mlx_med.core.data import transform_seed  # jax only when a loader is made

  ds = ds.random_map(_Prepare(image), seed=transform_seed(seed, shard_index))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
  ds = ds.map(_Collate(_encode_fn(tokenizer), with_metadata))
  iterable = ds.to_iter_dataset()
  if worker_count > 0:
    from mlx_med.core.data import mark_flags_parsed

    mark_flags_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iterable
