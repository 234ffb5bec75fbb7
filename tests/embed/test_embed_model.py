"""The two-tower model and its Task: shapes under jit, the loss trains, exact gradient
accumulation of the batch-level loss, 8-device sharding equal to one device (UniCL and the
chunked sigmoid loss), and a Hugging Face CLIP directory loaded as an `Embedder` gives the
embeddings transformers gives."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_clip import tiny_clip_dir

from mlx_med.core import params as params_lib
from mlx_med.core import sharding
from mlx_med.core.train_step import make_grad_fn
from mlx_med.embed import losses
from mlx_med.embed.model import Embedder, EmbedTask, TwoTower, TwoTowerConfig
from mlx_med.vision.text import TextConfig
from mlx_med.vision.vit import ViTConfig

IMAGE, VOCAB, CONTEXT, EOS = 16, 64, 8, 63


def tiny_config(**kw) -> TwoTowerConfig:
  image = ViTConfig(image_size=IMAGE, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
  text = TextConfig(vocab_size=VOCAB, context_length=CONTEXT, width=32, depth=1, num_heads=2, mlp_dim=64,
                    eos_token_id=EOS, pad_token_id=EOS)
  return TwoTowerConfig(image=image, text=text, embed_dim=16, **kw)


def make_batch(n=16, seed=0, num_labels=3):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, EOS, (n, CONTEXT)).astype(np.int32)
  lengths = rng.integers(2, CONTEXT, n)
  for i, length in enumerate(lengths):
    ids[i, length:] = EOS  # the first EOS is the pooled position
  labels = (rng.random((n, num_labels)) < 0.3).astype(np.int32)
  return {"images": rng.normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32), "text_ids": ids, "labels": labels}


@pytest.fixture(scope="module")
def unicl():
  task = EmbedTask(tiny_config(), loss="unicl", num_labels=3)
  return task, params_lib.init_params(task, jax.random.key(0))


def test_shapes_under_jit(unicl):
  task, params = unicl
  batch = jax.tree.map(jnp.asarray, make_batch(8))
  feats = jax.jit(lambda p, b: task.features(p, b, jax.random.key(0), train=False))(params, batch)
  chex.assert_shape([feats["image"], feats["text"]], (8, 16))
  np.testing.assert_allclose(np.linalg.norm(feats["image"], axis=-1), 1.0, rtol=1e-5)
  out = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(0)))(params, batch)
  assert out.loss_sum.shape == () and float(out.weight) == 8.0 and np.isfinite(float(out.loss_sum))
  # The loss is UniCL of the normalised embeddings at the initial temperature log(1/0.07).
  expected = losses.unicl_loss(feats["image"], feats["text"], batch["labels"], np.log(1 / 0.07))
  np.testing.assert_allclose(float(out.loss_sum) / 8, float(expected), rtol=1e-5)
  assert set(task.batch_axes) == {"images", "text_ids", "labels"}
  assert task.throughput_unit == ("images", 1) and task.decomposable is False
  assert task.train_flops_per_example and task.train_flops_per_example > 0
  ev = jax.jit(lambda p, b: task.eval_metrics(p, b))(params, batch)
  assert 0 <= float(ev.metrics["i2t_top1"]) <= 8


def test_logit_scale_is_clamped_at_100_for_unicl_only():
  params = {"logit_scale": jnp.float32(6.0)}
  assert float(EmbedTask(tiny_config(), loss="unicl").scale(params)) == pytest.approx(np.log(100.0), rel=1e-6)
  assert float(EmbedTask(tiny_config(), loss="siglip").scale(params)) == 6.0


def test_loss_decreases_on_a_tiny_batch(unicl):
  task, params = unicl
  batch = jax.tree.map(jnp.asarray, make_batch(16))
  opt = optax.adam(3e-3)
  grad_fn = make_grad_fn(task, 1)

  @jax.jit
  def step(p, s):
    out, g = grad_fn(p, batch, jax.random.key(0))
    u, s = opt.update(jax.tree.map(lambda x: x / out.weight, g), s, p)
    return optax.apply_updates(p, u), s, out.loss_sum / out.weight

  p, s = params, opt.init(params)
  first = None
  for _ in range(30):
    p, s, loss = step(p, s)
    first = float(loss) if first is None else first
  assert float(loss) < 0.5 * first, (first, float(loss))


@pytest.mark.parametrize("loss", ["unicl", "siglip"])
def test_grad_accumulation_is_exact(loss):
  task = EmbedTask(tiny_config(), loss=loss, num_labels=3)
  params = params_lib.init_params(task, jax.random.key(1))
  batch = make_batch(16, seed=1)
  rng = jax.random.key(2)
  full_out, full = jax.jit(make_grad_fn(task, 1))(params, batch, rng)
  acc_out, acc = jax.jit(make_grad_fn(task, 4))(params, batch, rng)
  np.testing.assert_allclose(acc_out.loss_sum, full_out.loss_sum, rtol=1e-6)
  assert_grads_close(acc, full)
  # Summing the losses of the micro-batches would be another objective: the check is not vacuous.
  quarters = sum(float(task.loss(params, jax.tree.map(lambda x: x[i::4], batch), rng).loss_sum) for i in range(4))
  assert abs(quarters - float(full_out.loss_sum)) > 1e-2 * abs(float(full_out.loss_sum))


def assert_grads_close(got, want, rel=2e-5):
  """Per leaf: max |got - want| <= rel * the leaf's scale, float32 reduction-order error (the
  model computes in float32, so float64 parameters cannot tighten this). A leaf's scale is its
  max |want|, floored at 1% of the largest gradient: some gradients are zero in exact arithmetic
  (attention key biases: softmax ignores a constant shift) and are pure rounding noise here."""
  leaves = [np.asarray(w, np.float64) for w in jax.tree.leaves(want)]
  top = max(float(np.abs(w).max()) for w in leaves)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], leaves):
    g = np.asarray(g, np.float64)
    scale = max(float(np.abs(w).max()), 1e-2 * top)
    assert float(np.abs(g - w).max()) <= rel * scale, (jax.tree_util.keystr(path), float(np.abs(g - w).max()), scale)


@pytest.mark.parametrize("loss,chunked", [("unicl", False), ("siglip", True)])
def test_eight_devices_equal_one(loss, chunked):
  assert jax.device_count() == 8
  task = EmbedTask(tiny_config(), loss=loss, siglip_chunked=chunked, num_labels=3)
  batch = make_batch(16, seed=3)
  rng = jax.random.key(4)
  params = params_lib.init_params(task, jax.random.key(5))
  one_out, one_grads = jax.jit(make_grad_fn(task, 1))(params, batch, rng)

  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  rules = sharding.ShardingRules(mesh)
  p_shard = params_lib.param_shardings(task, rules)
  b_shard = {k: rules.named(v) for k, v in task.batch_axes.items()}
  sharded_params = jax.device_put(params, p_shard)
  fn = jax.jit(make_grad_fn(task, 1, rules), in_shardings=(p_shard, b_shard, None), out_shardings=(None, p_shard))
  out, grads = fn(sharded_params, jax.device_put(batch, b_shard), rng)
  # The batch really is split over the 8 devices, and the chunked loss really ran.
  assert len(jax.device_put(batch, b_shard)["images"].sharding.device_set) == 8
  np.testing.assert_allclose(out.loss_sum, one_out.loss_sum, rtol=1e-5)
  assert_grads_close(jax.device_get(grads), jax.device_get(one_grads))


def test_chunked_siglip_runs_through_shard_map():
  task = EmbedTask(tiny_config(), loss="siglip", siglip_chunked=True)
  rules = sharding.ShardingRules(sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}))
  assert task._chunk_axes(rules, 16) == "data"
  assert task._chunk_axes(None, 16) is None
  params = params_lib.init_params(task, jax.random.key(0))
  text = str(jax.jit(lambda p, b: task.loss(p, b, jax.random.key(0), rules=rules)).lower(
      params, make_batch(16)).as_text())
  assert "collective_permute" in text or "ppermute" in text


# ------------------------------------------------------------------------------- Hugging Face CLIP


def test_embedder_loads_a_hugging_face_clip_dir(tmp_path):
  import torch

  model = tiny_clip_dir(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip"
  emb = Embedder.load(tmp_path, batch_size=4)
  assert emb.embed_dim == 24 and emb.logit_scale == pytest.approx(3.1, rel=1e-6)
  images = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
  texts = ["a chest x-ray with a nodule", "skin photograph", "normal study", "melanoma", "a nodule"]
  ours_img, ours_txt = emb.embed_images(images), emb.embed_texts(texts)
  with torch.no_grad():
    ref_img = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(emb.tokenizer.encode(texts).astype(np.int64))
    ref_txt = model.get_text_features(input_ids=ids)
  ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
  ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()
  ref_img /= np.linalg.norm(ref_img, axis=-1, keepdims=True)
  ref_txt /= np.linalg.norm(ref_txt, axis=-1, keepdims=True)
  np.testing.assert_allclose(ours_img, ref_img, atol=1e-5)
  np.testing.assert_allclose(ours_txt, ref_txt, atol=1e-5)
  # Zero-shot logits as CLIP computes them.
  np.testing.assert_allclose(emb.similarity(ours_img, ours_txt), np.exp(3.1) * ref_img @ ref_txt.T, rtol=1e-4,
                             atol=1e-4)


def test_embedder_refuses_a_directory_it_cannot_read(tmp_path):
  with pytest.raises(ValueError, match="neither a training run"):
    Embedder.load(tmp_path)
  with pytest.raises(ValueError, match="not a directory"):
    Embedder.load(tmp_path / "missing")


def test_two_tower_config_round_trips_through_json():
  cfg = tiny_config(logit_bias=True)
  again = TwoTowerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
  assert again == cfg
  assert TwoTower(again) is not None


# ----------------------------------------------------------------------------- memory estimate
#
# `EmbedTask.activation_bytes_per_example` against independent references, per example (the
# difference between batch 12 and batch 4, which cancels everything that does not grow with the
# batch: parameters, gradients, optimizer temporaries):
# * without remat, XLA's compiled memory analysis of the jitted gradient (temp bytes): the
#   estimate must lie within a factor of 1.5 of it (measured 1.2x for the ViT pair, 1.0x for the
#   DaViT pair);
# * with remat, what autodiff keeps for the backward pass (the residuals of `jax.vjp`, from
#   abstract shapes): each extra block adds its input only. XLA:CPU's memory analysis cannot be
#   the reference here: its scheduler places the recomputation early in an unrolled loop, so its
#   temp bytes are the same with and without remat (measured equal on these configs).


def _memory_config(image_kind: str, remat: bool = False, depth: int = 2) -> TwoTowerConfig:
  from mlx_med.vision.davit import DaViTConfig
  text = TextConfig(vocab_size=VOCAB, context_length=16, width=64, depth=2, num_heads=4, mlp_dim=256,
                    eos_token_id=EOS, pad_token_id=EOS, remat=remat)
  if image_kind == "vit":
    image = ViTConfig(image_size=32, patch_size=4, width=64, depth=depth, num_heads=4, mlp_dim=256, remat=remat)
  else:
    image = DaViTConfig(dims=(32, 64), depths=(1, depth - 1), heads=(2, 4), window_size=4, patch_sizes=(7, 3),
                        strides=(4, 2), image_size=48, channel_attention="v2", remat=remat)
  return TwoTowerConfig(image=image, text=text, embed_dim=32)


def _abstract(task: EmbedTask, n: int):
  import flax.linen as nn
  params = jax.eval_shape(lambda: nn.unbox(task.init(jax.random.key(0))))
  c = task.cfg
  batch = {"images": jax.ShapeDtypeStruct((n, c.image_size, c.image_size, 3), jnp.float32),
           "text_ids": jax.ShapeDtypeStruct((n, c.context_length), jnp.int32),
           "labels": jax.ShapeDtypeStruct((n, 1), jnp.int32)}
  return params, batch


def _xla_temp_per_example(task: EmbedTask) -> float:
  temps = []
  for n in (4, 12):
    params, batch = _abstract(task, n)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    compiled = jax.jit(make_grad_fn(task)).lower(params, batch, rng).compile()
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
  return (temps[1] - temps[0]) / 8


def _residuals_per_example(task: EmbedTask) -> float:
  def vjp_of_loss(params, batch):
    return jax.vjp(lambda p: task.loss(p, batch, jax.random.key(0)).loss_sum, params)[1]

  sizes = []
  for n in (4, 8):
    vjp_fn = jax.eval_shape(vjp_of_loss, *_abstract(task, n))
    sizes.append(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn)))
  return (sizes[1] - sizes[0]) / 4


@pytest.mark.parametrize("image_kind", ["vit", "davit"])
def test_activation_estimate_is_within_1_5x_of_xla_memory_analysis(image_kind):
  task = EmbedTask(_memory_config(image_kind))
  estimate, xla = task.activation_bytes_per_example(), _xla_temp_per_example(task)
  assert xla > 0
  assert 1 / 1.5 <= estimate / xla <= 1.5, (image_kind, estimate, xla)


@pytest.mark.parametrize("image_kind", ["vit", "davit"])
def test_remat_estimate_grows_by_what_autodiff_keeps_per_block(image_kind):
  def per_block(fn, remat):
    a, b = (fn(EmbedTask(_memory_config(image_kind, remat, depth))) for depth in (2, 4))
    return (b - a) / 2

  kept = per_block(_residuals_per_example, True)
  estimated = per_block(lambda t: t.activation_bytes_per_example(), True)
  assert 1 / 1.5 <= estimated / kept <= 1.5, (image_kind, estimated, kept)
  # remat keeps several times less per block than the full residuals
  assert per_block(_residuals_per_example, False) > 5 * kept
  assert per_block(lambda t: t.activation_bytes_per_example(), False) > 5 * estimated


def test_memory_check_refuses_a_paper_scale_batch_that_cannot_fit(monkeypatch):
  from configs.embed.medimageinsight import get_config
  from mlx_med.core import memory as memory_lib
  from mlx_med.core import trainer
  from mlx_med.embed.model import two_tower_config

  # One H200: 141 GB, one device (the test process may see 8 CPU devices).
  monkeypatch.setattr(memory_lib, "device_memory", lambda device=None: (141e9, "NVIDIA H200 (test)"))

  def one_device_mesh(config):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return mesh, sharding.rules_from_config(mesh, config.mesh.get("rules", ()))

  monkeypatch.setattr(trainer, "mesh_from_config", one_device_mesh)
  config = get_config("paper")
  config.model.text.update(vocab_size=49408, eos_token_id=49407, pad_token_id=49407)
  task = EmbedTask(two_tower_config(config.model), num_labels=8)
  per_example = task.activation_bytes_per_example()
  assert 0.3e9 < per_example < 1.5e9  # remat on: 0.69 GB at 480 px
  config.train.batch_size = 128  # bench/embed_train.py --gpu
  est = trainer.check_memory(config, task)
  assert est.examples_per_device == 128 and est.total < 0.9 * 141e9
  config.train.batch_size = 1024  # the config's global batch: for many devices, not one
  with pytest.raises(memory_lib.MemoryBudgetError, match="batch_size=1024"):
    trainer.check_memory(config, task)
  config.train.batch_size = 128
  config.model.image.remat = config.model.text.remat = False
  no_remat = EmbedTask(two_tower_config(config.model), num_labels=8)
  assert no_remat.activation_bytes_per_example() > 2.5 * per_example
  with pytest.raises(memory_lib.MemoryBudgetError):
    trainer.check_memory(config, no_remat)
