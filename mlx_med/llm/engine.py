"""`ContinuousEngine`: continuous batching of generation requests over one model.

One loop thread owns the model and a fixed set of KV-cache slots (`max_num_seqs`,
see `mlx_med.core.continuous`). At every chunk boundary it

1. admits waiting jobs, first come first served, while their rows fit in free slots,
   and prefills all newly admitted rows together (one device call);
2. runs one decode chunk over every slot: `chunk_size` steps, or a single step while
   any active row has a `TokenConstraint` (its next mask depends on the token just
   chosen, and masks are computed on the host);
3. turns each row's new tokens into `StreamUpdate`s (incremental text, stop strings held
   back while they may still match, finish reasons, log-probabilities, think-budget
   forced flags; the static sampler's own row bookkeeping) and frees a finished row's
   slot at once, so the next waiting request takes it at the next boundary.

A request therefore never waits for an unrelated long generation to end, and its
greedy tokens (and seeded samples) are those it gets alone: rows never see each other
(per-row cache slots and masks) and every random draw depends only on the row's seed
and its own step.

Requests use today's job protocol (`Job.emit` receives ("update", k, StreamUpdate),
("end",) or ("error", exc)); `generate` is a blocking, thread-safe helper for in-process
callers. Vision-language models are not batched here: their image prefill needs input
embeddings per row, so `mlx-med serve` keeps the static `BatchingEngine` for them.

Memory: the slot cache is `max_num_seqs x max_model_len` tokens for every layer (a
static cache, not a paged one); lower `--max-model-len` to fit more slots.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import jax
import numpy as np

from mlx_med.core import continuous as cont
from mlx_med.core.sampler import (
  IncrementalText,
  RowParams,
  SampleOutput,
  SamplingParams,
  _Row,
  bucket,
  sampling_mode,
  set_row,
)

logger = logging.getLogger("mlx_med.llm.engine")

WARMUP_MAX_PROMPT = 1024  # warm-up compiles prompt buckets up to this length

MAX_STOP_IDS = 32  # stop token ids per row (eos ids included)
MAX_CLOSE_IDS = 16  # tokens of a think-closing tag


@dataclasses.dataclass
class Job:
  """One request: its rows, their sampling, and where its events go (from the loop thread)."""

  prompts: list[list[int]]  # one per row
  sampling: list[SamplingParams]
  emit: Callable[[Any], None]  # ("update", k, StreamUpdate) / ("end",) / ("error", exc)
  images: Optional[list] = None  # per row processed images (VLM) or None
  constraints: Optional[list] = None  # per row Optional[TokenConstraint]


@dataclasses.dataclass
class _JobState:
  job: Job
  left: int  # rows not finished yet
  failed: bool = False
  slots: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _SlotRow:
  owner: _JobState
  k: int  # row index within the job
  row: _Row
  constraint: Any = None


class ContinuousEngine:
  """Owns the model; requests join and leave the running batch at decode-chunk boundaries."""

  def __init__(self, lm, *, max_num_seqs: int = 32, chunk_size: int = 16, max_model_len: Optional[int] = None,
               seed: int = 0, max_prefill_rows: int = 16):
    if max_num_seqs < 1 or chunk_size < 1:
      raise ValueError(f"max_num_seqs and chunk_size must be >= 1, got {max_num_seqs} and {chunk_size}")
    if getattr(lm, "is_multimodal", False):
      raise ValueError("ContinuousEngine serves text models; use serve.BatchingEngine for a vision-language model")
    self.lm = lm
    self.cfg = lm.cfg
    self.max_model_len = min(int(max_model_len or self.cfg.max_seq_len), self.cfg.max_seq_len)
    self.max_batch_rows = int(max_num_seqs)
    sampler = lm.sampler
    multiple = sampler._batch_multiple()
    self.num_slots = -(-self.max_batch_rows // multiple) * multiple
    self.chunk_size = int(chunk_size)
    self.min_prefill_rows = min(max(1, sampler.min_batch_bucket), self.num_slots)
    # Admitted requests are prefilled in blocks of at most this many rows (a power-of-two bucket).
    self.max_prefill_rows = max(self.min_prefill_rows, min(self.num_slots, max_prefill_rows))
    self.min_prompt_bucket = sampler.min_prompt_bucket
    self._rng = np.random.default_rng(seed)
    self._detok = lm.detokenize if getattr(lm, "tokenizer", None) is not None else None
    self._lock = threading.Condition()
    self._waiting: collections.deque[_JobState] = collections.deque()
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._state = None
    self._slots: list[Optional[_SlotRow]] = [None] * self.num_slots
    self._used = [False] * self.num_slots
    self._halt = np.zeros(self.num_slots, bool)
    self._bits = cont.all_allowed(self.num_slots, self.cfg.vocab_size)
    self.stats = {"steps": 0, "chunks": 0, "prefills": 0, "admitted": 0, "finished": 0, "running": 0,
                  "waiting": 0, "slot_reuses": 0, "max_running": 0, "errors": 0, "num_slots": self.num_slots,
                  # the static engine's names (benchmarks and dashboards read them)
                  "requests": 0, "batches": 0, "rows": 0, "max_batch_rows_seen": 0}

  # ---- lifecycle

  def start(self) -> None:
    with self._lock:
      if self._thread is not None:
        return
      self._stop.clear()
      self._thread = threading.Thread(target=self._loop, name="mlx-med-continuous", daemon=True)
      self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    with self._lock:
      self._lock.notify_all()
      thread = self._thread
    if thread is not None:
      thread.join(timeout=10)
    self._thread = None

  # ---- requests

  def _validate(self, job: Job) -> None:
    n = len(job.prompts)
    if n == 0:
      raise ValueError("a job needs at least one prompt")
    if len(job.sampling) != n:
      raise ValueError(f"{n} prompts but {len(job.sampling)} sampling params")
    if n > self.max_batch_rows:
      raise ValueError(f"a request of {n} rows exceeds max_num_seqs={self.max_batch_rows}")
    if job.images is not None and any(im for im in job.images):
      raise ValueError("images are not supported by continuous batching; serve a vision-language model with "
                       "--batching static")
    if job.constraints is not None and len(job.constraints) != n:
      raise ValueError(f"{n} prompts but {len(job.constraints)} constraints")
    vocab = self.cfg.vocab_size
    for i, (p, sp) in enumerate(zip(job.prompts, job.sampling)):
      if not p:
        raise ValueError(f"prompt {i} is empty; give at least one token")
      if min(p) < 0 or max(p) >= vocab:
        raise ValueError(f"prompt {i}: token ids must be in [0, {vocab})")
      if len(p) + sp.max_new_tokens > self.max_model_len:
        raise ValueError(f"prompt {i} has {len(p)} tokens and asks for {sp.max_new_tokens} new ones, more than "
                         f"the context of {self.max_model_len} (max_model_len)")
      if len(sp.stop_token_ids) > MAX_STOP_IDS or len(sp.think_close_ids) > MAX_CLOSE_IDS:
        raise ValueError(f"row {i}: at most {MAX_STOP_IDS} stop token ids and {MAX_CLOSE_IDS} think-close tokens")
      if sp.stop_strings and self._detok is None:
        raise ValueError("stop strings need a tokenizer")

  def submit(self, job: Job) -> None:
    """Queues a job (ValueError at once for a request that can never run)."""
    self._validate(job)
    with self._lock:
      self._waiting.append(_JobState(job, left=len(job.prompts)))
      self.stats["requests"] += 1
      self.stats["waiting"] = sum(len(j.job.prompts) for j in self._waiting)
      self._lock.notify_all()

  def generate(self, prompts: Sequence[Sequence[int]], sampling: Union[SamplingParams, Sequence[SamplingParams]],
               *, constraints=None, images=None) -> list[SampleOutput]:
    """Runs the rows through the shared batch and returns their outputs (blocking, thread-safe)."""
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    outputs: list[Optional[SampleOutput]] = [None] * len(prompts)
    finished = threading.Event()
    error: list[BaseException] = []

    def emit(item):
      if item[0] == "update" and item[2].finished:
        outputs[item[1]] = item[2].output
      elif item[0] == "error":
        error.append(item[1])
        finished.set()
      elif item[0] == "end":
        finished.set()

    self.submit(Job([list(map(int, p)) for p in prompts], list(sampling), emit, images=images,
                    constraints=None if constraints is None else list(constraints)))
    self.start()
    finished.wait()
    if error:
      raise error[0]
    return outputs  # type: ignore[return-value]

  # ---- device calls

  def _ensure_state(self) -> None:
    if self._state is None:
      self._state = cont.init_slots(cfg=self.cfg, num_slots=self.num_slots, max_len=self.max_model_len,
                                    n_stop=MAX_STOP_IDS, n_close=MAX_CLOSE_IDS,
                                    cache_dtype=self.lm.sampler.cache_dtype, rules=self.lm.rules)

  def _put(self, x: np.ndarray):
    return self.lm.sampler._put_batch(x)

  def _num_top(self, sampling: Sequence[SamplingParams]) -> int:
    top = max([sp.num_top_logprobs for sp in sampling] + [0])
    return 0 if top == 0 else min(bucket(top, minimum=20), self.cfg.vocab_size)

  @staticmethod
  def _penalties(sampling: Sequence[SamplingParams]) -> bool:
    return any(sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1 for sp in sampling)

  def _prefill(self, prompts: list[list[int]], sampling: list[SamplingParams], slots: list[int],
               constraints: list) -> dict:
    """Prefills rows into `slots`; returns the host copy of their first-token output.
    constraints: per row None or that row's filled bitmask (int32 [ceil(V/32)])."""
    self._ensure_state()
    real = len(prompts)
    k = bucket(real, minimum=self.min_prefill_rows, maximum=self.max_prefill_rows)
    k = -(-k // self.lm.sampler._batch_multiple()) * self.lm.sampler._batch_multiple()
    plen = bucket(max(len(p) for p in prompts), self.min_prompt_bucket, maximum=self.max_model_len)
    block = np.full((k, plen), self.lm.sampler.pad_id, np.int32)
    rows = cont.empty_rows(k, n_stop=MAX_STOP_IDS, n_close=MAX_CLOSE_IDS)
    slot_ids = np.full(k, self.num_slots, np.int32)  # padding rows write nowhere
    bits = cont.all_allowed(k, self.cfg.vocab_size)
    for i, (p, sp) in enumerate(zip(prompts, sampling)):
      block[i, :len(p)] = p
      slot_ids[i] = slots[i]
      set_row(rows, i, sp, len(p), vocab_size=self.cfg.vocab_size, rng=self._rng)
      if constraints[i] is not None:
        bits[i] = constraints[i]
    masked = any(c is not None for c in constraints)
    self._state, out = cont.prefill_into_slots(
        self.lm.params, self._state, self._put(block), self._put(slot_ids),
        RowParams(**{name: self._put(v) for name, v in rows.items()}), self._put(bits), cfg=self.cfg,
        rules=self.lm.rules, num_top=self._num_top(sampling), mode=sampling_mode(sampling),
        penalties=self._penalties(sampling), masked=masked)
    self.stats["prefills"] += 1
    self.stats["batches"] += 1
    return jax.device_get(out._asdict())

  def _decode(self, active: list[int], sampling: Optional[list[SamplingParams]] = None,
              window: Optional[int] = None) -> dict:
    if sampling is None:
      sampling = [self._slots[s].row.sampling for s in active]
    constrained = [s for s in active if self._slots[s].constraint is not None]
    steps = 1 if constrained else self.chunk_size
    self._state, out = cont.decode_chunk(
        self.lm.params, self._state, self._put(self._bits), self._put(self._halt),
        np.asarray(steps, np.int32), cfg=self.cfg, rules=self.lm.rules, width=self.chunk_size,
        num_top=self._num_top(sampling), mode=sampling_mode(sampling), penalties=self._penalties(sampling),
        masked=bool(constrained), window=self._window(active, steps) if window is None else window)
    self._halt[:] = False
    for s in constrained:
      self._bits[s] = -1
    self.stats["chunks"] += 1
    return jax.device_get(out._asdict())

  def _window(self, active: list[int], steps: int) -> int:
    """The cache prefix a decode chunk attends over: a power-of-two bucket holding every active
    row's sequence after `steps` more tokens (0 = the whole slot row)."""
    longest = 0
    for s in active:
      slot_row = self._slots[s]
      longest = max(longest, len(slot_row.owner.job.prompts[slot_row.k]) + len(slot_row.row.tokens) + steps)
    window = bucket(longest, minimum=2 * self.min_prompt_bucket)
    return 0 if window >= self.max_model_len else window

  def _windows(self) -> list[int]:
    """Every window `_window` can pick (0 = the whole row)."""
    out, w = [], 2 * self.min_prompt_bucket
    while w < self.max_model_len:
      out.append(w)
      w *= 2
    return out + [0]

  # ---- host bookkeeping

  def _fail(self, js: _JobState, exc: BaseException) -> None:
    if js.failed:
      return
    js.failed = True
    self.stats["errors"] += 1
    for s in js.slots:
      if self._slots[s] is not None and self._slots[s].owner is js:
        self._slots[s] = None
        self._halt[s] = True
        self._bits[s] = -1
    js.job.emit(("error", exc))

  def _absorb(self, slot_row: _SlotRow, i: int, host: dict) -> bool:
    """Moves row i of a fetched output into the slot's record and emits its update; True when it ended."""
    row, js = slot_row.row, slot_row.owner
    old = len(row.tokens)
    num = int(host["num"][i])
    device_done = bool(host["done"][i])
    stopped = bool(host["stopped"][i])
    grammar_done = False
    if slot_row.constraint is not None:
      for j in range(num - old):
        token = int(host["tokens"][i, j])
        if device_done and stopped and old + j == num - 1:
          break  # a stop token ends the row; the grammar need not consume it
        slot_row.constraint.advance(token)
      grammar_done = slot_row.constraint.is_finished() and not device_done
    update = self.lm.sampler._advance_row(i, row, host, old, grammar_done, self._detok)
    if update is None:
      return False
    update.index = slot_row.k
    if update.output is not None:
      update.output.prompt_tokens = list(js.job.prompts[slot_row.k])
      if grammar_done and update.output.finish_reason == "length" and row.stop_hit is None:
        update.output.finish_reason, update.output.stop_reason = "stop", None
    js.job.emit(("update", slot_row.k, update))
    return update.finished

  def _collect(self, host: dict, pairs: list[tuple[int, int]]) -> None:
    """pairs: (row index in `host`, slot)."""
    for i, s in pairs:
      slot_row = self._slots[s]
      if slot_row is None:
        continue
      js = slot_row.owner
      try:
        ended = self._absorb(slot_row, i, host)
      except Exception as e:
        logger.exception("request failed while decoding")
        self._fail(js, e)
        continue
      if ended:
        self._slots[s] = None
        self._halt[s] = not bool(host["done"][i])  # ended on the host: the device row stops too
        self.stats["finished"] += 1
        js.left -= 1
        if js.left == 0 and not js.failed:
          js.job.emit(("end",))

  def _admit(self) -> None:
    free = [s for s in range(self.num_slots) if self._slots[s] is None]
    taken: list[_JobState] = []
    with self._lock:
      while self._waiting and len(self._waiting[0].job.prompts) <= len(free) - sum(j.left for j in taken):
        taken.append(self._waiting.popleft())
      self.stats["waiting"] = sum(len(j.job.prompts) for j in self._waiting)
    if not taken:
      return
    prompts, sampling, slots, constraints, pairs = [], [], [], [], []
    for js in list(taken):
      masks = self._first_masks(js)
      if masks is None:
        taken.remove(js)
        continue
      job = js.job
      for k, (p, sp) in enumerate(zip(job.prompts, job.sampling)):
        s = free.pop(0)
        constraint = job.constraints[k] if job.constraints is not None else None
        self._slots[s] = _SlotRow(js, k, _Row(sp, text=IncrementalText(self._detok) if self._detok else None),
                                  constraint)
        self._halt[s] = False
        js.slots.append(s)
        if self._used[s]:
          self.stats["slot_reuses"] += 1
        self._used[s] = True
        prompts.append(p)
        sampling.append(sp)
        slots.append(s)
        constraints.append(masks[k])
        pairs.append((len(pairs), s))
    if not prompts:
      return
    self.stats["admitted"] += len(prompts)
    self.stats["rows"] += len(prompts)
    # Blocks of at most max_prefill_rows rows: a bounded set of prefill shapes (rows x prompt
    # buckets) that warm-up compiles, whatever arrives together.
    for start in range(0, len(prompts), self.max_prefill_rows):
      end = min(start + self.max_prefill_rows, len(prompts))
      try:
        host = self._prefill(prompts[start:end], sampling[start:end], slots[start:end], constraints[start:end])
      except Exception as e:
        logger.exception("prefill of %d rows failed", end - start)
        self._recover(taken, e)
        return
      self._collect(host, [(i - start, s) for i, s in pairs[start:end]])

  def _first_masks(self, js: _JobState) -> Optional[list]:
    """Each row's first-token bitmask (None for unconstrained rows); None when a grammar failed."""
    job = js.job
    masks = [None] * len(job.prompts)
    try:
      for k, constraint in enumerate(job.constraints or []):
        if constraint is not None:
          masks[k] = np.zeros(cont.mask_words(self.cfg.vocab_size), np.int32)
          constraint.fill_bitmask(masks[k])
    except Exception as e:
      logger.exception("a token constraint failed")
      self._fail(js, e)
      return None
    return masks

  def _recover(self, jobs: Sequence[_JobState], exc: BaseException) -> None:
    """A device call failed: its requests get the error; the (possibly donated) state is rebuilt."""
    for js in jobs:
      self._fail(js, exc)
    for s, slot_row in enumerate(self._slots):
      if slot_row is not None:
        self._fail(slot_row.owner, exc)
    self._slots = [None] * self.num_slots
    self._halt[:] = False
    self._bits[:] = -1
    self._state = None

  def step(self) -> bool:
    """One scheduling round (admit, then one decode chunk); False when there was nothing to do."""
    self._admit()
    for s in range(self.num_slots):
      slot_row = self._slots[s]
      if slot_row is not None and slot_row.constraint is not None:
        try:
          slot_row.constraint.fill_bitmask(self._bits[s])
        except Exception as e:
          logger.exception("a token constraint failed")
          self._fail(slot_row.owner, e)
    active = [s for s in range(self.num_slots) if self._slots[s] is not None]
    running = len(active)
    self.stats["running"] = running
    self.stats["max_running"] = max(self.stats["max_running"], running)
    self.stats["max_batch_rows_seen"] = self.stats["max_running"]
    if not active:
      return False
    try:
      host = self._decode(active)
    except Exception as e:
      logger.exception("decode chunk failed")
      self._recover([], e)
      return True
    self.stats["steps"] += int(max(host["num"][s] - len(self._slots[s].row.tokens) for s in active))
    self._collect(host, [(s, s) for s in active])
    self.stats["running"] = sum(r is not None for r in self._slots)
    return True

  def _loop(self) -> None:
    while not self._stop.is_set():
      if not self.step():
        with self._lock:
          if not self._waiting and not self._stop.is_set():
            self._lock.wait(timeout=0.1)

  # ---- warm-up

  def warm_up(self) -> int:
    """Compiles, before serving, the prefill shapes requests meet -- each admitted-block bucket (up
    to max_prefill_rows rows) at each prompt bucket up to WARMUP_MAX_PROMPT tokens (longer prompts
    compile on first use) -- and the
    decode chunk at every cache window, in the model's default sampling mode without logprobs,
    penalties or constraints (those compile on first use). Call before `start`. Returns the
    number of prefill shapes."""
    plen = self.min_prompt_bucket
    if plen + 2 > self.max_model_len:
      logger.info("warm-up skipped: the smallest shape (%d + 2 tokens) exceeds the context", plen)
      return 0
    sampling = self.lm.sampling_params(max_tokens=2)
    sizes, rows = [], self.min_prefill_rows
    while True:
      sizes.append(rows)
      if rows >= self.max_prefill_rows:
        break
      rows = bucket(rows * 2, minimum=1, maximum=self.max_prefill_rows)
    plens, longest = [], min(self.max_model_len, WARMUP_MAX_PROMPT)
    while True:
      plens.append(plen)
      nxt = bucket(plen + 1, self.min_prompt_bucket, maximum=self.max_model_len)
      if nxt == plen or nxt > longest:
        break
      plen = nxt
    logger.info("warm-up: compiling %d shape(s) (batch rows %s, prompt buckets %s, decode chunks of %d steps "
                "over %d slots, cache windows %s); --no-warmup skips this", len(sizes) * len(plens),
                ",".join(map(str, sizes)), ",".join(map(str, plens)), self.chunk_size, self.num_slots,
                ",".join(str(w or self.max_model_len) for w in self._windows()))
    started = time.monotonic()
    pad = self.lm.sampler.pad_id
    for plen in plens:
      for rows in sizes:
        self._prefill([[pad] * plen] * rows, [sampling] * rows, list(range(rows)), [None] * rows)
    self._slots = [None] * self.num_slots
    self._halt[:] = True  # the warm-up rows stop
    for window in self._windows():
      self._decode([], [sampling], window=window)
    self._state = None  # fresh slots for serving
    self.stats.update(prefills=0, batches=0, chunks=0)
    logger.info("warm-up done in %.1fs", time.monotonic() - started)
    return len(sizes) * len(plens)
