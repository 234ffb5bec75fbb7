"""Optimizers and learning-rate schedules, chosen by name from the config."""

from __future__ import annotations

from typing import Any

import jax
import optax


def make_schedule(cfg) -> optax.Schedule:
  """`cfg`: lr, warmup_steps, steps, schedule (cosine | wsd | constant), min_lr_ratio, decay_fraction."""
  peak, warmup, total = float(cfg.lr), int(cfg.warmup_steps), int(cfg.steps)
  floor = peak * float(cfg.min_lr_ratio)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if cfg.schedule == "cosine":
    body = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=float(cfg.min_lr_ratio))
  elif cfg.schedule == "wsd":
    # Warmup-stable-decay: constant plateau, then a linear cool-down over the last
    # `decay_fraction` of training; lets one run serve several compute budgets.
    decay_steps = max(int(round(float(cfg.decay_fraction) * total)), 1)
    stable = max(total - warmup - decay_steps, 0)
    body = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)], [stable])
  elif cfg.schedule == "constant":
    body = optax.constant_schedule(peak)
  else:
    raise ValueError(f"train.schedule={cfg.schedule!r}: choose cosine, wsd or constant")
  return optax.join_schedules([warm, body], [warmup])


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices (kernels, embeddings) only; never on norms or biases."""
  def is_matrix(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", str(last)))
    return name in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(cfg)
  chain = []
  if float(cfg.grad_clip) > 0:
    chain.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  chain.append(optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=_decay_mask))
  return optax.chain(*chain), schedule
