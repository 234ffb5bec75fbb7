"""The trainer is model-agnostic: a small conv classifier on image batches, with a
non-decomposable (batch-level contrastive) loss, trains, evaluates, checkpoints,
resumes bitwise and shards on the fake-device mesh through the same loop as the
decoder, and accumulates gradients exactly."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.core import config as config_lib
from mlx_med.core import optim, params as params_lib, sharding, trainer
from mlx_med.core.task import LossOutput, Task
from mlx_med.core.train_step import init_train_state, make_grad_fn, make_train_step

IMAGE, CLASSES = 12, 4


def _logical(init, axes):
  return nn.with_logical_partitioning(init, axes)


class SmallConvNet(nn.Module):
  width: int = 16
  embed_dim: int = 32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(self.width, (3, 3), strides=2, kernel_init=_logical(nn.initializers.lecun_normal(),
                                                                   (None, None, None, "mlp")))(images)
    x = nn.gelu(x)
    x = nn.Conv(self.width, (3, 3), strides=2, kernel_init=_logical(nn.initializers.lecun_normal(),
                                                                   (None, None, "mlp", None)))(x)
    x = nn.gelu(x).mean(axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    emb = nn.Dense(self.embed_dim, kernel_init=_logical(nn.initializers.lecun_normal(), ("mlp", "embed")))(x)
    logits = nn.Dense(CLASSES, kernel_init=_logical(nn.initializers.lecun_normal(), ("embed", None)))(emb)
    return emb, logits


def supervised_contrastive(emb, labels, logit_scale):
  """Per-row loss over the whole batch: examples sharing a label are positives (UniCL-style)."""
  z = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  sim = jnp.exp(logit_scale) * z @ z.T
  b = emb.shape[0]
  eye = jnp.eye(b, dtype=bool)
  sim = jnp.where(eye, -1e9, sim)
  log_p = jax.nn.log_softmax(sim, axis=-1)
  pos = (labels[:, None] == labels[None, :]) & ~eye
  n_pos = pos.sum(-1)
  per_row = -jnp.where(pos, log_p, 0.0).sum(-1) / jnp.maximum(n_pos, 1)
  has_pos = (n_pos > 0).astype(jnp.float32)
  return per_row * has_pos, has_pos


def supervised_contrastive_numpy(emb, labels, logit_scale):
  """Independent float64 reference, one row at a time."""
  emb = np.asarray(emb, np.float64)
  z = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  sim = np.exp(logit_scale) * z @ z.T
  total, count = 0.0, 0
  for i in range(len(z)):
    others = [j for j in range(len(z)) if j != i]
    log_norm = np.log(np.sum(np.exp(sim[i, others])))
    positives = [j for j in others if labels[j] == labels[i]]
    if positives:
      total += -np.mean([sim[i, j] - log_norm for j in positives])
      count += 1
  return total, count


class ConvClassifierTask(Task):
  """Images [B, H, W, 1] and labels [B]; loss "xent" (decomposable) or "contrastive" (batch-level)."""

  def __init__(self, loss_kind: str = "contrastive", dropout: float = 0.0, feature_accumulation: bool = True):
    self.model = SmallConvNet(dropout=dropout)
    self.loss_kind = loss_kind
    self.decomposable = loss_kind == "xent"
    self._feature_accumulation = feature_accumulation

  batch_axes = {"image": ("batch", None, None, None), "label": ("batch",)}
  train_flops_per_example = 1e5  # any figure: the trainer reports MFU only where a peak is known

  def init(self, rng):
    params = self.model.init(rng, jnp.zeros((1, IMAGE, IMAGE, 1)), train=False)["params"]
    return {"net": params, "logit_scale": jnp.asarray(np.log(10.0), jnp.float32)}

  def _forward(self, params, batch, rng, train):
    return self.model.apply({"params": params["net"]}, batch["image"], train, rngs={"dropout": rng})

  def loss(self, params, batch, rng, *, rules=None, train=True):
    emb, logits = self._forward(params, batch, rng, train)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    if self.loss_kind == "xent":
      import optax
      xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      return LossOutput(xent.sum(), jnp.float32(xent.shape[0]), {"accuracy": correct.sum()})
    return self.loss_on_features(params, {"emb": emb, "correct": correct}, batch)

  def features(self, params, batch, rng, *, rules=None, train=True):
    emb, logits = self._forward(params, batch, rng, train)
    return {"emb": emb, "correct": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}

  def loss_on_features(self, params, features, batch, *, rules=None):
    per_row, has_pos = supervised_contrastive(features["emb"], batch["label"], params["logit_scale"])
    # The classifier head is not trained by this loss; accuracy is reported per example.
    n = has_pos.sum()
    return LossOutput(per_row.sum(), n, {"accuracy": features["correct"].sum() * n / features["correct"].shape[0]})

  @property
  def supports_feature_accumulation(self):
    return self._feature_accumulation


class ImageSource:
  """Random-access source: class c is a bright 4x4 square in quadrant c, plus noise."""

  def __init__(self, n: int, seed: int):
    rng = np.random.default_rng(seed)
    self.labels = rng.integers(0, CLASSES, n).astype(np.int32)
    self.images = rng.normal(0, 0.3, (n, IMAGE, IMAGE, 1)).astype(np.float32)
    for i, c in enumerate(self.labels):
      r, col = divmod(int(c), 2)
      self.images[i, r * 6 + 1:r * 6 + 5, col * 6 + 1:col * 6 + 5] += 1.0

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def _batch(n=16, seed=0):
  src = ImageSource(n, seed)
  return {"image": src.images, "label": src.labels}


def _config(**train):
  config = config_lib.ml_collections.ConfigDict()
  config.seed = 0
  config.peak_flops_per_device = 0.0
  config.train = config_lib.default_train_config()
  config.train.update({**dict(steps=10, batch_size=16, lr=3e-3, warmup_steps=2, log_every=2, eval_every=5,
                              eval_batches=2, ckpt_every=4, weight_decay=0.0, async_checkpointing=False), **train})
  config.mesh = config_lib.default_mesh_config()
  return config


class ContrastiveLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 5)).astype(np.float32)
    labels = np.array([0, 1, 0, 2, 1, 3, 0, 2], np.int32)  # label 3 has no positive: weight 0
    per_row, has_pos = self.variant(supervised_contrastive)(emb, labels, np.float32(np.log(5.0)))
    chex.assert_shape((per_row, has_pos), (8,))
    total, count = supervised_contrastive_numpy(emb, labels, np.log(5.0))
    np.testing.assert_allclose(float(per_row.sum()), total, rtol=1e-5)
    assert float(has_pos.sum()) == count == 7


def test_naive_accumulation_is_refused_and_cached_features_are_exact():
  task = ConvClassifierTask("contrastive")
  params = params_lib.init_params(task, jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, _batch())
  rng = jax.random.key(1)
  # In float64 the cached-feature gradients equal the full-batch ones to rounding: the method is exact.
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    b64 = {"image": np.asarray(batch["image"], np.float64), "label": np.asarray(batch["label"])}
    full64 = make_grad_fn(task, 1)(p64, b64, rng)
    acc64 = make_grad_fn(task, 4)(p64, b64, rng)
    chex.assert_trees_all_close(acc64, full64, rtol=1e-10, atol=1e-12)
  # In float32 (jitted, as the trainer runs it) up to reduction-order error: the gradient terms
  # are O(1-10) before they cancel, so elements agree to ~1e-6 absolute.
  full_out, full_grads = jax.jit(make_grad_fn(task, 1))(params, batch, rng)
  acc_out, acc_grads = jax.jit(make_grad_fn(task, 4))(params, batch, rng)
  np.testing.assert_allclose(acc_out.loss_sum, full_out.loss_sum, rtol=1e-6)
  np.testing.assert_allclose(acc_out.weight, full_out.weight)
  chex.assert_trees_all_close(acc_grads, full_grads, rtol=1e-5, atol=1e-5)
  # Summing per-micro-batch losses would be a different objective: the test above is not vacuous.
  quarters = [task.loss(params, jax.tree.map(lambda x: x[i::4], batch), rng).loss_sum for i in range(4)]
  assert abs(float(sum(quarters)) - float(full_out.loss_sum)) > 1e-2
  with pytest.raises(ValueError, match="does not decompose"):
    make_grad_fn(ConvClassifierTask("contrastive", feature_accumulation=False), 2)


def test_dropout_rng_reaches_the_loss():
  task = ConvClassifierTask("xent", dropout=0.5)
  opt, sched = optim.make_optimizer(_config().train)
  params = params_lib.init_params(task, jax.random.key(0))
  step = jax.jit(make_train_step(task, opt, sched))
  _, m_a = step(init_train_state(params, opt, seed=0), _batch())
  _, m_b = step(init_train_state(params, opt, seed=0), _batch())
  _, m_c = step(init_train_state(params, opt, seed=1), _batch())
  assert float(m_a["loss"]) == float(m_b["loss"])  # the same key: the same dropout mask
  assert float(m_a["loss"]) != float(m_c["loss"])  # another key: another mask


@pytest.mark.parametrize("loss_kind", ["contrastive", "xent"])
def test_one_sharded_step_matches_single_device(loss_kind):
  task = ConvClassifierTask(loss_kind)
  train_cfg = _config(warmup_steps=0, eps=1e-5).train  # eps: see tests/core/test_sharding.py
  optimizer, schedule = optim.make_optimizer(train_cfg)

  def run(mesh_shape, devices):
    rules = sharding.ShardingRules(sharding.make_mesh(mesh_shape, devices))
    _, state_sh = trainer.state_shardings(task, optimizer, rules, seed=0, ema=True)
    b_sh = trainer.batch_shardings(task, rules)
    state = jax.jit(lambda: init_train_state(params_lib.init_params(task, jax.random.key(0)), optimizer, 0, True),
                    out_shardings=state_sh)()
    step = jax.jit(make_train_step(task, optimizer, schedule, 2, rules, ema_decay=0.5),
                   in_shardings=(state_sh, b_sh), out_shardings=(state_sh, None))
    state, metrics = step(state, {k: jax.device_put(v, b_sh[k]) for k, v in _batch().items()})
    return state, metrics

  single, m1 = run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  sharded, m8 = run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  kernel = sharded["params"]["net"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=0, atol=1e-5)
  chex.assert_trees_all_close(jax.device_get(sharded), jax.device_get(single), rtol=0, atol=1e-5)


class _Interrupted(Exception):
  pass


def test_trains_evaluates_and_resumes_bitwise(tmp_path):
  task = ConvClassifierTask("contrastive", dropout=0.1)
  train_src, eval_src = ImageSource(256, seed=1), ImageSource(64, seed=2)
  config = _config(grad_accum=2, ema_decay=0.9)

  straight = trainer.train(config, str(tmp_path / "straight"), task, train_src, eval_src, progress=False)
  assert straight.final_step == 10
  rows = [r for r in trainer.metrics_lib.read_metrics(str(tmp_path / "straight" / "metrics.jsonl")) if "loss" in r]
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert {"examples_per_s", "accuracy", "grad_norm", "lr"} <= set(rows[0])
  assert set(straight.eval_metrics) == {"eval_loss", "eval_accuracy"}
  assert (tmp_path / "straight" / "loss_curve.png").exists()

  def interrupt(trainer_, step):
    if step == 6:  # checkpoint 4 is durable; steps 5-6 are lost
      raise _Interrupted

  workdir = str(tmp_path / "interrupted")
  with pytest.raises(_Interrupted):
    trainer.train(config, workdir, task, train_src, eval_src, progress=False, callbacks=[interrupt])
  resumed = trainer.Trainer(config, workdir, task, train_src, eval_src, progress=False).setup()
  assert resumed.start_step == 4
  result = resumed.run()
  assert result.final_step == 10
  chex.assert_trees_all_equal(jax.device_get(result.state), jax.device_get(straight.state))


def test_step_api_feeds_own_batches(tmp_path):
  """An RL-style loop reuses setup and step with batches it makes itself."""
  task = ConvClassifierTask("xent")
  t = trainer.Trainer(_config(), str(tmp_path), task).setup()
  before = jax.device_get(t.state["params"])
  metrics = t.step(_batch())
  assert int(t.state["step"]) == 1 and bool(metrics["finite"])
  chex.assert_trees_all_equal_structs(jax.device_get(t.state["params"]), before)
  with pytest.raises(ValueError, match="unknown: \\['mask'\\]"):
    t.step(dict(_batch(), mask=np.zeros((16, 2), np.float32)))
  with pytest.raises(ValueError, match="needs a train_source"):
    t.run()
