"""Batched autoregressive sampling over a static KV cache (shared by serving and RL).

Design, in short (details in docs/DESIGN_llm.md):

* Prompts of different lengths are **left-padded** into one [B, P] block. Pad slots
  get segment id 0 (so nothing attends to them) and every real token gets the rotary
  position "number of real tokens before it", so a padded row computes exactly what
  the same prompt would compute alone.
* One jitted **prefill** runs the prompt block through the decoder, creates the
  static cache [L, B, P + N, K, D] and samples the first token. One jitted **decode**
  function then runs a `lax.while_loop` over single-token steps until every row is
  done or a step bound is reached. Its state (cache included) is donated, so the
  cache is updated in place. The step bound is a traced scalar: streaming calls the
  same compiled function in chunks, batch jobs call it once.
* Everything that varies per request is an array (temperature, top-k/p, min-p,
  seeds, stop ids, max new tokens, think budgets), so one compiled program serves
  any mix of requests. Only shapes are static, and shapes are **bucketed**
  (batch, prompt length, new-token length) to bound the number of compiles.
* Randomness is per row: row b at step i uses `fold_in(key(seed_b), i)`. A request
  with a seed therefore produces the same tokens whichever batch it lands in, and
  sharded sampling equals unsharded sampling (JAX's partitionable threefry).
* Per-token log-probabilities are those of the raw model distribution (before
  temperature and truncation), as vLLM returns by default and as RL needs for
  importance ratios; optional top-k alternatives come along for the OpenAI API.
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

import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.transformer import Decoder, DecoderConfig, init_cache

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


# --------------------------------------------------------------------------- buckets


def bucket(n: int, minimum: int = 16, maximum: Optional[int] = None) -> int:
  """Next power of two >= n (at least `minimum`), capped at `maximum` when that still fits."""
  b = max(minimum, 1 << max(0, (n - 1).bit_length()))
  if maximum is not None and n <= maximum < b:
    return maximum
  return b


# ------------------------------------------------------------------- token choice


def _sample_tokens(logits: jax.Array, rows: RowParams, step: jax.Array) -> jax.Array:
  """Chooses one token per row: argmax for temperature 0, else truncated sampling.

  Truncation is expressed as one logit threshold per row (top-k, then top-p over the
  renormalised top-k set, then min-p), so the masks never gather/scatter over the
  vocabulary; sorting only happens when some row asks for top-k or top-p.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature = rows.temperature

  def sample():
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / safe_t[:, None]
    vocab = scaled.shape[-1]

    def sorted_threshold(s):
      desc = -jnp.sort(-s, axis=-1)
      ranks = jnp.arange(vocab, dtype=jnp.int32)[None, :]
      keep_k = (rows.top_k[:, None] <= 0) | (ranks < rows.top_k[:, None])
      probs = jax.nn.softmax(jnp.where(keep_k, desc, _NEG_INF), axis=-1)
      mass_before = jnp.cumsum(probs, axis=-1) - probs
      keep = keep_k & (mass_before < rows.top_p[:, None])
      kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
      return jnp.take_along_axis(desc, (kept - 1)[:, None], axis=-1)[:, 0]

    needs_sort = jnp.any((rows.top_k > 0) | (rows.top_p < 1.0))
    threshold = jax.lax.cond(needs_sort, sorted_threshold,
                             lambda s: jnp.full(s.shape[:1], _NEG_INF, s.dtype), scaled)
    # min-p: p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p).
    max_logit = jnp.max(scaled, axis=-1)
    min_p_threshold = jnp.where(rows.min_p > 0, max_logit + jnp.log(jnp.maximum(rows.min_p, 1e-30)), _NEG_INF)
    threshold = jnp.maximum(threshold, min_p_threshold)
    masked = jnp.where(scaled >= threshold[:, None], scaled, _NEG_INF)

    def row_gumbel(seed):
      key = jax.random.fold_in(jax.random.key(seed), step)
      return jax.random.gumbel(key, (vocab,), jnp.float32)

    noise = jax.vmap(row_gumbel)(rows.seeds)
    sampled = jnp.argmax(masked + noise, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)

  return jax.lax.cond(jnp.all(temperature <= 0), lambda: greedy, sample)


def _choose_and_record(state: DecodeState, logits: jax.Array, rows: RowParams, num_top: int) -> DecodeState:
  """Picks the token for index `state.step`, applies the think hook and stop rules, records it."""
  step = state.step
  batch = logits.shape[0]
  sampled = _sample_tokens(logits, rows, step)

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
  del batch
  return state._replace(
      tokens=tokens, logprobs=logprobs, forced=forced, top_ids=top_ids, top_logprobs=top_lps,
      last=token, step=step + 1, num=num, done=done, stopped=state.stopped | is_stop,
      think_progress=jnp.where(state.think_closed, state.think_progress, new_progress),
      think_closed=think_closed)


# ------------------------------------------------------------------ jitted pieces


def _cache_logical_axes():
  return {"k": ("layers", "batch", "cache_length", "act_kv_heads", None),
          "v": ("layers", "batch", "cache_length", "act_kv_heads", None),
          "segment_ids": ("batch", "cache_length")}


def _constrain_state(state: DecodeState, rules) -> DecodeState:
  if rules is None:
    return state
  axes = _cache_logical_axes()
  cache = {name: rules.constrain(value, axes[name]) for name, value in state.cache.items()}
  batch_first = lambda x: rules.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
  others = {f: batch_first(getattr(state, f)) for f in DecodeState._fields if f not in ("cache", "step")}
  return state._replace(cache=cache, **others)


def _project_to_vocab(module: Decoder, hidden: jax.Array) -> jax.Array:
  """The decoder's own output projection, applied to selected hidden states only."""
  if module.cfg.tie_embeddings:
    logits = module.embed.attend(hidden)
  else:
    logits = module.lm_head(hidden)
  return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "rules", "max_new", "num_top", "cache_dtype"))
def _prefill(params, prompt, rows: RowParams, *, cfg: DecoderConfig, rules, max_new: int, num_top: int,
             cache_dtype=None) -> DecodeState:
  batch, plen = prompt.shape
  model = Decoder(cfg, rules)
  pad = plen - rows.prompt_lens  # left padding per row
  slots = jnp.arange(plen, dtype=jnp.int32)[None, :]
  segment_ids = (slots >= pad[:, None]).astype(jnp.int32)
  positions = jnp.maximum(slots - pad[:, None], 0)
  cache = init_cache(cfg, batch, plen + max_new, cache_dtype)
  if rules is not None:
    axes = _cache_logical_axes()
    cache = {name: rules.constrain(value, axes[name]) for name, value in cache.items()}
  # Only the last position's logits are needed: ask for hidden states and project
  # one row per sequence (the full [B, P, V] logits are dead code and removed by XLA).
  (_, cache), hidden = model.apply({"params": params}, prompt, positions=positions, segment_ids=segment_ids,
                                   cache=cache, cache_index=0, return_hidden=True)
  logits = model.apply({"params": params}, hidden[:, -1, :], method=_project_to_vocab)
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
      think_closed=jnp.zeros((batch,), bool))
  state = _choose_and_record(state, logits, rows, num_top)
  return _constrain_state(state, rules)


@functools.partial(jax.jit, static_argnames=("cfg", "rules", "num_top"), donate_argnums=(1,))
def _decode(params, state: DecodeState, rows: RowParams, stop_at, *, cfg: DecoderConfig, rules,
            num_top: int) -> DecodeState:
  model = Decoder(cfg, rules)
  cache_len = state.cache["segment_ids"].shape[1]
  max_new = state.tokens.shape[1]
  plen = cache_len - max_new
  limit = jnp.minimum(stop_at, max_new)

  def cond(s: DecodeState):
    return (s.step < limit) & ~jnp.all(s.done)

  def body(s: DecodeState):
    # Feed the token generated at index step-1; it occupies cache slot plen+step-1
    # and rotary position prompt_len+step-1.
    positions = (rows.prompt_lens + s.step - 1)[:, None]
    segment_ids = jnp.ones_like(positions)
    logits, cache = model.apply({"params": params}, s.last[:, None], positions=positions, segment_ids=segment_ids,
                                cache=s.cache, cache_index=plen + s.step - 1)
    s = s._replace(cache=cache)
    s = _choose_and_record(s, logits[:, 0, :], rows, num_top)
    return _constrain_state(s, rules)

  return jax.lax.while_loop(cond, body, _constrain_state(state, rules))


@jax.jit
def _mark_done(state: DecodeState, extra_done: jax.Array) -> DecodeState:
  return state._replace(done=state.done | extra_done)


# ------------------------------------------------------------------ host driver


@dataclasses.dataclass
class _RowText:
  """Host-side text tracking for stop strings and streaming of one row."""

  stop_strings: tuple[str, ...]
  include_stop: bool
  text: str = ""
  stop_hit: Optional[str] = None
  visible: str = ""


def _visible_text(full: str, stop_strings: Sequence[str], finished: bool) -> str:
  """Text safe to show while streaming: hold back an incomplete UTF-8 character and any
  tail that could still grow into a stop string."""
  if finished:
    return full
  end = len(full)
  while end > 0 and full[end - 1] == "\ufffd":
    end -= 1
  for s in stop_strings:
    for k in range(min(len(s) - 1, end), 0, -1):
      if full[:end].endswith(s[:k]):
        end = min(end, len(full[:end]) - k)
        break
  return full[:end]


class Sampler:
  """Generates continuations of token prompts with one decoder and parameter tree.

  `rules` (a `ShardingRules`) shards the batch over data/fsdp and heads over tensor;
  pass parameters already placed with `params.param_shardings(cfg, rules)`.
  """

  def __init__(self, cfg: DecoderConfig, rules: sharding_lib.ShardingRules | None = None, *,
               pad_id: int = 0, min_prompt_bucket: int = 16, min_new_bucket: int = 16,
               cache_dtype: Optional[str] = None, seed: int = 0):
    self.cfg = cfg
    self.rules = rules
    self.pad_id = pad_id
    self.min_prompt_bucket = min_prompt_bucket
    self.min_new_bucket = min_new_bucket
    self.cache_dtype = cache_dtype
    self._rng = np.random.default_rng(seed)
    self.compiled_shapes: set[tuple] = set()  # (batch, prompt, new, top) seen; for tests/bench

  # ---- preparing a batch

  def _batch_multiple(self) -> int:
    if self.rules is None:
      return 1
    mesh = self.rules.mesh.shape
    return int(mesh.get("data", 1) * mesh.get("fsdp", 1))

  def _prepare(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]):
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
    batch = bucket(real, minimum=1)
    batch = -(-batch // multiple) * multiple
    plen = bucket(max(lens), self.min_prompt_bucket)
    max_new = bucket(max(sp.max_new_tokens for sp in sampling), self.min_new_bucket)
    num_top = max(sp.num_top_logprobs for sp in sampling)
    num_top = 0 if num_top == 0 else bucket(num_top, minimum=5)
    num_top = min(num_top, self.cfg.vocab_size)
    n_stop = bucket(max([len(sp.stop_token_ids) for sp in sampling] + [1]), minimum=4)
    n_close = bucket(max([len(sp.think_close_ids) for sp in sampling] + [1]), minimum=4)

    tokens = np.full((batch, plen), self.pad_id, np.int32)
    rows = dict(
        prompt_lens=np.ones(batch, np.int32), temperature=np.zeros(batch, np.float32),
        top_k=np.zeros(batch, np.int32), top_p=np.ones(batch, np.float32), min_p=np.zeros(batch, np.float32),
        seeds=np.zeros(batch, np.uint32), max_new=np.ones(batch, np.int32),
        stop_ids=np.full((batch, n_stop), -1, np.int32), think_budget=np.full(batch, -1, np.int32),
        think_close=np.full((batch, n_close), -1, np.int32), think_close_len=np.zeros(batch, np.int32))
    for i, (p, sp) in enumerate(zip(prompts, sampling)):
      tokens[i, plen - len(p):] = np.asarray(p, np.int32)
      rows["prompt_lens"][i] = len(p)
      rows["temperature"][i] = sp.temperature
      rows["top_k"][i] = min(sp.top_k, self.cfg.vocab_size)
      rows["top_p"][i] = sp.top_p
      rows["min_p"][i] = sp.min_p
      seed = sp.seed if sp.seed is not None else int(self._rng.integers(0, 2**32))
      rows["seeds"][i] = np.uint32(seed % (2**32))
      rows["max_new"][i] = sp.max_new_tokens
      rows["stop_ids"][i, :len(sp.stop_token_ids)] = sp.stop_token_ids
      if sp.think_budget is not None:
        rows["think_budget"][i] = sp.think_budget
        rows["think_close"][i, :len(sp.think_close_ids)] = sp.think_close_ids
        rows["think_close_len"][i] = len(sp.think_close_ids)
    if max(int(t) for t in tokens.max(axis=1)) >= self.cfg.vocab_size or tokens.min() < 0:
      raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
    tokens_dev = self._put_batch(tokens)
    rows_dev = RowParams(**{k: self._put_batch(v) for k, v in rows.items()})
    self.compiled_shapes.add((batch, plen, max_new, num_top))
    return tokens_dev, rows_dev, max_new, num_top

  def _put_batch(self, x: np.ndarray) -> jax.Array:
    if self.rules is None:
      return jnp.asarray(x)
    return jax.device_put(x, self.rules.named(("batch",) + (None,) * (x.ndim - 1), x.shape))

  # ---- running

  def stream(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
             *, detokenize: Optional[Callable[[list[int]], str]] = None,
             chunk_size: Optional[int] = 16) -> Iterator[list[StreamUpdate]]:
    """Yields, after every chunk of `chunk_size` decode steps, the updates of rows that changed.

    `chunk_size=None` decodes to the end in one device call (fastest; updates only at
    the end). Stop strings are checked between chunks, so a row may overrun a stop
    string by up to a chunk of (discarded) tokens.
    """
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    sampling = list(sampling)
    if any(sp.stop_strings for sp in sampling) and detokenize is None:
      raise ValueError("stop strings need a detokenize function")
    tokens, rows, max_new, num_top = self._prepare(prompts, sampling)
    real = len(prompts)
    state = _prefill(params, tokens, rows, cfg=self.cfg, rules=self.rules, max_new=max_new, num_top=num_top,
                     cache_dtype=self.cache_dtype)
    chunk = max_new if chunk_size is None else max(1, int(chunk_size))
    texts = [_RowText(sp.stop_strings, sp.include_stop_str_in_output) for sp in sampling]
    sent = [0] * real
    finished = [False] * real
    stop_token_cut = [None] * real  # for stop strings: number of tokens kept
    while True:
      host = jax.device_get({"tokens": state.tokens, "logprobs": state.logprobs, "num": state.num,
                             "done": state.done, "stopped": state.stopped, "step": state.step,
                             "top_ids": state.top_ids, "top_lps": state.top_logprobs, "forced": state.forced})
      step = int(host["step"])
      extra_done = np.zeros(state.done.shape, bool)
      updates = []
      for i in range(real):
        if finished[i]:
          continue
        num = int(host["num"][i])
        row_done = bool(host["done"][i]) or step >= max_new
        if detokenize is not None:
          full = detokenize([int(t) for t in host["tokens"][i, :num]])
          tr = texts[i]
          if tr.stop_strings and num > sent[i]:
            hit = _find_stop(full, tr.stop_strings)
            if hit is not None:
              pos, s = hit
              tr.stop_hit = s
              full = full[:pos + len(s)] if tr.include_stop else full[:pos]
              num = _tokens_covering(detokenize, host["tokens"][i, :num], pos + len(s))
              stop_token_cut[i] = num
              row_done = True
              extra_done[i] = True
          tr.text = full
        if num <= sent[i] and not row_done:
          continue
        new = slice(sent[i], num)
        top = None
        if num_top:
          k = sampling[i].num_top_logprobs
          top = [[(int(a), float(b)) for a, b in zip(host["top_ids"][i, j, :k], host["top_lps"][i, j, :k])]
                 for j in range(new.start, new.stop)]
        text = None
        if detokenize is not None:
          text = _visible_text(texts[i].text, texts[i].stop_strings, row_done)
        output = None
        if row_done:
          finished[i] = True
          output = self._output(prompts[i], sampling[i], host, i, num, texts[i] if detokenize else None,
                                bool(host["stopped"][i]) and stop_token_cut[i] is None)
        updates.append(StreamUpdate(
            index=i, new_tokens=[int(t) for t in host["tokens"][i, new]],
            new_logprobs=[float(x) for x in host["logprobs"][i, new]], new_top_logprobs=top,
            text=text, finished=row_done, output=output))
        sent[i] = num
      if updates:
        yield updates
      if all(finished):
        return
      if extra_done.any():
        state = _mark_done(state, self._put_batch(extra_done))
      state = _decode(params, state, rows, jnp.asarray(step + chunk, jnp.int32), cfg=self.cfg, rules=self.rules,
                      num_top=num_top)

  def _output(self, prompt, sp: SamplingParams, host, i: int, num: int, text: Optional[_RowText],
              stopped_by_token: bool) -> SampleOutput:
    tokens = [int(t) for t in host["tokens"][i, :num]]
    if text is not None and text.stop_hit is not None:
      finish, reason = "stop", text.stop_hit
    elif stopped_by_token:
      finish, reason = "stop", tokens[-1]
    else:
      finish, reason = "length", None
    top = None
    if sp.num_top_logprobs:
      k = sp.num_top_logprobs
      top = [[(int(a), float(b)) for a, b in zip(host["top_ids"][i, j, :k], host["top_lps"][i, j, :k])]
             for j in range(num)]
    return SampleOutput(
        prompt_tokens=[int(t) for t in prompt], tokens=tokens,
        logprobs=[float(x) for x in host["logprobs"][i, :num]], finish_reason=finish, stop_reason=reason,
        top_logprobs=top, forced=[bool(x) for x in host["forced"][i, :num]],
        text=text.text if text is not None else None)

  def generate(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
               *, detokenize: Optional[Callable[[list[int]], str]] = None) -> list[SampleOutput]:
    """Runs every prompt to completion; returns one `SampleOutput` per prompt, in order."""
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    has_stop_strings = any(sp.stop_strings for sp in sampling)
    outputs: list[Optional[SampleOutput]] = [None] * len(prompts)
    for updates in self.stream(params, prompts, sampling, detokenize=detokenize,
                               chunk_size=32 if has_stop_strings else None):
      for u in updates:
        if u.finished:
          outputs[u.index] = u.output
    return outputs  # type: ignore[return-value]


def _find_stop(text: str, stop_strings: Sequence[str]) -> Optional[tuple[int, str]]:
  """Earliest occurrence of any stop string: (position, string)."""
  best = None
  for s in stop_strings:
    pos = text.find(s)
    if pos >= 0 and (best is None or pos < best[0]):
      best = (pos, s)
  return best


def _tokens_covering(detokenize: Callable[[list[int]], str], tokens: np.ndarray, chars: int) -> int:
  """Fewest leading tokens whose text reaches `chars` characters (the token that completed a stop string)."""
  lo, hi = 1, len(tokens)
  while lo < hi:
    mid = (lo + hi) // 2
    if len(detokenize([int(t) for t in tokens[:mid]])) >= chars:
      hi = mid
    else:
      lo = mid + 1
  return lo
