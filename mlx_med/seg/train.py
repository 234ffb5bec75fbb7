"""BoltzFormer training: a dataset folder (or the synthetic generator) -> the model -> the shared trainer.

`run(config, workdir)` is what `mlx-med seg train --config configs/seg/boltzformer.py:...` (and
`mlx-med train` with config.task = "boltzformer") calls:

1. the data: `data.root` in one of the layouts of `seg.data` (`msd`, `dicom`, `png`), or, when empty,
   synthetic CT-like slices written once into `data.synthetic_dir` (default <workdir>/synthetic; a
   restarted run, and the other runs of `seg compare`, reuse them);
2. the tokenizer: `data.tokenizer` (a tokenizer.json, e.g. CLIP's) or a byte-level BPE tokenizer trained
   on the training prompts, copied to <workdir>/tokenizer.json;
3. <workdir>/model.json (the resolved `BoltzFormerConfig`) and data.json (how images were read and
   normalised), which `seg.predict.Segmenter.load(workdir)` reads;
4. `core.trainer.Trainer` with the `SegTask` (Dice + BCE on the fused output): sharded steps, EMA,
   checkpoints with the loader's position, resumption, metrics and the loss curve;
5. after the last step, the evaluation of `seg.evaluate` on the eval split under the run's own attention
   mode (<workdir>/eval_<mode>/: report.json, per_image.csv, summary.md).

The encoder may start from a MedImageInsight run (`model.encoder_init_from`: an `mlx-med embed train`
directory whose image tower is a DaViT of the same shape).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlx_med.core import trainer as trainer_lib
from mlx_med.core.task import LossOutput, Task

log = logging.getLogger("mlx_med.seg.train")

MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
DATA_FILE = "data.json"
TRAIN_TIME_FILE = "train_time.json"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def write_json(path: Path, value: Any) -> None:
  """Atomic JSON write (temporary name, then rename)."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2))
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- task


class SegTask(Task):
  """Text-prompted segmentation for the shared trainer.

  Batch: images uint8 [B, S, S, 3] (normalised on the device, which keeps host work and transfers at a
  quarter of float32), masks uint8 [B, S, S], text_ids int32 [B, L]. The loss is the release's Dice
  (squared predictions in the denominator) + BCE of the fused output, summed over examples; metrics are
  sums the trainer divides by the batch size: dice_loss, bce, dice (hard, at 0.5) and kept_fraction (the
  share of (head, query, key) triples the decoder's cross-attention computed).
  """

  decomposable = True

  def __init__(self, cfg):
    from mlx_med.seg import model as model_lib

    self.cfg = cfg
    self.model_lib = model_lib

  @property
  def batch_axes(self):
    return {"images": ("batch", None, None, None), "masks": ("batch", None, None), "text_ids": ("batch", None)}

  def init(self, rng):
    return self.model_lib.init_params(self.cfg, rng)

  def apply(self, params, batch, rng, *, rules=None, train=True, return_keep_masks=False):
    from mlx_med.seg import data as data_lib

    images = data_lib.normalize_device(batch["images"])
    model = self.model_lib.BoltzFormer(self.cfg, rules=rules)
    return model.apply({"params": params}, images, batch["text_ids"], sample_rng=rng, train=train,
                       return_keep_masks=return_keep_masks)

  def loss(self, params, batch, rng, *, rules=None, train=True) -> LossOutput:
    out = self.apply(params, batch, rng, rules=rules, train=train)
    per_example, parts = self.model_lib.seg_loss(out.logits, batch["masks"])
    total = float(sum(out.total))
    kept_fraction = jnp.sum(out.kept, axis=-1) / total
    metrics = {"dice_loss": jnp.sum(parts["dice_loss"]), "bce": jnp.sum(parts["bce"]), "dice": jnp.sum(parts["dice"]),
               "kept_fraction": jnp.sum(kept_fraction)}
    weight = jnp.asarray(per_example.shape[0], jnp.float32)
    return LossOutput(jnp.sum(per_example), weight, metrics)

  def describe(self) -> str:
    c = self.cfg
    return (f"BoltzFormer({c.encoder.get('kind', '?')} encoder, {c.image_size} px, {c.num_queries} queries, "
            f"hidden {c.hidden_dim}, {c.dec_layers} layers, attention={c.attention})")


# ----------------------------------------------------------------------------- data, tokenizer, model files


def data_root(config: ml_collections.ConfigDict, workdir: str) -> Path:
  d = config.data
  if d.root:
    return Path(d.root)
  return Path(d.synthetic_dir) if d.synthetic_dir else Path(workdir) / "synthetic"


def ensure_data(config: ml_collections.ConfigDict, workdir: str) -> Path:
  """The dataset folder; with data.root empty, the synthetic one (generated on first use)."""
  from mlx_med.seg import synth

  d = config.data
  root = data_root(config, workdir)
  if not d.root and jax.process_index() == 0 and not (root / "metadata.csv").is_file():
    log.info("no data.root: generating %d + %d synthetic CT-like slices of %d px into %s", d.synth_train, d.synth_test,
             config.model.image_size, root)
    synth.generate_synthetic(root, n_train=int(d.synth_train), n_test=int(d.synth_test),
                             image_size=int(config.model.image_size), seed=int(d.synth_seed))
  _barrier("seg_data_ready")
  return root


def scan_split(config: ml_collections.ConfigDict, root: Path, split: str):
  from mlx_med.seg import data as data_lib

  d = config.data
  return data_lib.scan(root, format=d.format if d.root else "png", split=split, prompt=d.prompt or None,
                       channel=int(d.channel), window=d.window)


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str, prompts: Sequence[str]):
  """<workdir>/tokenizer.json from data.tokenizer or a BPE tokenizer trained on the training prompts."""
  from mlx_med.vision.text import TextTokenizer, train_text_tokenizer

  target = Path(workdir) / TOKENIZER_FILE
  context = int(config.model.text.context_length)
  if jax.process_index() == 0 and not target.is_file():
    source = config.data.tokenizer
    if source:
      if not Path(source).is_file():
        raise FileNotFoundError(f"data.tokenizer={source!r}: no such file; pass a tokenizer.json (e.g. CLIP's)")
      tmp = target.with_name(target.name + ".tmp")
      shutil.copyfile(source, tmp)
      os.replace(tmp, target)
    else:
      unique = sorted(set(prompts))
      log.info("no data.tokenizer: training a %d-token BPE tokenizer on %d distinct prompts",
               config.data.tokenizer_vocab_size, len(unique))
      tmp = target.with_name("tokenizer.tmp.json")
      # Repeated so that the trainer sees each prompt's words often enough to merge them.
      train_text_tokenizer(list(prompts), int(config.data.tokenizer_vocab_size), str(tmp), style="clip")
      os.replace(tmp, target)
  _barrier("seg_tokenizer_ready")
  return TextTokenizer.from_file(str(target), context_length=context, style="clip")


def model_config(config: ml_collections.ConfigDict, tokenizer):
  """config.model (+ the tokenizer's vocabulary and special ids) -> BoltzFormerConfig."""
  from mlx_med.seg.model import BoltzFormerConfig

  values = config.model.to_dict()
  values.pop("encoder_init_from", None)
  text = dict(values["text"])
  if int(text.get("vocab_size", 0)) <= 0:
    text["vocab_size"] = int(tokenizer.vocab_size)
  if int(text.get("eos_token_id", -1)) < 0:
    text["eos_token_id"] = int(tokenizer.eos_token_id)
  if int(text.get("pad_token_id", -1)) < 0:
    text["pad_token_id"] = int(tokenizer.pad_token_id)
  values["text"] = text
  encoder = dict(values["encoder"])
  encoder["image_size"] = int(values["image_size"])
  values["encoder"] = encoder
  return BoltzFormerConfig.from_dict(values)


@dataclasses.dataclass
class SegData:
  root: Path
  tokenizer: Any
  train_source: Any
  eval_source: Any


def build(config: ml_collections.ConfigDict, workdir: str, progress: bool = True):
  """(task, data): everything a run needs before the trainer starts."""
  from mlx_med.seg import data as data_lib

  root = ensure_data(config, workdir)
  d = config.data
  train_examples = scan_split(config, root, d.train_split)
  eval_examples = scan_split(config, root, d.eval_split) if d.eval_split else []
  tokenizer = prepare_tokenizer(config, workdir, [ex.prompt for ex in train_examples])
  cfg = model_config(config, tokenizer)
  work = Path(workdir)
  if jax.process_index() == 0:
    write_json(work / MODEL_FILE, cfg.to_dict())
    write_json(work / DATA_FILE, data_lib.data_settings(config, cfg.image_size))
  size = cfg.image_size
  train_source = data_lib.make_source(config, workdir, train_examples, tokenizer, image_size=size, split=d.train_split,
                                      progress=progress)
  eval_source = (data_lib.make_source(config, workdir, eval_examples, tokenizer, image_size=size, split=d.eval_split,
                                      progress=progress) if eval_examples else None)
  return SegTask(cfg), SegData(root, tokenizer, train_source, eval_source)


def encoder_params_from_embed_run(path: str, current: Any) -> Any:
  """The DaViT image tower of an `mlx-med embed train` run, checked against this model's encoder."""
  from mlx_med.embed.model import Embedder

  embedder = Embedder.load(path)
  tower = embedder.params.get("image_encoder") if isinstance(embedder.params, dict) else None
  if tower is None:
    raise ValueError(f"model.encoder_init_from={path}: the run has no image tower parameters")
  got = jax.tree.map(lambda x: tuple(np.shape(x)), tower)
  want = jax.tree.map(lambda x: tuple(np.shape(x)), current)
  if got != want:
    raise ValueError(f"model.encoder_init_from={path}: its image tower does not match model.encoder (set "
                     "model.encoder to the run's DaViT sizes)")
  return tower


def load_encoder_init(trainer: trainer_lib.Trainer, path: str) -> None:
  params = trainer.state["params"]
  tower = encoder_params_from_embed_run(path, params["encoder"])
  shardings = trainer.state_shardings["params"]["encoder"]
  placed = jax.tree.map(lambda x, ref, s: jax.device_put(np.asarray(x, ref.dtype), s), tower, params["encoder"],
                        shardings)
  trainer.state["params"] = {**params, "encoder": placed}
  if "ema_params" in trainer.state:
    trainer.state["ema_params"] = {**trainer.state["ema_params"], "encoder": placed}
  log.info("initialised the image encoder from %s", path)


def _record_train_time(workdir: str, seconds: float, step: int) -> None:
  """Accumulates wall time across resumed runs (`seg compare` reports the total)."""
  path = Path(workdir) / TRAIN_TIME_FILE
  prev = json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0}
  write_json(path, {"seconds": float(prev["seconds"]) + seconds, "step": int(step)})


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, allow_config_change: bool = False,
        callbacks: Sequence[trainer_lib.StepCallback] = (), evaluate: bool = True) -> trainer_lib.TrainResult:
  """Claims the workdir, prepares data/tokenizer/model files, trains (or resumes), then evaluates."""
  trainer_lib.claim_workdir(config, workdir, allow_config_change)
  task, data = build(config, workdir, progress)
  if jax.process_index() == 0:
    log.info("data: %s; %d train / %d eval targets; %s", data.root, len(data.train_source),
             len(data.eval_source) if data.eval_source is not None else 0, task.describe())
  trainer = trainer_lib.Trainer(config, workdir, task, data.train_source, data.eval_source, progress=progress,
                                callbacks=callbacks, allow_config_change=allow_config_change)
  trainer.setup()
  if config.model.encoder_init_from and trainer.start_step == 0:
    load_encoder_init(trainer, config.model.encoder_init_from)
  start = time.perf_counter()
  result = trainer.run()
  if jax.process_index() == 0:
    _record_train_time(workdir, time.perf_counter() - start, int(config.train.steps))
  if evaluate and data.eval_source is not None and jax.process_index() == 0:
    from mlx_med.seg import evaluate as eval_lib
    e = config.eval
    report = eval_lib.evaluate_run(workdir, split=config.data.eval_split, max_images=int(e.max_images),
                                   n_boot=int(e.n_boot), progress=progress)
    log.info("evaluation (%s): %s", task.cfg.attention, report["paths"]["summary"])
  return result
