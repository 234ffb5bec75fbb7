"""The apps' embedded default model (mlx_med.apps.train): its SFT data and a tiny end-to-end run.

The data tests check the conversations against the generator's own facts (per note: the value it
states, or "unknown") and the replies against UMA's response schema (jsonschema). The run test
trains the `tiny` variant for a few steps and loads the export with LocalLM, which generates.
"""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

from mlx_med.apps import oncology, uma
from mlx_med.apps import train as train_lib
from mlx_med.core import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "apps", "uma_model.py")


@pytest.fixture(scope="module")
def attributes():
  return uma.load_attributes(train_lib.DEFAULT_ATTRIBUTES)


@pytest.fixture(scope="module")
def cohort():
  return oncology.generate_cohort_with_facts(6, seed=3)


def test_gold_reply_validates_against_the_response_schema(attributes):
  for attribute in attributes:
    schema = uma.attribute_response_format(attribute)["json_schema"]["schema"]
    for value in list(attribute.values or [])[:2] + [attribute.unknown]:
      text = train_lib.gold_reply(attribute, value, "PS 1.")
      assert text.startswith('{"value": '), text  # json.dumps separators: what the schema constraint writes
      reply = json.loads(text)
      jsonschema.validate(reply, schema)
      assert reply["value"] == value
      assert reply["evidence"] == ("" if value == attribute.unknown else "PS 1.")


def test_examples_follow_the_notes_facts(cohort, attributes):
  notes, _, facts = cohort
  rows = train_lib.build_examples(notes, facts, attributes, unknown_ratio=1.0, min_unknown=3, seed=0)
  stated = train_lib.note_values(facts, notes)
  by_note = {n.note_id: n for n in notes}
  by_attr = {a.name: a for a in attributes}
  assert {r["attribute"] for r in rows} == set(by_attr)  # every attribute is covered
  # the excerpts are UMA's own extractions (or whole notes, for missing unknowns)
  jobs = train_lib.extraction_jobs(notes, attributes)
  planned = {(j.note.note_id, j.attribute.name): j.text for j in jobs}
  n_stated = {a: 0 for a in by_attr}
  for j in jobs:
    sentences = [s for _, s, _ in stated.get((j.note.note_id, j.attribute.name), [])]
    n_stated[j.attribute.name] += any(s in j.text for s in sentences)
  for r in rows:
    key = (r["note_id"], r["attribute"])
    note, attribute = by_note[r["note_id"]], by_attr[r["attribute"]]
    excerpt = planned.get(key, uma.note_excerpt(note, [note.text]))
    # the prompt is exactly UMA's for this attribute and excerpt; the reply is the gold JSON
    assert r["messages"][:-1] == uma.attribute_messages(attribute, excerpt)
    assert r["messages"][-1]["role"] == "assistant"
    reply = json.loads(r["messages"][-1]["content"])
    assert reply["value"] == r["value"]
    said = [(v, s) for v, s, _ in stated.get(key, []) if s in excerpt]
    if r["value"] == "unknown":
      assert not said and reply["evidence"] == ""  # the excerpt does not say
    else:
      assert (r["value"], reply["evidence"]) == (said[-1][0], said[-1][1][:uma.EVIDENCE_MAX_CHARS])
  for name in by_attr:  # every stated extraction is kept; unknowns: max(min_unknown, ratio x stated)
    pos = sum(1 for r in rows if r["attribute"] == name and r["value"] != "unknown")
    neg = sum(1 for r in rows if r["attribute"] == name and r["value"] == "unknown")
    assert pos == n_stated[name]
    assert neg <= max(3, pos) and (neg == max(3, pos) or neg < 3 + pos)


def test_note_values_and_excerpt_value():
  note = oncology.Note("P1", "P1-n1", "2020-01-01", "pathology_report", "pT2 first. Addendum: revised to pT3.")
  facts = [oncology.Fact("P1", "P1-n1", "2020-01-01", "pathologic_t", "T3", "Addendum: revised to pT3."),
           oncology.Fact("P1", "P1-n1", "2020-01-01", "pathologic_t", "T2", "pT2 first.")]
  values = train_lib.note_values(facts, [note])
  assert values == {("P1-n1", "pathologic_t"): [("T2", "pT2 first.", 0), ("T3", "Addendum: revised to pT3.", 11)]}
  statements = values[("P1-n1", "pathologic_t")]
  assert train_lib.excerpt_value(statements, note.text, "unknown") == ("T3", "Addendum: revised to pT3.")
  assert train_lib.excerpt_value(statements, "pT2 first.", "unknown") == ("T2", "pT2 first.")
  assert train_lib.excerpt_value(statements, "nothing here", "unknown") == ("unknown", "")


def test_parse_value():
  assert train_lib.parse_value('{"value":"T2","evidence":"x"}') == "T2"
  assert train_lib.parse_value('{"value": 1}') == "1"
  assert train_lib.parse_value("T2") is None
  assert train_lib.parse_value('["T2"]') is None
  assert train_lib.parse_value('{"evidence":"x"}') is None


def test_tiny_model_trains_exports_and_generates(tmp_path):
  from mlx_med.llm.model import LocalLM

  config = config_lib.get_config(CONFIG + ":tiny")
  workdir = str(tmp_path / "run")
  hf_dir = train_lib.train_uma_model(config, workdir)
  assert hf_dir == os.path.join(workdir, "sft", "hf")
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    assert os.path.isfile(os.path.join(hf_dir, name))
  rows = train_lib.read_jsonl(os.path.join(workdir, "data", "eval.jsonl"))
  lm = LocalLM.from_pretrained(hf_dir)
  out = lm.chat([rows[0]["messages"][:-1]], max_tokens=8, temperature=0.0)
  assert len(out[0].token_ids) >= 1 and isinstance(out[0].text, str)
  # the evaluation runs on the export (a few steps learn nothing: the figure is just a number in [0, 1])
  result = train_lib.evaluate_uma_model(hf_dir, os.path.join(workdir, "data", "eval.jsonl"), max_examples=4,
                                        max_tokens=8, lm=lm)
  assert result["examples"] == 4 and 0.0 <= result["accuracy"] <= 1.0
  # under the schema constraint every reply parses, whatever the (barely trained) model prefers
  constrained = train_lib.evaluate_uma_model(hf_dir, os.path.join(workdir, "data", "eval.jsonl"), constrained=True,
                                             max_examples=2, max_tokens=200, batch_size=2)
  assert constrained["constrained"] and constrained["valid_json"] == 1.0
  # resumable: the data files are reused and the finished run is not trained again
  stamp = os.path.getmtime(os.path.join(workdir, "data", "train.jsonl"))
  assert train_lib.train_uma_model(config, workdir) == hf_dir
  assert os.path.getmtime(os.path.join(workdir, "data", "train.jsonl")) == stamp


def test_evidence_none_keeps_the_values_and_empties_the_quotes(cohort, attributes):
  notes, _, facts = cohort
  full = train_lib.build_examples(notes, facts, attributes, min_unknown=3, seed=0)
  bare = train_lib.build_examples(notes, facts, attributes, min_unknown=3, seed=0, evidence="none")
  assert [(r["note_id"], r["attribute"], r["value"]) for r in bare] == [
      (r["note_id"], r["attribute"], r["value"]) for r in full]
  assert all(json.loads(r["messages"][-1]["content"])["evidence"] == "" for r in bare)
  with pytest.raises(ValueError, match="evidence='quote'"):
    train_lib.build_examples(notes, facts, attributes, evidence="quote")
