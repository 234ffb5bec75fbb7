"""Structured output: schema format, JSON extraction, validation and instructor-style retries."""

from __future__ import annotations

import json
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, Field

from mlx_med.apps.structured import (
  StructuredResult,
  client_accepts,
  extract_json,
  generate_structured,
  json_schema_format,
)
from mlx_med.llm.client import Completion, LLMClient


class Stage(BaseModel):
  value: Literal["I", "II", "III", "IV", "unknown"]
  confidence: float = Field(ge=0.0, le=1.0)
  evidence: Optional[str] = None


class Inner(BaseModel):
  code: str


class Outer(BaseModel):
  inner: Inner
  items: list[Inner] = []


class ScriptedClient(LLMClient):
  """Answers chat calls from a queue of texts and records every call (messages + keyword arguments)."""

  def __init__(self, replies, *, with_response_format: bool = True):
    self.replies = list(replies)
    self.calls: list[dict] = []
    self.with_response_format = with_response_format

  def complete(self, prompt, **kwargs):
    raise NotImplementedError

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None, response_format=None, tools=None, tool_choice=None):
    self.calls.append({"messages": [dict(m) for m in messages], "max_tokens": max_tokens,
                       "temperature": temperature, "seed": seed, "response_format": response_format})
    text, finish = self.replies.pop(0) if isinstance(self.replies[0], tuple) else (self.replies.pop(0), "stop")
    return [Completion(text=text, finish_reason=finish, prompt_tokens=10, completion_tokens=5)]


class OldClient(LLMClient):
  """A client without response_format (the interface before structured output)."""

  def __init__(self, replies):
    self.replies, self.calls = list(replies), []

  def complete(self, prompt, **kwargs):
    raise NotImplementedError

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None):
    self.calls.append([dict(m) for m in messages])
    return [Completion(text=self.replies.pop(0), finish_reason="stop")]


def test_json_schema_format_shape_and_strict_closing():
  fmt = json_schema_format(Outer)
  assert fmt["type"] == "json_schema"
  js = fmt["json_schema"]
  assert js["name"] == "Outer" and js["strict"] is True
  schema = js["schema"]
  assert schema["additionalProperties"] is False
  assert schema["$defs"]["Inner"]["additionalProperties"] is False
  assert schema["required"] == ["inner"]
  loose = json_schema_format(Outer, name="my schema!", strict=False)
  assert loose["json_schema"]["name"] == "my_schema_" and "additionalProperties" not in loose["json_schema"]["schema"]
  assert "additionalProperties" not in Outer.model_json_schema()  # the model's own schema is not mutated
  with pytest.raises(TypeError, match="pydantic BaseModel"):
    json_schema_format(dict)


def test_extract_json_tolerates_fences_and_prose():
  assert extract_json('{"a": 1}') == {"a": 1}
  assert extract_json('Sure! Here it is:\n```json\n{"a": [1, 2]}\n```\nanything else?') == {"a": [1, 2]}
  assert extract_json('The answer is {"a": {"b": "}"}} as requested {"c": 2}') == {"a": {"b": "}"}}
  assert extract_json('noise { not json } then {"ok": true}') == {"ok": True}
  for bad in ("", "no json here", '{"a": 1'):
    with pytest.raises(ValueError):
      extract_json(bad)


def test_constrained_success_first_try_passes_response_format():
  client = ScriptedClient(['{"value": "III", "confidence": 0.9}'])
  msgs = [{"role": "user", "content": "stage?"}]
  out = generate_structured(client, msgs, Stage, max_tokens=64, seed=3)
  assert isinstance(out, StructuredResult) and out.ok
  assert out.value == Stage(value="III", confidence=0.9) and out.attempts == 1 and out.errors == []
  call = client.calls[0]
  assert call["response_format"] == json_schema_format(Stage)
  assert call["max_tokens"] == 64 and call["temperature"] == 0.0 and call["seed"] == 3
  assert call["messages"] == msgs  # no schema text added when decoding is constrained
  assert msgs == [{"role": "user", "content": "stage?"}]  # the caller's list is untouched


def test_retry_feeds_back_the_bad_reply_and_the_validation_error():
  client = ScriptedClient(['{"value": "V", "confidence": 1.5}', '{"value": "IV", "confidence": 0.5}'])
  msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "stage?"}]
  out = generate_structured(client, msgs, Stage, max_retries=2)
  assert out.ok and out.value.value == "IV" and out.attempts == 2
  assert len(out.errors) == 1 and "value:" in out.errors[0] and "confidence:" in out.errors[0]
  second = client.calls[1]["messages"]
  assert second[:2] == msgs
  assert second[2] == {"role": "assistant", "content": '{"value": "V", "confidence": 1.5}'}
  assert second[3]["role"] == "user"
  assert "value:" in second[3]["content"] and "less than or equal to 1" in second[3]["content"]
  assert "Stage" in second[3]["content"]


def test_all_attempts_fail_gives_none_and_every_error():
  client = ScriptedClient(["not json", ('{"value": "I", "confid', "length"), '{"value": "I"}'])
  out = generate_structured(client, [{"role": "user", "content": "q"}], Stage, max_retries=2, max_tokens=8)
  assert out.value is None and not out.ok and out.attempts == 3 and len(out.errors) == 3
  assert out.errors[0].startswith("not JSON")
  assert "cut at max_tokens=8" in out.errors[1]
  assert "confidence: Field required" in out.errors[2]
  assert out.raw == '{"value": "I"}' and out.completion.finish_reason == "stop"
  assert len(client.calls[2]["messages"]) == 5  # user + 2 x (bad reply, error)
  with pytest.raises(ValueError, match="max_retries"):
    generate_structured(client, [], Stage, max_retries=-1)


def test_validation_error_does_not_echo_input_values():
  secret = "Patient John Doe MRN 1234"
  client = ScriptedClient([json.dumps({"value": secret, "confidence": 0.3}), '{"value": "I", "confidence": 0.3}'])
  out = generate_structured(client, [{"role": "user", "content": "q"}], Stage)
  assert out.ok and secret not in out.errors[0]
  assert secret not in client.calls[1]["messages"][-1]["content"]


def test_unconstrained_prompts_with_schema_and_extracts_from_prose():
  client = ScriptedClient(['Here you go:\n```json\n{"value": "II", "confidence": 0.7}\n```'])
  out = generate_structured(client, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}],
                            Stage, constrained=False)
  assert out.ok and out.value.value == "II"
  call = client.calls[0]
  assert call["response_format"] is None
  system = call["messages"][0]
  assert system["role"] == "system" and system["content"].startswith("be brief\n\n")
  assert '"confidence"' in system["content"] and "JSON schema" in system["content"]


def test_client_without_response_format_falls_back_to_the_schema_in_the_prompt():
  client = OldClient(['{"value": "I", "confidence": 0.2}'])
  assert not client_accepts(client, "response_format")
  out = generate_structured(client, [{"role": "user", "content": "q"}], Stage)
  assert out.ok and out.value.value == "I"
  assert client.calls[0][0]["role"] == "system" and "JSON schema" in client.calls[0][0]["content"]
  assert client.calls[0][1] == {"role": "user", "content": "q"}


def test_client_accepts_looks_through_wrappers():
  class Wrapper:
    def __init__(self, inner):
      self.inner = inner

    def chat(self, messages, **kwargs):
      return self.inner.chat(messages, **kwargs)

  assert client_accepts(Wrapper(ScriptedClient([])), "response_format")
  assert not client_accepts(Wrapper(OldClient([])), "response_format")
  assert client_accepts(Wrapper(Wrapper(ScriptedClient([]))), "tools")


def test_through_the_call_log_wrapper(tmp_path):
  from mlx_med.apps.calllog import LoggedClient, read_calls

  client = LoggedClient(ScriptedClient(['{"value": "V", "confidence": 0.1}', '{"value": "II", "confidence": 0.8}']),
                        str(tmp_path))
  out = generate_structured(client, [{"role": "user", "content": "q"}], Stage)
  assert out.ok and out.attempts == 2
  assert client.inner.calls[0]["response_format"]["type"] == "json_schema"  # seen through the wrapper
  records = read_calls(str(tmp_path))
  assert [r["response_format"] for r in records] == ["json_schema", "json_schema"]
  assert records[0]["prompt_sha256"] != records[1]["prompt_sha256"]  # the retry's conversation is longer
  old = LoggedClient(OldClient(['{"value": "I", "confidence": 0.2}']), str(tmp_path / "old"))
  assert generate_structured(old, [{"role": "user", "content": "q"}], Stage).ok
  assert "JSON schema" in old.inner.calls[0][0]["content"]
