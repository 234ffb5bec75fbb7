"""Synthetic medical MCQA: determinism, one correct option, two-hop structure, disjoint splits, I/O."""

from __future__ import annotations

import collections
import itertools
import json
import re

import pytest

from mlx_med.rl import data, synth


@pytest.fixture(scope="module")
def kb():
  return synth.KnowledgeBase.generate(0)


@pytest.fixture(scope="module")
def splits(kb):
  return synth.make_mcqa_splits(kb, n_train=800, n_eval=200, seed=0)


def test_knowledge_base_is_deterministic_and_seeded(kb):
  again = synth.KnowledgeBase.generate(0)
  assert again == kb and again.facts() == kb.facts()
  assert synth.KnowledgeBase.generate(1) != kb


def test_knowledge_base_structure(kb):
  assert len(kb.diseases) == 24 and all(len(fs) == 3 for fs in kb.diseases.values())
  names = list(kb.diseases) + list(kb.drugs)
  assert len({n.lower() for n in names}) == len(names)
  assert all(re.fullmatch(r"[A-Z][a-z]{4,11}", n) for n in names), names
  uses = collections.Counter(f for fs in kb.diseases.values() for f in fs)
  assert max(uses.values()) == 2 and sum(c == 2 for c in uses.values()) >= 4  # some findings are ambiguous alone
  for a, b in itertools.combinations(kb.diseases, 2):  # ... but any two findings of a disease name it
    assert len(set(kb.diseases[a]) & set(kb.diseases[b])) <= 1
  for fs in kb.diseases.values():
    for pair in itertools.combinations(fs, 2):
      assert len(kb.consistent_diseases(pair)) == 1
  assert all(1 <= len(t) <= 2 for t in kb.drugs.values())
  assert any(len(t) == 2 for t in kb.drugs.values())
  assert all(kb.drugs_for(x) for x in kb.diseases)
  assert all(len(c) == 1 for c in kb.contraindications.values()) and len(kb.conditions) >= 2


def test_facts_and_json_round_trip(kb, tmp_path):
  facts = kb.facts()
  disease, findings = next(iter(kb.diseases.items()))
  assert f"{disease} presents with {findings[0]}, {findings[1]} and {findings[2]}." in facts
  drug = kb.drugs_for(disease)[0]
  assert f"{disease} is treated with {drug}." in facts
  assert f"{drug} is contraindicated in {kb.contraindications[drug][0]}." in facts
  p = kb.save(tmp_path / "kb" / "kb.json")
  assert synth.KnowledgeBase.load(p) == kb
  assert [f.name for f in (tmp_path / "kb").iterdir()] == ["kb.json"]
  bad = json.loads((tmp_path / "kb" / "kb.json").read_text())
  first, second = list(bad["diseases"])[:2]
  bad["diseases"][second] = list(bad["diseases"][first])  # two diseases with the same findings
  (tmp_path / "bad.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match="share more than one finding"):
    synth.KnowledgeBase.load(tmp_path / "bad.json")


def test_splits_are_deterministic(kb, splits):
  assert synth.make_mcqa_splits(kb, n_train=800, n_eval=200, seed=0) == splits
  other = synth.make_mcqa_splits(kb, n_train=800, n_eval=200, seed=1)
  assert [e.question for e in other[0]] != [e.question for e in splits[0]]


def test_held_out_never_repeats_a_training_question(splits):
  train, held_out = splits
  key = lambda e: (e.question, tuple(e.options.values()))
  train_keys = {key(e) for e in train}
  assert len(train_keys) == len(train) and len({key(e) for e in held_out}) == len(held_out)
  assert not train_keys & {key(e) for e in held_out}
  assert len({e.id for e in train + held_out}) == len(train) + len(held_out)


def test_exactly_one_correct_option(kb, splits):
  for ex in splits[0] + splits[1]:
    assert synth.correct_options(ex, kb) == [ex.answer], ex.id
    assert len(set(ex.options.values())) == len(ex.options) == 4


def test_exactly_one_correct_option_from_first_principles(kb, splits):
  """The same property without correct_options: each type's rule spelled out on the raw KB dicts."""
  for ex in splits[0][:300]:
    right = []
    for letter, text in ex.options.items():
      if ex.category == "diagnosis":
        ok = set(ex.meta["findings"]) <= set(kb.diseases.get(text, ()))
      elif ex.category == "treatment_vignette":
        ok = any(set(ex.meta["findings"]) <= set(kb.diseases[x]) for x in kb.drugs[text])
      elif ex.category == "treatment":
        ok = ex.meta["disease"] in kb.drugs[text]
      else:
        ok = ex.meta["condition"] in kb.contraindications[text]
      right += [letter] * ok
    assert right == [ex.answer], ex.id


def test_categories_hops_and_answer_letters(splits):
  train, held_out = splits
  counts = collections.Counter(e.category for e in train)
  assert set(counts) == set(synth.QUESTION_TYPES)
  assert counts["treatment_vignette"] == 240  # two_hop_fraction 0.3 of 800
  for e in train:
    assert e.meta["hops"] == synth.HOPS[e.category] and e.meta["source"] == "synthetic"
  assert len(held_out) == 200
  for split in (train, held_out):
    letters = collections.Counter(e.answer for e in split)
    assert set(letters) == set("ABCD")
    assert max(letters.values()) - min(letters.values()) <= 1, letters  # balanced over positions
  by_type = collections.defaultdict(collections.Counter)
  for e in train:
    by_type[e.category][e.answer] += 1
  for c in by_type.values():  # no letter prior within a type either (loose: random assignment per type)
    assert min(c.values()) >= 0.12 * sum(c.values()), c


def test_two_hop_questions_need_both_facts(kb, splits):
  two_hop = [e for e in splits[0] if e.category == "treatment_vignette"]
  assert two_hop
  lured = 0
  for ex in two_hop:
    findings = ex.meta["findings"]
    disease = kb.diagnose(findings)
    text = (ex.question + " " + " ".join(ex.options.values())).lower()
    assert not any(x.lower() in text for x in kb.diseases), ex.id  # no disease is named anywhere
    assert all(f in ex.question for f in findings) and len(findings) >= 2
    assert kb.treats(ex.options[ex.answer], disease)  # hop 2 holds for the answer
    assert not any(kb.treats(ex.options[k], disease) for k in ex.options if k != ex.answer)
    # hop 1 needs the combination whenever a shown finding is shared: a distractor then treats a disease
    # that one finding alone would suggest
    if any(len([x for x in kb.diseases if f in kb.diseases[x]]) == 2 for f in findings):
      others = {x for f in findings for x in kb.diseases if f in kb.diseases[x]} - {disease}
      lured += any(any(kb.treats(ex.options[k], x) for x in others) for k in ex.options if k != ex.answer)
  assert lured >= 10


def test_diagnosis_distractors_are_plausible(kb, splits):
  diag = [e for e in splits[0] if e.category == "diagnosis"]
  with_lure = sum(any(set(kb.diseases[v]) & set(e.meta["findings"]) for k, v in e.options.items() if k != e.answer)
                  for e in diag)
  assert with_lure >= 0.2 * len(diag)


def test_reference_solution(kb, splits):
  by_type = {}
  for ex in splits[0]:
    by_type.setdefault(ex.category, ex)
  for qtype, ex in by_type.items():
    sol = synth.reference_solution(ex, kb)
    m = re.fullmatch(r"<think>(.+)</think><answer>([A-D])</answer>", sol)
    assert m and m.group(2) == ex.answer, sol
    think = m.group(1)
    assert len(think.split()) <= 30, think
    assert ex.options[ex.answer] in think
    if qtype == "treatment_vignette":
      disease = kb.diagnose(ex.meta["findings"])
      assert f"point to {disease}." in think and f"{disease} is treated with {ex.options[ex.answer]}." in think
  for ex in splits[0]:
    synth.reference_solution(ex, kb)  # every example's chain follows from the KB
  wrong = data.MCQAExample(id="w", question=ex.question, options=ex.options,
                           answer=next(k for k in ex.options if k != ex.answer), category=ex.category, meta=ex.meta)
  with pytest.raises(ValueError, match="does not follow"):
    synth.reference_solution(wrong, kb)


def test_texts_stay_short(splits):
  lengths = [len(e.question.split()) for e in splits[0]]
  assert max(lengths) <= 30 and sum(lengths) / len(lengths) < 20


def test_five_options_and_round_trip_through_jsonl(kb, tmp_path):
  train, held_out = synth.make_mcqa_splits(kb, n_train=100, n_eval=20, seed=3, num_options=5, two_hop_fraction=0.5)
  assert all(e.letters == "ABCDE" and synth.correct_options(e, kb) == [e.answer] for e in train + held_out)
  assert sum(e.meta["hops"] == 2 for e in train) == 50
  p = data.write_jsonl(train, tmp_path / "train.jsonl")
  assert data.load_mcqa("synthetic_jsonl", p) == train


def test_bad_arguments(kb):
  with pytest.raises(ValueError, match="num_drugs must be >="):
    synth.KnowledgeBase.generate(0, num_diseases=10, num_drugs=4)
  with pytest.raises(ValueError, match="findings_per_disease"):
    synth.KnowledgeBase.generate(0, findings_per_disease=1)
  with pytest.raises(ValueError, match="num_options"):
    synth.make_mcqa_splits(kb, n_train=1, n_eval=1, seed=0, num_options=1)
  small = synth.KnowledgeBase.generate(0, num_diseases=4, num_drugs=4, num_conditions=2)
  with pytest.raises(ValueError, match="distinct"):  # the question space is exhausted
    synth.make_mcqa_splits(small, n_train=5000, n_eval=10, seed=0, two_hop_fraction=0.0)


def test_reference_solutions_earn_full_reward_without_leak(kb, splits):
  from mlx_med.rl import functions

  fmt, acc, leak = (functions.get("reward", n) for n in ("format", "mcqa_accuracy", "answer_leak"))
  for ex in splits[0][:200]:
    sol, d = synth.reference_solution(ex, kb), ex.to_dict()
    assert (fmt(sol, d), acc(sol, d), leak(sol, d)) == (1.0, 1.0, 0.0), sol


def test_imperfect_teacher_is_wrong_on_a_share_of_facts_consistently(kb):
  teacher = kb.imperfect_teacher(0.5, seed=3)
  teacher.validate()
  assert kb.imperfect_teacher(0.0, seed=3).to_dict() == kb.to_dict()
  assert teacher.to_dict() == kb.imperfect_teacher(0.5, seed=3).to_dict()  # seeded
  n = len(kb.diseases)
  wrong_dx = [d for d in kb.diseases if sorted(teacher.diseases[d]) != sorted(kb.diseases[d])]
  wrong_rx = [d for d in kb.diseases if sorted(teacher.drugs_for(d)) != sorted(kb.drugs_for(d))]
  # half the diseases are in swapped pairs: a quarter of them by findings, a quarter by indications
  assert abs(len(wrong_dx) - n / 4) <= 2 and abs(len(wrong_rx) - n / 4) <= 2
  assert not set(wrong_dx) & set(wrong_rx)
  # a vignette of a swapped disease is diagnosed as its partner by the teacher
  d = wrong_dx[0]
  assert teacher.diagnose(kb.diseases[d]) != d


def test_sft_demonstrations_from_an_imperfect_teacher(kb):
  import ml_collections

  from mlx_med.rl import sft

  s = ml_collections.ConfigDict({"seed": 0, "num_options": 4, "two_hop_fraction": 0.3, "teacher_error_rate": 0.7})
  train, held_out = synth.make_mcqa_splits(kb, n_train=400, n_eval=60, seed=0)
  pairs = sft._imperfect_teacher(kb, train, held_out, s, 0.5)
  assert len(pairs) == 400
  from_teacher = [ex for ex, source in pairs if source is not kb]
  assert 0.6 * 400 < len(from_teacher) < 0.8 * 400  # ~70% of the demonstrations
  held = {(e.question, tuple(e.options.values())) for e in held_out}
  assert not held & {(e.question, tuple(e.options.values())) for e, _ in pairs}
  # Judged by the true knowledge base, a good share of the teacher's answers are wrong, the rest right.
  wrong = sum(synth.correct_options(ex, kb) != [ex.answer] for ex in from_teacher)
  assert 0.15 * len(from_teacher) < wrong < 0.75 * len(from_teacher)
  assert all(synth.correct_options(ex, kb) == [ex.answer] for ex, source in pairs if source is kb)
