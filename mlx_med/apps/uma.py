"""UniMedAbstractor (UMA): zero-shot attribute abstraction with one universal prompt template.

One template serves every attribute: a task instruction, the attribute's name and definition,
its allowed values, the output schema, optional examples and the clinical text. A new attribute
is a new entry in the attribute file (configs/apps/oncology_attributes.json), never new code or
a new model. Every LLM call goes through an `LLMClient` (the local model, `mlx-med serve`, vLLM or
Azure OpenAI) via `generate_structured`, with the answer constrained to
`{"value": <allowed value or "unknown">, "evidence": <short quote>}` (short, so small models can
produce it).

Two paths, chosen by the attribute's `context`:

* long context (site, histology, grade, TNM, stage, receptors, metastasis): every note of the
  patient is cut into word windows (`chunk_text`), one BM25 index holds the patient's chunks, and
  for each note the `top_k` chunks that score above zero for the attribute's retrieval `query` are
  kept (in document order) as that note's excerpt. Notes with no relevant chunk are skipped. One
  extraction per remaining note; the per-note answers are then aggregated across time.
* short context (performance status, treatment): the `n_recent` most recent notes of the
  attribute's `note_types` are read whole, one extraction each, aggregated the same way.

Aggregation rules (per attribute, `aggregation` in the attribute file). The per-note answers are
ordered by note date (then note order); "unknown" answers take no part:

* `latest`: the value of the most recent note that states one (ECOG, current treatment, pathologic
  T from the latest pathology report or its addendum, the latest receptor status).
* `earliest`: the value of the first note that states one (clinical TNM, which is fixed at diagnosis).
* `most_specific`: the value with the highest specificity level in the attribute's `order`; ties
  between values of the same level go to the most recent note. `order` lists levels from least to
  most specific; a level is a value or a list of equally specific values, e.g. histology
  [["carcinoma"], ["adenocarcinoma", ...], ["invasive ductal carcinoma", ...]]; allowed values not
  listed rank below every listed one.
* `highest`: the same computation where `order` is a severity scale (grade G1 < G2 < G3); when no
  `order` is given the list of allowed values is the scale.
* `any_positive`: the attribute's `positive` value if any note states it (distant metastasis "yes"
  at any time), otherwise the most recent other value.
No stated value at all gives "unknown".

Confidence of a row: the fraction of per-note votes (notes that answered something other than
"unknown", plus failed calls) that agree with the final value; with `use_logprobs`, each agreeing
vote counts with the probability the model gave the value's tokens instead of 1. For `latest`
and `earliest` attributes that legitimately change over time (ECOG) this is a conservative score:
the older, different values lower it. Rows below a `ReviewQueue`'s threshold wait for a reviewer.

Evaluation (`evaluate`): per attribute accuracy over patients (an "unknown" gold must be answered
"unknown"), micro- and macro-F1 over the attribute's classes other than "unknown" (sklearn's
`f1_score(..., labels=L)` with L = the known classes present in the gold or the predictions, so an
"unknown" answer is a miss and a value for an "unknown" gold a false positive), and 95% percentile
bootstrap intervals from resampling patients (`n_boot` resamples, the same patient draws for every
attribute; patients in sorted id order). F1 is not a mean, so the resampled tp/fp/fn counts are summed
here; for accuracy the draws and percentiles are those of `core.stats.bootstrap_mean_ci` (the tests
check they give the same interval). Overall: accuracy and micro-F1 over all (patient, attribute) pairs, macro-F1 the mean
of the attributes' macro-F1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from mlx_med.apps.oncology import NOTE_TYPES, Note, read_labels, read_notes
from mlx_med.core.fileio import write_jsonl, write_text_atomic

logger = logging.getLogger("mlx_med.apps.uma")

AGGREGATIONS = ("latest", "most_specific", "earliest", "highest", "any_positive")
CONTEXTS = ("short", "long")
VALUE_TYPES = ("categorical", "string", "number")
EVIDENCE_MAX_CHARS = 120
DEFAULT_ATTRIBUTES = Path(__file__).resolve().parents[2] / "configs" / "apps" / "oncology_attributes.json"


@dataclasses.dataclass
class Attribute:
  """One attribute to abstract, as configured in the attribute file (see the module docstring)."""

  name: str
  definition: str
  values: Optional[list[str]]
  value_type: str = "categorical"
  context: str = "long"
  aggregation: str = "latest"
  query: str = ""
  examples: list[dict] = dataclasses.field(default_factory=list)
  unknown: str = "unknown"
  order: Optional[list] = None            # levels, least to most specific / severe (most_specific, highest)
  positive: Optional[str] = None          # the value any_positive looks for
  note_types: Optional[list[str]] = None  # short context: the note types read (None: all)

  def rank(self, value: str) -> int:
    """Specificity / severity level of `value` under `order` (-1 when unlisted)."""
    order = self.order if self.order is not None else (self.values or [])
    for level, entry in enumerate(order):
      if value == entry or (isinstance(entry, list) and value in entry):
        return level
    return -1


_KEYS = {f.name for f in dataclasses.fields(Attribute)}


def _attribute_from(entry: Any, where: str) -> Attribute:
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: an attribute must be a JSON object, got {type(entry).__name__}")
  name = entry.get("name")
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"{where}: 'name' must be an identifier-like string (letters, digits, _), got {name!r}")
  where = f"{where} ({name!r})"
  unknown_keys = sorted(set(entry) - _KEYS)
  if unknown_keys:
    raise ValueError(f"{where}: unknown key(s) {unknown_keys}; known keys: {sorted(_KEYS)}")
  for key in ("definition", "query"):
    if not isinstance(entry.get(key), str) or not entry[key].strip():
      raise ValueError(f"{where}: '{key}' must be a non-empty string")
  a = Attribute(**entry)
  if a.value_type not in VALUE_TYPES:
    raise ValueError(f"{where}: value_type {a.value_type!r} is unknown; choose one of {list(VALUE_TYPES)}")
  if a.context not in CONTEXTS:
    raise ValueError(f"{where}: context {a.context!r} is unknown; choose one of {list(CONTEXTS)}")
  if a.aggregation not in AGGREGATIONS:
    raise ValueError(f"{where}: aggregation {a.aggregation!r} is unknown; choose one of {list(AGGREGATIONS)}")
  if a.value_type == "categorical":
    if not isinstance(a.values, list) or not a.values:
      raise ValueError(f"{where}: a categorical attribute needs a non-empty 'values' list")
    if not all(isinstance(v, str) and v.strip() for v in a.values):
      raise ValueError(f"{where}: every allowed value must be a non-empty string")
    if len(set(a.values)) != len(a.values):
      raise ValueError(f"{where}: 'values' lists a value twice")
    if a.unknown in a.values:
      raise ValueError(f"{where}: the unknown answer {a.unknown!r} must not be an allowed value")
  elif a.values is not None:
    raise ValueError(f"{where}: 'values' is only for categorical attributes (value_type {a.value_type!r})")
  if a.order is not None:
    if not isinstance(a.order, list) or not a.order:
      raise ValueError(f"{where}: 'order' must be a non-empty list of values or lists of values")
    flat = [v for e in a.order for v in (e if isinstance(e, list) else [e])]
    stray = [v for v in flat if a.values is not None and v not in a.values]
    if stray:
      raise ValueError(f"{where}: 'order' names {stray}, which are not allowed values")
    if len(set(flat)) != len(flat):
      raise ValueError(f"{where}: 'order' lists a value twice")
  elif a.aggregation == "most_specific":
    raise ValueError(f"{where}: aggregation most_specific needs an 'order' (levels from least to most specific)")
  if a.aggregation == "any_positive":
    if a.positive is None and a.values and "yes" in a.values:
      a.positive = "yes"
    if a.positive is None or (a.values is not None and a.positive not in a.values):
      raise ValueError(f"{where}: aggregation any_positive needs 'positive', one of the allowed values")
  if a.note_types is not None and (not isinstance(a.note_types, list) or not a.note_types):
    raise ValueError(f"{where}: 'note_types' must be a non-empty list such as {list(NOTE_TYPES)}")
  if not isinstance(a.examples, list):
    raise ValueError(f"{where}: 'examples' must be a list of {{'text', 'value', 'evidence'?}} objects")
  for j, ex in enumerate(a.examples):
    if not isinstance(ex, dict) or not isinstance(ex.get("text"), str) or "value" not in ex:
      raise ValueError(f"{where}: example {j} needs 'text' and 'value'")
    if a.values is not None and ex["value"] not in a.values + [a.unknown]:
      raise ValueError(f"{where}: example {j} value {ex['value']!r} is not an allowed value")
  return a


def load_attributes(path: str | os.PathLike = DEFAULT_ATTRIBUTES) -> list[Attribute]:
  """The attributes of a JSON list file; a bad entry raises a one-line ValueError naming it."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"attribute file {path} does not exist; see configs/apps/oncology_attributes.json")
  try:
    entries = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
  if not isinstance(entries, list) or not entries:
    raise ValueError(f"{path}: expected a non-empty JSON list of attribute objects")
  attrs = [_attribute_from(e, f"{path} entry {i}") for i, e in enumerate(entries)]
  names = [a.name for a in attrs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"{path}: attribute name(s) {dup} appear twice")
  return attrs


# ----------------------------------------------------------------------------------------- prompt

def uma_template():
  """The universal template: task, attribute definition, allowed values, output schema, examples, text."""
  from mlx_med.apps.prompts import PromptTemplate

  return PromptTemplate([
    ("task", "Read the clinical text and abstract one attribute of the patient's cancer. Use only what the "
             "text states; ignore family history, other people's cancers, unrelated prior tumors, planned or "
             "considered treatments and things to rule out. If the text does not state the attribute, the "
             "value is \"{unknown}\"."),
    ("attribute", "Attribute: {attribute_name}\nDefinition: {definition}"),
    ("values", "Allowed values: {allowed_values}"),
    ("schema", "Answer with one JSON object: {{\"value\": one allowed value or \"{unknown}\", \"evidence\": the "
               "shortest quote from the text that supports the value (\"\" when unknown)}}."),
    ("examples", "{examples}"),
    ("text", "Clinical text:\n{text}"),
  ], system="You are a careful oncology data abstractor. You answer with JSON only.")


def _examples_text(attribute: Attribute) -> str:
  if not attribute.examples:
    return ""
  lines = ["Examples:"]
  for ex in attribute.examples:
    answer = attribute_answer(attribute, ex["value"], ex.get("evidence", ""))
    lines.append(f"Text: {ex['text']}\nAnswer: {answer}")
  return "\n".join(lines)


def attribute_messages(attribute: Attribute, text: str, *, template: Any = None) -> list[dict]:
  """Chat messages asking for `attribute` from `text` (what UMA sends and the small model learns)."""
  template = template or uma_template()
  allowed = ", ".join(attribute.values) if attribute.values else f"any {attribute.value_type}"
  return template.messages(unknown=attribute.unknown, attribute_name=attribute.name.replace("_", " "),
                           definition=attribute.definition, allowed_values=allowed,
                           examples=_examples_text(attribute), text=text)


def attribute_answer(attribute: Attribute, value: str, evidence: str = "") -> str:
  """The JSON reply for `value`, exactly as schema-constrained decoding writes it (json.dumps' ", " and
  ": " separators, keys in schema order): the training target of the embedded model, so that what it
  learned is what the constraint lets it write."""
  return json.dumps({"value": value, "evidence": evidence[:EVIDENCE_MAX_CHARS]}, ensure_ascii=False)


_MODELS: dict[tuple, type] = {}


def attribute_model(attribute: Attribute) -> type:
  """The pydantic model of one answer: value (allowed values + unknown) and a short evidence quote."""
  from pydantic import Field, create_model

  key = (attribute.name, tuple(attribute.values or ()), attribute.value_type, attribute.unknown)
  if key not in _MODELS:
    if attribute.values is not None:
      value_type = Literal[tuple(attribute.values) + (attribute.unknown,)]  # type: ignore[misc]
    else:
      value_type = str
    _MODELS[key] = create_model(f"Answer_{attribute.name}", value=(value_type, ...),
                                evidence=(str, Field(..., max_length=EVIDENCE_MAX_CHARS)))
  return _MODELS[key]


def attribute_response_format(attribute: Attribute) -> dict:
  """OpenAI json_schema response_format for one answer ({"value": enum, "evidence": string <= 120 chars})."""
  from mlx_med.apps.structured import json_schema_format

  return json_schema_format(attribute_model(attribute), name=f"uma_{attribute.name}")


def note_excerpt(note: Note, chunks: Sequence[str]) -> str:
  """The text an extraction reads: the note's type and date, then its chunks (joined by an ellipsis)."""
  return f"[{note.note_type.replace('_', ' ')}, {note.date}]\n" + "\n...\n".join(chunks)


# ----------------------------------------------------------------------------------------- aggregation

def aggregate(attribute: Attribute, answers: Sequence[tuple[str, str, str]]) -> tuple[str, list[str]]:
  """(value, supporting note ids) from per-note answers (date, note_id, value) under the attribute's rule."""
  stated = [(i, d, nid, v) for i, (d, nid, v) in enumerate(answers) if v != attribute.unknown and v is not None]
  if not stated:
    return attribute.unknown, []
  stated.sort(key=lambda x: (x[1], x[0]))
  rule = attribute.aggregation
  if rule == "latest":
    value = stated[-1][3]
  elif rule == "earliest":
    value = stated[0][3]
  elif rule in ("most_specific", "highest"):
    best = max(attribute.rank(v) for _, _, _, v in stated)
    value = [v for _, _, _, v in stated if attribute.rank(v) == best][-1]
  elif rule == "any_positive":
    positives = [v for _, _, _, v in stated if v == attribute.positive]
    value = positives[0] if positives else stated[-1][3]
  else:
    raise ValueError(f"attribute {attribute.name!r}: aggregation {rule!r} is unknown; choose one of {list(AGGREGATIONS)}")
  return value, [nid for _, _, nid, v in stated if v == value]


def value_probability(completion: Any, value: str) -> Optional[float]:
  """Probability the model gave the tokens spelling `value` in a JSON reply (None without logprobs)."""
  tokens = getattr(completion, "tokens", None)
  lps = getattr(completion, "token_logprobs", None)
  if not tokens or not lps or len(tokens) != len(lps):
    return None
  text = "".join(tokens)
  key = text.find('"value"')
  start = text.find(json.dumps(value, ensure_ascii=False)[1:-1], key + 7) if key >= 0 else -1
  if start < 0:
    return None
  end, pos, total = start + len(value), 0, 0.0
  for tok, lp in zip(tokens, lps):
    if pos < end and pos + len(tok) > start and lp is not None:
      total += float(lp)
    pos += len(tok)
  return float(math.exp(total))


# ----------------------------------------------------------------------------------------- abstraction

@dataclasses.dataclass
class ExtractionJob:
  """One extraction: `attribute` read from `text` (an excerpt of `note`, see `note_excerpt`)."""
  patient_id: str
  attribute: Attribute
  note: Note
  text: str


_Job = ExtractionJob


def _plan_long(notes: Sequence[Note], attributes: Sequence[Attribute], chunk_words: int, chunk_overlap: int,
               top_k: int) -> list[_Job]:
  from mlx_med.apps.retrieval import BM25Index, chunk_documents

  by_id = {n.note_id: n for n in notes}
  chunks = chunk_documents({n.note_id: n.text for n in notes}, max_words=chunk_words, overlap=chunk_overlap)
  if not chunks:
    return []
  try:
    index = BM25Index.from_chunks(chunks)
  except ValueError:   # no indexable word in any note
    return []
  jobs = []
  for attr in attributes:
    scores = index.scores(attr.query)
    per_note: dict[str, list[int]] = {}
    for i in np.argsort(-scores, kind="stable"):
      if scores[i] <= 0:
        break
      kept = per_note.setdefault(chunks[i].doc_id, [])
      if len(kept) < top_k:
        kept.append(int(i))
    for note_id, idx in per_note.items():
      idx.sort(key=lambda i: chunks[i].index)
      note = by_id[note_id]
      jobs.append(_Job(note.patient_id, attr, note, note_excerpt(note, [chunks[i].text for i in idx])))
  return jobs


def _plan_short(notes: Sequence[Note], attributes: Sequence[Attribute], n_recent: int) -> list[_Job]:
  jobs = []
  for attr in attributes:
    pool = [n for n in notes if attr.note_types is None or n.note_type in attr.note_types]
    for note in pool[-n_recent:] if n_recent > 0 else []:
      jobs.append(_Job(note.patient_id, attr, note, note_excerpt(note, [note.text])))
  return jobs


@dataclasses.dataclass
class _Failed:
  """A call that raised: no value, one attempt."""
  value: Any = None
  raw: str = ""
  attempts: int = 1
  completion: Any = None


def plan_extractions(notes: Sequence[Note], attributes: Sequence[Attribute], *, chunk_words: int = 120,
                     chunk_overlap: int = 20, top_k: int = 2, n_recent: int = 3) -> list[ExtractionJob]:
  """Every extraction `abstract_patients` makes for `notes` with these knobs (per patient: the long-context
  attributes' retrieved excerpts, then the short-context attributes' recent notes)."""
  if top_k < 1 or n_recent < 1:
    raise ValueError(f"top_k and n_recent must be >= 1 (got {top_k}, {n_recent})")
  patients: dict[str, list[Note]] = {}
  for n in sorted(notes, key=lambda n: (n.patient_id, n.date)):
    patients.setdefault(n.patient_id, []).append(n)
  jobs: list[ExtractionJob] = []
  for pnotes in patients.values():
    jobs += _plan_long(pnotes, [a for a in attributes if a.context == "long"], chunk_words, chunk_overlap, top_k)
    jobs += _plan_short(pnotes, [a for a in attributes if a.context == "short"], n_recent)
  return jobs


def abstract_patients(client: Any, notes: Sequence[Note], attributes: Sequence[Attribute], *,
                      max_workers: int = 16, chunk_words: int = 120, chunk_overlap: int = 20, top_k: int = 2,
                      n_recent: int = 3, review: Any = None, constrained: bool = True, max_tokens: int = 96,
                      max_retries: int = 1, use_logprobs: bool = False, template: Any = None,
                      progress: bool = False) -> list[dict]:
  """Abstracts every attribute for every patient in `notes`; one prediction row per (patient, attribute).

  Rows: {patient_id, attribute, value, confidence, evidence_note_ids, evidence, calls, notes_read,
  failed}; with `review` (a ReviewQueue) each row is submitted and `review` (True = queued) added.
  Extraction calls run concurrently (`max_workers` threads over the thread-safe client). A call that
  raises (an endpoint down after the client's own retries) counts as a failed extraction of that note,
  logged by exception type only; the run goes on. `progress` shows a bar with calls/s and the ETA.
  """
  from mlx_med.apps.structured import generate_structured

  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}")
  patients = list(dict.fromkeys(n.patient_id for n in sorted(notes, key=lambda n: n.patient_id)))
  jobs = plan_extractions(notes, attributes, chunk_words=chunk_words, chunk_overlap=chunk_overlap, top_k=top_k,
                          n_recent=n_recent)
  chat_kwargs = {"logprobs": 0} if use_logprobs else {}
  started = time.monotonic()

  def run(job: _Job):
    msgs = attribute_messages(job.attribute, job.text, template=template)
    return generate_structured(client, msgs, attribute_model(job.attribute), max_retries=max_retries,
                               constrained=constrained, max_tokens=max_tokens, temperature=0.0, seed=0,
                               **chat_kwargs)

  def run_safely(job: _Job):
    try:
      return run(job)
    except Exception as e:
      logger.warning("extraction of %s for patient %s failed: %s", job.attribute.name, job.patient_id,
                     type(e).__name__)
      return _Failed()

  results: list[Any] = [None] * len(jobs)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(jobs), desc="UMA extractions", unit="call", file=sys.stderr, mininterval=1.0)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
    futures = {pool.submit(run_safely, job): i for i, job in enumerate(jobs)}
    for fut in concurrent.futures.as_completed(futures):
      results[futures[fut]] = fut.result()
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  n_failed = sum(r.value is None for r in results)
  logger.info("UMA: %d patients, %d attributes, %d extraction calls (%d failed) in %.1fs", len(patients),
              len(attributes), len(jobs), n_failed, time.monotonic() - started)

  grouped: dict[tuple[str, str], list[tuple[_Job, Any]]] = {}
  for job, res in zip(jobs, results):
    grouped.setdefault((job.patient_id, job.attribute.name), []).append((job, res))
  rows = []
  for pid in patients:
    for attr in attributes:
      pairs = sorted(grouped.get((pid, attr.name), []), key=lambda p: (p[0].note.date, p[0].note.note_id))
      answers, weights, failed, evidence = [], {}, 0, {}
      for job, res in pairs:
        value = res.value.value if res.value is not None else None
        failed += value is None
        answers.append((job.note.date, job.note.note_id, value if value is not None else attr.unknown))
        if value is not None:
          prob = value_probability(res.completion, value) if use_logprobs else None
          weights[job.note.note_id] = 1.0 if prob is None else prob
          evidence[job.note.note_id] = res.value.evidence
      value, support = aggregate(attr, answers)
      votes = sum(1 for _, _, v in answers if v != attr.unknown) + failed
      confidence = (sum(weights[n] for n in support) / votes) if votes else (0.0 if failed else 1.0)
      row = {"patient_id": pid, "attribute": attr.name, "value": value, "confidence": round(float(confidence), 4),
             "evidence_note_ids": support, "evidence": evidence.get(support[-1], "") if support else "",
             "calls": int(sum(res.attempts for _, res in pairs)), "notes_read": len(pairs), "failed": failed}
      if review is not None:
        row["review"] = _submit(review, row, attr)
      rows.append(row)
  return rows


def _submit(review: Any, row: dict, attr: Attribute) -> Any:
  """Submits a row to the review queue: True = waits for a reviewer, False = auto-accepted; an item a
  reviewer already accepted or corrected is left as it is (its status is returned)."""
  item_id = f"{row['patient_id']}:{attr.name}"
  try:
    status = review.get(item_id).get("status")
  except KeyError:
    status = None
  if status in ("accepted", "corrected"):
    return status
  context = {k: row[k] for k in ("patient_id", "attribute", "evidence_note_ids", "evidence")}
  choices = attr.values + [attr.unknown] if attr.values is not None else None
  return bool(review.submit(item_id, f"uma/{attr.name}", row["value"], row["confidence"], context,
                            choices=choices, replace=True))


# ----------------------------------------------------------------------------------------- evaluation

def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
  denom = 2 * tp + fp + fn
  return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


def _counts(pred: Sequence[str], true: Sequence[str], unknown: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Per patient correctness [P] and per (patient, class) tp/fp/fn [P, L, 3] over the known classes."""
  labels = sorted({v for v in list(pred) + list(true) if v != unknown})
  correct = np.array([p == t for p, t in zip(pred, true)], np.float64)
  c = np.zeros((len(pred), len(labels), 3), np.float64)
  for i, (p, t) in enumerate(zip(pred, true)):
    for j, lab in enumerate(labels):
      c[i, j] = (p == lab and t == lab, p == lab and t != lab, t == lab and p != lab)
  return correct, c, labels


def _scores(correct: np.ndarray, c: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Accuracy, micro-F1 and macro-F1 for each row of patient weights [B, P] (counts of a resample)."""
  n = weights.sum(axis=1)
  acc = weights @ correct / np.maximum(n, 1)
  if c.shape[1] == 0:
    nan = np.full(weights.shape[0], np.nan)
    return acc, nan, nan
  per = np.einsum("bp,plk->blk", weights, c)                 # [B, L, 3]
  micro = _f1(per[..., 0].sum(1), per[..., 1].sum(1), per[..., 2].sum(1))
  f1 = _f1(per[..., 0], per[..., 1], per[..., 2])              # nan for classes absent from a resample
  return acc, micro, _nanmean(f1, axis=1)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
  """Mean over the finite entries along `axis`; NaN where there is none (no warning)."""
  ok = np.isfinite(x)
  n = ok.sum(axis=axis)
  return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=axis) / np.maximum(n, 1), np.nan)


def _ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
  s = samples[np.isfinite(samples)]
  if s.size == 0:
    return [math.nan, math.nan]
  a = (1 - level) / 2
  lo, hi = np.percentile(s, [100 * a, 100 * (1 - a)])
  return [float(lo), float(hi)]


def evaluate(predictions: Sequence[Mapping[str, Any]], gold: Mapping[str, Mapping[str, str]],
             attributes: Sequence[Attribute], *, n_boot: int = 1000, seed: int = 0) -> dict:
  """Per attribute and overall accuracy / micro-F1 / macro-F1 with patient-bootstrap 95% intervals.

  Patients are those in `gold`; a missing prediction counts as "unknown". Returns
  {"n_patients", "n_boot", "attributes": {name: {"n", "accuracy", "accuracy_ci", "micro_f1",
  "micro_f1_ci", "macro_f1", "macro_f1_ci", "labels", "context"}}, "overall": {...}, "by_context":
  {"short": {...}, "long": {...}}}: the pooled figures over all attributes and over each context's.
  """
  if int(n_boot) < 1:
    raise ValueError(f"n_boot={n_boot}; give at least 1 bootstrap resample (1000 is usual)")
  patients = sorted(gold)
  if not patients:
    raise ValueError("evaluate: the gold labels hold no patient")
  pred = {(r["patient_id"], r["attribute"]): r["value"] for r in predictions}
  rng = np.random.default_rng(seed)
  p = len(patients)
  draws = rng.integers(0, p, size=(int(n_boot), p))
  weights = np.zeros((int(n_boot), p))
  np.add.at(weights, (np.arange(int(n_boot))[:, None], draws), 1.0)
  full = np.ones((1, p))
  out: dict[str, Any] = {"n_patients": p, "n_boot": int(n_boot), "attributes": {}}
  all_correct, all_c, macro_boot, macro_point = [], [], [], []
  for attr in attributes:
    true = [gold[pid].get(attr.name, attr.unknown) for pid in patients]
    guess = [pred.get((pid, attr.name), attr.unknown) for pid in patients]
    correct, c, labels = _counts(guess, true, attr.unknown)
    point = [float(x[0]) for x in _scores(correct, c, full)]
    boot = _scores(correct, c, weights)
    out["attributes"][attr.name] = {
      "n": p, "accuracy": point[0], "accuracy_ci": _ci(boot[0]), "micro_f1": point[1], "micro_f1_ci": _ci(boot[1]),
      "macro_f1": point[2], "macro_f1_ci": _ci(boot[2]), "labels": labels, "context": attr.context}
    all_correct.append(correct)
    all_c.append(c)
    macro_boot.append(boot[2])
    macro_point.append(point[2])
  # Overall (and per context): pairs pooled per patient (classes namespaced by attribute), macro = the
  # mean of the attributes' macro-F1.
  def pooled(keep: list[int]) -> dict:
    correct = np.sum([all_correct[i] for i in keep], axis=0) / len(keep)
    counts = np.concatenate([all_c[i] for i in keep], axis=1).sum(axis=1)      # [P, 3]
    tp, fp, fn = counts.sum(0)
    boot = weights @ counts
    return {"n": p * len(keep), "accuracy": float(correct.mean()), "accuracy_ci": _ci(weights @ correct / p),
            "micro_f1": float(_f1(tp, fp, fn)), "micro_f1_ci": _ci(_f1(boot[:, 0], boot[:, 1], boot[:, 2])),
            "macro_f1": float(_nanmean(np.asarray([macro_point[i] for i in keep]), axis=0)),
            "macro_f1_ci": _ci(_nanmean(np.stack([macro_boot[i] for i in keep]), axis=0))}

  out["overall"] = pooled(list(range(len(attributes))))
  out["by_context"] = {ctx: pooled([i for i, a in enumerate(attributes) if a.context == ctx])
                       for ctx in CONTEXTS if any(a.context == ctx for a in attributes)}
  return out


def _fmt(value: float, ci: Sequence[float]) -> str:
  if not np.isfinite(value):
    return "n/a"
  return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def report_markdown(evaluation: Mapping[str, Any]) -> str:
  """A markdown table: one row per attribute and an overall row (value [95% CI])."""
  lines = [f"UMA evaluation: {evaluation['n_patients']} patients, {evaluation['n_boot']} patient-bootstrap resamples "
           "(95% percentile intervals).", "",
           "| attribute | context | accuracy | micro-F1 | macro-F1 |", "|---|---|---|---|---|"]
  for name, m in evaluation["attributes"].items():
    lines.append(f"| {name} | {m.get('context', '')} | {_fmt(m['accuracy'], m['accuracy_ci'])} | "
                 f"{_fmt(m['micro_f1'], m['micro_f1_ci'])} | {_fmt(m['macro_f1'], m['macro_f1_ci'])} |")
  for ctx, o in evaluation.get("by_context", {}).items():
    lines.append(f"| *{ctx}-context* | | {_fmt(o['accuracy'], o['accuracy_ci'])} | {_fmt(o['micro_f1'], o['micro_f1_ci'])} | "
                 f"{_fmt(o['macro_f1'], o['macro_f1_ci'])} |")
  o = evaluation["overall"]
  lines.append(f"| **overall** | | {_fmt(o['accuracy'], o['accuracy_ci'])} | {_fmt(o['micro_f1'], o['micro_f1_ci'])} | "
               f"{_fmt(o['macro_f1'], o['macro_f1_ci'])} |")
  return "\n".join(lines) + "\n"


def write_report(evaluation: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes `report_markdown(evaluation)` to `path` atomically."""
  write_text_atomic(path, report_markdown(evaluation))


# ----------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mlx-med apps abstract",
                              description="UniMedAbstractor: abstract attributes from clinical notes with an LLM.")
  p.add_argument("--notes", required=True, help="notes.jsonl, a directory holding it, or DIR/<patient>/<date>_<type>.txt")
  p.add_argument("--attributes", default=str(DEFAULT_ATTRIBUTES), help="attribute JSON file (default: the 15 oncology attributes)")
  p.add_argument("--out", required=True, help="predictions JSONL to write")
  p.add_argument("--review-db", help="SQLite review queue: rows below --review-threshold wait for a reviewer")
  p.add_argument("--review-threshold", type=float, default=0.7)
  p.add_argument("--labels", help="labels.jsonl: also evaluate (JSON and report.md beside --out)")
  p.add_argument("--max-workers", type=int, default=16)
  p.add_argument("--top-k", type=int, default=2, help="chunks kept per note for long-context attributes")
  p.add_argument("--chunk-words", type=int, default=120)
  p.add_argument("--n-recent", type=int, default=3, help="notes read for short-context attributes")
  p.add_argument("--max-tokens", type=int, default=96)
  p.add_argument("--unconstrained", action="store_true", help="no response_format (the schema goes in the prompt)")
  p.add_argument("--n-boot", type=int, default=1000)
  p.add_argument("--run-dir", help="where llm_calls.jsonl goes (default: beside --out)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  from mlx_med.apps.clients import add_client_arguments
  add_client_arguments(p)
  return p


def abstract_main(argv: Optional[Sequence[str]] = None, *, client: Any = None) -> int:
  """`mlx-med apps abstract`: predictions JSONL (atomic) and, with --labels, the evaluation and report.md."""
  args = build_parser().parse_args(argv)
  try:
    notes = read_notes(args.notes)
    attributes = load_attributes(args.attributes)
    gold = read_labels(args.labels) if args.labels else None
    out = Path(args.out)
    run_dir = str(Path(args.run_dir) if args.run_dir else out.parent)
    if client is None:
      from mlx_med.apps.clients import client_from_args
      client = client_from_args(args, run_dir, tag="uma")
    else:
      from mlx_med.apps.calllog import LoggedClient
      client = LoggedClient(client, run_dir, log_text=bool(args.log_text), tag="uma")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  review = None
  if args.review_db:
    from mlx_med.apps.review import ReviewQueue
    review = ReviewQueue(args.review_db, threshold=args.review_threshold)
  started = time.monotonic()
  rows = abstract_patients(client, notes, attributes, max_workers=args.max_workers, chunk_words=args.chunk_words,
                           top_k=args.top_k, n_recent=args.n_recent, review=review,
                           constrained=not args.unconstrained, max_tokens=args.max_tokens,
                           progress=not args.no_progress)
  write_jsonl(out, rows)
  n_patients = len({r["patient_id"] for r in rows})
  print(f"wrote {len(rows)} predictions ({n_patients} patients x {len(attributes)} attributes, "
        f"{sum(r['calls'] for r in rows)} calls, {time.monotonic() - started:.1f}s) to {out}")
  if review is not None:
    queued = sum(r.get("review") is True for r in rows)
    print(f"review queue {args.review_db}: {queued} of {len(rows)} rows below confidence {args.review_threshold}")
  if hasattr(client, "summary"):
    try:
      print(f"llm calls: {json.dumps(client.summary())}")
    except Exception:  # a summary is a convenience, never a failure
      pass
  if gold is not None:
    evaluation = evaluate(rows, gold, attributes, n_boot=args.n_boot)
    stem = out.with_suffix("")
    write_text_atomic(f"{stem}.eval.json", json.dumps(evaluation, indent=2) + "\n")
    write_report(evaluation, out.parent / "report.md")
    print(report_markdown(evaluation))
  return 0


if __name__ == "__main__":
  raise SystemExit(abstract_main())
