"""The trainer is model-agnostic: a small conv classifier on image batches, with a
non-decomposable (batch-level contrastive) loss, trains, evaluates, checkpoints,
resumes bitwise and shards on the fake-device mesh through the same loop as the
decoder, and accumulates gradients exactly."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conv_task import ConvClassifierTask, ImageSource, image_batch, image_config, supervised_contrastive, \
    supervised_contrastive_numpy
from mlx_med.core import optim, params as params_lib, sharding, trainer
from mlx_med.core.train_step import init_train_state, make_grad_fn, make_train_step


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
  batch = jax.tree.map(jnp.asarray, image_batch())
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
  opt, sched = optim.make_optimizer(image_config().train)
  params = params_lib.init_params(task, jax.random.key(0))
  step = jax.jit(make_train_step(task, opt, sched))
  _, m_a = step(init_train_state(params, opt, seed=0), image_batch())
  _, m_b = step(init_train_state(params, opt, seed=0), image_batch())
  _, m_c = step(init_train_state(params, opt, seed=1), image_batch())
  assert float(m_a["loss"]) == float(m_b["loss"])  # the same key: the same dropout mask
  assert float(m_a["loss"]) != float(m_c["loss"])  # another key: another mask


@pytest.mark.parametrize("loss_kind", ["contrastive", "xent"])
def test_one_sharded_step_matches_single_device(loss_kind):
  task = ConvClassifierTask(loss_kind)
  train_cfg = image_config(warmup_steps=0, eps=1e-5).train  # eps: see tests/core/test_sharding.py
  optimizer, schedule = optim.make_optimizer(train_cfg)

  def run(mesh_shape, devices):
    rules = sharding.ShardingRules(sharding.make_mesh(mesh_shape, devices))
    _, state_sh = trainer.state_shardings(task, optimizer, rules, seed=0, ema=True)
    b_sh = trainer.batch_shardings(task, rules)
    state = jax.jit(lambda: init_train_state(params_lib.init_params(task, jax.random.key(0)), optimizer, 0, True),
                    out_shardings=state_sh)()
    step = jax.jit(make_train_step(task, optimizer, schedule, 2, rules, ema_decay=0.5),
                   in_shardings=(state_sh, b_sh), out_shardings=(state_sh, None))
    state, metrics = step(state, {k: jax.device_put(v, b_sh[k]) for k, v in image_batch().items()})
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
  config = image_config(grad_accum=2, ema_decay=0.9)

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
  t = trainer.Trainer(image_config(), str(tmp_path), task).setup()
  before = jax.device_get(t.state["params"])
  metrics = t.step(image_batch())
  assert int(t.state["step"]) == 1 and bool(metrics["finite"])
  chex.assert_trees_all_equal_structs(jax.device_get(t.state["params"]), before)
  with pytest.raises(ValueError, match="unknown: \\['mask'\\]"):
    t.step(dict(image_batch(), mask=np.zeros((16, 2), np.float32)))
  with pytest.raises(ValueError, match="needs a train_source"):
    t.run()
