"""The GRPO loop: rollout layout, behaviour log-probabilities, one update against a plain-jnp
reference, and a tiny end-to-end run that resumes exactly and exports a policy transformers loads."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tiny import TINY_GENERATE, tiny_params

from mlx_med.core import optim
from mlx_med.core.config import get_config
from mlx_med.core.sampler import Sampler, SamplingParams
from mlx_med.core.transformer import Decoder, unstack_layers
from mlx_med.rl import learner, rollout


def test_assemble_lays_out_prompt_completion_and_mask():
  # Two rows, prompt width 3, 3 generated slots: row 0 prompt [5, 6] (one pad) and 2 tokens,
  # row 1 prompt [7, 8, 9] and 3 tokens, the second forced by a think budget.
  prompt = np.array([[0, 5, 6], [7, 8, 9]], np.int32)
  tokens = np.array([[11, 12, 0], [21, 22, 23]], np.int32)
  out = rollout.assemble(prompt, np.array([2, 3]), tokens, np.array([2, 3]),
                         np.array([[0, 0, 0], [0, 1, 0]], bool), mask_forced=True)
  np.testing.assert_array_equal(out["inputs"], [[0, 5, 6, 11, 12, 0], [7, 8, 9, 21, 22, 23]])
  np.testing.assert_array_equal(out["segment_ids"], [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(out["positions"], [[0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5]])
  # targets[t] is the token at slot t+1; counted where it was generated (and not forced)
  np.testing.assert_array_equal(out["mask"], [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 0]])
  np.testing.assert_array_equal(out["targets"], [[0, 0, 11, 12, 0, 0], [0, 0, 21, 0, 23, 0]])
  kept = rollout.assemble(prompt, np.array([2, 3]), tokens, np.array([2, 3]),
                          np.array([[0, 0, 0], [0, 1, 0]], bool), mask_forced=False)
  np.testing.assert_array_equal(kept["mask"][1], [0, 0, 1, 1, 1, 0])


def test_sampler_logprobs_equal_the_training_forward():
  """The update's log-probabilities of sampled tokens (training layout, one forward over prompt +
  completion) equal the sampler's (generation layout, KV cache) on left-padded prompts of
  different lengths: positions, padding and target alignment agree."""
  cfg = TINY_GENERATE
  params = tiny_params(cfg)
  gen_cfg = dataclasses.replace(cfg, scan_layers=False)
  sampler = Sampler(gen_cfg, pad_id=0)
  prompts = [[3, 4, 5], [9, 10, 11, 12, 13, 14, 15], [7]]
  sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, stop_token_ids=(17,))
  arrays = jax.device_get(sampler.generate_arrays(unstack_layers(params, cfg.num_layers), prompts, sp)._asdict())
  batch = rollout.assemble(arrays["prompt"], arrays["prompt_lens"], arrays["tokens"], arrays["lengths"])
  logp = np.asarray(rollout.sequence_logprobs(params, {k: jnp.asarray(v) for k, v in batch.items()}, cfg=cfg))
  width = arrays["prompt"].shape[1]
  for row in range(len(prompts)):
    n = int(arrays["lengths"][row])
    assert n > 0
    np.testing.assert_allclose(logp[row, width - 1:width - 1 + n], arrays["logprobs"][row, :n], atol=2e-4)
    assert np.all(logp[row, width - 1 + n:] == 0.0)


def _rl_config(**rl) -> ml_collections.ConfigDict:
  config = get_config("configs/rl/xreasoner_grpo.py:smoke")
  with config.unlocked():
    config.rl.update(rl)
  return config


def _reference_loss(params, batch, cfg, *, beta, eps_low, eps_high, agg):
  """GRPO's objective written out directly (no registry): PPO-clip + beta * k3, token- or sequence-mean."""
  logits = Decoder(cfg).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]
  ratio = jnp.exp(logp - batch["old_logprobs"])
  adv = batch["advantages"]
  pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
  d = batch["ref_logprobs"] - logp
  per_token = pg + beta * (jnp.exp(d) - d - 1)
  m = batch["mask"]
  if agg == "token-mean":
    return jnp.sum(per_token * m) / jnp.sum(m)
  rows = jnp.sum(m, axis=1) > 0
  per_row = jnp.sum(per_token * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
  return jnp.sum(per_row) / jnp.sum(rows)


@pytest.mark.parametrize("agg,start", [("token-mean", 0), ("seq-mean-token-mean", 0), ("token-mean", 4)])
def test_grpo_update_equals_a_direct_computation(agg, start):
  cfg = TINY_GENERATE
  params = tiny_params(cfg)
  rng = np.random.default_rng(0)
  b, s = 6, 24
  batch = {
      "inputs": rng.integers(1, cfg.vocab_size, (b, s)).astype(np.int32),
      "targets": rng.integers(1, cfg.vocab_size, (b, s)).astype(np.int32),
      "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
      "segment_ids": np.ones((b, s), np.int32),
  }
  mask = np.zeros((b, s), np.float32)
  for row, (lo, hi) in enumerate([(4, 20), (4, 9), (4, 24), (10, 12), (0, 0), (4, 16)]):
    mask[row, lo:hi] = 1.0
  batch["mask"] = mask
  logp_now = np.asarray(rollout.sequence_logprobs(params, {k: jnp.asarray(v) for k, v in batch.items()}, cfg=cfg))
  # Behaviour and reference policies a little away from the current one, so clipping and KL both act.
  batch["old_logprobs"] = (logp_now + rng.normal(0, 0.3, (b, s))).astype(np.float32) * mask
  batch["ref_logprobs"] = (logp_now + rng.normal(0, 0.2, (b, s))).astype(np.float32) * mask
  adv = np.array([1.5, -0.5, 0.5, -1.5, 0.0, 0.5], np.float32)
  batch["advantages"] = adv[:, None] * mask
  rl = _rl_config(beta=0.04, eps_low=0.2, eps_high=0.28, loss_agg=agg, max_new_tokens=16).rl
  # start 4: the loss skips the first columns (no counted target there), as the loop runs it
  task = learner.PolicyGradientTask(cfg, rl, s, on_policy=False, completion_start=start)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}

  def task_loss(p):
    out = task.loss(p, jb, jax.random.key(0))
    return out.loss_sum / out.weight

  ref = lambda p: _reference_loss(p, jb, cfg, beta=0.04, eps_low=0.2, eps_high=0.28, agg=agg)
  loss, grads = jax.value_and_grad(task_loss)(params)
  ref_loss, ref_grads = jax.value_and_grad(ref)(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-7), grads, ref_grads)
  clipped = float(task.loss(params, jb, jax.random.key(0)).metrics["clip_frac"])
  assert clipped > 0  # the 0.3-nat noise moves some ratios outside [0.8, 1.28]

  # One step of the shared trainer's update = AdamW (clipped at 1.0) on the reference gradient.
  from mlx_med.core.train_step import init_train_state, make_train_step

  train_cfg = _rl_config().train
  optimizer, schedule = optim.make_optimizer(train_cfg)
  state = init_train_state(params, optimizer, 0)
  new_state, metrics = jax.jit(make_train_step(task, optimizer, schedule))(state, jb)
  updates, _ = optimizer.update(ref_grads, optimizer.init(params), params)
  expected = optax.apply_updates(params, updates)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6), new_state["params"], expected)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)


# ------------------------------------------------------------------ end to end


def _tiny_run_config(iterations: int, algorithm: str = "grpo") -> ml_collections.ConfigDict:
  config = get_config("configs/rl/medrlvr.py:smoke" if algorithm == "ppo" else "configs/rl/xreasoner_grpo.py:smoke")
  with config.unlocked():
    config.model.decoder.update({"num_layers": 2, "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64})
    config.model.tokenizer_vocab_size = 400
    config.data.synthetic.update({"n_train": 48, "n_eval": 8, "num_diseases": 8})
    config.rl.update({"iterations": iterations, "prompts_per_iteration": 4, "num_generations": 4, "max_new_tokens": 16,
                      "ckpt_every": 1, "num_iterations": 2})
    config.train.batch_size = 8
    config.eval.update({"every": 2, "max_examples": 8, "max_new_tokens": 16})
  return config


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
  """Three GRPO iterations straight through, and the same run stopped after two and resumed."""
  straight = str(tmp_path_factory.mktemp("straight"))
  result = learner.RLRunner(_tiny_run_config(3), straight, progress=False).run()
  resumed = str(tmp_path_factory.mktemp("resumed"))
  learner.RLRunner(_tiny_run_config(2), resumed, progress=False).run()
  runner = learner.RLRunner(_tiny_run_config(3), resumed, progress=False, allow_config_change=True)
  second = runner.run()
  return straight, resumed, result, second, runner


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_loop_logs_training_dynamics(grpo_runs):
  straight, _, result, _, _ = grpo_runs
  rows = _rows(straight)
  train_rows = [r for r in rows if "reward" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  for key in ("reward", "accuracy", "format_failure", "answer_leak", "response_length", "kl", "clip_frac",
              "entropy", "grad_norm", "prompts_per_s"):
    assert all(np.isfinite(r[key]) for r in train_rows), key
  assert train_rows[1]["updates"] == 2 * 2  # two passes over two minibatches of 8 rows (16 rows)
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [0, 2, 3]
  assert os.path.exists(result["plot"])


def test_resumed_run_equals_uninterrupted(grpo_runs):
  straight, resumed, _, _, runner = grpo_runs
  assert runner.iteration_index == 3
  a = [r for r in _rows(straight) if "reward" in r]
  b = [r for r in _rows(resumed) if "reward" in r]
  assert [r["step"] for r in b] == [1, 2, 3]
  for ra, rb in zip(a, b):
    for key in ("reward", "policy_loss", "grad_norm", "response_length"):
      assert ra[key] == rb[key], (ra["step"], key)


def test_exported_policy_loads_in_transformers_with_equal_logits(grpo_runs):
  torch = pytest.importorskip("torch")
  from torch_peers import import_torchvision

  import_torchvision()  # transformers' model classes import torchvision (CUDA-linked on PyPI)
  import transformers
  _, _, result, _, runner = grpo_runs
  hf_dir = result["hf_dir"]
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
  ids = runner.tokenizer.encode_chat([{"role": "user", "content": "Which drug treats Morvexia?"}])
  assert tok(runner.tokenizer.decode(ids, skip_special_tokens=False), add_special_tokens=False)["input_ids"] == ids
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0].numpy()
  params = runner.policy_of(runner.trainer.state["params"])
  ours = np.asarray(Decoder(runner.cfg).apply({"params": params}, jnp.asarray([ids], jnp.int32)))[0]
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_eval_command_on_the_run(grpo_runs, capsys):
  from mlx_med.cli import main

  straight = grpo_runs[0]
  out = os.path.join(straight, "eval_cli.json")
  assert main(["rl", "eval", "--workdir", straight, "--data", "synthetic", "--max-new-tokens", "16",
               "--think-budget", "4", "--out", out]) == 0
  with open(out) as f:
    report = json.load(f)
  assert report["n"] == 8
  assert 0.0 <= report["accuracy"] <= 1.0
  assert main(["rl", "eval", "--workdir", straight, "--data", "medqa:/nonexistent.jsonl"]) == 2
  assert "nonexistent" in capsys.readouterr().err


def test_ppo_loop_runs(tmp_path):
  result = learner.RLRunner(_tiny_run_config(1, "ppo"), str(tmp_path), progress=False).run()
  rows = [r for r in _rows(str(tmp_path)) if "reward" in r]
  assert len(rows) == 1
  for key in ("vf_loss", "pg_loss", "value_mean", "clip_frac"):
    assert np.isfinite(rows[0][key]), key
  assert os.path.exists(os.path.join(result["hf_dir"], "config.json"))
