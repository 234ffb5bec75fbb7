"""The decoder language model as a `Task`: next-token cross-entropy on token batches.

Batches hold five [batch, length] arrays: `inputs`, `targets`, `segment_ids`
(0 = padding; packed sequences never attend across segments), `positions` and
`loss_mask`. The loss is summed over counted tokens and weighted by their number,
so gradient accumulation over micro-batches equals one step on the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mlx_med.core import flops as flops_lib
from mlx_med.core.task import LossOutput, Task
from mlx_med.core.transformer import Decoder, DecoderConfig

TOKEN_BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def decoder_init_fn(cfg: DecoderConfig) -> Callable[[jax.Array], Any]:
  """rng -> the decoder's boxed parameters (logical axes attached). The one place they are built."""
  model = Decoder(cfg)

  def init(rng):
    return model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

  return init


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed masked cross-entropy and the number of counted tokens (fp32)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


class DecoderLMTask(Task):
  """Next-token prediction with `mlx_med.core.transformer.Decoder`."""

  decomposable = True

  def __init__(self, cfg: DecoderConfig, seq_len: int | None = None):
    self.cfg = cfg
    self.seq_len = seq_len

  @property
  def batch_axes(self):
    return {k: ("batch", "length") for k in TOKEN_BATCH_KEYS}

  def init(self, rng):
    return decoder_init_fn(self.cfg)(rng)

  def loss(self, params, batch, rng, *, rules=None, train=True) -> LossOutput:
    del rng, train  # the decoder has no dropout
    logits = Decoder(self.cfg, rules).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                            segment_ids=batch["segment_ids"])
    loss_sum, count = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return LossOutput(loss_sum, count, {})

  @property
  def train_flops_per_example(self) -> float | None:
    if not self.seq_len:
      return None
    return self.seq_len * flops_lib.train_flops_per_token(self.cfg, self.seq_len)

  @property
  def throughput_unit(self) -> tuple[str, int]:
    return ("tokens", int(self.seq_len or 0))

  def activation_bytes_per_example(self) -> float | None:
    """What the backward pass holds for one sequence (an estimate, within ~2x).

    Per token and layer: remat "none" keeps every intermediate, "dots" the matmul
    outputs, "full" the layer input; during the backward pass one layer's whole
    working set is live again. Backends "xla" and "jax" materialise the fp32
    attention scores and probabilities [heads, T, T]. The fp32 logits and their
    gradient add 3 x vocab x 4 bytes per token.
    """
    if not self.seq_len:
      return None
    c, t = self.cfg, int(self.seq_len)
    b = jnp.dtype(c.dtype).itemsize
    hd, h, k, d, m = c.resolved_head_dim, c.num_heads, c.num_kv_heads, c.d_model, c.mlp_dim
    matmul_outputs = ((h + 2 * k) * hd + h * hd + d + 2 * m + d) * b
    everything = matmul_outputs + (5 * d + m) * b
    scores = 2 * h * t * 4 if c.attention_backend in ("xla", "jax") else 0
    kept = {"none": everything + scores, "dots": matmul_outputs + d * b, "full": d * b}[c.remat]
    working_set = everything + scores
    per_token = c.num_layers * kept + (working_set if c.remat != "none" else 0) + 3 * c.vocab_size * 4 + 2 * d * b
    return float(per_token * t)

  def describe(self) -> str:
    c = self.cfg
    return f"decoder LM ({c.num_layers} layers, d_model {c.d_model}, vocab {c.vocab_size})"

  def __repr__(self):
    return f"DecoderLMTask({self.cfg!r}, seq_len={self.seq_len})"
