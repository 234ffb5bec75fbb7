"""Structured output: a reply validated against a pydantic model, with retries that feed the error back.

Two ways to get JSON out of a model, both through any `LLMClient`:

* constrained (default): the request carries `response_format=json_schema_format(Model)`
  (OpenAI's shape); `mlx-med serve`, `LocalClient`, vLLM and OpenAI then decode under the
  schema's grammar, so even a small model returns parseable JSON. Clients that do not take
  `response_format` get the schema in the prompt instead (the same request a user of a plain
  completion API would write).
* prompted (`constrained=False`): the schema is stated in a system message and the reply is
  searched for the first JSON object (code fences and leading prose are tolerated).

Either way the value is validated with pydantic v2. When validation fails the bad reply is
appended to the conversation as the assistant's turn, followed by a user message quoting the
validation errors (field path and message, never the input values), and the model tries
again, up to `max_retries` times (the loop instructor users know).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

logger = logging.getLogger("mlx_med.apps.structured")

_NAME_OK = re.compile(r"[^A-Za-z0-9_-]")


def client_accepts(client: Any, keyword: str, method: str = "chat") -> bool:
  """Whether `client.<method>` takes `keyword` (wrappers with **kwargs are looked through)."""
  seen = 0
  while client is not None and seen < 8:
    fn = getattr(client, method, None)
    if fn is None:
      return False
    try:
      params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
      return False
    if keyword in params:
      return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
      return False
    inner = getattr(client, "inner", None)
    if inner is None:
      return True  # a plain **kwargs client: trust it
    client, seen = inner, seen + 1
  return False


def _close_objects(schema: Any) -> None:
  """additionalProperties: false on every object schema that lists properties (OpenAI strict mode;
  it also keeps a grammar-constrained small model from inventing keys)."""
  if isinstance(schema, dict):
    if schema.get("type") == "object" and "properties" in schema:
      schema.setdefault("additionalProperties", False)
    for value in schema.values():
      _close_objects(value)
  elif isinstance(schema, list):
    for value in schema:
      _close_objects(value)


def json_schema_format(model_cls: type[BaseModel], *, name: Optional[str] = None, strict: bool = True) -> dict:
  """The `response_format` asking for JSON that validates against `model_cls` (OpenAI's json_schema shape).

  With `strict`, object schemas are closed (additionalProperties false) as OpenAI's strict mode
  requires; fields with defaults stay optional (pydantic's schema is kept otherwise).
  """
  if not (isinstance(model_cls, type) and issubclass(model_cls, BaseModel)):
    raise TypeError(f"json_schema_format needs a pydantic BaseModel class, got {model_cls!r}")
  schema = copy.deepcopy(model_cls.model_json_schema())
  if strict:
    _close_objects(schema)
  label = _NAME_OK.sub("_", name or model_cls.__name__)[:64] or "response"
  return {"type": "json_schema", "json_schema": {"name": label, "schema": schema, "strict": bool(strict)}}


@dataclasses.dataclass
class StructuredResult:
  """What `generate_structured` got: the validated value (None when every attempt failed), the last
  raw reply, how many model calls it took, the error of each failed attempt and the last completion."""

  value: Optional[BaseModel]
  raw: str
  attempts: int
  errors: list[str]
  completion: Optional[Any]

  @property
  def ok(self) -> bool:
    return self.value is not None


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
  """The first JSON value in `text`: the whole text, else a fenced block, else the first object/array.

  Raises ValueError (with a short reason) when there is none.
  """
  stripped = text.strip()
  if not stripped:
    raise ValueError("the reply is empty")
  try:
    return json.loads(stripped)
  except json.JSONDecodeError:
    pass
  decoder = json.JSONDecoder()
  for block in _FENCE.findall(text):
    try:
      return decoder.raw_decode(block.strip())[0]
    except json.JSONDecodeError:
      continue
  for i, ch in enumerate(text):
    if ch in "{[":
      try:
        return decoder.raw_decode(text, i)[0]
      except json.JSONDecodeError:
        continue
  raise ValueError("the reply holds no complete JSON object")


def _describe(error: ValidationError) -> str:
  """Validation errors as 'path: message' lines (no input values: they may be patient text)."""
  lines = []
  for e in error.errors(include_url=False, include_input=False):
    loc = ".".join(str(p) for p in e.get("loc", ())) or "(root)"
    lines.append(f"{loc}: {e.get('msg', 'invalid')}")
  return "; ".join(lines)


def parse_structured(text: str, model_cls: type[BaseModel]) -> BaseModel:
  """`text` parsed (JSON extracted when wrapped in prose or fences) and validated; ValueError otherwise."""
  try:
    data = extract_json(text)
  except ValueError as e:
    raise ValueError(f"not JSON: {e}") from None
  try:
    return model_cls.model_validate(data)
  except ValidationError as e:
    raise ValueError(f"does not match {model_cls.__name__}: {_describe(e)}") from None


def schema_instruction(model_cls: type[BaseModel]) -> str:
  schema = json.dumps(model_cls.model_json_schema(), separators=(",", ":"))
  return ("Reply with one JSON object and nothing else (no prose, no code fences). "
          f"It must validate against this JSON schema:\n{schema}")


def _with_instruction(messages: Sequence[Mapping[str, Any]], instruction: str) -> list[dict]:
  msgs = [dict(m) for m in messages]
  if msgs and msgs[0].get("role") == "system" and isinstance(msgs[0].get("content"), str):
    msgs[0]["content"] = f"{msgs[0]['content']}\n\n{instruction}"
  else:
    msgs.insert(0, {"role": "system", "content": instruction})
  return msgs


def retry_message(error: str, model_cls: type[BaseModel]) -> dict:
  return {"role": "user",
          "content": (f"Your previous reply was invalid ({error}). Reply again with only a JSON object that "
                      f"fixes these errors and matches the {model_cls.__name__} schema.")}


def generate_structured(client: Any, messages: Sequence[Mapping[str, Any]], model_cls: type[BaseModel], *,
                        max_retries: int = 2, constrained: bool = True, max_tokens: int = 256,
                        temperature: float = 0.0, seed: Optional[int] = 0,
                        schema_in_prompt: Optional[bool] = None, **chat_kwargs: Any) -> StructuredResult:
  """Asks `client` for a reply that validates against `model_cls`; retries with the error fed back.

  `schema_in_prompt` (default: only when the request is not constrained) adds the JSON schema to
  the system message. Extra keyword arguments go to `client.chat` (e.g. top_p, stop).
  Returns a `StructuredResult`; `.value` is None when all `1 + max_retries` attempts failed.
  """
  if max_retries < 0:
    raise ValueError(f"max_retries must be >= 0, got {max_retries}")
  use_format = constrained and client_accepts(client, "response_format")
  if constrained and not use_format:
    logger.info("client %s takes no response_format; asking for the schema in the prompt instead",
                type(client).__name__)
  if schema_in_prompt is None:
    schema_in_prompt = not use_format
  msgs = [dict(m) for m in messages]
  if schema_in_prompt:
    msgs = _with_instruction(msgs, schema_instruction(model_cls))
  kwargs = dict(chat_kwargs, max_tokens=max_tokens, temperature=temperature, seed=seed)
  if use_format:
    kwargs["response_format"] = json_schema_format(model_cls)
  errors: list[str] = []
  raw, completion = "", None
  for attempt in range(1, max_retries + 2):
    completion = client.chat(msgs, **kwargs)[0]
    raw = completion.text or ""
    try:
      value = parse_structured(raw, model_cls)
    except ValueError as e:
      error = str(e)
      if completion.finish_reason == "length":
        error += f" (the reply was cut at max_tokens={max_tokens})"
      errors.append(error)
      logger.info("structured output attempt %d/%d failed: %s", attempt, max_retries + 1, error)
      msgs = msgs + [{"role": "assistant", "content": raw}, retry_message(error, model_cls)]
      continue
    return StructuredResult(value=value, raw=raw, attempts=attempt, errors=errors, completion=completion)
  return StructuredResult(value=None, raw=raw, attempts=max_retries + 1, errors=errors, completion=completion)
