"""Batched autoregressive sampling over a static KV cache (shared by serving and RL).

Design, in short (details in docs/DESIGN.md, "LLM core"):

* Prompts of different lengths are **left-padded** into one [B, P] block. Pad slots
  get segment id 0 (so nothing attends to them) and every real token gets the rotary
  position "number of real tokens before it", so a padded row computes exactly what
  the same prompt would compute alone.
* One jitted **prefill** runs the prompt block through the decoder, creates the
  static cache [L, B, P + N, K, D] and samples the first token. One jitted **decode**
  function then runs a `lax.while_loop` over single-token steps until every row is
  done or a step bound is reached. Its state (cache included) is donated, so calls
  never hold two caches. The step bound is a traced scalar: streaming calls the
  same compiled function in chunks, batch jobs call it once.
* Everything that varies per request is an array (temperature, top-k/p, min-p,
  penalties, seeds, stop ids, max new tokens, think budgets), so one compiled program
  serves any mix of requests. Only shapes and two batch-level flags (sampling mode,
  penalties on/off) are static, and shapes are **bucketed** (batch, prompt length,
  new-token length, number of top alternatives) to bound the number of compiles.
* Randomness is per row: row b at step i draws one uniform number from
  `fold_in(key(seed_b), i)` and inverts the (truncated) CDF. A request with a seed
  therefore produces the same tokens whichever batch it lands in, and sharded
  sampling equals unsharded sampling.
* Per-token log-probabilities are those of the raw model distribution (before
  penalties, temperature and truncation), as vLLM returns by default; for RL rollouts
  sampled at temperature 1 without truncation they are the behaviour policy's.
  Optional top-k alternatives come along for the OpenAI API.
* Stop strings need text, so they are checked on the host between chunks by a
  caller-supplied `detokenize` function; the matched row is then marked done.
* `think_budget`: after that many generated tokens a row that has not closed its
  reasoning block is forced to emit the closing tag (X-Reasoner's forced exit); a
  tag the model writes itself (even partially) is tracked so it is never doubled.

This module imports only `mlx_med.core`; text and chat templates live in `mlx_med.llm`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.transformer import Decoder, DecoderConfig, init_cache, project_to_vocab

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample one request. Defaults follow the OpenAI/vLLM conventions.

  temperature: 0 means greedy (argmax); otherwise logits are divided by it.
  top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass (1 = off).
  min_p: drop tokens whose probability is below min_p * max probability (0 = off).
  stop_token_ids: generation ends after one of these (it is kept in `tokens`).
  stop_strings: generation ends when the text contains one (needs `detokenize`);
    the returned text is cut before it unless include_stop_str_in_output.
  seed: per-request seed; None draws one from the sampler's generator.
  num_top_logprobs: also return this many most likely alternatives per token.
  think_budget / think_close_ids: after `think_budget` generated tokens, force the
    token ids of the closing tag (e.g. `</think>`) unless the model already wrote it.
  presence_penalty / frequency_penalty: OpenAI's, subtracted from the logits of tokens
    already generated (once / per occurrence). repetition_penalty: the CTRL/HF/vLLM
    one over prompt and generated tokens (logit / p if positive, * p if negative).
  """

  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  stop_token_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  include_stop_str_in_output: bool = False
  seed: Optional[int] = None
  num_top_logprobs: int = 0
  think_budget: Optional[int] = None
  think_close_ids: tuple[int, ...] = ()
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    # Tuples keep the dataclass hashable; accept lists from callers.
    for name in ("stop_token_ids", "stop_strings", "think_close_ids"):
      value = getattr(self, name)
      if isinstance(value, str):
        value = (value,)
      object.__setattr__(self, name, tuple(value))
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
      raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
    if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
      raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
    if not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
    if self.num_top_logprobs < 0:
      raise ValueError(f"num_top_logprobs must be >= 0, got {self.num_top_logprobs}")
    if any(not s for s in self.stop_strings):
      raise ValueError("stop strings must be non-empty")
    if self.think_budget is not None:
      if self.think_budget < 0:
        raise ValueError(f"think_budget must be >= 0, got {self.think_budget}")
      if not self.think_close_ids:
        raise ValueError("think_budget needs think_close_ids (the token ids of the closing tag)")


@dataclasses.dataclass
class SampleOutput:
  """One finished row. `tokens` includes a stop token that ended it (not stop strings' text).

  finish_reason: "stop" (stop token or stop string) or "length" (max_new_tokens).
  stop_reason: the stop token id or stop string that ended the row, else None.
  forced: per token, whether the think-budget hook forced it (RL may mask these).
  """

  prompt_tokens: list[int]
  tokens: list[int]
  logprobs: list[float]
  finish_reason: str
  stop_reason: Any = None
  top_logprobs: Optional[list[list[tuple[int, float]]]] = None
  forced: list[bool] = dataclasses.field(default_factory=list)
  text: Optional[str] = None


@dataclasses.dataclass
class StreamUpdate:
  """What changed for one row during one chunk of decoding (see `Sampler.stream`)."""

  index: int
  new_tokens: list[int]
  new_logprobs: list[float]
  new_top_logprobs: Optional[list[list[tuple[int, float]]]]
  text: Optional[str]  # full text so far (held back where a stop string might start)
  finished: bool
  output: Optional[SampleOutput]  # set once finished


class RolloutArrays(NamedTuple):
  """`Sampler.generate_arrays` output: device arrays, one row per prompt.

  prompt [B, P] left-padded prompt block (pads are the sampler's pad id), prompt_lens [B];
  tokens / logprobs / forced [B, N]: generated tokens (a stop token included), their raw
  log-probabilities and whether the think-budget hook forced them; valid up to lengths [B];
  stopped [B]: ended by a stop token (else by max_new_tokens).
  """

  prompt: jax.Array
  prompt_lens: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  forced: jax.Array
  lengths: jax.Array
  stopped: jax.Array


class RowParams(NamedTuple):
  """Per-row sampling controls as device arrays (one compiled program for any mix)."""

  prompt_lens: jax.Array  # [B] int32
  temperature: jax.Array  # [B] f32
  top_k: jax.Array  # [B] int32
  top_p: jax.Array  # [B] f32
  min_p: jax.Array  # [B] f32
  seeds: jax.Array  # [B] uint32
  max_new: jax.Array  # [B] int32
  stop_ids: jax.Array  # [B, S] int32, -1 = unused
  think_budget: jax.Array  # [B] int32, -1 = none
  think_close: jax.Array  # [B, C] int32
  think_close_len: jax.Array  # [B] int32
  presence: jax.Array  # [B] f32
  frequency: jax.Array  # [B] f32
  repetition: jax.Array  # [B] f32
  next_position: jax.Array  # [B] int32 rotary position of the first generated token (default: prompt_lens)


class DecodeState(NamedTuple):
  """Everything the decode loop carries; donated between calls."""

  cache: dict
  tokens: jax.Array  # [B, N] generated tokens
  logprobs: jax.Array  # [B, N]
  top_ids: jax.Array  # [B, N, K]
  top_logprobs: jax.Array  # [B, N, K]
  forced: jax.Array  # [B, N] bool
  last: jax.Array  # [B] last generated token (next decoder input)
  step: jax.Array  # scalar: tokens generated so far (same for all rows)
  num: jax.Array  # [B] valid tokens per row
  done: jax.Array  # [B] bool
  stopped: jax.Array  # [B] bool, ended by a stop token
  think_progress: jax.Array  # [B] matched prefix length of the closing tag
  think_closed: jax.Array  # [B] bool
  counts: jax.Array  # [B, V] int32 generated-token counts ([B, 0] when no row uses penalties)
  prompt_seen: jax.Array  # [B, V] bool prompt tokens ([B, 0] likewise)


# --------------------------------------------------------------------------- buckets


def bucket(n: int, minimum: int = 16, maximum: Optional[int] = None) -> int:
  """Next power of two >= n (at least `minimum`), capped at `maximum` when that still fits."""
  b = max(minimum, 1 << max(0, (n - 1).bit_length()))
  if maximum is not None and n <= maximum < b:
    return maximum
  return b


def neutral_rows(num: int, *, n_stop: int, n_close: int) -> dict:
  """Host arrays of neutral `RowParams` for `num` rows (numpy; filled by `set_row`, then device_put)."""
  return dict(
      prompt_lens=np.ones(num, np.int32), temperature=np.zeros(num, np.float32), top_k=np.zeros(num, np.int32),
      top_p=np.ones(num, np.float32), min_p=np.zeros(num, np.float32), seeds=np.zeros(num, np.uint32),
      max_new=np.ones(num, np.int32), stop_ids=np.full((num, n_stop), -1, np.int32),
      think_budget=np.full(num, -1, np.int32), think_close=np.full((num, n_close), -1, np.int32),
      think_close_len=np.zeros(num, np.int32), presence=np.zeros(num, np.float32),
      frequency=np.zeros(num, np.float32), repetition=np.ones(num, np.float32), next_position=np.ones(num, np.int32))


def set_row(rows: dict, i: int, sp: SamplingParams, prompt_len: int, *, vocab_size: int,
            rng: np.random.Generator) -> None:
  """Writes request `sp` (a prompt of `prompt_len` tokens) into row i of `neutral_rows` arrays; a
  request without a seed draws one from `rng`."""
  rows["prompt_lens"][i] = prompt_len
  rows["next_position"][i] = prompt_len
  rows["temperature"][i] = sp.temperature
  rows["top_k"][i] = min(sp.top_k, vocab_size)
  rows["top_p"][i] = sp.top_p
  rows["min_p"][i] = sp.min_p
  rows["presence"][i] = sp.presence_penalty
  rows["frequency"][i] = sp.frequency_penalty
  rows["repetition"][i] = sp.repetition_penalty
  seed = sp.seed if sp.seed is not None else int(rng.integers(0, 2**32))
  rows["seeds"][i] = np.uint32(seed % (2**32))
  rows["max_new"][i] = sp.max_new_tokens
  rows["stop_ids"][i, :len(sp.stop_token_ids)] = sp.stop_token_ids
  if sp.think_budget is not None:
    rows["think_budget"][i] = sp.think_budget
    rows["think_close"][i, :len(sp.think_close_ids)] = sp.think_close_ids
    rows["think_close_len"][i] = len(sp.think_close_ids)


# ------------------------------------------------------------------- token choice


def _sample_tokens(logits: jax.Array, rows: RowParams, step: jax.Array, mode: str = "sorted") -> jax.Array:
  """Chooses one token per row: argmax for temperature 0, else truncated sampling.

  `mode` is static and picked per batch by the host ("greedy": every row has
  temperature 0; "sample": no row uses top-k/top-p; "sorted": some row does), so a
  batch never pays (in compile or run time) for a vocabulary sort it does not need.
  Truncation is one logit threshold per row (top-k, then top-p over the renormalised
  top-k set, then min-p), so no gather/scatter over the vocabulary is needed.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if mode == "greedy":
    return greedy
  if mode not in ("sample", "sorted"):
    raise ValueError(f"unknown sampling mode {mode!r}")
  temperature = rows.temperature
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  scaled = logits / safe_t[:, None]
  threshold = jnp.full(scaled.shape[:1], _NEG_INF, scaled.dtype)
  if mode == "sorted":
    desc = -jnp.sort(-scaled, axis=-1)
    ranks = jnp.arange(scaled.shape[-1], dtype=jnp.int32)[None, :]
    keep_k = (rows.top_k[:, None] <= 0) | (ranks < rows.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep_k, desc, _NEG_INF), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep_k & ((mass_before < rows.top_p[:, None]) | (rows.top_p[:, None] >= 1.0))
    kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(desc, (kept - 1)[:, None], axis=-1)[:, 0]
  # min-p: p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p).
  max_logit = jnp.max(scaled, axis=-1)
  min_p_threshold = jnp.where(rows.min_p > 0, max_logit + jnp.log(jnp.maximum(rows.min_p, 1e-30)), _NEG_INF)
  threshold = jnp.maximum(threshold, min_p_threshold)
  probs = jax.nn.softmax(jnp.where(scaled >= threshold[:, None], scaled, _NEG_INF), axis=-1)

  def row_uniform(seed, row_step):
    # (0, 1]: never 0, so a zero-probability token can never be picked.
    return 1.0 - jax.random.uniform(jax.random.fold_in(jax.random.key(seed), row_step), (), jnp.float32)

  # `step` is a scalar (every row at the same step) or a [B] vector (continuous batching):
  # the draw depends only on the row's seed and its own step either way.
  steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), rows.seeds.shape)
  sampled = _inverse_cdf(probs, jax.vmap(row_uniform)(rows.seeds, steps))
  return jnp.where(temperature > 0, sampled, greedy)


def _inverse_cdf(probs: jax.Array, u: jax.Array, block: int = 256) -> jax.Array:
  """Token whose cumulative probability first reaches u * total, per row.

  One uniform number per row instead of Gumbel noise over the whole vocabulary
  (which costs ~15x more on CPU for a 32k vocabulary), and a two-level search
  (block sums, then one block) instead of a full-vocabulary prefix sum.
  """
  batch, vocab = probs.shape
  padded = -(-vocab // block) * block
  blocks = jnp.pad(probs, ((0, 0), (0, padded - vocab))).reshape(batch, padded // block, block)
  block_mass = blocks.sum(axis=-1)
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  target = u * block_cdf[:, -1]
  blk = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), padded // block - 1)
  inside = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]
  before = jnp.take_along_axis(block_cdf - block_mass, blk[:, None], axis=1)[:, 0]
  offset = jnp.sum(before[:, None] + jnp.cumsum(inside, axis=-1) < target[:, None], axis=-1)
  return jnp.minimum(blk * block + jnp.minimum(offset, block - 1), vocab - 1).astype(jnp.int32)


def sampling_mode(sampling: Sequence[SamplingParams]) -> str:
  """The cheapest `_sample_tokens` mode that serves every row of a batch."""
  if all(sp.temperature == 0 for sp in sampling):
    return "greedy"
  if any(sp.temperature > 0 and (sp.top_k > 0 or sp.top_p < 1) for sp in sampling):
    return "sorted"
  return "sample"


def _apply_penalties(logits: jax.Array, state, rows: RowParams) -> jax.Array:
  """Repetition (prompt + generated tokens), presence and frequency (generated) penalties.

  `state` is anything with `counts` [B, V] and `prompt_seen` [B, V] (this module's
  `DecodeState`, or the continuous-batching slot state)."""
  seen = state.prompt_seen | (state.counts > 0)
  rep = rows.repetition[:, None]
  logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
  return (logits - rows.presence[:, None] * (state.counts > 0)
          - rows.frequency[:, None] * state.counts.astype(logits.dtype))


def pick_tokens(state, logits: jax.Array, rows: RowParams, step: jax.Array, mode: str, *,
                penalties: bool, allowed: Optional[jax.Array] = None) -> tuple[jax.Array, ...]:
  """The one implementation of token choice (static sampler and continuous batching).

  `state` has think_progress / think_closed [B] (and counts / prompt_seen when
  `penalties`); `step` is the scalar or per-row [B] count of tokens generated so far.
  `allowed` [B, V] bool (a grammar's mask) removes tokens before penalties, temperature
  and truncation. Returns (token, force, new think progress, think_closed).
  """
  if allowed is not None:
    logits = jnp.where(allowed, logits, _NEG_INF)
  sampled = _sample_tokens(_apply_penalties(logits, state, rows) if penalties else logits, rows, step, mode)

  # Think-budget hook: force the next closing-tag token once the budget is spent.
  has_budget = rows.think_budget >= 0
  force = has_budget & ~state.think_closed & (step >= rows.think_budget)
  close_len = jnp.maximum(rows.think_close_len, 1)
  progress = jnp.minimum(state.think_progress, close_len - 1)
  forced_token = jnp.take_along_axis(rows.think_close, progress[:, None], axis=-1)[:, 0]
  token = jnp.where(force, forced_token, sampled)
  # Track the tag whether forced or written by the model (so it is never doubled).
  expected = jnp.take_along_axis(rows.think_close, progress[:, None], axis=-1)[:, 0]
  first = rows.think_close[:, 0]
  new_progress = jnp.where(token == expected, progress + 1, jnp.where(token == first, 1, 0))
  think_closed = state.think_closed | (has_budget & (new_progress >= rows.think_close_len))
  return token, force, new_progress, think_closed


def _choose_and_record(state: DecodeState, logits: jax.Array, rows: RowParams, num_top: int,
                       mode: str) -> DecodeState:
  """Picks the token for index `state.step`, applies the think hook and stop rules, records it."""
  step = state.step
  penalties = state.counts.shape[-1] > 0  # static: the buffers exist only when some row asks
  token, force, new_progress, think_closed = pick_tokens(state, logits, rows, step, mode, penalties=penalties)

  logp = jax.nn.log_softmax(logits, axis=-1)
  token_logprob = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]

  active = ~state.done
  token = jnp.where(active, token, 0)
  is_stop = jnp.any(token[:, None] == rows.stop_ids, axis=-1) & active & ~force
  num = state.num + active.astype(jnp.int32)
  done = state.done | is_stop | (num >= rows.max_new)

  def put(buffer, value):
    value = value.astype(buffer.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buffer, value[:, None], step, axis=1)

  tokens = put(state.tokens, token)
  logprobs = put(state.logprobs, jnp.where(active, token_logprob, 0.0))
  forced = put(state.forced, force & active)
  top_ids, top_lps = state.top_ids, state.top_logprobs
  if num_top:
    values, ids = jax.lax.top_k(logp, num_top)
    top_ids = jax.lax.dynamic_update_slice_in_dim(top_ids, ids.astype(jnp.int32)[:, None, :], step, axis=1)
    top_lps = jax.lax.dynamic_update_slice_in_dim(top_lps, values[:, None, :], step, axis=1)
  return state._replace(
      tokens=tokens, logprobs=logprobs, forced=forced, top_ids=top_ids, top_logprobs=top_lps,
      last=token, step=step + 1, num=num, done=done, stopped=state.stopped | is_stop,
      think_progress=jnp.where(state.think_closed, state.think_progress, new_progress),
      think_closed=think_closed,
      counts=state.counts.at[jnp.arange(token.shape[0]), token].add(active.astype(jnp.int32)) if penalties
      else state.counts)


# ------------------------------------------------------------------ jitted pieces


def _constrain_cache(cache: dict, rules) -> dict:
  """Batch over data/fsdp, KV heads over tensor, for both cache layouts (see `init_cache`)."""
  if isinstance(cache["k"], (tuple, list)):  # per layer: k [B, K, D, S], v [B, K, S, D]
    k = tuple(rules.constrain(x, ("batch", "act_kv_heads", None, "cache_length")) for x in cache["k"])
    v = tuple(rules.constrain(x, ("batch", "act_kv_heads", "cache_length", None)) for x in cache["v"])
  else:  # stacked: [L, B, S, K, D]
    axes = ("layers", "batch", "cache_length", "act_kv_heads", None)
    k, v = rules.constrain(cache["k"], axes), rules.constrain(cache["v"], axes)
  return {"k": k, "v": v, "segment_ids": rules.constrain(cache["segment_ids"], ("batch", "cache_length"))}


def _constrain_state(state: DecodeState, rules) -> DecodeState:
  if rules is None:
    return state
  cache = _constrain_cache(state.cache, rules)
  batch_first = lambda x: rules.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
  others = {f: batch_first(getattr(state, f)) for f in DecodeState._fields if f not in ("cache", "step")}
  return state._replace(cache=cache, **others)


@functools.partial(jax.jit, static_argnames=("cfg", "rules", "max_new", "num_top", "mode", "penalties",
                                             "cache_dtype"))
def _prefill(params, prompt, rows: RowParams, embeds=None, positions=None, *, cfg: DecoderConfig, rules, max_new: int,
             num_top: int, mode: str = "sorted", penalties: bool = False, cache_dtype=None) -> DecodeState:
  # Trace-time checks: a per-row knob of the wrong length would otherwise broadcast silently.
  chex.assert_rank(prompt, 2)
  batch, plen = prompt.shape
  chex.assert_tree_shape_prefix(rows, (batch,))
  model = Decoder(cfg, rules)
  pad = plen - rows.prompt_lens  # left padding per row
  slots = jnp.arange(plen, dtype=jnp.int32)[None, :]
  segment_ids = (slots >= pad[:, None]).astype(jnp.int32)
  if positions is None:
    positions = jnp.maximum(slots - pad[:, None], 0)
  cache = init_cache(cfg, batch, plen + max_new, cache_dtype)
  if rules is not None:
    cache = _constrain_cache(cache, rules)
  # Only the last position's logits are needed: ask for hidden states and project
  # one row per sequence (the full [B, P, V] logits are dead code and removed by XLA).
  (_, cache), hidden = model.apply({"params": params}, prompt, positions=positions, segment_ids=segment_ids,
                                   cache=cache, cache_index=0, return_hidden=True, embeddings=embeds)
  logits = model.apply({"params": params}, hidden[:, -1, :], method=project_to_vocab)
  state = DecodeState(
      cache=cache,
      tokens=jnp.zeros((batch, max_new), jnp.int32),
      logprobs=jnp.zeros((batch, max_new), jnp.float32),
      top_ids=jnp.zeros((batch, max_new, num_top), jnp.int32),
      top_logprobs=jnp.zeros((batch, max_new, num_top), jnp.float32),
      forced=jnp.zeros((batch, max_new), bool),
      last=jnp.zeros((batch,), jnp.int32),
      step=jnp.zeros((), jnp.int32),
      num=jnp.zeros((batch,), jnp.int32),
      done=jnp.zeros((batch,), bool),
      stopped=jnp.zeros((batch,), bool),
      think_progress=jnp.zeros((batch,), jnp.int32),
      think_closed=jnp.zeros((batch,), bool),
      counts=jnp.zeros((batch, cfg.vocab_size if penalties else 0), jnp.int32),
      prompt_seen=jnp.zeros((batch, cfg.vocab_size if penalties else 0), bool))
  if penalties:
    rows_idx = jnp.broadcast_to(jnp.arange(batch)[:, None], prompt.shape)
    state = state._replace(prompt_seen=state.prompt_seen.at[rows_idx, prompt].max(segment_ids > 0))
  state = _choose_and_record(state, logits, rows, num_top, mode)
  return _constrain_state(state, rules)


@functools.partial(jax.jit, static_argnames=("cfg", "rules", "num_top", "mode"), donate_argnums=(1,))
def _decode(params, state: DecodeState, rows: RowParams, stop_at, *, cfg: DecoderConfig, rules,
            num_top: int, mode: str = "sorted") -> DecodeState:
  chex.assert_tree_shape_prefix(rows, state.last.shape)
  model = Decoder(cfg, rules)
  cache_len = state.cache["segment_ids"].shape[1]
  max_new = state.tokens.shape[1]
  plen = cache_len - max_new
  limit = jnp.minimum(stop_at, max_new)

  def cond(s: DecodeState):
    return (s.step < limit) & ~jnp.all(s.done)

  def body(s: DecodeState):
    # Feed the token generated at index step-1; it occupies cache slot plen+step-1
    # and rotary position next_position+step-1 (next_position = prompt_len unless a
    # multimodal prompt's positions say otherwise).
    positions = (rows.next_position + s.step - 1)[:, None]
    segment_ids = jnp.ones_like(positions)
    logits, cache = model.apply({"params": params}, s.last[:, None], positions=positions, segment_ids=segment_ids,
                                cache=s.cache, cache_index=plen + s.step - 1)
    s = s._replace(cache=cache)
    s = _choose_and_record(s, logits[:, 0, :], rows, num_top, mode)
    return _constrain_state(s, rules)

  return jax.lax.while_loop(cond, body, _constrain_state(state, rules))


@functools.partial(jax.jit, static_argnames=("width",))
def _window(state: DecodeState, start: jax.Array, *, width: int) -> dict:
  """The per-row bookkeeping plus columns [start, start+width) of the output buffers.

  Streaming fetches only what changed since the last chunk (a fixed-width window, so one
  compile), not the whole [B, N, K] buffers every time. `dynamic_slice` clamps `start`
  to N - width; the host computes the same clamp.
  """
  cols = lambda x: jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)
  return {"tokens": cols(state.tokens), "logprobs": cols(state.logprobs), "forced": cols(state.forced),
          "top_ids": cols(state.top_ids), "top_lps": cols(state.top_logprobs), "num": state.num,
          "done": state.done, "stopped": state.stopped, "step": state.step}


class IncrementalText:
  """Text of a growing token list at O(new tokens) cost per update.

  Decodes only a short window: `decode(ids[prefix:])` minus `decode(ids[prefix:read])`
  (the window keeps context so tokenizers that treat a leading piece specially, like
  SentencePiece's space marker, decode the same as in the full text). Output that ends
  in an incomplete UTF-8 character ("\ufffd") waits for the next tokens.
  """

  def __init__(self, detokenize: Callable[[list[int]], str]):
    self._detokenize = detokenize
    self.ids: list[int] = []
    self.text = ""
    self._prefix = 0
    self._read = 0

  def add(self, ids: Sequence[int]) -> str:
    self.ids.extend(int(t) for t in ids)
    if len(self.ids) == self._read:
      return self.text
    before = self._detokenize(self.ids[self._prefix:self._read])
    after = self._detokenize(self.ids[self._prefix:])
    # A UTF-8 character spans at most 4 byte tokens: wait that long for its end.
    if after.endswith("\ufffd") and len(self.ids) - self._read < 4:
      return self.text
    if after.startswith(before):
      self.text += after[len(before):]
    else:  # the tokenizer rewrote earlier text (rare clean-up rules): fall back to a full decode
      full = self._detokenize(self.ids)
      if full.startswith(self.text):
        self.text = full
    self._prefix, self._read = self._read, len(self.ids)
    return self.text


@dataclasses.dataclass
class _Row:
  """Host-side record of one row while it streams."""

  sampling: SamplingParams
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
  forced: list[bool] = dataclasses.field(default_factory=list)
  text: Optional[IncrementalText] = None
  stop_hit: Optional[str] = None
  checked: int = 0  # characters of text already searched for stop strings
  finished: bool = False


def _visible_text(full: str, stop_strings: Sequence[str]) -> str:
  """Text safe to show while streaming: hold back any tail that could still grow into a stop string."""
  end = len(full)
  for s in stop_strings:
    for k in range(min(len(s) - 1, end), 0, -1):
      if full.endswith(s[:k]):
        end = min(end, len(full) - k)
        break
  return full[:end]


class Sampler:
  """Generates continuations of token prompts with one decoder and parameter tree.

  `rules` (a `ShardingRules`) shards the batch over data/fsdp and heads over tensor;
  pass parameters already placed with `params.param_shardings(cfg, rules)`.
  """

  def __init__(self, cfg: DecoderConfig, rules: sharding_lib.ShardingRules | None = None, *,
               pad_id: int = 0, min_prompt_bucket: int = 16, min_new_bucket: int = 16, min_batch_bucket: int = 1,
               cache_dtype: Optional[str] = None, seed: int = 0):
    self.cfg = cfg
    self.rules = rules
    self.pad_id = pad_id
    self.min_prompt_bucket = min_prompt_bucket
    self.min_new_bucket = min_new_bucket
    self.min_batch_bucket = min_batch_bucket
    self.cache_dtype = cache_dtype
    self._rng = np.random.default_rng(seed)
    # (batch, prompt, new, top, mode, penalties) buckets seen: one prefill and one decode program each.
    self.compiled_shapes: set[tuple] = set()

  # ---- preparing a batch

  def _batch_multiple(self) -> int:
    if self.rules is None:
      return 1
    mesh = self.rules.mesh.shape
    return int(mesh.get("data", 1) * mesh.get("fsdp", 1))

  def _prepare(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams],
               prompt_embeds: Optional[Sequence[Any]] = None, prompt_positions: Optional[Sequence[Any]] = None):
    if not prompts:
      raise ValueError("no prompts given")
    if len(sampling) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(sampling)} sampling params")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
      raise ValueError("a prompt is empty; give at least one token")
    for i, (n, sp) in enumerate(zip(lens, sampling)):
      if n + sp.max_new_tokens > self.cfg.max_seq_len:
        raise ValueError(f"prompt {i} has {n} tokens and asks for {sp.max_new_tokens} new ones, "
                         f"more than the context of {self.cfg.max_seq_len}")
    real = len(prompts)
    multiple = self._batch_multiple()
    batch = bucket(real, minimum=self.min_batch_bucket)
    batch = -(-batch // multiple) * multiple
    plen = bucket(max(lens), self.min_prompt_bucket)
    max_new = bucket(max(sp.max_new_tokens for sp in sampling), self.min_new_bucket)
    num_top = max(sp.num_top_logprobs for sp in sampling)
    # One compiled variant serves every request asking for up to 20 alternatives (OpenAI's chat maximum).
    num_top = 0 if num_top == 0 else bucket(num_top, minimum=20)
    num_top = min(num_top, self.cfg.vocab_size)
    n_stop = bucket(max([len(sp.stop_token_ids) for sp in sampling] + [1]), minimum=4)
    n_close = bucket(max([len(sp.think_close_ids) for sp in sampling] + [1]), minimum=4)

    tokens = np.full((batch, plen), self.pad_id, np.int32)
    rows = neutral_rows(batch, n_stop=n_stop, n_close=n_close)
    for i, (p, sp) in enumerate(zip(prompts, sampling)):
      tokens[i, plen - len(p):] = np.asarray(p, np.int32)
      set_row(rows, i, sp, len(p), vocab_size=self.cfg.vocab_size, rng=self._rng)
    if max(int(t) for t in tokens.max(axis=1)) >= self.cfg.vocab_size or tokens.min() < 0:
      raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
    embeds_dev, positions_dev = self._multimodal_inputs(prompts, batch, plen, prompt_embeds, prompt_positions, rows)
    tokens_dev = self._put_batch(tokens)
    rows_dev = RowParams(**{k: self._put_batch(v) for k, v in rows.items()})
    mode = sampling_mode(sampling)
    penalties = any(sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1 for sp in sampling)
    self.compiled_shapes.add((batch, plen, max_new, num_top, mode, penalties, embeds_dev is not None,
                              positions_dev is not None))
    return tokens_dev, rows_dev, max_new, num_top, mode, penalties, embeds_dev, positions_dev

  def _multimodal_inputs(self, prompts, batch: int, plen: int, prompt_embeds, prompt_positions, rows: dict):
    """Left-pads per-prompt input embeddings [len, E] and rotary positions ([len] or, with
    M-RoPE, [len, 3]) into the batch block; sets each row's first decode position to its
    largest prompt position + 1 (Qwen2-VL's rule; = prompt length for ordinary positions)."""
    embeds_dev = positions_dev = None
    if prompt_embeds is not None:
      if len(prompt_embeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_embeds)} prompt embeddings")
      width = self.cfg.d_model
      block = np.zeros((batch, plen, width), np.float32)
      for i, (p, e) in enumerate(zip(prompts, prompt_embeds)):
        e = np.asarray(e, np.float32)
        if e.shape != (len(p), width):
          raise ValueError(f"prompt {i}: embeddings have shape {e.shape}, expected ({len(p)}, {width})")
        block[i, plen - len(p):] = e
      embeds_dev = self._put_batch(block)
    if prompt_positions is not None:
      if len(prompt_positions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_positions)} position arrays")
      comps = len(self.cfg.mrope_section) if self.cfg.mrope_section else 0
      shape = (batch, plen, comps) if comps else (batch, plen)
      block = np.zeros(shape, np.int32)
      for i, (p, pos) in enumerate(zip(prompts, prompt_positions)):
        pos = np.asarray(pos, np.int32)
        want = (len(p), comps) if comps else (len(p),)
        if pos.shape != want:
          raise ValueError(f"prompt {i}: positions have shape {pos.shape}, expected {want}")
        block[i, plen - len(p):] = pos
        rows["next_position"][i] = int(pos.max()) + 1
      positions_dev = self._put_batch(block)
    return embeds_dev, positions_dev

  def _put_batch(self, x: np.ndarray) -> jax.Array:
    if self.rules is None:
      return jnp.asarray(x)
    return jax.device_put(x, self.rules.named(("batch",) + (None,) * (x.ndim - 1), x.shape))

  # ---- running

  def stream(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
             *, detokenize: Optional[Callable[[list[int]], str]] = None,
             chunk_size: Optional[int] = 16, prompt_embeds: Optional[Sequence[Any]] = None,
             prompt_positions: Optional[Sequence[Any]] = None) -> Iterator[list[StreamUpdate]]:
    """Yields, after every chunk of `chunk_size` decode steps, the updates of rows that changed.

    `chunk_size=None` decodes to the end in one device call (fastest; updates only at
    the end). Stop strings are checked between chunks, so a row may compute up to a
    chunk of tokens past a stop string; they are discarded.

    Multimodal prompts: `prompt_embeds` gives every prompt's input embeddings [len, E]
    (text embeddings with image features spliced in), used by the prefill instead of
    the token lookup; `prompt_positions` its rotary positions ([len], or [len, 3] for
    M-RoPE). Generated tokens continue from the largest prompt position + 1.
    """
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    sampling = list(sampling)
    if any(sp.stop_strings for sp in sampling) and detokenize is None:
      raise ValueError("stop strings need a detokenize function")
    tokens, rows_dev, max_new, num_top, mode, penalties, embeds, positions = self._prepare(
        prompts, sampling, prompt_embeds, prompt_positions)
    state = _prefill(params, tokens, rows_dev, embeds, positions, cfg=self.cfg, rules=self.rules, max_new=max_new,
                     num_top=num_top, mode=mode, penalties=penalties, cache_dtype=self.cache_dtype)
    chunk = max_new if chunk_size is None else max(1, int(chunk_size))
    width = min(chunk, max_new)
    rows = [_Row(sp, text=IncrementalText(detokenize) if detokenize else None) for sp in sampling]
    window_start = 0
    while True:
      start = min(window_start, max_new - width)
      host = jax.device_get(_window(state, jnp.asarray(start, jnp.int32), width=width))
      step = int(host["step"])
      extra_done = np.zeros(host["done"].shape, bool)
      updates = []
      for i, row in enumerate(rows):
        if row.finished:
          continue
        update = self._advance_row(i, row, host, start, step >= max_new, detokenize)
        if update is not None and update.output is not None:
          update.output.prompt_tokens = [int(t) for t in prompts[i]]
        if update is not None:
          updates.append(update)
          extra_done[i] = row.finished and not bool(host["done"][i])
      if updates:
        yield updates
      if all(row.finished for row in rows):
        return
      window_start = step
      if extra_done.any():
        state = state._replace(done=jnp.logical_or(state.done, self._put_batch(extra_done)))
      state = _decode(params, state, rows_dev, jnp.asarray(step + chunk, jnp.int32), cfg=self.cfg, rules=self.rules,
                      num_top=num_top, mode=mode)

  def _advance_row(self, i: int, row: _Row, host: dict, start: int, out_of_room: bool,
                   detokenize) -> Optional[StreamUpdate]:
    """Moves one row's new tokens from the fetched window to the host record."""
    sp = row.sampling
    num = int(host["num"][i])
    old = len(row.tokens)
    done = bool(host["done"][i]) or out_of_room
    stopped = bool(host["stopped"][i])
    for j in range(old, num):
      row.tokens.append(int(host["tokens"][i, j - start]))
      row.logprobs.append(float(host["logprobs"][i, j - start]))
      row.forced.append(bool(host["forced"][i, j - start]))
      if sp.num_top_logprobs:
        row.top.append([(int(a), float(b)) for a, b in zip(host["top_ids"][i, j - start, :sp.num_top_logprobs],
                                                           host["top_lps"][i, j - start, :sp.num_top_logprobs])])
    if num == old and not done:
      return None
    visible = None
    if row.text is not None:
      # A stop token ends the row but is never part of the text.
      shown = row.tokens[old:num - 1] if (done and stopped and num > old) else row.tokens[old:num]
      text = row.text.add(shown)
      if sp.stop_strings:
        hit = _find_stop(text, sp.stop_strings, row.checked)
        row.checked = max(0, len(text) - max(len(x) for x in sp.stop_strings) + 1)
        if hit is not None:
          row.stop_hit = hit[1]
          done = True
      visible = _visible_text(text, sp.stop_strings) if not done else None
    update = StreamUpdate(
        index=i, new_tokens=row.tokens[old:num], new_logprobs=row.logprobs[old:num],
        new_top_logprobs=row.top[old:num] if sp.num_top_logprobs else None, text=visible, finished=done,
        output=None)
    if done:
      row.finished = True
      update.output = self._finish(row, stopped and row.stop_hit is None, detokenize)
      update.text = update.output.text
      # Tokens past a stop string are dropped from the streamed update too.
      keep = len(update.output.tokens) - old
      if keep < len(update.new_tokens):
        update.new_tokens = update.new_tokens[:max(keep, 0)]
        update.new_logprobs = update.new_logprobs[:max(keep, 0)]
        if update.new_top_logprobs is not None:
          update.new_top_logprobs = update.new_top_logprobs[:max(keep, 0)]
    return update

  def _finish(self, row: _Row, stopped_by_token: bool, detokenize) -> SampleOutput:
    sp = row.sampling
    tokens = list(row.tokens)
    text = None
    finish, reason = "length", None
    if stopped_by_token:
      finish, reason = "stop", tokens[-1]
    if detokenize is not None:
      shown = tokens[:-1] if stopped_by_token else tokens
      text = detokenize(shown)  # one full decode per row: the exact text, not the incremental one
      hit = _find_stop(text, sp.stop_strings) if sp.stop_strings else None
      if hit is not None:
        pos, s = hit
        keep = _tokens_covering(detokenize, shown, pos + len(s))
        tokens = shown[:keep]
        text = text[:pos + len(s)] if sp.include_stop_str_in_output else text[:pos]
        finish, reason = "stop", s
    n = len(tokens)
    return SampleOutput(
        prompt_tokens=[], tokens=tokens, logprobs=row.logprobs[:n], finish_reason=finish, stop_reason=reason,
        top_logprobs=row.top[:n] if sp.num_top_logprobs else None, forced=row.forced[:n], text=text)

  def generate_arrays(self, params, prompts: Sequence[Sequence[int]],
                      sampling: SamplingParams | Sequence[SamplingParams], *,
                      prompt_embeds: Optional[Sequence[Any]] = None,
                      prompt_positions: Optional[Sequence[Any]] = None) -> "RolloutArrays":
    """Runs every prompt to completion in one device call and returns the raw arrays.

    For RL rollouts: no host work per token or per row (no text, no stop strings; stop
    token ids and think budgets apply as usual). The arrays stay on the device, with the
    rows of the padded batch bucket beyond `len(prompts)` cut off.
    """
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    sampling = list(sampling)
    if any(sp.stop_strings for sp in sampling):
      raise ValueError("generate_arrays does not check stop strings (they need text); use stop_token_ids")
    tokens, rows_dev, max_new, num_top, mode, penalties, embeds, positions = self._prepare(
        prompts, sampling, prompt_embeds, prompt_positions)
    state = _prefill(params, tokens, rows_dev, embeds, positions, cfg=self.cfg, rules=self.rules, max_new=max_new,
                     num_top=num_top, mode=mode, penalties=penalties, cache_dtype=self.cache_dtype)
    state = _decode(params, state, rows_dev, jnp.asarray(max_new, jnp.int32), cfg=self.cfg, rules=self.rules,
                    num_top=num_top, mode=mode)
    n = len(prompts)
    return RolloutArrays(prompt=tokens[:n], prompt_lens=rows_dev.prompt_lens[:n], tokens=state.tokens[:n],
                         logprobs=state.logprobs[:n], forced=state.forced[:n], lengths=state.num[:n],
                         stopped=state.stopped[:n])

  def generate(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
               *, detokenize: Optional[Callable[[list[int]], str]] = None,
               prompt_embeds: Optional[Sequence[Any]] = None,
               prompt_positions: Optional[Sequence[Any]] = None) -> list[SampleOutput]:
    """Runs every prompt to completion; returns one `SampleOutput` per prompt, in order
    (multimodal prompts: see `stream`)."""
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    has_stop_strings = any(sp.stop_strings for sp in sampling)
    outputs: list[Optional[SampleOutput]] = [None] * len(prompts)
    for updates in self.stream(params, prompts, sampling, detokenize=detokenize,
                               chunk_size=32 if has_stop_strings else None, prompt_embeds=prompt_embeds,
                               prompt_positions=prompt_positions):
      for u in updates:
        if u.finished:
          outputs[u.index] = u.output
    return outputs  # type: ignore[return-value]


def _find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> Optional[tuple[int, str]]:
  """Earliest occurrence of any stop string at or after `start`: (position, string)."""
  best = None
  for s in stop_strings:
    pos = text.find(s, start)
    if pos >= 0 and (best is None or pos < best[0]):
      best = (pos, s)
  return best


def _tokens_covering(detokenize: Callable[[list[int]], str], tokens: Sequence[int], chars: int) -> int:
  """Fewest leading tokens whose text reaches `chars` characters (the token that completed a stop string)."""
  lo, hi = 1, len(tokens)
  while lo < hi:
    mid = (lo + hi) // 2
    if len(detokenize(list(tokens[:mid]))) >= chars:
      hi = mid
    else:
      lo = mid + 1
  return lo
