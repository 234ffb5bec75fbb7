"""Tools: schemas from signatures via pydantic, the tool-call loop, and the round trip through a real server."""

from __future__ import annotations

import enum
import json
import os
from typing import Literal, Optional

import pytest
from pydantic import BaseModel

from mlx_med.apps.tools import (
  Tool,
  ToolRun,
  execute_tool_call,
  run_with_tools,
  tool,
  tool_result_content,
)
from mlx_med.llm.client import Completion, LLMClient
from mlx_med.llm.server_process import ServerProcess

LABS = {"creatinine": [1.1, 1.3, 1.6], "sodium": [139.0]}


@tool
def lookup_lab(name: str, last_n: int = 1) -> list[float]:
  """Latest values of a laboratory test.

  Args:
    name: the test, e.g. "creatinine".
    last_n: how many of the most recent values
      to return.
  """
  if name not in LABS:
    raise KeyError(f"no lab named {name}")
  return LABS[name][-last_n:]


class Unit(str, enum.Enum):
  mg = "mg"
  g = "g"


class Dose(BaseModel):
  amount: float
  unit: Unit


@tool(name="check-dose", description="Checks a dose against the maximum.")
def check_dose(drug: Literal["metformin", "warfarin"], dose: Dose, note: Optional[str] = None) -> dict:
  grams = dose.amount / 1000 if dose.unit is Unit.mg else dose.amount
  return {"drug": drug, "ok": grams <= 2.0}


def _call(name, arguments, call_id="c1") -> dict:
  return {"id": call_id, "type": "function",
          "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


class ScriptedToolClient(LLMClient):
  """Replies from a queue of (text, tool_calls) pairs; records messages and tool arguments of every call."""

  def __init__(self, replies):
    self.replies, self.calls = list(replies), []

  def complete(self, prompt, **kwargs):
    raise NotImplementedError

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None, response_format=None, tools=None, tool_choice=None):
    self.calls.append({"messages": json.loads(json.dumps(list(messages))), "tools": tools,
                       "tool_choice": tool_choice, "max_tokens": max_tokens})
    text, calls = self.replies.pop(0)
    c = Completion(text=text, finish_reason="tool_calls" if calls else "stop")
    c.tool_calls = calls  # the Completion field of clients with tool support
    return [c]


def test_schema_from_hints_and_docstring():
  assert isinstance(lookup_lab, Tool) and lookup_lab.name == "lookup_lab"
  assert lookup_lab.description == "Latest values of a laboratory test."
  assert lookup_lab.parameters == {
      "type": "object", "additionalProperties": False, "required": ["name"],
      "properties": {"name": {"type": "string", "description": 'the test, e.g. "creatinine".'},
                     "last_n": {"type": "integer", "default": 1,
                                "description": "how many of the most recent values to return."}}}
  spec = check_dose.schema()
  assert spec["type"] == "function" and spec["function"]["name"] == "check-dose"
  assert spec["function"]["description"] == "Checks a dose against the maximum."
  params = spec["function"]["parameters"]
  assert params["properties"]["drug"] == {"enum": ["metformin", "warfarin"], "type": "string"}
  assert params["required"] == ["drug", "dose"]
  assert params["$defs"]["Unit"]["enum"] == ["mg", "g"]
  assert lookup_lab("sodium") == [139.0]  # still an ordinary function


def test_arguments_are_validated_against_the_schema():
  assert lookup_lab.invoke('{"name": "creatinine", "last_n": 2}') == [1.3, 1.6]
  assert lookup_lab.invoke({"name": "creatinine", "last_n": "2"}) == [1.3, 1.6]  # pydantic's lax coercion
  assert check_dose.invoke({"drug": "metformin", "dose": {"amount": 2500, "unit": "mg"}}) == {
      "drug": "metformin", "ok": False}
  for bad, match in (('{"name": ', "not valid JSON"), ("[1]", "must be a JSON object"),
                     ('{"last_n": 1}', "name: Field required"), ('{"name": "x", "extra": 1}', "extra")):
    with pytest.raises(ValueError, match=match):
      lookup_lab.parse_arguments(bad)
  with pytest.raises(ValueError, match="drug"):
    check_dose.parse_arguments({"drug": "aspirin", "dose": {"amount": 1, "unit": "g"}})


def test_bad_tool_definitions():
  with pytest.raises(TypeError, match=r"\*\*kw"):
    tool(lambda **kw: None)
  with pytest.raises(ValueError, match="tool name"):
    tool(lambda x: x, name="has space")


def test_loop_runs_tools_and_feeds_results_back():
  client = ScriptedToolClient([
      ("", [_call("lookup_lab", {"name": "creatinine", "last_n": 2}, "a"), _call("lookup_lab", {"name": "sodium"}, "b")]),
      ("Creatinine is rising (1.3 -> 1.6); sodium is normal.", None)])
  msgs = [{"role": "user", "content": "How are the kidneys?"}]
  run = run_with_tools(client, msgs, [lookup_lab, check_dose], tool_choice="required", max_tokens=32)
  assert isinstance(run, ToolRun) and run.finished and run.rounds == 2
  assert run.text.startswith("Creatinine is rising")
  assert [c.result for c in run.calls] == [[1.3, 1.6], [139.0]] and all(c.error is None for c in run.calls)
  first, second = client.calls
  assert first["tool_choice"] == "required" and second["tool_choice"] == "auto"
  assert [t["function"]["name"] for t in first["tools"]] == ["lookup_lab", "check-dose"]
  assert first["max_tokens"] == 32 and first["messages"] == msgs
  convo = second["messages"]
  assert convo[1]["role"] == "assistant" and [c["id"] for c in convo[1]["tool_calls"]] == ["a", "b"]
  assert convo[2] == {"role": "tool", "tool_call_id": "a", "content": "[1.3, 1.6]"}
  assert convo[3] == {"role": "tool", "tool_call_id": "b", "content": "[139.0]"}
  assert run.messages[-1] == {"role": "assistant", "content": run.text}
  assert msgs == [{"role": "user", "content": "How are the kidneys?"}]


def test_tool_errors_go_back_to_the_model():
  client = ScriptedToolClient([
      ("", [_call("lookup_lab", {"name": "troponin"}, "1"), _call("lookup_lab", '{"nam": 1}', "2"),
            _call("order_ct", {}, "3")]),
      ("", [_call("lookup_lab", {"name": "sodium"}, "4")]),
      ("done", None)])
  run = run_with_tools(client, [{"role": "user", "content": "q"}], [lookup_lab])
  assert run.finished and run.rounds == 3 and len(run.calls) == 4
  e1, e2, e3, ok = run.calls
  assert e1.content == "error: lookup_lab raised KeyError: 'no lab named troponin'" and e1.arguments == {
      "name": "troponin", "last_n": 1}
  assert e2.content.startswith("error: invalid arguments for lookup_lab") and "name: Field required" in e2.content
  assert e3.content == "error: unknown tool 'order_ct'; available tools: ['lookup_lab']"
  assert ok.error is None and ok.content == "[139.0]"
  tool_msgs = [m for m in client.calls[1]["messages"] if m["role"] == "tool"]
  assert [m["content"].startswith("error:") for m in tool_msgs] == [True, True, True]


def test_max_rounds_stops_without_running_the_last_calls():
  client = ScriptedToolClient([("", [_call("lookup_lab", {"name": "sodium"})])] * 3)
  run = run_with_tools(client, [{"role": "user", "content": "q"}], [lookup_lab], max_rounds=2,
                       followup_tool_choice="required")
  assert not run.finished and run.rounds == 2 and len(run.calls) == 1 and len(client.calls) == 2
  assert client.calls[1]["tool_choice"] == "required"
  assert run.completion.tool_calls and run.messages[-1]["role"] == "tool"
  with pytest.raises(ValueError, match="n must be 1"):
    run_with_tools(client, [], [lookup_lab], n=2)
  with pytest.raises(ValueError, match="two tools"):
    run_with_tools(client, [], [lookup_lab, lookup_lab])


def test_plain_functions_and_results_as_json():
  def add(a: int, b: int) -> int:
    """Adds."""
    return a + b

  call = execute_tool_call({"add": tool(add)}, _call("add", {"a": 2, "b": 3}), 0, 0)
  assert call.result == 5 and call.content == "5"
  assert tool_result_content(check_dose.fn("warfarin", Dose(amount=5, unit="mg"))) == '{"drug": "warfarin", "ok": true}'
  assert tool_result_content(Dose(amount=1, unit="g")) == '{"amount":1.0,"unit":"g"}'
  assert tool_result_content({"u": Unit.mg}) == '{"u": "mg"}'


# ---------------------------------------------------------------------------------------------
# The round trip through the official openai client against a real `python -m mlx_med.llm.serve`.


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
  """A tiny random Qwen2 chat model (tests/hf_tiny.py) behind a real server."""
  from hf_tiny import make_hf_model, save_model_dir, write_tokenizer
  from transformers import AutoTokenizer

  tok_dir = str(tmp_path_factory.mktemp("apps_tokenizer"))
  write_tokenizer(tok_dir, model_max_length=1024)  # the tools' JSON in the prompt is long in this tiny BPE
  vocab = len(AutoTokenizer.from_pretrained(tok_dir, local_files_only=True))
  model_dir = save_model_dir(make_hf_model("qwen2", vocab_size=vocab, eos_token_id=2, max_position_embeddings=1024),
                             str(tmp_path_factory.mktemp("apps_qwen2")), tok_dir)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one plain CPU device, as a user would run it
  env["JAX_PLATFORMS"] = "cpu"
  server = ServerProcess(model_dir, "--min-batch-bucket", "8", "--min-prompt-bucket", "32", "--max-num-seqs", "8",
                         log_path=str(tmp_path_factory.mktemp("apps_server") / "server.log"), env=env,
                         ready_timeout_s=240.0)
  with server:
    yield server


@tool
def ward_census(ward: Literal["oncology", "cardiology"], detailed: bool = False) -> dict:
  """Number of patients on a ward."""
  return {"ward": ward, "patients": 12 if ward == "oncology" else 7, "detailed": detailed}


def test_tool_call_round_trip_through_the_openai_client(tool_server):
  """Random weights + tool_choice="required": the server's grammar makes the call valid; the tool
  result goes back as a role "tool" message and the server answers the continued conversation."""
  import openai

  oai = openai.OpenAI(base_url=tool_server.base_url, api_key="EMPTY", max_retries=0, timeout=120)
  messages = [{"role": "user", "content": "How many patients are on the oncology ward?"}]
  first = oai.chat.completions.create(model=tool_server.model, messages=messages, tools=[ward_census.schema()],
                                      tool_choice="required", max_tokens=96, temperature=0.0)
  choice = first.choices[0]
  assert choice.finish_reason == "tool_calls", tool_server.log_tail()
  calls = choice.message.tool_calls
  assert calls and all(c.type == "function" and c.function.name == "ward_census" for c in calls)
  assert len({c.id for c in calls}) == len(calls)
  results = [ward_census.invoke(c.function.arguments) for c in calls]  # arguments validate against the schema
  assert all(r["ward"] in ("oncology", "cardiology") for r in results)
  messages.append(choice.message.model_dump(exclude_none=True))
  for c, r in zip(calls, results, strict=True):
    messages.append({"role": "tool", "tool_call_id": c.id, "content": tool_result_content(r)})
  second = oai.chat.completions.create(model=tool_server.model, messages=messages, tools=[ward_census.schema()],
                                       tool_choice="none", max_tokens=8, temperature=0.0)
  assert second.choices[0].finish_reason in ("stop", "length") and not second.choices[0].message.tool_calls
  oai.close()


def test_run_with_tools_over_openai_client_and_call_log(tool_server, tmp_path):
  """The same loop through the project's OpenAIClient wrapped in a LoggedClient."""
  from mlx_med.apps.calllog import LoggedClient, read_calls
  from mlx_med.llm.client import OpenAIClient

  client = LoggedClient(OpenAIClient(tool_server.model, base_url=tool_server.base_url, max_retries=0),
                        str(tmp_path), tag="tools")
  run = run_with_tools(client, [{"role": "user", "content": "Census of the cardiology ward?"}], [ward_census],
                       tool_choice={"type": "function", "function": {"name": "ward_census"}},
                       followup_tool_choice="none", max_tokens=64, temperature=0.0, max_rounds=3)
  client.close()
  assert run.finished and run.rounds == 2
  assert len(run.calls) == 1 and run.calls[0].error is None and run.calls[0].name == "ward_census"
  assert run.calls[0].result["patients"] in (12, 7)
  assert [m["role"] for m in run.messages] == ["user", "assistant", "tool", "assistant"]
  first, second = read_calls(str(tmp_path))
  assert first["tools"] == 1 and first["tool_calls"] == 1 and first["finish_reasons"] == ["tool_calls"]
  assert second["error"] is None and "tool_calls" not in second


class _Census(BaseModel):
  ward: Literal["oncology", "cardiology"]
  full: bool


def test_generate_structured_through_the_server_with_random_weights(tool_server):
  """Schema-constrained decoding over HTTP: a random-weight model's reply validates on the first try."""
  from mlx_med.apps.structured import generate_structured
  from mlx_med.llm.client import OpenAIClient

  client = OpenAIClient(tool_server.model, base_url=tool_server.base_url, max_retries=0)
  out = generate_structured(client, [{"role": "user", "content": "Which ward?"}], _Census, max_tokens=48,
                            temperature=1.0, seed=5)
  client.close()
  assert out.ok and out.attempts == 1 and out.errors == [], (out.raw, out.errors)
  assert out.value.ward in ("oncology", "cardiology")
