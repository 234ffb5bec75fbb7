"""The math of RL with verifiable rewards as small registered pure functions.

Every algorithmic choice of the GRPO / PPO loop is a few lines of array code (or,
for rewards, of Python over the completion text) registered under a name, and the
config chooses by name: `get("advantage", cfg.rl.advantage)`. Five kinds:

  reward       fn(completion: str, example: Mapping) -> float        (host side)
  advantage    fn(rewards [P, G], *, eps) -> [P, G]                  (one row per prompt)
  policy_loss  fn(logp, old_logp, advantages, *, eps_low, eps_high, dual_clip)
               -> (per_token_loss [B, T], clipped [B, T] bool)
  aggregation  fn(per_token [B, T], mask [B, T], *, max_len) -> (loss_sum, weight)
  kl           fn(logp [B, T], ref_logp [B, T]) -> per-token estimate [B, T]

Aggregations return sums, never means: the loss is `loss_sum / weight`, and both
parts add over micro-batches, so gradient accumulation in the core trainer gives
the full-batch loss exactly.

Text conventions (what the rewards accept and why) are written beside
`split_response`, `extract_choice`, `answer_leak` and `extract_number`. They are
tolerant of what real policies write (missing or nested tags, several answer
blocks, "(C)", "The answer is c.", the option text instead of its letter) and
strict where tolerance would pay a reward hack: an answer naming two options is
wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

KINDS = ("reward", "advantage", "policy_loss", "aggregation", "kl")

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}


def _check_kind(kind: str) -> None:
  if kind not in _REGISTRY:
    raise ValueError(f"unknown function kind {kind!r}; known: {', '.join(KINDS)}")


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator registering `fn` as `name` of `kind` (one of KINDS)."""
  _check_kind(kind)

  def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    old = _REGISTRY[kind].get(name)
    # Re-registering the same function (a module reload) is fine; two different ones are a bug.
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
      raise ValueError(f"{kind} {name!r} is already registered (by {old.__module__}.{old.__qualname__}); "
                       f"pick another name")
    _REGISTRY[kind][name] = fn
    return fn
  return wrap


def get(kind: str, name: str) -> Callable[..., Any]:
  """The function registered as `name` of `kind`; a one-line error lists the known names."""
  _check_kind(kind)
  fns = _REGISTRY[kind]
  if name not in fns:
    raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(fns)}")
  return fns[name]


def names(kind: str) -> list[str]:
  """Registered names of `kind`, in registration order."""
  _check_kind(kind)
  return list(_REGISTRY[kind])


# ---------------------------------------------------------------------------------------------
# Text: splitting a completion into its think and answer parts
# ---------------------------------------------------------------------------------------------

class ResponseParts(NamedTuple):
  think: str | None      # the reasoning (None: no <think> block at all)
  answer: str | None     # content of the LAST <answer> block (None: no <answer> tag)
  format_ok: bool        # exactly <think>...</think><answer>...</answer>, whitespace around


_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
# End-of-turn markers a decoder may leave at the end when special tokens are not skipped.
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<eos>", "<end_of_turn>")


def _strip_end_markers(text: str) -> str:
  text = text.rstrip()
  changed = True
  while changed:
    changed = False
    for marker in _END_MARKERS:
      if text.endswith(marker):
        text = text[: -len(marker)].rstrip()
        changed = True
  return text


def _think_in_prompt(example: Mapping | None, think_in_prompt: bool | None) -> bool:
  if think_in_prompt is not None:
    return bool(think_in_prompt)
  return bool(example.get("think_in_prompt", False)) if example is not None else False


def split_response(text: str, *, think_in_prompt: bool = False) -> ResponseParts:
  """Split a completion into (think, answer, format_ok).

  format_ok: the whole completion is exactly one `<think>...</think>` followed by
  exactly one `<answer>...</answer>` with only whitespace around and between, no
  tag nested inside either block, and a non-blank answer (trailing end-of-turn
  markers such as `<|im_end|>` are ignored). With `think_in_prompt=True` the
  prompt already ended with `<think>`, so the completion starts inside the
  reasoning and must not open it again.

  Lenient parts (for rewards and diagnostics of broken completions):
  think  = text from the first `<think>` to the next `</think>` (or, unclosed, to
           the first `<answer>` or the end); with no `<think>` but a `</think>`,
           everything before it; None when neither tag is present.
  answer = content of the LAST `<answer>`, up to its `</answer>` or the end of
           the text (a sampler that stops on `</answer>` drops it); None when no
           `<answer>` tag is present.
  """
  text = _strip_end_markers(text)
  if think_in_prompt:
    text = "<think>" + text

  think: str | None = None
  open_at = text.find("<think>")
  if open_at >= 0:
    start = open_at + len("<think>")
    close_at = text.find("</think>", start)
    if close_at < 0:
      answer_at = text.find("<answer>", start)
      close_at = answer_at if answer_at >= 0 else len(text)
    think = text[start:close_at]
  elif "</think>" in text:
    think = text[: text.find("</think>")]

  answer: str | None = None
  open_at = text.rfind("<answer>")
  if open_at >= 0:
    start = open_at + len("<answer>")
    close_at = text.find("</answer>", start)
    answer = text[start:] if close_at < 0 else text[start:close_at]

  match = _FORMAT_RE.fullmatch(text)
  format_ok = bool(
    match
    and sum(text.count(tag) for tag in _TAGS) == 4
    and not _TAG_RE.search(match.group(1))
    and not _TAG_RE.search(match.group(2))
    and match.group(2).strip())
  return ResponseParts(think, answer, format_ok)


# ---------------------------------------------------------------------------------------------
# Text: the chosen option of a multiple-choice answer
# ---------------------------------------------------------------------------------------------

# Explicit answer statements: "the answer is (C)", "Answer: B", "final answer: option D",
# "I choose B". An upper-case letter may stand anywhere; a lower-case one only in
# parentheses or before punctuation / the end ("answer is c."), never before a word
# ("the answer is a drug ..." names no option).
_STATEMENT = (r"(?:(?:final|correct|right|best)\s+)?(?:answer|option|choice)\s*(?:(?:is|would\s+be|will\s+be|"
              r"should\s+be|must\s+be)\s*:?|[:=\-])\s*|\bI\s+(?:choose|select|pick|go\s+with)\s+")
_STATEMENT_RE = re.compile(
  rf"(?i:{_STATEMENT})(?i:(?:option|choice|letter)\s+)?"
  r"(?:\(\s*([A-Za-z])\s*\)|\b([A-Z])(?![A-Za-z0-9'])|\b([a-z])(?=\s*(?:[.,;:!)]|$)))")
# What joins a second letter to the first: "A or B", "(B) and (C)", "B/C", "B, C".
_CONNECTOR_RE = re.compile(r"[).:]?\s*(?:or|and|/|,|&)\s*(?:option\s+|choice\s+)?", re.IGNORECASE)
# The whole answer is a letter: "B", "(b)", "B.", "[B]".
_BARE_RE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:;!]?")
# A letter heading the answer, then the option text: "B) Aspirin", "(B) Aspirin", "B. Aspirin", "B: ...",
# "B - Aspirin", or a letter alone on the first line (a base model continuing "Answer:" past its answer).
_LEADING_RE = re.compile(r"(?:\(\s*([A-Za-z])\s*\)|([A-Z])(?:\s*[.):]|\s+-|[ \t]*\n))\s*\S")
# Capital letters standing alone ("Option B", "(C) is right").
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9'])\(?([A-Z])\)?(?![A-Za-z0-9'])")
# "A" and "I" are also English words; they count as options only before one of these
# words, punctuation or the end ("A or B", "I.", but not "I think" or "A patient").
_LETTER_FOLLOWERS = {"or", "and", "is", "was", "seems", "appears", "looks", "would", "should", "must",
                     "fits", "best", "correct", "because", "as", "vs", "versus"}


def _clean_markup(text: str) -> str:
  """Drop markdown emphasis and LaTeX wrappers a model puts around its answer."""
  text = re.sub(r"\\(?:boxed|text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", text)
  return text.replace("**", "").replace("*", "").replace("`", "").replace("$", "").strip()


def _as_options(options: Any) -> dict[str, str] | None:
  """Options as {letter: text}; a plain list (MMLU-Pro's raw rows) is lettered A, B, C, ..."""
  if not options:
    return None
  if isinstance(options, Mapping):
    return {str(k).strip().upper(): str(v) for k, v in options.items()}
  return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}


def _norm_text(text: str) -> str:
  """Lower case, punctuation to spaces, single spaces: for comparing option texts."""
  return " ".join(re.sub(r"[^\w%+\-]+", " ", text.lower()).split())


def _match_option_text(region: str, options: Mapping[str, str]) -> str | None:
  """The one option whose text the region gives (exactly, or as the only option text it contains)."""
  target = _norm_text(region)
  if not target:
    return None
  texts = {letter: _norm_text(str(text)) for letter, text in options.items()}
  exact = [letter for letter, text in texts.items() if text and text == target]
  if len(exact) == 1:
    return exact[0]
  padded = f" {target} "
  found = [letter for letter, text in texts.items() if text and f" {text} " in padded]
  # "Aspirin and heparin" contains "aspirin": keep only options not inside another found one.
  found = [a for a in found if not any(b != a and texts[a] in texts[b] for b in found)]
  return found[0] if len(found) == 1 else None


def _reads_as_word(region: str, letter: str, end: int) -> bool:
  """A bare "A" / "I" at region[:end] followed by an ordinary word is the English word."""
  if letter not in "AI":
    return False
  word = re.match(r"\s+([a-z]+)", region[end:])
  return bool(word) and word.group(1) not in _LETTER_FOLLOWERS


def _standalone_letters(region: str, letters: str) -> list[str]:
  out = []
  for match in _STANDALONE_RE.finditer(region):
    letter = match.group(1)
    if letter not in letters:
      continue
    if "(" not in match.group(0) and _reads_as_word(region, letter, match.end()):
      continue
    out.append(letter)
  return out


def _second_letter_follows(region: str, pos: int, letters: str) -> bool:
  """Whether another option letter is joined on at `pos` ("... B or C", "(B) and (C)")."""
  joined = _CONNECTOR_RE.match(region, pos)
  if not joined:
    return False
  nxt = re.compile(r"\(\s*([A-Za-z])\s*\)|([A-Z])(?![A-Za-z0-9'])").match(region, joined.end())
  if not nxt:
    return False
  letter = (nxt.group(1) or nxt.group(2)).upper()
  return letter in letters and not (nxt.group(2) and _reads_as_word(region, letter, nxt.end()))


def _choice_in(region: str, letters: str, options: Mapping[str, str] | None) -> str | None:
  """The option letter a short answer region names, or None when absent or ambiguous."""
  region = _clean_markup(region)
  if not region:
    return None
  valid = letters.upper()

  def ok(letter: str | None) -> str | None:
    return letter.upper() if letter and letter.upper() in valid else None

  bare = _BARE_RE.fullmatch(region)
  if bare:
    return ok(bare.group(1))
  leading = _LEADING_RE.match(region)
  if leading:
    group = 1 if leading.group(1) else 2
    if _second_letter_follows(region, leading.end(group), valid):
      return None
    return ok(leading.group(group))
  statements = list(_STATEMENT_RE.finditer(region))
  if statements:
    last = statements[-1]  # a corrected statement ("..., no: the answer is C") wins
    if _second_letter_follows(region, last.end(), valid):
      return None
    return ok(last.group(1) or last.group(2) or last.group(3))
  if options:
    by_text = _match_option_text(region, options)
    if by_text is not None:
      return ok(by_text)
  found = set(_standalone_letters(region, valid))
  return found.pop() if len(found) == 1 else None


def _answer_region(text: str, think_in_prompt: bool = False) -> str:
  """Where the final answer is read: the last <answer> block, else after </think>, else everything."""
  parts = split_response(text, think_in_prompt=think_in_prompt)
  if parts.answer is not None:
    return parts.answer
  text = _strip_end_markers(text)
  close_at = text.rfind("</think>")
  if close_at >= 0:
    return text[close_at + len("</think>"):]
  if think_in_prompt or "<think>" in text:  # still inside an unclosed thought: no answer was given
    return ""
  return text


def extract_choice(text: str, letters: str = "ABCDEFGHIJ", *, options: Mapping[str, str] | None = None,
                   think_in_prompt: bool = False) -> str | None:
  """The option letter chosen in a completion (upper case), or None when absent or ambiguous.

  Read from the LAST `<answer>` block (else the text after `</think>`, else the whole
  text, for plain "Answer:" prompts). Accepted, in this order: the whole answer is a
  letter ("B", "(b)", "B."); a letter heads it ("B) Aspirin", "(B) Aspirin", "B. ...");
  an explicit statement, the last one winning ("The answer is (C)", "Answer: c",
  "final answer: option D"); the option text itself when `options` is given
  ("Aspirin"); a single capital letter standing alone ("Option B"). Two different
  letters ("A or B", "the answer is B or C") give None. Letters outside `letters`
  (or outside the option keys) give None. Markdown emphasis, `$` and `\\boxed{}` are
  ignored.
  """
  options = _as_options(options)
  if options:
    letters = "".join(options)
  return _choice_in(_answer_region(text, think_in_prompt), letters, options)


def extract_choice_from(text: str, example: Mapping, *, think_in_prompt: bool | None = None) -> str | None:
  """`extract_choice` with the option letters and texts of `example` (when it has "options")."""
  return extract_choice(text, options=_as_options(example.get("options")),
                        think_in_prompt=_think_in_prompt(example, think_in_prompt))


# ---------------------------------------------------------------------------------------------
# Text: does the reasoning give the answer away?
# ---------------------------------------------------------------------------------------------

# The reasoning ends by naming a letter on its own: "So B.", "Therefore, (C)", "Thus it is D.", "B."
_CONCLUSION_RE = re.compile(
  r"(?:^|[.!?:;\n])\s*(?:(?:so|thus|therefore|hence|final(?:ly)?|overall)\s*,?\s*)?"
  r"(?:(?:it\s*'?s|it\s+is|that\s*'?s|that\s+is|we\s+get|pick|choose)\s+)?"
  r"(?:option\s+|choice\s+)?\(?([A-Z])\)?\s*[.!]?\s*$", re.IGNORECASE)
# "the answer is <option text>" (matched against the options).
_ANSWER_TEXT_RE = re.compile(r"answer\s*(?:is|:)\s*([^.\n!?;]+)", re.IGNORECASE)


def answer_statements(think: str, letters: str = "ABCDEFGHIJ",
                      options: Mapping[str, str] | None = None) -> list[str]:
  """Option letters that a reasoning text states AS THE ANSWER, in order.

  Counted: explicit statements ("the answer is B", "Answer: B", "correct option is (B)",
  "I choose B"), "the answer is <option text>" when options are given, and a closing
  sentence that is only a letter ("... So B." / "Therefore, (C)." / "B."). Mentioning
  options while reasoning ("option B is unlikely", "B and C are both beta blockers",
  "rule out D.") is not a statement of the answer.
  """
  options = _as_options(options)
  if options:
    letters = "".join(options)
  valid = letters.upper()
  body = _clean_markup(think)
  found: list[str] = []
  stated_at = set()
  for match in _STATEMENT_RE.finditer(body):
    group = next(g for g in (1, 2, 3) if match.group(g))
    stated_at.add(match.start(group))
    if match.group(group).upper() in valid:
      found.append(match.group(group).upper())
  if options:
    texts = {_norm_text(str(text)): str(letter) for letter, text in options.items()}
    for match in _ANSWER_TEXT_RE.finditer(body):
      letter = texts.get(_norm_text(match.group(1)))  # exactly an option's text ("not aspirin" is none)
      if letter is not None:
        found.append(letter.upper())
  conclusion = _CONCLUSION_RE.search(body)
  if conclusion and conclusion.group(1).upper() in valid and conclusion.start(1) not in stated_at:
    letter = conclusion.group(1)
    # A lower-case "a" / "i" closing a sentence is a word, not an option.
    if letter.isupper() or "(" in conclusion.group(0):
      found.append(letter.upper())
  return found


def detect_answer_leak(completion: str, example: Mapping | None = None, *,
                       think_in_prompt: bool | None = None) -> bool:
  """Whether the <think> block reveals the final answer (the Med-RLVR reward hack).

  A leak is (1) an answer tag inside the reasoning (`<answer>` or `</answer>` before
  `</think>`, i.e. the answer block nested in or emitted before the thought ends),
  or (2) the reasoning stating as the answer (see `answer_statements`) the letter the
  completion finally chooses; when no final choice can be read, any stated answer
  counts. A statement of a different letter than the final one (the model changed
  its mind) is not a leak of the final answer. No think block: no leak.
  """
  example = example or {}
  tip = _think_in_prompt(example, think_in_prompt)
  text = _strip_end_markers(completion)
  if tip:
    text = "<think>" + text
  parts = split_response(text)
  if parts.think is None:
    return False
  # An answer tag before the thought is closed (an unclosed thought is a format failure instead).
  open_at = text.find("<think>")
  close_at = text.find("</think>", max(open_at, 0))
  inside = text[max(open_at, 0): close_at] if close_at >= 0 else ""
  if "<answer>" in inside or "</answer>" in inside:
    return True
  options = _as_options(example.get("options"))
  letters = "".join(options) if options else "ABCDEFGHIJ"
  stated = answer_statements(parts.think, letters, options)
  if not stated:
    return False
  final = extract_choice(text, letters, options=options)
  return final is None or final in stated


# ---------------------------------------------------------------------------------------------
# Text: numeric answers (math)
# ---------------------------------------------------------------------------------------------

def _last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} / \\fbox{...} (braces balanced), or None."""
  best = None
  for match in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text):
    if match.group(1) is None:  # "\boxed 5"
      rest = re.match(r"\s*([^\s$]+)", text[match.end():])
      if rest:
        best = rest.group(1)
      continue
    depth, i = 1, match.end()
    while i < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      i += 1
    if depth == 0:
      best = text[match.end(): i - 1]
  return best


_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _normalise_math(text: str) -> str:
  """Canonical string of a math answer (see `extract_number`)."""
  s = _strip_end_markers(str(text)).strip()
  s = s.replace("\u2212", "-").replace("\u2013", "-")
  s = re.sub(r"\\(?:left|right)\b", "", s)
  s = re.sub(r"\\[,;:! ]|~", "", s)  # LaTeX spaces
  s = s.replace("{,}", ",")
  s = re.sub(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}", r" \1 ", s)
  s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("^\\circ", "").replace("^{\\circ}", "")
  s = s.replace("\u00b0", "").replace("\\displaystyle", "")
  s = _FRAC_RE.sub(r"(\1)/(\2)", s)
  s = re.sub(r"(\d)\s*(?:\\times|\\cdot|x|\*)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?", r"\1e\2", s)  # 1.5 \times 10^{3}
  s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
  s = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)?\s*", "", s.strip(), flags=re.IGNORECASE)
  if "=" in s:  # "x = 5": the right-hand side of the last "="
    s = s.rsplit("=", 1)[1]
  s = s.strip().rstrip(".,;:!").strip()
  s = s.replace("%", "")  # percent convention: "50%" is "50" (not 0.5)
  # Units: a number, a space, then words only ("12 cm", "5 apples") keeps the number; "2x" stays.
  unit = re.fullmatch(r"([-+]?[\d.,/()]+)\s+[A-Za-z][A-Za-z .]*", s)
  if unit and any(c.isdigit() for c in unit.group(1)):
    s = unit.group(1)
  s = " ".join(s.split())
  if _THOUSANDS_RE.fullmatch(s):
    s = s.replace(",", "")
  while len(s) > 2 and s[0] == "(" and s[-1] == ")" and _balanced(s[1:-1]):
    s = s[1:-1].strip()
  return s


def _balanced(s: str) -> bool:
  depth = 0
  for c in s:
    depth += {"(": 1, ")": -1}.get(c, 0)
    if depth < 0:
      return False
  return depth == 0


def _to_fraction(s: str) -> Fraction | None:
  """Value of a normalised answer: int, decimal, scientific, a/b, (a)/(b); None otherwise."""
  s = s.replace(" ", "")
  match = re.fullmatch(r"([-+]?)\(?([-+]?[\d.eE+\-]+)\)?/\(?([-+]?[\d.eE+\-]+)\)?", s)
  try:
    if match:
      num, den = Fraction(match.group(2)), Fraction(match.group(3))
      if den == 0:
        return None
      value = num / den
      return -value if match.group(1) == "-" else value
    if _NUMBER_RE.fullmatch(s):
      return Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None
  return None


def extract_number(text: str, *, think_in_prompt: bool = False) -> str | None:
  """The final math answer of a completion, normalised to a canonical string; None if none.

  Source: the last \\boxed{} inside the last `<answer>` block, else that block's
  content, else the last \\boxed{} anywhere (after the reasoning when a `</think>`
  is present). Normalisation: `$`, `\\left`/`\\right`, LaTeX spaces, `\\text{}`
  wrappers and degree signs dropped; `\\frac{a}{b}` / `\\dfrac` / `\\tfrac` -> a/b;
  "1.5 \\times 10^{3}" -> 1.5e3;
  "the answer is" / "x =" prefixes dropped (the right side of the last "="); trailing
  punctuation dropped; thousands separators removed ("1,234" -> "1234"); a number
  followed only by words keeps the number ("12 cm" -> "12"). Percent convention: the
  sign is dropped, so "50%" == "50" (and != "0.5"), as MATH / GSM8K references write
  percentages without it. A plain number is returned in its canonical form
  ("3.50" -> "3.5", "6/4" -> "3/2"); anything else (an expression) as normalised text.
  """
  region = split_response(text, think_in_prompt=think_in_prompt).answer
  if region is not None:
    boxed = _last_boxed(region)
    raw = boxed if boxed is not None else region
  else:
    tail = _strip_end_markers(text)
    if "</think>" in tail:
      tail = tail[tail.rfind("</think>") + len("</think>"):]
    elif think_in_prompt or "<think>" in tail:  # the thought never ended
      return None
    raw = _last_boxed(tail)
    if raw is None:
      statement = re.search(r"answer\s*(?:is|:)\s*([^\n]+)$", tail.strip(), re.IGNORECASE)
      raw = statement.group(1) if statement else None
  if raw is None:
    return None
  s = _normalise_math(raw)
  if not s:
    return None
  value = _to_fraction(s)
  if value is not None:
    if value.denominator == 1:
      return str(value.numerator)
    as_float = float(value)
    return repr(as_float) if Fraction(repr(as_float)) == value else f"{value.numerator}/{value.denominator}"
  return s


def numbers_equivalent(predicted: str | None, reference: Any, *, rel_tol: float = 1e-6) -> bool:
  """Both parse to numbers within `rel_tol` relative tolerance, or their normalised texts are equal."""
  if predicted is None or reference is None:
    return False
  a, b = _normalise_math(predicted), _normalise_math(str(reference))
  if not a or not b:
    return False
  va, vb = _to_fraction(a), _to_fraction(b)
  if va is not None and vb is not None:
    return math.isclose(float(va), float(vb), rel_tol=rel_tol, abs_tol=0.0)
  return a.replace(" ", "") == b.replace(" ", "")


# ---------------------------------------------------------------------------------------------
# Rewards: fn(completion, example) -> float
# ---------------------------------------------------------------------------------------------

@register("reward", "mcqa_accuracy")
def mcqa_accuracy(completion: str, example: Mapping, *, think_in_prompt: bool | None = None) -> float:
  """1.0 when the chosen option (`extract_choice`, option texts from example["options"]) is example["answer"]."""
  choice = extract_choice_from(completion, example, think_in_prompt=think_in_prompt)
  return float(choice is not None and choice == str(example["answer"]).strip().upper())


@register("reward", "format")
def format_reward(completion: str, example: Mapping, *, think_in_prompt: bool | None = None) -> float:
  """1.0 when the completion is exactly <think>...</think><answer>...</answer> (`split_response`)."""
  return float(split_response(completion, think_in_prompt=_think_in_prompt(example, think_in_prompt)).format_ok)


@register("reward", "answer_leak")
def answer_leak(completion: str, example: Mapping, *, think_in_prompt: bool | None = None) -> float:
  """1.0 when the reasoning reveals the final answer (`detect_answer_leak`); a diagnostic (weight 0)."""
  return float(detect_answer_leak(completion, example, think_in_prompt=think_in_prompt))


@register("reward", "math_equivalence")
def math_equivalence(completion: str, example: Mapping, *, think_in_prompt: bool | None = None) -> float:
  """1.0 when `extract_number` of the completion equals example["answer"] numerically (rel tol 1e-6)."""
  predicted = extract_number(completion, think_in_prompt=_think_in_prompt(example, think_in_prompt))
  return float(numbers_equivalent(predicted, example["answer"]))


@register("reward", "medrlvr")
def medrlvr_reward(completion: str, example: Mapping, *, think_in_prompt: bool | None = None) -> float:
  """Med-RLVR: -1 when the format is broken, else 1 for the correct option and 0 for a wrong one."""
  if not format_reward(completion, example, think_in_prompt=think_in_prompt):
    return -1.0
  return mcqa_accuracy(completion, example, think_in_prompt=think_in_prompt)


@register("reward", "xreasoner")
def xreasoner_reward(completion: str, example: Mapping, *, think_in_prompt: bool | None = None) -> float:
  """X-Reasoner: 0/1 answer correctness (math equivalence when example["kind"] == "math", else MCQA)."""
  if example.get("kind") == "math":
    return math_equivalence(completion, example, think_in_prompt=think_in_prompt)
  return mcqa_accuracy(completion, example, think_in_prompt=think_in_prompt)


def response_stats(completion: str, example: Mapping, *, think_in_prompt: bool | None = None) -> dict[str, float]:
  """Training-dynamics figures of one completion, all floats.

  correct (X-Reasoner's answer reward: MCQA, or math when example["kind"] == "math"),
  format_ok, leak (`detect_answer_leak`), think_chars (characters of the stripped
  reasoning, 0 without one), response_chars (characters of the whole completion).
  """
  tip = _think_in_prompt(example, think_in_prompt)
  parts = split_response(completion, think_in_prompt=tip)
  return {
    "correct": xreasoner_reward(completion, example, think_in_prompt=tip),
    "format_ok": float(parts.format_ok),
    "leak": float(detect_answer_leak(completion, example, think_in_prompt=tip)),
    "think_chars": float(len(parts.think.strip())) if parts.think is not None else 0.0,
    "response_chars": float(len(completion)),
  }


# ---------------------------------------------------------------------------------------------
# Advantages: fn(rewards [P, G], *, eps) -> [P, G]; one row per prompt, G samples each
# ---------------------------------------------------------------------------------------------

@register("advantage", "grpo")
def grpo_advantage(rewards: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """GRPO (DeepSeekMath): A_i = (r_i - mean_g r) / (std_g r + eps), std with ddof=1 (TRL's torch.std).

  A group of one has no baseline: its advantage is 0.
  """
  r = jnp.asarray(rewards, jnp.float32)
  if r.shape[-1] < 2:
    return jnp.zeros_like(r)
  centred = r - r.mean(-1, keepdims=True)
  return centred / (r.std(-1, ddof=1, keepdims=True) + eps)


@register("advantage", "drgrpo")
def drgrpo_advantage(rewards: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """Dr. GRPO (Liu et al., "Understanding R1-Zero-like training"): A_i = r_i - mean_g r, no std division."""
  del eps
  r = jnp.asarray(rewards, jnp.float32)
  return r - r.mean(-1, keepdims=True)


@register("advantage", "rloo")
def rloo_advantage(rewards: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """RLOO (Ahmadian et al.; Kool et al.): A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g r); G=1 -> 0."""
  del eps
  r = jnp.asarray(rewards, jnp.float32)
  g = r.shape[-1]
  if g < 2:
    return jnp.zeros_like(r)
  # The G/(G-1) form: an equal group gives exactly 0 (r - (sum - r)/(G-1) leaves rounding residue).
  return (r - r.mean(-1, keepdims=True)) * (g / (g - 1))


def zero_variance_groups(rewards: jax.Array, tol: float = 1e-6) -> jax.Array:
  """bool [P]: every reward of the group is equal (within tol) — no learning signal; DAPO drops these."""
  r = jnp.asarray(rewards, jnp.float32)
  return (r.max(-1) - r.min(-1)) <= tol


# ---------------------------------------------------------------------------------------------
# Policy loss: fn(logp, old_logp, advantages, *, eps_low, eps_high, dual_clip) -> (loss, clipped)
# ---------------------------------------------------------------------------------------------

# exp() of a log-ratio beyond this overflows nothing and is clipped anyway (verl clamps the same way);
# the clamp keeps garbage log-probs at padded positions from turning masked sums into NaN gradients.
_MAX_LOG_RATIO = 20.0


@register("policy_loss", "ppo_clip")
def ppo_clip(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *, eps_low: float = 0.2,
             eps_high: float = 0.2, dual_clip: float | None = None) -> tuple[jax.Array, jax.Array]:
  """PPO's clipped surrogate per token, with DAPO's clip-higher and optional dual clip.

  ratio = exp(logp - old_logp);  loss = max(-ratio*A, -clip(ratio, 1-eps_low, 1+eps_high)*A)
  (= -min(ratio*A, clip(...)*A), Schulman et al. 2017; separate eps_low / eps_high are
  DAPO's "clip-higher"). Dual clip (Ye et al. 2020, as in verl): for A < 0 the loss is
  further capped at dual_clip*|A| (dual_clip > 1), bounding the step when the ratio explodes.
  `clipped` marks tokens whose gradient the clipping zeroes: ratio > 1+eps_high with A > 0,
  ratio < 1-eps_low with A < 0, or ratio > dual_clip with A < 0.
  """
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1 (e.g. 3.0) or None, got {dual_clip}")
  log_ratio = jnp.clip(logp.astype(jnp.float32) - old_logp.astype(jnp.float32), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  a = advantages.astype(jnp.float32)
  loss = jnp.maximum(-ratio * a, -jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a)
  clipped = ((a > 0) & (ratio > 1.0 + eps_high)) | ((a < 0) & (ratio < 1.0 - eps_low))
  if dual_clip is not None:
    dual = (a < 0) & (loss > -dual_clip * a)
    loss = jnp.where(a < 0, jnp.minimum(loss, -dual_clip * a), loss)
    clipped = clipped | dual
  return loss, clipped


# ---------------------------------------------------------------------------------------------
# Aggregation: fn(per_token [B, T], mask [B, T], *, max_len) -> (loss_sum, weight); loss = sum / weight
# ---------------------------------------------------------------------------------------------

def _masked(per_token: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  m = mask.astype(jnp.float32)
  # where(), not a product alone: a NaN/inf at a padded position must not reach the sum.
  return jnp.where(m > 0, per_token.astype(jnp.float32) * m, 0.0), m


@register("aggregation", "token-mean")
def token_mean(per_token: jax.Array, mask: jax.Array, *, max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Every valid token of the batch weighs the same: (sum l*m, sum m). DAPO; TRL's "dapo" / "bnpo"."""
  del max_len
  lm, m = _masked(per_token, mask)
  return lm.sum(), m.sum()


@register("aggregation", "seq-mean-token-mean")
def seq_mean_token_mean(per_token: jax.Array, mask: jax.Array, *,
                        max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Each sequence's token mean, averaged over sequences (GRPO paper; TRL's "grpo").

  (sum_b [sum_t l*m / max(sum_t m, 1)], number of rows with at least one valid token).
  """
  del max_len
  lm, m = _masked(per_token, mask)
  tokens = m.sum(-1)
  return (lm.sum(-1) / jnp.maximum(tokens, 1.0)).sum(), (tokens > 0).sum().astype(jnp.float32)


@register("aggregation", "seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(per_token: jax.Array, mask: jax.Array, *,
                            max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Dr. GRPO: token sums divided by a constant, the generation budget, then averaged over sequences.

  (sum l*m / max_len, number of rows with at least one valid token); no length bias,
  since no per-sequence length enters. `max_len` is required (the max new tokens).
  Rows without a valid token are padding rows, not samples, so they do not count.
  """
  if max_len is None or max_len <= 0:
    raise ValueError(f"seq-mean-token-sum-norm needs max_len > 0 (the generation budget, max new tokens), "
                     f"got {max_len}")
  lm, m = _masked(per_token, mask)
  return lm.sum() / max_len, (m.sum(-1) > 0).sum().astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# KL to the reference policy, per token (Schulman, "Approximating KL divergence", 2020)
# ---------------------------------------------------------------------------------------------

@register("kl", "k1")
def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k1 = log pi(x) - log ref(x): unbiased for KL(pi || ref) under x ~ pi, high variance, can be negative."""
  return logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)


@register("kl", "k2")
def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k2 = (log pi - log ref)^2 / 2: biased, low variance, >= 0; its gradient is that of the KL's second order."""
  d = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
  return 0.5 * d * d


@register("kl", "k3")
def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k3 = exp(log ref - log pi) - (log ref - log pi) - 1: unbiased, >= 0, ~ k1^2/2 near 0 (GRPO's KL term).

  Computed as expm1(d) - d: exp(d) - 1 in fp32 loses about 1e-2 of the value at |d| ~ 3e-3
  (policy and reference agree to that much for most tokens). The log-ratio is clamped to
  +-20 so a padded position cannot overflow exp().
  """
  d = jnp.clip(ref_logp.astype(jnp.float32) - logp.astype(jnp.float32), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  return jnp.expm1(d) - d


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of each next-token distribution, [B, T, V] -> [B, T], in fp32 from log_softmax.

  H = -sum_v p_v log p_v; vocabulary entries with -inf logits (masked) contribute 0.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  return -jnp.where(p > 0, p * logp, 0.0).sum(-1)
