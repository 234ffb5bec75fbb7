"""MedImageInsight training: image folder (or the synthetic generator) -> two towers -> shared trainer.

`run(config, workdir)` is what `mlx-med embed train --config configs/embed/medimageinsight.py:...`
(and `mlx-med train` with config.task = "medimageinsight") calls:

1. the data folder: `data.folder` (images + metadata.csv with path, split, domain, labels,
   report), or, when empty, the synthetic multi-domain generator writes one into
   <workdir>/synthetic (once; a restarted run reuses it);
2. the tokenizer: `data.tokenizer` (a tokenizer.json, e.g. CLIP's), the checkpoint's own when
   `model.init_from` names a Hugging Face directory, or else a byte-level BPE tokenizer trained
   on the training reports; copied to <workdir>/tokenizer.json either way;
3. the towers: `model.image` / `model.text`, or those of `model.init_from` (a Hugging Face CLIP
   or SigLIP directory), whose weights replace the random initialisation at step 0;
4. <workdir>/model.json, processor.json and labels.json, so that `Embedder.load(workdir)` can
   rebuild the model, its preprocessing and the label names;
5. `core.trainer.Trainer` with the `EmbedTask`: sharded steps, EMA, checkpoints (the data
   iterator's position included), resumption, metrics and the loss curve.

The training records are a random-access source of raw records (uint8 image at the model's size,
token ids, multi-hot labels). `data.source="memory"` (`FolderSource`): every image is decoded,
resized and cropped with the run's image processor once and kept in memory as uint8 (small data:
the synthetic demo). `data.source="tfds"` (`RecordSource`): the folder is converted once into
ArrayRecord files by the TFDS builder of `embed.data` (images resized to the model's size) and
records are read lazily. Either way the trainer's grain loader shuffles, shards per host and
checkpoints positions over the source, then applies the source's `train_transform`
(`embed.data.TrainingTransform`: the `data.augment` crop/flip/jitter when enabled, rescale and
normalisation; the same `ImageTransform` as `embed.data.make_loader`) with a generator drawn from
the seed and the position in the stream: new augmentations every epoch, and a restarted run sees
exactly the batches an uninterrupted run would have seen. Evaluation batches are never augmented.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from mlx_med.core import trainer as trainer_lib
from mlx_med.embed import data as data_lib
from mlx_med.embed import model as model_lib

log = logging.getLogger("mlx_med.embed.train")

METADATA = data_lib.METADATA


# ----------------------------------------------------------------------------- data


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def data_folder(config: ml_collections.ConfigDict, workdir: str) -> Path:
  return Path(config.data.folder) if config.data.folder else Path(workdir) / "synthetic"


def ensure_data(config: ml_collections.ConfigDict, workdir: str) -> Path:
  """The data folder; with data.folder empty, the synthetic one (generated on first use)."""
  folder = data_folder(config, workdir)
  d = config.data
  if not d.folder and not (folder / METADATA).is_file() and jax.process_index() == 0:
    from mlx_med.embed.synth import generate_dataset
    size = int(config.model.image.get("image_size", 64))
    log.info("no data.folder: generating %d + %d synthetic images of %d px into %s", d.synth_train, d.synth_test,
             size, folder)
    generate_dataset(folder, n_train=int(d.synth_train), n_test=int(d.synth_test), image_size=size,
                     seed=int(d.synth_seed), finding_scale=float(d.get("synth_finding_scale", 1.0)))
  _barrier("embed_data_ready")
  return folder


class _Records:
  """Shared by the training record sources: a source made for training (`train=True`) returns the
  raw record {"images": uint8 [S, S, 3], "text_ids", "labels"} and carries `train_transform` (a
  `data.TrainingTransform`: the run's augmentation, if any, then rescale and normalisation), which the
  trainer's loader applies after shuffling, with new draws every epoch. An evaluation source
  (`train=False`) has no `train_transform` and returns finished examples (normalised, never augmented)."""

  def _init_transform(self, processor, image_size: int, augment: data_lib.Augment | None, train: bool) -> None:
    image = data_lib.ImageTransform.from_processor(processor, image_size, augment if train else None)
    self.transform = data_lib.TrainingTransform(image)
    self.train_transform = self.transform if train else None

  def record(self, i: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def __getitem__(self, i):
    rec = self.record(i)
    return rec if self.train_transform is not None else self.transform.map(rec)


class FolderSource(_Records):
  """Records of one split held in memory: {"images", "text_ids", "labels"} per index.

  Images are loaded (`vision.io.load_image`), resized and cropped as `processor` does and kept as uint8
  at the model's size (a quarter of float32's memory); the transform rescales and normalises them as
  `vision.io.preprocess` does (bitwise, without augmentation). Reports are tokenized with `tokenizer`;
  labels are multi-hot over `label_names`."""

  def __init__(self, folder: Path, rows: Sequence[dict[str, str]], processor, tokenizer,
               label_names: Sequence[str], progress: bool = False, *, image_size: int | None = None,
               augment: data_lib.Augment | None = None, train: bool = True):
    from mlx_med.vision.io import load_image, preprocess

    self.rows = list(rows)
    if not self.rows:
      raise ValueError(f"{Path(folder) / METADATA}: the split has no rows")
    self.paths = [str(Path(folder) / r["path"]) for r in self.rows]
    # The processor's geometry without rescale and normalisation: the 8-bit pixels it would normalise.
    geometry = dataclasses.replace(processor, do_rescale=False, do_normalize=False)
    iterator = self.paths
    if progress:
      from tqdm.auto import tqdm
      iterator = tqdm(self.paths, desc="loading images", unit="img", leave=False)
    self.images = None
    for k, path in enumerate(iterator):
      image = preprocess(load_image(path), processor=geometry).astype(np.uint8)
      if self.images is None:
        self.images = np.empty((len(self.paths),) + image.shape, np.uint8)
      if image.shape != self.images.shape[1:]:
        raise ValueError(f"{path}: preprocessed to {list(image.shape)}, other images to {list(self.images.shape[1:])};"
                         " use a processor with a centre crop or an exact resize")
      self.images[k] = image
    self.text_ids = np.asarray(tokenizer.encode([r["report"] for r in self.rows]), np.int32)
    labels = data_lib.label_matrix(self.rows, label_names)
    self.labels = labels if labels.shape[1] else np.zeros((len(self.rows), 1), np.int32)
    self.domains = [r.get("domain", "") for r in self.rows]
    self._init_transform(processor, int(image_size or self.images.shape[1]), augment, train)

  def __len__(self) -> int:
    return len(self.rows)

  def record(self, i):
    return {"images": self.images[i], "text_ids": self.text_ids[i], "labels": self.labels[i]}


class RecordSource(_Records):
  """Records read lazily from the ArrayRecord files of the TFDS builder (`embed.data.build_tfds`): for
  datasets too large to hold in memory. Images were resized to the model's size (uint8) when the
  records were written; reports are tokenized one record at a time (`data.worker_count` > 0 spreads
  this and the transform over grain worker processes)."""

  def __init__(self, records, processor, tokenizer, *, image_size: int, augment: data_lib.Augment | None = None,
               train: bool = True):
    self.records, self.tokenizer = records, tokenizer
    self._init_transform(processor, image_size, augment, train)

  def __len__(self) -> int:
    return len(self.records)

  def record(self, i):
    rec = self.records[i]
    report = rec["report"]
    report = report.decode("utf-8") if isinstance(report, bytes) else str(report)
    return {"images": np.asarray(rec["image"], np.uint8),
            "text_ids": np.asarray(self.tokenizer.encode([report])[0], np.int32),
            "labels": np.asarray(rec["labels"], np.int32)}


def make_sources(config: ml_collections.ConfigDict, workdir: str, folder: Path, rows, names, processor, tokenizer,
                 image_size: int, progress: bool = False):
  """(train source, eval source or None) by `data.source`: "memory" (FolderSource) or "tfds" (RecordSource
  over ArrayRecord files built once into data.tfds_dir, default <workdir>/tfds). The train source
  augments as `data.augment` says (in its `train_transform`); the eval source never does."""
  d = config.data
  augment = data_lib.Augment.from_config(d.get("augment"))
  splits = [d.train_split] + ([d.eval_split] if d.eval_split else [])
  present = {r["split"] for r in rows}
  if d.train_split not in present:
    raise ValueError(f"{folder / METADATA}: no rows with split={d.train_split!r} (data.train_split)")
  if d.source == "memory":
    made = [FolderSource(folder, [r for r in rows if r["split"] == s], processor, tokenizer, names, progress,
                         image_size=image_size, augment=augment, train=k == 0)
            if s in present else None for k, s in enumerate(splits)]
  elif d.source == "tfds":
    data_dir = d.tfds_dir or os.path.join(workdir, "tfds")
    if jax.process_index() == 0:
      data_lib.build_tfds(folder, data_dir, image_size=image_size, label_names=names)
    _barrier("embed_tfds_ready")
    builder = data_lib.build_tfds(folder, data_dir, image_size=image_size, label_names=names)
    made = [RecordSource(builder.as_data_source(s), processor, tokenizer, image_size=image_size, augment=augment,
                         train=k == 0) if s in present else None for k, s in enumerate(splits)]
  else:
    raise ValueError(f"data.source={d.source!r}: choose memory (decoded once, held in RAM) or tfds (ArrayRecord, lazy)")
  return made[0], (made[1] if len(made) > 1 else None)


# ----------------------------------------------------------------------------- tokenizer, processor


def _copy_atomic(src: str | os.PathLike, dst: Path) -> None:
  tmp = dst.with_name(dst.name + ".tmp")
  shutil.copyfile(src, tmp)
  os.replace(tmp, dst)


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str, rows, hf_tokenizer: str | None,
                      context_length: int, style: str):
  """<workdir>/tokenizer.json from data.tokenizer, the HF checkpoint, or BPE on the training reports."""
  from mlx_med.vision.text import TextTokenizer, train_text_tokenizer

  target = Path(workdir) / model_lib.TOKENIZER_FILE
  if jax.process_index() == 0 and not target.is_file():
    source = config.data.tokenizer or hf_tokenizer
    if source:
      if not Path(source).is_file():
        raise FileNotFoundError(f"data.tokenizer={source!r}: no such file; pass a tokenizer.json (e.g. CLIP's)")
      _copy_atomic(source, target)
    else:
      reports = [r["report"] for r in rows if r["split"] == config.data.train_split]
      log.info("no data.tokenizer: training a %d-token BPE tokenizer on %d reports", config.data.tokenizer_vocab_size,
               len(reports))
      tmp = target.with_name("tokenizer.tmp.json")
      train_text_tokenizer(reports, int(config.data.tokenizer_vocab_size), str(tmp), style=style)
      os.replace(tmp, target)
  _barrier("embed_tokenizer_ready")
  return TextTokenizer.from_file(str(target), context_length=context_length, style=style)


def make_processor(config: ml_collections.ConfigDict, image_size: int, hf_dir: str | None):
  from mlx_med.vision.io import ImageProcessorConfig

  if hf_dir:
    return ImageProcessorConfig.from_hf_dir(hf_dir)
  kind = config.data.processor
  if kind == "clip":
    return ImageProcessorConfig.clip(image_size)
  if kind == "siglip":
    return ImageProcessorConfig.siglip(image_size)
  raise ValueError(f"data.processor={kind!r}: choose clip or siglip")


def _write_json(path: Path, value: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2))
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- run


@dataclasses.dataclass
class EmbedData:
  folder: Path
  rows: list
  label_names: list
  tokenizer: Any
  processor: Any
  train_source: Any
  eval_source: Any


def build(config: ml_collections.ConfigDict, workdir: str, progress: bool = True):
  """(task, data, hf_towers or None): everything a run needs before the trainer starts."""
  m = config.model
  towers = None
  if m.init_from:
    from mlx_med.vision.hf import load_hf_towers
    towers = load_hf_towers(m.init_from)
  folder = ensure_data(config, workdir)
  rows = data_lib.read_metadata(folder)  # validated: columns, splits, image files
  names = data_lib.vocabulary(rows)
  if towers is not None:
    cfg = model_lib.config_from_hf(towers)
    style = towers.family
  else:
    style = m.text.get("style", "clip")
    cfg = None
  context = int(cfg.context_length if cfg is not None else m.text.context_length)
  tokenizer = prepare_tokenizer(config, workdir, rows, towers.tokenizer_path if towers is not None else None,
                                context, style)
  if cfg is None:
    cfg = model_lib.two_tower_config(m, tokenizer)
  elif tokenizer.vocab_size > cfg.text.vocab_size:
    raise ValueError(f"data.tokenizer has {tokenizer.vocab_size} tokens, more than the checkpoint's text tower "
                     f"({cfg.text.vocab_size}); use the checkpoint's tokenizer.json")
  if m.loss == "siglip" and not cfg.logit_bias:
    cfg = dataclasses.replace(cfg, logit_bias=True, logit_bias_init=float(m.logit_bias_init))
  processor = make_processor(config, cfg.image_size, m.init_from or None)

  workdir_path = Path(workdir)
  if jax.process_index() == 0:
    _write_json(workdir_path / model_lib.MODEL_FILE, cfg.to_dict())
    _write_json(workdir_path / model_lib.LABELS_FILE, names)
    model_lib.save_processor(workdir_path, processor)

  train_source, eval_source = make_sources(config, workdir, folder, rows, names, processor, tokenizer,
                                           cfg.image_size, progress)
  task = model_lib.EmbedTask(cfg, loss=m.loss, siglip_chunked=bool(m.siglip_chunked),
                             max_logit_scale=float(m.max_logit_scale), num_labels=len(names))
  data = EmbedData(folder, rows, names, tokenizer, processor, train_source, eval_source)
  return task, data, towers


def load_initial_params(trainer: trainer_lib.Trainer, towers) -> None:
  """At step 0, puts a Hugging Face checkpoint's weights into the (sharded) train state."""
  params = model_lib.hf_params(trainer.task.cfg, towers)
  current = trainer.state["params"]
  if "logit_bias" in current and "logit_bias" not in params:  # CLIP towers trained with the sigmoid loss
    params["logit_bias"] = current["logit_bias"]
  model_lib.check_same_structure(current, params, f"model.init_from={trainer.config.model.init_from}")
  shardings = trainer.state_shardings["params"]
  placed = jax.tree.map(lambda x, ref, s: jax.device_put(np.asarray(x, ref.dtype), s), params, current, shardings)
  trainer.state["params"] = placed
  if "ema_params" in trainer.state:
    trainer.state["ema_params"] = jax.tree.map(
        lambda x, s: jax.device_put(np.asarray(x), s), params, trainer.state_shardings["ema_params"])
  log.info("initialised the towers from %s", trainer.config.model.init_from)


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, allow_config_change: bool = False,
        callbacks: Sequence[trainer_lib.StepCallback] = ()) -> trainer_lib.TrainResult:
  """Claims the workdir, prepares data/tokenizer/model files, trains (or resumes)."""
  trainer_lib.claim_workdir(config, workdir, allow_config_change)
  task, data, towers = build(config, workdir, progress)
  if jax.process_index() == 0:
    log.info("data: %s; %d train / %d eval images, %d labels; %s", data.folder, len(data.train_source),
             len(data.eval_source) if data.eval_source is not None else 0, len(data.label_names), task.describe())
  trainer = trainer_lib.Trainer(config, workdir, task, data.train_source, data.eval_source, progress=progress,
                                callbacks=callbacks, allow_config_change=allow_config_change)
  trainer.setup()
  if towers is not None and trainer.start_step == 0:
    load_initial_params(trainer, towers)
  return trainer.run()
