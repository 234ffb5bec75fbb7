"""LLaVA against transformers' `LlavaForConditionalGeneration` on tiny random checkpoints.

Every parameter of the reference is redrawn (biases and norm scales are not 0 or 1), so a
transposed or skipped tensor shows up in the logits. Logits are compared in float32 with
atol 1e-4 (the models' logits have magnitude ~1; the differences are summation order).
Covered: a batch of two prompts with one image each, checkpoints in the names
transformers 5.x writes (4.x names) and holds in memory (5.x names), our saved directory
read back by transformers, greedy generation through the core sampler against
`generate(do_sample=False)`, the "full" strategy with several feature layers and a
positive single layer, and bad inputs.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.core.sampler import Sampler, SamplingParams
from mlx_med.llm.safetensors_io import (
  CheckpointError,
  SafetensorsFile,
  write_safetensors,
)
from mlx_med.vlm import llava

IMAGE_TOKEN = 120
VOCAB = 128
EOS = 2
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 32,
              "patch_size": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TEXT = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
            "bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": 0, "tie_word_embeddings": False}
ATOL = 1e-4


def _transformers():
  from torch_peers import import_torchvision

  import_torchvision()  # transformers' model modules import torchvision
  import transformers

  return transformers


def _hf_llava(seed: int = 0, **overrides):
  """A tiny random LlavaForConditionalGeneration with every parameter redrawn."""
  import torch

  transformers = _transformers()
  values = {"vision_config": VISION, "text_config": TEXT, "image_token_index": IMAGE_TOKEN, "projector_hidden_act": "gelu"}
  values.update(overrides)
  cfg = transformers.LlavaConfig(**values)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight",
                        "layrnorm.weight")):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return model


def _prompts(n_image_tokens: int) -> list[list[int]]:
  img = [IMAGE_TOKEN] * n_image_tokens
  return [[1, 5, 17, 3] + img + [88, 41, 9, 60], [1, 33, 7] + img + [11, 4]]


def _pixels(seed: int, n: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)  # NHWC


def _hf_logits(model, prompt: list[int], pixels: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    out = model(input_ids=torch.tensor([prompt]), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  return out.logits[0].numpy()


def _our_logits(cfg, params, prompts, pixels) -> list[np.ndarray]:
  length = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), length), np.int32)
  segments = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    segments[i, :len(p)] = 1
  out = _forward(cfg)(params, jnp.asarray(tokens), jnp.asarray(pixels), jnp.asarray(segments))
  return [np.asarray(out[i, :len(p)]) for i, p in enumerate(prompts)]


_FORWARDS: dict = {}


def _forward(cfg):
  if cfg not in _FORWARDS:
    _FORWARDS[cfg] = jax.jit(lambda p, t, im, seg: llava.Llava(cfg).apply({"params": p}, t, im, segment_ids=seg))
  return _FORWARDS[cfg]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(hf model, its save_pretrained dir, cfg, params loaded from that dir)."""
  model = _hf_llava()
  directory = str(tmp_path_factory.mktemp("llava") / "hf")
  model.save_pretrained(directory)
  cfg, params = llava.load_hf(directory)
  return model, directory, cfg, params


def test_config_from_hf(reference):
  _, directory, cfg, params = reference
  assert cfg.vision.depth == 3 and cfg.vision_depth_used == 2 and cfg.feature_layers == (2,)
  assert cfg.num_image_tokens == 16 and cfg.image_seq_length == 16  # (32/8)^2, CLS dropped
  assert cfg.image_token_id == IMAGE_TOKEN and cfg.decoder.d_model == 64 and not cfg.decoder.tie_embeddings
  # The tower stores only the blocks the features read.
  assert sorted(params["vision_tower"]["encoder"]) == ["layers_0", "layers_1"]
  # to_hf describes the stored tower (2 blocks, the last state) and keeps unrelated fields.
  with open(os.path.join(directory, "config.json")) as fh:
    hf = json.load(fh)
  back = llava.LlavaConfig.from_hf(cfg.to_hf(hf))
  assert back.vision_tower_config == cfg.vision_tower_config and back.feature_layers == (2,)
  assert back.decoder == cfg.decoder and back.image_token_id == IMAGE_TOKEN
  assert cfg.to_hf(hf)["text_config"]["eos_token_id"] == EOS


def test_logits_equal_transformers_for_a_batch_with_two_images(reference):
  model, _, cfg, params = reference
  prompts, pixels = _prompts(cfg.num_image_tokens), _pixels(0)
  ours = _our_logits(cfg, params, prompts, pixels)
  for i, p in enumerate(prompts):
    ref = _hf_logits(model, p, pixels[i:i + 1])
    assert np.abs(ref).max() > 0.3  # not a degenerate model
    np.testing.assert_allclose(ours[i], ref, atol=ATOL, rtol=0)


def test_image_features_and_embed_place_visual_tokens_in_order(reference):
  model, _, cfg, params = reference
  import torch

  pixels = _pixels(3)
  feats = np.asarray(llava.Llava(cfg).apply({"params": params}, jnp.asarray(pixels), method=llava.Llava.image_features))
  with torch.no_grad():
    ref = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
  ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
  ref = torch.cat(list(ref)).reshape(-1, 64).numpy()
  np.testing.assert_allclose(feats, ref, atol=ATOL, rtol=0)
  prompts = _prompts(cfg.num_image_tokens)
  tokens = jnp.asarray([prompts[0][:len(prompts[1])], prompts[1]])
  emb = np.asarray(llava.Llava(cfg).apply({"params": params}, tokens, jnp.asarray(pixels), method=llava.Llava.embed))
  np.testing.assert_allclose(emb[0, 4:20], feats[:16], atol=1e-6)  # row-major: row 0 takes image 0
  np.testing.assert_allclose(emb[1, 3:19], feats[16:], atol=1e-6)


def test_transformers_5_names_load(reference, tmp_path):
  """The names transformers 5.x holds in memory (model.vision_tower..., model.language_model..., lm_head)."""
  model, directory, cfg, params = reference
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert any(k.startswith("model.language_model.") for k in state) and "lm_head.weight" in state
  out = tmp_path / "v5"
  out.mkdir()
  shutil.copy(os.path.join(directory, "config.json"), out / "config.json")
  names = sorted(state)
  write_safetensors(str(out / "model.safetensors"), [(n, state[n].shape, state[n].dtype) for n in names],
                    (state[n] for n in names))
  cfg5, params5 = llava.load_hf(str(out))
  assert cfg5 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params5, params)


def test_save_hf_is_read_by_transformers_and_load_hf(reference, tmp_path):
  model, _, cfg, params = reference
  transformers = _transformers()
  out = llava.save_hf(str(tmp_path / "ours"), cfg, params)
  with open(os.path.join(out, "config.json")) as fh:
    config = json.load(fh)
  assert config["vision_config"]["num_hidden_layers"] == 2 and config["vision_feature_layer"] == -1
  back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  prompts, pixels = _prompts(cfg.num_image_tokens), _pixels(1)
  for i, p in enumerate(prompts):
    np.testing.assert_allclose(_hf_logits(back, p, pixels[i:i + 1]), _hf_logits(model, p, pixels[i:i + 1]),
                               atol=ATOL, rtol=0)
  cfg2, params2 = llava.load_hf(out)
  assert cfg2.vision_tower_config == cfg.vision_tower_config and cfg2.feature_layers == (2,)
  ours = _our_logits(cfg2, params2, prompts, pixels)
  ref = _our_logits(cfg, params, prompts, pixels)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    llava.save_hf(out, cfg, params)


def test_greedy_generation_equals_transformers_generate(reference):
  import torch

  model, _, cfg, params = reference
  pixels = _pixels(2)
  raw = [[1, 5, IMAGE_TOKEN, 17, 3], [1, IMAGE_TOKEN, 33, 7, 40, 22, 9]]
  prompts = [llava.expand_image_tokens(p, [pixels[i]], cfg) for i, p in enumerate(raw)]
  assert len(prompts[0]) == 4 + 16
  embeds, positions = zip(*[llava.prompt_inputs(cfg, params, p, [pixels[i]]) for i, p in enumerate(prompts)])
  assert embeds[0].shape == (20, 64) and embeds[0].dtype == np.float32
  np.testing.assert_array_equal(positions[1], np.arange(len(prompts[1])))
  new = 10
  sampling = SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=(EOS,))
  outs = Sampler(cfg.decoder).generate(params["language_model"], prompts, sampling, prompt_embeds=list(embeds),
                                       prompt_positions=list(positions))
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(input_ids=torch.tensor([p]), pixel_values=torch.from_numpy(pixels[i:i + 1].transpose(0, 3, 1, 2)),
                           do_sample=False, max_new_tokens=new, eos_token_id=EOS, pad_token_id=0)
    ref_tokens = ref[0, len(p):].tolist()
    assert outs[i].tokens == ref_tokens, (i, outs[i].tokens, ref_tokens)
  assert max(len(o.tokens) for o in outs) >= 4  # the comparison covered several decode steps


@pytest.mark.parametrize("strategy,layer", [("full", [-3, -1]), ("default", 1)])
def test_other_feature_layers_and_strategy(strategy, layer, tmp_path):
  model = _hf_llava(seed=1, vision_feature_select_strategy=strategy, vision_feature_layer=layer)
  model.save_pretrained(str(tmp_path / "hf"))
  cfg, params = llava.load_hf(str(tmp_path / "hf"))
  expected_tokens = 16 + (strategy == "full")
  assert cfg.num_image_tokens == expected_tokens
  prompts, pixels = _prompts(expected_tokens), _pixels(4)
  ours = _our_logits(cfg, params, prompts, pixels)
  for i, p in enumerate(prompts):
    np.testing.assert_allclose(ours[i], _hf_logits(model, p, pixels[i:i + 1]), atol=ATOL, rtol=0)
  # Round trip through our writer and transformers' reader keeps the selected states.
  back = _transformers().LlavaForConditionalGeneration.from_pretrained(
      llava.save_hf(str(tmp_path / "ours"), cfg, params)).eval()
  np.testing.assert_allclose(_hf_logits(back, prompts[0], pixels[:1]), _hf_logits(model, prompts[0], pixels[:1]),
                             atol=ATOL, rtol=0)


def test_init_params_tree_matches_the_loaded_one(reference):
  _, _, cfg, params = reference
  fresh = llava.init_params(cfg, jax.random.key(0))
  shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), t)
  assert shapes(fresh) == shapes(params)


def test_bad_inputs(reference, tmp_path):
  _, directory, cfg, params = reference
  pixels = _pixels(0)
  with pytest.raises(ValueError, match="2 image placeholder"):
    llava.expand_image_tokens([1, IMAGE_TOKEN, IMAGE_TOKEN], [pixels[0]], cfg)
  with pytest.raises(ValueError, match="image 0 has shape"):
    llava.prompt_inputs(cfg, params, [1] + [IMAGE_TOKEN] * 16, [pixels[0, :16]])
  with pytest.raises(ValueError, match="hold 3 image tokens"):
    llava.prompt_inputs(cfg, params, [1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN], [pixels[0]])
  with pytest.raises(ValueError, match="hold 16 image tokens"):
    llava.Llava(cfg).apply({"params": params}, jnp.asarray([[1] + [IMAGE_TOKEN] * 16]), jnp.asarray(pixels))
  with open(os.path.join(directory, "config.json")) as fh:
    hf = json.load(fh)
  with pytest.raises(ValueError, match="out of range"):
    llava.LlavaConfig.from_hf({**hf, "vision_feature_layer": -5})
  with pytest.raises(ValueError, match="only CLIP vision towers"):
    llava.LlavaConfig.from_hf({**hf, "vision_config": {**hf["vision_config"], "model_type": "siglip_vision_model"}})
  with pytest.raises(ValueError, match="expected 'llava'"):
    llava.LlavaConfig.from_hf({**hf, "model_type": "llama"})
  # A checkpoint with a tensor missing names it.
  broken = tmp_path / "broken"
  broken.mkdir()
  shutil.copy(os.path.join(directory, "config.json"), broken / "config.json")
  f = SafetensorsFile(os.path.join(directory, "model.safetensors"))
  all_names = list(f.keys())
  names = [n for n in all_names if n != "multi_modal_projector.linear_2.weight"]
  write_safetensors(str(broken / "model.safetensors"), [(n, f.shape(n), f.tensor(n).dtype) for n in names],
                    (f.tensor(n) for n in names))
  with pytest.raises(CheckpointError, match="multi_modal_projector.linear_2.weight"):
    llava.load_hf(str(broken))
  names = [n for n in all_names if "layers.1.mlp.up_proj" not in n]
  write_safetensors(str(broken / "model.safetensors"), [(n, f.shape(n), f.tensor(n).dtype) for n in names],
                    (f.tensor(n) for n in names))
  with pytest.raises(CheckpointError, match="missing tensor 'language_model.model.layers.1.mlp.up_proj.weight'"):
    llava.load_hf(str(broken))


def test_bf16_compute_and_remat_gradients(reference):
  """bf16 activations stay close to fp32 (relative L2 error of the logits < 2e-2, bf16's
  8-bit mantissa over a few layers); rematerialised towers give the same gradients."""
  import dataclasses

  _, _, cfg, params = reference
  prompts, pixels = _prompts(cfg.num_image_tokens), _pixels(5)
  tokens = jnp.asarray([prompts[0][:len(prompts[1])], prompts[1]])
  bf16 = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, dtype="bfloat16"),
                             decoder=dataclasses.replace(cfg.decoder, dtype="bfloat16"))
  ref = np.asarray(llava.Llava(cfg).apply({"params": params}, tokens, jnp.asarray(pixels)))
  low = llava.Llava(bf16).apply({"params": params}, tokens, jnp.asarray(pixels))
  assert low.dtype == jnp.float32
  assert np.linalg.norm(np.asarray(low) - ref) / np.linalg.norm(ref) < 2e-2
  remat = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, remat=True),
                              decoder=dataclasses.replace(cfg.decoder, remat="full"))

  def grads(c):
    def loss(p):
      logits = llava.Llava(c).apply({"params": p}, tokens, jnp.asarray(pixels))
      return jnp.mean(jax.nn.log_softmax(logits)[..., 7])
    return jax.jit(jax.grad(loss))(params)

  g, g_remat = grads(cfg), grads(remat)
  assert float(jnp.abs(g["vision_tower"]["patch_embed"]["kernel"]).max()) > 0  # gradients reach the tower
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5), g, g_remat)
