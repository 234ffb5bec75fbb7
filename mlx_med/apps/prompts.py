"""Prompt templates made of named, composable parts.

A clinical prompt is rarely one string: an instruction, a definition, the allowed answers,
an output schema, a few examples and the note itself are edited, reordered and swapped
independently (UniMedAbstractor's universal template is exactly that). `PromptTemplate`
keeps those parts by name, in order, so an application can `replace` the definition for a
new attribute, `insert` a retrieval context before the note, drop the examples with
`without`, or join two templates with `+`, and every variant still renders the same way.

Fields are `str.format` fields, `{name}` (attribute and index access such as `{step.value}`
work; literal braces are doubled, `{{` and `}}`). A part whose fields are all given as ""
(or None) is dropped from the rendered text, so optional sections (examples, context) need
no `if` in the caller. A field with no value at all is an error naming the field and part.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

Parts = Union[Mapping[str, str], Sequence[tuple[str, str]]]

_FORMATTER = string.Formatter()


def _field_names(text: str, where: str) -> tuple[str, ...]:
  """The base names of the `{fields}` in `text`, in order of first use (checks the syntax)."""
  names: list[str] = []
  try:
    parsed = list(_FORMATTER.parse(text))
  except ValueError as e:
    raise ValueError(f"prompt {where}: {e}; write literal braces doubled ('{{{{' and '}}}}')") from None
  for _, field, spec, _ in parsed:
    if field is None:
      continue
    base = field
    for sep in (".", "["):
      base = base.split(sep, 1)[0]
    if not base or base.isdigit():
      raise ValueError(f"prompt {where}: positional field {{{field}}} is not supported; name it, e.g. {{note}}")
    if not base.isidentifier():
      raise ValueError(f"prompt {where}: field name {base!r} is not an identifier")
    if spec:
      names.extend(n for n in _field_names(spec, where) if n not in names)
    if base not in names:
      names.append(base)
  return tuple(names)


def _is_empty(value: Any) -> bool:
  return value is None or (isinstance(value, str) and not value.strip())


class PromptTemplate:
  """Named, ordered prompt parts (plus an optional system message) rendered with `str.format`.

    t = PromptTemplate([("task", "Extract {attribute} from the note."),
                        ("examples", "Examples:\\n{examples}"),
                        ("note", "Note:\\n{note}")], system="You are a careful clinical abstractor.")
    t.render(attribute="histology", examples="", note=text)   # the examples part is dropped
    t.messages(...)   # [{"role": "system", ...}, {"role": "user", ...}]

  Templates are immutable; every edit returns a new template.
  """

  def __init__(self, parts: Parts, *, system: Optional[str] = None, joiner: str = "\n\n"):
    items = list(parts.items()) if isinstance(parts, Mapping) else [tuple(p) for p in parts]
    seen: set[str] = set()
    for item in items:
      if len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], str):
        raise TypeError(f"prompt parts must be (name, text) string pairs; got {item!r}")
      name = item[0]
      if not name:
        raise ValueError("prompt part names must be non-empty")
      if name in seen:
        raise ValueError(f"prompt part {name!r} appears twice; part names must be unique")
      seen.add(name)
    if system is not None and not isinstance(system, str):
      raise TypeError(f"system must be a string or None, got {type(system).__name__}")
    self._parts: tuple[tuple[str, str], ...] = tuple((n, t) for n, t in items)
    self._system = system
    self._joiner = joiner
    self._bound: dict[str, Any] = {}
    self._part_fields = {n: _field_names(t, f"part {n!r}") for n, t in self._parts}
    self._system_fields = _field_names(system, "system message") if system is not None else ()

  # ---- inspection -------------------------------------------------------------------------
  @property
  def names(self) -> tuple[str, ...]:
    """Part names in order."""
    return tuple(n for n, _ in self._parts)

  @property
  def fields(self) -> frozenset[str]:
    """Every field the template uses (parts and system message)."""
    out = set(self._system_fields)
    for names in self._part_fields.values():
      out.update(names)
    return frozenset(out)

  @property
  def parts(self) -> tuple[tuple[str, str], ...]:
    return self._parts

  @property
  def system(self) -> Optional[str]:
    return self._system

  @property
  def joiner(self) -> str:
    return self._joiner

  @property
  def bound(self) -> dict[str, Any]:
    """Values fixed with `partial` (used unless render gets another value)."""
    return dict(self._bound)

  def part_fields(self, name: str) -> tuple[str, ...]:
    """The fields of one part, in order of use."""
    self._check_known(name)
    return self._part_fields[name]

  def __getitem__(self, name: str) -> str:
    self._check_known(name)
    return dict(self._parts)[name]

  def __contains__(self, name: object) -> bool:
    return name in self.names

  def __iter__(self) -> Iterator[str]:
    return iter(self.names)

  def __len__(self) -> int:
    return len(self._parts)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, PromptTemplate):
      return NotImplemented
    return ((self._parts, self._system, self._joiner, self._bound)
            == (other._parts, other._system, other._joiner, other._bound))

  def __hash__(self) -> int:
    return hash((self._parts, self._system, self._joiner, tuple(sorted(self._bound))))

  def __repr__(self) -> str:
    return f"PromptTemplate(names={list(self.names)}, fields={sorted(self.fields)}, system={self._system is not None})"

  # ---- rendering --------------------------------------------------------------------------
  @staticmethod
  def _format(text: str, names: Sequence[str], values: Mapping[str, Any], where: str) -> str:
    missing = [n for n in names if n not in values]
    if missing:
      raise KeyError(f"prompt {where} needs field {missing[0]!r} (fields of this part: {list(names)}); "
                     f"pass {missing[0]}=... to render, or drop the part with without()")
    try:
      return text.format_map(values)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
      raise type(e)(f"prompt {where}: could not fill its fields: {e}") from e

  def render(self, **values: Any) -> str:
    """The user text: parts in order, joined by `joiner`; parts with only empty values dropped."""
    values = {**self._bound, **values}
    out = []
    for name, text in self._parts:
      fields = self._part_fields[name]
      if fields and all(f in values and _is_empty(values[f]) for f in fields):
        continue
      piece = self._format(text, fields, values, f"part {name!r}")
      if piece.strip():
        out.append(piece)
    return self._joiner.join(out)

  def render_system(self, **values: Any) -> Optional[str]:
    if self._system is None:
      return None
    values = {**self._bound, **values}
    return self._format(self._system, self._system_fields, values, "system message")

  def messages(self, **values: Any) -> list[dict]:
    """Chat messages: the system message (when set) and one user message with `render`'s text."""
    msgs = []
    system = self.render_system(**values)
    if system is not None and system.strip():
      msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": self.render(**values)})
    return msgs

  # ---- composition ------------------------------------------------------------------------
  def _check_known(self, name: str) -> None:
    if name not in self.names:
      raise KeyError(f"prompt has no part {name!r}; its parts are {list(self.names)}")

  def _with(self, parts: Sequence[tuple[str, str]], system: Any = ...) -> PromptTemplate:
    out = PromptTemplate(list(parts), system=self._system if system is ... else system, joiner=self._joiner)
    out._bound = dict(self._bound)
    return out

  def partial(self, **values: Any) -> PromptTemplate:
    """The template with some fields fixed (e.g. the attribute's definition), the rest given to render."""
    unknown = sorted(set(values) - self.fields)
    if unknown:
      raise KeyError(f"partial() got field(s) {unknown} the template does not use; its fields are {sorted(self.fields)}")
    out = self._with(self._parts)
    out._bound.update(values)
    return out

  def replace(self, name: str, text: str) -> PromptTemplate:
    """The template with part `name`'s text replaced (same position)."""
    self._check_known(name)
    return self._with([(n, text if n == name else t) for n, t in self._parts])

  def insert(self, name: str, text: str, *, after: Optional[str] = None,
             before: Optional[str] = None) -> PromptTemplate:
    """The template with a new part `name` after/before an existing part (default: at the end)."""
    if after is not None and before is not None:
      raise ValueError("insert takes after= or before=, not both")
    if name in self.names:
      raise ValueError(f"prompt already has a part {name!r}; use replace() to change it")
    parts = list(self._parts)
    if after is not None:
      self._check_known(after)
      at = self.names.index(after) + 1
    elif before is not None:
      self._check_known(before)
      at = self.names.index(before)
    else:
      at = len(parts)
    parts.insert(at, (name, text))
    return self._with(parts)

  def without(self, *names: str) -> PromptTemplate:
    """The template without the named parts."""
    for name in names:
      self._check_known(name)
    return self._with([(n, t) for n, t in self._parts if n not in names])

  def with_system(self, system: Optional[str]) -> PromptTemplate:
    return self._with(self._parts, system)

  def __add__(self, other: Union[PromptTemplate, tuple[str, str]]) -> PromptTemplate:
    """Parts of `self` then parts of `other` (names must not clash; at most one system message)."""
    if isinstance(other, tuple):
      other = PromptTemplate([other])
    if not isinstance(other, PromptTemplate):
      return NotImplemented
    clash = [n for n in other.names if n in self.names]
    if clash:
      raise ValueError(f"cannot join templates: both have part(s) {clash}; rename one with insert/without")
    if self._system is not None and other._system is not None and self._system != other._system:
      raise ValueError("cannot join templates with two different system messages; "
                       "drop one with with_system(None)")
    system = self._system if self._system is not None else other._system
    clash = sorted(k for k in set(self._bound) & set(other._bound) if self._bound[k] != other._bound[k])
    if clash:
      raise ValueError(f"cannot join templates that fix field(s) {clash} to different values")
    out = self._with(list(self._parts) + list(other._parts), system)
    out._bound.update(other._bound)
    return out
