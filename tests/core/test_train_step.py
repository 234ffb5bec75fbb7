"""Train-step semantics: accumulation equals one big batch (also without resharding), NaN guard,
EMA, parameter groups, schedules, FLOPs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.core import config as config_lib
from mlx_med.core import flops, optim, params as params_lib, sharding, trainer
from mlx_med.core.lm_task import DecoderLMTask, token_cross_entropy
from mlx_med.core.train_step import init_train_state, make_train_step
from mlx_med.core.transformer import DecoderConfig
from tiny import TINY

CFG = TINY
TASK = DecoderLMTask(CFG, seq_len=12)


def _batch(b=4, t=12, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.float32)
  mask[1, 7:] = 0  # uneven token counts per row: accumulation must weight by tokens
  seg = (mask > 0).astype(np.int32)
  return {"inputs": x, "targets": np.roll(x, -1, 1), "segment_ids": seg,
          "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32), "loss_mask": mask}


def _train_cfg(**kw):
  cfg = config_lib.default_train_config()
  cfg.update({"warmup_steps": 0, "eps": 1e-5, **kw})
  return cfg


@pytest.fixture(scope="module")
def setup():
  """One optimizer, initial params and compiled single-batch step shared by the tests (compiles are slow)."""
  opt, sched = optim.make_optimizer(_train_cfg())
  params = params_lib.init_params(TASK, jax.random.key(0))
  return opt, sched, params, jax.jit(make_train_step(TASK, opt, sched, 1))


def test_grad_accumulation_equals_full_batch(setup):
  opt, sched, params, step1 = setup
  s1, m1 = step1(init_train_state(params, opt, 0), _batch())
  s2, m2 = jax.jit(make_train_step(TASK, opt, sched, 2))(init_train_state(params, opt, 0), _batch())
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  chex.assert_trees_all_close(s1["params"], s2["params"], atol=1e-6, rtol=0)


def test_nan_guard_skips_update_and_counts(setup):
  opt, sched, params, step = setup
  state = init_train_state(params, opt, 0)
  bad = _batch()
  bad["loss_mask"] = bad["loss_mask"] * np.float32(np.nan)
  new_state, metrics = step(state, bad)
  assert not bool(metrics["finite"])
  assert int(new_state["nan_skips"]) == 1 and int(new_state["nan_streak"]) == 1
  chex.assert_trees_all_equal(new_state["params"], params)
  new_state, metrics = step(new_state, _batch())
  assert bool(metrics["finite"]) and int(new_state["nan_streak"]) == 0 and int(new_state["nan_skips"]) == 1
  chex.assert_tree_all_finite(new_state["params"])
  with pytest.raises(trainer.NonFiniteLossError, match="consecutive steps"):
    trainer.check_finite({"nan_streak": np.int32(3)}, 3)


def test_batch_keys_must_match_the_task(setup):
  opt, sched, params, step = setup
  extra = dict(_batch(), image=np.zeros((4, 2), np.float32))
  with pytest.raises(ValueError, match="do not match"):
    jax.eval_shape(make_train_step(TASK, opt, sched, 1), init_train_state(params, opt, 0), extra)
  missing = {k: v for k, v in _batch().items() if k != "loss_mask"}
  with pytest.raises(ValueError, match="do not match"):
    jax.eval_shape(make_train_step(TASK, opt, sched, 1), init_train_state(params, opt, 0), missing)
  rules = sharding.ShardingRules(sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  from mlx_med.core import data
  with pytest.raises(ValueError, match=r"unknown: \['image'\]"):
    data.to_global(extra, trainer.batch_shardings(TASK, rules))


def test_ema_tracks_params_and_is_skipped_on_nan(setup):
  opt, sched, params, _ = setup
  step = jax.jit(make_train_step(TASK, opt, sched, 1, ema_decay=0.9))
  state = init_train_state(params, opt, 0, ema=True)
  new, _ = step(state, _batch())
  expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, params, new["params"])
  chex.assert_trees_all_close(new["ema_params"], expected, atol=1e-7, rtol=0)
  bad = _batch()
  bad["loss_mask"] = bad["loss_mask"] * np.float32(np.nan)
  after_bad, _ = step(new, bad)
  chex.assert_trees_all_equal(after_bad["ema_params"], new["ema_params"])


def test_param_groups_scale_lr_and_weight_decay():
  params = {"body": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  grads = jax.tree.map(jnp.ones_like, params)
  groups = config_lib.ml_collections.ConfigDict({"head": {"pattern": "^head/", "lr_scale": 10.0, "weight_decay": 0.0}})
  cfg = _train_cfg(schedule="constant", lr=0.01, weight_decay=0.5, grad_clip=0.0, param_groups=groups)
  opt, _ = optim.make_optimizer(cfg)
  updates, _ = opt.update(grads, opt.init(params), params)
  # Adam's first step is -lr * g / (|g| + eps) with g = 1; decoupled decay adds -lr * wd * p
  # on matrices only (the default group's 0.5; the head group sets 0).
  adam = 1.0 / (1.0 + 1e-5)
  np.testing.assert_allclose(updates["body"]["kernel"], -0.01 * (adam + 0.5), rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * adam, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"], -0.1 * adam, rtol=1e-6)
  bad = config_lib.ml_collections.ConfigDict({"typo": {"pattern": "^nothing/"}})
  opt, _ = optim.make_optimizer(_train_cfg(param_groups=bad))
  with pytest.raises(ValueError, match="matches no parameter"):
    opt.init(params)


def test_cross_entropy_against_hand_computation():
  logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
  targets = jnp.array([[0, 2]])
  mask = jnp.array([[1.0, 0.0]])
  total, count = token_cross_entropy(logits, targets, mask)
  expected = -(2.0 - np.log(np.exp(2.0) + 1.0 + np.exp(-1.0)))
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert float(count) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
  cfg = _train_cfg(schedule=schedule, warmup_steps=10, steps=100, lr=1.0, min_lr_ratio=0.1, decay_fraction=0.2)
  sched = optim.make_schedule(cfg)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
  if schedule == "wsd":
    assert abs(float(sched(79)) - 1.0) < 1e-6 and abs(float(sched(100)) - 0.1) < 1e-6
  if schedule == "cosine":
    assert abs(float(sched(100)) - 0.1) < 1e-6
  with pytest.raises(ValueError, match="choose cosine"):
    optim.make_schedule(_train_cfg(schedule="linear"))


def test_flops_count_by_hand():
  cfg = DecoderConfig(vocab_size=10, num_layers=1, d_model=4, num_heads=2, num_kv_heads=1, mlp_dim=8)
  # q 2*4*4, k,v 2*(2*4*2), o 2*4*4 = 32+32+32=96 ; mlp 3*2*4*8=192 ; attn 4*2*2*ctx ; head 2*4*10=80
  seq = 3
  expected = 96 + 192 + 4 * 2 * 2 * (seq + 1) / 2 + 80
  assert flops.forward_flops_per_token(cfg, seq) == expected
  assert flops.train_flops_per_token(cfg, seq) == 3 * expected
  assert DecoderLMTask(cfg, seq).train_flops_per_example == seq * 3 * expected
  # MFU is unknown on CPU and exact given a peak.
  assert flops.mfu(100.0, cfg, seq, 1, None) is None
  assert flops.mfu(100.0, cfg, seq, 2, 1e6) == pytest.approx(100 * 3 * expected / 2e6)
