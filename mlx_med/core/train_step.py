"""The jitted training step: token cross-entropy, gradient accumulation, AdamW,
and a NaN/Inf guard that skips a bad update instead of poisoning the weights.

State is a plain dict pytree {"step", "params", "opt_state", "rng", "nan_skips",
"nan_streak"} so Orbax saves and restores it as is.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mlx_med.core.transformer import Decoder, DecoderConfig

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions, loss_mask: [B, T]


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed masked cross-entropy and the number of counted tokens (fp32)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def make_loss_fn(model_cfg: DecoderConfig, rules=None) -> Callable:
  model = Decoder(model_cfg, rules)

  def loss_fn(params, batch: Batch):
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    loss_sum, count = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss_sum, count

  return loss_fn


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> dict:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": optimizer.init(params),
      "rng": jax.random.key_data(jax.random.key(seed)),
      "nan_skips": jnp.zeros((), jnp.int32),
      "nan_streak": jnp.zeros((), jnp.int32),
  }


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model_cfg: DecoderConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, grad_accum: int = 1, rules=None) -> Callable:
  """Returns `step(state, batch) -> (state, metrics)` (not yet jitted).

  With grad_accum > 1 the batch is split into that many micro-batches along the
  batch axis and gradients are summed, then divided by the total token count: the
  update equals one step on the whole batch.
  """
  loss_fn = make_loss_fn(model_cfg, rules)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch: Batch):
    params = state["params"]
    if grad_accum == 1:
      (loss_sum, count), grads = grad_fn(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

      def accumulate(carry, mb):
        g_acc, l_acc, c_acc = carry
        (l, c), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & _all_finite(grads)

    updates, new_opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    # Skip the update (keep params and optimizer moments) when anything is NaN/Inf.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "rng": jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 1)),
        "nan_skips": state["nan_skips"] + (~finite).astype(jnp.int32),
        "nan_streak": jnp.where(finite, 0, state["nan_streak"] + 1),
    }
    metrics = {
        "loss": loss,
        "tokens": count,
        "grad_norm": grad_norm,
        "finite": finite,
        "nan_skips": new_state["nan_skips"],
        "nan_streak": new_state["nan_streak"],
    }
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    return new_state, metrics

  return step


def make_eval_step(model_cfg: DecoderConfig, rules=None) -> Callable:
  loss_fn = make_loss_fn(model_cfg, rules)

  def eval_step(params, batch: Batch):
    loss_sum, count = loss_fn(params, batch)
    return {"loss_sum": loss_sum, "tokens": count}

  return eval_step
