"""Parameter creation and sharding for any model: abstract shapes, logical specs, sharded init.

A model is given as an init function `rng -> params` whose leaves may carry Flax
logical-partitioning boxes, as a `Task` (its `init`), or as a `DecoderConfig`.
Parameters are created directly in their sharded layout (a jitted init with
`out_shardings`), so no device ever holds the full model unless the mesh says so.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.task import Task
from mlx_med.core.transformer import DecoderConfig

InitFn = Callable[[jax.Array], Any]


def as_init_fn(model: DecoderConfig | Task | InitFn) -> InitFn:
  if isinstance(model, DecoderConfig):
    from mlx_med.core.lm_task import decoder_init_fn
    return decoder_init_fn(model)
  if isinstance(model, Task):
    return model.init
  if callable(model):
    return model
  raise TypeError(f"expected a DecoderConfig, a Task or an init function rng -> params, got {type(model).__name__}")


def logical_specs(model) -> Any:
  """Pytree (like params) of PartitionSpecs holding *logical* axis names (P() = replicated)."""
  return nn.get_partition_spec(jax.eval_shape(as_init_fn(model), jax.random.key(0)))


def abstract_params(model) -> Any:
  """Pytree of ShapeDtypeStruct for the (unboxed) parameters."""
  return jax.eval_shape(lambda r: nn.unbox(as_init_fn(model)(r)), jax.random.key(0))


def param_shardings(model, rules: sharding_lib.ShardingRules) -> Any:
  """NamedSharding per parameter on `rules.mesh`."""
  return sharding_lib.tree_shardings(rules, logical_specs(model), abstract_params(model))


def init_params(model, rng: jax.Array, rules: sharding_lib.ShardingRules | None = None) -> Any:
  """Random (unboxed) parameters, created sharded when `rules` is given."""
  init = as_init_fn(model)
  fn = lambda r: nn.unbox(init(r))
  if rules is None:
    return jax.jit(fn)(rng)
  return jax.jit(fn, out_shardings=param_shardings(model, rules))(rng)


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
