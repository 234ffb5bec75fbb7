"""Train-step semantics: accumulation equals one big batch, NaN guard, schedules, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlx_med.core import config as config_lib
from mlx_med.core import flops, optim, trainer
from mlx_med.core.train_step import init_train_state, make_train_step, token_cross_entropy
from mlx_med.core.transformer import DecoderConfig

CFG = DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)


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
  params = trainer._init_params_unjitted(CFG, 0)
  return opt, sched, params, jax.jit(make_train_step(CFG, opt, sched, 1))


def test_grad_accumulation_equals_full_batch(setup):
  opt, sched, params, step1 = setup
  outs = []
  for accum in (1, 2):
    state = init_train_state(params, opt, 0)
    step = step1 if accum == 1 else jax.jit(make_train_step(CFG, opt, sched, accum))
    state, metrics = step(state, _batch())
    outs.append((state, metrics))
  (s1, m1), (s2, m2) = outs
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_nan_guard_skips_update_and_counts(setup):
  opt, sched, params, step = setup
  state = init_train_state(params, opt, 0)
  bad = _batch()
  bad["loss_mask"] = bad["loss_mask"] * np.float32(np.nan)
  new_state, metrics = step(state, bad)
  assert not bool(metrics["finite"])
  assert int(new_state["nan_skips"]) == 1 and int(new_state["nan_streak"]) == 1
  for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  new_state, metrics = step(new_state, _batch())
  assert bool(metrics["finite"]) and int(new_state["nan_streak"]) == 0 and int(new_state["nan_skips"]) == 1
  with pytest.raises(trainer.NonFiniteLossError, match="consecutive steps"):
    trainer._check_finite({"nan_streak": np.int32(3)}, 3)


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
  # MFU is unknown on CPU and exact given a peak.
  assert flops.mfu(100.0, cfg, seq, 1, None) is None
  assert flops.mfu(100.0, cfg, seq, 2, 1e6) == pytest.approx(100 * 3 * expected / 2e6)
