"""Qwen2.5-VL in JAX against transformers' `Qwen2_5_VLForConditionalGeneration`.

A tiny random HF model (every parameter redrawn, so biases and norm scales are not 0/1)
with a vision tower whose windows really window: patch 4 px, merge 2, window 16 px ->
windows of 2x2 merged groups, grids that do not divide into whole windows, and one
full-attention block among three. Checked against it in fp32: the vision features of
two images of different grids, the logits of a prompt with two images, the M-RoPE
positions, greedy generation through the core sampler, and checkpoint round trips
(5.x and 4.x tensor names; save -> transformers loads it).
"""

import dataclasses
import json
import os

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
from mlx_med.vlm import qwen2_5_vl as qv

IMAGE, VIDEO, VSTART, VEND = 100, 101, 98, 99
GRIDS = ((1, 10, 6), (1, 8, 14))  # merged 5x3 and 4x7: partial windows at the edges
# fp32 on both sides; differences are summation order through 3 vision blocks + 2 decoder layers.
ATOL = 2e-4


def _hf_config():
  from torch_peers import import_torchvision

  import_torchvision()
  import transformers

  return transformers.Qwen2_5_VLConfig(
      text_config={"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                   "rms_norm_eps": 1e-6, "eos_token_id": None, "bos_token_id": None, "pad_token_id": 0,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
      vision_config={"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
                     "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 16, "out_hidden_size": 64,
                     "fullatt_block_indexes": [1], "tokens_per_second": 2},
      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  import torch
  import transformers

  cfg = _hf_config()
  torch.manual_seed(0)
  model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  directory = str(tmp_path_factory.mktemp("qwen25vl") / "hf")
  model.save_pretrained(directory)
  return model, directory


@pytest.fixture(scope="module")
def loaded(hf):
  _, directory = hf
  return qv.load_hf(directory)


def _images(seed=0):
  rng = np.random.default_rng(seed)
  patch_dim = 3 * 2 * 4 * 4
  return [(rng.normal(size=(t * h * w, patch_dim)).astype(np.float32), (t, h, w)) for t, h, w in GRIDS]


def _prompt(cfg):
  ids = [5, 17, VSTART, IMAGE, VEND, 40, 41, 42, VSTART, IMAGE, VEND, 7, 9, 11]
  return qv.expand_image_tokens(ids, _images(), cfg)


def _forward(cfg, params, rows, patches, grids):
  """Qwen25VL logits under jit (grids static), positions from get_rope_index per row."""
  grids = tuple(grids)
  k, positions = 0, []
  for row in rows:
    n = len(qv._runs(np.asarray(row), IMAGE))
    positions.append(qv.get_rope_index(row, grids[k:k + n], cfg))
    k += n
  fn = jax.jit(lambda p, t, x, pos: qv.Qwen25VL(cfg).apply({"params": p}, t, (x, grids), positions=pos))
  return np.asarray(fn(params, jnp.asarray(rows), jnp.asarray(patches), jnp.asarray(np.stack(positions))))


def _hf_inputs(ids):
  import torch

  images = _images()
  input_ids = torch.tensor([ids])
  return {"input_ids": input_ids, "pixel_values": torch.tensor(np.concatenate([p for p, _ in images])),
          "image_grid_thw": torch.tensor([g for _, g in images]),
          "mm_token_type_ids": (input_ids == IMAGE).to(torch.int32), "attention_mask": torch.ones_like(input_ids)}


def test_config_from_hf_5x_and_4x_layouts(hf):
  _, directory = hf
  with open(os.path.join(directory, "config.json")) as f:
    five = json.load(f)
  cfg = qv.Qwen25VLConfig.from_hf(five)
  assert cfg.decoder.mrope_section == (2, 3, 3) and cfg.decoder.qkv_bias and cfg.decoder.num_kv_heads == 2
  assert cfg.vision.fullatt_block_indexes == (1,) and cfg.vision.window_groups == 2
  assert cfg.image_token_id == IMAGE and cfg.decoder.norm_eps == 1e-6
  # transformers 4.x: text fields flat, rope_scaling {"type": "mrope"}, rope_theta at the top level.
  text = dict(five["text_config"])
  rope = text.pop("rope_parameters")
  four = {k: v for k, v in five.items() if k != "text_config"}
  four.update({k: v for k, v in text.items() if k != "model_type"})
  four.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
  four["vision_config"] = {**five["vision_config"], "in_chans": 3}
  four["vision_config"].pop("in_channels")
  assert qv.Qwen25VLConfig.from_hf(four) == cfg
  bad = dict(five, text_config={**five["text_config"], "rope_parameters": {"rope_type": "default"}})
  with pytest.raises(ValueError, match="mrope_section"):
    qv.Qwen25VLConfig.from_hf(bad)


def test_window_layout_has_several_windows_and_inverts():
  cfg = qv.Qwen25VLConfig.from_hf(_hf_config().to_dict())
  lay = qv.vision_layout(GRIDS, cfg.vision)
  # image 1: 5x3 groups -> 3x2 windows; image 2: 4x7 groups -> 2x4 windows.
  assert len(np.unique(lay["window_segments"])) == 6 + 8
  assert len(np.unique(lay["frame_segments"])) == 2
  n = sum(t * h * w for t, h, w in GRIDS)
  assert sorted(lay["order"].tolist()) == list(range(n))
  groups = lay["order"].reshape(-1, 4)[:, 0] // 4
  np.testing.assert_array_equal(groups[lay["restore"]], np.arange(n // 4))
  with pytest.raises(ValueError, match="divisible by the merge size"):
    qv.vision_layout(((1, 5, 4),), cfg.vision)


def test_vision_features_equal_transformers(hf, loaded):
  import torch

  model, _ = hf
  cfg, params = loaded
  images = _images()
  patches = np.concatenate([p for p, _ in images])
  with torch.no_grad():
    ref = model.model.visual(torch.tensor(patches), grid_thw=torch.tensor(GRIDS)).pooler_output.numpy()
  ours = qv.Qwen25VL(cfg).apply({"params": params}, (jnp.asarray(patches), GRIDS), method=qv.Qwen25VL.image_features)
  assert ours.shape == (sum(t * h * w for t, h, w in GRIDS) // 4, 64)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)
  # Window attention matters: every block full-attention gives other features.
  full = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, fullatt_block_indexes=(0, 1, 2)))
  other = qv.Qwen25VL(full).apply({"params": params}, (jnp.asarray(patches), GRIDS), method=qv.Qwen25VL.image_features)
  assert np.abs(np.asarray(other) - ref).max() > 100 * ATOL


def test_rope_index_equals_transformers(hf, loaded):
  model, _ = hf
  cfg, _ = loaded
  ids = _prompt(cfg)
  inputs = _hf_inputs(ids)
  ref, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs["image_grid_thw"])
  ours = qv.get_rope_index(ids, GRIDS, cfg)
  assert ours.dtype == np.int32 and ours.shape == (len(ids), 3)
  np.testing.assert_array_equal(ours, ref[:, 0].numpy().T)
  with pytest.raises(ValueError, match="image token run"):
    qv.get_rope_index(ids, GRIDS[:1], cfg)


def test_video_rope_positions_scale_time():
  cfg = qv.Qwen25VLConfig.from_hf(_hf_config().to_dict())
  ids = [1] + [VIDEO] * (2 * 2 * 2) + [3]
  pos = qv.get_rope_index(ids, (), cfg, video_grids=((2, 4, 4),), second_per_grid_ts=(1.5,))
  # tokens_per_second 2 x 1.5 s per grid -> frame 1 at t offset 3.
  np.testing.assert_array_equal(pos[1:5, 0], [1, 1, 1, 1])
  np.testing.assert_array_equal(pos[5:9, 0], [4, 4, 4, 4])
  np.testing.assert_array_equal(pos[1:5, 1:], [[1, 1], [1, 2], [2, 1], [2, 2]])
  assert pos[-1].tolist() == [3, 3, 3]


def test_logits_equal_transformers(hf, loaded):
  import torch

  model, _ = hf
  cfg, params = loaded
  ids = _prompt(cfg)
  with torch.no_grad():
    ref = model(**_hf_inputs(ids)).logits.numpy()
  images = _images()
  patches = jnp.asarray(np.concatenate([p for p, _ in images]))
  ours = qv.Qwen25VL(cfg).apply({"params": params}, jnp.asarray([ids]), (patches, GRIDS))  # positions computed
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)
  # prompt_inputs (the sampler's inputs) give the same logits through the decoder alone.
  emb, pos = qv.prompt_inputs(cfg, params, ids, images)
  from mlx_med.core.transformer import Decoder
  again = Decoder(cfg.decoder).apply({"params": params["language_model"]}, None, positions=jnp.asarray(pos[None]),
                                     embeddings=jnp.asarray(emb[None]))
  np.testing.assert_allclose(np.asarray(again), ref, atol=ATOL, rtol=0)
  # Image tokens are filled row-major over a batch: two rows, one image each.
  first, second = ids[:ids.index(VEND) + 1], ids[ids.index(VEND) + 1:]
  second = [5] * (len(first) - len(second)) + second if len(second) < len(first) else second
  first = first + [5] * (len(second) - len(first))
  batch = _forward(cfg, params, [first, second], patches, GRIDS)
  for r, (row, image) in enumerate(zip([first, second], images)):
    alone = _forward(cfg, params, [row], image[0], (image[1],))
    np.testing.assert_allclose(batch[r], alone[0], atol=1e-5)
  with pytest.raises(ValueError, match="image tokens"):
    qv.Qwen25VL(cfg).apply({"params": params}, jnp.asarray([ids[:-40]]), (patches, GRIDS), positions=jnp.zeros(
        (1, len(ids) - 40, 3), jnp.int32))


def test_greedy_generation_equals_transformers_generate(hf, loaded):
  import torch

  model, _ = hf
  cfg, params = loaded
  ids = _prompt(cfg)
  new = 8
  with torch.no_grad():
    out = model.generate(**_hf_inputs(ids), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
  ref = out[0, len(ids):].tolist()
  emb, pos = qv.prompt_inputs(cfg, params, ids, _images())
  sampler = Sampler(cfg.decoder)
  got = sampler.generate(params["language_model"], [ids], SamplingParams(max_new_tokens=new, temperature=0.0),
                         prompt_embeds=[emb], prompt_positions=[pos])
  assert list(got[0].tokens) == ref


def test_expand_image_tokens():
  cfg = qv.Qwen25VLConfig.from_hf(_hf_config().to_dict())
  out = qv.expand_image_tokens([1, VSTART, IMAGE, VEND, 2], [(None, (1, 4, 6))], cfg)
  assert out == [1, VSTART] + [IMAGE] * 6 + [VEND, 2]
  with pytest.raises(ValueError, match="placeholder"):
    qv.expand_image_tokens([1, IMAGE, IMAGE], [(1, 4, 6)], cfg)


def test_load_4x_names_and_save_round_trip_through_transformers(hf, loaded, tmp_path):
  import torch
  import transformers

  model, directory = hf
  cfg, params = loaded
  # A transformers 4.x checkpoint: visual.*, model.* (the decoder), lm_head.
  src = SafetensorsFile(os.path.join(directory, "model.safetensors"))
  old = tmp_path / "old"
  old.mkdir()
  renamed = {}
  for name in src.keys():  # noqa: SIM118 (a SafetensorsFile is not iterable)
    new = name.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
    renamed[new] = np.asarray(src.tensor(name))
  write_safetensors(str(old / "model.safetensors"), [(k, v.shape, v.dtype) for k, v in renamed.items()],
                    renamed.values())
  with open(os.path.join(directory, "config.json")) as f:
    (old / "config.json").write_text(f.read())
  cfg4, params4 = qv.load_hf(str(old))
  assert cfg4 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params4, params)

  out = qv.save_hf(str(tmp_path / "saved"), cfg, params)
  again = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  theirs = model.state_dict()
  mine = again.state_dict()
  assert set(mine) == set(theirs)
  for k in theirs:
    torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)
  cfg2, params2 = qv.load_hf(out)
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params2, params)

  # One tensor missing: a one-line error naming it.
  del renamed["visual.merger.mlp.2.bias"]
  write_safetensors(str(old / "model.safetensors"), [(k, v.shape, v.dtype) for k, v in renamed.items()],
                    renamed.values())
  with pytest.raises(CheckpointError, match="visual.merger.mlp.2.bias"):
    qv.load_hf(str(old))


def test_init_params_match_the_checkpoint_tree(loaded):
  cfg, params = loaded
  fresh = qv.init_params(cfg, jax.random.PRNGKey(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), fresh, params)


def _bench_module():
  import importlib.util

  path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "qwen2_5_vl_step.py")
  spec = importlib.util.spec_from_file_location("qwen2_5_vl_step", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _bf16_against_fp32(size: str, image_px: int) -> float:
  """Largest |logit difference| of a bf16-compute forward against fp32 (same fp32 parameters),
  relative to the largest |fp32 logit|, on one image + text prompt of the bench's model."""
  bench = _bench_module()
  cfg32 = bench.make_config(size, "float32")
  cfg16 = dataclasses.replace(cfg32, decoder=dataclasses.replace(cfg32.decoder, dtype="bfloat16"))
  params = qv.init_params(cfg32, jax.random.PRNGKey(0))
  ids, (patches, grid) = bench.make_inputs(cfg32, image_px, 16)
  pos = jnp.asarray(qv.get_rope_index(ids, (grid,), cfg32)[None])
  args = (jnp.asarray([ids]), (jnp.asarray(patches), (grid,)))
  ref = np.asarray(qv.Qwen25VL(cfg32).apply({"params": params}, *args, positions=pos))
  low = np.asarray(qv.Qwen25VL(cfg16).apply({"params": params}, *args, positions=pos))
  assert low.dtype == np.float32 and np.isfinite(low).all()
  return float(np.abs(low - ref).max() / np.abs(ref).max())


def test_bf16_compute_tracks_fp32_tiny():
  # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); a few percent of the largest logit
  # after 4 vision blocks + 2 layers is the expected rounding, an error would be O(1).
  assert _bf16_against_fp32("tiny", 112) < 5e-2


@pytest.mark.gpu
def test_mid_size_step_on_gpu():
  """The bench's mid-size model on a GPU: bf16 tracks fp32, and the timed step runs end to end."""
  assert _bf16_against_fp32("mid", 448) < 5e-2
  r = _bench_module().bench_step("mid", dtype="bfloat16", image_px=448, new_tokens=16, reps=2)
  assert r["backend"] == "gpu" and r["image_tokens"] == 256 and r["generate_tokens_per_s"] > 0
