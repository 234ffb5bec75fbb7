"""`mlx_med.embed.train.run` end to end at toy size: synthetic data, a BPE tokenizer and the
model files land in the workdir, the EMA parameters are checkpointed and are what `Embedder.load`
uses, a rerun resumes, and `model.init_from` starts from a Hugging Face CLIP directory."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlx_med.core import config as config_lib
from mlx_med.embed import train as train_lib
from mlx_med.embed.model import Embedder

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "embed" / "medimageinsight.py") + ":smoke"
TOY = ["model.image.image_size=32", "model.image.patch_size=8", "model.image.width=32", "model.image.depth=1",
       "model.image.num_heads=2", "model.image.mlp_dim=64", "model.text.width=32", "model.text.depth=1",
       "model.text.num_heads=2", "model.text.mlp_dim=64", "model.text.context_length=24", "model.embed_dim=16",
       "data.synth_train=48", "data.synth_test=16", "data.tokenizer_vocab_size=300", "train.batch_size=16",
       "train.warmup_steps=1", "train.log_every=2", "train.eval_every=0", "train.ckpt_every=2",
       "train.async_checkpointing=False", "train.ema_decay=0.5"]


def _state(workdir):
  manager = ocp.CheckpointManager(str((workdir / "checkpoints").absolute()),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()})
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return step, state


def _close(a, b, atol=0.0):
  return all(np.allclose(x, y, atol=atol, rtol=0) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_run_writes_the_model_files_and_the_embedder_uses_the_ema(tmp_path):
  workdir = tmp_path / "run"
  config = config_lib.get_config(CONFIG, TOY + ["train.steps=4"])
  result = train_lib.run(config, str(workdir), progress=False)
  assert result.final_step == 4 and np.isfinite(result.final_loss)
  for name in ("model.json", "tokenizer.json", "processor.json", "labels.json", "config.json", "metrics.jsonl"):
    assert (workdir / name).is_file(), name
  assert (workdir / "synthetic" / "metadata.csv").is_file()
  labels = json.loads((workdir / "labels.json").read_text())
  assert "xray/nodule" in labels and labels == sorted(labels)

  step, state = _state(workdir)
  assert step == 4 and "ema_params" in state
  assert not _close(state["ema_params"], state["params"])  # decay 0.5 over 4 steps: clearly different
  emb = Embedder.load(workdir, batch_size=8)
  assert emb.step == 4 and emb.labels == labels
  assert _close(emb.params, state["ema_params"]) and not _close(emb.params, state["params"])
  assert _close(Embedder.load(workdir, use_ema=False).params, state["params"])

  images = emb.preprocess([workdir / "synthetic" / "images" / "00000.png", workdir / "synthetic" / "images" / "00001.png"])
  assert images.shape == (2, 32, 32, 3)
  e_img = emb.embed_images(images)
  e_txt = emb.embed_texts(["chest x-ray with a nodule", "normal study.", "skin photograph"])
  assert e_img.shape == (2, 16) and e_txt.shape == (3, 16) and e_img.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e_txt, axis=1), 1.0, rtol=1e-5)
  # Paths give the same embeddings as the preprocessed arrays; odd batch sizes pad, not recompute differently.
  np.testing.assert_allclose(emb.embed_images([workdir / "synthetic" / "images" / "00000.png",
                                               workdir / "synthetic" / "images" / "00001.png"]), e_img, atol=1e-6)
  np.testing.assert_allclose(emb.embed_images(images[:1]), e_img[:1], atol=1e-6)

  # A rerun with more steps resumes from the checkpoint (and reuses data and tokenizer).
  tokenizer_before = (workdir / "tokenizer.json").read_text()
  more = config_lib.get_config(CONFIG, TOY + ["train.steps=6"])
  again = train_lib.run(more, str(workdir), progress=False, allow_config_change=True)
  assert again.final_step == 6 and (workdir / "tokenizer.json").read_text() == tokenizer_before


def test_init_from_a_hugging_face_clip_dir(tmp_path):
  from test_model import _tiny_clip_dir

  hf = tmp_path / "clip"
  hf.mkdir()
  _tiny_clip_dir(hf)
  workdir = tmp_path / "run"
  # warmup 5: the schedule's learning rate is 0 at step 0, so after one step the weights are the checkpoint's.
  config = config_lib.get_config(CONFIG, TOY + ["train.steps=1", "train.warmup_steps=5", "train.ckpt_every=1",
                                                f"model.init_from={hf}"])
  train_lib.run(config, str(workdir), progress=False)
  ours, ref = Embedder.load(workdir), Embedder.load(hf)
  assert ours.embed_dim == ref.embed_dim == 24  # the checkpoint's projection, not model.embed_dim
  assert _close(ours.params, ref.params, atol=1e-7)
  texts = ["a chest x-ray with a nodule", "normal study"]
  np.testing.assert_allclose(ours.embed_texts(texts), ref.embed_texts(texts), atol=1e-6)
  assert (workdir / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()


def test_bad_data_folder_is_one_clear_error(tmp_path):
  config = config_lib.get_config(CONFIG, TOY + [f"data.folder={tmp_path / 'nothing'}"])
  with pytest.raises(ValueError, match="metadata.csv"):
    train_lib.run(config, str(tmp_path / "run"), progress=False)


def test_lazy_tfds_records_equal_the_in_memory_source(tmp_path):
  from mlx_med.embed import data as data_lib
  from mlx_med.embed.synth import generate_dataset
  from mlx_med.vision.io import ImageProcessorConfig
  from mlx_med.vision.text import train_text_tokenizer

  folder = generate_dataset(tmp_path / "synth", n_train=12, n_test=4, image_size=32, seed=1)
  rows = data_lib.read_metadata(folder)
  names = data_lib.vocabulary(rows)
  tokenizer = train_text_tokenizer([r["report"] for r in rows], 300, tmp_path / "tok.json", context_length=24)
  processor = ImageProcessorConfig.clip(32)
  config = config_lib.get_config(CONFIG, TOY + ["data.source=tfds", f"data.tfds_dir={tmp_path / 'tfds'}"])
  lazy_train, lazy_eval = train_lib.make_sources(config, str(tmp_path), folder, rows, names, processor, tokenizer, 32)
  config.data.source = "memory"
  mem_train, mem_eval = train_lib.make_sources(config, str(tmp_path), folder, rows, names, processor, tokenizer, 32)
  assert (len(lazy_train), len(lazy_eval)) == (len(mem_train), len(mem_eval)) == (12, 4)
  by_path = {p: i for i, p in enumerate(mem_train.paths)}
  for i in range(len(lazy_train)):
    rec = lazy_train.records[i]
    path = rec["path"].decode() if isinstance(rec["path"], bytes) else rec["path"]
    want = mem_train[by_path[str(folder / path)]]
    got = lazy_train[i]
    np.testing.assert_allclose(got["images"], want["images"], atol=1e-5)
    np.testing.assert_array_equal(got["text_ids"], want["text_ids"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
  config.data.source = "disk"
  with pytest.raises(ValueError, match="data.source='disk'"):
    train_lib.make_sources(config, str(tmp_path), folder, rows, names, processor, tokenizer, 32)
