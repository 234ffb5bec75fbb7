"""HF directory loading (sharded over 8 fake devices), saving, Orbax conversion, and clear errors."""

import json
import os
import shutil

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from hf_tiny import make_hf_model
from mlx_med.core import params as params_lib
from mlx_med.core import sharding as sharding_lib
from mlx_med.llm import checkpoint, hf_config
from mlx_med.llm.safetensors_io import CheckpointError


@pytest.fixture(scope="module")
def hf_model():
  return make_hf_model("qwen2", vocab_size=320)


@pytest.fixture(scope="module")
def sharded_dir(hf_model, tmp_path_factory):
  """The model saved by transformers as several safetensors shards plus an index."""
  d = str(tmp_path_factory.mktemp("qwen2_sharded"))
  hf_model.save_pretrained(d, max_shard_size="100KB")
  assert os.path.isfile(os.path.join(d, checkpoint.INDEX_NAME))
  return d


@pytest.fixture(scope="module")
def cfg(sharded_dir):
  return hf_config.decoder_config_from_hf(hf_config.read_hf_config(sharded_dir))


@pytest.fixture(scope="module")
def reference(sharded_dir, cfg):
  return checkpoint.load_hf_params(sharded_dir, cfg)


def _logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("mesh_shape", [{"data": 1, "fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_load_reads_only_each_devices_shard(sharded_dir, cfg, reference, mesh_shape):
  rules = sharding_lib.ShardingRules(sharding_lib.make_mesh(mesh_shape))
  weights = checkpoint.HFWeights(sharded_dir)
  params = checkpoint.load_hf_params(sharded_dir, cfg, rules, weights=weights)
  expected_shardings = params_lib.param_shardings(cfg, rules)
  chex.assert_trees_all_equal_structs(params, reference, expected_shardings)
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(reference))
  split = 0
  for (path, array), sharding in zip(flat_params, jax.tree.leaves(expected_shardings), strict=True):
    assert array.sharding == sharding, path
    full = np.asarray(flat_ref[path])
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], err_msg=str(path))
    if array.addressable_shards[0].data.shape != array.shape:
      split += 1
  assert split >= 8  # embeddings, projections and MLPs are really split
  # No callback ever read a whole per-layer tensor of a split parameter (each device read its slice).
  full_shapes = {name: tuple(weights.shape(name)) for name in weights.names()}
  sharded_names = [n for n in full_shapes if "mlp" in n or "embed" in n or "proj.weight" in n]
  for name, region in weights.reads:
    if name in sharded_names:
      assert int(np.prod(region)) < int(np.prod(full_shapes[name])), name


def test_save_sharded_index_loads_in_transformers(sharded_dir, cfg, reference, hf_model, tmp_path):
  out = str(tmp_path / "saved")
  checkpoint.save_hf_checkpoint(out, reference, cfg, hf_config=hf_config.read_hf_config(sharded_dir),
                                max_shard_size="60KB")
  with open(os.path.join(out, checkpoint.INDEX_NAME)) as f:
    index = json.load(f)
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and all(os.path.isfile(os.path.join(out, s)) for s in shards)
  assert sorted(os.listdir(tmp_path)) == ["saved"]  # the temporary directory was renamed, nothing left over
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = [3, 14, 15, 92, 65, 35]
  np.testing.assert_array_equal(_logits(reloaded, tokens), _logits(hf_model, tokens))
  chex.assert_trees_all_equal(checkpoint.load_hf_params(out, cfg), reference)  # structure too, bit for bit
  with pytest.raises(FileExistsError):
    checkpoint.save_hf_checkpoint(out, reference, cfg)
  checkpoint.save_hf_checkpoint(out, reference, cfg, overwrite=True, dtype="bfloat16")
  assert sorted(os.listdir(tmp_path)) == ["saved"]
  bf16 = checkpoint.load_hf_params(out, cfg)
  ref_embed = np.asarray(reference["embed"]["embedding"]).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(bf16["embed"]["embedding"]), ref_embed)
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"


def test_orbax_round_trip(sharded_dir, cfg, reference, tmp_path):
  orbax_dir = checkpoint.hf_to_orbax(sharded_dir, str(tmp_path / "orbax"))
  rules = sharding_lib.ShardingRules(sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  restored, restored_cfg, hf = checkpoint.load_orbax(orbax_dir, rules)
  assert restored_cfg == cfg and hf["model_type"] == "qwen2"
  chex.assert_trees_all_equal(restored, reference)
  assert restored["layers"]["mlp"]["up_proj"]["kernel"].sharding == \
      params_lib.param_shardings(cfg, rules)["layers"]["mlp"]["up_proj"]["kernel"]
  back = checkpoint.orbax_to_hf(orbax_dir, str(tmp_path / "hf_again"))
  original, converted = checkpoint.HFWeights(sharded_dir), checkpoint.HFWeights(back)
  assert sorted(original.names()) == sorted(converted.names())
  for name in original.names():
    np.testing.assert_array_equal(np.asarray(original.tensor(name)), np.asarray(converted.tensor(name)), name)


# ---------------------------------------------------------------- broken checkpoints


@pytest.fixture
def single_dir(hf_model, tmp_path):
  d = str(tmp_path / "single")
  hf_model.save_pretrained(d)
  return d


def _rewrite(directory, edit):
  path = os.path.join(directory, checkpoint.SINGLE_NAME)
  tensors = safetensors.torch.load_file(path)
  edit(tensors)
  safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def _load(directory):
  cfg = hf_config.decoder_config_from_hf(hf_config.read_hf_config(directory))
  return checkpoint.load_hf_params(directory, cfg)


def test_missing_tensor_is_named(single_dir):
  _rewrite(single_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
    _load(single_dir)


def test_wrong_shape_is_named(single_dir):
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
  _rewrite(single_dir, shrink)
  with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*shape \[8, 64\], "
                                            r"expected \[32, 64\]"):
    _load(single_dir)


def test_unexpected_tensor_is_an_error(single_dir):
  _rewrite(single_dir, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
  with pytest.raises(CheckpointError, match="unexpected tensors.*o_proj.bias"):
    _load(single_dir)


def test_truncated_file_names_the_tensor(single_dir):
  path = os.path.join(single_dir, checkpoint.SINGLE_NAME)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(CheckpointError, match=r"truncated safetensors file: tensor '.+' needs bytes"):
    _load(single_dir)
  with open(path, "r+b") as f:
    f.truncate(5)
  with pytest.raises(CheckpointError, match="truncated"):
    _load(single_dir)


def test_index_pointing_to_a_missing_shard(sharded_dir, tmp_path):
  d = str(tmp_path / "broken")
  shutil.copytree(sharded_dir, d)
  with open(os.path.join(d, checkpoint.INDEX_NAME)) as f:
    index = json.load(f)
  victim = sorted(set(index["weight_map"].values()))[-1]
  os.remove(os.path.join(d, victim))
  with pytest.raises(CheckpointError, match=f"to shard '{victim}', which does not exist"):
    _load(d)


def test_no_weights_and_pickles_are_refused(single_dir):
  os.remove(os.path.join(single_dir, checkpoint.SINGLE_NAME))
  open(os.path.join(single_dir, "pytorch_model.bin"), "wb").close()
  with pytest.raises(CheckpointError, match="pickled weights are not read"):
    _load(single_dir)
