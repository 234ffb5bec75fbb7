"""ViT: shapes, logical axes on every parameter, bf16, remat, the encoder factory.

Parity against transformers' CLIPVisionModel / SiglipVisionModel is in test_hf_towers.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mlx_med.core.sharding import DEFAULT_RULES
from mlx_med.vision import (
  VisionOutput,
  ViT,
  ViTConfig,
  build_image_encoder,
  image_encoder_config,
)

TINY = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64}
LOGICAL_NAMES = {name for name, _ in DEFAULT_RULES}


def _images(batch=2, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, 32, 32, 3), jnp.float32)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def tiny(request):
  cfg = ViTConfig(style=request.param, act="quick_gelu" if request.param == "clip" else "gelu_tanh", **TINY)
  model = ViT(cfg)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), _images())
  return cfg, model, variables


def test_shapes_and_param_count(tiny):
  cfg, model, variables = tiny
  out = jax.jit(model.apply)(variables, _images())
  assert isinstance(out, VisionOutput)
  assert out.pooled.shape == (2, 32)
  assert out.tokens.shape == (2, 17 if cfg.style == "clip" else 16, 32)
  assert len(out.feature_maps) == 1 and out.feature_maps[0].shape == (2, 4, 4, 32)
  # The feature map is the patch grid of the tokens, row-major.
  patches = out.tokens[:, 1:] if cfg.style == "clip" else out.tokens
  np.testing.assert_array_equal(np.asarray(out.feature_maps[0][:, 1, 2]), np.asarray(patches[:, 1 * 4 + 2]))
  assert sum(p.size for p in jax.tree.leaves(nn.unbox(variables["params"]))) == cfg.num_params()
  assert np.all(np.isfinite(np.asarray(out.pooled)))


def test_every_param_has_logical_axes(tiny):
  _, _, variables = tiny
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(p, nn.Partitioned) for p in leaves)
  for p in leaves:
    assert len(p.names) == p.value.ndim
    assert all(n is None or n in LOGICAL_NAMES for n in p.names), p.names


def test_bf16_compute_fp32_params(tiny):
  cfg, _, variables = tiny
  model16 = ViT(ViTConfig(**{**cfg.__dict__, "dtype": "bfloat16"}))
  out16 = jax.jit(model16.apply)(variables, _images())
  out32 = jax.jit(tiny[1].apply)(variables, _images())
  assert out16.pooled.dtype == jnp.bfloat16 and out16.tokens.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables["params"])))
  # bf16 has ~3 significant digits; the tiny net's outputs are O(1).
  np.testing.assert_allclose(np.asarray(out16.pooled, np.float32), np.asarray(out32.pooled), atol=0.1, rtol=0.05)


def test_remat_gives_the_same_gradients(tiny):
  cfg, model, variables = tiny
  remat_model = ViT(ViTConfig(**{**cfg.__dict__, "remat": True}))
  params = nn.unbox(variables["params"])

  def loss(m):
    return lambda p: jnp.sum(m.apply({"params": p}, _images()).pooled ** 2)

  g0 = jax.jit(jax.grad(loss(model)))(params)
  g1 = jax.jit(jax.grad(loss(remat_model)))(params)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_gap_pool_is_the_mean_of_patch_tokens():
  cfg = ViTConfig(style="siglip", pool="gap", **TINY)
  model = ViT(cfg)
  variables = model.init(jax.random.PRNGKey(1), _images())
  out = model.apply(variables, _images())
  np.testing.assert_allclose(np.asarray(out.pooled), np.asarray(out.tokens.mean(axis=1)), rtol=1e-5, atol=1e-6)
  assert "map_head" not in variables["params"]


def test_build_image_encoder_from_configdict():
  cfg = ml_collections.ConfigDict(dict(kind="vit", style="siglip", **TINY))
  model = build_image_encoder(cfg)
  assert isinstance(model, ViT) and model.cfg == ViTConfig(style="siglip", **TINY)
  assert image_encoder_config(cfg).pool == "map"
  with pytest.raises(ValueError, match="unknown keys"):
    build_image_encoder(ml_collections.ConfigDict(dict(kind="vit", widht=3, **TINY)))
  with pytest.raises(ValueError, match="kind"):
    build_image_encoder(ml_collections.ConfigDict({"kind": "resnet"}))
  # kind "davit": list fields from a ConfigDict become the (hashable) dataclass's tuples.
  davit = build_image_encoder(ml_collections.ConfigDict({
      "kind": "davit", "dims": [8, 16, 16, 16], "depths": [1, 1, 1, 1], "heads": [1, 2, 2, 2], "window_size": 2, "image_size": 64}))
  assert type(davit).__name__ == "DaViT" and davit.cfg.dims == (8, 16, 16, 16)
  hash(davit.cfg)


def test_bad_configs_and_inputs_are_clear():
  with pytest.raises(ValueError, match="class token"):
    ViTConfig(style="siglip", pool="cls", **TINY)
  with pytest.raises(ValueError, match="multiple of patch_size"):
    ViTConfig(**{**TINY, "image_size": 30})
  model = ViT(ViTConfig(**TINY))
  with pytest.raises(ValueError, match="NHWC"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32)))


def test_sharded_apply_matches_single_device(tiny):
  """Parameters placed by their logical axes on a data x fsdp x tensor mesh of 8 fake devices,
  activations constrained by the same rules: the output equals the unsharded one."""
  from mlx_med.core import sharding as sharding_lib

  cfg, model, variables = tiny
  rules = sharding_lib.ShardingRules(sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  params = nn.unbox(variables["params"])
  shardings = sharding_lib.tree_shardings(rules, nn.get_partition_spec(variables)["params"], params)
  placed = jax.device_put(params, shardings)
  assert placed["encoder"]["layers_0"]["attn"]["query"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor", None)
  images = jax.device_put(_images(4), rules.named(("batch", None, None, None)))
  sharded = jax.jit(ViT(cfg, rules=rules).apply)({"params": placed}, images)
  single = jax.jit(model.apply)(variables, _images(4))
  np.testing.assert_allclose(np.asarray(sharded.pooled), np.asarray(single.pooled), rtol=1e-5, atol=1e-5)
