"""Parity with transformers' CLIP and SigLIP on tiny random models (CPU torch, fp32).

Each family builds one tiny random HF image-text model (every tensor randomised, so no
LayerNorm or bias sits at its identity init), saves it to a temporary directory, and
checks, with the same weights:
  * our ViT against its vision tower (CLIPVisionModel / SiglipVisionModel): the last
    hidden state and the pooled output;
  * our text tower against its text tower (CLIPTextModel / SiglipTextModel);
  * `load_hf_towers(dir)` (safetensors read with NumPy) against the model's image and
    text embeddings and logits_per_image;
and our tokenizer against transformers' CLIP tokenizer on a tokenizer.json trained here.
Tolerance: atol 1e-5, rtol 1e-5 in fp32 (measured: at most 1.4e-6 on a 2-core x86 CPU).
"""
import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.vision import TextTransformer, ViT, load_hf_towers, train_text_tokenizer
from mlx_med.vision.hf import (
  text_config_from_hf,
  text_params_from_hf,
  vit_config_from_hf,
  vit_params_from_hf,
)

ATOL, RTOL = 1e-5, 1e-5
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32,
              "patch_size": 8}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 16}
TEXTS = ["small nodule in the left upper lobe", "no acute findings.", "calcified granuloma, stable since 2019",
         "pigmented lesion with an irregular border", "normal study"]
CONTEXT = 16


@pytest.fixture(scope="module")
def torch_mods():
  from torch_peers import import_torchvision

  import_torchvision()  # transformers' image utilities import torchvision
  import torch
  import transformers

  return torch, transformers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip_tok") / "tokenizer.json"
  return train_text_tokenizer(TEXTS * 4, vocab_size=300, path=path, context_length=CONTEXT)


def _randomise(torch, model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith("logit_scale"):
        p.fill_(2.0)
      elif name.endswith("logit_bias"):
        p.fill_(-3.0)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


@functools.cache
def _vit_apply(cfg):
  return jax.jit(ViT(cfg).apply)


@functools.cache
def _text_apply(cfg):
  return jax.jit(TextTransformer(cfg).apply)


def _np(t):
  return t.detach().cpu().numpy()


def _pooled(out):
  return out if not hasattr(out, "pooler_output") else out.pooler_output


@pytest.fixture(scope="module", params=["clip", "siglip"])
def family(request, torch_mods, tokenizer, tmp_path_factory):
  """(family, HF model, its saved directory, pixel values [B,3,S,S], token ids [B,L])."""
  torch, transformers = torch_mods
  name = request.param
  specials = {"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
  if name == "clip":
    config = transformers.CLIPConfig(text_config={**TEXT, **specials}, vision_config=VISION, projection_dim=24)
    model = transformers.CLIPModel(config)
  else:
    # SiglipModel compares the text head output with the image pooling output: both are hidden_size wide.
    config = transformers.SiglipConfig(text_config={**TEXT, **specials}, vision_config=VISION)
    model = transformers.SiglipModel(config)
  model = _randomise(torch, model, seed=0 if name == "clip" else 1)
  directory = tmp_path_factory.mktemp(f"hf_{name}")
  model.save_pretrained(directory)
  shutil.copy(tokenizer.path, directory / "tokenizer.json")
  pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
  ids = torch.from_numpy(tokenizer.encode(TEXTS[:4]).astype(np.int64))
  return name, model, directory, pixels, ids


def test_vision_tower_parity(family, torch_mods):
  torch, transformers = torch_mods
  name, model, _, pixels, _ = family
  tower = model.vision_model
  assert type(tower) is (transformers.CLIPVisionModel if name == "clip" else transformers.SiglipVisionModel)
  with torch.no_grad():
    ref = tower(pixel_values=pixels)
  cfg = vit_config_from_hf(tower.config.to_dict(), name)
  params = vit_params_from_hf(tower.state_dict(), cfg)
  ours = _vit_apply(cfg)({"params": params}, jnp.asarray(_np(pixels).transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(ours.tokens), _np(ref.last_hidden_state), atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(np.asarray(ours.pooled), _np(ref.pooler_output), atol=ATOL, rtol=RTOL)
  assert np.abs(_np(ref.pooler_output)).max() > 0.1  # not a trivially small output


def test_text_tower_parity(family, torch_mods):
  torch, transformers = torch_mods
  name, model, _, _, ids = family
  tower = model.text_model
  assert type(tower) is (transformers.CLIPTextModel if name == "clip" else transformers.SiglipTextModel)
  with torch.no_grad():
    ref = tower(input_ids=ids)
  cfg = text_config_from_hf(tower.config.to_dict(), name)
  params = text_params_from_hf(tower.state_dict(), cfg)
  ours = _text_apply(cfg)({"params": params}, jnp.asarray(ids.numpy().astype(np.int32)))
  np.testing.assert_allclose(np.asarray(ours.tokens), _np(ref.last_hidden_state), atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(np.asarray(ours.pooled), _np(ref.pooler_output), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["clip"], indirect=True)
def test_clip_legacy_eos_rule(family, torch_mods):
  """Old OpenAI configs say eos_token_id=2; HF then pools at the largest id (OpenAI's end token)."""
  torch, transformers = torch_mods
  name, model, _, _, ids = family
  legacy = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**model.text_model.config.to_dict(),
                                                                     "eos_token_id": 2}))
  legacy.load_state_dict(model.text_model.state_dict())
  with torch.no_grad():
    ref = legacy.eval()(input_ids=ids)
  cfg = dataclasses.replace(text_config_from_hf(model.text_model.config.to_dict(), name), eos_token_id=2)
  ours = _text_apply(cfg)({"params": text_params_from_hf(legacy.state_dict(), cfg)},
                          jnp.asarray(ids.numpy().astype(np.int32)))
  np.testing.assert_allclose(np.asarray(ours.pooled), _np(ref.pooler_output), atol=ATOL, rtol=RTOL)
  # The rule really differs here: the largest id is a word, not our vocabulary's end token.
  rows, end_id = np.arange(ids.shape[0]), model.text_model.config.eos_token_id
  first_end = np.asarray(ours.tokens)[rows, np.argmax(ids.numpy() == end_id, axis=1)]
  assert not np.allclose(np.asarray(ours.pooled), first_end)


def test_load_hf_towers_embeddings_and_logits(family, torch_mods):
  torch, _ = torch_mods
  name, model, directory, pixels, ids = family
  towers = load_hf_towers(directory)
  assert towers.family == name and towers.tokenizer_path == str(directory / "tokenizer.json")
  with torch.no_grad():
    ref = model(input_ids=ids, pixel_values=pixels)
    ref_img = _pooled(model.get_image_features(pixel_values=pixels))
    ref_txt = _pooled(model.get_text_features(input_ids=ids))
  img = _vit_apply(towers.image_config)({"params": towers.image_params},
                                        jnp.asarray(_np(pixels).transpose(0, 2, 3, 1))).pooled
  txt = _text_apply(towers.text_config)({"params": towers.text_params},
                                        jnp.asarray(ids.numpy().astype(np.int32))).pooled
  img, txt = np.asarray(img), np.asarray(txt)
  if name == "clip":
    assert towers.image_projection.shape == (32, 24) and towers.text_projection.shape == (32, 24)
    img, txt = img @ towers.image_projection, txt @ towers.text_projection
    assert towers.logit_bias is None
  else:
    assert towers.image_projection is None and towers.text_projection is None
    assert towers.logit_bias == pytest.approx(-3.0)
  assert towers.logit_scale == pytest.approx(2.0)
  np.testing.assert_allclose(img, _np(ref_img), atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(txt, _np(ref_txt), atol=ATOL, rtol=RTOL)
  img_n = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt_n = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  logits = np.exp(towers.logit_scale) * img_n @ txt_n.T + (towers.logit_bias or 0.0)
  np.testing.assert_allclose(logits, _np(ref.logits_per_image), atol=ATOL, rtol=RTOL)


def test_tokenizer_matches_transformers_clip_tokenizer(tokenizer, torch_mods):
  _, transformers = torch_mods
  from mlx_med.vision import TextTokenizer

  ours = TextTokenizer.from_file(tokenizer.path, context_length=77)
  hf = transformers.CLIPTokenizer(tokenizer_file=tokenizer.path)
  texts = TEXTS + ["  Mixed   CASE and   spaces!!", "ünïcödé → text", "word " * 100, "it's 12.5mm"]
  ref = hf(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
  np.testing.assert_array_equal(ours.encode(texts), np.asarray(ref, np.int32))
  assert ours.pad_token_id == hf.pad_token_id and ours.eos_token_id == hf.eos_token_id


def test_not_clip_or_siglip_is_a_one_line_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match=r"model_type 'bert' is not a CLIP or SigLIP") as err:
    load_hf_towers(tmp_path)
  assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf_towers(tmp_path / "nowhere")
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_hf_towers(tmp_path)


@pytest.mark.parametrize("family", ["clip"], indirect=True)
def test_sharded_and_bf16_checkpoints_load(family, torch_mods, tmp_path):
  torch, _ = torch_mods
  _, model, directory, _, _ = family
  reference = load_hf_towers(directory)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  sharded = load_hf_towers(tmp_path / "sharded")
  for a, b in zip(jax.tree.leaves(reference.image_params), jax.tree.leaves(sharded.image_params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(reference.text_projection, sharded.text_projection)
  half = type(model)(model.config)
  half.load_state_dict(model.state_dict())
  half.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  bf16 = load_hf_towers(tmp_path / "bf16")
  for a, b in zip(jax.tree.leaves(reference.text_params), jax.tree.leaves(bf16.text_params)):
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-3)  # bf16 keeps 8 significant bits
