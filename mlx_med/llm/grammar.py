"""Grammar-constrained decoding: JSON schemas and tool calls as per-token masks (llguidance).

A constraint is the host-side grammar state of one generated row. Before each decode
step the engine asks it for a bitmask over the model's vocabulary (bit j of word i set
<=> token 32*i+j may come next), applies `where(allowed, logits, -inf)` inside the
jitted step, and after the step hands it the chosen token (`advance`). When the grammar
is complete (`is_finished`) the row ends. Because every token is checked against the
grammar before it is sampled, even a random-weight model returns text that parses and
validates; the cost is one mask computation per row and step on the host (llguidance
computes one in tens of microseconds for JSON schemas).

What is built here:

* `constraint_for_response_format(response_format, tokenizer, vocab_size)`: OpenAI's
  `response_format` -- `{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}`, `{"type": "json_object"}` (any JSON object) or `{"type": "text"}` (None).
* `constraint_for_tools(tools, tool_choice, tokenizer, vocab_size)`: the Hermes/Qwen
  tool-call format `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, the
  name one of the tools' names and the arguments that tool's parameters schema;
  tool_choice "required" = at least one call, a named function = exactly that one.
* `parse_tool_calls(text)`: the calls a model wrote on its own (tool_choice "auto"), in
  OpenAI's shape `{"id", "type": "function", "function": {"name", "arguments": str}}`.

JSON is generated compactly (", " and ": " separators, no free whitespace between
tokens): a small model cannot pad its output with endless whitespace, and the text is
what `json.dumps` writes. The compiled tokenizer (about a second to build) is cached per
(tokenizer, model vocabulary size).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

# JSON layout options for llguidance's JSON compiler (overridable by a schema's "x-guidance").
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
MAX_TOOL_CALLS = 8  # calls in one constrained ("required") answer
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_CACHE_LOCK = threading.Lock()
_TOKENIZERS: dict[tuple[int, int], tuple[Any, Any]] = {}  # (id(hf), vocab) -> (hf tokenizer kept alive, LLTokenizer)


def bitmask_words(vocab_size: int) -> int:
  """int32 words of a token bitmask over `vocab_size` tokens."""
  return (int(vocab_size) + 31) // 32


def compiled_tokenizer(tokenizer: Any, vocab_size: int):
  """llguidance's view of `tokenizer` (a ChatTokenizer or a fast HF tokenizer) padded to the
  model's `vocab_size` (ids past the tokenizer's are never allowed). Cached."""
  import llguidance.hf

  hf = getattr(tokenizer, "hf", tokenizer)
  key = (id(hf), int(vocab_size))
  with _CACHE_LOCK:
    hit = _TOKENIZERS.get(key)
    if hit is not None and hit[0] is hf:
      return hit[1]
  eos = list(tokenizer.eos_token_ids) if hasattr(tokenizer, "eos_token_ids") else None
  if len(hf) > vocab_size:
    raise ValueError(f"the tokenizer has {len(hf)} tokens but the model's vocabulary only {vocab_size}; "
                     "load the tokenizer that belongs to this model")
  ll = llguidance.hf.from_tokenizer(hf, n_vocab=int(vocab_size), eos_token=eos or None)
  with _CACHE_LOCK:
    _TOKENIZERS[key] = (hf, ll)
  return ll


class GrammarConstraint:
  """One row's grammar state (implements `mlx_med.core.continuous.TokenConstraint`).

  Built from an llguidance grammar string; `copy()` gives a fresh constraint of the same
  grammar (one per row: n samples of a request each need their own state).
  """

  def __init__(self, grammar: str, ll_tokenizer: Any, vocab_size: int, *, kind: str = "json"):
    from llguidance import LLMatcher

    self.grammar = grammar
    self.kind = kind
    self.vocab_size = int(vocab_size)
    self._ll = ll_tokenizer
    self._matcher = LLMatcher(ll_tokenizer, grammar, log_level=0)
    if self._matcher.is_error():
      raise ValueError(f"invalid {kind} grammar: {_one_line(self._matcher.get_error())}")
    self.tokens: list[int] = []

  def copy(self) -> GrammarConstraint:
    return type(self)(self.grammar, self._ll, self.vocab_size, kind=self.kind)

  def fill_bitmask(self, out: np.ndarray) -> None:
    """Writes the allowed-token bitmask (int32 [ceil(V/32)], every word) into `out`."""
    words = bitmask_words(self.vocab_size)
    if out.dtype != np.int32 or out.shape != (words,) or not out.flags["C_CONTIGUOUS"]:
      raise ValueError(f"bitmask must be a contiguous int32 array of shape ({words},), got {out.dtype} {out.shape}")
    if self._matcher.is_error():
      raise RuntimeError(f"{self.kind} constraint is in an error state: {_one_line(self._matcher.get_error())}")
    self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

  def allowed(self) -> np.ndarray:
    """The mask as booleans [V] (for tests and host-side samplers)."""
    words = np.empty(bitmask_words(self.vocab_size), np.int32)
    self.fill_bitmask(words)
    return unpack_bitmask(words, self.vocab_size)

  def advance(self, token: int) -> None:
    """Consumes the chosen token; ValueError if the grammar does not allow it."""
    if not self._matcher.consume_token(int(token)):
      error = _one_line(self._matcher.get_error() or "token not allowed")
      raise ValueError(f"token {int(token)} is not allowed by the {self.kind} grammar here ({error})")
    self.tokens.append(int(token))

  def is_finished(self) -> bool:
    """True when the grammar admits nothing more (the row must end now)."""
    return bool(self._matcher.is_stopped())

  def is_accepting(self) -> bool:
    """True when the output so far is complete (it may still go on, e.g. another tool call)."""
    return bool(self._matcher.is_accepting())


# The interface's name for the JSON flavour (same class: a JSON schema is one grammar).
JsonConstraint = GrammarConstraint


def unpack_bitmask(words: np.ndarray, vocab_size: int) -> np.ndarray:
  """int32 bitmask words -> bool [vocab_size] (bit j of word i is token 32*i+j)."""
  bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")
  return bits[:vocab_size].astype(bool)


# --------------------------------------------------------------------------- JSON schemas


def _schema_with_options(schema: Mapping[str, Any]) -> dict:
  schema = dict(schema)
  schema["x-guidance"] = {**JSON_OPTIONS, **dict(schema.get("x-guidance") or {})}
  return schema


def _one_line(error: str) -> str:
  """llguidance's message without its parser-state dump, on one line."""
  lines = [line.strip() for line in error.split("<state>")[0].strip().splitlines() if line.strip()]
  return " ".join(lines[:3]) or "invalid"


def _check_grammar(grammar: str, ll: Any, what: str) -> None:
  from llguidance import LLMatcher

  error = LLMatcher.validate_grammar(grammar, ll)
  if error:
    raise ValueError(f"{what} is not a usable JSON schema: {_one_line(error)}")


def json_schema_constraint(schema: Mapping[str, Any], tokenizer: Any, vocab_size: int, *,
                           what: str = "schema") -> GrammarConstraint:
  """A constraint that admits exactly the JSON texts valid under `schema`."""
  from llguidance import LLMatcher

  if not isinstance(schema, Mapping):
    raise ValueError(f"{what} must be a JSON object (a JSON schema), got {type(schema).__name__}")
  ll = compiled_tokenizer(tokenizer, vocab_size)
  try:
    grammar = LLMatcher.grammar_from_json_schema(json.dumps(_schema_with_options(schema)))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what} is not a usable JSON schema: {e}") from None
  _check_grammar(grammar, ll, what)
  return GrammarConstraint(grammar, ll, vocab_size, kind="json")


def constraint_for_response_format(response_format: Optional[Mapping[str, Any]], tokenizer: Any,
                                   vocab_size: int) -> Optional[GrammarConstraint]:
  """OpenAI's `response_format` -> a constraint (None for plain text).

  {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
  admits the schema's documents; {"type": "json_object"} any JSON object; {"type":
  "text"} or None nothing special. Anything else is a ValueError with one line that says
  what is wrong.
  """
  if response_format is None:
    return None
  if not isinstance(response_format, Mapping):
    raise ValueError("response_format must be an object such as {\"type\": \"json_object\"}")
  kind = response_format.get("type")
  if kind == "text":
    return None
  if kind == "json_object":
    return json_schema_constraint({"type": "object"}, tokenizer, vocab_size, what="response_format")
  if kind == "json_schema":
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
      raise ValueError("response_format.json_schema must be an object {\"name\": ..., \"schema\": {...}}")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not _TOOL_NAME.match(name)):
      raise ValueError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'")
    schema = spec.get("schema")
    if schema is None:
      schema = {"type": "object"}  # OpenAI: a schema-less json_schema is any object
    if not isinstance(schema, Mapping):
      raise ValueError("response_format.json_schema.schema must be a JSON schema object")
    return json_schema_constraint(schema, tokenizer, vocab_size, what="response_format.json_schema.schema")
  raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


# --------------------------------------------------------------------------- tool calls


def validate_tools(tools: Any) -> list[dict]:
  """OpenAI `tools` -> a clean list of {"type": "function", "function": {"name", "description",
  "parameters"}}; ValueError naming the bad entry otherwise."""
  if not isinstance(tools, list):
    raise ValueError("tools must be a list of {\"type\": \"function\", \"function\": {...}}")
  clean, names = [], set()
  for i, t in enumerate(tools):
    where = f"tools[{i}]"
    if not isinstance(t, Mapping) or t.get("type") != "function" or not isinstance(t.get("function"), Mapping):
      raise ValueError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                       "\"parameters\": {...}}}")
    fn = t["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
      raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
    if name in names:
      raise ValueError(f"{where}.function.name {name!r} is used by two tools")
    names.add(name)
    params = fn.get("parameters")
    if params is None:
      params = {"type": "object", "properties": {}}
    if not isinstance(params, Mapping):
      raise ValueError(f"{where}.function.parameters must be a JSON schema object")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
      raise ValueError(f"{where}.function.description must be a string")
    entry = {"name": name, "parameters": dict(params)}
    if description is not None:
      entry["description"] = description
    clean.append({"type": "function", "function": entry})
  return clean


def resolve_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]]) -> str | dict:
  """"none" | "auto" | "required" | {"type": "function", "function": {"name"}} (the name must be
  one of `tools`); the default is "auto" with tools and "none" without."""
  if tool_choice is None:
    return "auto" if tools else "none"
  if tool_choice in ("none", "auto", "required"):
    if tool_choice == "required" and not tools:
      raise ValueError("tool_choice 'required' needs at least one tool in tools")
    return tool_choice
  names = [t["function"]["name"] for t in tools]
  if (isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function"
      and isinstance(tool_choice.get("function"), Mapping)):
    name = tool_choice["function"].get("name")
    if name not in names:
      raise ValueError(f"tool_choice names function {name!r}, which is not in tools ({', '.join(names) or 'none'})")
    return {"type": "function", "function": {"name": name}}
  raise ValueError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                   "{\"name\": ...}}")


def tool_call_schema(tools: Sequence[Mapping[str, Any]], name: Optional[str] = None) -> dict:
  """The JSON schema of one call's body {"name": ..., "arguments": {...}} over `tools` (only
  `name` when given)."""
  options = []
  for t in tools:
    fn = t["function"]
    if name is not None and fn["name"] != name:
      continue
    params = copy.deepcopy(dict(fn.get("parameters") or {"type": "object", "properties": {}}))
    params.pop("x-guidance", None)
    options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                    "required": ["name", "arguments"], "additionalProperties": False})
  if not options:
    raise ValueError(f"no tool named {name!r}")
  schema = options[0] if len(options) == 1 else {"anyOf": options}
  return _schema_with_options(schema)


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], name: Optional[str] = None, *,
                      max_calls: int = MAX_TOOL_CALLS) -> str:
  """llguidance grammar (Lark) of one or more Hermes/Qwen tool calls, separated by newlines:
  `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`. A named function gets one call."""
  from llguidance import LLMatcher

  calls = 1 if name is not None else max(1, int(max_calls))
  body = json.dumps(tool_call_schema(tools, name))
  more = f' ("\\n" call){{0,{calls - 1}}}' if calls > 1 else ""
  lark = (f"start: call{more}\n"
          f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} body {json.dumps(chr(10) + TOOL_CALL_CLOSE)}\n"
          f"body: %json {body}\n")
  return LLMatcher.grammar_from_lark(lark)


def constraint_for_tools(tools: Sequence[Mapping[str, Any]], tool_choice: Any, tokenizer: Any,
                         vocab_size: int, *, parallel_tool_calls: bool = True) -> Optional[GrammarConstraint]:
  """The constraint for a request's tool_choice: "required" (one or more calls of any tool, at
  most one without `parallel_tool_calls`) or a named function (exactly one call of it); None
  for "auto" and "none"."""
  tools = validate_tools(tools)
  choice = resolve_tool_choice(tool_choice, tools)
  if choice in ("auto", "none"):
    return None
  name = choice["function"]["name"] if isinstance(choice, dict) else None
  ll = compiled_tokenizer(tokenizer, vocab_size)
  grammar = tool_call_grammar(tools, name, max_calls=MAX_TOOL_CALLS if parallel_tool_calls else 1)
  _check_grammar(grammar, ll, "a tool's parameters")
  return GrammarConstraint(grammar, ll, vocab_size, kind="tool-call")


_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)",
                         re.DOTALL)


def new_call_id() -> str:
  return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, tools: Optional[Sequence[Mapping[str, Any]]] = None
                     ) -> tuple[Optional[str], list[dict]]:
  """Splits model output into (content before the first call or None, OpenAI tool calls).

  A call is `<tool_call>{"name": str, "arguments": object}</tool_call>` (the closing tag may
  be missing at the very end). Blocks that do not parse, or name a function not in
  `tools` (when given), are not calls: then the whole text stays content and no calls are
  returned, so a caller never acts on a half-formed call.
  """
  start = text.find(TOOL_CALL_OPEN)
  if start < 0:
    return text, []
  names = None if tools is None else {t["function"]["name"] for t in tools}
  calls = []
  for match in _CALL_BLOCK.finditer(text, start):
    try:
      body = json.loads(match.group(1))
    except json.JSONDecodeError:
      return text, []
    if (not isinstance(body, dict) or not isinstance(body.get("name"), str)
        or (names is not None and body["name"] not in names)):
      return text, []
    arguments = body.get("arguments", body.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments already serialised
      try:
        arguments = json.loads(arguments)
      except json.JSONDecodeError:
        return text, []
    if not isinstance(arguments, dict):
      return text, []
    calls.append({"id": new_call_id(), "type": "function",
                  "function": {"name": body["name"], "arguments": json.dumps(arguments)}})
  content = text[:start].strip()
  return (content or None), calls


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
  """The Hermes/Qwen text of an assistant's tool calls (for templates that do not render
  `tool_calls` themselves)."""
  blocks = []
  for call in tool_calls:
    fn = call.get("function") or {}
    arguments = fn.get("arguments", "{}")
    try:
      arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
      pass
    blocks.append(f"{TOOL_CALL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': arguments}, ensure_ascii=False)}\n"
                  f"{TOOL_CALL_CLOSE}")
  return "\n".join(blocks)


def tools_system_text(tools: Sequence[Mapping[str, Any]]) -> str:
  """Instructions listing `tools` and the call format, for chat templates that do not render a
  `tools=` argument themselves (the project's own ChatML templates)."""
  lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
  return ("You can call the functions described below (JSON schemas, one per line) between <tools> and "
          f"</tools>.\n<tools>\n{lines}\n</tools>\nTo call one, answer with "
          f"{TOOL_CALL_OPEN}\n{{\"name\": <function name>, \"arguments\": <JSON object of arguments>}}\n"
          f"{TOOL_CALL_CLOSE} (one block per call); the results come back in messages of role tool.")


def chat_with_tools(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping[str, Any]]],
                    template: Optional[str]) -> tuple[list[dict], dict]:
  """Messages and apply_chat_template kwargs for a tool conversation.

  Assistant `tool_calls` get their arguments as objects (templates serialise them with
  `tojson`; a string would be encoded twice). A template that renders `tools` itself gets
  them as the `tools=` argument; one that does not (no "tools" in its text) gets them as
  instructions in the system message, and one that does not render `tool_calls` gets an
  assistant's calls written into its content in the Hermes format, so any ChatML template
  can hold a tool round trip.
  """
  template = template or ""
  renders_tools = "tools" in template
  renders_calls = "tool_calls" in template
  out = []
  for m in messages:
    m = dict(m)
    calls = m.get("tool_calls")
    if calls:
      fixed = []
      for call in calls:
        call = copy.deepcopy(dict(call))
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
          try:
            fn["arguments"] = json.loads(fn["arguments"])
          except json.JSONDecodeError:
            pass
        call["function"] = fn
        fixed.append(call)
      m["tool_calls"] = fixed
      if not renders_calls:
        text = m.get("content") or ""
        m["content"] = (text + "\n" if text else "") + render_tool_calls(fixed)
        del m["tool_calls"]
    out.append(m)
  kwargs: dict = {}
  if tools:
    if renders_tools:
      kwargs["tools"] = [dict(t) for t in tools]
    else:
      text = tools_system_text(tools)
      if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
      else:
        out.insert(0, {"role": "system", "content": text})
  return out, kwargs
