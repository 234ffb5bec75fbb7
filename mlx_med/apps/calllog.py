"""A call log for every LLM call an application makes: hashes, sizes, tokens, latency and cost.

`LoggedClient` wraps any `LLMClient` (local, `mlx-med serve`, vLLM, Azure) and appends one
JSON line per call to `<run_dir>/llm_calls.jsonl`:

  time, tag, kind (chat|completion|embed), model, prompt_sha256, n, prompt_tokens,
  completion_tokens, latency_s, cost_usd, finish_reasons, error
  (+ prompt_chars, tool_calls, response_format when they apply)

The prompt is identified by the SHA-256 of its canonical JSON (messages with sorted keys, no
whitespace), so identical prompts can be counted and cached without storing them. Patient
text (prompts, completions) is written only when the user asks (`log_text=True`).

Each line is one `os.write` on a descriptor opened with O_APPEND, under a lock: concurrent
threads (and processes sharing the run directory) never interleave partial lines.
Prices are US dollars per million tokens, `{model: (input, output)}`; the key "*" prices any
other model. `summary()` gives calls, tokens, cost and latency percentiles.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from mlx_med.llm.client import LLMClient

LOG_NAME = "llm_calls.jsonl"


def canonical_json(value: Any) -> str:
  """Sorted keys, no whitespace, unicode kept: the same prompt always gives the same bytes."""
  return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def prompt_sha256(prompt: Any) -> str:
  """SHA-256 (hex) of a prompt's canonical JSON (a list of messages, a string or a list of texts)."""
  if isinstance(prompt, Sequence) and not isinstance(prompt, str):
    prompt = [dict(m) if isinstance(m, Mapping) else m for m in prompt]
  return hashlib.sha256(canonical_json(prompt).encode("utf-8")).hexdigest()


def model_name_of(client: Any) -> str:
  """The model a client talks to, as well as it can be told."""
  for attr in ("model_name", "model"):
    value = getattr(client, attr, None)
    if isinstance(value, str) and value:
      return value
  lm = getattr(client, "lm", None)
  for attr in ("name", "model_name"):
    value = getattr(lm, attr, None)
    if isinstance(value, str) and value:
      return value
  return type(client).__name__


def call_cost(prices: Optional[Mapping[str, Sequence[float]]], model: str, prompt_tokens: Optional[int],
              completion_tokens: Optional[int]) -> Optional[float]:
  """USD for one call from per-million-token prices; None when the model has no price."""
  if not prices:
    return None
  price = prices.get(model, prices.get("*"))
  if price is None:
    return None
  p_in, p_out = float(price[0]), float(price[1])
  return ((prompt_tokens or 0) * p_in + (completion_tokens or 0) * p_out) / 1e6


def _percentile(values: list[float], q: float) -> Optional[float]:
  return float(np.percentile(np.asarray(values, np.float64), q)) if values else None


def summarize_calls(records: Sequence[Mapping[str, Any]]) -> dict:
  """Totals over call records: calls, errors, tokens, cost, latency p50/p95 (seconds), calls per kind/model."""
  latencies = [float(r["latency_s"]) for r in records if r.get("latency_s") is not None]
  costs = [r["cost_usd"] for r in records if r.get("cost_usd") is not None]
  prompt = sum(int(r.get("prompt_tokens") or 0) for r in records)
  completion = sum(int(r.get("completion_tokens") or 0) for r in records)
  by_kind: dict[str, int] = {}
  by_model: dict[str, int] = {}
  for r in records:
    by_kind[r.get("kind", "?")] = by_kind.get(r.get("kind", "?"), 0) + 1
    by_model[r.get("model", "?")] = by_model.get(r.get("model", "?"), 0) + 1
  return {"calls": len(records), "errors": sum(1 for r in records if r.get("error")),
          "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
          "cost_usd": float(sum(costs)),
          "priced_calls": len(costs),
          "latency_p50_s": _percentile(latencies, 50), "latency_p95_s": _percentile(latencies, 95),
          "latency_total_s": float(sum(latencies)), "by_kind": by_kind, "by_model": by_model}


def read_calls(path: str) -> list[dict]:
  """The records of a call log (a run directory or the jsonl file itself)."""
  if os.path.isdir(path):
    path = os.path.join(path, LOG_NAME)
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg}); the call log is corrupt") from None
  return records


class LoggedClient(LLMClient):
  """Any `LLMClient`, with one JSON line per call appended to `<run_dir>/llm_calls.jsonl`.

  Keyword arguments are passed through unchanged (response_format, tools, ... reach the
  wrapped client only when given), so it fits wherever the wrapped client fits.
  """

  def __init__(self, client: LLMClient, run_dir: str, *, prices: Optional[Mapping[str, Sequence[float]]] = None,
               log_text: bool = False, tag: str = ""):
    if prices:
      for model, price in prices.items():
        if len(price) != 2 or any(float(p) < 0 for p in price):
          raise ValueError(f"prices[{model!r}] must be (input, output) USD per 1M tokens, both >= 0; got {price!r}")
    self.inner = client
    self.run_dir = str(run_dir)
    self.path = os.path.join(self.run_dir, LOG_NAME)
    self.prices = dict(prices or {})
    self.log_text = bool(log_text)
    self.tag = tag
    os.makedirs(self.run_dir, exist_ok=True)
    self._lock = threading.Lock()
    self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    self._records: list[dict] = []

  # The wrapped client's other attributes (lm, base_url, ...) stay reachable.
  def __getattr__(self, name: str) -> Any:
    if name == "inner":
      raise AttributeError(name)
    return getattr(self.inner, name)

  @property
  def model_name(self) -> str:
    return model_name_of(self.inner)

  def tagged(self, tag: str) -> _Tagged:
    """A view of this client whose calls carry another tag (same log file, same summary)."""
    return _Tagged(self, tag)

  # ---- the calls --------------------------------------------------------------------------
  def chat(self, messages, **kwargs):
    return self._call("chat", messages, lambda: self.inner.chat(messages, **kwargs), kwargs, self.tag)

  def complete(self, prompt, **kwargs):
    return self._call("completion", prompt, lambda: self.inner.complete(prompt, **kwargs), kwargs, self.tag)

  def embed(self, texts, **kwargs):
    texts = list(texts)
    return self._call("embed", texts, lambda: self.inner.embed(texts, **kwargs), kwargs, self.tag)

  def _call(self, kind: str, prompt: Any, run, kwargs: Mapping[str, Any], tag: str):
    if self._fd is None:
      raise RuntimeError(f"call log {self.path} is closed; make a new LoggedClient")
    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "tag": tag, "kind": kind, "model": self.model_name, "prompt_sha256": prompt_sha256(prompt),
        "prompt_chars": _chars(prompt),
        "n": len(prompt) if kind == "embed" else int(kwargs.get("n", 1) or 1)}
    fmt = kwargs.get("response_format")
    if isinstance(fmt, Mapping):
      record["response_format"] = fmt.get("type")
    if kwargs.get("tools"):
      record["tools"] = len(kwargs["tools"])
    started = time.monotonic()
    outs, error = None, None
    try:
      outs = run()
      return outs
    except BaseException as e:
      error = f"{type(e).__name__}: {str(e)[:300]}"
      raise
    finally:
      record["latency_s"] = round(time.monotonic() - started, 6)
      record.update(self._usage(kind, outs, prompt))
      record["error"] = error
      self._write(record)

  def _usage(self, kind: str, outs: Any, prompt: Any) -> dict:
    if outs is None:
      return {"prompt_tokens": None, "completion_tokens": None, "cost_usd": None, "finish_reasons": None}
    if kind == "embed":
      shape = getattr(outs, "shape", None)
      return {"prompt_tokens": None, "completion_tokens": None, "cost_usd": None, "finish_reasons": None,
              "dim": int(shape[-1]) if shape else None}
    prompt_tokens = next((o.prompt_tokens for o in outs if o.prompt_tokens is not None), None)
    counts = [o.completion_tokens for o in outs if o.completion_tokens is not None]
    completion_tokens = sum(counts) if counts else None
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "cost_usd": call_cost(self.prices, self.model_name, prompt_tokens, completion_tokens),
             "finish_reasons": [o.finish_reason for o in outs]}
    tool_calls = sum(len(getattr(o, "tool_calls", None) or ()) for o in outs)
    if tool_calls:
      usage["tool_calls"] = tool_calls
    if self.log_text:
      usage["prompt"] = [dict(m) for m in prompt] if not isinstance(prompt, str) else prompt
      usage["completions"] = [o.text for o in outs]
    return usage

  def _write(self, record: dict) -> None:
    line = (canonical_json(record) + "\n").encode("utf-8")
    with self._lock:
      self._records.append(record)
      if self._fd is None:
        raise RuntimeError(f"call log {self.path} is closed")
      view = memoryview(line)
      while view:  # one write in practice; a short write (rare) is finished here under the lock
        view = view[os.write(self._fd, view):]

  # ---- reporting / lifetime ---------------------------------------------------------------
  @property
  def records(self) -> list[dict]:
    with self._lock:
      return list(self._records)

  def summary(self, tag: Optional[str] = None) -> dict:
    """Totals of the calls made through this client (all tags, or one)."""
    records = [r for r in self.records if tag is None or r.get("tag") == tag]
    return summarize_calls(records)

  def close(self) -> None:
    with self._lock:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None
    self.inner.close()

  def __enter__(self) -> LoggedClient:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _Tagged(LLMClient):
  """LoggedClient.tagged(): the same log, another tag (e.g. one per pipeline step)."""

  def __init__(self, logged: LoggedClient, tag: str):
    self.logged, self.tag, self.inner = logged, tag, logged

  def __getattr__(self, name: str) -> Any:
    if name in ("logged", "inner"):
      raise AttributeError(name)
    return getattr(self.logged, name)

  def chat(self, messages, **kwargs):
    lg = self.logged
    return lg._call("chat", messages, lambda: lg.inner.chat(messages, **kwargs), kwargs, self.tag)

  def complete(self, prompt, **kwargs):
    lg = self.logged
    return lg._call("completion", prompt, lambda: lg.inner.complete(prompt, **kwargs), kwargs, self.tag)

  def embed(self, texts, **kwargs):
    lg, texts = self.logged, list(texts)
    return lg._call("embed", texts, lambda: lg.inner.embed(texts, **kwargs), kwargs, self.tag)

  def close(self) -> None:
    pass


def _chars(prompt: Any) -> int:
  if isinstance(prompt, str):
    return len(prompt)
  total = 0
  for m in prompt:
    if isinstance(m, str):
      total += len(m)
    elif isinstance(m, Mapping):
      content = m.get("content")
      if isinstance(content, str):
        total += len(content)
      elif isinstance(content, list):
        total += sum(len(p.get("text", "")) for p in content if isinstance(p, Mapping))
  return total
