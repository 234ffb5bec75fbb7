"""EHR foundation-model pretraining: MEDS root -> timeline tokens -> decoder training.

`run(config, workdir)` is what `mlx-med train --config configs/ehr/pretrain.py...`
calls. With `data.meds_root` empty it first generates the synthetic cohort into the
workdir, so the smoke run needs no data at all. On several hosts, process 0
prepares the cohort/vocabulary/token cache on the (shared) workdir and the others
wait at a barrier, then every host reads its own shard of the examples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections

from mlx_med.core import trainer
from mlx_med.core.lm_task import DecoderLMTask
from mlx_med.core.transformer import DecoderConfig

log = logging.getLogger("mlx_med.ehr.pretrain")

_VOCAB_MULTIPLE = 64  # pad the embedding table to a lane-friendly size; extra ids never occur


@dataclasses.dataclass
class PretrainData:
  meds_root: str
  vocab_path: str
  tokenizer: Any
  train_source: Any
  eval_source: Any
  summary: dict


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str, str]:
  d = config.data
  meds_root = d.meds_root or os.path.join(workdir, "synthetic_meds")
  vocab_path = d.vocab_path or os.path.join(workdir, "vocab.json")
  cache_dir = d.cache_dir or os.path.join(workdir, "token_cache")
  return meds_root, vocab_path, cache_dir


def prepare_data(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> PretrainData:
  """Cohort (synthetic if no meds_root), fitted vocabulary, cached token examples."""
  from mlx_med.ehr import dataset as dataset_lib
  from mlx_med.ehr.synth import generate_cohort

  d = config.data
  meds_root, vocab_path, cache_dir = resolve_paths(config, workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    if not d.meds_root and not os.path.isdir(meds_root):
      log.info("no data.meds_root: generating a synthetic cohort of %d subjects in %s", d.synth_subjects, meds_root)
      generate_cohort(int(d.synth_subjects), seed=int(d.synth_seed), out_dir=meds_root, progress=progress)
    # Fit (or load) the vocabulary and fill the token cache once, on one host.
    dataset_lib.build_pretraining_data(**_data_kwargs(config, meds_root, vocab_path, cache_dir, d.train_split, progress))
  _barrier("ehr_pretrain_data_ready")
  train_source, tokenizer, summary = dataset_lib.build_pretraining_data(
      **_data_kwargs(config, meds_root, vocab_path, cache_dir, d.train_split, False))
  eval_source = None
  if d.eval_split:
    eval_source, _, _ = dataset_lib.build_pretraining_data(
        **_data_kwargs(config, meds_root, vocab_path, cache_dir, d.eval_split, False))
  return PretrainData(meds_root, vocab_path, tokenizer, train_source, eval_source, summary)


def _data_kwargs(config, meds_root, vocab_path, cache_dir, split, progress) -> dict:
  d = config.data
  return dict(meds_root=meds_root, vocab_path=vocab_path, seq_len=int(d.seq_len), packing=d.packing,
              split=split, cache_dir=cache_dir, min_count=int(d.min_code_count),
              num_value_bins=int(d.num_value_bins), hierarchical_codes=bool(d.hierarchical_codes),
              progress=progress)


def padded_vocab_size(config: ml_collections.ConfigDict, vocab_size: int) -> int:
  """The embedding size for a tokenizer of `vocab_size` tokens: model.vocab_size, or (when 0)
  the tokenizer's size rounded up to a multiple of 64."""
  configured = int(config.model.get("vocab_size", 0) or 0)
  return configured or -(-vocab_size // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> DecoderConfig:
  values = dict(config.model)
  if not values.get("vocab_size"):
    values["vocab_size"] = padded_vocab_size(config, vocab_size)
  elif values["vocab_size"] < vocab_size:
    raise ValueError(f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's {vocab_size} tokens; "
                     "set it to 0 to follow the tokenizer")
  values["head_dim"] = values.get("head_dim") or None
  values["max_seq_len"] = int(config.data.seq_len)
  return DecoderConfig.from_config(values)


def run(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
        callbacks: Sequence[trainer.StepCallback] = (), allow_config_change: bool = False) -> trainer.TrainResult:
  """Claims the workdir, checks that the model fits, prepares the data, trains (or resumes)."""
  seq_len = int(config.data.seq_len)
  # Fail fast, before any data work: a bad model section, a workdir of another run, or a
  # model that cannot fit (checked with the smallest vocabulary; rechecked with the real one).
  guess = model_config(config, int(config.model.vocab_size) or _VOCAB_MULTIPLE)
  trainer.check_memory(config, DecoderLMTask(guess, seq_len=seq_len))
  trainer.claim_workdir(config, workdir, allow_config_change)
  data = prepare_data(config, workdir, progress)
  model_cfg = model_config(config, data.tokenizer.vocab_size)
  if jax.process_index() == 0:
    log.info("data: %s train / %s eval examples of %d tokens; vocabulary %d -> embedding %d",
             len(data.train_source), len(data.eval_source) if data.eval_source is not None else 0,
             seq_len, data.tokenizer.vocab_size, model_cfg.vocab_size)
  task = DecoderLMTask(model_cfg, seq_len=seq_len)
  return trainer.train(config, workdir, task, data.train_source, data.eval_source, progress=progress,
                       callbacks=callbacks, allow_config_change=allow_config_change)
