"""Parameter creation and sharding: abstract shapes, logical specs, jitted sharded init.

Parameters are created directly in their sharded layout (a jitted init with
`out_shardings`), so no device ever holds the full model unless the mesh says so.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.transformer import Decoder, DecoderConfig


def _dummy_tokens(batch: int = 1, length: int = 8):
  return jnp.zeros((batch, length), jnp.int32)


def logical_specs(cfg: DecoderConfig) -> Any:
  """Pytree (like params) of PartitionSpecs holding *logical* axis names."""
  abstract = jax.eval_shape(lambda r: Decoder(cfg).init(r, _dummy_tokens()), jax.random.key(0))
  return nn.get_partition_spec(abstract)["params"]


def abstract_params(cfg: DecoderConfig) -> Any:
  """Pytree of ShapeDtypeStruct for the (unboxed) parameters."""
  abstract = jax.eval_shape(lambda r: nn.unbox(Decoder(cfg).init(r, _dummy_tokens())), jax.random.key(0))
  return abstract["params"]


def param_shardings(cfg: DecoderConfig, rules: sharding_lib.ShardingRules) -> Any:
  """NamedSharding per parameter on `rules.mesh`."""
  return sharding_lib.tree_shardings(rules, logical_specs(cfg), abstract_params(cfg))


def init_params(cfg: DecoderConfig, rng: jax.Array, rules: sharding_lib.ShardingRules | None = None) -> Any:
  """Random parameters, created sharded when `rules` is given."""
  model = Decoder(cfg)

  def init(r):
    return nn.unbox(model.init(r, _dummy_tokens()))["params"]

  if rules is None:
    return jax.jit(init)(rng)
  return jax.jit(init, out_shardings=param_shardings(cfg, rules))(rng)


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
