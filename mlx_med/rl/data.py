"""Medical multiple-choice QA data: one example type, loaders for the public formats, prompt templates.

Reinforcement learning with verifiable rewards needs questions whose answer a program can check;
multiple-choice QA gives that for free (the reward compares one letter). This module reads local
files in the layouts the public datasets ship, so a user can point a run at a real file:

  medqa     MedQA-USMLE JSONL from the MedQA release (US/4_options/*.jsonl and the 5-option
            US/*.jsonl; the same keys on the Hugging Face copies): question, options {"A": ..},
            answer_idx (the letter), answer (the option text; optional, checked against options),
            meta_info (e.g. "step1"; becomes the category).
  medmcqa   MedMCQA rows: id, question, opa, opb, opc, opd, cop, choice_type, exp, subject_name,
            topic_name. `cop` is 1-based (1..4 = a..d) in the original release JSON lines and on
            lighteval/med_mcqa, but 0-based (ClassLabel a..d = 0..3) in the openlifescienceai/medmcqa
            parquet. `cop_base=None` (default) detects it per file: a 0 anywhere means 0-based, a 4
            anywhere means 1-based, both is an error, neither (only 1..3 seen) is ambiguous and asks
            for an explicit `cop_base`. The test split has no answers (cop -1 or absent): an error.
  mmlu_pro  MMLU-Pro rows (JSONL or the Hugging Face parquet): question_id, question, options (a list
            of up to 10), answer (the letter), answer_index, cot_content, category, src. The health
            subset is category == "health" (`health_only=True`, the default).

Every loader also reads a parquet file (suffix .parquet) with the same columns. A bad row raises
DataFormatError with one line "<file>:<line>: <what is wrong>; <how to fix it>" (for parquet the
number is the 1-based row). Messages name keys and types, never the row's text: medical questions
can read like patient records.

Prompt templates return chat messages; options are listed "A. text", one per line:
  medrlvr    the R1-Zero-style system prompt Med-RLVR trains with: reason inside <think></think>, then
             give the option letter inside <answer></answer>.
  xreasoner  X-Reasoner's single user turn: the instruction (thoughts in <think></think>, then one of
             the options in <answer></answer>), the question and the options.
  plain      question, options and "Answer:".
The wording is the project's own paraphrase of the papers' templates, not a verbatim copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

LETTERS = "ABCDEFGHIJ"
FORMATS = ("medqa", "medmcqa", "mmlu_pro", "synthetic_jsonl")
TEMPLATES = ("medrlvr", "xreasoner", "plain")
MMLU_PRO_HEALTH = "health"


class DataFormatError(ValueError):
  """A bad data file. The message is one line: "<file>:<line>: <what is wrong>; <how to fix it>"."""


@dataclasses.dataclass(frozen=True)
class MCQAExample:
  """One multiple-choice question.

  Attributes:
    id: identifier (the dataset's own id when it has one, else "<file stem>-<line>").
    question: the question stem.
    options: ordered {"A": text, "B": text, ...}, letters consecutive from A.
    answer: the correct letter (a key of `options`).
    category: subject (MedMCQA), MMLU-Pro category, MedQA meta_info, or the synthetic question type.
    meta: free-form extras, e.g. {"source": "medqa", "hops": 2}.
  """

  id: str
  question: str
  options: dict[str, str]
  answer: str
  category: str = ""
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self) -> None:
    if not self.options:
      raise ValueError(f"example {self.id!r}: options are empty; give at least two options")
    letters = "".join(self.options)
    if letters != LETTERS[:len(letters)]:
      raise ValueError(f"example {self.id!r}: option letters must be consecutive from A, got {letters!r}")
    if self.answer not in self.options:
      raise ValueError(f"example {self.id!r}: answer {self.answer!r} is not one of the option letters {letters}")

  @property
  def letters(self) -> str:
    return "".join(self.options)

  def to_dict(self) -> dict:
    """The plain mapping reward functions receive as `example`."""
    return {"id": self.id, "question": self.question, "options": dict(self.options), "answer": self.answer,
            "category": self.category, "meta": dict(self.meta)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> MCQAExample:
    return cls(id=str(d["id"]), question=str(d["question"]), options=dict(d["options"]), answer=str(d["answer"]),
               category=str(d.get("category", "")), meta=dict(d.get("meta") or {}))


# ------------------------------------------------------------------------------------ reading rows


def _fail(path: Path | str, line: int, problem: str, fix: str) -> DataFormatError:
  return DataFormatError(f"{path}:{line}: {problem}; {fix}")


def _short(value: Any) -> str:
  """A value safe to quote in an error: short scalars only (never question or option text)."""
  if isinstance(value, bool) or value is None or isinstance(value, int | float):
    return repr(value)
  if isinstance(value, str) and len(value) <= 3:
    return repr(value)
  return f"a {type(value).__name__}"


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _read_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
  """Yields (line number, record) from a JSONL or parquet file; blank JSONL lines are skipped."""
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{p}: no such file; pass the path of a local data file")
  records = 0
  if p.suffix == ".parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
      table = pq.read_table(p)
    except (pa.ArrowException, OSError) as e:
      raise _fail(p, 1, f"not a readable parquet file ({type(e).__name__})", "re-export the file as parquet or JSONL") from None
    for n, row in enumerate(table.to_pylist(), start=1):
      records += 1
      yield n, row
  else:
    with open(p, encoding="utf-8") as f:
      for n, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        try:
          row = json.loads(raw)
        except json.JSONDecodeError as e:
          raise _fail(p, n, f"invalid JSON ({e.msg} at column {e.colno})",
                      "each line must be one complete JSON object (JSON Lines)") from None
        if not isinstance(row, dict):
          raise _fail(p, n, f"expected a JSON object, got {_type_name(row)}", "each line must be one JSON object")
        records += 1
        yield n, row
  if records == 0:
    raise _fail(p, 1, "no records (the file is empty)", "point at a non-empty JSONL or parquet file")


def _need(row: Mapping, key: str, path: Path | str, n: int, kind: type | tuple[type, ...], hint: str) -> Any:
  if key not in row:
    raise _fail(path, n, f"missing key '{key}'", hint)
  value = row[key]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
    raise _fail(path, n, f"'{key}' must be {want}, got {_type_name(value)}", hint)
  return value


def _need_text(row: Mapping, key: str, path: Path | str, n: int, hint: str) -> str:
  value = _need(row, key, path, n, str, hint)
  if not value.strip():
    raise _fail(path, n, f"'{key}' is empty", hint)
  return value


def _checked_options(options: Any, path: Path | str, n: int, key: str = "options") -> dict[str, str]:
  """Validates a MedQA-style {letter: text} mapping and returns it in letter order."""
  hint = f"'{key}' must map consecutive letters A, B, ... to option texts"
  if not isinstance(options, dict):
    raise _fail(path, n, f"'{key}' must be an object, got {_type_name(options)}", hint)
  if not options:
    raise _fail(path, n, f"'{key}' is empty", hint)
  # A parquet struct column fills the letters a row lacks (a 4-option row in a 5-option file) with null.
  present = {k: v for k, v in options.items() if v is not None}
  letters = "".join(sorted(present))
  if any(len(k) != 1 for k in present) or letters != LETTERS[:len(letters)] or not letters:
    raise _fail(path, n, f"'{key}' keys are {sorted(present)[:10]}, not consecutive letters from A", hint)
  for k in letters:
    if not isinstance(present[k], str):
      raise _fail(path, n, f"option '{k}' must be a string, got {_type_name(present[k])}", hint)
  if len(letters) < 2:
    raise _fail(path, n, f"'{key}' has a single option", "a multiple-choice question needs two or more options")
  return {k: present[k] for k in letters}


def _check_answer_letter(letter: Any, options: Mapping[str, str], key: str, path: Path | str, n: int) -> str:
  if not isinstance(letter, str):
    raise _fail(path, n, f"'{key}' must be a letter string, got {_type_name(letter)}", "store the correct option's letter")
  letter = letter.strip().upper()
  if letter not in options:
    raise _fail(path, n, f"'{key}' {_short(letter)} is not one of the option letters {''.join(options)}",
                "store the letter of an existing option")
  return letter


# ---------------------------------------------------------------------------------------- loaders


def _load_medqa_like(path: str | os.PathLike, source: str, check_answer_text: bool) -> list[MCQAExample]:
  stem = Path(path).stem
  hint = "MedQA rows need question, options {\"A\": ...}, answer_idx"
  out = []
  for n, row in _read_rows(path):
    question = _need_text(row, "question", path, n, hint)
    if "options" not in row:
      raise _fail(path, n, "missing key 'options'", hint)
    options = _checked_options(row["options"], path, n)
    if "answer_idx" not in row:
      raise _fail(path, n, "missing key 'answer_idx'", hint)
    answer = _check_answer_letter(row["answer_idx"], options, "answer_idx", path, n)
    text = row.get("answer")
    if check_answer_text and text is not None:
      if not isinstance(text, str):
        raise _fail(path, n, f"'answer' must be the option text, got {_type_name(text)}", "store options[answer_idx] or drop the key")
      if text.strip() != options[answer].strip():
        raise _fail(path, n, f"'answer' text differs from options[{answer!r}]",
                    "fix answer_idx or answer, or load with check_answer_text=False")
    meta: dict = {"source": source}
    if source == "synthetic":
      stored = row.get("meta")
      if stored is not None and not isinstance(stored, dict):
        raise _fail(path, n, f"'meta' must be an object, got {_type_name(stored)}", "write the file with write_jsonl")
      meta = dict(stored or {"source": source})
      category = row.get("category", row.get("meta_info", ""))
    else:
      category = row.get("meta_info", "")
      if not isinstance(category, str):
        category = ""
    ex_id = row.get("id")
    out.append(MCQAExample(id=str(ex_id) if isinstance(ex_id, str | int) and not isinstance(ex_id, bool) else f"{stem}-{n}",
                           question=question, options=options, answer=answer, category=str(category), meta=meta))
  return out


def load_medqa(path: str | os.PathLike, *, check_answer_text: bool = True) -> list[MCQAExample]:
  """MedQA-USMLE JSONL (4- or 5-option): question, options {A..}, answer_idx; `answer` text checked when present."""
  return _load_medqa_like(path, "medqa", check_answer_text)


def load_synthetic_jsonl(path: str | os.PathLike) -> list[MCQAExample]:
  """A file written by `write_jsonl`: MedQA keys plus id, category and meta, all restored."""
  return _load_medqa_like(path, "synthetic", True)


_MEDMCQA_OPTION_KEYS = ("opa", "opb", "opc", "opd")


def load_medmcqa(path: str | os.PathLike, *, cop_base: int | None = None) -> list[MCQAExample]:
  """MedMCQA rows (JSON lines or parquet): question, opa..opd, cop; subject_name becomes the category.

  Args:
    cop_base: 1 when cop counts 1..4 (original release JSON, lighteval/med_mcqa), 0 when it counts
      0..3 (openlifescienceai/medmcqa parquet); None detects it from the file (see the module doc).
  """
  if cop_base not in (None, 0, 1):
    raise ValueError(f"cop_base must be 0, 1 or None (detect), got {cop_base!r}")
  stem = Path(path).stem
  hint = "MedMCQA rows need question, opa, opb, opc, opd and cop"
  rows = []
  for n, row in _read_rows(path):
    question = _need_text(row, "question", path, n, hint)
    texts = [_need(row, k, path, n, str, hint) for k in _MEDMCQA_OPTION_KEYS]
    if "cop" not in row or row["cop"] is None:
      raise _fail(path, n, "missing key 'cop' (no answer: the MedMCQA test split ships without answers)",
                  "use the train or dev file, which carry the correct option")
    cop = row["cop"]
    if isinstance(cop, str) and cop.strip().lstrip("-").isdigit():
      cop = int(cop)
    if not isinstance(cop, int) or isinstance(cop, bool):
      raise _fail(path, n, f"'cop' must be an integer, got {_type_name(cop)}", "store the correct option's number")
    if cop < 0:
      raise _fail(path, n, f"'cop' is {cop} (unlabelled; the MedMCQA test split ships without answers)",
                  "use the train or dev file, which carry the correct option")
    if cop > 4:
      raise _fail(path, n, f"'cop' {cop} is out of range", "cop counts 1..4 (original JSON) or 0..3 (HF parquet)")
    rows.append((n, row, question, texts, cop))
  base = cop_base
  if base is None:
    has0 = any(r[4] == 0 for r in rows)
    has4 = any(r[4] == 4 for r in rows)
    if has0 and has4:
      first4 = next(r[0] for r in rows if r[4] == 4)
      raise _fail(path, first4, "'cop' takes both 0 and 4 in this file, so it is neither 0-based nor 1-based",
                  "fix the file so cop counts 1..4 or 0..3 throughout")
    if not has0 and not has4:
      raise _fail(path, rows[0][0], "cannot tell whether 'cop' counts from 0 or 1 (only values 1..3 occur)",
                  "pass cop_base=1 (original release JSON, lighteval) or cop_base=0 (openlifescienceai parquet)")
    base = 0 if has0 else 1
  out = []
  for n, row, question, texts, cop in rows:
    idx = cop - base
    if not 0 <= idx < 4:
      raise _fail(path, n, f"'cop' {cop} is out of range for cop_base={base}",
                  f"cop must be in {base}..{base + 3}; pass the other cop_base if the file counts differently")
    options = dict(zip(LETTERS, texts))
    subject = row.get("subject_name")
    meta = {"source": "medmcqa"}
    for key in ("topic_name", "choice_type"):
      if isinstance(row.get(key), str):
        meta[key] = row[key]
    ex_id = row.get("id")
    out.append(MCQAExample(id=str(ex_id) if isinstance(ex_id, str) and ex_id else f"{stem}-{n}", question=question,
                           options=options, answer=LETTERS[idx], category=subject if isinstance(subject, str) else "",
                           meta=meta))
  return out


def load_mmlu_pro(path: str | os.PathLike, *, health_only: bool = True) -> list[MCQAExample]:
  """MMLU-Pro rows (JSONL or the HF parquet); `health_only` keeps category == "health".

  Every row is validated, including those the filter drops: a bad file is bad whatever the subset.
  """
  stem = Path(path).stem
  hint = "MMLU-Pro rows need question, options (a list), answer (a letter) or answer_index, and category"
  out = []
  categories: set[str] = set()
  for n, row in _read_rows(path):
    question = _need_text(row, "question", path, n, hint)
    options_list = _need(row, "options", path, n, list, hint)
    if not options_list:
      raise _fail(path, n, "'options' is empty", "give the list of option texts")
    if len(options_list) > len(LETTERS):
      raise _fail(path, n, f"'options' has {len(options_list)} entries, more than {len(LETTERS)}", "MMLU-Pro has at most 10 options")
    for i, text in enumerate(options_list):
      if not isinstance(text, str):
        raise _fail(path, n, f"options[{i}] must be a string, got {_type_name(text)}", hint)
    options = dict(zip(LETTERS, options_list))
    category = _need(row, "category", path, n, str, hint)
    letter = None
    if row.get("answer") is not None:
      letter = _check_answer_letter(row["answer"], options, "answer", path, n)
    index = row.get("answer_index")
    if index is not None:
      if not isinstance(index, int) or isinstance(index, bool):
        raise _fail(path, n, f"'answer_index' must be an integer, got {_type_name(index)}", hint)
      if not 0 <= index < len(options):
        raise _fail(path, n, f"'answer_index' {index} is outside 0..{len(options) - 1}", "store the 0-based index of the correct option")
      if letter is not None and LETTERS[index] != letter:
        raise _fail(path, n, f"'answer' {letter!r} disagrees with 'answer_index' {index}", "make the letter and the index name the same option")
      letter = LETTERS[index]
    if letter is None:
      raise _fail(path, n, "missing key 'answer' (and 'answer_index')", hint)
    categories.add(category)
    if health_only and category.strip().lower() != MMLU_PRO_HEALTH:
      continue
    meta: dict = {"source": "mmlu_pro"}
    if isinstance(row.get("src"), str):
      meta["src"] = row["src"]
    if isinstance(row.get("cot_content"), str) and row["cot_content"]:
      meta["cot_content"] = row["cot_content"]
    qid = row.get("question_id")
    out.append(MCQAExample(id=str(qid) if isinstance(qid, str | int) and not isinstance(qid, bool) else f"{stem}-{n}",
                           question=question, options=options, answer=letter, category=category, meta=meta))
  if not out:
    found = ", ".join(sorted(categories)[:20])
    raise DataFormatError(f"{path}: no rows with category '{MMLU_PRO_HEALTH}' (categories found: {found}); "
                          "load with health_only=False for every category")
  return out


def load_mcqa(fmt: str, path: str | os.PathLike, **kw: Any) -> list[MCQAExample]:
  """Dispatches on `fmt` (one of FORMATS); keyword arguments go to the format's loader."""
  loaders = {"medqa": load_medqa, "medmcqa": load_medmcqa, "mmlu_pro": load_mmlu_pro,
             "synthetic_jsonl": load_synthetic_jsonl}
  if fmt not in loaders:
    raise ValueError(f"unknown MCQA format {fmt!r}; known: {', '.join(FORMATS)}")
  return loaders[fmt](path, **kw)


def write_jsonl(examples: Iterable[MCQAExample], path: str | os.PathLike) -> str:
  """Writes MedQA-style JSONL (plus id, category, meta) under a temporary name, then renames.

  `load_medqa` reads the result as MedQA; `load_synthetic_jsonl` restores every field.
  """
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for ex in examples:
        row = {"id": ex.id, "question": ex.question, "answer": ex.options[ex.answer], "options": ex.options,
               "meta_info": ex.category, "answer_idx": ex.answer, "category": ex.category, "meta": ex.meta}
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
  finally:
    if tmp.exists():
      tmp.unlink()
  return str(p)


# ---------------------------------------------------------------------------------- prompt templates

MEDRLVR_SYSTEM = (
    "A conversation between a user and an assistant. The user asks a multiple-choice medical question and the "
    "assistant answers it. The assistant first reasons about the question step by step, then gives the answer. "
    "The reasoning goes inside <think> </think> tags and the answer inside <answer> </answer> tags, i.e. "
    "<think> reasoning here </think> <answer> option letter here </answer>. The answer is only the letter of "
    "the chosen option.")

XREASONER_INSTRUCTION = (
    "Put your thoughts inside <think> </think> tags, then answer with exactly one of the options below inside "
    "<answer> </answer> tags, for example <think>...</think> <answer>B</answer>. The question is:")


def format_options(options: Mapping[str, str]) -> str:
  """"A. text" lines, one per option."""
  return "\n".join(f"{k}. {v}" for k, v in options.items())


def _example(example: MCQAExample | Mapping[str, Any]) -> MCQAExample:
  return example if isinstance(example, MCQAExample) else MCQAExample.from_dict(example)


def build_messages(example: MCQAExample | Mapping[str, Any], template: str = "medrlvr") -> list[dict]:
  """Chat messages for one question under a template (one of TEMPLATES)."""
  ex = _example(example)
  body = f"{ex.question.strip()}\n{format_options(ex.options)}"
  if template == "medrlvr":
    return [{"role": "system", "content": MEDRLVR_SYSTEM}, {"role": "user", "content": body}]
  if template == "xreasoner":
    return [{"role": "user", "content": f"{XREASONER_INSTRUCTION}\n{body}"}]
  if template == "plain":
    return [{"role": "user", "content": f"{body}\nAnswer:"}]
  raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")


def examples_from_dicts(rows: Sequence[Mapping[str, Any]]) -> list[MCQAExample]:
  """MCQAExample objects from `to_dict` mappings (e.g. read back from a config or a JSON report)."""
  return [MCQAExample.from_dict(r) for r in rows]
