"""Tools in the OpenAI tools format: a Python function becomes a callable the model can ask for.

`@tool` reads a function's signature, type hints and docstring and builds the JSON schema of
its arguments through pydantic (so `int`, `Literal[...]`, `list[str]`, `Optional`, enums and
pydantic models all work, and the schema is what the arguments are validated against):

    @tool
    def lookup_lab(name: str, last_n: int = 1) -> list[float]:
      '''Latest values of a laboratory test.

      Args:
        name: the test, e.g. "creatinine".
        last_n: how many of the most recent values.
      '''

`run_with_tools(client, messages, [lookup_lab])` then loops: ask the model (tools=...,
tool_choice=...) -> run every tool call it made (arguments parsed as JSON and validated; a
failing tool or bad arguments go back to the model as the tool message, so it can correct
itself, rather than being raised) -> append the assistant message with its `tool_calls` and one
`{"role": "tool", "tool_call_id", "content"}` per call -> until a reply without tool calls or
`max_rounds` model calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlx_med.apps.structured import client_accepts

logger = logging.getLogger("mlx_med.apps.tools")

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclasses.dataclass
class Tool:
  """A function the model may call: its name, description, JSON schema of the arguments and the function."""

  name: str
  description: str
  parameters: dict
  fn: Callable[..., Any]
  args_model: Optional[type[BaseModel]] = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    if not _NAME_RE.match(self.name):
      raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-' (OpenAI's rule)")

  def schema(self) -> dict:
    """The entry of a chat request's `tools` list."""
    return {"type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

  def parse_arguments(self, arguments: Union[str, Mapping[str, Any], None]) -> dict:
    """The call's arguments (a JSON string or a dict) validated into keyword arguments; ValueError if bad."""
    if arguments is None or arguments == "":
      data: Any = {}
    elif isinstance(arguments, str):
      try:
        data = json.loads(arguments)
      except json.JSONDecodeError as e:
        raise ValueError(f"arguments are not valid JSON ({e.msg} at char {e.pos})") from None
    else:
      data = dict(arguments)
    if not isinstance(data, dict):
      raise ValueError(f"arguments must be a JSON object, got {type(data).__name__}")
    if self.args_model is None:
      return data
    try:
      parsed = self.args_model.model_validate(data)
    except ValidationError as e:
      details = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())) or '(root)'}: {err.get('msg')}"
                          for err in e.errors(include_url=False, include_input=False))
      raise ValueError(f"arguments do not match the schema: {details}") from None
    return {k: getattr(parsed, k) for k in type(parsed).model_fields}

  def invoke(self, arguments: Union[str, Mapping[str, Any], None] = None) -> Any:
    """Validates `arguments` and calls the function."""
    return self.fn(**self.parse_arguments(arguments))

  def __call__(self, *args, **kwargs) -> Any:
    return self.fn(*args, **kwargs)


_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?|Notes?)\s*:\s*$")
_ARG_LINE = re.compile(r"^\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: Optional[str]) -> tuple[str, dict[str, str]]:
  """Summary text (before the first section) and Google-style `Args:` descriptions."""
  if not doc:
    return "", {}
  lines = inspect.cleandoc(doc).splitlines()
  summary: list[str] = []
  args: dict[str, str] = {}
  section, current, indent = None, None, None
  for line in lines:
    m = _SECTION.match(line)
    if m:
      section, current = m.group(1), None
      continue
    if section is None:
      summary.append(line)
    elif section in ("Args", "Arguments", "Parameters"):
      stripped = line.strip()
      if not stripped:
        continue
      lead = len(line) - len(line.lstrip())
      am = _ARG_LINE.match(line)
      if am and (indent is None or lead <= indent):
        indent = lead
        current = am.group(1)
        args[current] = am.group(2).strip()
      elif current is not None:
        args[current] = f"{args[current]} {stripped}".strip()
  return "\n".join(summary).strip(), args


def _build(fn: Callable[..., Any], name: Optional[str], description: Optional[str]) -> Tool:
  if not callable(fn):
    raise TypeError(f"@tool needs a function, got {fn!r}")
  tool_name = name or getattr(fn, "__name__", None)
  if not tool_name:
    raise ValueError("this callable has no __name__; pass @tool(name=...)")
  summary, arg_docs = _parse_docstring(inspect.getdoc(fn))
  try:
    hints = typing.get_type_hints(fn, include_extras=True)
  except Exception as e:
    raise TypeError(f"tool {tool_name!r}: cannot resolve its type hints ({e})") from None
  fields: dict[str, Any] = {}
  for pname, param in inspect.signature(fn).parameters.items():
    if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
      raise TypeError(f"tool {tool_name!r}: *{pname}/**{pname} cannot be described to a model; "
                      "list the arguments explicitly")
    if param.kind is inspect.Parameter.POSITIONAL_ONLY:
      raise TypeError(f"tool {tool_name!r}: positional-only argument {pname!r}; tools are called by keyword")
    annotation = hints.get(pname, Any)
    default = ... if param.default is inspect.Parameter.empty else param.default
    fields[pname] = (annotation, Field(default, description=arg_docs.get(pname) or None))
  model = pydantic.create_model(f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
  schema = model.model_json_schema()
  schema.pop("title", None)
  for prop in schema.get("properties", {}).values():
    prop.pop("title", None)
  schema.setdefault("properties", {})
  schema.setdefault("additionalProperties", False)
  desc = description if description is not None else summary
  return Tool(name=tool_name, description=desc, parameters=schema, fn=fn, args_model=model)


def tool(fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None,
         description: Optional[str] = None) -> Any:
  """`@tool` or `@tool(name=..., description=...)`: a `Tool` from a function's signature and docstring."""
  if fn is None:
    return lambda f: _build(f, name, description)
  return _build(fn, name, description)


def as_tool(obj: Union[Tool, Callable[..., Any]]) -> Tool:
  return obj if isinstance(obj, Tool) else tool(obj)


@dataclasses.dataclass
class ToolCall:
  """One executed tool call: what the model asked for and what it got back."""

  id: str
  name: str
  arguments: Optional[dict]       # the validated arguments (None when they did not validate)
  result: Any                     # the function's return value (None on error)
  content: str                    # the tool message sent back to the model
  error: Optional[str]
  round: int


@dataclasses.dataclass
class ToolRun:
  """The outcome of `run_with_tools`: the full conversation, the final completion, every call made."""

  messages: list[dict]
  completion: Any
  calls: list[ToolCall]
  rounds: int
  finished: bool                  # False when max_rounds ran out while the model still asked for tools

  @property
  def text(self) -> str:
    return (self.completion.text or "") if self.completion is not None else ""


def tool_result_content(result: Any) -> str:
  """A tool's return value as the tool message's text (strings as they are, everything else as JSON)."""
  if isinstance(result, str):
    return result
  if isinstance(result, BaseModel):
    return result.model_dump_json()
  try:
    return json.dumps(pydantic.TypeAdapter(Any).dump_python(result, mode="json"), ensure_ascii=False)
  except Exception:
    return str(result)


def _call_parts(call: Any) -> tuple[Optional[str], Optional[str], Any]:
  if isinstance(call, Mapping):
    fn = call.get("function") or {}
    return call.get("id"), fn.get("name"), fn.get("arguments")
  fn = getattr(call, "function", None)
  return getattr(call, "id", None), getattr(fn, "name", None), getattr(fn, "arguments", None)


def execute_tool_call(tools: Mapping[str, Tool], call: Any, round_index: int, index: int) -> ToolCall:
  """Runs one tool call; errors become the returned message (starting "error:") instead of exceptions."""
  call_id, name, arguments = _call_parts(call)
  call_id = call_id or f"call_{round_index}_{index}"
  if name not in tools:
    msg = f"error: unknown tool {name!r}; available tools: {sorted(tools)}"
    return ToolCall(call_id, str(name), None, None, msg, msg, round_index)
  t = tools[name]
  try:
    kwargs = t.parse_arguments(arguments)
  except ValueError as e:
    msg = f"error: invalid arguments for {name}: {e}"
    return ToolCall(call_id, name, None, None, msg, msg, round_index)
  try:
    result = t.fn(**kwargs)
  except Exception as e:
    msg = f"error: {name} raised {type(e).__name__}: {e}"
    logger.info("tool %s failed: %s", name, type(e).__name__)
    return ToolCall(call_id, name, kwargs, None, msg, msg, round_index)
  return ToolCall(call_id, name, kwargs, result, tool_result_content(result), None, round_index)


def _normalise_calls(calls: Sequence[Any], round_index: int) -> list[dict]:
  out = []
  for i, call in enumerate(calls):
    call_id, name, arguments = _call_parts(call)
    if not isinstance(arguments, str):
      arguments = json.dumps(arguments if arguments is not None else {})
    out.append({"id": call_id or f"call_{round_index}_{i}", "type": "function",
                "function": {"name": name, "arguments": arguments}})
  return out


def run_with_tools(client: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Union[Tool, Callable]], *,
                   tool_choice: Union[str, dict, None] = "auto", max_rounds: int = 4,
                   followup_tool_choice: Union[str, dict, None] = "auto", **chat_kwargs: Any) -> ToolRun:
  """Chat with tools until the model answers without calling one (or `max_rounds` model calls).

  `tool_choice` ("auto", "required", "none" or {"type": "function", "function": {"name": ...}})
  applies to the first call; later calls use `followup_tool_choice` (default "auto", so a forced
  first call does not force every call after it). When the last allowed reply still asks for
  tools they are not run and `finished` is False. The input messages are not modified.
  """
  if max_rounds < 1:
    raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
  if int(chat_kwargs.get("n", 1) or 1) != 1:
    raise ValueError("run_with_tools follows one conversation; n must be 1")
  if not client_accepts(client, "tools"):
    raise TypeError(f"{type(client).__name__}.chat takes no tools=; use a client with tool support "
                    "(LocalClient, OpenAIClient)")
  table: dict[str, Tool] = {}
  for obj in tools:
    t = as_tool(obj)
    if t.name in table:
      raise ValueError(f"two tools are named {t.name!r}")
    table[t.name] = t
  specs = [t.schema() for t in table.values()]
  msgs = [dict(m) for m in messages]
  calls: list[ToolCall] = []
  completion = None
  for round_index in range(max_rounds):
    choice = tool_choice if round_index == 0 else followup_tool_choice
    kwargs = dict(chat_kwargs, tools=specs)
    if choice is not None:
      kwargs["tool_choice"] = choice
    completion = client.chat(msgs, **kwargs)[0]
    requested = getattr(completion, "tool_calls", None) or []
    if not requested:
      msgs.append({"role": "assistant", "content": completion.text or ""})
      return ToolRun(msgs, completion, calls, round_index + 1, True)
    if round_index == max_rounds - 1:
      return ToolRun(msgs, completion, calls, round_index + 1, False)
    normal = _normalise_calls(requested, round_index)
    msgs.append({"role": "assistant", "content": completion.text or "", "tool_calls": normal})
    for i, call in enumerate(normal):
      done = execute_tool_call(table, call, round_index, i)
      calls.append(done)
      msgs.append({"role": "tool", "tool_call_id": done.id, "content": done.content})
  raise AssertionError("unreachable")  # the loop returns on its last round
