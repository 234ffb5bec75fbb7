"""The embedded default model of the apps: a small decoder trained on the synthetic abstraction task.

Offline there is no pretrained LLM, so the apps layer ships a way to make one: a few-minute
supervised fine-tune, from scratch, of a small decoder on UniMedAbstractor's own prompts over
the synthetic oncology records (mlx_med.apps.oncology). It shows the pipeline end to end -- the
served model answers UMA's template with the JSON its schema asks for -- and nothing more: UMA's
zero-shot claim is about a real LLM, which the same pipeline reaches by pointing the client at
it (`--base-url`, or `--model DIR` for a local Hugging Face checkpoint).

Data. The conversations are exactly UMA's extractions over synthetic patients
(`extraction_jobs`, the planning of `uma.abstract_patients` with the same knobs): for a long-context
attribute, each note's BM25-relevant chunks; for a short-context one, the latest notes of its types.
Each is UMA's messages for (attribute, excerpt) -- `uma.attribute_messages` -- then the assistant
reply, the gold JSON in the shape `uma.attribute_response_format` asks for (`uma.attribute_answer`,
written as the schema constraint writes it). The per-excerpt gold comes from the generator's facts (`oncology.generate_cohort_with_facts`:
every value a note states, with its verbatim sentence): the value whose sentence the excerpt holds
(the last one when several), evidence that sentence (`config.uma.evidence="sentence"`) or "" (`"none"`: the
schema allows it, and a small model then spends its training on the value); or "unknown" when the
excerpt does not say.
Per attribute, `config.uma.unknown_ratio` unknowns per stated value are kept (a fixed-seed draw, at least
`config.uma.min_unknown`; < 0 keeps all), so the model learns both to extract and to abstain. Held-out
patients (another generator seed) give the evaluation set, built the same way.

Training goes through `mlx_med.rl.sft.run_sft` (data.format=jsonl, the shared trainer: resumable,
checkpoints, assistant-only loss, packed rows) with its own byte-level BPE chat tokenizer trained on
the conversations, and exports `<workdir>/sft/hf`, the directory `mlx-med serve --model` and
`LocalLM` load. `train_uma_model(config, workdir)` is resumable: the data files are reused when
present and the trainer resumes from its latest checkpoint.

`evaluate_uma_model(hf_dir, eval_path)` decodes greedily and reports per-attribute accuracy of the
"value" field (a reply that does not parse counts as wrong), with and without the JSON-schema
constraint (mlx_med.llm.grammar through LocalClient's response_format).

  python -m mlx_med.apps.train --config configs/apps/uma_model.py:smoke --workdir runs/uma_model
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from mlx_med.apps import uma
from mlx_med.core.fileio import read_jsonl_objects, write_jsonl

log = logging.getLogger("mlx_med.apps.train")

EVIDENCE_MODES = ("sentence", "none")

DEFAULT_ATTRIBUTES = str(uma.DEFAULT_ATTRIBUTES)  # configs/apps/oncology_attributes.json


# ------------------------------------------------------------------ data


def _attributes(path: str = "") -> list[Any]:
  path = path or DEFAULT_ATTRIBUTES
  if not os.path.isfile(path):
    raise FileNotFoundError(f"attribute config {path!r} does not exist; pass --config.uma.attributes=PATH (a JSON list like "
                            "configs/apps/oncology_attributes.json)")
  return uma.load_attributes(path)


def gold_reply(attribute: Any, value: str, evidence: str = "") -> str:
  """The assistant reply the model is trained to write: `uma.attribute_answer` (the JSON in the shape
  `uma.attribute_response_format` asks for) with the sentence that states the value as evidence ("" when
  the value is unknown)."""
  return uma.attribute_answer(attribute, value, evidence if value != attribute.unknown else "")


def note_values(facts: Iterable[Any], notes: Sequence[Any]) -> dict[tuple[str, str], list[tuple[str, str, int]]]:
  """(note_id, attribute) -> [(value, sentence, offset in the note)] the note states, in text order."""
  text = {n.note_id: n.text for n in notes}
  out: dict[tuple[str, str], list[tuple[str, str, int]]] = collections.defaultdict(list)
  for f in facts:
    out[(f.note_id, f.attribute)].append((f.value, f.sentence, text.get(f.note_id, "").find(f.sentence)))
  return {k: sorted(v, key=lambda x: x[2]) for k, v in out.items()}


def excerpt_value(statements: Sequence[tuple[str, str, int]], excerpt: str, unknown: str) -> tuple[str, str]:
  """(value, sentence) an excerpt of a note states: of the note's statements whose sentence the excerpt
  holds, the last; (unknown, "") when it holds none."""
  inside = [(v, s) for v, s, _ in statements if s in excerpt]
  return inside[-1] if inside else (unknown, "")


def extraction_jobs(notes: Sequence[Any], attributes: Sequence[Any], *, chunk_words: int = 120,
                    chunk_overlap: int = 20, top_k: int = 2, n_recent: int = 3) -> list[Any]:
  """The (patient, attribute, note, excerpt) extractions UMA's `abstract_patients` makes for these notes,
  with the same defaults: long-context attributes read the BM25-relevant chunks of each note,
  short-context ones the latest notes of their types. Training on exactly these excerpts shows the
  model what it will be asked."""
  patients: dict[str, list[Any]] = {}
  for n in sorted(notes, key=lambda n: (n.patient_id, n.date)):
    patients.setdefault(n.patient_id, []).append(n)
  jobs = []
  for pnotes in patients.values():
    jobs += uma._plan_long(pnotes, [a for a in attributes if a.context == "long"], chunk_words, chunk_overlap,
                           top_k)
    jobs += uma._plan_short(pnotes, [a for a in attributes if a.context == "short"], n_recent)
  return jobs


class _WholeNote:
  """A whole note as an extraction excerpt (the shape of UMA's short-context excerpts)."""

  def __init__(self, note: Any):
      self.note, self.patient_id, self.text = note, note.patient_id, uma.note_excerpt(note, [note.text])


def build_examples(notes: Sequence[Any], facts: Sequence[Any], attributes: Sequence[Any], *,
                   unknown_ratio: float = 1.0, min_unknown: int = 8, seed: int = 0, evidence: str = "sentence",
                   **plan: int) -> list[dict]:
  """SFT conversations for UMA's extractions over `notes` (`extraction_jobs`, `plan` its knobs):
  every extraction whose excerpt states a value, and per attribute max(min_unknown, unknown_ratio x
  stated) of those that do not (all when fewer; unknown_ratio < 0 keeps every one); an attribute with
  fewer than min_unknown of those gets whole notes that do not state it, outside UMA's plan. Rows: patient_id,
  note_id, attribute, value, messages (UMA's prompt, then the gold reply); shuffled with `seed`."""
  if evidence not in EVIDENCE_MODES:
    raise ValueError(f"evidence={evidence!r}: choose one of {', '.join(EVIDENCE_MODES)} (config.uma.evidence)")
  stated = note_values(facts, notes)
  rng = np.random.default_rng(seed)
  by_attribute: dict[str, tuple[list, list]] = {a.name: ([], []) for a in attributes}
  jobs = extraction_jobs(notes, attributes, **plan)
  for job in jobs:
    a = job.attribute
    value, sentence = excerpt_value(stated.get((job.note.note_id, a.name), []), job.text, a.unknown)
    by_attribute[a.name][value == a.unknown].append((job, value, sentence))
  planned = {(job.note.note_id, job.attribute.name) for job in jobs}
  rows = []
  for a in attributes:
    positives, negatives = by_attribute[a.name]
    if len(negatives) < min_unknown:  # retrieval rarely picks a note that does not say (receptors of a lung
      # cancer): whole notes outside the plan that state nothing teach the abstention too
      spare = [n for n in notes if (n.note_id, a.name) not in planned and (n.note_id, a.name) not in stated]
      for i in sorted(rng.choice(len(spare), min(len(spare), min_unknown - len(negatives)), replace=False)):
        negatives.append((_WholeNote(spare[i]), a.unknown, ""))
    keep = len(negatives) if unknown_ratio < 0 else min(
        len(negatives), max(int(min_unknown), round(unknown_ratio * len(positives))))
    picked = [negatives[i] for i in sorted(rng.choice(len(negatives), keep, replace=False))] if keep else []
    for job, value, sentence in positives + picked:
      messages = [dict(m) for m in uma.attribute_messages(a, job.text)]
      reply = gold_reply(a, value, sentence if evidence == "sentence" else "")
      messages.append({"role": "assistant", "content": reply})
      rows.append({"patient_id": job.patient_id, "note_id": job.note.note_id, "attribute": a.name, "value": value,
                   "messages": messages})
  order = rng.permutation(len(rows))
  return [rows[i] for i in order]


def read_jsonl(path: str) -> list[dict]:
  return [row for _, row in read_jsonl_objects(path, "one example object")]


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  """<workdir>/data/{train,eval}.jsonl for config.uma (reused when both exist); returns their paths."""
  from mlx_med.apps import oncology

  u = config.uma
  data_dir = os.path.join(workdir, "data")
  train_path, eval_path = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "eval.jsonl")
  if os.path.isfile(train_path) and os.path.isfile(eval_path):
    return train_path, eval_path
  attributes = _attributes(str(u.attributes))
  for name, n, seed in (("train", int(u.n_patients), int(u.seed)),
                        ("eval", int(u.n_eval_patients), int(u.seed) + 10_007)):
    notes, _, facts = oncology.generate_cohort_with_facts(n, seed=seed)
    rows = build_examples(notes, facts, attributes, unknown_ratio=float(u.unknown_ratio),
                          min_unknown=int(u.min_unknown), seed=seed, chunk_words=int(u.chunk_words),
                          chunk_overlap=int(u.chunk_overlap), top_k=int(u.top_k), n_recent=int(u.n_recent),
                          evidence=str(u.get("evidence", "sentence")))
    path = train_path if name == "train" else eval_path
    write_jsonl(path, rows)
    counts = collections.Counter(r["value"] == "unknown" for r in rows)
    log.info("%s: %d patients, %d notes -> %d conversations (%d stated values, %d unknown) in %s", name, n,
             len(notes), len(rows), counts[False], counts[True], path)
  return train_path, eval_path


# ------------------------------------------------------------------ training


def sft_config(config: ml_collections.ConfigDict, train_path: str, eval_path: str) -> ml_collections.ConfigDict:
  """The run_sft config: config's model/train/mesh sections with data.format=jsonl on the files."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.data.format = "jsonl"
    out.data.path = train_path
    out.data.eval_path = eval_path
  return out


def train_uma_model(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = False) -> str:
  """Builds the data (once), trains (or resumes) the decoder through run_sft and returns the exported
  Hugging Face directory <workdir>/sft/hf."""
  from mlx_med.rl.sft import run_sft

  os.makedirs(workdir, exist_ok=True)
  train_path, eval_path = prepare_data(config, workdir)
  started = time.monotonic()
  hf_dir = run_sft(sft_config(config, train_path, eval_path), os.path.join(workdir, "sft"), progress=progress)
  log.info("trained the UMA model in %.0fs -> %s", time.monotonic() - started, hf_dir)
  return hf_dir


# ------------------------------------------------------------------ evaluation


def parse_value(text: str) -> str | None:
  """The "value" of a JSON reply, or None when the reply is not a JSON object with one."""
  try:
    obj = json.loads(text)
  except (json.JSONDecodeError, TypeError):
    return None
  if not isinstance(obj, dict) or "value" not in obj:
    return None
  return str(obj["value"])


def _accuracy_table(rows: Sequence[dict], predictions: Sequence[str | None]) -> dict:
  per: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  stated, unknown, valid = [0, 0], [0, 0], 0
  for row, pred in zip(rows, predictions):
    ok = int(pred is not None and pred == row["value"])
    valid += pred is not None
    per[row["attribute"]][0] += ok
    per[row["attribute"]][1] += 1
    bucket = unknown if row["value"] == "unknown" else stated
    bucket[0] += ok
    bucket[1] += 1
  n = len(rows)
  return {"examples": n, "accuracy": sum(c for c, _ in per.values()) / max(n, 1),
          "valid_json": valid / max(n, 1),
          "accuracy_stated": stated[0] / max(stated[1], 1), "accuracy_unknown": unknown[0] / max(unknown[1], 1),
          "per_attribute": {k: {"accuracy": c / t, "n": t} for k, (c, t) in sorted(per.items())}}


def evaluate_uma_model(hf_dir: str, eval_path: str, *, constrained: bool = False, max_examples: int = 0,
                       max_tokens: int = 96, batch_size: int = 32, lm: Any = None, attributes: str = "") -> dict:
  """Greedy per-attribute accuracy of the model's "value" on held-out conversations (eval.jsonl).

  Unconstrained: LocalLM.chat in batches. Constrained: each attribute's response_format through
  LocalClient (mlx_med.llm.grammar masks), calls in a thread pool so the engine batches them.
  `max_examples` > 0 evaluates the first that many (the file is shuffled). `attributes`: the attribute
  config the data was built from (its response formats; default configs/apps/oncology_attributes.json).
  """
  rows = read_jsonl(eval_path)
  if max_examples > 0:
    rows = rows[:max_examples]
  prompts = [r["messages"][:-1] for r in rows]
  started = time.monotonic()
  if not constrained:
    from mlx_med.llm.model import LocalLM

    lm = lm or LocalLM.from_pretrained(hf_dir)
    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
      outs = lm.chat(prompts[i:i + batch_size], max_tokens=max_tokens, temperature=0.0)
      texts += [o.text for o in outs]
  else:
    import concurrent.futures

    from mlx_med.llm.client import LocalClient

    by_name = {a.name: a for a in _attributes(attributes)}
    client = LocalClient(hf_dir, max_num_seqs=batch_size)

    def one(k: int) -> str:
      fmt = uma.attribute_response_format(by_name[rows[k]["attribute"]])
      out = client.chat(prompts[k], max_tokens=max_tokens, temperature=0.0, response_format=fmt)
      return out[0].text

    try:
      with concurrent.futures.ThreadPoolExecutor(batch_size) as pool:
        texts = list(pool.map(one, range(len(rows))))
    finally:
      close = getattr(client, "close", None)
      if close is not None:
        close()
  result = _accuracy_table(rows, [parse_value(t) for t in texts])
  result.update(constrained=constrained, seconds=time.monotonic() - started)
  return result


def format_report(result: Mapping[str, Any]) -> str:
  head = (f"{'constrained' if result['constrained'] else 'unconstrained'} greedy, {result['examples']} held-out "
          f"(note, attribute) pairs: accuracy {result['accuracy']:.3f} (stated values {result['accuracy_stated']:.3f},"
          f" unknown {result['accuracy_unknown']:.3f}), valid JSON {result['valid_json']:.3f}, "
          f"{result['seconds']:.0f}s")
  lines = [head]
  for name, r in result["per_attribute"].items():
    lines.append(f"  {name:22s} {r['accuracy']:.3f}  (n={r['n']})")
  return "\n".join(lines)


# ------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
  """python -m mlx_med.apps.train --config configs/apps/uma_model.py:smoke --workdir DIR [--eval] [--config.x=v]"""
  from mlx_med.core import config as config_lib

  parser = argparse.ArgumentParser(prog="python -m mlx_med.apps.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/apps/uma_model.py[:variant]")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--eval", action="store_true", help="then evaluate on the held-out conversations")
  parser.add_argument("--constrained", action="store_true", help="evaluate with the JSON-schema constraint too")
  parser.add_argument("--max-eval", type=int, default=0, help="evaluate at most this many (0 = all)")
  overrides, rest = config_lib.split_config_args(list(sys.argv[1:] if argv is None else argv))
  args = parser.parse_args(rest)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "bm25s", "mlx_med.llm.client"):  # checkpoint-manager, index and per-call chatter
    logging.getLogger(noisy).setLevel(logging.WARNING)
  config = config_lib.get_config(args.config, overrides)
  hf_dir = train_uma_model(config, args.workdir, progress=False)
  print(f"exported {hf_dir}")
  if args.eval or args.constrained:
    eval_path = os.path.join(args.workdir, "data", "eval.jsonl")
    results = [evaluate_uma_model(hf_dir, eval_path, max_examples=args.max_eval)]
    if args.constrained:
      results.append(evaluate_uma_model(hf_dir, eval_path, constrained=True, max_examples=args.max_eval))
    for r in results:
      print(format_report(r))
    write_jsonl(os.path.join(args.workdir, "eval.jsonl"), results)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
