"""PPO pieces against hand-worked numbers and plain reference computations: GAE on a toy MDP and
against a python loop, whitening, value clipping, reward shaping, the actor-critic parameter
tree, the PPO loss on a fixed batch against numpy, where gradients flow, and a bandit that the
core trainer's steps solve."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY, tiny, tiny_params

from mlx_med.core import config as config_lib
from mlx_med.core import params as params_lib
from mlx_med.core import sharding
from mlx_med.core import trainer as trainer_lib
from mlx_med.core.lm_task import decoder_init_fn
from mlx_med.core.train_step import make_grad_fn
from mlx_med.core.transformer import Decoder
from mlx_med.rl import ppo

_gae = jax.jit(ppo.gae, static_argnames=("gamma", "lam"))


def _gae_loop(rewards, values, mask, gamma, lam):
  """The textbook recursion, one row and one token at a time, in float64 python."""
  adv = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    valid = np.nonzero(mask[b])[0]
    if len(valid) == 0:
      continue
    start, end = valid[0], valid[-1]
    running = 0.0
    for t in range(end, start - 1, -1):
      next_v = float(values[b, t + 1]) if t < end else 0.0
      delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
      running = delta + gamma * lam * running
      adv[b, t] = running
  return adv, (adv + values) * mask


def _ragged(seed, b=6, t=11):
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(b, t)).astype(np.float32)
  values = rng.normal(size=(b, t)).astype(np.float32)
  mask = np.zeros((b, t), np.float32)
  for i in range(b):
    start = rng.integers(0, t)  # a left-padded prompt before the completion
    end = rng.integers(start, t)  # padding after it
    mask[i, start:end + 1] = 1
  mask[0] = 0  # a row without completion tokens
  mask[1] = 1  # a row that fills the whole length
  return rewards, values, mask


class TestGAE:

  def test_toy_mdp_by_hand(self):
    # Three steps, reward 1 at the end, V = (0.5, 0.6, 0.7), gamma 0.9, lam 0.8:
    #   delta_2 = 1 - 0.7                 = 0.3        A_2 = 0.3
    #   delta_1 = 0 + 0.9*0.7 - 0.6       = 0.03       A_1 = 0.03 + 0.72*0.3   = 0.246
    #   delta_0 = 0 + 0.9*0.6 - 0.5       = 0.04       A_0 = 0.04 + 0.72*0.246 = 0.21712
    # Padding before (a prompt) and after the completion holds junk that must not leak in.
    rewards = np.array([[5.0, 0.0, 0.0, 1.0, 7.0]], np.float32)
    values = np.array([[9.0, 0.5, 0.6, 0.7, 3.0]], np.float32)
    mask = np.array([[0, 1, 1, 1, 0]], np.float32)
    adv, ret = _gae(rewards, values, mask, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv, [[0.0, 0.21712, 0.246, 0.3, 0.0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ret, [[0.0, 0.71712, 0.846, 1.0, 0.0]], rtol=0, atol=1e-6)

  @pytest.mark.parametrize("seed,gamma,lam", [(0, 0.9, 0.8), (1, 1.0, 0.95), (2, 0.99, 0.0)])
  def test_matches_python_loop_on_ragged_rows(self, seed, gamma, lam):
    rewards, values, mask = _ragged(seed)
    adv, ret = _gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _gae_loop(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(adv)[mask == 0])

  def test_lambda_one_gamma_one_is_monte_carlo(self):
    rewards, values, mask = _ragged(3)
    adv, ret = _gae(rewards, values, mask, gamma=1.0, lam=1.0)
    rewards_m = rewards * mask
    mc = np.cumsum(rewards_m[:, ::-1], axis=1)[:, ::-1] * mask  # reward-to-go within the completion
    np.testing.assert_allclose(ret, mc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv, (mc - values) * mask, rtol=1e-5, atol=1e-5)

  def test_lambda_zero_is_one_step_td_error(self):
    rewards, values, mask = _ragged(4)
    gamma = 0.9
    adv, _ = _gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_v = np.concatenate([values[:, 1:] * mask[:, 1:], np.zeros((values.shape[0], 1), np.float32)], axis=1)
    td = (rewards + gamma * next_v - values) * mask
    np.testing.assert_allclose(adv, td, rtol=1e-6, atol=1e-6)

  def test_shape_mismatch_is_a_clear_error(self):
    with pytest.raises(ValueError, match="one shape"):
      ppo.gae(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)), gamma=1.0, lam=1.0)


def test_whiten_is_masked():
  rng = np.random.default_rng(5)
  x = rng.normal(2.0, 3.0, size=(4, 9)).astype(np.float32)
  mask = (rng.uniform(size=(4, 9)) < 0.6).astype(np.float32)
  junk = np.where(mask > 0, x, 1e6).astype(np.float32)  # what sits off the mask must not matter
  out = np.asarray(ppo.whiten(junk, mask))
  sel = x[mask > 0].astype(np.float64)
  np.testing.assert_allclose(out[mask > 0], (sel - sel.mean()) / sel.std(), rtol=1e-5, atol=1e-5)
  assert not np.any(out[mask == 0])
  kept = np.asarray(ppo.whiten(junk, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask > 0], (sel - sel.mean()) / sel.std() + sel.mean(), rtol=1e-5, atol=1e-5)


def test_value_loss_clipping_by_hand():
  # old value 1.0, clip 0.2: the clipped prediction stays within [0.8, 1.2].
  values = np.array([[1.5, 0.5, 1.1, 0.5, 9.0]], np.float32)
  old = np.array([[1.0, 1.0, 1.0, 1.0, 0.0]], np.float32)
  returns = np.array([[2.0, 0.0, 2.0, 2.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)
  # 1.5 -> 1.2 clipped: max(0.5^2, 0.8^2) = 0.64 (the clipped term wins)
  # 0.5 -> 0.8 clipped: max(0.5^2, 0.8^2) = 0.64 (the clipped term wins)
  # 1.1 inside the band: 0.9^2 = 0.81 both ways
  # 0.5 -> 0.8 clipped: max(1.5^2, 1.2^2) = 2.25 (the unclipped term wins: moving away is not rewarded)
  expected = 0.5 * np.array([[0.64, 0.64, 0.81, 2.25, 0.0]])
  np.testing.assert_allclose(ppo.value_loss(values, old, returns, mask, clip=0.2), expected, rtol=1e-6)
  _, clipped = ppo._value_loss_terms(values, old, returns, mask, 0.2)
  np.testing.assert_array_equal(clipped, [[True, True, False, False, False]])
  np.testing.assert_allclose(ppo.value_loss(values, old, returns, mask, clip=None),
                             0.5 * np.square(values - returns) * mask, rtol=1e-6)


def test_reward_per_token_by_hand():
  mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  final = np.array([1.0, -1.0, 5.0], np.float32)
  kl = np.full((3, 5), 0.5, np.float32)
  out = ppo.reward_per_token(final, mask, kl, 0.1)
  expected = np.array([[0, -0.05, -0.05, 0.95, 0], [-0.05, -1.05, 0, 0, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ppo.reward_per_token(final, mask), np.where(expected == 0.95, 1.0, 0.0) +
                             np.where(expected == -1.05, -1.0, 0.0), atol=0)


# ----------------------------------------------------------------------------- the actor-critic


def test_actor_critic_tree_is_the_decoder_tree_plus_a_head():
  rng = jax.random.key(0)
  boxed = jax.eval_shape(lambda: ppo.ActorCritic(TINY).init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
  decoder = jax.eval_shape(lambda: decoder_init_fn(TINY)(rng))
  assert set(boxed) == {"policy", "value_head"}
  assert jax.tree.structure(boxed["policy"]) == jax.tree.structure(decoder)
  assert nn.get_partition_spec(boxed["policy"]) == nn.get_partition_spec(decoder)
  specs = nn.get_partition_spec(boxed["value_head"])
  assert specs["kernel"] == jax.sharding.PartitionSpec("embed", None)
  # init_from_policy keeps the given decoder params as they are and adds a zero head
  policy = tiny_params(TINY)
  wrapped = ppo.init_from_policy(policy, TINY, jax.random.key(1))
  assert wrapped["policy"] is policy
  chex.assert_trees_all_equal(wrapped["value_head"], {"kernel": np.zeros((32, 1), np.float32),
                                                      "bias": np.zeros((1,), np.float32)})
  with pytest.raises(ValueError, match="params\\['policy'\\]"):
    ppo.init_from_policy(wrapped, TINY, jax.random.key(1))


# ----------------------------------------------------------------------------- the PPO loss


def _loss_batch(seed=0, b=4, s=10):
  """A fixed batch: left-padded prompts, ragged completions, advantages that push some ratios past the clip."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, TINY.vocab_size, size=(b, s)).astype(np.int32)
  targets = np.concatenate([inputs[:, 1:], rng.integers(1, TINY.vocab_size, size=(b, 1))], axis=1).astype(np.int32)
  prompt = np.array([3, 2, 4, 3])[:b]
  ends = np.array([9, 6, 9, 5])[:b]
  mask = np.zeros((b, s), np.float32)
  segment_ids = np.ones((b, s), np.int32)
  positions = np.tile(np.arange(s, dtype=np.int32), (b, 1))
  for i in range(b):
    mask[i, prompt[i] - 1:ends[i]] = 1
    segment_ids[i, ends[i] + 1:] = 0  # padding after the completion
  return {
      "inputs": inputs, "targets": targets, "positions": positions, "segment_ids": segment_ids, "mask": mask,
      # old log-probs around the current policy's (~ -log 128 = -4.85) so ratios spread over [0.5, 2]
      "old_logprobs": (-4.85 + rng.normal(0, 0.4, size=(b, s))).astype(np.float32),
      "advantages": rng.normal(size=(b, s)).astype(np.float32),
      "returns": rng.normal(size=(b, s)).astype(np.float32),
      "old_values": rng.normal(0, 0.3, size=(b, s)).astype(np.float32),
  }


def _reference_loss(params, batch, *, eps_low, eps_high, dual_clip, value_clip, vf_coef, entropy_coef, aggregation,
                    max_len, kl_coef=0.0):
  """The PPO objective written out in numpy (float64) from the decoder's logits and hidden states."""
  logits, hidden = Decoder(TINY).apply({"params": params["policy"]}, batch["inputs"], batch["positions"],
                                       batch["segment_ids"], return_hidden=True)
  logits = np.asarray(logits, np.float64)
  head = params["value_head"]
  values = np.asarray(hidden, np.float64) @ np.asarray(head["kernel"], np.float64)[:, 0] + float(head["bias"][0])
  z = logits - logits.max(-1, keepdims=True)
  logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
  logp = np.take_along_axis(logp_all, batch["targets"][..., None], -1)[..., 0]
  entropy = -(np.exp(logp_all) * logp_all).sum(-1)
  m = batch["mask"].astype(np.float64)
  a = batch["advantages"].astype(np.float64)
  old = batch["old_logprobs"].astype(np.float64)
  ratio = np.exp(logp - old)
  pg = np.maximum(-ratio * a, -np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
  if dual_clip is not None:
    pg = np.where(a < 0, np.minimum(pg, -dual_clip * a), pg)
  clipped = ((ratio > 1 + eps_high) & (a > 0)) | ((ratio < 1 - eps_low) & (a < 0))
  ret, old_v = batch["returns"].astype(np.float64), batch["old_values"].astype(np.float64)
  v_clip = old_v + np.clip(values - old_v, -value_clip, value_clip)
  vf = 0.5 * np.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
  vf_clipped = (v_clip - ret) ** 2 > (values - ret) ** 2
  r = ratio
  approx_kl = (r - 1) - np.log(r)

  rows = m.sum(1)
  if aggregation == "token-mean":
    agg = lambda x: ((x * m).sum(), m.sum())
  elif aggregation == "seq-mean-token-mean":
    agg = lambda x: (((x * m).sum(1) / np.maximum(rows, 1)).sum(), float((rows > 0).sum()))
  else:
    agg = lambda x: ((x * m).sum() / max_len, float((rows > 0).sum()))
  metric = (lambda x: (x * m).sum()) if aggregation == "token-mean" else (
      lambda x: ((x * m).sum(1) / np.maximum(rows, 1)).sum())
  pg_sum, weight = agg(pg)
  vf_sum, _ = agg(vf)
  ent_sum, _ = agg(entropy)
  loss = (pg_sum + vf_coef * vf_sum - entropy_coef * ent_sum) / weight
  extra = {}
  if kl_coef:
    d = batch["ref_logprobs"].astype(np.float64) - logp
    kl = np.exp(d) - d - 1  # k3 to the reference
    loss += kl_coef * agg(kl)[0] / weight
    extra["kl"] = metric(kl) / weight
  metrics = {**extra,"pg_loss": pg_sum / weight, "vf_loss": vf_sum / weight, "clip_frac": metric(clipped) / weight,
             "vf_clip_frac": metric(vf_clipped) / weight, "entropy": metric(entropy) / weight,
             "approx_kl": metric(approx_kl) / weight}
  return loss, weight, metrics


@pytest.fixture(scope="module")
def loss_params():
  return ppo.init_from_policy(tiny_params(TINY, seed=3), TINY, jax.random.key(4), value_init_std=0.5)


_LOSS_CASES = {
    "token-mean": {"aggregation": "token-mean", "eps_low": 0.2, "eps_high": 0.28, "dual_clip": None,
                   "entropy_coef": 0.0},
    "seq-mean-token-mean": {"aggregation": "seq-mean-token-mean", "eps_low": 0.2, "eps_high": 0.2,
                            "dual_clip": None, "entropy_coef": 0.01},
    "seq-mean-token-sum-norm": {"aggregation": "seq-mean-token-sum-norm", "eps_low": 0.1, "eps_high": 0.3,
                                "dual_clip": None, "entropy_coef": 0.0, "max_len": 12},
    "dual-clip": {"aggregation": "token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip": 1.5,
                  "entropy_coef": 0.0},
    "kl-in-loss": {"aggregation": "seq-mean-token-mean", "eps_low": 0.2, "eps_high": 0.2, "dual_clip": None,
                   "entropy_coef": 0.0, "kl_coef": 0.1},
}


@pytest.mark.parametrize("case", sorted(_LOSS_CASES))
def test_ppo_loss_matches_numpy_reference(loss_params, case):
  kw = {"value_clip": 0.2, "vf_coef": 0.3, "max_len": None, **_LOSS_CASES[case]}
  task = ppo.PPOTask(TINY, value_init_std=0.5, **kw)
  batch = _loss_batch()
  if kw.get("kl_coef"):
    batch["ref_logprobs"] = batch["old_logprobs"] + np.random.default_rng(9).normal(0, 0.3, size=(4, 10)).astype(
        np.float32)
  assert set(task.batch_axes) == set(batch)
  out = jax.jit(lambda p, bt: task.loss(p, bt, jax.random.key(0)))(loss_params, batch)
  loss, weight, metrics = _reference_loss(loss_params, batch, **kw)
  assert set(out.metrics) == set(metrics)
  np.testing.assert_allclose(float(out.weight), weight, rtol=1e-6)
  np.testing.assert_allclose(float(out.loss_sum / out.weight), loss, rtol=1e-5, atol=1e-5)
  for name, expected in metrics.items():
    if name == "clip_frac" and kw["dual_clip"] is not None:
      continue  # which tokens count as "clipped" under the dual clip is the loss function's convention
    np.testing.assert_allclose(float(out.metrics[name] / out.weight), expected, rtol=1e-5, atol=1e-5, err_msg=name)
  # the fixed batch exercises both clips: the test is not vacuous
  assert 0 < metrics["clip_frac"] < 1 and 0 < metrics["vf_clip_frac"] < 1


def test_rollout_forward_gives_the_loss_inputs(loss_params):
  task = ppo.PPOTask(TINY, temperature=0.7)
  batch = _loss_batch()
  logp, values = jax.jit(task.rollout_forward)(loss_params, batch)
  values_only = jax.jit(task.rollout_values)(loss_params, {k: batch[k] for k in ("inputs", "positions",
                                                                                   "segment_ids")})
  np.testing.assert_array_equal(values, values_only)
  logits = Decoder(TINY).apply({"params": loss_params["policy"]}, batch["inputs"], batch["positions"],
                               batch["segment_ids"])
  ref = jax.nn.log_softmax(logits / 0.7, axis=-1)
  np.testing.assert_allclose(logp, np.take_along_axis(np.asarray(ref), batch["targets"][..., None], -1)[..., 0],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stop", [False, True])
def test_value_gradients_reach_the_head_and_the_trunk_unless_stopped(loss_params, stop):
  task = ppo.PPOTask(TINY, value_stop_gradient=stop, value_init_std=0.5)
  batch = dict(_loss_batch(), advantages=np.zeros((4, 10), np.float32))  # A = 0: only the value loss pulls
  grads = jax.jit(jax.grad(lambda p: task.loss(p, batch, jax.random.key(0)).loss_sum))(loss_params)
  assert float(jnp.abs(grads["value_head"]["kernel"]).sum()) > 0
  trunk = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["policy"]))
  if stop:
    assert trunk == 0.0
  else:
    assert trunk > 1e-4
  # the policy loss alone reaches the trunk, never the head
  pg_task = ppo.PPOTask(TINY, vf_coef=0.0, value_init_std=0.5)
  g_pg = jax.jit(jax.grad(lambda p: pg_task.loss(p, _loss_batch(), jax.random.key(0)).loss_sum))(loss_params)
  assert float(jnp.abs(g_pg["value_head"]["kernel"]).sum()) == 0.0
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_pg["policy"])) > 1e-4


def test_micro_batches_sum_to_the_whole_batch(loss_params):
  # the loss is decomposable (here per-sequence means, the less obvious case): the trainer's
  # gradient accumulation equals one step on the whole batch
  task = ppo.PPOTask(TINY, aggregation="seq-mean-token-mean")
  batch = _loss_batch()
  whole_out, whole = jax.jit(make_grad_fn(task, 1))(loss_params, batch, jax.random.key(0))
  acc_out, acc = jax.jit(make_grad_fn(task, 2))(loss_params, batch, jax.random.key(0))
  np.testing.assert_allclose(acc_out.weight, whole_out.weight)
  np.testing.assert_allclose(acc_out.loss_sum, whole_out.loss_sum, rtol=1e-5)
  for k in whole_out.metrics:
    np.testing.assert_allclose(acc_out.metrics[k], whole_out.metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # gradients of the summed loss: entries reach O(50) and cancel, so fp32 reduction order moves
  # each by ~1e-7 of its leaf's scale
  for g_acc, g_whole in zip(jax.tree.leaves(acc), jax.tree.leaves(whole)):
    np.testing.assert_allclose(g_acc, g_whole, rtol=1e-5, atol=1e-6 * float(jnp.abs(g_whole).max()))


def test_sharded_loss_matches_single_device(loss_params):
  # data x fsdp x tensor on the 8 fake devices: the value head's kernel is split on "embed" (fsdp)
  task = ppo.PPOTask(TINY, entropy_coef=0.01)
  rules = sharding.ShardingRules(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  p_sh = params_lib.param_shardings(task, rules)
  assert p_sh["value_head"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
  b_sh = trainer_lib.batch_shardings(task, rules)
  batch = _loss_batch()
  fn = lambda p, bt: task.loss(p, bt, jax.random.key(0), rules=rules)
  out = jax.jit(fn, in_shardings=(p_sh, b_sh))(jax.device_put(loss_params, p_sh), jax.device_put(batch, b_sh))
  ref = jax.jit(lambda p, bt: task.loss(p, bt, jax.random.key(0)))(loss_params, batch)
  np.testing.assert_allclose(out.loss_sum, ref.loss_sum, rtol=1e-5)
  for k in ref.metrics:
    np.testing.assert_allclose(out.metrics[k], ref.metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bf16_decoder_gives_fp32_values(loss_params):
  task = ppo.PPOTask(tiny(dtype="bfloat16"))
  logits, values = jax.jit(task.forward)(loss_params, _loss_batch())
  assert logits.dtype == jnp.float32 and values.dtype == jnp.float32 and values.shape == (4, 10)
  _, ref = jax.jit(ppo.PPOTask(TINY).forward)(loss_params, _loss_batch())
  np.testing.assert_allclose(values, ref, rtol=0.05, atol=0.05)  # bf16 activations: ~2-3 significant digits


def test_bad_settings_are_clear_errors():
  with pytest.raises(ValueError, match="unknown aggregation"):
    ppo.PPOTask(TINY, aggregation="sum")
  with pytest.raises(ValueError, match="max_len"):
    ppo.PPOTask(TINY, aggregation="seq-mean-token-sum-norm")
  with pytest.raises(ValueError, match="value_clip"):
    ppo.PPOTask(TINY, value_clip=0.0)


# ----------------------------------------------------------------------------- a bandit through the core trainer

BANDIT = tiny(vocab_size=16)
PROMPT = np.array([3, 7, 5], np.int32)
GOOD = 11  # the one completion token rewarded with 1


def _bandit_config():
  config = config_lib.ml_collections.ConfigDict()
  config.seed = 0
  config.peak_flops_per_device = 0.0
  config.train = config_lib.default_train_config()
  config.train.update({"steps": 100, "batch_size": 64, "lr": 1e-2, "schedule": "constant", "warmup_steps": 0,
                       "weight_decay": 0.0, "async_checkpointing": False, "check_memory": False})
  config.mesh = config_lib.default_mesh_config()
  return config


def test_bandit_ppo_raises_the_rewarded_token_and_fits_the_value(tmp_path):
  task = ppo.PPOTask(BANDIT, vf_coef=0.5, value_clip=None)
  # as after SFT: the run starts from given decoder weights, wrapped with a fresh value head
  start = lambda: task.init_from_policy(tiny_params(BANDIT, seed=1), jax.random.key(2))
  t = trainer_lib.Trainer(_bandit_config(), str(tmp_path), task, progress=False, initial_params=start).setup()
  b, s = 64, 4
  inputs0 = np.tile(np.concatenate([PROMPT, [0]]), (b, 1)).astype(np.int32)
  positions = np.tile(np.arange(s, dtype=np.int32), (b, 1))
  segment_ids = np.ones((b, s), np.int32)
  mask = np.zeros((b, s), np.float32)
  mask[:, 2] = 1  # the completion token is predicted at position 2

  @jax.jit
  def rollout(params, key):
    logits, _ = task.forward(params, {"inputs": inputs0, "positions": positions, "segment_ids": segment_ids})
    token = jax.random.categorical(key, logits[:, 2], axis=-1).astype(jnp.int32)
    inputs = jnp.asarray(inputs0).at[:, 3].set(token)
    targets = jnp.concatenate([inputs[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    batch = {"inputs": inputs, "targets": targets, "positions": positions, "segment_ids": segment_ids}
    logp, values = task.rollout_forward(params, batch)
    reward = (token == GOOD).astype(jnp.float32)
    adv, ret = ppo.gae(ppo.reward_per_token(reward, mask), values, mask, gamma=1.0, lam=0.95)
    batch.update(mask=mask, old_logprobs=logp * mask, advantages=ppo.whiten(adv, mask), returns=ret,
                 old_values=values * mask)
    p_good = jax.nn.softmax(logits[0, 2])[GOOD]
    value_error = jnp.sum(jnp.square(values - ret) * mask) / jnp.sum(mask)
    return batch, p_good, values[0, 2], value_error

  history = []
  key = jax.random.key(0)
  for it in range(8):
    batch, p_good, v, v_err = rollout(t.state["params"], jax.random.fold_in(key, it))
    history.append((float(p_good), float(v), float(v_err)))
    batch = jax.device_get(batch)
    for _ in range(2):  # two PPO epochs on the rollout
      metrics = t.step(batch)
  _, p_final, v_final, _ = rollout(t.state["params"], jax.random.fold_in(key, 99))
  metrics = jax.device_get(metrics)
  assert {"pg_loss", "vf_loss", "clip_frac", "vf_clip_frac", "entropy", "approx_kl"} <= set(metrics)
  print("bandit p(good), V, value error per iteration:", history, "final", float(p_final), float(v_final))
  p0, v0, err0 = history[0]
  assert p0 < 0.15 and float(p_final) > 0.6  # the rewarded token went from rare to most likely
  # the critic followed the expected reward as it moved (V started at 0, p(good) moved by > 0.45) ...
  assert v0 == 0.0 and abs(float(v_final) - float(p_final)) < 0.1
  assert history[-1][2] < err0  # ... and its squared error on fresh rollouts went down
