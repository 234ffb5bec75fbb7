"""An OpenAI-compatible HTTP server for a local model: `python -m mlx_med.llm.serve --model DIR`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the
model's chat template applied), POST /v1/embeddings, GET /health, GET /stats (batching
counters).

Structured output (`mlx_med.llm.grammar`, llguidance token masks applied inside the
jitted decode step, continuous engine): chat `response_format` {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}} or {"type": "json_object"} makes every
answer a JSON document valid under the schema (unless max_tokens cuts it: finish_reason
"length"). Tools in OpenAI's format are given to the chat template (`tools=`; a template
that does not render them gets them as system instructions); the model calls one as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes/Qwen). tool_choice
"required" or a named function constrains the answer to such calls, "auto" parses them
from free text; calls come back as `message.tool_calls` (streamed: `delta.tool_calls`,
each call whole) with finish_reason "tool_calls", and messages of role tool
(tool_call_id, content) carry the results back. Embeddings are the mean of the final
hidden states (after the last norm, HF's `last_hidden_state`) over the input's tokens,
L2-normalised; `dimensions` is refused. Sampling
knobs: temperature, top_p, max_tokens, stop, n, seed, logprobs, stream (SSE),
presence/frequency penalties, plus vLLM's extras top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids, include_stop_str_in_output, and `think_budget` (forced
`</think>` after that many tokens, X-Reasoner's forced exit).

Concurrency: HTTP handlers only parse and validate; a single engine thread owns the
model. By default (`--batching continuous`, `mlx_med.llm.engine.ContinuousEngine`) a
request joins the running batch at the next decode-chunk boundary and a finished row
frees its slot at once; at most `--max-num-seqs` sequences run together. With
`--batching static` (and always for vision-language models) the **batching loop**
takes every request waiting in its queue (up to
`max_batch_rows` sequences, each request contributing `n`), runs them as one
sampler call, and streams each row's updates back to its handler. Requests that
arrive while a batch runs form the next batch.

Errors follow OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a
4xx status for bad requests (5xx only for our own failures), and never stop the
server. The default bind address is loopback: patient data stays on this machine
unless the operator deliberately exposes it (then set --api-key).

Vision-language models (a directory whose config.json is a LLaVA or Qwen2.5-VL, see
`mlx_med.vlm.local`) are served the same way; their chat messages may hold OpenAI
`image_url` content parts. Images come only from `data:` URLs, or from local files under
`--allowed-local-media-path DIR` (vLLM's flag); remote URLs are refused with a 400 and
nothing is ever fetched from the network. At most `--limit-mm-per-prompt` images per
request; a text-only model answers image parts with a 400. The batching loop carries
each row's images: the rows of a batch with images prefill from input embeddings (text
rows from their plain token embeddings).
"""

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import math
import queue
import threading
import time
import uuid
from typing import Any, Callable, Optional

from mlx_med.core.sampler import SamplingParams
from mlx_med.llm.engine import ContinuousEngine, Job

logger = logging.getLogger("mlx_med.llm.serve")

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16
DEFAULT_IMAGE_LIMIT = 4  # images per prompt (--limit-mm-per-prompt)


class APIError(Exception):
  """An error reported to the client in OpenAI's format."""

  def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None):
    super().__init__(message)
    self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- batching loop


# One request's rows and event sink, shared by both engines: emit is called from the engine
# thread with ("update", k, StreamUpdate) / ("error", exc) / ("end",).
_Job = Job


class BatchingEngine:
  """Owns the model; groups waiting requests into one sampler call at a time."""

  def __init__(self, lm, *, max_batch_rows: int = 32, batch_wait_s: float = 0.005, chunk_size: int = 16):
    self.lm = lm
    self.max_batch_rows = max_batch_rows
    self.batch_wait_s = batch_wait_s
    self.chunk_size = chunk_size
    self._queue: "queue.Queue[_Job]" = queue.Queue()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="mlx-med-batching", daemon=True)
    self.stats = {"batches": 0, "requests": 0, "rows": 0, "max_batch_rows_seen": 0, "errors": 0}
    self._pending: Optional[_Job] = None

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def submit(self, job: _Job) -> None:
    self._queue.put(job)

  def _take_batch(self) -> list[_Job]:
    first = self._pending
    self._pending = None
    while first is None and not self._stop.is_set():
      try:
        first = self._queue.get(timeout=0.1)
      except queue.Empty:
        continue
    if first is None:
      return []
    jobs, rows = [first], len(first.prompts)
    # Wait `batch_wait_s` for company; every arrival extends the wait (a burst of
    # concurrent requests keeps coming in), up to 10x that in total.
    start = time.monotonic()
    deadline = start + self.batch_wait_s
    while rows < self.max_batch_rows:
      timeout = deadline - time.monotonic()
      try:
        job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if rows + len(job.prompts) > self.max_batch_rows:
        self._pending = job  # first in line for the next batch
        break
      jobs.append(job)
      rows += len(job.prompts)
      deadline = min(time.monotonic() + self.batch_wait_s, start + 10 * self.batch_wait_s)
    return jobs

  def warm_up(self) -> int:
    """Compiles the sampler's programs for the common request shapes before serving.

    Without it the first request of each new shape waits for XLA (seconds per shape,
    longer for big models). One short generation runs per batch-size bucket up to
    `max_batch_rows`, with a prompt of the smallest prompt bucket and the smallest
    new-token bucket, in the model's default sampling mode without logprobs or
    penalties: that compiles the prefill, the decode chunk and the window read that
    such requests use, streamed or not. Longer prompts, larger `max_tokens` (an unset
    one means "the rest of the context"), logprobs or penalties still compile their
    shape on first use. Returns the number of shapes compiled.
    """
    from mlx_med.core.sampler import bucket

    sampler = self.lm.sampler
    plen, new = sampler.min_prompt_bucket, sampler.min_new_bucket
    if plen + new > self.lm.cfg.max_seq_len:
      logger.info("warm-up skipped: the smallest shape (%d + %d tokens) exceeds the context", plen, new)
      return 0
    sampling = self.lm.sampling_params(max_tokens=new)
    rows = bucket(1, minimum=sampler.min_batch_bucket)
    last = bucket(self.max_batch_rows, minimum=sampler.min_batch_bucket)
    sizes = []
    while rows <= last:
      sizes.append(rows)
      rows *= 2
    logger.info("warm-up: compiling %d shape(s) (batch rows %s, prompts <= %d tokens, <= %d new tokens); "
                "--no-warmup skips this", len(sizes), ",".join(map(str, sizes)), plen, new)
    started = time.monotonic()
    for rows in sizes:
      for _ in self.lm.stream_tokens([[sampler.pad_id] * plen] * rows, sampling, chunk_size=self.chunk_size):
        pass
    compiled = len(sizes)
    # A vision-language model also compiles one single-image chat (vision tower, prefill from
    # embeddings at an image prompt's length), the shape of a lone image request.
    if getattr(self.lm, "is_multimodal", False) and self.lm.warm_up_image(sampling, chunk_size=self.chunk_size):
      compiled += 1
    logger.info("warm-up done in %.1fs", time.monotonic() - started)
    return compiled

  def _loop(self) -> None:
    while not self._stop.is_set():
      jobs = self._take_batch()
      if not jobs:
        continue
      prompts, sampling, owner, images = [], [], [], []
      for j, job in enumerate(jobs):
        for k, (p, sp) in enumerate(zip(job.prompts, job.sampling)):
          prompts.append(p)
          sampling.append(sp)
          owner.append((j, k))
          images.append(job.images[k] if job.images is not None else None)
      # Only a batch with images passes them (a text model's stream_tokens takes none).
      extra = {"images": images} if any(images) else {}
      self.stats["batches"] += 1
      self.stats["requests"] += len(jobs)
      self.stats["rows"] += len(prompts)
      self.stats["max_batch_rows_seen"] = max(self.stats["max_batch_rows_seen"], len(prompts))
      started = time.monotonic()
      try:
        for updates in self.lm.stream_tokens(prompts, sampling, chunk_size=self.chunk_size, **extra):
          for u in updates:
            j, k = owner[u.index]
            jobs[j].emit(("update", k, u))
        for job in jobs:
          job.emit(("end",))
      except Exception as e:  # a failure of one batch must not stop the server
        self.stats["errors"] += 1
        logger.exception("batch of %d rows failed", len(prompts))
        for job in jobs:
          job.emit(("error", e))
      # Metadata only: prompt contents are never logged.
      logger.info("batch: %d requests, %d rows, %.3fs", len(jobs), len(prompts), time.monotonic() - started)


# --------------------------------------------------------------------------- request parsing

_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                  "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p",
                  "ignore_eos", "stop_token_ids", "include_stop_str_in_output", "think_budget", "think_close",
                  "repetition_penalty"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
MAX_EMBED_INPUTS = 2048
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "top_logprobs", "max_completion_tokens", "response_format", "tools",
                                 "tool_choice", "parallel_tool_calls", "functions", "function_call", "store",
                                 "metadata", "service_tier", "chat_template_kwargs", "add_generation_prompt",
                                 "reasoning_effort", "modalities"}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt_number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> Optional[float]:
  v = body.get(name)
  if v is None:
    return None
  if not _is_number(v) or v > hi or v < lo or (lo_open and v == lo):
    bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
    raise APIError(f"{name} must be a number in {bound}, got {v!r}", param=name, code="invalid_value")
  return float(v)


def _opt_int(body: dict, name: str, lo: int, hi: Optional[int] = None) -> Optional[int]:
  v = body.get(name)
  if v is None:
    return None
  if not _is_int(v) or v < lo or (hi is not None and v > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise APIError(f"{name} must be an integer {rng}, got {v!r}", param=name, code="invalid_value")
  return v


def _opt_bool(body: dict, name: str, default: bool = False) -> bool:
  v = body.get(name, default)
  if v is None:
    return default
  if not isinstance(v, bool):
    raise APIError(f"{name} must be a boolean, got {v!r}", param=name, code="invalid_type")
  return v


def _require_default(body: dict, name: str, ok: Callable[[Any], bool], what: str) -> None:
  if name in body and body[name] is not None and not ok(body[name]):
    raise APIError(f"{name} is not supported by this server ({what})", param=name, code="unsupported_parameter")


@dataclasses.dataclass
class _Parsed:
  prompts: list[list[int]]  # one per prompt (before n)
  knobs: dict
  n: int
  stream: bool
  include_usage: bool
  logprobs: Optional[int]
  images: Optional[list] = None  # per prompt: its processed images (multimodal chat), or None
  constraint: Optional[Any] = None  # a grammar constraint (llm.grammar); each row runs a fresh copy
  tools: Optional[list] = None  # validated tools when tool calls may come back (tool_choice not "none")
  tool_choice: Any = "none"  # "none" | "auto" | "required" | {"type": "function", ...}


class OpenAIServer:
  """Request validation and response shaping around a `BatchingEngine`."""

  def __init__(self, lm, engine: BatchingEngine, *, model_name: str, api_key: Optional[str] = None,
               allowed_local_media_path: Optional[str] = None, limit_mm_per_prompt: int = DEFAULT_IMAGE_LIMIT):
    self.lm = lm
    self.engine = engine
    self.model_name = model_name
    self.api_key = api_key
    self.multimodal = bool(getattr(lm, "is_multimodal", False))
    self.allowed_local_media_path = allowed_local_media_path
    self.limit_mm_per_prompt = int(limit_mm_per_prompt)
    self.created = int(time.time())
    self.max_model_len = lm.cfg.max_seq_len

  # ---- validation

  def _check_common(self, body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
      raise APIError(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                     code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
      raise APIError("you must provide a model parameter", param="model", code="missing_required_parameter")
    if model != self.model_name:
      raise APIError(f"The model `{model}` does not exist. This server serves `{self.model_name}`.", status=404,
                     param="model", code="model_not_found")
    _require_default(body, "logit_bias", lambda v: isinstance(v, dict) and not v, "only an empty map")
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
      raise APIError("user must be a string", param="user", code="invalid_type")

  def _knobs(self, body: dict, max_tokens: Optional[int], prompt_len: int, logprobs: int) -> dict:
    temperature = _opt_number(body, "temperature", 0.0, 2.0)
    presence = _opt_number(body, "presence_penalty", -2.0, 2.0)
    frequency = _opt_number(body, "frequency_penalty", -2.0, 2.0)
    repetition = _opt_number(body, "repetition_penalty", 0.0, 10.0, lo_open=True)
    top_p = _opt_number(body, "top_p", 0.0, 1.0, lo_open=True)
    min_p = _opt_number(body, "min_p", 0.0, 1.0)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
      raise APIError(f"top_k must be -1 (off), 0 (off) or a positive integer, got {top_k!r}", param="top_k",
                     code="invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
      raise APIError(f"seed must be an integer, got {seed!r}", param="seed", code="invalid_type")
    stop = body.get("stop")
    if stop is not None:
      stops = [stop] if isinstance(stop, str) else stop
      if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise APIError(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                       param="stop", code="invalid_value")
      stop = stops
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < self.lm.cfg.vocab_size for t in stop_ids):
      raise APIError("stop_token_ids must be a list of token ids", param="stop_token_ids", code="invalid_value")
    think_budget = _opt_int(body, "think_budget", 0)
    think_close = body.get("think_close") or "</think>"
    if not isinstance(think_close, str):
      raise APIError("think_close must be a string", param="think_close", code="invalid_type")
    remaining = self.max_model_len - prompt_len
    if remaining <= 0 or (max_tokens is not None and max_tokens > remaining):
      asked = max_tokens if max_tokens is not None else 1
      raise APIError(
          f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
          f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
          "Please reduce the length of the prompt or of max_tokens.",
          param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    return dict(max_tokens=max_tokens if max_tokens is not None else remaining, temperature=temperature,
                top_p=top_p, top_k=None if top_k is None else max(0, top_k), min_p=min_p, stop=stop,
                stop_token_ids=stop_ids, seed=seed, logprobs=logprobs,
                ignore_eos=_opt_bool(body, "ignore_eos"),
                include_stop_str_in_output=_opt_bool(body, "include_stop_str_in_output"),
                think_budget=think_budget, think_close=think_close, presence_penalty=presence,
                frequency_penalty=frequency, repetition_penalty=repetition)

  def _stream_options(self, body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
      return False
    if not stream:
      raise APIError("stream_options is only allowed when stream is true", param="stream_options",
                     code="invalid_value")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
      raise APIError("stream_options must be an object with include_usage", param="stream_options",
                     code="invalid_value")
    return bool(opts.get("include_usage", False))

  def _encode_prompts(self, prompt: Any) -> list[list[int]]:
    vocab = self.lm.cfg.vocab_size
    bad = APIError("prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
                   param="prompt", code="invalid_type")
    if isinstance(prompt, str):
      items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
      items = [prompt]
    elif isinstance(prompt, list) and prompt:
      items = prompt
    else:
      raise bad
    out = []
    for item in items:
      if isinstance(item, str):
        ids = self.lm.encode_prompt(item)
      elif isinstance(item, list) and item and all(_is_int(t) for t in item):
        if not all(0 <= t < vocab for t in item):
          raise APIError(f"token ids in prompt must be in [0, {vocab})", param="prompt", code="invalid_value")
        ids = list(item)
      else:
        raise bad
      if not ids:
        raise APIError("prompt is empty (it encodes to no tokens)", param="prompt", code="invalid_value")
      out.append(ids)
    if len(out) * 1 > self.engine.max_batch_rows:
      raise APIError(f"at most {self.engine.max_batch_rows} prompts per request", param="prompt",
                     code="invalid_value")
    return out

  def parse_completion(self, body: dict) -> _Parsed:
    self._check_common(body, _COMPLETION_FIELDS)
    if "prompt" not in body:
      raise APIError("you must provide a prompt parameter", param="prompt", code="missing_required_parameter")
    if _opt_bool(body, "echo"):
      raise APIError("echo is not supported by this server", param="echo", code="unsupported_parameter")
    _require_default(body, "suffix", lambda v: v == "", "no suffix")
    n = _opt_int(body, "n", 1, MAX_N) or 1
    best_of = _opt_int(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != n:
      raise APIError("best_of different from n is not supported", param="best_of", code="unsupported_parameter")
    logprobs = _opt_int(body, "logprobs", 0, MAX_LOGPROBS)
    max_tokens = _opt_int(body, "max_tokens", 1)
    prompts = self._encode_prompts(body["prompt"])
    if self.multimodal and any(self.lm.image_token_id in p for p in prompts):
      raise APIError("the prompt holds the model's image placeholder token but completions take no images; send "
                     "images as image_url parts to /v1/chat/completions", param="prompt", code="invalid_value")
    if len(prompts) * n > self.engine.max_batch_rows:
      raise APIError(f"len(prompt) * n must be at most {self.engine.max_batch_rows}", param="n", code="invalid_value")
    stream = _opt_bool(body, "stream")
    knobs = self._knobs(body, 16 if max_tokens is None else max_tokens, max(len(p) for p in prompts),
                        logprobs or 0)
    return _Parsed(prompts, knobs, n, stream, self._stream_options(body, stream), logprobs)

  def _chat_prompt(self, body: dict) -> list[int]:
    return self._chat_inputs(body)[0]

  def _content_parts(self, content: list, i: int) -> tuple[list[dict], int]:
    """Validates a list content: text parts, and image_url parts for a multimodal model."""
    where = f"messages[{i}].content"
    parts, images = [], 0
    for j, part in enumerate(content):
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text" and isinstance(part.get("text"), str):
        parts.append({"type": "text", "text": part["text"]})
      elif kind in ("image_url", "image") and not self.multimodal:
        raise APIError(f"{where}[{j}]: model `{self.model_name}` is a text-only model and does not accept images; "
                       "send text parts only, or serve a vision-language model", param=where,
                       code="invalid_value")
      elif kind == "image_url":
        images += 1
        parts.append(part)  # the URL is checked and decoded by mlx_med.vlm.messages
      elif self.multimodal:
        raise APIError(f"{where}[{j}]: content parts must be {{'type': 'text', 'text': ...}} or "
                       "{'type': 'image_url', 'image_url': {'url': ...}}", param=where, code="invalid_value")
      else:
        raise APIError(f"{where}: only text parts are supported by this text model", param=where,
                       code="invalid_value")
    return parts, images

  def _tool_fields(self, m: dict, i: int) -> dict:
    """A message's tool_call_id (role tool) and tool_calls (role assistant), checked."""
    out = {}
    if m.get("role") == "tool":
      call_id = m.get("tool_call_id")
      if not isinstance(call_id, str) or not call_id:
        raise APIError(f"messages[{i}]: a tool message needs tool_call_id (the id of the call it answers)",
                       param=f"messages[{i}].tool_call_id", code="invalid_value")
      out["tool_call_id"] = call_id
    calls = m.get("tool_calls")
    if calls is not None:
      ok = (m.get("role") == "assistant" and isinstance(calls, list) and all(
          isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
          and isinstance(c["function"].get("arguments", ""), (str, dict)) for c in calls))
      if not ok:
        raise APIError(f"messages[{i}].tool_calls must be a list of {{\"id\", \"type\": \"function\", \"function\": "
                       "{\"name\", \"arguments\"}} on an assistant message", param=f"messages[{i}].tool_calls",
                       code="invalid_value")
      if calls:
        out["tool_calls"] = calls
    return out

  def _chat_inputs(self, body: dict, tools: Optional[list] = None) -> tuple[list[int], Optional[list]]:
    """The chat request's prompt token ids (image placeholders expanded) and processed images
    (None for a text model). `tools` (validated) are given to the chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise APIError("messages must be a non-empty list", param="messages", code="invalid_value")
    clean, images = [], 0
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
        raise APIError(f"messages[{i}] must be an object with a role of system, developer, user, assistant or tool",
                       param=f"messages[{i}]", code="invalid_value")
      content = m.get("content")
      if isinstance(content, list):
        parts, count = self._content_parts(content, i)
        images += count
        # A multimodal model's template takes the parts; a text model's gets the joined text.
        content = parts if self.multimodal else "".join(p["text"] for p in parts)
      if content is None:
        content = ""
      if not isinstance(content, (str, list)):
        raise APIError(f"messages[{i}].content must be a string or a list of content parts",
                       param=f"messages[{i}].content", code="invalid_type")
      item = {**{k: v for k, v in m.items() if k in ("role", "name")}, "content": content}
      item.update(self._tool_fields(m, i))
      clean.append(item)
    if images > self.limit_mm_per_prompt:
      raise APIError(f"this request holds {images} images; at most {self.limit_mm_per_prompt} per prompt are "
                     "accepted (the server's --limit-mm-per-prompt)", param="messages", code="invalid_value")
    if self.lm.tokenizer is None or not self.lm.tokenizer.has_chat_template:
      raise APIError("this model has no chat template; use /v1/completions", param="messages",
                     code="no_chat_template")
    extra = body.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
      raise APIError("chat_template_kwargs must be an object", param="chat_template_kwargs", code="invalid_type")
    add_generation_prompt = _opt_bool(body, "add_generation_prompt", True)
    image_inputs = None
    if self.multimodal:
      from mlx_med.vlm.messages import ImageInputError, ImageRefused

      try:
        ids, image_inputs = self.lm.prepare_chat(clean, allowed_local_dir=self.allowed_local_media_path,
                                                 add_generation_prompt=add_generation_prompt, **extra)
      except ImageRefused as e:
        raise APIError(str(e), param="messages", code="image_url_refused") from None
      except ImageInputError as e:
        raise APIError(str(e), param="messages", code="invalid_image") from None
      except ValueError as e:  # e.g. image placeholders written into the text by hand
        raise APIError(str(e), param="messages", code="invalid_value") from None
      except Exception as e:  # template errors (e.g. role order a template rejects) are the caller's to fix
        raise APIError(f"the chat template rejected these messages: {e}", param="messages",
                       code="invalid_value") from None
    else:
      try:
        from mlx_med.llm import grammar as grammar_lib

        clean, tool_kwargs = grammar_lib.chat_with_tools(clean, tools, getattr(self.lm.tokenizer.hf, "chat_template",
                                                                               None))
        ids = self.lm.tokenizer.encode_chat(clean, add_generation_prompt=add_generation_prompt,
                                            **{**tool_kwargs, **extra})
      except Exception as e:  # template errors (e.g. role order a template rejects) are the caller's to fix
        raise APIError(f"the chat template rejected these messages: {e}", param="messages",
                       code="invalid_value") from None
    if not ids:
      raise APIError("messages encode to no tokens", param="messages", code="invalid_value")
    return ids, image_inputs

  def parse_chat(self, body: dict) -> _Parsed:
    self._check_common(body, _CHAT_FIELDS)
    _require_default(body, "functions", lambda v: v == [], "the deprecated functions; use tools")
    _require_default(body, "function_call", lambda v: v == "none", "the deprecated function_call; use tool_choice")
    tools, tool_choice, constraint = self._structured_output(body)
    _require_default(body, "reasoning_effort", lambda v: False, "no reasoning-effort control; use think_budget")
    _require_default(body, "modalities", lambda v: v == ["text"], "text only")
    _require_default(body, "store", lambda v: v is False, "nothing is stored")
    # metadata, service_tier and parallel_tool_calls change nothing here (no storage, one tier, no tools).
    n = _opt_int(body, "n", 1, MAX_N) or 1
    logprobs_flag = _opt_bool(body, "logprobs")
    top = _opt_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not logprobs_flag:
      raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs", code="invalid_value")
    max_tokens = _opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
      max_tokens = _opt_int(body, "max_tokens", 1)
    prompt, images = self._chat_inputs(body, tools)  # the template sees the tools even with tool_choice none
    if n > self.engine.max_batch_rows:
      raise APIError(f"n must be at most {self.engine.max_batch_rows}", param="n", code="invalid_value")
    stream = _opt_bool(body, "stream")
    logprobs = (top or 0) if logprobs_flag else None
    knobs = self._knobs(body, max_tokens, len(prompt), logprobs or 0)
    return _Parsed([prompt], knobs, n, stream, self._stream_options(body, stream), logprobs,
                   images=None if images is None else [images], constraint=constraint,
                   tools=tools if tool_choice != "none" else None, tool_choice=tool_choice)

  def _structured_output(self, body: dict) -> tuple[Optional[list], Any, Optional[Any]]:
    """(tools, tool_choice, grammar constraint) of a chat request: response_format json_schema /
    json_object and a forced tool_choice ("required", a named function) are decoded under a
    grammar; tool_choice "auto" parses calls from free text."""
    from mlx_med.llm import grammar as grammar_lib

    tools: Optional[list] = None
    if body.get("tools") is not None:
      try:
        tools = grammar_lib.validate_tools(body["tools"])
      except ValueError as e:
        raise APIError(str(e), param="tools", code="invalid_value") from None
    try:
      tool_choice = grammar_lib.resolve_tool_choice(body.get("tool_choice"), tools or [])
    except ValueError as e:
      raise APIError(str(e), param="tool_choice", code="invalid_value") from None
    parallel = _opt_bool(body, "parallel_tool_calls", True)
    fmt = body.get("response_format")
    needs_grammar = tool_choice not in ("none", "auto") or (isinstance(fmt, dict) and fmt.get("type") != "text")
    if needs_grammar and isinstance(self.engine, BatchingEngine):
      raise APIError("response_format json_schema/json_object and a forced tool_choice need the continuous engine; "
                     "restart the server with --batching continuous (vision-language models: not available)",
                     param="response_format" if tool_choice in ("none", "auto") else "tool_choice",
                     code="unsupported_parameter")
    tokenizer, vocab = self.lm.tokenizer, self.lm.cfg.vocab_size
    constraint = None
    try:
      if tool_choice not in ("none", "auto"):
        constraint = grammar_lib.constraint_for_tools(tools or [], tool_choice, tokenizer, vocab,
                                                      parallel_tool_calls=parallel)
    except ValueError as e:
      raise APIError(str(e), param="tools", code="invalid_value") from None
    if constraint is None:
      try:
        constraint = grammar_lib.constraint_for_response_format(fmt, tokenizer, vocab)
      except ValueError as e:
        raise APIError(str(e), param="response_format", code="invalid_value") from None
    return tools, tool_choice, constraint

  # ---- embeddings

  def parse_embeddings(self, body: dict) -> list[list[int]]:
    """POST /v1/embeddings: `input` (a string, a list of strings, a list of token ids or a list
    of such lists) -> token prompts; `encoding_format` float | base64; `dimensions` refused."""
    self._check_common(body, _EMBEDDING_FIELDS)
    if body.get("dimensions") is not None:
      raise APIError("dimensions is not supported: embeddings have the model's hidden size "
                     f"({self.lm.cfg.d_model}); leave it unset", param="dimensions", code="unsupported_parameter")
    if body.get("encoding_format", "float") not in ("float", "base64", None):
      raise APIError(f"encoding_format must be 'float' or 'base64', got {body['encoding_format']!r}",
                     param="encoding_format", code="invalid_value")
    if not callable(getattr(self.lm, "embed", None)):
      raise APIError(f"model `{self.model_name}` does not serve embeddings", param="model",
                     code="unsupported_model")
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_int(t) for t in raw)):
      items: list = [raw]
    elif isinstance(raw, list) and raw:
      items = raw
    else:
      raise APIError("input must be a non-empty string, a list of strings, a list of token ids or a list of lists "
                     "of token ids", param="input", code="invalid_value")
    if len(items) > MAX_EMBED_INPUTS:
      raise APIError(f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(items)}", param="input",
                     code="invalid_value")
    vocab, out = self.lm.cfg.vocab_size, []
    for i, item in enumerate(items):
      if isinstance(item, str):
        ids = self.lm.encode_prompt(item) if item else []
      elif isinstance(item, list) and all(_is_int(t) for t in item):
        if not all(0 <= t < vocab for t in item):
          raise APIError(f"input[{i}]: token ids must be in [0, {vocab})", param="input", code="invalid_value")
        ids = list(item)
      else:
        raise APIError(f"input[{i}] must be a string or a list of token ids", param="input", code="invalid_type")
      if not ids:
        raise APIError(f"input[{i}] is empty; every input needs at least one token", param="input",
                       code="invalid_value")
      if len(ids) > self.max_model_len:
        raise APIError(f"input[{i}] has {len(ids)} tokens; this model's maximum context length is "
                       f"{self.max_model_len} tokens. Split the text into shorter pieces.", param="input",
                       code="context_length_exceeded")
      out.append(ids)
    return out

  # ---- running

  def _sampling_rows(self, parsed: _Parsed) -> tuple[list[list[int]], list[SamplingParams]]:
    prompts, sampling = [], []
    for p in parsed.prompts:
      for j in range(parsed.n):
        knobs = dict(parsed.knobs)
        if knobs["seed"] is not None:
          # n samples of one seeded request must differ, and be reproducible.
          knobs["seed"] = (knobs["seed"] + 7919 * j) % (2**32)
        try:
          sampling.append(self.lm.sampling_params(**knobs))
        except ValueError as e:
          raise APIError(str(e), code="invalid_value") from None
        prompts.append(p)
    return prompts, sampling

  def submit(self, parsed: _Parsed, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    prompts, sampling = self._sampling_rows(parsed)
    images = None
    if parsed.images is not None:  # rows are prompt-major, n per prompt (as _sampling_rows)
      images = [row for row in parsed.images for _ in range(parsed.n)]
    events: asyncio.Queue = asyncio.Queue()
    try:
      constraints = None if parsed.constraint is None else [parsed.constraint.copy() for _ in prompts]
      self.engine.submit(_Job(prompts, sampling, lambda item: loop.call_soon_threadsafe(events.put_nowait, item),
                              images=images, constraints=constraints))
    except ValueError as e:  # the continuous engine refuses a request that can never run
      raise APIError(str(e), code="invalid_value") from None
    return events

  # ---- response pieces

  def _completion_logprobs(self, tokens: list[int], lps: list[float], tops, offset0: int) -> dict:
    tok = self.lm.tokenizer
    texts = [tok.token_text(t) for t in tokens]
    offsets, pos = [], offset0
    for t in texts:
      offsets.append(pos)
      pos += len(t)
    top_maps = None
    if tops is not None:
      top_maps = [{tok.token_text(i): lp for i, lp in alts} for alts in tops]
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top_maps, "text_offset": offsets}

  def _chat_logprobs(self, tokens: list[int], lps: list[float], tops) -> dict:
    tok = self.lm.tokenizer

    def entry(t, lp):
      text = tok.token_text(t)
      return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for k, (t, lp) in enumerate(zip(tokens, lps)):
      item = entry(t, lp)
      item["top_logprobs"] = [entry(i, v) for i, v in tops[k]] if tops is not None else []
      content.append(item)
    return {"content": content}


def _new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _finish_fields(out) -> dict:
  reason = out.stop_reason
  return {"finish_reason": out.finish_reason, "stop_reason": reason}


def create_app(server: OpenAIServer):
  """The FastAPI application (separate from `main` so tests can run it in-process too)."""
  from fastapi import FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import JSONResponse, StreamingResponse
  from starlette.exceptions import HTTPException as StarletteHTTPException

  app = FastAPI(title="mlx_med OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)

  def error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(APIError)
  async def _api_error(request, exc: APIError):
    return error(exc)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error(APIError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code, type=kind))

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request, exc):
    return error(APIError(f"invalid request: {exc.errors()[:1]}"))

  @app.exception_handler(Exception)
  async def _internal_error(request, exc):
    logger.exception("internal error")
    return error(APIError(f"internal server error: {type(exc).__name__}", status=500, type="server_error"))

  @app.middleware("http")
  async def _auth(request: Request, call_next):
    if server.api_key and request.url.path.startswith("/v1/"):
      # Constant-time comparison (of bytes: a header may hold non-ASCII text), so response
      # timing does not reveal how much of a guessed key was right.
      given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
      if not hmac.compare_digest(given, f"Bearer {server.api_key}".encode("utf-8", "surrogateescape")):
        return error(APIError("invalid API key", status=401, type="authentication_error", code="invalid_api_key"))
    return await call_next(request)

  async def read_body(request: Request) -> dict:
    raw = await request.body()
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise APIError(f"the request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})",
                     code="invalid_json") from None
    if not isinstance(body, dict):
      raise APIError("the request body must be a JSON object", code="invalid_json")
    return body

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/stats")
  async def stats():
    return dict(server.engine.stats)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                        "owned_by": "mlx_med", "max_model_len": server.max_model_len}]}

  async def collect(events: asyncio.Queue, rows: int):
    outputs = [None] * rows
    while True:
      item = await events.get()
      if item[0] == "update":
        _, k, u = item
        if u.finished:
          outputs[k] = u.output
      elif item[0] == "error":
        raise APIError(f"generation failed: {type(item[1]).__name__}: {item[1]}", status=500, type="server_error")
      else:
        return outputs

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await read_body(request)
    parsed = server.parse_completion(body)
    events = server.submit(parsed, asyncio.get_running_loop())
    rid, created = _new_id("cmpl"), int(time.time())
    rows = len(parsed.prompts) * parsed.n
    if parsed.stream:
      return StreamingResponse(_stream_completion(server, parsed, events, rid, created, rows),
                               media_type="text/event-stream")
    outs = await collect(events, rows)
    choices = []
    for k, out in enumerate(outs):
      choice = {"index": k, "text": out.text or "", "logprobs": None, **_finish_fields(out)}
      if parsed.logprobs is not None:
        choice["logprobs"] = server._completion_logprobs(out.tokens, out.logprobs, out.top_logprobs, 0)
      choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
            "choices": choices, "usage": _usage(parsed, sum(len(o.tokens) for o in outs))}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = await read_body(request)
    parsed = server.parse_chat(body)
    events = server.submit(parsed, asyncio.get_running_loop())
    rid, created = _new_id("chatcmpl"), int(time.time())
    rows = parsed.n
    if parsed.stream:
      return StreamingResponse(_stream_chat(server, parsed, events, rid, created, rows),
                               media_type="text/event-stream")
    outs = await collect(events, rows)
    choices = []
    for k, out in enumerate(outs):
      choice = {"index": k, "message": {"role": "assistant", "content": out.text or ""}, "logprobs": None,
                **_finish_fields(out)}
      if parsed.tools:
        content, calls = _tool_calls_of(parsed, out.text or "")
        if calls:
          choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
          choice["finish_reason"] = "tool_calls"
          choice["stop_reason"] = None
      if parsed.logprobs is not None:
        choice["logprobs"] = server._chat_logprobs(out.tokens, out.logprobs, out.top_logprobs)
      choices.append(choice)
    return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
            "choices": choices, "usage": _usage(parsed, sum(len(o.tokens) for o in outs))}

  @app.post("/v1/embeddings")
  async def embeddings(request: Request):
    import base64

    import numpy as np

    body = await read_body(request)
    prompts = server.parse_embeddings(body)
    vectors = await asyncio.to_thread(server.lm.embed, prompts)  # off the event loop; JAX calls are thread-safe
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, v in enumerate(vectors):
      value = (base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii") if as_base64
               else [float(x) for x in v])
      data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(p) for p in prompts)
    return {"object": "list", "data": data, "model": server.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

  return app


def _sse(payload: Any) -> str:
  return f"data: {json.dumps(payload)}\n\n"


async def _stream_events(events: asyncio.Queue, rows: int):
  """Yields (row, update, new text of that row) until the batch ends; raises APIError on failure.

  Tracks, per stream, the text already sent for each row and the completion
  tokens so far (`usage` reads them at the end).
  """
  sent = [""] * rows
  while True:
    item = await events.get()
    if item[0] == "update":
      k, u = item[1], item[2]
      text = u.output.text if u.finished else (u.text or "")
      delta = text[len(sent[k]):] if text.startswith(sent[k]) else text
      sent[k] = text
      yield k, u, delta
    elif item[0] == "error":
      raise APIError(f"generation failed: {type(item[1]).__name__}", status=500, type="server_error")
    else:
      return


def _usage(parsed: _Parsed, completion_tokens: int) -> dict:
  """OpenAI `usage`: every prompt (a chat request has one) counts once per sample."""
  prompt_tokens = sum(len(p) for p in parsed.prompts) * parsed.n
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


async def _stream_completion(server: OpenAIServer, parsed: _Parsed, events, rid: str, created: int, rows: int):
  completion_tokens = 0
  base = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
  try:
    async for k, u, delta in _stream_events(events, rows):
      completion_tokens += len(u.new_tokens)
      logprobs = None
      if parsed.logprobs is not None:
        logprobs = server._completion_logprobs(u.new_tokens, u.new_logprobs, u.new_top_logprobs, 0)
      choice = {"index": k, "text": delta, "logprobs": logprobs, "finish_reason": None}
      if u.finished:
        choice.update(_finish_fields(u.output))
      if delta or u.finished or logprobs:
        yield _sse({**base, "choices": [choice]})
    if parsed.include_usage:
      yield _sse({**base, "choices": [], "usage": _usage(parsed, completion_tokens)})
  except APIError as e:
    yield _sse(e.body())
  yield "data: [DONE]\n\n"


def _tool_calls_of(parsed: _Parsed, text: str) -> tuple[Optional[str], list[dict]]:
  from mlx_med.llm.grammar import parse_tool_calls

  return parse_tool_calls(text, parsed.tools)


class _ToolStream:
  """One streamed row of a request with tools: content is sent up to the first `<tool_call>`
  (a tail that could be the start of that tag waits for the next piece); with a forced
  tool_choice nothing is sent as content. At the end the calls go out whole, or, when the
  text holds none, the held-back rest as content."""

  def __init__(self, forced: bool):
    from mlx_med.llm.grammar import TOOL_CALL_OPEN

    self.tag = TOOL_CALL_OPEN
    self.text, self.sent, self.closed = "", 0, forced

  def feed(self, delta: str) -> str:
    self.text += delta
    if self.closed:
      return ""
    end = self.text.find(self.tag)
    if end >= 0:
      self.closed = True
    else:
      end = len(self.text) - max((k for k in range(len(self.tag)) if self.text.endswith(self.tag[:k])), default=0)
    out = self.text[self.sent:max(end, self.sent)]
    self.sent = max(end, self.sent)
    return out

  def rest(self) -> str:
    return self.text[self.sent:]


async def _stream_chat(server: OpenAIServer, parsed: _Parsed, events, rid: str, created: int, rows: int):
  completion_tokens = 0
  base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
  for k in range(rows):
    yield _sse({**base, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]})
  try:
    tool_rows = [_ToolStream(parsed.tool_choice not in ("none", "auto")) for _ in range(rows)] if parsed.tools else None
    async for k, u, delta in _stream_events(events, rows):
      completion_tokens += len(u.new_tokens)
      logprobs = None
      if parsed.logprobs is not None:
        logprobs = server._chat_logprobs(u.new_tokens, u.new_logprobs, u.new_top_logprobs)
      calls: list = []
      if tool_rows is not None:  # text that may turn into a tool call is held back
        delta = tool_rows[k].feed(delta)
        if u.finished:
          calls = _tool_calls_of(parsed, u.output.text or "")[1]
          if not calls:
            delta += tool_rows[k].rest()
      if delta or logprobs:
        yield _sse({**base, "choices": [{"index": k, "delta": {"content": delta}, "logprobs": logprobs,
                                         "finish_reason": None}]})
      if calls:  # OpenAI's delta.tool_calls: each call whole, in one chunk
        deltas = [{"index": i, **c} for i, c in enumerate(calls)]
        yield _sse({**base, "choices": [{"index": k, "delta": {"tool_calls": deltas}, "logprobs": None,
                                         "finish_reason": None}]})
      if u.finished:
        finish = {"finish_reason": "tool_calls", "stop_reason": None} if calls else _finish_fields(u.output)
        yield _sse({**base, "choices": [{"index": k, "delta": {}, "logprobs": None, **finish}]})
    if parsed.include_usage:
      yield _sse({**base, "choices": [], "usage": _usage(parsed, completion_tokens)})
  except APIError as e:
    yield _sse(e.body())
  yield "data: [DONE]\n\n"


# --------------------------------------------------------------------------- entry points


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  parser.add_argument("--model", required=True, help="local Hugging Face model directory")
  parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; exposing it needs care)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--served-model-name", default=None, help="model id clients use (default: directory name)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--max-model-len", type=int, default=None, help="context limit (default: config.json)")
  parser.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                      help="continuous: requests join the running batch at decode-chunk boundaries (default); "
                           "static: waiting requests form one sampler call at a time (always used for "
                           "vision-language models)")
  parser.add_argument("--max-num-seqs", "--max-batch-rows", dest="max_batch_rows", type=int, default=32,
                      help="sequences decoded together (continuous: KV-cache slots; static: rows per sampler call)")
  parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                      help="wait this long for more requests before a batch (extended by each arrival, up to 10x)")
  parser.add_argument("--chunk-size", type=int, default=None,
                      help="decode steps between streamed updates and admissions (default 16; constrained rows step one token at a time)")
  parser.add_argument("--min-batch-bucket", type=int, default=1,
                      help="pad every batch to at least this many rows (fewer compiled shapes)")
  parser.add_argument("--min-prompt-bucket", type=int, default=16, help="smallest padded prompt length")
  parser.add_argument("--mesh", default=None,
                      help="shard over devices, e.g. data=-1,tensor=2 (default: one device, no sharding)")
  parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                      help="compile the common request shapes (each batch-size bucket, short prompts and "
                           "completions) before accepting requests (default: on)")
  parser.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                      help="vision-language models: image_url parts may name local files inside DIR (default: "
                           "none; data: URLs always work, remote URLs never)")
  parser.add_argument("--limit-mm-per-prompt", type=_image_limit, default=DEFAULT_IMAGE_LIMIT,
                      help=f"most images per request (default {DEFAULT_IMAGE_LIMIT}); N, image=N or "
                           "vLLM's JSON '{\"image\": N}'")
  parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also MLX_MED_API_KEY)")
  parser.add_argument("--log-level", default="info")
  return parser


def _image_limit(text: str) -> int:
  """--limit-mm-per-prompt: `4`, `image=4` or vLLM's JSON `{"image": 4}`."""
  value: Any = text.strip()
  if value.startswith("{"):
    try:
      value = json.loads(value).get("image")
    except (json.JSONDecodeError, AttributeError):
      value = None
  elif "=" in value:
    key, _, value = value.partition("=")
    value = value if key.strip() == "image" else None
  try:
    limit = int(value)
  except (TypeError, ValueError):
    limit = -1
  if limit < 0:
    raise argparse.ArgumentTypeError(f"expected a count of images such as 4, image=4 or '{{\"image\": 4}}', "
                                     f"got {text!r}")
  return limit


def _parse_mesh(text: Optional[str]) -> Optional[dict]:
  if not text:
    return None
  shape = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    shape[name.strip()] = int(size)
  for axis in ("data", "fsdp", "tensor"):
    shape.setdefault(axis, 1)
  return shape


def build_server(args: argparse.Namespace) -> tuple[OpenAIServer, Any]:
  import os

  from mlx_med.llm.model import LocalLM
  from mlx_med.vlm.local import LocalVLM, is_vlm_dir

  media_dir = getattr(args, "allowed_local_media_path", None)
  if media_dir is not None and not os.path.isdir(media_dir):
    raise SystemExit(f"--allowed-local-media-path {media_dir!r} is not a directory")
  load = {"dtype": args.dtype, "max_seq_len": args.max_model_len, "mesh_shape": _parse_mesh(args.mesh),
          "name": args.served_model_name, "min_batch_bucket": args.min_batch_bucket,
          "min_prompt_bucket": args.min_prompt_bucket}
  if is_vlm_dir(args.model):
    lm = LocalVLM.from_pretrained(args.model, allowed_local_media_path=media_dir, **load)
  else:
    lm = LocalLM.from_pretrained(args.model, **load)
  chunk_size = getattr(args, "chunk_size", None)
  if getattr(args, "batching", "continuous") == "continuous" and not getattr(lm, "is_multimodal", False):
    engine = ContinuousEngine(lm, max_num_seqs=args.max_batch_rows, chunk_size=chunk_size or 16)
  else:  # vision-language models prefill from per-row image embeddings: the static engine
    engine = BatchingEngine(lm, max_batch_rows=args.max_batch_rows, batch_wait_s=args.batch_wait_ms / 1000.0,
                            chunk_size=chunk_size or 16)
  server = OpenAIServer(lm, engine, model_name=lm.name, api_key=args.api_key or os.environ.get("MLX_MED_API_KEY"),
                        allowed_local_media_path=media_dir,
                        limit_mm_per_prompt=getattr(args, "limit_mm_per_prompt", DEFAULT_IMAGE_LIMIT))
  return server, create_app(server)


def run_server(args: argparse.Namespace) -> int:
  """`mlx-med serve` / `python -m mlx_med.llm.serve`: loads the model and serves until interrupted."""
  import uvicorn

  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if args.log_level.lower() != "debug":
    from mlx_med.cli import quiet_backend_probe_logs
    quiet_backend_probe_logs()
  if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_key):
    logger.warning("binding %s without --api-key: anyone who can reach this address can query the model",
                   args.host)
  server, app = build_server(args)
  if args.warmup:
    server.engine.warm_up()
  server.engine.start()
  logger.info("serving %s (%d layers, context %d) on http://%s:%d/v1", server.model_name, server.lm.cfg.num_layers,
              server.max_model_len, args.host, args.port)
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)
  finally:
    server.engine.stop()
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  parser = add_serve_arguments(argparse.ArgumentParser(prog="python -m mlx_med.llm.serve", description=__doc__))
  return run_server(parser.parse_args(argv))


if __name__ == "__main__":
  raise SystemExit(main())
