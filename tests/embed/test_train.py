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
  # With augmentation: the trainer applies the train source's transform (and resumes it below).
  config = config_lib.get_config(CONFIG, TOY + ["train.steps=4", "data.augment.enabled=True"])
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
  more = config_lib.get_config(CONFIG, TOY + ["train.steps=6", "data.augment.enabled=True"])
  again = train_lib.run(more, str(workdir), progress=False, allow_config_change=True)
  assert again.final_step == 6 and (workdir / "tokenizer.json").read_text() == tokenizer_before


def test_init_from_a_hugging_face_clip_dir(tmp_path):
  from tiny_clip import tiny_clip_dir

  hf = tmp_path / "clip"
  hf.mkdir()
  tiny_clip_dir(hf)
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


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A 12 + 4 image synthetic folder at 32 px, its rows and labels, a BPE tokenizer, CLIP's processor."""
  from mlx_med.embed import data as data_lib
  from mlx_med.embed.synth import generate_dataset
  from mlx_med.vision.io import ImageProcessorConfig
  from mlx_med.vision.text import train_text_tokenizer

  root = tmp_path_factory.mktemp("small")
  folder = generate_dataset(root / "synth", n_train=12, n_test=4, image_size=32, seed=1)
  rows = data_lib.read_metadata(folder)
  names = data_lib.vocabulary(rows)
  tokenizer = train_text_tokenizer([r["report"] for r in rows], 300, root / "tok.json", context_length=24)
  return folder, rows, names, tokenizer, ImageProcessorConfig.clip(32)


def test_lazy_tfds_records_equal_the_in_memory_source(small, tmp_path):
  folder, rows, names, tokenizer, processor = small
  config = config_lib.get_config(CONFIG, TOY + ["data.source=tfds", f"data.tfds_dir={tmp_path / 'tfds'}"])
  lazy_train, lazy_eval = train_lib.make_sources(config, str(tmp_path), folder, rows, names, processor, tokenizer, 32)
  config.data.source = "memory"
  mem_train, mem_eval = train_lib.make_sources(config, str(tmp_path), folder, rows, names, processor, tokenizer, 32)
  assert (len(lazy_train), len(lazy_eval)) == (len(mem_train), len(mem_eval)) == (12, 4)
  assert mem_train.images.dtype == np.uint8 and mem_train.images.shape == (12, 32, 32, 3)
  by_path = {p: i for i, p in enumerate(mem_train.paths)}
  for i in range(len(lazy_train)):
    rec = lazy_train.records[i]
    path = rec["path"].decode() if isinstance(rec["path"], bytes) else rec["path"]
    want = mem_train[by_path[str(folder / path)]]
    got = lazy_train[i]
    assert got["images"].dtype == np.uint8  # raw training records; the transform normalises
    for key in ("images", "text_ids", "labels"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  by_path = {p: i for i, p in enumerate(mem_eval.paths)}
  for i in range(len(lazy_eval)):
    rec = lazy_eval.records[i]
    path = rec["path"].decode() if isinstance(rec["path"], bytes) else rec["path"]
    np.testing.assert_array_equal(lazy_eval[i]["images"], mem_eval[by_path[str(folder / path)]]["images"])
  config.data.source = "disk"
  with pytest.raises(ValueError, match="data.source='disk'"):
    train_lib.make_sources(config, str(tmp_path), folder, rows, names, processor, tokenizer, 32)


@pytest.mark.parametrize("source", ["memory", "tfds"])
def test_training_batches_are_augmented_only_when_enabled(small, tmp_path, source):
  from mlx_med.core import data as core_data
  from mlx_med.vision.io import load_and_preprocess

  folder, rows, names, tokenizer, processor = small
  want = {str(folder / r["path"]): load_and_preprocess(folder / r["path"], processor=processor) for r in rows}

  def batches(enabled, n=6):
    config = config_lib.get_config(CONFIG, TOY + [f"data.source={source}", f"data.tfds_dir={tmp_path / 'tfds'}",
                                                  f"data.augment.enabled={enabled}"])
    train, test = train_lib.make_sources(config, str(tmp_path), folder, rows, names, processor, tokenizer, 32)
    assert test.train_transform is None and train.train_transform is not None
    # Evaluation records are the processor's output, augmentation or not.
    test_paths = [str(folder / r["path"]) for r in rows if r["split"] == "test"]
    got = sorted(test[i]["images"].tobytes() for i in range(len(test)))
    assert got == sorted(want[p].tobytes() for p in test_paths)
    # The trainer's loader (unshuffled here, so epoch e holds records 0..11 again): 3 batches an epoch.
    loader = core_data.make_loader(train, 4, seed=0, shuffle=False, process_index=0, process_count=1,
                                   transform=train.train_transform)
    it = iter(loader)
    return train, [next(it) for _ in range(n)]

  train, plain = batches(False)
  if source == "memory":
    paths = train.paths
  else:
    paths = [str(folder / train.records[i]["path"].decode()) for i in range(len(train))]
  for b, batch in enumerate(plain):
    assert batch["images"].dtype == np.float32 and batch["images"].shape == (4, 32, 32, 3)
    for j in range(4):  # bitwise the processor's normalised pixels, every epoch
      np.testing.assert_array_equal(batch["images"][j], want[paths[(4 * b + j) % 12]])
  _, aug = batches(True)
  for b in range(3):
    x, y = aug[b]["images"], aug[b + 3]["images"]  # the same records, one epoch apart
    np.testing.assert_array_equal(aug[b]["text_ids"], plain[b]["text_ids"])
    np.testing.assert_array_equal(aug[b]["labels"], aug[b + 3]["labels"])
    for j in range(4):
      assert not np.allclose(x[j], y[j], atol=1e-3)  # new crop and jitter each epoch
      assert not np.allclose(x[j], plain[b]["images"][j], atol=1e-3)
    assert np.isfinite(x).all() and abs(float(x.mean() - plain[b]["images"].mean())) < 0.5
  _, again = batches(True)  # deterministic for the seed
  for a, b in zip(aug, again):
    np.testing.assert_array_equal(a["images"], b["images"])
