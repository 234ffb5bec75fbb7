"""UniMedAbstractor: attribute config, the universal template, aggregation rules, metrics against sklearn,
bootstrap intervals, and end-to-end abstraction with scripted clients (an oracle that answers from the
text it is shown, and one that always answers "unknown")."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
from sklearn.metrics import f1_score

from mlx_med.apps import uma
from mlx_med.apps.oncology import generate_cohort_with_facts, read_labels, write_cohort
from mlx_med.apps.uma import Attribute, aggregate, evaluate, load_attributes
from mlx_med.llm.client import Completion, LLMClient

ATTRS = load_attributes()
BY_NAME = {a.name: a for a in ATTRS}


class ScriptedClient(LLMClient):
  """Answers UMA extraction prompts with `answer(attribute_name, text) -> value`; records calls (thread-safe)."""

  model_name = "scripted"

  def __init__(self, answer):
    self.answer = answer
    self.calls: list[dict] = []
    self._lock = threading.Lock()

  def complete(self, prompt, **kw):
    raise NotImplementedError

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None, response_format=None, tools=None, tool_choice=None):
    user = next(m["content"] for m in messages if m["role"] == "user")   # a retry appends more messages
    name = re.search(r"^Attribute: (.+)$", user, re.MULTILINE).group(1).replace(" ", "_")
    text = user.split("Clinical text:\n", 1)[1]
    value, evidence = self.answer(name, text)
    with self._lock:
      self.calls.append({"attribute": name, "text": text, "response_format": response_format})
    return [Completion(text=json.dumps({"value": value, "evidence": evidence}), finish_reason="stop")]


def oracle_for(facts):
  """Answers with the value of a stated fact whose sentence is in the text shown (else unknown)."""
  by_attr: dict[str, list] = {}
  for f in facts:
    by_attr.setdefault(f.attribute, []).append(f)

  def answer(name, text):
    found = {f.value: f.sentence for f in by_attr.get(name, []) if f.sentence in text}
    assert len(found) <= 1, (name, found)
    if not found:
      return "unknown", ""
    value, sentence = next(iter(found.items()))
    return value, sentence[:100]
  return answer


@pytest.fixture(scope="module")
def cohort():
  return generate_cohort_with_facts(40, seed=11)


# ----------------------------------------------------------------------------------------- config

def test_default_attributes():
  assert len(ATTRS) == 15
  assert {a.context for a in ATTRS} == {"short", "long"}
  assert {a.name for a in ATTRS if a.context == "short"} == {"ecog", "treatment"}
  assert {a.aggregation for a in ATTRS} == set(uma.AGGREGATIONS)
  hist = BY_NAME["histology"]
  assert hist.rank("invasive ductal carcinoma") > hist.rank("adenocarcinoma") > hist.rank("carcinoma") >= 0
  assert hist.rank("invasive ductal carcinoma") == hist.rank("mucinous adenocarcinoma")
  assert BY_NAME["distant_metastasis"].positive == "yes"


def _write(tmp_path, entries):
  path = tmp_path / "attrs.json"
  path.write_text(json.dumps(entries))
  return path


GOOD = {"name": "smoking_status", "definition": "Tobacco smoking history.", "values": ["never", "former", "current"],
        "context": "short", "aggregation": "latest", "query": "smoking tobacco pack-years"}


@pytest.mark.parametrize("change, message", [
  ({"colour": "red"}, r"entry 0 \('smoking_status'\): unknown key\(s\) \['colour'\]"),
  ({"aggregation": "mode"}, r"entry 0 \('smoking_status'\): aggregation 'mode' is unknown"),
  ({"values": []}, r"entry 0 \('smoking_status'\): a categorical attribute needs a non-empty 'values'"),
  ({"values": ["never", ""]}, r"every allowed value must be a non-empty string"),
  ({"context": "medium"}, r"context 'medium' is unknown"),
  ({"aggregation": "most_specific"}, r"most_specific needs an 'order'"),
  ({"order": ["never", "daily"]}, r"'order' names \['daily'\]"),
  ({"aggregation": "any_positive"}, r"any_positive needs 'positive'"),
  ({"definition": ""}, r"'definition' must be a non-empty string"),
  ({"examples": [{"text": "x", "value": "sometimes"}]}, r"example 0 value 'sometimes' is not an allowed value"),
  ({"values": ["never", "unknown"]}, r"the unknown answer 'unknown' must not be an allowed value"),
])
def test_bad_attribute_entries(tmp_path, change, message):
  with pytest.raises(ValueError, match=message) as e:
    load_attributes(_write(tmp_path, [{**GOOD, **change}]))
  assert "\n" not in str(e.value) and "attrs.json" in str(e.value)


def test_bad_attribute_files(tmp_path):
  with pytest.raises(ValueError, match=r"attribute name\(s\) \['smoking_status'\] appear twice"):
    load_attributes(_write(tmp_path, [GOOD, GOOD]))
  with pytest.raises(ValueError, match="non-empty JSON list"):
    load_attributes(_write(tmp_path, {"name": "x"}))
  (tmp_path / "broken.json").write_text("[{")
  with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
    load_attributes(tmp_path / "broken.json")
  with pytest.raises(ValueError, match=r"entry 0: 'name' must be"):
    load_attributes(_write(tmp_path, [{**GOOD, "name": "two words"}]))


def test_new_attribute_is_only_a_config_entry(tmp_path):
  (attr,) = load_attributes(_write(tmp_path, [{**GOOD, "examples": [{"text": "Quit in 2010.", "value": "former",
                                                                     "evidence": "Quit in 2010"}]}]))
  system, user = uma.attribute_messages(attr, "Former smoker, 20 pack-years.")
  assert system["role"] == "system" and user["role"] == "user"
  content = user["content"]
  for piece in ("Attribute: smoking status", "Tobacco smoking history.", "Allowed values: never, former, current",
                '"value": one allowed value or "unknown"', "Examples:", 'Answer: {"value": "former", "evidence": "Quit in 2010"}',
                "Clinical text:\nFormer smoker, 20 pack-years."):
    assert piece in content, piece
  fmt = uma.attribute_response_format(attr)
  schema = fmt["json_schema"]["schema"]
  assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
  assert schema["properties"]["value"]["enum"] == ["never", "former", "current", "unknown"]
  assert schema["properties"]["evidence"]["maxLength"] == uma.EVIDENCE_MAX_CHARS
  assert set(schema["required"]) == {"value", "evidence"} and schema["additionalProperties"] is False
  model = uma.attribute_model(attr)
  assert model.model_validate_json(uma.attribute_answer(attr, "former", "Quit")).value == "former"
  with pytest.raises(Exception):
    model.model_validate({"value": "sometimes", "evidence": ""})


def test_answers_are_what_the_schema_constraint_writes(tmp_path):
  """Every attribute's answer text (the embedded model's training target) passes its own constraint."""
  from hf_tiny import write_tokenizer

  from mlx_med.llm import grammar
  from mlx_med.llm.tokenizer import ChatTokenizer

  write_tokenizer(str(tmp_path))
  tok = ChatTokenizer.from_dir(str(tmp_path))
  for attr in ATTRS:
    fmt = uma.attribute_response_format(attr)
    for value, evidence in [(v, "ECOG 1. Stage IIIA, \"quoted\"") for v in attr.values] + [("unknown", "")]:
      c = grammar.constraint_for_response_format(fmt, tok, 384)
      for t in tok.hf.encode(uma.attribute_answer(attr, value, evidence), add_special_tokens=False):
        c.advance(t)
      assert c.is_accepting(), (attr.name, value)
    c = grammar.constraint_for_response_format(fmt, tok, 384)
    with pytest.raises(ValueError, match="not allowed"):   # a value outside the enum cannot be written
      for t in tok.hf.encode('{"value": "zzz"', add_special_tokens=False):
        c.advance(t)


def test_template_parts_and_optional_examples():
  t = uma.uma_template()
  assert t.names == ("task", "attribute", "values", "schema", "examples", "text")
  _, user = uma.attribute_messages(BY_NAME["grade"], "grade 2")   # no examples configured
  assert "Examples:" not in user["content"] and "Allowed values: G1, G2, G3" in user["content"]
  custom = t.replace("task", "Abstract the attribute. Unknown is \"{unknown}\".")
  _, user = uma.attribute_messages(BY_NAME["grade"], "grade 2", template=custom)
  assert user["content"].startswith('Abstract the attribute. Unknown is "unknown".')


# ----------------------------------------------------------------------------------------- aggregation

def _attr(aggregation, values=("a", "b", "c"), order=None, positive=None):
  return Attribute(name="x", definition="d", values=list(values), aggregation=aggregation, query="q",
                   order=order, positive=positive)


def test_aggregation_rules():
  answers = [("2021-03-01", "n3", "b"), ("2020-01-01", "n1", "a"), ("2021-03-01", "n4", "unknown"),
             ("2020-06-01", "n2", "c"), ("2022-01-01", "n5", "unknown")]
  assert aggregate(_attr("latest"), answers) == ("b", ["n3"])
  assert aggregate(_attr("earliest"), answers) == ("a", ["n1"])
  # Same date: the later note (input order) wins for latest.
  assert aggregate(_attr("latest"), [("2020-01-01", "p", "a"), ("2020-01-01", "q", "c")]) == ("c", ["q"])
  # most_specific with levels: T4b and T4a share a level above T4; ties go to the latest.
  t = _attr("most_specific", values=("T1", "T4", "T4a", "T4b"), order=[["T1"], ["T4"], ["T4a", "T4b"]])
  assert aggregate(t, [("2020-01-01", "1", "T4b"), ("2020-02-01", "2", "T4"), ("2020-03-01", "3", "T4a")]) == ("T4a", ["3"])
  assert aggregate(t, [("2020-01-01", "1", "T4"), ("2020-02-01", "2", "T1"), ("2020-03-01", "3", "T4")]) == ("T4", ["1", "3"])
  hist = BY_NAME["histology"]
  assert aggregate(hist, [("2020-01-01", "1", "invasive lobular carcinoma"), ("2020-05-01", "2", "carcinoma")])[0] == \
      "invasive lobular carcinoma"
  # highest on a severity scale (order defaults to the allowed values).
  grade = BY_NAME["grade"]
  assert aggregate(grade, [("2020-01-01", "1", "G3"), ("2020-05-01", "2", "G2")]) == ("G3", ["1"])
  assert aggregate(_attr("highest"), [("2020-01-01", "1", "c"), ("2020-05-01", "2", "a")]) == ("c", ["1"])
  # any_positive: one positive anywhere wins; otherwise the latest other value.
  met = BY_NAME["distant_metastasis"]
  assert aggregate(met, [("2020-01-01", "1", "no"), ("2020-05-01", "2", "yes"), ("2021-01-01", "3", "no")]) == ("yes", ["2"])
  assert aggregate(met, [("2020-01-01", "1", "no"), ("2020-05-01", "2", "unknown")]) == ("no", ["1"])
  # Nothing stated.
  for rule in uma.AGGREGATIONS:
    a = _attr(rule, order=["a", "b", "c"], positive="a")
    assert aggregate(a, []) == ("unknown", [])
    assert aggregate(a, [("2020-01-01", "1", "unknown")]) == ("unknown", [])


def test_value_probability():
  c = Completion(text='{"value":"G2","evidence":""}', finish_reason="stop",
                 tokens=['{"', 'value', '":"', 'G', '2', '","', 'evidence', '":""}'],
                 token_logprobs=[0.0, 0.0, 0.0, -0.1, -0.2, 0.0, -5.0, 0.0])
  assert uma.value_probability(c, "G2") == pytest.approx(np.exp(-0.3))
  assert uma.value_probability(Completion(text="{}", finish_reason="stop"), "G2") is None


# ----------------------------------------------------------------------------------------- metrics

def test_metrics_match_sklearn():
  a = _attr("latest", values=("x", "y", "z"))
  b = _attr("latest", values=("p", "q"))
  b.name = "y_attr"
  true_a = ["x", "x", "y", "z", "unknown", "y", "x", "z"]
  pred_a = ["x", "y", "y", "unknown", "x", "y", "x", "z"]
  true_b = ["p", "q", "q", "p", "p", "unknown", "q", "p"]
  pred_b = ["p", "q", "p", "p", "unknown", "unknown", "q", "q"]
  gold = {f"P{i}": {"x": ta, "y_attr": tb} for i, (ta, tb) in enumerate(zip(true_a, true_b))}
  preds = [{"patient_id": f"P{i}", "attribute": "x", "value": v} for i, v in enumerate(pred_a)]
  preds += [{"patient_id": f"P{i}", "attribute": "y_attr", "value": v} for i, v in enumerate(pred_b) if v != "unknown"]
  ev = evaluate(preds, gold, [a, b], n_boot=200)
  for attr, t, p in (("x", true_a, pred_a), ("y_attr", true_b, pred_b)):
    labels = sorted({v for v in t + p if v != "unknown"})
    m = ev["attributes"][attr]
    assert m["accuracy"] == pytest.approx(np.mean([u == v for u, v in zip(t, p)]))
    assert m["micro_f1"] == pytest.approx(f1_score(t, p, labels=labels, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(t, p, labels=labels, average="macro"))
    assert m["labels"] == labels
  pooled_t = [f"x={v}" for v in true_a] + [f"y={v}" for v in true_b]
  pooled_p = [f"x={v}" for v in pred_a] + [f"y={v}" for v in pred_b]
  labels = sorted({v for v in pooled_t + pooled_p if not v.endswith("=unknown")})
  o = ev["overall"]
  assert o["micro_f1"] == pytest.approx(f1_score(pooled_t, pooled_p, labels=labels, average="micro"))
  assert o["accuracy"] == pytest.approx(np.mean([u == v for u, v in zip(pooled_t, pooled_p)]))
  assert o["macro_f1"] == pytest.approx((ev["attributes"]["x"]["macro_f1"] + ev["attributes"]["y_attr"]["macro_f1"]) / 2)
  report = uma.report_markdown(ev)
  assert "| x | long |" in report and "| **overall** |" in report


def test_bootstrap_contains_point_and_narrows():
  rng = np.random.default_rng(0)
  a = _attr("latest", values=("x", "y", "z"))

  def run(n):
    true = rng.choice(["x", "y", "z"], size=n)
    pred = np.where(rng.random(n) < 0.7, true, rng.choice(["x", "y", "z"], size=n))
    gold = {f"P{i}": {"x": t} for i, t in enumerate(true)}
    preds = [{"patient_id": f"P{i}", "attribute": "x", "value": v} for i, v in enumerate(pred)]
    return evaluate(preds, gold, [a], n_boot=500, seed=1)["attributes"]["x"]

  small, large = run(40), run(640)
  # Accuracy is a mean over patients: its interval is core.stats' bootstrap of the per-patient
  # correctness (the same draws for the same seed).
  from mlx_med.core.stats import bootstrap_mean_ci
  true = rng.choice(["x", "y"], size=50)
  pred = np.where(rng.random(50) < 0.6, true, "z")
  ev = evaluate([{"patient_id": f"P{i:03d}", "attribute": "x", "value": v} for i, v in enumerate(pred)],
                {f"P{i:03d}": {"x": t} for i, t in enumerate(true)}, [a], n_boot=300, seed=5)["attributes"]["x"]
  ref = bootstrap_mean_ci((pred == true).astype(float), n_boot=300, seed=5)
  assert ev["accuracy"] == pytest.approx(ref["mean"])
  assert ev["accuracy_ci"] == pytest.approx([ref["lo"], ref["hi"]], abs=1e-12)
  for m in (small, large):
    for key in ("accuracy", "micro_f1", "macro_f1"):
      lo, hi = m[f"{key}_ci"]
      assert lo <= m[key] <= hi, (key, m)
  for key in ("accuracy", "micro_f1", "macro_f1"):
    width = lambda m: m[f"{key}_ci"][1] - m[f"{key}_ci"][0]
    assert width(large) < 0.5 * width(small), key   # ~1/sqrt(16) = 0.25 expected
  # Same seed, same intervals.
  with pytest.raises(ValueError, match="n_boot"):
    evaluate([], {"P0": {"x": "x"}}, [a], n_boot=0)


# ----------------------------------------------------------------------------------------- end to end

def _subset(cohort, n):
  notes, gold, facts = cohort
  pids = sorted(gold)[:n]
  return ([x for x in notes if x.patient_id in pids], {p: gold[p] for p in pids},
          [f for f in facts if f.patient_id in pids])


def test_oracle_abstracts_three_patients_perfectly(cohort):
  notes, gold, facts = _subset(cohort, 3)
  client = ScriptedClient(oracle_for(facts))
  rows = uma.abstract_patients(client, notes, ATTRS, max_workers=4)
  assert len(rows) == 3 * 15 and {r["patient_id"] for r in rows} == set(gold)
  ev = evaluate(rows, gold, ATTRS, n_boot=100)
  assert ev["overall"]["accuracy"] == 1.0
  assert all(m["accuracy"] == 1.0 for m in ev["attributes"].values())
  by_note = {n.note_id: n for n in notes}
  for r in rows:
    assert r["calls"] == r["notes_read"] and r["failed"] == 0
    assert 0.0 <= r["confidence"] <= 1.0
    for nid in r["evidence_note_ids"]:
      assert by_note[nid].patient_id == r["patient_id"]
    if r["value"] != "unknown":
      assert r["evidence"] and any(r["evidence"] in by_note[n].text for n in r["evidence_note_ids"])
  # Every call asked for the attribute's schema, and short-context attributes read whole recent notes.
  assert all(c["response_format"]["type"] == "json_schema" for c in client.calls)
  ecog_calls = [c for c in client.calls if c["attribute"] == "ecog"]
  assert len(ecog_calls) <= 3 * 3
  assert all(re.match(r"\[(clinic note|oncology consult), \d{4}-\d\d-\d\d\]\n", c["text"]) for c in ecog_calls)


def test_oracle_on_a_larger_cohort_and_retrieval_skips_notes(cohort):
  notes, gold, facts = cohort
  client = ScriptedClient(oracle_for(facts))
  rows = uma.abstract_patients(client, notes, ATTRS, max_workers=8, top_k=1)
  ev = evaluate(rows, gold, ATTRS, n_boot=100)
  assert ev["overall"]["accuracy"] == 1.0 and ev["overall"]["micro_f1"] == 1.0
  assert set(ev["by_context"]) == {"short", "long"} and ev["by_context"]["short"]["n"] == 2 * 40
  assert "| *short-context* |" in uma.report_markdown(ev)
  # The plan is public (the embedded model trains on exactly these excerpts) and matches the calls.
  jobs = uma.plan_extractions(notes, ATTRS, top_k=1)
  assert len(jobs) == len(client.calls) == sum(r["calls"] for r in rows)
  assert sorted((j.attribute.name, j.text) for j in jobs) == sorted((c["attribute"], c["text"]) for c in client.calls)
  # Retrieval reads fewer notes than "every note for every long attribute".
  n_long = sum(a.context == "long" for a in ATTRS)
  assert sum(r["notes_read"] for r in rows if BY_NAME[r["attribute"]].context == "long") < len(notes) * n_long


def test_unknown_client_and_review_queue(cohort, tmp_path):
  notes, gold, _ = _subset(cohort, 3)
  rows = uma.abstract_patients(ScriptedClient(lambda name, text: ("unknown", "")), notes, ATTRS, max_workers=2)
  assert all(r["value"] == "unknown" and r["evidence_note_ids"] == [] for r in rows)
  ev = evaluate(rows, gold, ATTRS, n_boot=100)
  n_unknown = sum(v == "unknown" for g in gold.values() for v in g.values())
  assert ev["overall"]["accuracy"] == pytest.approx(n_unknown / 45)
  assert ev["overall"]["micro_f1"] == 0.0
  # A client that contradicts itself note by note gets low confidence and those rows wait for review.
  from mlx_med.apps.review import ReviewQueue

  flip = {"n": 0}
  lock = threading.Lock()

  def erratic(name, text):
    with lock:
      flip["n"] += 1
      k = flip["n"]
    return BY_NAME[name].values[k % len(BY_NAME[name].values)], ""

  queue = ReviewQueue(str(tmp_path / "review.db"), threshold=0.7)
  rows = uma.abstract_patients(ScriptedClient(erratic), notes, ATTRS, max_workers=1, review=queue)
  queued = [r for r in rows if r["review"] is True]
  assert queued and all(r["confidence"] < 0.7 for r in queued)
  assert all(r["confidence"] >= 0.7 for r in rows if r["review"] is False)
  assert queue.stats()["pending"] == len(queued)
  # A second run replaces pending items but leaves a reviewed one alone.
  first = queued[0]
  queue.accept(f"{first['patient_id']}:{first['attribute']}", reviewer="dr")
  rows2 = uma.abstract_patients(ScriptedClient(erratic), notes, ATTRS, max_workers=1, review=queue)
  again = next(r for r in rows2 if (r["patient_id"], r["attribute"]) == (first["patient_id"], first["attribute"]))
  assert again["review"] == "accepted"
  queue.close()


def test_failed_calls_lower_confidence(cohort):
  notes, gold, _ = _subset(cohort, 1)
  rows = uma.abstract_patients(ScriptedClient(lambda name, text: ("not-a-value", "")), notes, ATTRS[:2],
                               max_workers=2, max_retries=1)
  for r in rows:
    assert r["value"] == "unknown" and r["failed"] == r["notes_read"] > 0
    assert r["calls"] == 2 * r["notes_read"] and r["confidence"] == 0.0


def test_a_raising_call_is_a_failed_note_not_a_failed_run(cohort, caplog):
  notes, gold, facts = _subset(cohort, 2)
  oracle = oracle_for(facts)

  def flaky(name, text):
    if name == "ecog":
      raise ConnectionError("endpoint down")
    return oracle(name, text)

  rows = uma.abstract_patients(ScriptedClient(flaky), notes, ATTRS, max_workers=3, progress=True)
  for r in rows:
    if r["attribute"] == "ecog":
      assert r["value"] == "unknown" and r["failed"] == r["notes_read"] > 0 and r["confidence"] == 0.0
    else:
      assert r["value"] == gold[r["patient_id"]][r["attribute"]] and r["failed"] == 0
  assert "ConnectionError" in caplog.text and "endpoint down" not in caplog.text


def test_abstract_main(tmp_path, cohort, capsys):
  notes, gold, facts = _subset(cohort, 5)
  write_cohort(tmp_path / "data", notes, gold)
  out = tmp_path / "run" / "predictions.jsonl"
  rc = uma.abstract_main(["--notes", str(tmp_path / "data"), "--out", str(out), "--labels",
                          str(tmp_path / "data" / "labels.jsonl"), "--n-boot", "50", "--max-workers", "3",
                          "--no-progress"],
                         client=ScriptedClient(oracle_for(facts)))
  assert rc == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 5 * 15
  ev = json.loads((tmp_path / "run" / "predictions.eval.json").read_text())
  assert ev["overall"]["accuracy"] == 1.0
  report = (tmp_path / "run" / "report.md").read_text()
  assert "| pathologic_t | long | 1.000" in report
  assert (tmp_path / "run" / "llm_calls.jsonl").exists()
  log = (tmp_path / "run" / "llm_calls.jsonl").read_text()
  assert notes[0].text.splitlines()[1][:40] not in log    # patient text stays out of the call log
  assert read_labels(tmp_path / "data") == gold
  # Bad input: one-line errors, exit code 2.
  assert uma.abstract_main(["--notes", str(tmp_path / "nope"), "--out", str(out)], client=object()) == 2
  assert uma.abstract_main(["--notes", str(tmp_path / "data"), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith("error: notes path") and "no model given" in err[1]
