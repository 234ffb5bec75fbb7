"""The one tiny decoder the tests share, and cached random parameters for it.

Every test that needs "some small decoder" uses `TINY` (or `tiny(...)` with the one or
two fields the test is really about), so the suite compiles a handful of shapes instead
of one per file, and the persistent compilation cache set up in `conftest.py` serves
them across files and runs. Sizes divide by 8, so every mesh of the 8 fake CPU devices
can split vocabulary, model and MLP dimensions.

Import as `from tiny import TINY, tiny, tiny_params` (pytest puts `tests/` on the path
for `conftest.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mlx_med.core import params as params_lib
from mlx_med.core.transformer import DecoderConfig

TINY = DecoderConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                     max_seq_len=128)

# Generation tests want spread-out logits (init_std 0.3: greedy choices are never near
# ties, so cached and cache-free paths agree on every token) and the Qwen2-style q/k/v
# bias, which the KV cache must carry.
TINY_GENERATE = dataclasses.replace(TINY, qkv_bias=True, init_std=0.3)


def tiny(**overrides) -> DecoderConfig:
  """`TINY` with a few fields changed (name only what the test depends on)."""
  return dataclasses.replace(TINY, **overrides)


@functools.cache
def _params(cfg: DecoderConfig, seed: int):
  return params_lib.init_params(cfg, jax.random.key(seed))


def tiny_params(cfg: DecoderConfig = TINY, seed: int = 0, rules=None):
  """Random parameters for `cfg`, initialised once per session per (cfg, seed).

  Each call returns fresh device buffers, so a train step that donates its state
  cannot delete another test's copy. With `rules`, they are placed with the
  parameter shardings those rules give.
  """
  params = jax.tree.map(jnp.copy, _params(cfg, seed))
  if rules is not None:
    params = jax.device_put(params, params_lib.param_shardings(cfg, rules))
  return params
