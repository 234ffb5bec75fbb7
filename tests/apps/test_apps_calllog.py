"""LoggedClient: one JSON line per call (hash, tokens, latency, cost), no text by default, thread-safe."""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pytest

from mlx_med.apps.calllog import (
  LOG_NAME,
  LoggedClient,
  call_cost,
  canonical_json,
  prompt_sha256,
  read_calls,
  summarize_calls,
)
from mlx_med.llm.client import Completion, LLMClient

NOTE = "Mrs Smith, 64, biopsy-proven adenocarcinoma of the left upper lobe."


class EchoClient(LLMClient):
  """Answers every call with fixed token counts; records the keyword arguments it got."""

  model_name = "tiny-echo"

  def __init__(self, fail_on: str | None = None):
    self.fail_on = fail_on
    self.kwargs: list[dict] = []
    self.closed = False

  def complete(self, prompt, **kwargs):
    self.kwargs.append(kwargs)
    return [Completion(text="done", finish_reason="length", prompt_tokens=7, completion_tokens=3)]

  def chat(self, messages, *, max_tokens=256, n=1, response_format=None, tools=None, **kwargs):
    self.kwargs.append(dict(kwargs, max_tokens=max_tokens, n=n, response_format=response_format, tools=tools))
    if self.fail_on and self.fail_on in messages[-1]["content"]:
      raise RuntimeError("backend down")
    return [Completion(text=f"reply {i}", finish_reason="stop", prompt_tokens=100, completion_tokens=20 + i)
            for i in range(n)]

  def embed(self, texts):
    return np.ones((len(texts), 4), np.float32) / 2.0

  def close(self):
    self.closed = True


def test_chat_record_fields_hash_and_cost(tmp_path):
  inner = EchoClient()
  client = LoggedClient(inner, str(tmp_path / "run"), prices={"tiny-echo": (2.0, 10.0)}, tag="uma")
  msgs = [{"role": "system", "content": "abstract"}, {"role": "user", "content": NOTE}]
  fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
  outs = client.chat(msgs, n=2, max_tokens=9, response_format=fmt)
  assert [o.text for o in outs] == ["reply 0", "reply 1"]
  assert inner.kwargs[0]["max_tokens"] == 9 and inner.kwargs[0]["response_format"] == fmt
  assert "tools" in inner.kwargs[0] and inner.kwargs[0]["tools"] is None  # not passed: the default applied
  (rec,) = read_calls(str(tmp_path / "run"))
  expected_hash = hashlib.sha256(json.dumps(msgs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
  assert rec["prompt_sha256"] == expected_hash == prompt_sha256(msgs)
  assert rec["kind"] == "chat" and rec["tag"] == "uma" and rec["model"] == "tiny-echo" and rec["n"] == 2
  assert rec["prompt_tokens"] == 100 and rec["completion_tokens"] == 41
  assert rec["cost_usd"] == pytest.approx((100 * 2.0 + 41 * 10.0) / 1e6)
  assert rec["finish_reasons"] == ["stop", "stop"] and rec["error"] is None
  assert rec["response_format"] == "json_schema" and rec["prompt_chars"] == len("abstract") + len(NOTE)
  assert rec["latency_s"] >= 0 and rec["time"].endswith("+00:00")
  # patient text never reaches the file by default
  raw = (tmp_path / "run" / LOG_NAME).read_text()
  assert "Smith" not in raw and "reply 0" not in raw and "abstract" not in raw


def test_log_text_writes_prompt_and_completions(tmp_path):
  client = LoggedClient(EchoClient(), str(tmp_path), log_text=True)
  client.chat([{"role": "user", "content": NOTE}])
  client.complete("continue: " + NOTE, max_tokens=3)
  chat, comp = read_calls(str(tmp_path / LOG_NAME))
  assert chat["prompt"] == [{"role": "user", "content": NOTE}] and chat["completions"] == ["reply 0"]
  assert comp["kind"] == "completion" and comp["prompt"] == "continue: " + NOTE and comp["cost_usd"] is None
  assert comp["prompt_sha256"] == hashlib.sha256(json.dumps("continue: " + NOTE, ensure_ascii=False)
                                                  .encode()).hexdigest()


def test_errors_are_logged_and_reraised_embed_is_logged(tmp_path):
  client = LoggedClient(EchoClient(fail_on="boom"), str(tmp_path), prices={"*": (1.0, 1.0)})
  with pytest.raises(RuntimeError, match="backend down"):
    client.chat([{"role": "user", "content": "boom"}])
  vecs = client.embed(["a", "bb", "ccc"])
  assert vecs.shape == (3, 4)
  err, emb = read_calls(str(tmp_path))
  assert err["error"] == "RuntimeError: backend down" and err["prompt_tokens"] is None and err["cost_usd"] is None
  assert emb["kind"] == "embed" and emb["n"] == 3 and emb["dim"] == 4 and emb["prompt_chars"] == 6
  assert emb["prompt_sha256"] == prompt_sha256(["a", "bb", "ccc"])
  s = client.summary()
  assert s["calls"] == 2 and s["errors"] == 1 and s["by_kind"] == {"chat": 1, "embed": 1}


def test_concurrent_calls_write_whole_lines(tmp_path):
  client = LoggedClient(EchoClient(), str(tmp_path), prices={"tiny-echo": (1.0, 2.0)}, log_text=True)
  big = "x" * 20000  # long lines make interleaving visible if writes were split

  def worker(k):
    for i in range(25):
      client.chat([{"role": "user", "content": f"{k}-{i} {big}"}])

  threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  lines = (tmp_path / LOG_NAME).read_text().splitlines()
  assert len(lines) == 200
  records = [json.loads(line) for line in lines]  # every line is whole
  assert len({r["prompt_sha256"] for r in records}) == 200
  s = client.summary()
  assert s["calls"] == 200 and s["prompt_tokens"] == 200 * 100 and s["completion_tokens"] == 200 * 20
  assert s["cost_usd"] == pytest.approx(200 * (100 * 1.0 + 20 * 2.0) / 1e6)
  assert s == summarize_calls(read_calls(str(tmp_path)))


def test_summary_percentiles_tags_and_appending_runs(tmp_path):
  records = [{"kind": "chat", "model": "m", "latency_s": float(v), "prompt_tokens": 1, "completion_tokens": 2,
              "cost_usd": 0.5} for v in range(1, 101)]
  s = summarize_calls(records)
  assert s["latency_p50_s"] == pytest.approx(50.5) and s["latency_p95_s"] == pytest.approx(95.05)
  assert s["total_tokens"] == 300 and s["cost_usd"] == pytest.approx(50.0)
  assert summarize_calls([])["latency_p50_s"] is None
  first = LoggedClient(EchoClient(), str(tmp_path), tag="a")
  first.chat([{"role": "user", "content": "q"}])
  first.tagged("b").chat([{"role": "user", "content": "q"}])
  assert first.summary(tag="b")["calls"] == 1 and first.summary()["calls"] == 2
  first.close()
  second = LoggedClient(EchoClient(), str(tmp_path))  # a second run appends to the same file
  second.chat([{"role": "user", "content": "q"}])
  assert second.summary()["calls"] == 1
  assert [r["tag"] for r in read_calls(str(tmp_path))] == ["a", "b", ""]


def test_wrapper_behaviour_and_bad_prices(tmp_path):
  inner = EchoClient()
  with LoggedClient(inner, str(tmp_path)) as client:
    assert client.model_name == "tiny-echo" and client.fail_on is None  # attributes reach the inner client
  assert inner.closed
  with pytest.raises(RuntimeError, match="closed"):
    client.chat([{"role": "user", "content": "q"}])
  assert len(inner.kwargs) == 0  # refused before the call was made
  with pytest.raises(ValueError, match=r"prices\['m'\]"):
    LoggedClient(EchoClient(), str(tmp_path), prices={"m": (1.0,)})
  assert call_cost({"m": (3.0, 15.0)}, "m", 1000, 100) == pytest.approx(0.0045)
  assert call_cost({"m": (3.0, 15.0)}, "other", 1000, 100) is None
  assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / LOG_NAME).write_text('{"ok": 1}\nnot json\n')
  with pytest.raises(ValueError, match=r"llm_calls.jsonl:2"):
    read_calls(str(tmp_path / "bad"))
