"""From sampled completions to the arrays a policy update trains on.

A rollout (`Sampler.generate_arrays`) gives, per row, a left-padded prompt block
[B, P] and generated tokens [B, N]. The update runs the decoder once over the
concatenation [B, P + N] in the training layout:

  slot        0 .. P-len-1 | P-len .. P-1 | P .. P+n-1  | P+n .. P+N-1
  segment     0 (pad)      | 1 (prompt)   | 1 (answer)  | 0 (pad)
  position    0            | 0 .. len-1   | len .. len+n-1 | 0

`inputs` are the slots and `targets` the next slot's token, so `mask[t] = 1` exactly
where `targets[t]` is a generated token (t = P-1 .. P+n-2). The positions equal those
the sampler used, so the update's log-probabilities are the rollout policy's up to
floating-point noise. Tokens forced by the think budget (X-Reasoner's forced exit) were
not sampled from the policy; `mask_forced` leaves them out of the loss.

`token_logprobs` is the one place log-probabilities and entropies of targets are
computed from logits (the update's loss, the reference model, the recomputed
behaviour policy).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core.transformer import Decoder, DecoderConfig, project_to_vocab
from mlx_med.rl import functions

UPDATE_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask")


def assemble(prompt: np.ndarray, prompt_lens: np.ndarray, tokens: np.ndarray, lengths: np.ndarray,
             forced: np.ndarray | None = None, *, mask_forced: bool = True) -> dict[str, np.ndarray]:
  """Host arrays of one rollout -> {inputs, targets, positions, segment_ids, mask} [B, P + N]."""
  b, p = prompt.shape
  n = tokens.shape[1]
  seq = np.concatenate([prompt, tokens], axis=1).astype(np.int32)
  slots = np.arange(p + n)[None, :]
  start = (p - prompt_lens)[:, None]
  end = (p + lengths)[:, None]
  real = (slots >= start) & (slots < end)
  segment_ids = real.astype(np.int32)
  positions = np.where(real, slots - start, 0).astype(np.int32)
  targets = np.zeros_like(seq)
  targets[:, :-1] = seq[:, 1:]
  # target slot t+1 is a generated token: P <= t+1 < P + n
  target_slot = slots + 1
  mask = (target_slot >= p) & (target_slot < end)
  if forced is not None and mask_forced:
    forced_slot = np.zeros((b, p + n), bool)
    forced_slot[:, p - 1:p + n - 1] = forced.astype(bool)
    mask &= ~forced_slot
  inputs = np.where(real, seq, 0).astype(np.int32)
  targets = np.where(mask, targets, 0).astype(np.int32)
  return {"inputs": inputs, "targets": targets, "positions": positions, "segment_ids": segment_ids,
          "mask": mask.astype(np.float32)}


def completion_values(per_slot: np.ndarray, prompt_width: int) -> np.ndarray:
  """[B, P + N] values aligned with targets -> [B, N] aligned with generated tokens."""
  return per_slot[:, prompt_width - 1:-1]


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """log p(target) [B, T] (fp32) from logits [B, T, V] divided by the sampling temperature,
  and the entropy of that distribution when asked."""
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  entropy = functions.token_entropy(logits) if with_entropy else None
  return logp, entropy


@functools.partial(jax.jit, static_argnames=("cfg", "rules", "temperature", "start"))
def sequence_logprobs(params: Any, batch: dict, *, cfg: DecoderConfig, rules=None, temperature: float = 1.0,
                      start: int = 0) -> jax.Array:
  """log p(targets) [B, T] under a decoder in the training layout (reference / behaviour policy);
  columns before `start` (no counted target there) are 0 and skip the output projection."""
  model = Decoder(cfg, rules)
  _, hidden = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"], return_hidden=True)
  logits = model.apply({"params": params}, hidden[:, start:], method=project_to_vocab)
  logp, _ = token_logprobs(logits, batch["targets"][:, start:], temperature)
  logp = logp * batch["mask"][:, start:]
  return jnp.pad(logp, ((0, 0), (start, 0))) if start else logp
