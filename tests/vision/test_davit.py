"""DaViT against timm's `davit` (CPU torch): same random weights, same outputs.

Two tiny timm models cover both channel-attention variants and both downsample
kinds: timm's DaViT (v1 channel attention, 2x2 downsample convs) and the Florence /
MedImageInsight form (v2 channel attention, 3x3 downsample convs, named blocks). Every
weight is perturbed away from timm's init (zero biases, unit norms) so each one
matters. Input sizes are chosen so the stem, the downsample convs and the windows all
need padding.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.core import sharding as sharding_lib
from mlx_med.vision.davit import DaViT, DaViTConfig, convert_timm_state_dict, num_params

torch = pytest.importorskip("torch")

DIMS, DEPTHS, HEADS, WINDOW = (16, 32, 64, 128), (1, 1, 2, 1), (1, 2, 4, 8), 4

VARIANTS = {
    # timm's own DaViT: v1 channel attention, 2x2 downsample convs
    "timm": ({"down_kernel_size": 2, "channel_attn_v2": False, "named_blocks": False},
             {"patch_sizes": (7, 2, 2, 2), "channel_attention": "v1"}),
    # Florence / MedImageInsight: v2 channel attention, 3x3 downsample convs
    "florence": ({"down_kernel_size": 3, "channel_attn_v2": True, "named_blocks": True},
                 {"patch_sizes": (7, 3, 3, 3), "channel_attention": "v2"}),
}

# 50 px: the stem pads to 52 (-> 13), windows of 4 pad 13 -> 16; 2x2 downsamples pad 13 -> 14,
#   3x3 ones give 7, 4, 2; the last stage (2x2) pads to one 4x4 window.
# 64 px: maps 16, 8, 4, 2 (no padding but the last stage's window).
SIZES = (50, 64)
CASES = [("timm", 64), ("timm", 50), ("florence", 50)]


def _timm_model(variant: str):
  from torch_peers import import_timm
  davit = import_timm().models.davit
  torch.manual_seed(0)
  model = davit.DaVit(embed_dims=DIMS, depths=DEPTHS, num_heads=HEADS, window_size=WINDOW, num_classes=0,
                      **VARIANTS[variant][0]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _timm_forward(model, images_nhwc: np.ndarray):
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
  maps = []
  with torch.no_grad():
    pooled = model(x).numpy()
    y = model.stem(x)
    for stage in model.stages:
      y = stage(y)
      maps.append(y.permute(0, 2, 3, 1).numpy())
  return pooled, maps


_CONVERTED = {}


def _converted(variant: str):
  """(variant, timm model, our config, our params converted from its state dict), built once."""
  if variant not in _CONVERTED:
    model = _timm_model(variant)
    cfg = DaViTConfig(dims=DIMS, depths=DEPTHS, heads=HEADS, window_size=WINDOW, image_size=64,
                      **VARIANTS[variant][1])
    _CONVERTED[variant] = (variant, model, cfg, convert_timm_state_dict(model.state_dict(), cfg))
  return _CONVERTED[variant]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request):
  return _converted(request.param)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return {s: rng.standard_normal((2, s, s, 3)).astype(np.float32) for s in SIZES}


@pytest.mark.parametrize("variant,size", CASES)
def test_matches_timm(images, variant, size):
  variant, model, cfg, params = _converted(variant)
  want_pooled, want_maps = _timm_forward(model, images[size])
  out = jax.jit(lambda p, x: DaViT(cfg).apply({"params": p}, x))(params, images[size])
  assert len(out.feature_maps) == 4
  for i, (got, want) in enumerate(zip(out.feature_maps, want_maps)):
    assert got.shape == want.shape, (variant, i)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4, err_msg=f"{variant} stage {i}")
  np.testing.assert_allclose(np.asarray(out.pooled), want_pooled, atol=1e-4, rtol=1e-4)
  b, h, w, c = want_maps[-1].shape
  np.testing.assert_allclose(np.asarray(out.tokens), want_maps[-1].reshape(b, h * w, c), atol=1e-4, rtol=1e-4)


def test_conversion_keeps_every_weight(converted):
  _variant, model, cfg, params = converted
  ours = sum(np.size(x) for x in jax.tree.leaves(params))
  theirs = sum(p.numel() for p in model.parameters())
  assert ours == theirs == num_params(cfg)


def test_conversion_errors(converted):
  _, model, cfg, _ = converted
  sd = dict(model.state_dict())
  with pytest.raises(ValueError, match="unexpected key 'stages.0.extra.weight'"):
    convert_timm_state_dict({**sd, "stages.0.extra.weight": torch.zeros(3)}, cfg)
  with pytest.raises(ValueError, match="checkpoint and config differ"):
    convert_timm_state_dict(sd, dataclasses.replace(cfg, depths=(1, 1, 3, 1)))
  with pytest.raises(ValueError, match="width 16"):
    convert_timm_state_dict(sd)  # 16 channels/head: heads cannot be inferred, cfg is required


def test_default_heads_are_32_channels_each():
  from torch_peers import import_timm
  davit = import_timm().models.davit
  model = davit.DaVit(embed_dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), window_size=4,
                      num_classes=0)
  params = convert_timm_state_dict(model.state_dict())
  assert params["stages_3_blocks_0_spatial"]["attn"]["qkv"]["kernel"].shape == (128, 3, 4, 32)


# ---------------------------------------------------------------------------
# dtype, remat, stochastic depth, axes: on a two-stage model with its own init
# (the mechanics do not depend on depth; two stages keep the compiles short)
# ---------------------------------------------------------------------------

SMOKE = DaViTConfig(dims=(16, 32), depths=(1, 1), heads=(1, 2), window_size=4, patch_sizes=(7, 3), strides=(4, 2),
                    image_size=32, channel_attention="v2")


@pytest.fixture(scope="module")
def smoke_params():
  x = jnp.zeros((1, 32, 32, 3))
  return jax.jit(DaViT(SMOKE).init)(jax.random.key(0), x)["params"]


@pytest.fixture(scope="module")
def smoke_images():
  return jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def test_bf16_close_to_fp32(smoke_params, smoke_images):
  params = nn.meta.unbox(smoke_params)
  f32 = jax.jit(lambda p, x: DaViT(SMOKE).apply({"params": p}, x))(params, smoke_images)
  cfg16 = dataclasses.replace(SMOKE, dtype="bfloat16")
  b16 = jax.jit(lambda p, x: DaViT(cfg16).apply({"params": p}, x))(params, smoke_images)
  assert b16.feature_maps[-1].dtype == jnp.bfloat16 and b16.pooled.dtype == jnp.float32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  # pooled is LayerNorm-ed (unit scale): bf16's 8-bit mantissa through 4 blocks stays within 0.1.
  err = float(jnp.max(jnp.abs(b16.pooled - f32.pooled)))
  assert err < 0.1, err
  cos = jnp.sum(b16.pooled * f32.pooled, -1) / (jnp.linalg.norm(b16.pooled, axis=-1) * jnp.linalg.norm(f32.pooled, axis=-1))
  assert float(jnp.min(cos)) > 0.999


def _loss_and_grad(cfg, params, images):
  def loss(p):  # a training forward: stochastic depth on, with a fixed key
    out = DaViT(cfg).apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(3)})
    return jnp.sum(out.pooled ** 2) + jnp.mean(out.feature_maps[0])
  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_same_outputs_and_grads(smoke_params, smoke_images):
  params = nn.meta.unbox(smoke_params)
  cfg = dataclasses.replace(SMOKE, drop_path_rate=0.3)  # remat must replay the same drop masks
  l0, g0 = _loss_and_grad(cfg, params, smoke_images)
  l1, g1 = _loss_and_grad(dataclasses.replace(cfg, remat=True), params, smoke_images)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  # atol 2e-5: the recomputed forward is another compiled program, and the nine multiply-adds of the
  # depthwise position convolutions round differently in it: up to 6e-6 absolute measured (loss 256),
  # which is large relative only in leaves whose gradient nearly cancels (max 1e-4). A drop mask
  # that is not replayed changes a branch's gradients by their full size.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5), g1, g0)


def test_drop_path_only_in_training_with_a_key(smoke_params, smoke_images):
  params = nn.meta.unbox(smoke_params)
  cfg = dataclasses.replace(SMOKE, drop_path_rate=0.5)
  run = jax.jit(lambda p, x, key, train: DaViT(cfg).apply({"params": p}, x, train=train, rngs={"dropout": key}),
                static_argnums=3)
  evaluation = jax.jit(lambda p, x: DaViT(cfg).apply({"params": p}, x))(params, smoke_images).pooled
  np.testing.assert_allclose(np.asarray(run(params, smoke_images, jax.random.key(0), False).pooled),
                             np.asarray(evaluation), atol=1e-6)  # train=False ignores the key
  a = run(params, smoke_images, jax.random.key(0), True).pooled
  a2 = run(params, smoke_images, jax.random.key(0), True).pooled
  b = run(params, smoke_images, jax.random.key(1), True).pooled
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
  assert float(jnp.max(jnp.abs(a - evaluation))) > 1e-3
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  with pytest.raises(ValueError, match="needs a dropout key"):
    jax.eval_shape(lambda p, x: DaViT(cfg).apply({"params": p}, x, train=True), params, smoke_images)
  # rate 0: training without a key is the evaluation forward (same params: rate is no parameter)
  no_drop = jax.jit(lambda p, x: DaViT(SMOKE).apply({"params": p}, x, train=True))(params, smoke_images).pooled
  np.testing.assert_allclose(np.asarray(no_drop), np.asarray(evaluation), atol=1e-6)


def test_every_param_has_logical_axes(smoke_params):
  leaves = jax.tree.leaves(smoke_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(smoke_params)
  known = {name for name, _ in sharding_lib.DEFAULT_RULES}
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding_lib.ShardingRules(mesh)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for spec, leaf in zip(flat_specs, leaves):
    assert len(spec) == leaf.value.ndim
    assert all(name is None or name in known for name in spec), spec
    rules.spec(tuple(spec), leaf.value.shape)  # every name has a rule on the mesh


def test_sharded_forward_matches_single_device(smoke_params, smoke_images):
  params = nn.meta.unbox(smoke_params)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding_lib.ShardingRules(mesh)
  specs = nn.get_partition_spec(smoke_params)
  shardings = sharding_lib.tree_shardings(rules, specs, params)
  sharded = jax.device_put(params, shardings)
  x = jax.device_put(jnp.concatenate([smoke_images, smoke_images]), rules.named(("batch", None, None, None)))
  out = jax.jit(lambda p, x: DaViT(SMOKE, rules).apply({"params": p}, x))(sharded, x)
  ref = jax.jit(lambda p, x: DaViT(SMOKE).apply({"params": p}, x))(params, smoke_images)
  np.testing.assert_allclose(np.asarray(out.pooled[:2]), np.asarray(ref.pooled), atol=1e-4, rtol=1e-4)


def test_sharded_gradients_match_single_device(smoke_params, smoke_images):
  """Sharded training must see the one-device gradients. The depthwise position convolutions
  (`cpe*.proj`) once ran as grouped `lax.conv`, whose kernel gradient XLA's SPMD partitioner got
  wrong under a batch-sharded mesh (about 100% relative error); they are elementwise now."""
  params = nn.meta.unbox(smoke_params)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding_lib.ShardingRules(mesh)
  shardings = sharding_lib.tree_shardings(rules, nn.get_partition_spec(smoke_params), params)
  images = jnp.concatenate([smoke_images, -smoke_images])
  x = jax.device_put(images, rules.named(("batch", None, None, None)))

  def loss(p, model, x):
    return jnp.mean(model.apply({"params": p}, x).pooled ** 2)

  got = jax.jit(jax.grad(lambda p, x: loss(p, DaViT(SMOKE, rules), x)))(jax.device_put(params, shardings), x)
  want = jax.jit(jax.grad(lambda p, x: loss(p, DaViT(SMOKE), x)))(params, images)
  got, want = jax.device_get(got), jax.device_get(want)
  num = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  den = sum(float(np.sum(np.asarray(b) ** 2)) for b in jax.tree.leaves(want))
  assert (num / den) ** 0.5 < 1e-4  # fp32 summation order only (4e-6 measured)
  for name in ("cpe1", "cpe2"):
    a = np.asarray(got["stages_0_blocks_0_spatial"][name]["proj"]["kernel"])
    b = np.asarray(want["stages_0_blocks_0_spatial"][name]["proj"]["kernel"])
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_presets_and_errors():
  cfg = DaViTConfig.medimageinsight()
  assert (cfg.dims, cfg.depths, cfg.heads, cfg.window_size, cfg.patch_sizes, cfg.strides, cfg.image_size) == (
      (256, 512, 1024, 2048), (1, 1, 9, 1), (8, 16, 32, 64), 12, (7, 3, 3, 3), (4, 2, 2, 2), 480)
  assert num_params(cfg) == 360_636_416  # the paper's ~360M image tower; timm's davit_huge_fl has as many
  assert num_params(DaViTConfig.smoke()) < 1_500_000
  assert num_params(DaViTConfig.tiny()) == 27_591_168  # timm davit_tiny without its 1000-class head
  with pytest.raises(ValueError, match="not divisible by its 3 heads"):
    DaViTConfig(dims=(16, 32, 64, 128), heads=(3, 2, 4, 8))
  with pytest.raises(ValueError, match="one entry per stage"):
    DaViTConfig(dims=(16, 32, 64), depths=(1, 1, 1, 1))
  assert DaViTConfig.from_config({"preset": "medimageinsight", "image_size": 384, "dims": [256, 512, 1024, 2048]}) == \
      DaViTConfig.medimageinsight(image_size=384)
  assert DaViTConfig.from_config({"dims": [8, 16], "depths": [1, 1], "heads": [1, 2], "patch_sizes": [7, 2],
                                  "strides": [4, 2]}).dims == (8, 16)
  with pytest.raises(ValueError, match="unknown keys \\['width'\\]"):
    DaViTConfig.from_config({"preset": "smoke", "width": 3})
  import ml_collections

  from mlx_med.vision import encoders
  built = encoders.build_image_encoder(ml_collections.ConfigDict({"kind": "davit", "preset": "smoke"}))
  assert isinstance(built, DaViT) and built.cfg == DaViTConfig.smoke()
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(DaViT(SMOKE).init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
