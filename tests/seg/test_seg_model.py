"""BoltzFormer model: shapes, one parameter tree for every attention mode, `boltzmann` against the
release's dense masked computation on the same samples, kept-key accounting, the temperature
schedule as the decoder asks for it, prompt padding, output fusion, the loss, gradients, bf16.

Tiny configs (DaViT smoke-sized encoder at 64 px, hidden 32, 8 queries, 2 heads, 9 decoder layers).
Parameters come from the init's shapes (`jax.eval_shape`) filled with scaled normals: compiling
the random initialisers of every parameter costs more CPU time than the rest of this file, and the
initial distribution is not what these tests check (that `init_params` builds the same tree is).
Compiled forwards are module-scoped fixtures shared by the tests.
"""

from __future__ import annotations

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.seg import model as seg_model
from mlx_med.seg import sampling
from mlx_med.seg.model import BoltzFormer, BoltzFormerConfig, SegOutput, seg_loss

S, B, L = 64, 2, 8
EOS = PAD = 1
MODES = ("boltzmann", "dense_sampled", "threshold", "full")


def tiny_config(**overrides) -> BoltzFormerConfig:
  values = {
      "image_size": S,
      # DaViT's smoke tower with one block pair (stage 0): the four stage maps the pixel decoder reads,
      # at a third of the compile time of one pair per stage (the encoder has its own tests)
      "encoder": {"kind": "davit", "preset": "smoke", "depths": (1, 0, 0, 0)},
      "text": {"vocab_size": 64, "context_length": L, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
               "eos_token_id": EOS, "pad_token_id": PAD},
      "hidden_dim": 32, "num_queries": 8, "num_heads": 2, "dec_layers": 9, "dim_feedforward": 64, "mask_dim": 32,
      "pixel_decoder_layers": 1, "pixel_decoder_dim": 32, "pixel_decoder_heads": 2, "pixel_decoder_ffn": 64,
      "attention": "boltzmann",
  }
  values.update(overrides)
  return BoltzFormerConfig(**values)


def param_shapes(cfg: BoltzFormerConfig):
  images = jnp.zeros((1, S, S, 3), jnp.float32)
  ids = jnp.zeros((1, L), jnp.int32)
  return jax.eval_shape(lambda: BoltzFormer(cfg).init(jax.random.key(0), images, ids,
                                                      sample_rng=jax.random.key(1)))["params"]


def filled_params(cfg: BoltzFormerConfig, seed: int = 0):
  """Plain arrays with the init's tree: norm scales 1, biases 0, other weights N(0, 1/fan_in)."""
  shapes = nn.meta.unbox(param_shapes(cfg))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = str(path[-1].key)
    if name == "scale":
      value = np.ones(leaf.shape)
    elif name == "bias":
      value = np.zeros(leaf.shape)
    else:
      fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
      value = rng.normal(size=leaf.shape) / math.sqrt(fan_in)
    out.append(jnp.asarray(value, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def make_inputs():
  images = jax.random.normal(jax.random.key(11), (B, S, S, 3), jnp.float32)
  # "<bos> a b <eos> <pad>..." and "<bos> c <eos> <pad>..." (CLIP pads with the end token).
  ids = jnp.asarray([[0, 5, 6, EOS, PAD, PAD, PAD, PAD], [0, 7, EOS, PAD, PAD, PAD, PAD, PAD]], jnp.int32)
  return images, ids


def forward_fn(cfg: BoltzFormerConfig):
  model = BoltzFormer(cfg)
  return jax.jit(lambda p, x, t, r: model.apply({"params": p}, x, t, sample_rng=r, return_keep_masks=True))


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def params(cfg):
  return filled_params(cfg)


@pytest.fixture(scope="module")
def inputs():
  return make_inputs()


@pytest.fixture(scope="module")
def forwards(cfg):
  return {mode: forward_fn(cfg.with_attention(mode)) for mode in MODES}


@pytest.fixture(scope="module")
def outputs(forwards, params, inputs):
  images, ids = inputs
  key = jax.random.key(42)
  return {mode: jax.device_get(fn(params, images, ids, key)) for mode, fn in forwards.items()}


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def test_config_round_trip_and_errors(cfg):
  d = cfg.to_dict()
  assert d["encoder"] == {"kind": "davit", "preset": "smoke", "depths": [1, 0, 0, 0]} and d["text"]["width"] == 32
  assert json.loads(json.dumps(d)) == d
  back = BoltzFormerConfig.from_dict(d)
  assert back == cfg and hash(back) == hash(cfg)
  assert cfg.with_attention("threshold").attention == "threshold"
  assert cfg.with_attention("threshold").with_attention("boltzmann") == cfg
  with pytest.raises(ValueError, match="unknown keys"):
    BoltzFormerConfig.from_dict({**d, "hiden_dim": 4})
  with pytest.raises(ValueError, match="attention"):
    cfg.with_attention("sparse")
  with pytest.raises(ValueError, match="encoder kind"):
    tiny_config(encoder={"kind": "resnet"})
  # numerics flow into the towers unless they set their own
  bf = tiny_config(dtype="bfloat16", remat=True)
  assert bf.encoder_config().dtype == "bfloat16" and bf.encoder_config().remat
  assert bf.text_config().dtype == "bfloat16"
  assert tiny_config(text={**d["text"], "dtype": "float32"}, dtype="bfloat16").text_config().dtype == "float32"


def test_param_trees_identical_across_modes(cfg, params):
  ref = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(param_shapes(cfg.with_attention("full"))))
  for mode in MODES:
    tree = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(param_shapes(cfg.with_attention(mode))))
    assert tree == ref, mode
  built = jax.eval_shape(lambda k: seg_model.init_params(cfg, k), jax.random.key(0))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(built)) == ref
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == ref
  # logical axes on the parameters (boxed)
  boxed = param_shapes(cfg)
  assert isinstance(boxed["decoder_0"]["cross_attn"]["query"]["kernel"], nn.Partitioned)
  assert boxed["decoder_0"]["cross_attn"]["query"]["kernel"].names == ("embed", "heads", "head_dim")


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


def test_output_shapes(cfg, outputs):
  out = outputs["boltzmann"]
  assert isinstance(out, SegOutput)
  assert out.logits.shape == (B, S, S) and out.logits.dtype == np.float32
  assert len(out.layer_logits) == cfg.dec_layers + 1
  for lg in out.layer_logits:
    assert lg.shape == (B, cfg.num_queries, S // 4, S // 4) and lg.dtype == np.float32
  assert out.kept.shape == (B, cfg.dec_layers) and out.kept.dtype == np.float32
  # levels 1/32, 1/16, 1/8 of 64 px: 2x2, 4x4, 8x8 keys, cycling with layer % 3
  keys = [4, 16, 64] * 3
  assert [int(t) for t in out.total] == [cfg.num_heads * cfg.num_queries * n for n in keys]
  assert len(out.keep_masks) == cfg.dec_layers
  for keep, n in zip(out.keep_masks, keys):
    assert keep.shape == (B, cfg.num_heads, cfg.num_queries, n) and keep.dtype == np.bool_
  for o in outputs.values():
    assert np.all(np.isfinite(o.logits))


def test_boltzmann_matches_dense_sampled(outputs):
  """Same sample_rng -> same keep masks; the kernel's XLA path equals the release's dense masked
  attention to float32 rounding (tolerance 1e-4 absolute on logits of magnitude ~1-10)."""
  a, b = outputs["boltzmann"], outputs["dense_sampled"]
  for ka, kb in zip(a.keep_masks, b.keep_masks):
    np.testing.assert_array_equal(ka, kb)
  np.testing.assert_array_equal(a.kept, b.kept)
  for la, lb in zip(a.layer_logits, b.layer_logits):
    np.testing.assert_allclose(la, lb, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_modes_differ_and_kept_counts(outputs):
  total = np.asarray([int(t) for t in outputs["full"].total], np.float32)
  np.testing.assert_array_equal(outputs["full"].kept, np.broadcast_to(total, outputs["full"].kept.shape))
  for mode in ("boltzmann", "threshold"):
    kept = outputs[mode].kept
    assert np.all(kept <= total) and np.all(kept.sum(-1) < total.sum()), mode
    assert np.all(kept > 0)
  # Sampling un-masks background keys on top of the threshold mask of the same prediction. Layer 0
  # reads the 2x2 level: int(4 * 0.1) = 0 draws, so nothing is sampled there (the release's floor);
  # the 8x8 level gets int(64 * 0.1) = 6 draws per row.
  out = outputs["boltzmann"]
  np.testing.assert_array_equal(out.keep_masks[0], threshold_keep(out.layer_logits[0], (2, 2)))
  for layer in (2, 5, 8):
    base = threshold_keep(out.layer_logits[layer], (8, 8))
    assert np.all(out.keep_masks[layer] >= base)
    assert out.keep_masks[layer].sum() > base.sum(), layer
  # kept counts are the keep masks' sums
  for mode, out in outputs.items():
    sums = np.stack([k.reshape(B, -1).sum(-1) for k in out.keep_masks], axis=1)
    np.testing.assert_array_equal(out.kept, sums.astype(np.float32), err_msg=mode)
  # the initial prediction ignores the mode; everything after it depends on the mask
  np.testing.assert_array_equal(outputs["threshold"].layer_logits[0], outputs["boltzmann"].layer_logits[0])
  for mode in ("threshold", "full"):
    assert np.max(np.abs(outputs[mode].logits - outputs["boltzmann"].logits)) > 1e-3, mode
  assert np.max(np.abs(outputs["threshold"].logits - outputs["full"].logits)) > 1e-3


def threshold_keep(logits: np.ndarray, size: tuple[int, int], heads: int = 2, threshold: float = 0.5) -> np.ndarray:
  """Mask2Former's rule written out: sigmoid(bilinear resize of the prediction) >= 0.5, repeated over
  heads; a row with nothing kept attends everywhere. bool [B, heads, Q, h * w]."""
  b, q = logits.shape[:2]
  resized = jax.image.resize(jnp.asarray(logits), (b, q) + tuple(size), "bilinear", antialias=False)
  keep = np.asarray(jax.nn.sigmoid(resized)).reshape(b, 1, q, -1) >= threshold
  keep = keep | ~keep.any(-1, keepdims=True)
  return np.broadcast_to(keep, (b, heads, q, keep.shape[-1]))


def test_threshold_mask_is_the_release_rule(cfg, outputs):
  out = outputs["threshold"]
  sizes = [(2, 2), (4, 4), (8, 8)]
  for layer in range(cfg.dec_layers):
    np.testing.assert_array_equal(out.keep_masks[layer], threshold_keep(out.layer_logits[layer], sizes[layer % 3]))


def test_sampling_is_deterministic_in_the_rng(forwards, params, inputs, outputs):
  images, ids = inputs
  fn = forwards["dense_sampled"]
  again = jax.device_get(fn(params, images, ids, jax.random.key(42)))
  np.testing.assert_array_equal(again.logits, outputs["dense_sampled"].logits)
  other = jax.device_get(fn(params, images, ids, jax.random.key(7)))
  assert not all(np.array_equal(a, b) for a, b in zip(other.keep_masks, outputs["dense_sampled"].keep_masks))
  # full ignores the rng (and needs none)
  full = forwards["full"]
  np.testing.assert_array_equal(jax.device_get(full(params, images, ids, jax.random.key(7))).logits,
                                outputs["full"].logits)
  model = BoltzFormer(tiny_config(attention="full"))
  shapes = jax.eval_shape(lambda p: model.apply({"params": p}, images, ids, sample_rng=None), params)
  assert shapes.logits.shape == (B, S, S)
  with pytest.raises(ValueError, match="sample_rng"):
    jax.eval_shape(lambda p: BoltzFormer(tiny_config(attention="boltzmann")).apply({"params": p}, images, ids),
                   params)


def test_prompt_padding_is_not_attended(forwards, params, inputs, outputs):
  """Tokens after the first end token are padding: whatever ids they hold, the output is the same
  (the text tower is causal and the decoder's self-attention masks them as keys)."""
  images, ids = inputs
  noisy = np.asarray(ids).copy()
  noisy[0, 4:] = [9, 10, 11, 12]
  noisy[1, 3:] = [13, 14, 15, 16, 17]
  out = jax.device_get(forwards["threshold"](params, images, jnp.asarray(noisy), jax.random.key(42)))
  np.testing.assert_allclose(out.logits, outputs["threshold"].logits, atol=1e-5, rtol=1e-5)
  # ... while a real token does change it
  changed = np.asarray(ids).copy()
  changed[0, 1] = 20
  out = jax.device_get(forwards["threshold"](params, images, jnp.asarray(changed), jax.random.key(42)))
  assert np.max(np.abs(out.logits[0] - outputs["threshold"].logits[0])) > 1e-4
  mask = np.asarray(seg_model.text_key_mask(ids, PAD, EOS))
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(seg_model.text_key_mask(jnp.asarray([[3, 4, 0, 0]]), 0, 9)),
                                [[1, 1, 0, 0]])


def test_layer_temperatures_and_levels_asked_of_sampling(cfg, params, inputs, monkeypatch):
  """The decoder asks sampling for layer 0's mask with layer_id -1 (T = base_temp), then
  layer_id = i for the mask after layer i, at the level (i + 1) % 3."""
  calls = []
  original = sampling.keep_mask

  def recording(rng, scores, **kw):
    calls.append((kw["layer_id"], scores.shape[-1], kw["base_temp"], kw["mode"], kw["sample_ratio"]))
    return original(rng, scores, **kw)

  monkeypatch.setattr(sampling, "keep_mask", recording)
  images, ids = inputs
  c = tiny_config(base_temp=2.0)
  jax.eval_shape(lambda p: BoltzFormer(c).apply({"params": p}, images, ids, sample_rng=jax.random.key(0)), params)
  assert [call[0] for call in calls] == list(range(-1, cfg.dec_layers - 1))
  assert [call[1] for call in calls] == [4, 16, 64] * 3
  assert all(call[2:] == (2.0, "boltzmann", 0.1) for call in calls)
  temps = [sampling.layer_temperature(call[0], call[2]) for call in calls]
  assert temps[0] == 2.0 and temps[1] == pytest.approx(1.0) and temps[-1] == pytest.approx(2.0 / 9)


# ----------------------------------------------------------------------------
# Loss and gradients
# ----------------------------------------------------------------------------


def test_seg_loss_hand_computed():
  # p = sigmoid(logits) = [0.5, 0.75, 0.25, 0.5], g = [1, 1, 0, 0]
  l3 = math.log(3.0)
  logits = jnp.asarray([[[0.0, l3], [-l3, 0.0]], [[-5.0, -5.0], [-5.0, -5.0]]])
  masks = jnp.asarray([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], jnp.uint8)
  loss, parts = seg_loss(logits, masks)
  # Dice: 1 - (2 * 1.25 + 1) / (1.125 + 2 + 1); BCE: -(ln .5 + ln .75 + ln .75 + ln .5) / 4
  dice0 = 1.0 - 3.5 / 4.125
  bce0 = -(2 * math.log(0.5) + 2 * math.log(0.75)) / 4
  p1 = 1 / (1 + math.exp(5.0))
  dice1 = 1.0 - 1.0 / (4 * p1 * p1 + 1.0)
  bce1 = -math.log(1 - p1)
  # float32: 1 - x for x near 1 keeps ~1e-7 absolute accuracy (dice1 is 1.8e-4, so rtol would not hold)
  np.testing.assert_allclose(parts["dice_loss"], [dice0, dice1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(parts["bce"], [bce0, bce1], rtol=1e-6)
  np.testing.assert_allclose(loss, [dice0 + bce0, dice1 + bce1], rtol=1e-6, atol=1e-7)
  # hard Dice at 0.5: only the pixel with p = 0.75 is predicted -> 2 * 1 / (1 + 2); both empty -> 1
  np.testing.assert_allclose(parts["dice"], [2 / 3, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="differ in shape"):
    seg_loss(logits, masks[:, :1])


def test_seg_loss_large_logits_are_stable():
  logits = jnp.asarray([[[80.0, -80.0]]])
  loss, parts = seg_loss(logits, jnp.asarray([[[1, 0]]]))
  assert np.all(np.isfinite(loss)) and float(parts["bce"][0]) < 1e-6


# ----------------------------------------------------------------------------
# Variants (three decoder layers: one cycle over the levels)
# ----------------------------------------------------------------------------


VIT_ENCODER = {"kind": "vit", "patch_size": 16, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
               "style": "siglip", "pool": "gap"}


@pytest.fixture(scope="module")
def vit_case(inputs):
  """ViT encoder, fusion off, 3 decoder layers, batch 4 (so a 2 x 2 data x fsdp mesh shards it)."""
  c = tiny_config(encoder=VIT_ENCODER, dec_layers=3, fusion=False, attention="dense_sampled")
  p = filled_params(c, seed=1)
  images, ids = inputs
  images = jnp.concatenate([images, images[:, ::-1]])
  ids = jnp.concatenate([ids, ids[::-1]])
  out = jax.device_get(forward_fn(c)(p, images, ids, jax.random.key(0)))
  return c, p, images, ids, out


def test_vit_encoder_without_fusion(vit_case):
  """ViT encoder through its simple feature pyramid; fusion=False: the output is the bilinear
  upsampling of the mean over queries of the last prediction."""
  _, p, images, _, out = vit_case
  assert "fusion" not in p and "pyramid" in p
  b = images.shape[0]
  assert out.logits.shape == (b, S, S) and len(out.layer_logits) == 4
  mean = jnp.mean(jnp.asarray(out.layer_logits[-1]), axis=1)
  want = jax.image.resize(mean, (b, S, S), "bilinear", antialias=False)
  np.testing.assert_allclose(out.logits, want, atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(out.kept) < np.asarray([int(t) for t in out.total], np.float32))


def test_sharded_forward_matches_one_device(vit_case):
  """data x fsdp x tensor = 2 x 2 x 2 fake devices, parameters placed by their logical axes and the
  batch sharded: the same outputs as on one device (a partitioner problem once changed the pixel
  decoder's values here; float32, tolerance 1e-4)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  from mlx_med.core import sharding as sharding_lib

  c, p, images, ids, want = vit_case
  rules = sharding_lib.rules_from_config(sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), None)
  placed = jax.device_put(p, sharding_lib.tree_shardings(rules, nn.get_partition_spec(param_shapes(c)), p))
  images = jax.device_put(images, rules.named(("batch", None, None, None), images.shape))
  ids = jax.device_put(ids, rules.named(("batch", None), ids.shape))
  model = BoltzFormer(c, rules=rules)
  fn = jax.jit(lambda q, x, t, r: model.apply({"params": q}, x, t, sample_rng=r, return_keep_masks=True))
  got = jax.device_get(fn(placed, images, ids, jax.random.key(0)))
  for a, b in zip(got.keep_masks, want.keep_masks):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(got.layer_logits, want.layer_logits):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-4)


def test_bf16_forward_and_gradients(inputs):
  """bf16 activations (float32 parameters) through the Boltzmann kernel's XLA path: finite float32
  logits, finite gradients that reach every part; remat=True traces to the same gradient tree.
  (One compile serves both checks: a float32 9-layer backward costs a minute of CPU compile.)"""
  c = tiny_config(dtype="bfloat16", dec_layers=3, attention="boltzmann")
  p = filled_params(c)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  images, ids = inputs
  masks = (jnp.arange(S)[None, :, None] < 8) & (jnp.arange(S)[None, None, :] < 8)
  masks = jnp.broadcast_to(masks, (B, S, S)).astype(jnp.uint8)

  def loss_fn(params, cfg=c):
    out = BoltzFormer(cfg).apply({"params": params}, images, ids, sample_rng=jax.random.key(3), train=True)
    return jnp.mean(seg_loss(out.logits, masks)[0]), out

  (loss, out), grads = jax.device_get(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(p))
  assert out.logits.dtype == np.float32 and np.all(np.isfinite(out.logits)) and np.isfinite(loss)
  assert all(np.all(np.isfinite(lg)) for lg in out.layer_logits)
  assert np.all(out.kept > 0)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  for name in ("encoder", "text_encoder", "pixel_decoder", "decoder_0", "decoder_2", "fusion", "query_feat",
               "query_embed"):
    assert name in grads, (name, sorted(grads))
    assert sum(float(np.sum(np.abs(g))) for g in jax.tree.leaves(grads[name])) > 0, name
  shapes = jax.eval_shape(jax.grad(lambda q: loss_fn(q, dataclasses.replace(c, remat=True))[0]), p)
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, grads)


def test_bad_inputs(cfg, params):
  model = BoltzFormer(cfg.with_attention("full"))
  with pytest.raises(ValueError, match="multiple of 32"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 60, 60, 3)), jnp.zeros((1, L), jnp.int32)),
                   params)
  with pytest.raises(ValueError, match="prompt ids"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((2, S, S, 3)), jnp.zeros((1, L), jnp.int32)),
                   params)


# ----------------------------------------------------------------------------
# Against torch: the release's output fusion, F.interpolate and the sine positions
# ----------------------------------------------------------------------------


def test_output_fusion_matches_the_release_computation():
  """OutputFusion against the release's `convolution_procedure` written in torch (ConvTranspose2d
  k=4 s=2 p=1, 1x1 conv, means, F.interpolate(bilinear, align_corners=False)) with the same
  weights; float32, tolerance 1e-5."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  q, h4, channels = 5, 8, 10
  masks = jax.random.normal(jax.random.key(0), (B, q, h4, h4)) * 3
  images = jax.random.normal(jax.random.key(1), (B, 4 * h4, 4 * h4, 3))
  fusion = seg_model.OutputFusion(channels)
  p = nn.meta.unbox(fusion.init(jax.random.key(2), masks, images))["params"]
  p = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), p)  # non-zero biases
  got = np.asarray(fusion.apply({"params": p}, masks, images))

  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  # flax's transposed conv runs the kernel unflipped over the dilated input; torch's is the
  # adjoint of a convolution: the same map with the kernel flipped and stored [in, out, kh, kw].
  deconv_w = t(np.asarray(p["deconv"]["kernel"])[::-1, ::-1].transpose(2, 3, 0, 1))
  conv_w = t(np.asarray(p["conv"]["kernel"]).transpose(3, 2, 0, 1))
  image = t(images).permute(0, 3, 1, 2)
  pred = t(masks)
  image_lo = F.interpolate(image, size=(h4, h4), mode="bilinear", align_corners=False)
  image_hi = F.interpolate(image, size=(2 * h4, 2 * h4), mode="bilinear", align_corners=False)
  mean_hi = F.interpolate(pred.mean(dim=1, keepdim=True), size=(2 * h4, 2 * h4), mode="bilinear",
                          align_corners=False)
  deconv = F.conv_transpose2d(torch.cat((image_lo, pred), dim=1), deconv_w, t(p["deconv"]["bias"]), stride=2,
                              padding=1)
  out = F.conv2d(torch.cat((image_hi, deconv), dim=1), conv_w, t(p["conv"]["bias"]))
  want = torch.cat((out, mean_hi), dim=1).mean(dim=1).numpy()
  assert got.shape == want.shape == (B, 2 * h4, 2 * h4)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_resize_and_positions_match_torch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = np.array(jax.random.normal(jax.random.key(0), (2, 3, 16, 12)), np.float32)  # writable, for torch
  for size in ((4, 3), (40, 30), (5, 7)):  # down, up, and ratios that are not integers
    want = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()
    got = np.asarray(seg_model.resize_bilinear(jnp.asarray(x), size, channels_last=False))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=str(size))
    want = F.interpolate(torch.from_numpy(x), size=size, mode="nearest").numpy()
    got = np.asarray(seg_model.resize_nearest(jnp.asarray(x.transpose(0, 2, 3, 1)), size)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, want, err_msg=str(size))
  # DETR's normalised sine embedding, written out in torch as the release computes it
  h, w, dim = 3, 5, 16
  half, eps, scale = dim // 2, 1e-6, 2 * math.pi
  y = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w)
  xx = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w)
  y, xx = y / (y[-1:, :] + eps) * scale, xx / (xx[:, -1:] + eps) * scale
  dim_t = torch.arange(half, dtype=torch.float32)
  dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
  px, py = xx[:, :, None] / dim_t, y[:, :, None] / dim_t
  px = torch.stack((px[:, :, 0::2].sin(), px[:, :, 1::2].cos()), dim=3).flatten(2)
  py = torch.stack((py[:, :, 0::2].sin(), py[:, :, 1::2].cos()), dim=3).flatten(2)
  want = torch.cat((py, px), dim=2).numpy()
  np.testing.assert_allclose(np.asarray(seg_model.sine_position_embedding(h, w, dim)), want, atol=1e-6)
