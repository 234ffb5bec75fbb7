"""PPO for language models as Med-RLVR trained it: a value head beside the shared decoder, GAE, the update.

Med-RLVR trained with PPO (OpenRLHF). Here the critic is not a second transformer:
a scalar value head reads the policy decoder's final hidden states, so one forward
pass gives both the token log-probabilities and the values, and one parameter tree
holds both:

  params = {"policy": <exactly the Decoder's parameter tree>, "value_head": {"kernel" [d_model, 1], "bias" [1]}}

`params["policy"]` is what the sampler, the reference model and the Hugging Face
export take as it is. `value_stop_gradient=True` keeps the value loss out of the
shared trunk (only the head learns from it), for when the critic must not pull on
the policy's features.

Token-level RL on a [B, S] batch whose `mask` marks the completion tokens (the
targets the policy chose; prompts are left-padded in front of them):

* `reward_per_token`: OpenRLHF's reward shaping, -beta * KL(policy || reference) on
  every completion token and the verifiable (scalar) reward added on the last one.
* `gae`: generalised advantage estimation over the completion, one backward
  `lax.scan`; values after a row's last token count as 0 (the episode ends there).
* `whiten`: masked advantage normalisation over the whole rollout batch.
* `value_loss`: PPO's clipped value loss, 0.5 * max((V - R)^2, (V_clipped - R)^2).
* `PPOTask`: the update as a core `Task` (the core trainer's `Trainer.step` runs it):
  the registered PPO-clip policy loss and loss aggregation from `mlx_med.rl.functions`
  plus `vf_coef` times the value loss, minus an optional entropy bonus.

Conventions: values[b, t] is V of the state that predicts targets[b, t] (the prefix
inputs[b, :t+1]), aligned with the log-probability of targets[b, t]. Everything is
float32 whatever the decoder's compute dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.layers import logical_init
from mlx_med.core.lm_task import DecoderLMTask, decoder_init_fn
from mlx_med.core.task import LossOutput, Task
from mlx_med.core.transformer import Decoder, DecoderConfig, as_dtype
from mlx_med.rl import rollout as rollout_lib

PPO_BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask", "old_logprobs", "advantages", "returns",
                  "old_values")


# ----------------------------------------------------------------------------- advantages and returns


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation per token: (advantages [B, T], returns [B, T]).

  delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
  with V and A taken as 0 after a row's last valid token (no bootstrap past the end
  of the completion) and both outputs 0 where mask is 0. The mask is expected to
  be one contiguous run per row (the completion); a gap would end the episode there.
  returns = advantages + values (the critic's regression targets).
  """
  if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.ndim != 2:
    raise ValueError(f"gae wants rewards, values and mask of one shape [B, T]; got {rewards.shape}, "
                     f"{values.shape}, {mask.shape}")
  m = mask.astype(jnp.float32)
  # where(), not a product alone: junk (even NaN) off the mask must not reach the sums
  r = jnp.where(m > 0, rewards.astype(jnp.float32), 0.0)
  v = jnp.where(m > 0, values.astype(jnp.float32), 0.0)
  gamma = jnp.asarray(gamma, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)

  def back(carry, inputs):
    next_value, next_adv = carry
    r_t, v_t, m_t = inputs
    delta = r_t + gamma * next_value - v_t
    adv = (delta + gamma * lam * next_adv) * m_t
    return (v_t, adv), adv  # v_t is already 0 where m_t is 0: the next step back bootstraps 0

  zeros = jnp.zeros(r.shape[:1], jnp.float32)
  _, adv_t = jax.lax.scan(back, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
  advantages = adv_t.T
  return advantages, (advantages + v) * m


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the masked entries (population variance, as OpenRLHF); 0 where mask is 0.

  shift_mean=False keeps the mean (only the scale changes), as TRL's option. Apply it
  to the advantages of the whole rollout batch, before it is cut into minibatches.
  """
  m = mask.astype(jnp.float32)
  x = x.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x * m) / n
  var = jnp.sum(jnp.square(x - mean) * m) / n
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * m


def reward_per_token(final_reward: jax.Array, mask: jax.Array, kl: jax.Array | None = None,
                     beta: float = 0.0) -> jax.Array:
  """[B] sequence rewards -> [B, S] token rewards: -beta * kl on every masked token, the reward on the last one.

  `kl` is a per-token estimate of KL(policy || reference) (e.g. k1 = logp - ref_logp);
  None or beta = 0 gives the bare terminal reward. A row with no masked token gets nothing.
  """
  m = mask.astype(jnp.float32)
  if m.ndim != 2 or final_reward.shape != m.shape[:1]:
    raise ValueError(f"reward_per_token wants final_reward [B] and mask [B, S]; got {final_reward.shape}, {m.shape}")
  s = m.shape[1]
  last = (s - 1) - jnp.argmax(m[:, ::-1] > 0, axis=1)  # index of each row's last masked token
  has_any = jnp.any(m > 0, axis=1)
  terminal = jax.nn.one_hot(last, s, dtype=jnp.float32) * (final_reward.astype(jnp.float32) * has_any)[:, None]
  if kl is None:
    return terminal
  return terminal - jnp.asarray(beta, jnp.float32) * kl.astype(jnp.float32) * m


def _value_loss_terms(values, old_values, returns, mask, clip):
  values = values.astype(jnp.float32)
  returns = returns.astype(jnp.float32)
  m = mask.astype(jnp.float32)
  unclipped = jnp.square(values - returns)
  if clip is None:
    return jnp.where(m > 0, 0.5 * unclipped * m, 0.0), jnp.zeros(m.shape, bool)
  old = old_values.astype(jnp.float32)
  v_clipped = old + jnp.clip(values - old, -clip, clip)
  clipped = jnp.square(v_clipped - returns)
  return jnp.where(m > 0, 0.5 * jnp.maximum(unclipped, clipped) * m, 0.0), (clipped > unclipped) & (m > 0)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
               clip: float | None) -> jax.Array:
  """Per-token clipped value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2); 0 off the mask.

  clip=None: the plain 0.5 * (V - R)^2.
  """
  return _value_loss_terms(values, old_values, returns, mask, clip)[0]


# ----------------------------------------------------------------------------- the model


class ValueHead(nn.Module):
  """hidden [B, S, d_model] -> values [B, S] (fp32): one linear unit, logical axes ("embed", None)."""

  d_model: int
  init_std: float = 0.0  # 0: the head starts at V = 0 everywhere
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    pdtype = as_dtype(self.param_dtype)
    kinit = nn.initializers.normal(self.init_std) if self.init_std > 0 else nn.initializers.zeros
    kernel = self.param("kernel", logical_init(kinit, ("embed", None)), (self.d_model, 1), pdtype)
    bias = self.param("bias", logical_init(nn.initializers.zeros, (None,)), (1,), pdtype)
    h = hidden.astype(jnp.float32)
    return (h @ kernel.astype(jnp.float32))[..., 0] + bias.astype(jnp.float32)[0]


class ActorCritic(nn.Module):
  """tokens [B, S] -> (logits [B, S, V] fp32, values [B, S] fp32) from one decoder pass.

  Parameters: {"policy": the Decoder's tree, "value_head": {"kernel", "bias"}}.
  """

  cfg: DecoderConfig
  rules: sharding_lib.ShardingRules | None = None
  value_stop_gradient: bool = False
  value_init_std: float = 0.0

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None):
    logits, hidden = Decoder(self.cfg, self.rules, name="policy")(tokens, positions, segment_ids, return_hidden=True)
    if self.value_stop_gradient:
      hidden = jax.lax.stop_gradient(hidden)
    values = ValueHead(self.cfg.d_model, self.value_init_std, self.cfg.param_dtype, name="value_head")(hidden)
    values = sharding_lib.constrain(self.rules, values, ("batch", "length"))
    return logits, values


def value_head_init(cfg: DecoderConfig, rng: jax.Array, *, init_std: float = 0.0) -> Any:
  """Fresh (boxed) value-head parameters for `cfg`."""
  return ValueHead(cfg.d_model, init_std, cfg.param_dtype).init(rng, jnp.zeros((1, 1, cfg.d_model)))["params"]


def _is_boxed(tree: Any) -> bool:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return any(isinstance(x, nn.meta.AxisMetadata) for x in leaves)


def init_from_policy(policy_params: Any, cfg: DecoderConfig, rng: jax.Array, *, value_init_std: float = 0.0) -> dict:
  """Wraps existing decoder parameters (e.g. after SFT) with a fresh value head: {"policy", "value_head"}.

  The policy tree is taken as it is (not copied); the head is boxed with its logical
  axes when the policy is boxed, plain arrays otherwise (like the trainer's state).
  """
  if isinstance(policy_params, Mapping) and "policy" in policy_params and "value_head" in policy_params:
    raise ValueError("init_from_policy got actor-critic parameters (keys 'policy' and 'value_head'); "
                     "pass params['policy'], the decoder's tree")
  head = value_head_init(cfg, rng, init_std=value_init_std)
  if not _is_boxed(policy_params):
    head = nn.unbox(head)
  return {"policy": policy_params, "value_head": head}


# ----------------------------------------------------------------------------- the update task


def _row_mean_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum over rows of each row's masked token mean (rows without tokens add 0)."""
  m = mask.astype(jnp.float32)
  return jnp.sum(jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))


class PPOTask(Task):
  """The PPO update on a rollout minibatch, trained by the core trainer.

  Batch keys (all [B, S]): inputs, targets, positions, segment_ids, mask (1 = a completion
  token that counts), old_logprobs (the behaviour policy's log-probs of targets),
  advantages (already whitened if wanted), returns and old_values (from `gae` and the
  rollout's `rollout_values`).

  loss = agg(ppo_clip) + vf_coef * agg(value_loss) - entropy_coef * agg(entropy)
  [+ kl_coef * agg(kl(logp, ref_logprobs))], with
  `agg` the registered aggregation (`token-mean`, `seq-mean-token-mean`,
  `seq-mean-token-sum-norm`); all three share one weight (it depends on the mask only),
  so the sum decomposes over micro-batches. Metrics (sums; the trainer divides them by
  that weight): pg_loss, vf_loss (the aggregated terms), and clip_frac, vf_clip_frac,
  entropy, approx_kl (k3 estimate of KL(old || new)) as per-token means under
  `token-mean` and per-row token means summed over rows otherwise.

  The KL to the reference normally enters the reward (`reward_per_token`, as OpenRLHF's
  PPO); kl_coef > 0 adds it to the loss instead (the registered estimator `kl_estimator`),
  and then the batch also carries `ref_logprobs` and the metrics `kl`.
  """

  decomposable = True

  def __init__(self, cfg: DecoderConfig, *, seq_len: int | None = None, eps_low: float = 0.2,
               eps_high: float | None = None, dual_clip: float | None = None, value_clip: float | None = 0.2,
               vf_coef: float = 0.5, entropy_coef: float = 0.0, aggregation: str = "token-mean",
               max_len: int | None = None, temperature: float = 1.0, value_stop_gradient: bool = False,
               value_init_std: float = 0.0, kl_coef: float = 0.0, kl_estimator: str = "k3"):
    from mlx_med.rl import (
      functions,  # the registered RL functions (imported on use, like the package)
    )

    self.cfg = cfg
    self.seq_len = seq_len
    self.eps_low = float(eps_low)
    self.eps_high = float(eps_low if eps_high is None else eps_high)
    self.dual_clip = None if dual_clip is None else float(dual_clip)
    self.value_clip = None if value_clip is None else float(value_clip)
    self.vf_coef = float(vf_coef)
    self.entropy_coef = float(entropy_coef)
    self.aggregation = aggregation
    self.max_len = max_len
    self.temperature = float(temperature)
    if self.temperature <= 0:
      raise ValueError(f"PPOTask temperature={temperature} must be > 0 (the sampling temperature of the rollout)")
    if value_clip is not None and value_clip <= 0:
      raise ValueError(f"PPOTask value_clip={value_clip} must be > 0, or None for no value clipping")
    if aggregation == "seq-mean-token-sum-norm" and not max_len:
      raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_len (the generation budget in tokens)")
    self.value_stop_gradient = bool(value_stop_gradient)
    self.value_init_std = float(value_init_std)
    self._policy_loss = functions.get("policy_loss", "ppo_clip")
    self._aggregate = functions.get("aggregation", aggregation)
    self._k3 = functions.get("kl", "k3")
    self.kl_coef = float(kl_coef)
    if self.kl_coef < 0:
      raise ValueError(f"PPOTask kl_coef={kl_coef} must be >= 0 (0 = KL only in the reward, OpenRLHF's default)")
    self.kl_estimator = kl_estimator
    self._kl = functions.get("kl", kl_estimator)
    self._entropy = functions.token_entropy
    self._lm = DecoderLMTask(cfg, seq_len)

  # -- model
  def model(self, rules=None) -> ActorCritic:
    return ActorCritic(self.cfg, rules, self.value_stop_gradient, self.value_init_std)

  @property
  def batch_axes(self):
    keys = PPO_BATCH_KEYS + (("ref_logprobs",) if self.kl_coef else ())
    return {k: ("batch", "length") for k in keys}

  def init(self, rng):
    """The policy exactly as `DecoderLMTask(cfg).init(rng)` gives it, and a fresh value head."""
    policy = decoder_init_fn(self.cfg)(rng)
    return init_from_policy(policy, self.cfg, jax.random.fold_in(rng, 1), value_init_std=self.value_init_std)

  def init_from_policy(self, policy_params, rng) -> dict:
    return init_from_policy(policy_params, self.cfg, rng, value_init_std=self.value_init_std)

  def forward(self, params, batch: Mapping[str, jax.Array], *, rules=None) -> tuple[jax.Array, jax.Array]:
    """(logits [B, S, V], values [B, S]) for a batch's inputs/positions/segment_ids."""
    return self.model(rules).apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])

  def rollout_values(self, params, batch: Mapping[str, jax.Array], *, rules=None) -> jax.Array:
    """values [B, S] of a rollout (keys inputs, positions, segment_ids; others ignored). Jittable."""
    return self.forward(params, batch, rules=rules)[1]

  def rollout_forward(self, params, batch: Mapping[str, jax.Array], *,
                      rules=None) -> tuple[jax.Array, jax.Array]:
    """(log-probs of targets [B, S], values [B, S]) in one pass: the old policy's numbers, recomputed
    in the training layout as OpenRLHF does (keys inputs, targets, positions, segment_ids). Jittable."""
    logits, values = self.forward(params, batch, rules=rules)
    return rollout_lib.token_logprobs(logits, batch["targets"], self.temperature)[0], values

  # -- loss
  def _agg(self, per_token, mask):
    return self._aggregate(per_token, mask, max_len=self.max_len)

  def _metric(self, per_token, mask):
    if self.aggregation == "token-mean":
      return jnp.sum(per_token.astype(jnp.float32) * mask)
    return _row_mean_sum(per_token.astype(jnp.float32), mask)

  def loss(self, params, batch, rng, *, rules=None, train=True) -> LossOutput:
    del rng, train  # no dropout
    mask = batch["mask"].astype(jnp.float32)
    logits, values = self.forward(params, batch, rules=rules)
    logp, _ = rollout_lib.token_logprobs(logits, batch["targets"], self.temperature)
    old_logp = batch["old_logprobs"].astype(jnp.float32)
    pg_tok, clipped = self._policy_loss(logp, old_logp, batch["advantages"].astype(jnp.float32),
                                        eps_low=self.eps_low, eps_high=self.eps_high, dual_clip=self.dual_clip)
    pg_sum, weight = self._agg(pg_tok, mask)
    vf_tok, vf_clipped = _value_loss_terms(values, batch["old_values"], batch["returns"], mask, self.value_clip)
    vf_sum, _ = self._agg(vf_tok, mask)
    scaled = logits.astype(jnp.float32) / self.temperature if self.temperature != 1.0 else logits
    entropy = self._entropy(scaled)
    loss_sum = pg_sum + self.vf_coef * vf_sum
    if self.entropy_coef:
      ent_sum, _ = self._agg(entropy, mask)
      loss_sum = loss_sum - self.entropy_coef * ent_sum
    entropy = jax.lax.stop_gradient(entropy)
    extra = {}
    if self.kl_coef:
      kl_tok = self._kl(logp, batch["ref_logprobs"].astype(jnp.float32))
      kl_sum, _ = self._agg(kl_tok, mask)
      loss_sum = loss_sum + self.kl_coef * kl_sum
      extra["kl"] = self._metric(jax.lax.stop_gradient(kl_tok), mask)
    approx_kl = jax.lax.stop_gradient(self._k3(old_logp, logp))  # (r - 1) - log r, r = pi_new / pi_old
    metrics = {
        "pg_loss": jax.lax.stop_gradient(pg_sum),
        "vf_loss": jax.lax.stop_gradient(vf_sum),
        "clip_frac": self._metric(clipped.astype(jnp.float32), mask),
        "vf_clip_frac": self._metric(vf_clipped.astype(jnp.float32), mask),
        "entropy": self._metric(entropy, mask),
        "approx_kl": self._metric(approx_kl, mask),
        **extra,
    }
    return LossOutput(loss_sum, weight, metrics)

  # -- bookkeeping (the value head adds one dot product per token)
  @property
  def train_flops_per_example(self) -> float | None:
    return self._lm.train_flops_per_example

  @property
  def throughput_unit(self) -> tuple[str, int]:
    return self._lm.throughput_unit

  def activation_bytes_per_example(self) -> float | None:
    return self._lm.activation_bytes_per_example()

  def describe(self) -> str:
    c = self.cfg
    return (f"PPO actor-critic ({c.num_layers} layers, d_model {c.d_model}, vocab {c.vocab_size}; "
            f"{self.aggregation}, vf_coef {self.vf_coef})")

  def __repr__(self):
    return f"PPOTask({self.cfg!r}, aggregation={self.aggregation!r})"
