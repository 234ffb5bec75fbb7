"""run_dag: graph checks, concurrency of ready steps, failure propagation; llm_step and tool_step."""

from __future__ import annotations

import threading
import time
from typing import Literal

import pytest
from pydantic import BaseModel

from mlx_med.apps.dag import Step, StepError, llm_step, run_dag, tool_step, validate_dag
from mlx_med.apps.prompts import PromptTemplate
from mlx_med.apps.tools import tool
from mlx_med.llm.client import Completion, LLMClient


class RoutedClient(LLMClient):
  """Answers by the first keyword found in the last user message; thread-safe record of prompts."""

  def __init__(self, routes: dict[str, list[str]]):
    self.routes = {k: list(v) for k, v in routes.items()}
    self.prompts: list[str] = []
    self.kwargs: list[dict] = []
    self.lock = threading.Lock()

  def complete(self, prompt, **kwargs):
    raise NotImplementedError

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None, response_format=None, tools=None, tool_choice=None):
    with self.lock:
      text = messages[-1]["content"]
      self.prompts.append(text)
      self.kwargs.append({"max_tokens": max_tokens, "response_format": response_format})
      key = next(k for k in self.routes if k in text)
      return [Completion(text=self.routes[key].pop(0), finish_reason="stop")]


def _sleep_step(name, deps=(), value=None, log=None, delay=0.2):
  def fn(values):
    if log is not None:
      log.append(("start", name, time.monotonic()))
    time.sleep(delay)
    if log is not None:
      log.append(("end", name, time.monotonic()))
    return value if value is not None else name
  return Step(name, fn, tuple(deps))


def test_results_values_and_ancestors():
  seen = {}

  def record(name, out):
    def fn(values):
      seen[name] = dict(values)
      return out
    return fn

  steps = [Step("c", record("c", 3), ("b",)), Step("a", record("a", 1)), Step("b", record("b", 2), ("a", "x"))]
  assert validate_dag(steps, {"x": 0}) == ["a", "b", "c"]
  out = run_dag(steps, {"x": 0})
  assert out == {"a": 1, "b": 2, "c": 3}
  assert seen["a"] == {"x": 0} and seen["b"] == {"x": 0, "a": 1}
  assert seen["c"] == {"x": 0, "a": 1, "b": 2}  # indirect ancestors are visible too


def test_independent_steps_run_concurrently():
  log: list = []
  steps = [_sleep_step("a", log=log), _sleep_step("b", log=log), _sleep_step("c", log=log),
           _sleep_step("join", deps=("a", "b", "c"), log=log, delay=0.0)]
  timings: dict = {}
  out = run_dag(steps, max_workers=4, timings=timings)
  assert out == {"a": "a", "b": "b", "c": "c", "join": "join"}
  starts = {n: t for kind, n, t in log if kind == "start"}
  ends = {n: t for kind, n, t in log if kind == "end"}
  assert max(starts[n] for n in "abc") < min(ends[n] for n in "abc")  # all three overlapped
  assert starts["join"] >= max(ends[n] for n in "abc")
  # (the overlap of the intervals is the check; wall time is not, the machine is shared)
  assert set(timings) == {"a", "b", "c", "join"} and timings["a"] >= 0.19
  serial_log: list = []
  run_dag([_sleep_step(n, log=serial_log, delay=0.05) for n in "ab"], max_workers=1)
  s = {(k, n): t for k, n, t in serial_log}
  assert s[("start", "b")] >= s[("end", "a")] or s[("start", "a")] >= s[("end", "b")]


def test_graph_errors_name_the_steps():
  f = lambda values: None
  with pytest.raises(ValueError, match=r"step 'b' depends on unknown step\(s\) \['zzz'\]"):
    run_dag([Step("a", f), Step("b", f, ("a", "zzz"))])
  with pytest.raises(ValueError, match=r"cycle \(each depends on the next\): b -> d -> c -> b"):
    run_dag([Step("a", f), Step("b", f, ("a", "d")), Step("c", f, ("b",)), Step("d", f, ("c",))])
  with pytest.raises(ValueError, match="s -> s"):
    run_dag([Step("s", f, ("s",))])
  with pytest.raises(ValueError, match="two steps are named 'a'"):
    run_dag([Step("a", f), Step("a", f)])
  with pytest.raises(ValueError, match="name of an input"):
    run_dag([Step("note", f)], {"note": "x"})
  with pytest.raises(ValueError, match="max_workers"):
    run_dag([Step("a", f)], max_workers=0)


def test_failure_stops_dependents_and_names_the_step():
  ran = []

  def boom(values):
    raise ValueError("bad histology code")

  def mark(name):
    def fn(values):
      ran.append(name)
      return name
    return fn

  steps = [Step("extract", boom), Step("check", mark("check"), ("extract",)),
           Step("summary", mark("summary"), ("check",)), Step("other", mark("other"))]
  with pytest.raises(StepError, match="step 'extract' failed: ValueError: bad histology code") as err:
    run_dag(steps)
  e = err.value
  assert e.step == "extract" and isinstance(e.__cause__, ValueError)
  assert e.skipped == ["check", "summary"] and e.results == {"other": "other"} and ran == ["other"]
  assert "not run: ['check', 'summary']" in str(e)


class Histology(BaseModel):
  value: Literal["adenocarcinoma", "squamous", "unknown"]


def test_llm_steps_render_upstream_results_and_validate():
  client = RoutedClient({"Histology": ['{"value": "squamous"}'], "Stage": ["pT2"],
                         "Summarise": ["Squamous cell carcinoma, pT2."]})
  extract = PromptTemplate([("task", "Histology from: {note}")])
  stage = PromptTemplate([("task", "Stage from: {note}")])
  summary = PromptTemplate([("task", "Summarise: histology {histology.value}, stage {stage}"),
                            ("extra", "Extra: {extra}")])
  steps = [llm_step("histology", client, extract, model_cls=Histology, max_tokens=40),
           llm_step("stage", client, stage, max_tokens=8),
           llm_step("summary", client, summary, deps=("histology", "stage"), max_tokens=16)]
  out = run_dag(steps, {"note": "Squamous cell carcinoma, 3 cm.", "extra": ""})
  assert out["histology"] == Histology(value="squamous") and out["stage"] == "pT2"
  assert out["summary"] == "Squamous cell carcinoma, pT2."
  assert "Summarise: histology squamous, stage pT2" in client.prompts
  assert not any("Extra" in p for p in client.prompts)  # the empty optional part was dropped
  by_tokens = {k["max_tokens"]: k["response_format"] for k in client.kwargs}
  assert by_tokens[40]["json_schema"]["name"] == "Histology" and by_tokens[8] is None


def test_llm_step_failure_after_retries_and_missing_field():
  client = RoutedClient({"Histology": ['{"value": "sarcoma"}', '{"value": "sarcoma"}']})
  step = llm_step("histology", client, PromptTemplate([("t", "Histology: {note}")]), model_cls=Histology,
                  max_retries=1)
  with pytest.raises(StepError, match="step 'histology' failed: ValueError: no valid Histology after 2"):
    run_dag([step], {"note": "n"})
  with pytest.raises(StepError, match="needs field 'note'"):
    run_dag([step], {})


def test_tool_step_validates_arguments():
  @tool
  def egfr(creatinine: float, age: int) -> float:
    """A toy eGFR."""
    return round(140 - age - 10 * creatinine, 1)

  client = RoutedClient({"creatinine": ["1.5"]})
  steps = [llm_step("creat", client, PromptTemplate([("t", "Read the creatinine: {note}")])),
           tool_step("egfr", egfr, lambda v: {"creatinine": v["creat"], "age": v["age"]}, deps=("creat",))]
  out = run_dag(steps, {"note": "Cr 1.5", "age": 60})
  assert out["egfr"] == 65.0  # "1.5" from the model validated into a float
  bad = [tool_step("egfr", egfr, lambda v: {"creatinine": "high", "age": 60})]
  with pytest.raises(StepError, match="creatinine"):
    run_dag(bad)
