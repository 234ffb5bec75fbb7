"""Multimodal multiple-choice evaluation: MMMU / OmniMedVQA / V* files, X-Reasoner prompt, forced exit.

What lmms-eval and VLMEvalKit users expect from a local harness, on files already on disk
(nothing is downloaded):

* Loaders (`load_mcqa(format, path)`) turn three local layouts into `MCQAItem`s:
  - "mmmu": the Hugging Face export of MMMU (parquet, JSON or JSONL; a file or a folder of
    them, e.g. one folder per subject): id, question with `<image k>` placeholders, options
    as a list or its string repr ("['a', 'b']"), answer letter, image_1..image_7 (HF image
    structs {"bytes", "path"}, raw bytes, or paths relative to the file), subfield,
    question_type. The subject is read from the id ("validation_Art_Theory_12" ->
    "Art_Theory"), else the subfield. Open (non-multiple-choice) questions are skipped and
    counted (`last_skipped`); their scoring needs another parser.
  - "omnimedvqa": the release's QA JSON files (one list per source dataset, under
    QA_information/ of the root): question, option_A..option_D, gt_answer (the option's
    text), image_path relative to the root, modality_type, dataset, question_type. The
    answer letter is the option whose text equals gt_answer; the subject is the dataset.
  - "vstar": a V* bench folder via `mlx_med.vlm.vstar.read_vstar_folder` (subject = its
    question category).
  Malformed files raise `MCQAFormatError` with one line "<file>[:<row>]: what; how to fix".
* `evaluate_mcqa(client, items, ...)` asks any `mlx_med.llm.client.LLMClient` (a local VLM, an
  `mlx-med serve` endpoint, any OpenAI-compatible multimodal server) with the X-Reasoner
  prompt of `mlx_med.rl.data` (think in <think></think>, answer a letter in
  <answer></answer>), images interleaved where the question's `<image k>` placeholders stand
  (unreferenced images first). Scoring, accuracy per subject with 95% Wilson intervals and the
  format-failure rate come from `mlx_med.rl.evaluate.evaluate` and `mlx_med.rl.functions`, so
  "correct" means what the RL rewards mean by it.
* Forced exit (X-Reasoner's think budget N). In process (a `LocalClient`: its model's sampler
  takes the budget) the sampler forces "</think>" after N generated tokens and the model goes
  on to its answer in one pass, as `mlx_med.rl.evaluate.local_generator` does; a client whose
  `chat` takes a `think_budget` argument is given it. Otherwise (remote
  endpoints, which cannot portably continue a cut assistant message) a two-pass forced exit:
  pass 1 generates at most N tokens; a completion cut by that limit gets "</think>" appended
  (when its thought is still open) and goes back as the assistant's turn, followed by a user
  turn asking for the final answer only (`FORCED_EXIT_PROMPT`), with the rest of the token
  budget. The scored text is pass 1 + "</think>" + the answer block of pass 2 (its own
  <think> block, if it writes one, is dropped), so the thought seen by the scorer is exactly
  the budgeted one. This is the portable approximation of a prefilled continuation; rows
  record whether they were forced.
* `eval_command` is `mlx-med vlm eval --model HFDIR|URL --data FORMAT:PATH [--think-budget N]`:
  writes report.json (with rows) and table.md (overall and per subject) atomically.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("mlx_med.vlm.mcqa")

FORMATS = ("mmmu", "omnimedvqa", "vstar")
LETTERS = "ABCDEFGHIJ"
MMMU_IMAGE_KEYS = tuple(f"image_{k}" for k in range(1, 8))
FORCED_EXIT_PROMPT = ("Your thinking time is over. Give your final answer now, only the letter of one option inside "
                      "<answer> </answer> tags.")
_PLACEHOLDER_RE = re.compile(r"<image\s*(\d+)>")
_MMMU_ID_RE = re.compile(r"^(?:dev|validation|val|test)_(.+)_\d+$")

last_skipped: dict[str, int] = {}  # what the last load skipped (e.g. {"open": 12}); informational


class MCQAFormatError(ValueError):
  """A malformed data file; the message is one line naming the file and how to fix it."""


@dataclasses.dataclass
class MCQAItem:
  """One multimodal multiple-choice question.

  images: image paths (str / Path) or uint8 arrays [H, W, 3], in the order the question's
  `<image k>` placeholders number them (images[k - 1] is `<image k>`).
  options: option texts, lettered A, B, ... in order. answer: the correct letter.
  subject: what accuracy is broken down by (MMMU subject, OmniMedVQA dataset, V* category).
  """

  id: str
  images: list[Any]
  question: str
  options: list[str]
  answer: str
  subject: str = ""
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self) -> None:
    if not 2 <= len(self.options) <= len(LETTERS):
      raise ValueError(f"item {self.id!r}: needs 2..{len(LETTERS)} options, got {len(self.options)}")
    letters = LETTERS[:len(self.options)]
    if self.answer not in letters:
      raise ValueError(f"item {self.id!r}: answer {self.answer!r} is not one of the option letters {letters}")

  @property
  def option_map(self) -> dict[str, str]:
    return {LETTERS[i]: str(o) for i, o in enumerate(self.options)}

  def to_example(self):
    """The text-only `mlx_med.rl.data.MCQAExample` (what the prompt templates and scorers take)."""
    from mlx_med.rl.data import MCQAExample
    return MCQAExample(id=self.id, question=self.question, options=self.option_map, answer=self.answer,
                       category=self.subject, meta={"num_images": len(self.images)})


# ------------------------------------------------------------------------------------------- loaders


def _fail(path: Any, row: int | None, problem: str, fix: str) -> MCQAFormatError:
  where = f"{path}:{row}" if row is not None else f"{path}"
  return MCQAFormatError(f"{where}: {problem}; {fix}")


def _read_records(path: Path) -> list[dict]:
  """Rows of a parquet, JSON (a list, or {"data": [...]}) or JSONL file."""
  if path.suffix == ".parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
      return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
      raise _fail(path, None, f"not a readable parquet file ({type(e).__name__})",
                  "re-export it as parquet, JSON or JSONL") from None
  text = path.read_text(encoding="utf-8")
  if path.suffix == ".jsonl":
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise _fail(path, n, f"invalid JSON ({e.msg})", "each line must be one JSON object") from None
      if not isinstance(row, dict):
        raise _fail(path, n, f"expected a JSON object, got {type(row).__name__}", "each line must be one JSON object")
      rows.append(row)
    return rows
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise _fail(path, e.lineno, f"invalid JSON ({e.msg})", "the file must be a JSON list of question objects") from None
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
    raise _fail(path, None, "expected a JSON list of objects", "the file must be a JSON list of question objects")
  return data


def _data_files(path: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
  if path.is_file():
    return [path]
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or directory; pass a local {what} file or folder")
  files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes and not p.name.startswith("."))
  if not files:
    raise _fail(path, None, f"no {'/'.join(suffixes)} files found", f"point at a {what} file or a folder holding them")
  return files


def _decode_image(value: Any, base: Path, path: Path, row: int, key: str) -> Any:
  """An MMMU image cell -> a uint8 array (embedded bytes) or a path (files next to the data)."""
  if isinstance(value, dict):
    if value.get("bytes"):
      value = value["bytes"]
    elif value.get("path"):
      value = value["path"]
    else:
      return None
  if isinstance(value, (bytes, bytearray)):
    from mlx_med.vlm.messages import ImageInputError, decode_image_bytes
    try:
      return decode_image_bytes(bytes(value), source=f"{path}:{row} {key}")
    except ImageInputError as e:
      raise MCQAFormatError(str(e)) from None
  if isinstance(value, str):
    p = Path(value) if os.path.isabs(value) else base / value
    if not p.is_file():
      raise _fail(path, row, f"{key} names {value!r}, which does not exist under {base}",
                  "keep the images next to the data file or store them as bytes")
    return str(p)
  raise _fail(path, row, f"{key} has a {type(value).__name__}", "give image bytes, an HF image struct or a path")


def _parse_options(value: Any, path: Path, row: int) -> list[str]:
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      raise _fail(path, row, "options is a string that is not a list literal",
                  "give options as a list or its repr, e.g. \"['first', 'second']\"") from None
  if not isinstance(value, (list, tuple)) or not all(isinstance(o, (str, int, float)) for o in value):
    raise _fail(path, row, "options must be a list of texts", "give options as a list, e.g. [\"first\", \"second\"]")
  return [str(o) for o in value]


def load_mmmu(path: str | os.PathLike, *, keep_open: bool = False) -> list[MCQAItem]:
  """MMMU's Hugging Face export (see the module docstring). Open questions are skipped (counted)."""
  items: list[MCQAItem] = []
  skipped = 0
  for file in _data_files(Path(path), (".parquet", ".json", ".jsonl"), "MMMU"):
    base = file.parent
    for n, row in enumerate(_read_records(file), 1):
      for key in ("id", "question", "options", "answer"):
        if key not in row or row[key] is None:
          raise _fail(file, n, f"missing field {key!r}", "each MMMU row needs id, question, options, answer")
      qtype = str(row.get("question_type") or "multiple-choice")
      options = _parse_options(row["options"], file, n)
      if qtype != "multiple-choice" or not options:
        if keep_open:
          raise _fail(file, n, f"question_type {qtype!r} has no options", "only multiple-choice rows can be scored")
        skipped += 1
        continue
      answer = str(row["answer"]).strip().upper()
      if len(options) > len(LETTERS) or len(answer) != 1 or answer not in LETTERS[:len(options)]:
        raise _fail(file, n, f"answer {row['answer']!r} is not a letter among {len(options)} options",
                    "the answer must be the option's letter (A, B, ...)")
      numbers, images = [], []
      for k, key in enumerate(MMMU_IMAGE_KEYS, 1):
        if row.get(key) is not None:
          img = _decode_image(row[key], base, file, n, key)
          if img is not None:
            numbers.append(k)
            images.append(img)
      if numbers and numbers != list(range(1, len(numbers) + 1)):
        raise _fail(file, n, f"images are numbered {numbers}, not 1..{len(numbers)}",
                    "fill image_1, image_2, ... without gaps")
      text = str(row["question"]) + " " + " ".join(options)
      for k in (int(m) for m in _PLACEHOLDER_RE.findall(text)):
        if k > len(images):
          raise _fail(file, n, f"<image {k}> is referenced but image_{k} is empty", "add the image or fix the text")
      rid = str(row["id"])
      match = _MMMU_ID_RE.match(rid)
      subject = match.group(1) if match else str(row.get("subfield") or "")
      meta = {k: row[k] for k in ("subfield", "topic_difficulty", "img_type", "question_type") if row.get(k)}
      meta["source"] = "mmmu"
      items.append(MCQAItem(rid, images, str(row["question"]), options, answer, subject, meta))
  last_skipped.clear()
  if skipped:
    last_skipped["open"] = skipped
    logger.info("mmmu: skipped %d open (non multiple-choice) questions", skipped)
  return items


def _omni_root(file: Path, image_path: str) -> Path:
  for parent in file.parents:
    if (parent / image_path).is_file():
      return parent
  raise _fail(file, 1, f"image_path {image_path!r} is not found under any folder above the file",
              "keep the release layout (<root>/QA_information/... and <root>/Images/...)")


def load_omnimedvqa(path: str | os.PathLike) -> list[MCQAItem]:
  """OmniMedVQA QA files: the release root (its QA_information/ is searched), a folder of JSON files, or one file."""
  path = Path(path)
  search = path / "QA_information" if path.is_dir() and (path / "QA_information").is_dir() else path
  items: list[MCQAItem] = []
  for file in _data_files(search, (".json",), "OmniMedVQA QA JSON"):
    rows = _read_records(file)
    root = None
    for n, row in enumerate(rows, 1):
      for key in ("question", "gt_answer", "image_path", "option_A", "option_B"):
        if row.get(key) is None:
          raise _fail(file, n, f"missing field {key!r}",
                      "each OmniMedVQA row needs question, gt_answer, image_path and option_A..")
      options = []
      for letter in LETTERS:
        value = row.get(f"option_{letter}")
        if value is None:
          break
        options.append(str(value))
      gt = str(row["gt_answer"]).strip()
      matches = [i for i, o in enumerate(options) if o.strip() == gt]
      if len(matches) != 1:
        raise _fail(file, n, f"gt_answer matches {len(matches)} of the options (need exactly one)",
                    "gt_answer must be the text of one option")
      if root is None:
        root = path if path.is_dir() and (path / str(row["image_path"])).is_file() else _omni_root(file, row["image_path"])
      image = root / str(row["image_path"])
      if not image.is_file():
        raise _fail(file, n, f"image {row['image_path']!r} does not exist under {root}",
                    "keep the release's Images/ folder next to QA_information/")
      subject = str(row.get("dataset") or file.stem)
      meta = {"source": "omnimedvqa", "dataset": subject}
      for key in ("modality_type", "modality", "question_type"):
        if row.get(key):
          meta["modality_type" if key == "modality" else key] = row[key]
      rid = str(row.get("question_id") or f"{file.stem}-{n}")
      items.append(MCQAItem(rid, [str(image)], str(row["question"]), options, LETTERS[matches[0]], subject, meta))
  return items


def load_vstar(path: str | os.PathLike) -> list[MCQAItem]:
  """A V* bench folder through `mlx_med.vlm.vstar.read_vstar_folder`."""
  try:
    from mlx_med.vlm.vstar import read_vstar_folder
  except ImportError:
    raise ValueError("the vstar format needs mlx_med.vlm.vstar.read_vstar_folder, which this install lacks") from None
  if not Path(path).is_dir():
    raise FileNotFoundError(f"{path}: not a directory; pass a V* folder (images + same-stem .json files)")
  items = []
  for ex in read_vstar_folder(str(path), load_images=False):
    image = ex.image_path if ex.image is None else np.asarray(ex.image)
    items.append(MCQAItem(str(ex.id), [image], str(ex.question), [str(o) for o in ex.options],
                          str(ex.answer), str(getattr(ex, "category", "") or ""), {"source": "vstar"}))
  return items


def load_mcqa(format: str, path: str | os.PathLike, **kw: Any) -> list[MCQAItem]:
  """Items from local files in one of FORMATS ("mmmu", "omnimedvqa", "vstar")."""
  loaders: dict[str, Callable[..., list[MCQAItem]]] = {"mmmu": load_mmmu, "omnimedvqa": load_omnimedvqa,
                                                       "vstar": load_vstar}
  if format not in loaders:
    raise ValueError(f"unknown MCQA format {format!r}; choose one of {', '.join(FORMATS)}")
  items = loaders[format](path, **kw)
  if not items:
    raise _fail(path, None, "no multiple-choice questions found", f"check that it is a {format} file or folder")
  seen: set[str] = set()
  for item in items:
    if item.id in seen:
      raise _fail(path, None, f"question id {item.id!r} occurs twice", "ids must be unique")
    seen.add(item.id)
  return items


# ----------------------------------------------------------------------------------------- messages


def _image_part(image: Any) -> dict:
  from mlx_med.vlm.messages import image_part
  return image_part(image)


def interleave(text: str, images: Sequence[Any]) -> list[dict]:
  """OpenAI content parts: `<image k>` placeholders replaced by image k; images never named go first."""
  named = [int(m) for m in _PLACEHOLDER_RE.findall(text)]
  parts: list[dict] = [_image_part(images[k - 1]) for k in range(1, len(images) + 1) if k not in named]
  pos = 0
  for match in _PLACEHOLDER_RE.finditer(text):
    if match.start() > pos:
      parts.append({"type": "text", "text": text[pos:match.start()]})
    k = int(match.group(1))
    if not 1 <= k <= len(images):
      raise ValueError(f"the text names <image {k}> but there are {len(images)} image(s)")
    parts.append(_image_part(images[k - 1]))
    pos = match.end()
  if pos < len(text):
    parts.append({"type": "text", "text": text[pos:]})
  return parts


def build_messages(item: MCQAItem, template: str = "xreasoner") -> list[dict]:
  """Chat messages for one item: `mlx_med.rl.data.build_messages`'s template with the images interleaved."""
  from mlx_med.rl import data as data_lib
  messages = data_lib.build_messages(item.to_example(), template)
  out = [dict(m) for m in messages]
  user = out[-1]
  user["content"] = interleave(str(user["content"]), item.images)
  return out


# ------------------------------------------------------------------------------------- forced exit


def _answer_block(text: str) -> str:
  """Pass 2's answer: its last <answer>...</answer> block when present, else its text after any thought."""
  from mlx_med.rl.functions import split_response
  parts = split_response(text)
  if parts.answer is not None:
    return f"<answer>{parts.answer}</answer>"
  close = text.rfind("</think>")
  return text[close + len("</think>"):].strip() if close >= 0 else text.strip()


def _in_process(client: Any) -> bool:
  """A LocalClient (or alike) whose model's sampler takes a think budget."""
  lm = getattr(client, "lm", None)
  return lm is not None and hasattr(lm, "sampling_params") and hasattr(lm, "generate_tokens")


def _takes_think_budget(client: Any) -> bool:
  if _in_process(client):
    return True
  try:
    return "think_budget" in inspect.signature(client.chat).parameters
  except (TypeError, ValueError):
    return False


def _text_only(messages: list[dict]) -> list[dict]:
  """Content-part lists without images -> plain strings (what text-only chat templates expect)."""
  out = []
  for m in messages:
    content = m.get("content")
    if isinstance(content, list):
      if any(p.get("type") != "text" for p in content):
        raise ValueError("this model is text-only and the question has images; load a vision-language model")
      content = "".join(p["text"] for p in content)
    out.append({**m, "content": content})
  return out


def _local_forced(client: Any, messages: list[dict], think_budget: int, max_tokens: int, temperature: float,
                  seed: int | None):
  """The sampler's own forced exit: "</think>" is emitted after think_budget tokens, then generation goes on."""
  from mlx_med.rl.evaluate import Response
  lm = client.lm
  sp = lm.sampling_params(max_tokens=max_tokens, temperature=temperature, seed=seed, think_budget=think_budget)
  if getattr(lm, "is_multimodal", False):
    ids, images = lm.prepare_chat(messages)
    (g,) = lm.generate_tokens([ids], [sp], [images])
  else:
    (g,) = lm.generate_tokens([lm.encode_chat(_text_only(messages))], [sp])
  return Response(g.text, len(g.token_ids), bool(any(g.forced)), g.finish_reason)


def forced_exit_chat(client: Any, messages: list[dict], *, think_budget: int | None, max_tokens: int,
                     temperature: float = 0.0, seed: int | None = 0):
  """One completion under a think budget -> mlx_med.rl.evaluate.Response (text, tokens, forced, finish).

  Native (client.chat takes think_budget) or two-pass (see the module docstring).
  """
  from mlx_med.rl.evaluate import Response
  if think_budget is None:
    c = client.chat(messages, max_tokens=max_tokens, temperature=temperature, n=1, seed=seed)[0]
    return Response(c.text, c.completion_tokens, None, c.finish_reason)
  if think_budget < 1:
    raise ValueError(f"think_budget must be >= 1, got {think_budget}")
  if max_tokens <= think_budget:
    raise ValueError(f"max_tokens={max_tokens} leaves no room for the answer after the think budget "
                     f"{think_budget}; use at least {think_budget + 32}")
  if _in_process(client):
    return _local_forced(client, messages, think_budget, max_tokens, temperature, seed)
  if _takes_think_budget(client):
    c = client.chat(messages, max_tokens=max_tokens, temperature=temperature, n=1, seed=seed,
                    think_budget=think_budget)[0]
    forced = getattr(c, "forced", None)
    return Response(c.text, c.completion_tokens, forced, c.finish_reason)
  first = client.chat(messages, max_tokens=think_budget, temperature=temperature, n=1, seed=seed)[0]
  if first.finish_reason != "length":
    return Response(first.text, first.completion_tokens, False, first.finish_reason)
  thought = first.text  # cut by the length limit, so no end-of-turn marker follows
  if "</think>" in thought:  # the thought closed in time; only the answer was cut: cut it off and ask for it
    thought = thought[:thought.rfind("</think>")]
  prefix = thought + "</think>"
  follow = list(messages) + [{"role": "assistant", "content": prefix},
                             {"role": "user", "content": FORCED_EXIT_PROMPT}]
  second = client.chat(follow, max_tokens=max_tokens - think_budget, temperature=temperature, n=1, seed=seed)[0]
  tokens = None
  if first.completion_tokens is not None and second.completion_tokens is not None:
    tokens = first.completion_tokens + second.completion_tokens
  return Response(prefix + "\n" + _answer_block(second.text), tokens, True, second.finish_reason)


# ---------------------------------------------------------------------------------------- evaluation


def evaluate_mcqa(client: Any, items: Sequence[MCQAItem], *, think_budget: int | None = None,
                  template: str = "xreasoner", max_tokens: int = 1024, temperature: float = 0.0, seed: int | None = 0,
                  concurrency: int = 1, out_dir: str | os.PathLike | None = None, keep_text: bool = True,
                  progress: Callable[[int, int], None] | None = None):
  """Evaluates `client` on `items`; returns `mlx_med.rl.evaluate.EvalResult`.

  Accuracy overall and per subject (`per_category`) with 95% Wilson intervals, format-failure
  rate, forced-exit rate (when a think budget is set). With out_dir, writes report.json (rows
  included) and table.md there.
  """
  from mlx_med.rl.evaluate import evaluate
  items = list(items)
  if not items:
    raise ValueError("no items to evaluate; load at least one question")
  by_id = {it.id: it for it in items}
  if len(by_id) != len(items):
    raise ValueError("item ids must be unique (they key the prompts)")
  if concurrency < 1:
    raise ValueError(f"concurrency must be >= 1, got {concurrency}")

  def to_messages(ex: Any) -> list[dict]:
    return build_messages(by_id[ex.id], template)

  def generate(conversations: list[list[dict]]):
    def one(m):
      return forced_exit_chat(client, m, think_budget=think_budget, max_tokens=max_tokens, temperature=temperature,
                              seed=seed)
    if concurrency == 1 or len(conversations) == 1:
      return [one(m) for m in conversations]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(concurrency, len(conversations))) as pool:
      return list(pool.map(one, conversations))

  to_messages.__name__ = template
  result = evaluate(generate, [it.to_example() for it in items], template=to_messages,
                    batch_size=max(8, concurrency), keep_text=keep_text, progress=progress)
  result.meta.update({"template": template, "think_budget": think_budget, "max_tokens": max_tokens,
                      "temperature": temperature, "forced_exit_mode": None if think_budget is None else
                      ("native" if _takes_think_budget(client) else "two-pass")})
  if out_dir is not None:
    write_outputs(result, out_dir)
  return result


def format_markdown(result: Any) -> str:
  """table.md: overall and per-subject accuracy with intervals, format failure, forced exit."""
  lines = ["| subject | n | accuracy | 95% CI | format failure |", "|---|---:|---:|---|---:|"]

  def row(name: str, n: int, acc: float, ci: Sequence[float], fmt: float) -> str:
    return f"| {name} | {n} | {acc:.3f} | [{ci[0]:.3f}, {ci[1]:.3f}] | {fmt:.3f} |"

  for name, r in sorted(result.per_category.items()):
    lines.append(row(name, r["n"], r["accuracy"], r["accuracy_ci"], r["format_failure"]))
  lines.append(row("**all**", result.n, result.accuracy, result.accuracy_ci, result.format_failure))
  meta = result.meta
  tail = [f"template {meta.get('template')}"]
  if meta.get("think_budget") is not None:
    tail.append(f"think budget {meta['think_budget']} ({meta.get('forced_exit_mode')}), forced exit rate "
                f"{result.forced_exit if result.forced_exit is not None else float('nan'):.3f}")
  return "\n".join(lines) + "\n\n" + ", ".join(tail) + "\n"


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def write_outputs(result: Any, out_dir: str | os.PathLike) -> tuple[str, str]:
  """report.json + table.md under out_dir (atomic); returns their paths."""
  from mlx_med.rl.evaluate import write_report
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  report = write_report(result, str(out / "report.json"))
  table = out / "table.md"
  _atomic_write(table, format_markdown(result))
  return report, str(table)


# -------------------------------------------------------------------------------------------- CLI


def parse_data(data: str) -> tuple[str, str]:
  """"FORMAT:PATH" -> (format, path) with a one-line error naming the formats."""
  fmt, sep, path = data.partition(":")
  if not sep or not path or fmt not in FORMATS:
    raise ValueError(f"--data {data!r} must be FORMAT:PATH with FORMAT one of {', '.join(FORMATS)} "
                     "(e.g. mmmu:/data/MMMU/validation)")
  return fmt, path


def make_client(model: str, *, served_model: str | None = None, api_key: str | None = None,
                dtype: str = "float32", max_seq_len: int | None = None):
  """--model: a local HF VLM directory -> LocalClient(LocalVLM); an http(s) URL -> OpenAIClient."""
  from mlx_med.llm.client import LocalClient, OpenAIClient
  if model.startswith(("http://", "https://")):
    name = served_model
    if name is None:
      import openai
      probe = openai.OpenAI(base_url=model, api_key=api_key or os.environ.get("MLX_MED_LLM_API_KEY") or "EMPTY",
                            timeout=30.0, max_retries=1)
      try:
        listed = [m.id for m in probe.models.list()]
      finally:
        probe.close()
      if not listed:
        raise ValueError(f"{model} lists no models; pass the served model name")
      name = listed[0]
    return OpenAIClient(name, base_url=model, api_key=api_key)
  if not os.path.isdir(model):
    raise FileNotFoundError(f"--model {model!r} is neither a directory nor an http(s) URL; pass a Hugging Face VLM "
                            "directory or an OpenAI-compatible endpoint such as http://127.0.0.1:8000/v1")
  from mlx_med.vlm.local import LocalVLM
  return LocalClient(LocalVLM.from_pretrained(model, dtype=dtype, max_seq_len=max_seq_len))


def eval_command(model: str, data: str, think_budget: int | None = None, *, out: str | None = None,
                 template: str = "xreasoner", max_tokens: int = 1024, temperature: float = 0.0, limit: int | None = None,
                 concurrency: int = 1, served_model: str | None = None, client: Any = None,
                 print_fn: Callable[[str], None] | None = print):
  """`mlx-med vlm eval`: load FORMAT:PATH, evaluate the model (directory or URL), write report.json + table.md.

  out: the output folder (default ./vlm_eval). limit: the first N items only. client: use
  this client instead of building one from `model` (tests, library use).
  """
  fmt, path = parse_data(data)
  items = load_mcqa(fmt, path)
  if limit is not None:
    if limit < 1:
      raise ValueError(f"--limit must be >= 1, got {limit}")
    items = items[:limit]
  if client is None:
    client = make_client(model, served_model=served_model)
  out = out or "vlm_eval"
  result = evaluate_mcqa(client, items, think_budget=think_budget, template=template, max_tokens=max_tokens,
                         temperature=temperature, concurrency=concurrency, out_dir=out)
  result.meta.update({"model": model, "data": data, "skipped": dict(last_skipped) if fmt == "mmmu" else {}})
  write_outputs(result, out)
  if print_fn is not None:
    budget = f", think budget {think_budget}" if think_budget is not None else ""
    print_fn(f"{model} on {data} ({len(items)} questions{budget})")
    print_fn(format_markdown(result).rstrip())
    print_fn(f"wrote {os.path.join(out, 'report.json')} and {os.path.join(out, 'table.md')}")
  return result
