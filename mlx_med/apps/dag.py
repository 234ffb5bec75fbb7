"""Task decomposition: a small DAG of LLM and tool steps, run concurrently.

The system-engineering step of building a clinical LLM application is to split one task
into subtasks (extract, look up, check, summarise), each a prompt or a tool, wired by their
data dependencies. A `Step` is a name, a function of the values computed so far and the
names it depends on; `run_dag` checks the graph (unknown dependencies and cycles are errors
naming them), then runs every step whose dependencies are done in a thread pool, so
independent LLM calls overlap (the client batches them: `mlx-med serve` and `LocalClient`
run concurrent requests in one continuous batch).

A step's function receives one dict: the run's `inputs` plus the results of all its
ancestors (direct and indirect dependencies), by step name. When a step fails, the steps
that depend on it are not run, independent steps finish, and `run_dag` raises `StepError`
naming the failed step (its `.results` holds what did complete).

`llm_step` renders a `PromptTemplate` from those values and asks the client, returning the
text or, with `model_cls`, a validated pydantic object through `generate_structured`;
`tool_step` calls a `Tool` with arguments built from the values.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from typing import Any, Optional

from pydantic import BaseModel

from mlx_med.apps.prompts import PromptTemplate
from mlx_med.apps.structured import generate_structured
from mlx_med.apps.tools import Tool, as_tool


@dataclasses.dataclass
class Step:
  """One node: `fn(values)` with `values` = inputs + results of the step's ancestors."""

  name: str
  fn: Callable[[dict], Any]
  deps: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"step name must be a non-empty string, got {self.name!r}")
    if isinstance(self.deps, str):
      self.deps = (self.deps,)
    self.deps = tuple(self.deps)
    if not callable(self.fn):
      raise TypeError(f"step {self.name!r}: fn must be callable, got {type(self.fn).__name__}")


class StepError(RuntimeError):
  """A step raised: `.step` its name, `.failures` every failed step's exception, `.results` the
  completed steps' results, `.skipped` the steps not run because an ancestor failed."""

  def __init__(self, step: str, failures: dict[str, BaseException], results: dict[str, Any], skipped: list[str]):
    exc = failures[step]
    more = f" ({len(failures) - 1} other step(s) failed too: {sorted(set(failures) - {step})})" \
        if len(failures) > 1 else ""
    skip = f"; not run: {skipped}" if skipped else ""
    super().__init__(f"step {step!r} failed: {type(exc).__name__}: {exc}{more}{skip}")
    self.step, self.failures, self.results, self.skipped = step, failures, results, skipped


def _find_cycle(graph: Mapping[str, Sequence[str]]) -> Optional[list[str]]:
  """One cycle of `graph` (step -> deps) as a path [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  for root in graph:
    if state.get(root):
      continue
    stack: list[tuple[str, int]] = [(root, 0)]
    path: list[str] = [root]
    state[root] = 1
    while stack:
      node, i = stack[-1]
      deps = graph.get(node, ())
      if i < len(deps):
        stack[-1] = (node, i + 1)
        dep = deps[i]
        if dep not in graph:
          continue
        if state.get(dep) == 1:
          return path[path.index(dep):] + [dep]
        if not state.get(dep):
          state[dep] = 1
          stack.append((dep, 0))
          path.append(dep)
      else:
        state[node] = 2
        stack.pop()
        path.pop()
  return None


def validate_dag(steps: Sequence[Step], inputs: Optional[Mapping[str, Any]] = None) -> list[str]:
  """Checks names, dependencies and acyclicity; returns the step names in a topological order."""
  inputs = inputs or {}
  by_name: dict[str, Step] = {}
  for s in steps:
    if not isinstance(s, Step):
      raise TypeError(f"run_dag takes Step objects, got {type(s).__name__}")
    if s.name in by_name:
      raise ValueError(f"two steps are named {s.name!r}; step names must be unique")
    if s.name in inputs:
      raise ValueError(f"step {s.name!r} has the name of an input; rename the step or the input")
    by_name[s.name] = s
  for s in steps:
    unknown = [d for d in s.deps if d not in by_name and d not in inputs]
    if unknown:
      raise ValueError(f"step {s.name!r} depends on unknown step(s) {unknown}; "
                       f"known steps: {sorted(by_name)}, inputs: {sorted(inputs)}")
  graph = {s.name: [d for d in s.deps if d in by_name] for s in steps}
  cycle = _find_cycle(graph)
  if cycle:
    raise ValueError(f"the steps form a cycle (each depends on the next): {' -> '.join(cycle)}")
  order: list[str] = []
  done: set[str] = set()
  remaining = [s.name for s in steps]
  while remaining:  # Kahn's algorithm, stable in the given order
    ready = [n for n in remaining if all(d in done for d in graph[n])]
    order.extend(ready)
    done.update(ready)
    remaining = [n for n in remaining if n not in done]
  return order


def _ancestors(graph: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
  memo: dict[str, set[str]] = {}

  def visit(n: str) -> set[str]:
    if n not in memo:
      out: set[str] = set()
      for d in graph[n]:
        out.add(d)
        out |= visit(d)
      memo[n] = out
    return memo[n]

  for n in graph:
    visit(n)
  return memo


def run_dag(steps: Sequence[Step], inputs: Optional[dict] = None, *, max_workers: int = 4,
            timings: Optional[dict] = None) -> dict[str, Any]:
  """Runs the steps (each once its dependencies are done, up to `max_workers` at a time).

  Returns {step name: result}. Raises ValueError for a bad graph, StepError when a step fails.
  When `timings` is a dict it receives {step name: seconds}.
  """
  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}")
  inputs = dict(inputs or {})
  validate_dag(steps, inputs)
  by_name = {s.name: s for s in steps}
  graph = {s.name: [d for d in s.deps if d in by_name] for s in steps}
  ancestors = _ancestors(graph)
  results: dict[str, Any] = {}
  failures: dict[str, BaseException] = {}
  first_failure: Optional[str] = None
  pending = [s.name for s in steps]
  blocked: set[str] = set()

  def timed(step: Step, values: dict) -> tuple[Any, float]:
    started = time.monotonic()
    return step.fn(values), time.monotonic() - started

  with futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dag") as pool:
    running: dict[futures.Future, str] = {}
    while pending or running:
      for name in list(pending):
        if any(a in failures or a in blocked for a in ancestors[name]):
          blocked.add(name)
          pending.remove(name)
        elif all(d in results for d in graph[name]):
          values = dict(inputs)
          values.update({a: results[a] for a in ancestors[name]})
          running[pool.submit(timed, by_name[name], values)] = name
          pending.remove(name)
      if not running:
        break
      done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
      for fut in done:
        name = running.pop(fut)
        try:
          results[name], seconds = fut.result()
          if timings is not None:
            timings[name] = seconds
        except Exception as e:
          failures[name] = e
          if first_failure is None:
            first_failure = name
  if first_failure is not None:
    skipped = [s.name for s in steps if s.name in blocked]
    raise StepError(first_failure, failures, results, skipped) from failures[first_failure]
  return results


def llm_step(name: str, client: Any, template: PromptTemplate, *, deps: Sequence[str] = (),
             model_cls: Optional[type[BaseModel]] = None, **chat_kwargs: Any) -> Step:
  """A step asking `client` with `template` rendered from the values (inputs + upstream results).

  Returns the reply text, or with `model_cls` the validated object (`generate_structured`; the
  step fails with the validation errors when every attempt is invalid). Upstream pydantic
  results can be used in the template with attribute access, e.g. `{extract.value}`.
  """
  if not isinstance(template, PromptTemplate):
    raise TypeError(f"llm_step {name!r}: template must be a PromptTemplate, got {type(template).__name__}")

  def run(values: dict) -> Any:
    messages = template.messages(**values)
    if model_cls is None:
      return client.chat(messages, **chat_kwargs)[0].text
    out = generate_structured(client, messages, model_cls, **chat_kwargs)
    if out.value is None:
      raise ValueError(f"no valid {model_cls.__name__} after {out.attempts} attempt(s): {out.errors[-1]}")
    return out.value

  return Step(name=name, fn=run, deps=tuple(deps))


def tool_step(name: str, tool: Any, args_from: Callable[[dict], dict], *, deps: Sequence[str] = ()) -> Step:
  """A step calling `tool` (a Tool or a plain function) with `args_from(values)`, validated against its schema."""
  t: Tool = as_tool(tool)

  def run(values: dict) -> Any:
    return t.invoke(args_from(values))

  return Step(name=name, fn=run, deps=tuple(deps))
