"""`LocalVLM` on a tiny random Hugging Face LLaVA: chat with images through the chat template,
the fallback for templates without image parts, mixed image/text batches, and greedy
generation equal to transformers' `LlavaForConditionalGeneration.generate`.

Nothing is downloaded: the model, its tokenizer (byte-level BPE plus an `<image>` token) and
its image processor config are written here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hf_tiny import CHAT_TEMPLATE
from vlm_tiny import (
  IMAGE_SIZE,
  IMAGE_TOKEN,
  image_message,
  make_llava_dir,
  sample_image,
  write_vlm_tokenizer,
)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tiny_llava"))
  model = make_llava_dir(d)
  return d, model


@pytest.fixture(scope="module")
def vlm(llava):
  from mlx_med.vlm.local import LocalVLM

  return LocalVLM.from_pretrained(llava[0], min_prompt_bucket=32)


def test_from_pretrained_dispatches_and_exposes_the_lm_surface(vlm, llava):
  from mlx_med.vlm import llava as llava_lib
  from mlx_med.vlm.local import is_vlm_dir

  assert is_vlm_dir(llava[0]) and vlm.is_multimodal
  assert vlm.family is llava_lib and isinstance(vlm.model_cfg, llava_lib.LlavaConfig)
  assert vlm.cfg is vlm.model_cfg.decoder and vlm.name == os.path.basename(llava[0])
  sp = vlm.sampling_params(max_tokens=5, temperature=0.0)
  assert sp.max_new_tokens == 5 and sp.temperature == 0.0 and 2 in sp.stop_token_ids
  assert vlm.template_takes_image_parts()


def test_chat_prompt_expands_one_placeholder_per_image(vlm):
  ids, images = vlm.prepare_chat(image_message(sample_image(0), "What is shown?"))
  n_tokens = vlm.model_cfg.num_image_tokens
  assert n_tokens == 4 and len(images) == 1 and images[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
  assert ids.count(vlm.image_token_id) == n_tokens
  start = ids.index(vlm.image_token_id)
  assert ids[start:start + n_tokens] == [vlm.image_token_id] * n_tokens  # one contiguous run
  text_only = vlm.encode_chat([{"role": "user", "content": "What is shown?"}])
  assert vlm.image_token_id not in text_only
  with pytest.raises(ValueError, match="prepare_chat"):
    vlm.encode_chat(image_message(sample_image(0), "x"))
  with pytest.raises(ValueError, match="image placeholder"):  # "<image>" typed by hand is not an image
    vlm.prepare_chat([{"role": "user", "content": "look: <image>"}])


def test_template_without_image_parts_falls_back_to_placeholders_first(vlm, llava, tmp_path):
  """A plain ChatML template (string contents only) gets `<image>\\n` + text per message:
  the same prompt the image-aware template renders for an image followed by text."""
  from mlx_med.llm.tokenizer import ChatTokenizer
  from mlx_med.vlm.local import LocalVLM
  from mlx_med.vlm.messages import image_part

  tokenizer = ChatTokenizer.from_dir(llava[0])
  tokenizer.hf.chat_template = CHAT_TEMPLATE
  plain = LocalVLM(vlm.family, vlm.model_cfg, vlm.params, tokenizer, vlm.processor)
  assert not plain.template_takes_image_parts()
  messages = [{"role": "user", "content": [image_part(sample_image(1)), image_part(sample_image(2)),
                                           {"type": "text", "text": "Compare."}]}]
  ids, images = plain.prepare_chat(messages)
  assert len(images) == 2
  assert plain.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]) == (
      "<|im_start|>user\n<image>\nx<|im_end|>\n<|im_start|>assistant\n")
  assert ids == vlm.prepare_chat(messages)[0]


def test_greedy_chat_matches_transformers_generate(vlm, llava):
  """Image + text prompt -> 8 greedy tokens equal transformers' generate on the same
  token ids and pixel values (prefill from image embeddings, decode with the KV cache)."""
  import torch

  model = llava[1]
  messages = image_message(sample_image(3), "The patient has a fever and a dry cough.")
  ids, images = vlm.prepare_chat(messages)
  gen = vlm.chat([messages], max_tokens=8, temperature=0.0, ignore_eos=True)[0]
  assert gen.prompt_token_ids == ids and len(gen.token_ids) == 8
  pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         pixel_values=pixels, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
  assert gen.token_ids == ref[0, len(ids):].tolist()


def test_logits_match_transformers(vlm, llava):
  """Prompt logits with an image equal LlavaForConditionalGeneration's (fp32 both sides)."""
  import torch

  ids, images = vlm.prepare_chat(image_message(sample_image(9), "Diagnosis: community acquired pneumonia."))
  text_ids = vlm.encode_chat([{"role": "user", "content": "hello"}])
  got, text_logits = vlm.logits([ids, text_ids], [images, None])
  with torch.no_grad():
    ref = llava[1](input_ids=torch.tensor([ids]), pixel_values=torch.tensor(np.stack(images)).permute(0, 3, 1, 2)
                   ).logits[0].numpy()
  assert got.shape == ref.shape == (len(ids), vlm.cfg.vocab_size)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)  # fp32 (measured 2e-6): summation order only
  np.testing.assert_allclose(text_logits, vlm.text.logits([text_ids])[0], atol=1e-5, rtol=0)


def test_mixed_batch_equals_rows_alone(vlm):
  """A batch of [image row, text row, two-image row] gives each row what it gets alone; the
  text row also equals the language model's plain token path."""
  from mlx_med.vlm.messages import image_part

  convs = [image_message(sample_image(4), "Diagnosis?"),
           [{"role": "user", "content": "hello world, how are you today?"}],
           [{"role": "user", "content": [image_part(sample_image(5)), {"type": "text", "text": "and"},
                                         image_part(sample_image(6)), {"type": "text", "text": "differ?"}]}]]
  knobs = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
  batch = vlm.chat(convs, **knobs)
  alone = [vlm.chat([c], **knobs)[0] for c in convs]
  assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
  text_ids = vlm.encode_chat(convs[1])
  assert batch[1].token_ids == vlm.text.generate_tokens([text_ids], vlm.sampling_params(**knobs))[0].token_ids
  assert len({tuple(g.token_ids) for g in batch}) == 3


def test_generate_with_raw_prompt_and_images(vlm):
  """Completion-style prompts hold the placeholder text themselves (`image_prompt_text`)."""
  image = sample_image(7)
  prompt = vlm.image_prompt_text() + "Findings:"
  assert prompt.startswith(IMAGE_TOKEN)
  out = vlm.generate([prompt], images=[[image]], max_tokens=4, temperature=0.0, ignore_eos=True)[0]
  assert out.prompt_token_ids.count(vlm.image_token_id) == vlm.model_cfg.num_image_tokens
  with pytest.raises(ValueError, match="1 image placeholder"):
    vlm.generate([prompt], images=[[image, image]], max_tokens=2)


def test_serving_warm_up_compiles_an_image_chat(vlm):
  """The server's warm-up also compiles a lone image request's prefill from embeddings."""
  from mlx_med.llm import serve
  from mlx_med.vlm.local import LocalVLM

  fresh = LocalVLM(vlm.family, vlm.model_cfg, vlm.params, vlm.tokenizer, vlm.processor, min_prompt_bucket=32)
  assert serve.BatchingEngine(fresh, max_batch_rows=1).warm_up() == 2  # one text shape, one image chat
  # (batch, prompt, new, top, mode, penalties, embeddings, positions): the token path and the image path.
  assert sorted(s[-2:] for s in fresh.sampler.compiled_shapes) == [(False, False), (True, True)]


def test_local_paths_follow_the_allowed_directory(vlm, tmp_path):
  from PIL import Image

  from mlx_med.vlm.messages import ImageRefused

  inside = tmp_path / "media"
  inside.mkdir()
  path = inside / "scan.png"
  Image.fromarray(sample_image(8)).save(path)
  messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                           {"type": "text", "text": "Findings?"}]}]
  with pytest.raises(ImageRefused):
    vlm.prepare_chat(messages)  # the model allows no local directory by default
  ids, images = vlm.prepare_chat(messages, allowed_local_dir=str(inside))
  ids_data, images_data = vlm.prepare_chat(image_message(sample_image(8), "Findings?"))
  assert ids == ids_data
  np.testing.assert_array_equal(images[0], images_data[0])


# ---------------------------------------------------------------------------- Qwen2.5-VL

QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """A tiny random HF Qwen2.5-VL directory (patch 4 px, merge 2, windows of 16 px) with a
  Qwen-style template and a Qwen2-VL image processor config; (LocalVLM, transformers model)."""
  import torch
  from torch_peers import import_torchvision

  import_torchvision()
  import transformers

  from mlx_med.vlm.local import LocalVLM
  from mlx_med.vlm.processing import Qwen2VLImageProcessor

  directory = str(tmp_path_factory.mktemp("tiny_qwen25vl"))
  vocab, ids = write_vlm_tokenizer(directory, QWEN_TEMPLATE, QWEN_SPECIALS)
  Qwen2VLImageProcessor(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=4, merge_size=2).save(directory)
  cfg = transformers.Qwen2_5_VLConfig(
      text_config={"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                   "rms_norm_eps": 1e-6, "eos_token_id": 2, "bos_token_id": None, "pad_token_id": 0,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
      vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
                     "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 16, "out_hidden_size": 64,
                     "fullatt_block_indexes": [1], "tokens_per_second": 2},
      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
  torch.manual_seed(1)
  model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return LocalVLM.from_pretrained(directory, min_prompt_bucket=32), model


def test_qwen_chat_matches_transformers_generate_and_mixes_with_text(qwen):
  """Qwen2.5-VL through LocalVLM: the template's vision markers, the processor's patches, M-RoPE
  positions and decoding from max position + 1 give transformers' greedy tokens; in a batch
  with a text-only row (ordinary positions on all three M-RoPE components) each row still
  gets what it gets alone."""
  import torch

  from mlx_med.vlm import qwen2_5_vl

  vlm, model = qwen
  assert vlm.family is qwen2_5_vl and vlm.cfg.mrope_section == (2, 3, 3)
  assert vlm.template_takes_image_parts()
  assert vlm.image_prompt_text() == "<|vision_start|><|image_pad|><|vision_end|>"
  messages = image_message(sample_image(30, size=(36, 52)), "The patient has a fever.")
  ids, images = vlm.prepare_chat(messages)
  (patches, grid), = images
  assert grid == (1, 8, 12) and ids.count(vlm.image_token_id) == 8 * 12 // 4
  knobs = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
  got = vlm.chat([messages], **knobs)[0]
  input_ids = torch.tensor([ids])
  with torch.no_grad():
    ref = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         pixel_values=torch.tensor(patches), image_grid_thw=torch.tensor([grid]),
                         mm_token_type_ids=(input_ids == vlm.image_token_id).to(torch.int32),
                         max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
  assert got.token_ids == ref[0, len(ids):].tolist()
  text = [{"role": "user", "content": "hello world, how are you today?"}]
  batch = vlm.chat([text, messages], **knobs)
  assert batch[1].token_ids == got.token_ids
  assert batch[0].token_ids == vlm.chat([text], **knobs)[0].token_ids
