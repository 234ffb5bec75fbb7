"""The jitted training step for any `Task`: loss and gradients (with accumulation),
the optimizer update, an optional EMA of the parameters, and a NaN/Inf guard that
skips a bad update instead of poisoning the weights.

State is a plain dict pytree {"step", "params", "opt_state", "rng", "nan_skips",
"nan_streak"[, "ema_params"]} so Orbax saves and restores it as is.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import optax

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.task import LossOutput, Task

Batch = Mapping[str, jax.Array]


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int, ema: bool = False) -> dict:
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": optimizer.init(params),
      "rng": jax.random.key_data(jax.random.key(seed)),
      "nan_skips": jnp.zeros((), jnp.int32),
      "nan_streak": jnp.zeros((), jnp.int32),
  }
  if ema:
    state["ema_params"] = jax.tree.map(jnp.copy, params)
  return state


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def split_microbatches(batch: Batch, grad_accum: int, batch_axes: Mapping[str, tuple], rules=None) -> dict:
  """[B, ...] -> [grad_accum, B / grad_accum, ...] without moving rows between devices.

  Micro-batch i takes rows i, i + A, i + 2A, ... (A = grad_accum). With the batch
  axis sharded in contiguous blocks, every device then holds B / (A * devices) rows
  of every micro-batch, so the split is a local reshape. (Taking contiguous row
  ranges instead would put the sharded axis on the scan axis and make XLA move
  the inputs between devices.)
  """
  def split(key, x):
    b = x.shape[0]
    micro = x.reshape((b // grad_accum, grad_accum) + x.shape[1:])
    micro = jnp.swapaxes(micro, 0, 1)
    return sharding_lib.constrain(rules, micro, (None,) + tuple(batch_axes[key]))
  return {k: split(k, v) for k, v in batch.items()}


def _step_rng(state) -> jax.Array:
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def _check_batch(task: Task, batch: Batch, grad_accum: int) -> None:
  expected = set(task.batch_axes)
  if set(batch) != expected:
    raise ValueError(f"batch keys {sorted(batch)} do not match {task.describe()}'s batch_axes {sorted(expected)}")
  sizes = {k: v.shape[0] for k, v in batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch arrays disagree on the batch size: {sizes}")
  for k, v in batch.items():
    chex.assert_rank(v, len(task.batch_axes[k]))
  b = next(iter(sizes.values()))
  if b % grad_accum:
    raise ValueError(f"batch size {b} is not divisible by train.grad_accum={grad_accum}")


def make_grad_fn(task: Task, grad_accum: int = 1, rules=None) -> Callable:
  """(params, batch, rng) -> (LossOutput of the whole batch, gradients of loss_sum).

  grad_accum > 1: decomposable losses sum micro-batch gradients; batch-level losses
  use cached-feature accumulation (exact), or are refused.
  """
  axes = task.batch_axes

  def loss_fn(params, batch, rng):
    out = task.loss(params, batch, rng, rules=rules, train=True)
    return out.loss_sum, out

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    def single(params, batch, rng):
      (_, out), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0))
      return out, grads
    return single

  if task.decomposable:
    def summed(params, batch, rng):
      micro = split_microbatches(batch, grad_accum, axes, rules)

      def accumulate(carry, inputs):
        i, mb = inputs
        g_acc, l_acc, w_acc, m_acc = carry
        (_, out), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        m = {k: m_acc[k] + out.metrics[k] for k in m_acc}
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + out.loss_sum, w_acc + out.weight, m), None

      first = jax.eval_shape(lambda: task.loss(params, jax.tree.map(lambda x: x[0], micro), rng, rules=rules))
      zeros_m = {k: jnp.zeros(v.shape, v.dtype) for k, v in first.metrics.items()}
      zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_m)
      (grads, loss_sum, weight, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
      return LossOutput(loss_sum, weight, metrics), grads
    return summed

  if not task.supports_feature_accumulation:
    raise ValueError(
        f"{task.describe()}: its loss does not decompose over examples, so train.grad_accum={grad_accum} cannot "
        "sum micro-batch gradients; set train.grad_accum=1, or implement Task.features and "
        "Task.loss_on_features for exact cached-feature accumulation")

  def cached_features(params, batch, rng):
    micro = split_microbatches(batch, grad_accum, axes, rules)
    ids = jnp.arange(grad_accum)
    feats_fn = lambda p, mb, i: task.features(p, mb, jax.random.fold_in(rng, i), rules=rules, train=True)
    # Pass 1: features of every micro-batch, no activations kept.
    feats = jax.lax.map(lambda x: feats_fn(jax.lax.stop_gradient(params), x[1], x[0]), (ids, micro))
    merged = jax.tree.map(lambda f: jnp.swapaxes(f, 0, 1).reshape((-1,) + f.shape[2:]), feats)

    def on_features(p, f):
      out = task.loss_on_features(p, f, batch, rules=rules)
      return out.loss_sum, out

    (_, out), (g_direct, g_feats) = jax.value_and_grad(on_features, argnums=(0, 1), has_aux=True)(params, merged)
    # Back to micro-batch layout (row j*A + i belongs to micro-batch i).
    g_feats = jax.tree.map(
        lambda g: jnp.swapaxes(g.reshape((g.shape[0] // grad_accum, grad_accum) + g.shape[1:]), 0, 1), g_feats)

    # Pass 2: one backward per micro-batch with the features' cotangents.
    def backward(g_acc, inputs):
      i, mb, ct = inputs
      _, vjp = jax.vjp(lambda p: feats_fn(p, mb, i), params)
      return jax.tree.map(jnp.add, g_acc, vjp(ct)[0]), None

    grads, _ = jax.lax.scan(backward, g_direct, (ids, micro, g_feats))
    return out, grads
  return cached_features


def make_train_step(task: Task, optimizer: optax.GradientTransformation, schedule: optax.Schedule | None = None,
                    grad_accum: int = 1, rules=None, ema_decay: float = 0.0) -> Callable:
  """Returns `step(state, batch) -> (state, metrics)` (not yet jitted).

  The update equals one step on the whole batch whatever `grad_accum` is: gradients
  of the summed loss are divided by the total weight (tokens, examples, ...).
  """
  grads_of = make_grad_fn(task, grad_accum, rules)

  def step(state, batch: Batch):
    _check_batch(task, batch, grad_accum)
    params = state["params"]
    out, grads = grads_of(params, batch, _step_rng(state))
    denom = jnp.maximum(out.weight, 1e-9)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = out.loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & _all_finite(grads)

    updates, new_opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    # Skip the update (keep params, EMA and optimizer moments) when anything is NaN/Inf.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "rng": state["rng"],
        "nan_skips": state["nan_skips"] + (~finite).astype(jnp.int32),
        "nan_streak": jnp.where(finite, 0, state["nan_streak"] + 1),
    }
    if "ema_params" in state:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p.astype(e.dtype),
                         state["ema_params"], new_params)
      new_state["ema_params"] = keep(ema, state["ema_params"])
    metrics = {
        "loss": loss,
        "weight": out.weight,
        "grad_norm": grad_norm,
        "finite": finite,
        "nan_skips": new_state["nan_skips"],
        "nan_streak": new_state["nan_streak"],
        **{k: v / denom for k, v in out.metrics.items()},
    }
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    return new_state, metrics

  return step


def make_eval_step(task: Task, rules=None) -> Callable:
  """`eval_step(params, batch) -> {"loss_sum", "weight", **metric sums}` (sums: add them over batches)."""

  def eval_step(params, batch: Batch):
    _check_batch(task, batch, 1)
    out = task.eval_metrics(params, batch, rules=rules)
    return {"loss_sum": out.loss_sum, "weight": out.weight, **out.metrics}

  return eval_step
