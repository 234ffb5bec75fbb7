"""The device side of continuous batching: a fixed set of KV-cache slots that requests
enter and leave at decode-step boundaries.

Why: the static `Sampler` runs a group of requests from prefill to the last row's end;
a request arriving meanwhile waits for the whole group, and a row that finishes early
keeps its place. Here the batch is `num_slots` cache rows ("slots"), each holding one
sequence at its own length:

* `SlotState` is everything on the device: the slot cache (`init_cache` layout,
  [num_slots, max_len]), each slot's `RowParams`, its write index (the cache slot of
  its next input token), rotary position, last token, generated count, done/stopped
  flags, think-budget progress and penalty buffers. Free slots are simply `done`.
* `prefill_into_slots` prefills a block of newly admitted prompts together and writes
  each row's cache into its slot, replacing the whole slot row (stale keys/values and
  segment ids of the previous occupant are gone). Prompts are **right-padded**: the
  real tokens then sit at cache slots 0..len-1, positions are 0..len-1 as alone, the
  pads (segment 0) after them are masked and overwritten by decoding, and a slot needs
  exactly prompt_len + max_new cache entries (left padding would waste the pad length).
* `decode_chunk` runs up to `n_steps` single-token steps over all slots, every row
  writing its key/value at its own index (the decoder's per-row `cache_index`), and
  returns the chunk's tokens, log-probabilities and flags for the host.

Token choice is `sampler.pick_tokens`, the static sampler's own implementation, with a
per-row step (the row's generated count): a seeded row draws `fold_in(key(seed), i)`
at its i-th token whatever else runs beside it, so greedy and seeded outputs equal the
request's output alone. A grammar mask (`TokenConstraint`, packed into int32 words on
the host) removes tokens before penalties, temperature and truncation; reported
log-probabilities stay those of the raw model distribution.

Shapes are static (slot count, max_len, chunk width, admitted-block bucket, prompt
bucket), so a server compiles a handful of programs. Penalty buffers [num_slots, V]
always exist; the `penalties` flag only decides whether a step applies them (it is on
whenever an active row asks), which is exact for the other rows (neutral penalties
leave logits bit-identical).

The host scheduler is `mlx_med.llm.engine.ContinuousEngine`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core.sampler import RowParams, _constrain_cache, neutral_rows, pick_tokens
from mlx_med.core.transformer import (
  Decoder,
  DecoderConfig,
  as_dtype,
  init_cache,
  project_to_vocab,
)


class TokenConstraint(Protocol):
  """Host-side grammar state of one row. The engine calls, per generated token,
  `fill_bitmask(out)` before the step, then `advance(token)` with the chosen token."""

  def fill_bitmask(self, out: np.ndarray) -> None:
    """out: int32 [ceil(V/32)] for the model's vocab size V; bit j of word i set <=> token
    32*i+j allowed. Must write every word."""

  def advance(self, token: int) -> None:
    """Consumes the chosen token (ValueError if it was not allowed)."""

  def is_finished(self) -> bool:
    """The grammar is complete: the row ends now (finish reason "stop")."""


def mask_words(vocab_size: int) -> int:
  """int32 words of one row's token bitmask."""
  return -(-vocab_size // 32)


def all_allowed(rows: int, vocab_size: int) -> np.ndarray:
  """A bitmask block allowing every token (rows without a constraint)."""
  return np.full((rows, mask_words(vocab_size)), -1, np.int32)


def unpack_bitmask(bits: jax.Array, vocab_size: int) -> jax.Array:
  """int32 [B, W] packed bits -> bool [B, V] (bit j of word i is token 32*i+j)."""
  shifts = jnp.arange(32, dtype=jnp.uint32)
  words = jax.lax.bitcast_convert_type(bits, jnp.uint32)
  unpacked = (words[:, :, None] >> shifts[None, None, :]) & 1
  return unpacked.reshape(bits.shape[0], -1)[:, :vocab_size].astype(bool)


class SlotState(NamedTuple):
  """The continuous batch on the device (donated between calls)."""

  cache: dict  # init_cache(cfg, num_slots, max_len)
  rows: RowParams  # [S] per-slot sampling controls
  index: jax.Array  # [S] int32 cache slot where `last` is written next
  position: jax.Array  # [S] int32 rotary position of `last`
  last: jax.Array  # [S] int32 last generated token (next decoder input)
  num: jax.Array  # [S] int32 tokens generated so far (the row's step)
  done: jax.Array  # [S] bool (free slots are done)
  stopped: jax.Array  # [S] bool ended by a stop token
  think_progress: jax.Array  # [S] int32
  think_closed: jax.Array  # [S] bool
  counts: jax.Array  # [S, V] int32 generated-token counts
  prompt_seen: jax.Array  # [S, V] bool


class ChunkOutput(NamedTuple):
  """What one call produced, per row: columns 0..(num_after - num_before - 1) are valid."""

  tokens: jax.Array  # [R, C]
  logprobs: jax.Array  # [R, C] raw model log-probabilities
  forced: jax.Array  # [R, C] bool
  top_ids: jax.Array  # [R, C, K]
  top_lps: jax.Array  # [R, C, K]
  num: jax.Array  # [R] generated count after the call
  done: jax.Array  # [R]
  stopped: jax.Array  # [R]


def _batch_first(rules, x):
  if rules is None:
    return x
  return rules.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _constrain(state: SlotState, rules) -> SlotState:
  if rules is None:
    return state
  fields = {f: _batch_first(rules, getattr(state, f)) for f in SlotState._fields if f not in ("cache", "rows")}
  rows = RowParams(*[_batch_first(rules, x) for x in state.rows])
  return state._replace(cache=_constrain_cache(state.cache, rules), rows=rows, **fields)


empty_rows = neutral_rows  # neutral per-row knobs (host numpy), filled by sampler.set_row


@functools.partial(jax.jit, static_argnames=("cfg", "num_slots", "max_len", "n_stop", "n_close", "cache_dtype",
                                             "rules"))
def init_slots(*, cfg: DecoderConfig, num_slots: int, max_len: int, n_stop: int, n_close: int,
               cache_dtype: Optional[str] = None, rules=None) -> SlotState:
  """All slots free (done), caches empty."""
  rows = RowParams(**{k: jnp.asarray(v) for k, v in empty_rows(num_slots, n_stop=n_stop, n_close=n_close).items()})
  zeros = jnp.zeros((num_slots,), jnp.int32)
  state = SlotState(
      cache=init_cache(cfg, num_slots, max_len, cache_dtype), rows=rows, index=zeros, position=zeros, last=zeros,
      num=zeros, done=jnp.ones((num_slots,), bool), stopped=jnp.zeros((num_slots,), bool), think_progress=zeros,
      think_closed=jnp.zeros((num_slots,), bool), counts=jnp.zeros((num_slots, cfg.vocab_size), jnp.int32),
      prompt_seen=jnp.zeros((num_slots, cfg.vocab_size), bool))
  return _constrain(state, rules)


def _top(logp: jax.Array, num_top: int):
  if not num_top:
    z = jnp.zeros(logp.shape[:1] + (0,), jnp.int32)
    return z, z.astype(jnp.float32)
  values, ids = jax.lax.top_k(logp, num_top)
  return ids.astype(jnp.int32), values


def _put_rows(buffer: jax.Array, slots: jax.Array, values: jax.Array, axis: int = 0) -> jax.Array:
  """buffer[slots] = values along `axis`; slot ids >= the slot count (padding rows) are dropped."""
  index = (slice(None),) * axis + (slots,)
  return buffer.at[index].set(values.astype(buffer.dtype), mode="drop")


@functools.partial(jax.jit, static_argnames=("cfg", "rules", "num_top", "mode", "penalties", "masked"),
                   donate_argnums=(1,))
def prefill_into_slots(params, state: SlotState, prompt: jax.Array, slots: jax.Array, rows: RowParams,
                       allowed_bits: jax.Array, *, cfg: DecoderConfig, rules=None, num_top: int = 0,
                       mode: str = "sorted", penalties: bool = False,
                       masked: bool = False) -> tuple[SlotState, ChunkOutput]:
  """Prefills `prompt` [k, P] (right-padded; lengths rows.prompt_lens), picks each row's first
  token and installs the rows in `slots` [k] (an id >= num_slots marks a padding row).

  Returns the new state and the first tokens as a one-column `ChunkOutput` of k rows.
  """
  k, plen = prompt.shape
  model = Decoder(cfg, rules)
  lens = rows.prompt_lens
  cols = jnp.arange(plen, dtype=jnp.int32)[None, :]
  segment_ids = (cols < lens[:, None]).astype(jnp.int32)
  positions = jnp.where(segment_ids > 0, cols, 0)
  max_len = state.cache["segment_ids"].shape[1]
  cache_dtype = (state.cache["k"][0] if isinstance(state.cache["k"], (tuple, list)) else state.cache["k"]).dtype
  cache = init_cache(cfg, k, plen, cache_dtype)
  (_, cache), hidden = model.apply({"params": params}, prompt, positions=positions, segment_ids=segment_ids,
                                   cache=cache, cache_index=0, return_hidden=True)
  last_hidden = jnp.take_along_axis(hidden, (lens - 1)[:, None, None], axis=1)[:, 0]
  logits = model.apply({"params": params}, last_hidden, method=project_to_vocab)

  vocab = cfg.vocab_size
  rows_idx = jnp.broadcast_to(jnp.arange(k)[:, None], prompt.shape)
  prompt_seen = jnp.zeros((k, vocab), bool).at[rows_idx, prompt].max(segment_ids > 0)
  fresh = SlotState(cache=None, rows=rows, index=None, position=None, last=None, num=None, done=None,
                    stopped=None, think_progress=jnp.zeros((k,), jnp.int32),
                    think_closed=jnp.zeros((k,), bool), counts=jnp.zeros((k, vocab), jnp.int32),
                    prompt_seen=prompt_seen)
  allowed = unpack_bitmask(allowed_bits, vocab) if masked else None
  token, force, progress, closed = pick_tokens(fresh, logits, rows, jnp.zeros((k,), jnp.int32), mode,
                                               penalties=penalties, allowed=allowed)
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_lp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
  is_stop = jnp.any(token[:, None] == rows.stop_ids, axis=-1) & ~force
  done = is_stop | (rows.max_new <= 1) | (lens >= max_len)
  top_ids, top_lps = _top(logp, num_top)

  # Install: each admitted row replaces its whole slot row (zeros past the prompt block).
  pad = max_len - plen
  if isinstance(cache["k"], (tuple, list)):  # per layer: k [B, K, D, S], v [B, K, S, D]
    ks = tuple(_put_rows(big, slots, jnp.pad(small, ((0, 0), (0, 0), (0, 0), (0, pad))))
               for big, small in zip(state.cache["k"], cache["k"]))
    vs = tuple(_put_rows(big, slots, jnp.pad(small, ((0, 0), (0, 0), (0, pad), (0, 0))))
               for big, small in zip(state.cache["v"], cache["v"]))
  else:  # stacked [L, B, S, K, D]
    widths = ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))
    ks = _put_rows(state.cache["k"], slots, jnp.pad(cache["k"], widths), axis=1)
    vs = _put_rows(state.cache["v"], slots, jnp.pad(cache["v"], widths), axis=1)
  segs = _put_rows(state.cache["segment_ids"], slots, jnp.pad(cache["segment_ids"], ((0, 0), (0, pad))))
  put = lambda buffer, values: _put_rows(buffer, slots, values)
  new_state = SlotState(
      cache={"k": ks, "v": vs, "segment_ids": segs},
      rows=RowParams(*[put(b, v) for b, v in zip(state.rows, rows)]),
      index=put(state.index, lens), position=put(state.position, rows.next_position), last=put(state.last, token),
      num=put(state.num, jnp.ones((k,), jnp.int32)), done=put(state.done, done),
      stopped=put(state.stopped, is_stop), think_progress=put(state.think_progress, progress),
      think_closed=put(state.think_closed, closed),
      counts=put(state.counts, jnp.zeros((k, vocab), jnp.int32).at[jnp.arange(k), token].add(1)),
      prompt_seen=put(state.prompt_seen, prompt_seen))
  out = ChunkOutput(tokens=token[:, None], logprobs=token_lp[:, None], forced=force[:, None],
                    top_ids=top_ids[:, None, :], top_lps=top_lps[:, None, :], num=jnp.ones((k,), jnp.int32),
                    done=done, stopped=is_stop)
  return _constrain(new_state, rules), out


def _cache_window(cache: dict, window: int) -> dict:
  """The first `window` entries of every slot row (both cache layouts, see `init_cache`)."""
  if isinstance(cache["k"], (tuple, list)):  # per layer: k [B, K, D, S], v [B, K, S, D]
    k = tuple(x[..., :window] for x in cache["k"])
    v = tuple(x[:, :, :window] for x in cache["v"])
  else:  # stacked [L, B, S, K, D]
    k, v = cache["k"][:, :, :window], cache["v"][:, :, :window]
  return {"k": k, "v": v, "segment_ids": cache["segment_ids"][:, :window]}


def _cache_merge(full: dict, part: dict) -> dict:
  """`full` with its first entries replaced by the window `part` (the inverse of `_cache_window`)."""
  put = lambda big, small: jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (0,) * big.ndim)
  if isinstance(full["k"], (tuple, list)):
    k = tuple(put(b, p) for b, p in zip(full["k"], part["k"]))
    v = tuple(put(b, p) for b, p in zip(full["v"], part["v"]))
  else:
    k, v = put(full["k"], part["k"]), put(full["v"], part["v"])
  return {"k": k, "v": v, "segment_ids": put(full["segment_ids"], part["segment_ids"])}


@functools.partial(jax.jit, static_argnames=("cfg", "rules", "width", "num_top", "mode", "penalties", "masked",
                                             "window"),
                   donate_argnums=(1,))
def decode_chunk(params, state: SlotState, allowed_bits: jax.Array, halt: jax.Array, n_steps: jax.Array, *,
                 cfg: DecoderConfig, rules=None, width: int, num_top: int = 0, mode: str = "sorted",
                 penalties: bool = False, masked: bool = False, window: int = 0) -> tuple[SlotState, ChunkOutput]:
  """Up to min(n_steps, width) decode steps over every slot (stops early when all are done).

  halt [S] bool: rows the host ended (stop string, grammar complete, freed) become done
  first. allowed_bits [S, ceil(V/32)] int32: the token mask of every step of this chunk
  (used when `masked`; the host runs one-step chunks while a constrained row is active).
  window: when 0 < window < max_len, the steps attend over (and write into) only the first
  `window` entries of each slot row, copied out and back once per chunk. The host picks a
  bucketed window that holds every active row's sequence after the chunk, so a step's cost
  follows the running sequences' length, not the context limit (rows that are not active
  may write one clamped entry there, which nothing reads).
  """
  model = Decoder(cfg, rules)
  rows = state.rows
  slots = state.last.shape[0]
  max_len = state.cache["segment_ids"].shape[1]
  full_cache = None
  if 0 < window < max_len:
    full_cache = state.cache
    state = state._replace(cache=_cache_window(full_cache, window))
  allowed = unpack_bitmask(allowed_bits, cfg.vocab_size) if masked else None
  limit = jnp.minimum(n_steps, width)
  out = ChunkOutput(
      tokens=jnp.zeros((slots, width), jnp.int32), logprobs=jnp.zeros((slots, width), jnp.float32),
      forced=jnp.zeros((slots, width), bool), top_ids=jnp.zeros((slots, width, num_top), jnp.int32),
      top_lps=jnp.zeros((slots, width, num_top), jnp.float32), num=state.num, done=state.done,
      stopped=state.stopped)

  def cond(carry):
    j, s, _ = carry
    return (j < limit) & ~jnp.all(s.done)

  def body(carry):
    j, s, o = carry
    logits, cache = model.apply({"params": params}, s.last[:, None], positions=s.position[:, None],
                                segment_ids=jnp.ones((slots, 1), jnp.int32), cache=s.cache, cache_index=s.index)
    logits = logits[:, 0, :]
    token, force, progress, closed = pick_tokens(s, logits, rows, s.num, mode, penalties=penalties, allowed=allowed)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    active = ~s.done
    step = active.astype(jnp.int32)
    token = jnp.where(active, token, 0)
    is_stop = jnp.any(token[:, None] == rows.stop_ids, axis=-1) & active & ~force
    num = s.num + step
    index = s.index + step
    done = s.done | is_stop | (num >= rows.max_new) | (index >= max_len)

    def col(buffer, value):
      value = value.astype(buffer.dtype)
      return jax.lax.dynamic_update_slice_in_dim(buffer, value[:, None], j, axis=1)

    top_ids, top_lps = o.top_ids, o.top_lps
    if num_top:
      ids, values = _top(logp, num_top)
      top_ids = jax.lax.dynamic_update_slice_in_dim(top_ids, ids[:, None, :], j, axis=1)
      top_lps = jax.lax.dynamic_update_slice_in_dim(top_lps, values[:, None, :], j, axis=1)
    stopped = s.stopped | is_stop
    o = ChunkOutput(tokens=col(o.tokens, token), logprobs=col(o.logprobs, jnp.where(active, token_lp, 0.0)),
                    forced=col(o.forced, force & active), top_ids=top_ids, top_lps=top_lps, num=num, done=done,
                    stopped=stopped)
    s = s._replace(
        cache=cache, index=index, position=s.position + step, last=jnp.where(active, token, s.last), num=num,
        done=done, stopped=stopped, think_progress=jnp.where(s.think_closed, s.think_progress, progress),
        think_closed=jnp.where(active, closed, s.think_closed),
        counts=s.counts.at[jnp.arange(slots), token].add(step) if penalties else s.counts)
    return j + 1, _constrain(s, rules), o

  state = _constrain(state._replace(done=state.done | halt), rules)
  _, state, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, out._replace(done=state.done)))
  if full_cache is not None:
    state = _constrain(state._replace(cache=_cache_merge(full_cache, state.cache)), rules)
  return state, out


def cache_bytes(cfg: DecoderConfig, num_slots: int, max_len: int, cache_dtype: Optional[str] = None) -> int:
  """Bytes of the slot cache (keys and values of every layer)."""
  itemsize = jnp.dtype(as_dtype(cache_dtype or cfg.dtype)).itemsize
  return 2 * cfg.num_layers * num_slots * max_len * cfg.num_kv_heads * cfg.resolved_head_dim * itemsize
