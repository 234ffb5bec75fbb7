"""The synthetic oncology cohort: determinism, gold labels that agree with the notes, files and their errors."""

from __future__ import annotations

import collections
import json
import re

import pytest

from mlx_med.apps import oncology
from mlx_med.apps.oncology import (
  Note,
  generate_cohort,
  generate_cohort_with_facts,
  read_labels,
  read_notes,
  write_cohort,
)
from mlx_med.apps.uma import aggregate, load_attributes

ATTRS = {a.name: a for a in load_attributes()}


@pytest.fixture(scope="module")
def cohort():
  return generate_cohort_with_facts(120, seed=3)


def test_deterministic_and_shaped(cohort):
  notes, gold, _ = cohort
  again, gold2 = generate_cohort(120, seed=3)
  assert again == notes and gold2 == gold
  other, _ = generate_cohort(120, seed=4)
  assert other != notes
  assert len(gold) == 120 and all(set(g) == set(ATTRS) for g in gold.values())
  by_patient = collections.defaultdict(list)
  for n in notes:
    by_patient[n.patient_id].append(n)
    assert n.note_type in oncology.NOTE_TYPES
  for pid, pnotes in by_patient.items():
    assert len(pnotes) >= 4, pid
    assert [n.date for n in pnotes] == sorted(n.date for n in pnotes)
    assert {"pathology_report", "radiology_report", "oncology_consult", "clinic_note"} <= {n.note_type for n in pnotes}
  # Every allowed value of the gold is an allowed value (or unknown) of the attribute file.
  for g in gold.values():
    for name, value in g.items():
      assert value in ATTRS[name].values + ["unknown"], (name, value)
  # Variety the abstractor has to cope with.
  counts = {name: collections.Counter(g[name] for g in gold.values()) for name in ATTRS}
  assert len(counts["primary_site"]) == 3 and counts["pathologic_t"]["unknown"] > 0
  assert counts["distant_metastasis"]["yes"] > 10 and counts["distant_metastasis"]["no"] > 10
  assert counts["er_status"]["unknown"] > 0 and counts["er_status"]["positive"] > 0


def test_gold_equals_rules_over_stated_facts(cohort):
  """The latent gold and the documented aggregation rules over what the notes state agree everywhere."""
  notes, gold, facts = cohort
  text = {n.note_id: n.text for n in notes}
  by = collections.defaultdict(list)
  for f in facts:
    assert f.sentence in text[f.note_id]
    by[(f.patient_id, f.attribute)].append((f.date, f.note_id, f.value))
  for pid, g in gold.items():
    for name, value in g.items():
      got, support = aggregate(ATTRS[name], by.get((pid, name), []))
      assert got == value, (pid, name, by.get((pid, name)))
      assert (value == "unknown") == (not support)


def test_notes_state_the_gold_in_their_own_words(cohort):
  notes, gold, _ = cohort
  by_patient = collections.defaultdict(list)
  for n in notes:
    by_patient[n.patient_id].append(n)
  checked = 0
  for pid, pnotes in by_patient.items():
    # pathologic T: the latest pathology report that gives a pT states the gold one.
    with_pt = [n for n in pnotes if n.note_type == "pathology_report" and re.search(r"\bpN\d|pTNM|revised to pT", n.text)]
    if gold[pid]["pathologic_t"] == "unknown":
      assert not with_pt
    else:
      last = with_pt[-1].text
      pt = re.findall(r"(?:\bp|pTNM: )(T\d[abc]?)\b", last)
      assert pt[-1] == gold[pid]["pathologic_t"], last
      checked += 1
    # ECOG: the latest clinic note states the gold ECOG / PS.
    last_clinic = [n for n in pnotes if n.note_type == "clinic_note"][-1].text
    ecog = re.search(r"(?:ECOG|PS)(?: PS| performance status)? (\d)", last_clinic)
    assert ecog and ecog.group(1) == gold[pid]["ecog"], last_clinic
    # Negation and distractors occur, and a "no metastasis" patient has no positive statement.
    all_text = " ".join(n.text for n in pnotes)
    assert re.search(r"family history|FHx", all_text, re.IGNORECASE)
    if gold[pid]["distant_metastasis"] == "no":
      assert "consistent with metastatic disease" not in all_text
      assert re.search(r"[Nn]o (evidence of )?(distant )?metasta", all_text)
  assert checked > 20


def test_round_trip_jsonl_and_tree(tmp_path, cohort):
  notes, gold, _ = cohort
  notes = notes[:40]
  pids = {n.patient_id for n in notes}
  gold = {p: g for p, g in gold.items() if p in pids}
  write_cohort(tmp_path / "c", notes, gold, tree=True)
  assert read_notes(tmp_path / "c") == notes
  assert read_notes(tmp_path / "c" / "notes.jsonl") == notes
  assert read_labels(tmp_path / "c" / "labels.jsonl") == gold
  tree = read_notes(tmp_path / "c" / "notes")
  key = lambda n: (n.patient_id, n.date, n.note_type, n.text)
  assert sorted(map(key, tree)) == sorted(map(key, notes))
  assert all(n.note_id.startswith(n.patient_id + "/") for n in tree)
  # Two notes of one type on one day get distinct file names.
  same_day = [Note("X1", "a", "2020-01-02", "clinic_note", "one"), Note("X1", "b", "2020-01-02", "clinic_note", "two")]
  write_cohort(tmp_path / "d", same_day, {"X1": {}}, tree=True)
  assert sorted(n.text for n in read_notes(tmp_path / "d" / "notes")) == ["one", "two"]
  assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("line, message", [
  ("{not json", r"notes\.jsonl:2: not valid JSON"),
  ('{"patient_id": "P1", "note_id": "n2", "date": "2020-01-01", "text": "x"}', r"jsonl:2: missing field\(s\) \['note_type'\]"),
  ('{"patient_id": "P1", "note_id": "n2", "date": "01/02/2020", "note_type": "clinic_note", "text": "x"}',
   r"jsonl:2: date '01/02/2020' is not an ISO date"),
  ('{"patient_id": "P1", "note_id": "n2", "date": "2020-02-31", "note_type": "clinic_note", "text": "x"}',
   r"jsonl:2: date '2020-02-31' is not a valid calendar date"),
  ('{"patient_id": "P1", "note_id": "n1", "date": "2020-02-01", "note_type": "clinic_note", "text": "x"}',
   r"jsonl:2: duplicate note_id 'n1'"),
  ('[1, 2]', r"jsonl:2: expected a JSON object"),
])
def test_malformed_notes_name_file_and_line(tmp_path, line, message):
  good = json.dumps({"patient_id": "P1", "note_id": "n1", "date": "2020-01-01", "note_type": "clinic_note", "text": "x"})
  path = tmp_path / "notes.jsonl"
  path.write_text(good + "\n" + line + "\n")
  with pytest.raises(ValueError, match=message) as e:
    read_notes(path)
  assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_malformed_labels_and_tree(tmp_path):
  path = tmp_path / "labels.jsonl"
  path.write_text('{"patient_id": "P1", "attribute": "ecog", "value": "1"}\n{"patient_id": "P1", "attribute": "ecog", "value": "2"}\n')
  with pytest.raises(ValueError, match=r"labels\.jsonl:2: a second label for P1/ecog"):
    read_labels(path)
  path.write_text('{"patient_id": "P1", "attribute": "ecog", "value": 1}\n')
  with pytest.raises(ValueError, match=r"jsonl:1: field\(s\) \['value'\] must be strings"):
    read_labels(path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    read_notes(tmp_path / "missing")
  (tmp_path / "tree" / "P1").mkdir(parents=True)
  (tmp_path / "tree" / "P1" / "clinic.txt").write_text("x")
  with pytest.raises(ValueError, match=r"clinic\.txt: note file names must be <yyyy-mm-dd>_<note_type>"):
    read_notes(tmp_path / "tree")
