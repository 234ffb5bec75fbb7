"""The RLVR loop in pure JAX: rollout -> rewards -> advantages -> minibatch updates, repeated.

One iteration (`RLRunner.iteration`):

1. **Rollout.** `rl.prompts_per_iteration` prompts, each sampled `rl.num_generations`
   times (G) by the core sampler in the generation layout (one parameter tree per
   layer, `scan_layers=False`): the training parameters are converted once per
   iteration by one jitted function, which is the only weight copy of the iteration.
   Rows carry per-row seeds derived from (seed, iteration, row), so a resumed run
   samples exactly what an uninterrupted one would.
2. **Rewards** from registered text functions (`rl.rewards`, `functions.get("reward", name)`)
   and the diagnostics of every response (correct, format, answer leak, length).
3. **Advantages.** GRPO family: a registered estimator over each group of G
   (`rl.advantage`: grpo, drgrpo, rloo), optional DAPO dropping of groups whose rewards
   are all equal. PPO: per-token rewards (KL penalty on every token, the verifiable reward
   on the last), values from the value head, GAE, whitening (`mlx_med.rl.ppo`).
4. **Update.** Reference log-probabilities (skipped when `rl.beta` = 0 and PPO's KL
   penalty is off) and, unless the update is exactly on-policy, the behaviour policy's
   log-probabilities are computed with the training forward; then `rl.num_iterations`
   passes over the rollout in minibatches of `train.batch_size` rows, each one
   `Trainer.step` of the shared trainer (sharded state, donated buffers, gradient
   accumulation, NaN guard) on a registered policy loss, aggregation and KL.

Everything numeric is jitted; the host handles text (rewards need decoded completions),
the prompt order and bookkeeping. Checkpoints are the trainer's (Orbax, every
`rl.ckpt_every` iterations); `rl_state.json` maps the checkpointed update step to the
iteration, so a restarted command resumes where it stopped. Metrics go to metrics.jsonl
and TensorBoard; `training_dynamics.png` is redrawn at every evaluation; the final policy
is exported as a Hugging Face directory (`<workdir>/hf`) that `mlx-med serve` and
transformers load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlx_med.core import metrics as metrics_lib
from mlx_med.core import params as params_lib
from mlx_med.core.lm_task import DecoderLMTask, decoder_init_fn
from mlx_med.core.sampler import Sampler, SamplingParams
from mlx_med.core.task import LossOutput, Task
from mlx_med.core.trainer import Trainer, mesh_from_config
from mlx_med.core.transformer import (
  Decoder,
  DecoderConfig,
  project_to_vocab,
  unstack_layers,
)
from mlx_med.rl import functions
from mlx_med.rl import rollout as rollout_lib

log = logging.getLogger("mlx_med.rl")

GRPO_KEYS = rollout_lib.UPDATE_KEYS + ("old_logprobs", "ref_logprobs", "advantages")


# --------------------------------------------------------------------------- config helpers


def parse_rewards(spec: str) -> list[tuple[str, float]]:
  """"medrlvr" or "mcqa_accuracy:1,format:0.5" -> [(name, weight)]; names must be registered."""
  out = []
  for part in str(spec).split(","):
    part = part.strip()
    if not part:
      continue
    name, _, weight = part.partition(":")
    functions.get("reward", name.strip())  # unknown names fail here with the known ones listed
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      raise ValueError(f"rl.rewards: weight {weight!r} of {name!r} is not a number (write name:weight)") from None
    out.append((name.strip(), w))
  if not out:
    raise ValueError("rl.rewards is empty; name at least one reward, e.g. rl.rewards='medrlvr'")
  return out


def _opt_budget(value) -> int | None:
  value = int(value)
  return None if value < 0 else value


# --------------------------------------------------------------------------- update task


class PolicyGradientTask(Task):
  """The GRPO-family update on rollout rows, as a `Task` of the shared trainer.

  Per token: a registered policy loss (`ppo_clip` with eps_low / eps_high) plus
  beta x a registered KL estimate to the reference; aggregated by a registered mode.
  `on_policy` (one pass, one minibatch): the behaviour log-probabilities equal the
  current ones, so they are taken as `stop_gradient(logp)` and the batch's
  `old_logprobs` are ignored (the ratio is exactly 1; as TRL does with one iteration).
  """

  decomposable = True

  def __init__(self, cfg: DecoderConfig, rl: ml_collections.ConfigDict, seq_len: int, *, on_policy: bool,
               completion_start: int = 0):
    self.cfg = cfg
    self.seq_len = seq_len
    # Columns before this one hold no counted target (the prompt block): the output projection,
    # softmax and losses run on the completion columns only.
    self.completion_start = int(completion_start)
    self.on_policy = on_policy
    self.temperature = float(rl.temperature) or 1.0
    self.beta = float(rl.beta)
    self.eps_low, self.eps_high = float(rl.eps_low), float(rl.eps_high)
    self.dual_clip = float(rl.get("dual_clip", 0.0)) or None
    self.policy_loss = functions.get("policy_loss", str(rl.policy_loss))
    self.aggregate = functions.get("aggregation", str(rl.loss_agg))
    self.kl = functions.get("kl", str(rl.kl_estimator))
    self.max_len = int(rl.max_new_tokens)
    self._lm = DecoderLMTask(cfg, seq_len)

  @property
  def batch_axes(self):
    return {k: ("batch", "length") for k in GRPO_KEYS}

  def init(self, rng):
    return decoder_init_fn(self.cfg)(rng)

  def loss(self, params, batch, rng, *, rules=None, train=True) -> LossOutput:
    del rng, train
    model = Decoder(self.cfg, rules)
    _, hidden = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"], return_hidden=True)
    c = self.completion_start
    logits = model.apply({"params": params}, hidden[:, c:], method=project_to_vocab)
    cols = lambda k: batch[k][:, c:]
    logp, entropy = rollout_lib.token_logprobs(logits, cols("targets"), self.temperature, with_entropy=True)
    mask = cols("mask")
    old = jax.lax.stop_gradient(logp) if self.on_policy else cols("old_logprobs")
    per_token, clipped = self.policy_loss(logp, old, cols("advantages"), eps_low=self.eps_low,
                                          eps_high=self.eps_high, dual_clip=self.dual_clip)
    kl = jnp.zeros_like(logp)
    if self.beta:
      kl = self.kl(logp, cols("ref_logprobs"))
      per_token = per_token + self.beta * kl
    loss_sum, weight = self.aggregate(per_token, mask, max_len=self.max_len)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    # Token means, scaled so that the trainer's division by `weight` reports them.
    scale = weight / tokens
    metrics = {"clip_frac": jnp.sum(clipped * mask) * scale, "entropy": jnp.sum(entropy * mask) * scale,
               "kl": jnp.sum(kl * mask) * scale, "ratio": jnp.sum(jnp.exp(logp - old) * mask) * scale}
    return LossOutput(loss_sum, weight, metrics)

  @property
  def train_flops_per_example(self):
    return self._lm.train_flops_per_example

  @property
  def throughput_unit(self):
    return ("tokens", self.seq_len)

  def activation_bytes_per_example(self):
    return self._lm.activation_bytes_per_example()

  def describe(self) -> str:
    return f"policy-gradient update of a {self._lm.describe()}"


# --------------------------------------------------------------------------- the runner


class RLRunner:
  """GRPO or PPO on verifiable MCQA (or math) rewards; see the module docstring."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
               allow_config_change: bool = False, log_fn: Callable[[str], None] | None = None):
    self.config, self.workdir = config, workdir
    self.progress, self.allow_config_change = progress, allow_config_change
    self.log = log_fn or (lambda msg: log.info("%s", msg))
    self._setup_done = False

  # ---------------------------------------------------------------- setup
  def setup(self) -> RLRunner:
    from mlx_med.rl import setup as setup_lib

    config, rl = self.config, self.config.rl
    if rl.algorithm not in ("grpo", "ppo"):
      raise ValueError(f"rl.algorithm={rl.algorithm!r}: choose grpo or ppo")
    self.algorithm = str(rl.algorithm)
    self.rewards = parse_rewards(rl.rewards)
    self.G = int(rl.num_generations)
    self.P = int(rl.prompts_per_iteration)
    if self.algorithm == "grpo" and self.G < 2:
      raise ValueError("rl.num_generations must be >= 2 for GRPO (advantages compare the samples of a group)")
    os.makedirs(self.workdir, exist_ok=True)
    _, self.rules = mesh_from_config(config)
    self.source = setup_lib.load_policy(config, self.workdir, self.rules)
    self.cfg = self.source.cfg
    self.tokenizer = self.source.tokenizer
    self.train_examples, self.eval_examples = setup_lib.load_examples(config, self.workdir)
    self.prompts = self._encode_prompts(self.train_examples)
    if not self.prompts:
      raise ValueError(f"no training prompt fits rl.max_prompt_len={int(rl.max_prompt_len)} tokens")
    self.prompt_width = max(len(p) for p, _ in self.prompts)
    self.max_new = int(rl.max_new_tokens)
    # The update runs on [rows, prompt_cols + completion] columns: the sampler's power-of-two
    # prompt bucket minus the left padding no prompt needs, rounded to 16.
    self.prompt_cols = _round16(self.prompt_width)
    self.seq_len = self.prompt_cols + _round16(self.max_new)
    if self.seq_len > self.cfg.max_seq_len:
      raise ValueError(f"prompts of up to {self.prompt_width} tokens plus rl.max_new_tokens={self.max_new} exceed "
                       f"the model's context of {self.cfg.max_seq_len}; lower rl.max_prompt_len or max_new_tokens")
    self.minibatch = int(config.train.batch_size)
    rows = self.P * self.G
    self.minibatches_per_pass = -(-rows // self.minibatch)
    self.passes = int(rl.num_iterations)
    on_policy = self.passes == 1 and self.minibatches_per_pass == 1
    self.needs_ref = float(rl.beta) > 0
    if self.algorithm == "grpo":
      self.task = PolicyGradientTask(self.cfg, rl, self.seq_len, on_policy=on_policy,
                                     completion_start=self.prompt_cols - 1)
      self.on_policy = on_policy
      initial = lambda: self.source.params
      self.policy_of = lambda p: p
    else:
      from mlx_med.rl import ppo

      self.ppo = ppo
      self.task = ppo.PPOTask(
          self.cfg, seq_len=self.seq_len, eps_low=float(rl.eps_low), eps_high=float(rl.eps_high),
          dual_clip=float(rl.get("dual_clip", 0.0)) or None, value_clip=float(rl.value_clip) or None,
          vf_coef=float(rl.vf_coef), entropy_coef=float(rl.entropy_coef), aggregation=str(rl.loss_agg),
          max_len=self.max_new, temperature=float(rl.temperature) or 1.0,
          value_stop_gradient=bool(rl.value_stop_gradient))
      self.on_policy = False  # the value head's targets need the rollout's values: always recompute
      task = self.task
      initial = lambda: task.init_from_policy(self.source.params, jax.random.key(int(config.seed) + 1))
      self._ppo_forward = jax.jit(lambda p, b: task.rollout_forward(p, b, rules=self.rules))
      self.policy_of = lambda p: p["policy"]
    self.ref_params = None
    if self.needs_ref:
      # The reference is the starting policy (reloaded on resume, so it never drifts); a copy,
      # because the trainer's state takes over (donates) the loaded buffers.
      shard = params_lib.param_shardings(self.cfg, self.rules)
      self.ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shard)(self.source.params)
    self.trainer = Trainer(config, self.workdir, self.task, progress=False,
                           allow_config_change=self.allow_config_change, initial_params=initial)
    self.trainer.setup()
    self.source.params = None  # the trainer state holds the live copy
    self.gen_cfg = dataclasses.replace(self.cfg, scan_layers=False)
    gen_shardings = params_lib.param_shardings(self.gen_cfg, self.rules)
    num_layers = self.cfg.num_layers
    self._to_generation_layout = jax.jit(lambda p: unstack_layers(p, num_layers), out_shardings=gen_shardings)
    self.sampler = Sampler(self.gen_cfg, self.rules, pad_id=self._pad_id(), min_prompt_bucket=16,
                           min_new_bucket=16, min_batch_bucket=8)
    # rl.ignore_eos: every completion runs to max_new_tokens (throughput measurements)
    self.stop_ids = () if bool(rl.get("ignore_eos", False)) else tuple(self.tokenizer.eos_token_ids)
    self.think_close_ids = self.tokenizer.token_ids_of("</think>")
    self.state_path = os.path.join(self.workdir, "rl_state.json")
    self.iteration_index = self._restore_iteration()
    self.writer = None
    self._setup_done = True
    self.log(f"{self.algorithm}: {len(self.train_examples)} training prompts, {len(self.eval_examples)} held out; "
             f"{self.P} prompts x {self.G} samples per iteration, {self.passes} pass(es) of "
             f"{self.minibatches_per_pass} minibatch(es) of {self.minibatch} rows; "
             f"{params_lib.count_params(self.trainer.state['params']):,} parameters")
    return self

  def _pad_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    return pad if 0 <= pad < self.cfg.vocab_size else 0

  def _encode_prompts(self, examples) -> list[tuple[list[int], dict]]:
    from mlx_med.rl import data as data_lib

    limit = int(self.config.rl.max_prompt_len)
    template = str(self.config.data.template)
    out, skipped = [], 0
    for ex in examples:
      ids = self.tokenizer.encode_chat(data_lib.build_messages(ex, template))
      if len(ids) > limit:
        skipped += 1
        continue
      out.append((ids, ex.to_dict()))
    if skipped:
      self.log(f"skipped {skipped} of {len(examples)} prompts longer than rl.max_prompt_len={limit} tokens")
    return out

  # ---------------------------------------------------------------- resume bookkeeping
  def _restore_iteration(self) -> int:
    step = self.trainer.start_step
    if not step:
      return 0
    try:
      with open(self.state_path) as f:
        table = json.load(f)["iteration_at_step"]
    except (OSError, ValueError, KeyError):
      raise RuntimeError(f"{self.workdir} has a checkpoint at update step {step} but no readable rl_state.json; "
                         "start a new --workdir") from None
    if str(step) not in table:
      raise RuntimeError(f"rl_state.json in {self.workdir} does not know update step {step}; start a new --workdir")
    return int(table[str(step)])

  def _save(self, force: bool = False) -> None:
    step = int(self.trainer.state["step"])
    saved = self.trainer.checkpointer.save(step, self.trainer.state, force=True) if force else False
    if saved and jax.process_index() == 0:
      table = {}
      if os.path.exists(self.state_path):
        with open(self.state_path) as f:
          table = json.load(f).get("iteration_at_step", {})
      table[str(step)] = self.iteration_index
      tmp = self.state_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"iteration_at_step": table}, f, indent=1)
      os.replace(tmp, self.state_path)

  # ---------------------------------------------------------------- one iteration
  def _prompt_batch(self, iteration: int) -> list[int]:
    """Indices of this iteration's prompts: a seeded permutation per epoch over the prompts."""
    n = len(self.prompts)
    start = iteration * self.P
    out = []
    for k in range(start, start + self.P):
      epoch, pos = divmod(k, n)
      perm = np.random.default_rng([int(self.config.seed), epoch]).permutation(n)
      out.append(int(perm[pos]))
    return out

  def _sampling(self, iteration: int, rows: int) -> list[SamplingParams]:
    rl = self.config.rl
    budget = _opt_budget(rl.get("think_budget", -1))
    seeds = np.random.default_rng([int(self.config.seed), iteration, 7]).integers(0, 2**31, size=rows)
    return [SamplingParams(max_new_tokens=self.max_new, temperature=float(rl.temperature), top_p=float(rl.top_p),
                           stop_token_ids=self.stop_ids, seed=int(s), think_budget=budget,
                           think_close_ids=self.think_close_ids if budget is not None else ())
            for s in seeds]

  def rollout(self, iteration: int) -> dict:
    """Samples G completions per prompt; returns host arrays and the decoded texts."""
    idx = self._prompt_batch(iteration)
    prompts = [self.prompts[i][0] for i in idx for _ in range(self.G)]
    examples = [self.prompts[i][1] for i in idx for _ in range(self.G)]
    gen_params = self._to_generation_layout(self.policy_of(self.trainer.state["params"]))
    arrays = self.sampler.generate_arrays(gen_params, prompts, self._sampling(iteration, len(prompts)))
    del gen_params
    host = jax.device_get(arrays._asdict())
    host["texts"] = self._texts(host)
    host["examples"] = examples
    return host

  def _texts(self, host: dict) -> list[str]:
    """Decoded completions of host rollout arrays (the stop token that ended a row left out)."""
    texts = []
    for row in range(host["tokens"].shape[0]):
      n = int(host["lengths"][row])
      ids = [int(t) for t in host["tokens"][row, :n]]
      if host["stopped"][row] and n:
        ids = ids[:-1]
      texts.append(self.tokenizer.decode(ids))
    return texts

  def score(self, host: dict) -> tuple[np.ndarray, dict]:
    """Rewards [rows] and the diagnostics averaged over the rollout."""
    rewards = np.zeros(len(host["texts"]), np.float32)
    stats = {"correct": [], "format_ok": [], "leak": []}
    for i, (text, ex) in enumerate(zip(host["texts"], host["examples"])):
      rewards[i] = sum(w * float(functions.get("reward", name)(text, ex)) for name, w in self.rewards)
      s = functions.response_stats(text, ex)
      for k in stats:
        stats[k].append(float(s[k]))
    summary = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
               "accuracy": float(np.mean(stats["correct"])), "format_failure": 1.0 - float(np.mean(stats["format_ok"])),
               "answer_leak": float(np.mean(stats["leak"])), "response_length": float(np.mean(host["lengths"])),
               "truncated": float(np.mean(~host["stopped"].astype(bool)))}
    return rewards, summary

  def _forward_logprobs(self, params, batch: dict) -> np.ndarray:
    """log p(targets) [B, S] under `params` (training layout), in chunks of rl.logprob_batch_size rows."""
    chunk = int(self.config.rl.get("logprob_batch_size", 0)) or self.minibatch
    out = []
    keys = rollout_lib.UPDATE_KEYS
    for s in range(0, batch["inputs"].shape[0], chunk):
      part = {k: jnp.asarray(batch[k][s:s + chunk]) for k in keys}
      out.append(np.asarray(rollout_lib.sequence_logprobs(params, part, cfg=self.cfg, rules=self.rules,
                                                          temperature=float(self.config.rl.temperature) or 1.0,
                                                          start=self.prompt_cols - 1)))
    return np.concatenate(out, axis=0)

  def iteration(self) -> dict:
    """One rollout + update round; returns host metrics (and advances the iteration counter)."""
    if not self._setup_done:
      self.setup()
    rl = self.config.rl
    it = self.iteration_index
    t0 = time.perf_counter()
    host = self.rollout(it)
    t_rollout = time.perf_counter() - t0
    rewards, metrics = self.score(host)
    batch = rollout_lib.assemble(host["prompt"], host["prompt_lens"], host["tokens"], host["lengths"],
                                 host["forced"], mask_forced=bool(rl.get("mask_forced", True)))
    batch = _trim_columns(batch, host["prompt"].shape[1] - self.prompt_cols, self.seq_len)
    rows = batch["inputs"].shape[0]
    keep = np.ones(rows, bool)
    if self.algorithm == "grpo":
      grouped = jnp.asarray(rewards.reshape(-1, self.G))
      adv = np.asarray(functions.get("advantage", str(rl.advantage))(grouped)).reshape(-1)
      if bool(rl.get("drop_zero_variance", False)):
        flat = np.asarray(functions.zero_variance_groups(grouped))
        keep = ~np.repeat(flat, self.G)
      metrics["groups_dropped"] = float(1.0 - keep.mean())
      batch["advantages"] = (adv[:, None] * batch["mask"]).astype(np.float32)
      batch["ref_logprobs"] = (self._forward_logprobs(self.ref_params, batch) if self.needs_ref
                               else np.zeros_like(batch["mask"]))
      batch["old_logprobs"] = (np.zeros_like(batch["mask"]) if self.on_policy
                               else self._forward_logprobs(self.trainer.state["params"], batch))
    else:
      batch = self._ppo_targets(batch, rewards, metrics)
    t1 = time.perf_counter()
    update_metrics = self._update(batch, keep, it)
    metrics.update(update_metrics)
    t_update = time.perf_counter() - t1
    elapsed = time.perf_counter() - t0
    metrics.update({"time/rollout_s": t_rollout, "time/update_s": t_update, "time/iteration_s": elapsed,
                    "prompts_per_s": self.P / elapsed, "iteration": it + 1})
    self.iteration_index = it + 1
    return metrics

  def _ppo_targets(self, batch: dict, rewards: np.ndarray, metrics: dict) -> dict:
    rl = self.config.rl
    ppo = self.ppo
    params = self.trainer.state["params"]
    fwd = {k: jnp.asarray(batch[k]) for k in rollout_lib.UPDATE_KEYS}
    logp, values = self._ppo_forward(params, fwd)
    mask = fwd["mask"]
    kl = None
    if self.needs_ref:
      ref = jnp.asarray(self._forward_logprobs(self.ref_params, batch))
      kl = functions.get("kl", str(rl.kl_estimator))(logp, ref) * mask
      batch["ref_logprobs"] = np.asarray(ref)
    token_rewards = ppo.reward_per_token(jnp.asarray(rewards), mask, kl, float(rl.beta))
    adv, returns = ppo.gae(token_rewards, values * mask, mask, gamma=float(rl.gamma), lam=float(rl.lam))
    if bool(rl.get("whiten_advantages", True)):
      adv = ppo.whiten(adv, mask)
    metrics["value_mean"] = float(jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0))
    out = dict(batch)
    out.pop("ref_logprobs", None)
    out.update({"old_logprobs": np.asarray(logp), "advantages": np.asarray(adv * mask),
                "returns": np.asarray(returns * mask), "old_values": np.asarray(values * mask)})
    return out

  def _update(self, batch: dict, keep: np.ndarray, iteration: int) -> dict:
    keys = tuple(self.task.batch_axes)
    rows = np.flatnonzero(keep)
    sums: dict[str, float] = {}
    count = 0
    if rows.size == 0:
      return {"updates": 0.0}
    rng = np.random.default_rng([int(self.config.seed), iteration, 11])
    for _ in range(self.passes):
      order = rng.permutation(rows) if self.passes > 1 or self.minibatches_per_pass > 1 else rows
      for s in range(0, order.size, self.minibatch):
        take = order[s:s + self.minibatch]
        mb = {k: _take_rows(batch[k], take, self.minibatch) for k in keys}
        out = self.trainer.step(mb)
        for k, v in jax.device_get(out).items():
          if np.ndim(v) == 0 and k not in ("finite", "nan_streak", "weight"):
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
    from mlx_med.core.trainer import check_finite

    check_finite(jax.device_get(out), int(self.config.train.max_nan_streak))
    metrics = {("policy_loss" if k == "loss" else k): v / count for k, v in sums.items()}
    metrics["updates"] = float(count)
    return metrics

  # ---------------------------------------------------------------- evaluation
  def evaluate(self, examples=None, *, think_budget: int | None = None) -> dict:
    """Greedy answers to the held-out questions with the current policy."""
    from mlx_med.rl import evaluate as eval_lib

    ev = self.config.eval
    examples = list(examples if examples is not None else self.eval_examples)
    if int(ev.get("max_examples", 0)) > 0:
      examples = examples[:int(ev.max_examples)]
    if not examples:
      return {}
    budget = think_budget if think_budget is not None else _opt_budget(ev.get("think_budget", -1))
    gen_params = self._to_generation_layout(self.policy_of(self.trainer.state["params"]))
    template = str(self.config.data.template)
    max_new = int(ev.get("max_new_tokens", 0)) or self.max_new
    batch_size = int(ev.get("batch_size", 64))

    def generate(conversations):
      outs = []
      for s in range(0, len(conversations), batch_size):
        prompts = [self.tokenizer.encode_chat(c) for c in conversations[s:s + batch_size]]
        sp = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_token_ids=self.stop_ids,
                            think_budget=budget, think_close_ids=self.think_close_ids if budget is not None else ())
        outs.extend(self._texts(jax.device_get(self.sampler.generate_arrays(gen_params, prompts, sp)._asdict())))
      return outs

    result = eval_lib.evaluate(generate, examples, template=template)
    return {"eval/accuracy": result.accuracy, "eval/accuracy_lo": result.accuracy_ci[0],
            "eval/accuracy_hi": result.accuracy_ci[1], "eval/format_failure": result.format_failure,
            "eval/answer_leak": result.answer_leak, "eval/response_length": result.mean_length}

  # ---------------------------------------------------------------- loop
  def run(self) -> dict:
    if not self._setup_done:
      self.setup()
    rl = self.config.rl
    total = int(rl.iterations)
    eval_every = int(self.config.eval.get("every", 0))
    ckpt_every = int(rl.get("ckpt_every", 10))
    writer = metrics_lib.MetricsWriter(self.workdir, purge_step=self.iteration_index + 1 if self.iteration_index
                                       else None)
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    if self.iteration_index:
      metrics_lib.truncate_metrics_after(metrics_path, self.iteration_index)
      self.log(f"resuming at iteration {self.iteration_index} (update step {self.trainer.start_step})")
    bar = metrics_lib.Progress(total, initial=self.iteration_index, bar=self.progress, desc=self.algorithm,
                               unit="prompts")
    first_eval, last = None, {}
    try:
      if self.iteration_index == 0 and eval_every > 0:
        first_eval = self.evaluate()
        writer.write(0, first_eval)
        self.log(_describe_eval("before training", first_eval))
      while self.iteration_index < total:
        m = self.iteration()
        step = self.iteration_index
        row = {k: v for k, v in m.items() if k != "iteration"}
        if eval_every > 0 and (step % eval_every == 0 or step == total):
          ev = self.evaluate()
          row.update(ev)
          last = ev
          self.log(_describe_eval(f"iteration {step}", ev))
        writer.write(step, row)
        bar.update(step, m["prompts_per_s"], reward=m["reward"], acc=m["accuracy"])
        if step % ckpt_every == 0 or step == total:
          self._save(force=True)
          writer.flush()
          self._plot()
    finally:
      self.trainer.checkpointer.close()
      bar.close()
      writer.flush()
      writer.close()
    out_dir = self.export()
    plot = self._plot()
    return {"before": first_eval, "after": last, "hf_dir": out_dir, "plot": plot, "workdir": self.workdir}

  def _plot(self) -> str | None:
    if jax.process_index() != 0:
      return None
    from mlx_med.rl import evaluate as eval_lib

    path = os.path.join(self.workdir, "metrics.jsonl")
    if not os.path.exists(path):
      return None
    return eval_lib.plot_training_dynamics(path, os.path.join(self.workdir, "training_dynamics.png"))

  def export(self, out_dir: str | None = None) -> str:
    """Writes the current policy as a Hugging Face directory (weights, config, tokenizer files)."""
    from mlx_med.llm import checkpoint as ckpt

    out_dir = out_dir or os.path.join(self.workdir, "hf")
    params = self.policy_of(self.trainer.state["params"])
    return ckpt.save_hf_checkpoint(out_dir, params, self.cfg, hf_config=self.source.hf_config or None,
                                   copy_files_from=self.source.tokenizer_dir, overwrite=True)


def _describe_eval(when: str, ev: dict) -> str:
  if not ev:
    return f"{when}: no held-out examples"
  return (f"{when}: held-out accuracy {ev['eval/accuracy']:.3f} [{ev['eval/accuracy_lo']:.3f}, "
          f"{ev['eval/accuracy_hi']:.3f}], format failure {ev['eval/format_failure']:.3f}, "
          f"answer leak {ev['eval/answer_leak']:.3f}")


def _round16(n: int) -> int:
  return max(16, -(-int(n) // 16) * 16)


def _trim_columns(batch: dict, left: int, width: int) -> dict:
  """[B, S] rollout arrays -> [B, width]: drops `left` leading columns (padding of every row, as
  no prompt is longer than the prompt columns kept; positions are explicit, so nothing shifts)
  and cuts or right-pads the tail, so every iteration runs one compiled update."""
  out = {}
  for k, v in batch.items():
    if left > 0:
      if k == "segment_ids" and np.any(v[:, :left]):
        raise ValueError("a prompt is longer than the update's prompt columns")
      v = v[:, left:]
    if v.shape[1] > width:
      if k == "segment_ids" and np.any(v[:, width:]):
        raise ValueError(f"rollout rows need more than the update width {width}")
      v = v[:, :width]
    out[k] = np.pad(v, ((0, 0), (0, width - v.shape[1]))) if v.shape[1] < width else v
  return out


def _take_rows(x: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
  """Rows of x, zero-padded to `size` rows (padding rows have mask 0, so they weigh nothing)."""
  part = x[rows]
  if part.shape[0] < size:
    part = np.concatenate([part, np.zeros((size - part.shape[0],) + x.shape[1:], x.dtype)], axis=0)
  return part


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, allow_config_change: bool = False,
        **_) -> dict:
  """`mlx-med rl train` / `mlx-med train` with config.task = "rl"."""
  result = RLRunner(config, workdir, progress=progress, allow_config_change=allow_config_change,
                    log_fn=print).run()
  before, after = result["before"] or {}, result["after"] or {}
  if before and after:
    print(f"held-out accuracy {before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}")
  print(f"policy exported to {result['hf_dir']}")
  if result["plot"]:
    print(f"training dynamics: {result['plot']}")
  return result

