"""Optimizers and learning-rate schedules, chosen by name from the config."""

from __future__ import annotations

import re
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


def _param_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_group_labels(params: Any, groups) -> Any:
  """Each parameter's group name: the first group whose `pattern` (a regex searched in the
  "/"-joined parameter path, e.g. "lm_head/") matches, else "default"."""
  compiled = [(name, re.compile(str(g.pattern))) for name, g in groups.items()]
  used = set()

  def label(path, _):
    text = _param_path(path)
    for name, pattern in compiled:
      if pattern.search(text):
        used.add(name)
        return name
    return "default"

  labels = jax.tree_util.tree_map_with_path(label, params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  unused = [name for name, _ in compiled if name not in used]
  if unused and leaves:  # (optax also calls this on leafless placeholder trees)
    raise ValueError(f"train.param_groups {unused}: pattern matches no parameter (paths look like "
                     f"{_param_path(leaves[0][0])!r})")
  return labels


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decay on matrices only) with global-norm clipping; `cfg.param_groups` (optional)
  gives groups of parameters their own `lr_scale` and `weight_decay` (-1 = the default's)."""
  schedule = make_schedule(cfg)
  chain = []
  if float(cfg.grad_clip) > 0:
    chain.append(optax.clip_by_global_norm(float(cfg.grad_clip)))

  def adamw(lr_scale: float, weight_decay: float):
    lr = schedule if lr_scale == 1.0 else (lambda step: lr_scale * schedule(step))
    return optax.adamw(lr, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps), weight_decay=weight_decay,
                       mask=_decay_mask)

  groups = cfg.get("param_groups") or {}
  if not groups:
    chain.append(adamw(1.0, float(cfg.weight_decay)))
  else:
    transforms = {"default": adamw(1.0, float(cfg.weight_decay))}
    for name, g in groups.items():
      if name == "default":
        raise ValueError("train.param_groups: 'default' is reserved for parameters no group matches")
      unknown = set(g.keys()) - {"pattern", "lr_scale", "weight_decay"}
      if unknown or "pattern" not in g:
        raise ValueError(f"train.param_groups.{name}: keys are pattern, lr_scale, weight_decay (got {sorted(g)})")
      decay = float(g.get("weight_decay", -1.0))
      transforms[name] = adamw(float(g.get("lr_scale", 1.0)), float(cfg.weight_decay) if decay < 0 else decay)
    chain.append(optax.multi_transform(transforms, lambda params: param_group_labels(params, groups)))
  return optax.chain(*chain), schedule
