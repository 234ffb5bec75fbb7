"""The small VLM's training: tokenizer and chat template, answer-only loss, a tiny resumable run, HF export.

The exported directory is checked against transformers' LlavaForConditionalGeneration (same logits, fp32,
atol 1e-4: the difference is float32 summation order over a 2-layer model)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.vlm.semclip import get_config
from mlx_med.vlm import train as train_lib
from mlx_med.vlm import vstar


def tiny_config():
  c = get_config("smoke")
  c.data.update({"image_size": 96, "n_train": 24, "n_eval": 8, "n_test": 6, "seq_len": 64, "target_size": (12, 24),
                 "num_distractors": (6, 12)})
  c.crops.update({"scales": (2, 3), "variants": 1})
  c.vlm.model.update({"image_size": 32, "dtype": "float32"})
  c.vlm.model.vision.update({"patch_size": 16, "width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64})
  c.vlm.model.text.update({"d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64,
                           "max_seq_len": 64})
  c.vlm.train.update({"steps": 12, "batch_size": 8, "lr": 1e-2, "schedule": "constant", "warmup_steps": 1, "log_every": 3, "eval_every": 12,
                      "ckpt_every": 6, "eval_batches": 1, "check_memory": False})
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 6-step run, then the same command resumed to 12 steps."""
  c = tiny_config()
  work = str(tmp_path_factory.mktemp("vlm_run"))
  first = train_lib.run_config(c)
  first.unlock()
  first.train.steps = 6
  first.lock()
  run6 = train_lib.train_vlm(first, work, progress=False)
  run12 = train_lib.train_vlm(c, work, progress=False, allow_config_change=True)
  return c, work, run6, run12


def test_tokenizer_template_matches_transformers(tmp_path):
  from transformers import AutoTokenizer

  from mlx_med.llm.tokenizer import ChatTokenizer

  texts = [train_lib.format_question(ex.question, ex.options) for ex in vstar.synth_vstar(6, image_size=96)]
  tok = train_lib.build_word_tokenizer(texts, str(tmp_path / "tok"))
  assert isinstance(tok, ChatTokenizer)
  msgs = train_lib.question_messages(2, "What is the color of the circle?", ["red", "blue", "green", "yellow"], "B")
  assert tok.render_chat(msgs, add_generation_prompt=False) == train_lib.render_chat(msgs)
  prompt = msgs[:1]
  assert tok.render_chat(prompt) == train_lib.render_chat(prompt, add_generation_prompt=True)
  enc = train_lib.WordEncoder(str(tmp_path / "tok"))
  assert tok.encode_chat(prompt) == enc.encode(train_lib.render_chat(prompt, add_generation_prompt=True))
  hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
  ids = hf.encode("<image>\nWhat is the color ?", add_special_tokens=False)
  assert ids[0] == enc.image_id and hf.convert_ids_to_tokens(ids[1:]) == ["What", "is", "the", "color", "?"]
  assert tok.eos_token_ids == (enc.im_end_id,)
  # ids are deterministic: the same texts give the same vocabulary
  tok2 = train_lib.build_word_tokenizer(list(reversed(texts)), str(tmp_path / "tok2"))
  assert tok2.hf.get_vocab() == tok.hf.get_vocab()


def test_loss_masks_everything_but_the_answer(tmp_path):
  c = train_lib.run_config(tiny_config())
  examples = vstar.synth_vstar(3, image_size=96)
  texts = [train_lib.format_question(ex.question, ex.options) for ex in examples]
  train_lib.build_word_tokenizer(texts, str(tmp_path / "tok"))
  enc = train_lib.WordEncoder(str(tmp_path / "tok"))
  hf = train_lib.hf_config(c, enc.vocab_size, enc.image_id, enc.pad_id, enc.im_end_id)
  cfg = train_lib.model_config(c, hf)
  arrays = train_lib.make_arrays(examples, enc, c, 64, train_lib.tokens_per_image(cfg), seed=0)
  assert arrays["images"].shape == (3, 2, 32, 32, 3) and arrays["images"].dtype == np.uint8
  for i, ex in enumerate(examples):
    on = np.flatnonzero(arrays["loss_mask"][i])
    # exactly the answer (the correct option's words) and the end of turn are counted
    answer = ex.options["ABCD".index(ex.answer)]
    assert [int(t) for t in arrays["targets"][i, on]] == enc.encode(answer) + [enc.im_end_id]
    assert np.flatnonzero(arrays["answer_mask"][i]).tolist() == [on[0]]
    assert int(np.sum(arrays["tokens"][i] == enc.image_id)) == 2 * train_lib.tokens_per_image(cfg)
  task = train_lib.VLMTask(cfg, 64)
  params = task.init(jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}
  out = task.loss(params, batch, jax.random.key(0))
  # the reference: cross-entropy at the answer positions only, summed per example
  logits = task.logits(params, batch["tokens"], batch["images"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  want = sum(float(ce[i, np.flatnonzero(arrays["loss_mask"][i])].sum()) for i in range(3))
  np.testing.assert_allclose(float(out.loss_sum), want, rtol=1e-5)
  assert float(out.weight) == 3.0
  # changing every target outside the mask leaves the loss unchanged; changing the answer does not
  off = arrays["loss_mask"] == 0
  scrambled = dict(batch, targets=jnp.asarray(np.where(off, (arrays["targets"] + 7) % cfg.decoder.vocab_size,
                                                        arrays["targets"])))
  np.testing.assert_allclose(float(task.loss(params, scrambled, jax.random.key(0)).loss_sum), want, rtol=1e-5)
  flipped = dict(batch, targets=jnp.asarray(np.where(arrays["answer_mask"] == 1, enc.letter_ids[3],
                                                      arrays["targets"])))
  assert abs(float(task.loss(params, flipped, jax.random.key(0)).loss_sum) - want) > 1e-3


def test_training_reduces_loss_and_resumes(trained):
  _, work, run6, run12 = trained
  rows = [json.loads(line) for line in Path(work, "metrics.jsonl").read_text().splitlines()]
  losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  assert [s for s, _ in losses] == [3, 6, 9, 12]  # the second run resumed at step 6
  assert all(b < a for (_, a), (_, b) in itertools.pairwise(losses)), losses
  assert losses[-1][1] < 0.8 * losses[0][1], losses
  assert run6.result.final_step == 6 and run12.result.final_step == 12
  assert json.loads(Path(work, "train_time.json").read_text())["step"] == 12


def test_export_loads_in_transformers_with_same_logits(trained):
  import torch
  from torch_peers import import_torchvision

  import_torchvision()
  from transformers import AutoTokenizer, LlavaForConditionalGeneration

  _, work, _, run12 = trained
  vlm = train_lib.TrainedVLM.load(work)
  ex = vstar.synth_vstar(1, image_size=96, seed=5)[0]
  ids, n_prompt = train_lib.encode_question(vlm.encoder, 2, vlm.tokens_per_image, ex.question, ex.options)
  views = np.stack([train_lib.clip_resize(ex.image, 32), train_lib.crop_view(ex.image, (0, 0, 60, 60), 32)])
  task = train_lib.VLMTask(vlm.cfg)
  ours = np.asarray(task.logits(vlm.params, jnp.asarray([ids]), jnp.asarray(views[None])))[0]
  model = LlavaForConditionalGeneration.from_pretrained(run12.hf_dir, torch_dtype=torch.float32).eval()
  pixels = np.asarray(train_lib.normalize_images(jnp.asarray(views)))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).logits[0]
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)
  # the tokenizer of the export renders the same prompt the training used
  hf_tok = AutoTokenizer.from_pretrained(run12.hf_dir, local_files_only=True)
  text = hf_tok.apply_chat_template(train_lib.question_messages(2, ex.question, ex.options), tokenize=False,
                                    add_generation_prompt=True)
  assert text == train_lib.render_chat(train_lib.question_messages(2, ex.question, ex.options), True)
  pre = json.loads(Path(run12.hf_dir, "preprocessor_config.json").read_text())
  assert pre["crop_size"] == {"height": 32, "width": 32} and pre["image_processor_type"] == "CLIPImageProcessor"
  assert n_prompt < len(ids) + 1
