"""MCQA loaders on small files in each dataset's real layout, their one-line bad-row errors, templates."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlx_med.rl import data

# Rows in the public layouts (texts invented; keys, types and value conventions as the datasets ship).
MEDQA_4 = [
    {"question": "A 23-year-old man has a fever and neck stiffness. Which organism is most likely?",
     "answer": "Neisseria meningitidis", "options": {"A": "Escherichia coli", "B": "Neisseria meningitidis",
                                                    "C": "Listeria monocytogenes", "D": "Group B streptococcus"},
     "meta_info": "step2&3", "answer_idx": "B", "metamap_phrases": ["fever", "neck stiffness"]},
    {"question": "Which vitamin deficiency causes scurvy?", "answer": "Vitamin C",
     "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"},
     "meta_info": "step1", "answer_idx": "C"},
]
MEDQA_5 = [
    {"question": "Which drug reverses heparin?", "answer": "Protamine sulfate",
     "options": {"A": "Vitamin K", "B": "Idarucizumab", "C": "Andexanet", "D": "Alteplase", "E": "Protamine sulfate"},
     "meta_info": "step1", "answer_idx": "E"},
]
MEDMCQA_1BASED = [  # original release JSON lines: cop counts 1..4
    {"question": "Which nerve supplies the deltoid?", "exp": "An explanation.", "cop": 4, "opa": "Radial",
     "opb": "Ulnar", "opc": "Median", "opd": "Axillary", "subject_name": "Anatomy", "topic_name": "Upper limb",
     "id": "e9ad821a-c438-4965-9f77-760819dfa155", "choice_type": "single"},
    {"question": "Drug of choice for absence seizures?", "exp": None, "cop": 1, "opa": "Ethosuximide",
     "opb": "Phenytoin", "opc": "Carbamazepine", "opd": "Gabapentin", "subject_name": "Pharmacology",
     "topic_name": None, "id": "0f2b3c4d", "choice_type": "single"},
]
MMLU_PRO = [
    {"question_id": 7001, "question": "Which organ produces insulin?", "options": ["Liver", "Pancreas", "Spleen",
     "Kidney", "Stomach", "Heart", "Lung", "Thyroid", "Adrenal gland", "Gallbladder"], "answer": "B",
     "answer_index": 1, "cot_content": "", "category": "health", "src": "ori_mmlu-college_medicine"},
    {"question_id": 7002, "question": "What is 2 + 2?", "options": ["3", "4", "5", "6"], "answer": "B",
     "answer_index": 1, "cot_content": "A: Let's think step by step.", "category": "math", "src": "ori_mmlu-x"},
    {"question_id": 7003, "question": "Which cell makes antibodies?", "options": ["T cell", "Neutrophil",
     "Plasma cell"], "answer": "C", "answer_index": 2, "cot_content": "", "category": "health", "src": "stemez-x"},
]


def _jsonl(tmp_path, name, rows):
  p = tmp_path / name
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return p


def _lines(tmp_path, name, lines):
  p = tmp_path / name
  p.write_text("".join(line + "\n" for line in lines))
  return p


def _one_line_error(excinfo, path, line):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  assert msg.startswith(f"{path}:{line}: "), msg
  assert "; " in msg, msg  # problem; fix
  return msg


# ----------------------------------------------------------------------------------------- MedQA


def test_medqa_four_and_five_options(tmp_path):
  ex = data.load_medqa(_jsonl(tmp_path, "phrases_no_exclude_test.jsonl", MEDQA_4))
  assert [e.answer for e in ex] == ["B", "C"]
  assert ex[0].options == MEDQA_4[0]["options"] and list(ex[0].options) == ["A", "B", "C", "D"]
  assert ex[0].category == "step2&3" and ex[0].meta["source"] == "medqa"
  assert ex[0].id == "phrases_no_exclude_test-1" and ex[1].id == "phrases_no_exclude_test-2"
  assert ex[0].to_dict()["answer"] == "B" and ex[0].to_dict()["options"]["B"] == "Neisseria meningitidis"
  five = data.load_mcqa("medqa", _jsonl(tmp_path, "test.jsonl", MEDQA_5))
  assert five[0].letters == "ABCDE" and five[0].answer == "E"


def test_medqa_parquet_with_mixed_option_counts(tmp_path):
  p = tmp_path / "medqa.parquet"
  pq.write_table(pa.Table.from_pylist(MEDQA_4[1:] + MEDQA_5), p)  # struct column: row 1 gets E = null
  ex = data.load_medqa(p)
  assert ex[0].letters == "ABCD" and ex[0].answer == "C"
  assert ex[1].letters == "ABCDE" and ex[1].answer == "E"


@pytest.mark.parametrize("line, problem", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"options": {"A": "x", "B": "y"}, "answer_idx": "A"}', "missing key 'question'"),
    ('{"question": "q?", "answer_idx": "A"}', "missing key 'options'"),
    ('{"question": "q?", "options": {"A": "x", "B": "y"}}', "missing key 'answer_idx'"),
    ('{"question": "q?", "options": {}, "answer_idx": "A"}', "'options' is empty"),
    ('{"question": "q?", "options": ["x", "y"], "answer_idx": "A"}', "'options' must be an object"),
    ('{"question": "q?", "options": {"A": "x", "C": "y"}, "answer_idx": "A"}', "not consecutive letters"),
    ('{"question": "q?", "options": {"A": "x", "B": 3}, "answer_idx": "A"}', "option 'B' must be a string"),
    ('{"question": "q?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}', "not one of the option letters AB"),
    ('{"question": "q?", "options": {"A": "x", "B": "y"}, "answer_idx": 1}', "'answer_idx' must be a letter"),
    ('{"question": 5, "options": {"A": "x", "B": "y"}, "answer_idx": "A"}', "'question' must be str"),
    ('{"question": "q?", "options": {"A": "x", "B": "y"}, "answer_idx": "A", "answer": "y"}', "'answer' text differs"),
])
def test_medqa_bad_rows_are_one_line_errors(tmp_path, line, problem):
  good = json.dumps(MEDQA_4[1])
  p = _lines(tmp_path, "bad.jsonl", [good, "", line])  # the blank line 2 is skipped, the bad row is line 3
  with pytest.raises(data.DataFormatError) as excinfo:
    data.load_medqa(p)
  msg = _one_line_error(excinfo, p, 3)
  assert problem in msg, msg
  assert "scurvy" not in msg and '"x"' not in msg  # never quotes the row's text


def test_answer_text_check_can_be_disabled(tmp_path):
  row = dict(MEDQA_4[1], answer="Ascorbic acid")
  p = _jsonl(tmp_path, "q.jsonl", [row])
  with pytest.raises(data.DataFormatError, match="check_answer_text=False"):
    data.load_medqa(p)
  assert data.load_medqa(p, check_answer_text=False)[0].answer == "C"


def test_empty_and_missing_files(tmp_path):
  p = tmp_path / "empty.jsonl"
  p.write_text("\n\n")
  with pytest.raises(data.DataFormatError) as excinfo:
    data.load_medqa(p)
  assert "no records" in _one_line_error(excinfo, p, 1)
  with pytest.raises(FileNotFoundError, match="no such file"):
    data.load_medqa(tmp_path / "absent.jsonl")
  with pytest.raises(ValueError, match="known: medqa, medmcqa, mmlu_pro, synthetic_jsonl"):
    data.load_mcqa("pubmedqa", p)


# --------------------------------------------------------------------------------------- MedMCQA


def test_medmcqa_one_based_detected(tmp_path):
  ex = data.load_medmcqa(_jsonl(tmp_path, "dev.json", MEDMCQA_1BASED))
  assert [e.answer for e in ex] == ["D", "A"]
  assert ex[0].options["D"] == "Axillary" and ex[0].category == "Anatomy"
  assert ex[0].id == "e9ad821a-c438-4965-9f77-760819dfa155"
  assert ex[0].meta == {"source": "medmcqa", "topic_name": "Upper limb", "choice_type": "single"}


def test_medmcqa_zero_based_parquet_detected(tmp_path):
  rows = [dict(r, cop=r["cop"] - 1) for r in MEDMCQA_1BASED]  # HF parquet: ClassLabel a..d = 0..3
  p = tmp_path / "train-00000-of-00001.parquet"
  pq.write_table(pa.Table.from_pylist(rows), p)
  assert [e.answer for e in data.load_mcqa("medmcqa", p)] == ["D", "A"]


def test_medmcqa_ambiguous_base_needs_cop_base(tmp_path):
  rows = [dict(MEDMCQA_1BASED[0], cop=2), dict(MEDMCQA_1BASED[1], cop=3)]
  p = _jsonl(tmp_path, "small.json", rows)
  with pytest.raises(data.DataFormatError) as excinfo:
    data.load_medmcqa(p)
  assert "cop_base=1" in _one_line_error(excinfo, p, 1)
  assert [e.answer for e in data.load_medmcqa(p, cop_base=1)] == ["B", "C"]
  assert [e.answer for e in data.load_medmcqa(p, cop_base=0)] == ["C", "D"]
  with pytest.raises(data.DataFormatError) as excinfo:  # 0 and 4 in one file
    data.load_medmcqa(_jsonl(tmp_path, "mixed.json", [dict(rows[0], cop=0), dict(rows[1], cop=4)]))
  assert "both 0 and 4" in str(excinfo.value)
  with pytest.raises(data.DataFormatError) as excinfo:  # explicit base, value out of its range
    data.load_medmcqa(_jsonl(tmp_path, "four.json", [rows[0], dict(rows[1], cop=4)]), cop_base=0)
  _one_line_error(excinfo, tmp_path / "four.json", 2)


@pytest.mark.parametrize("change, problem", [
    ({"cop": -1}, "unlabelled"),
    ({"cop": None}, "missing key 'cop'"),
    ({"cop": "b"}, "'cop' must be an integer"),
    ({"cop": 7}, "out of range"),
    ({"opc": None}, "'opc' must be str"),
    ({"question": ""}, "'question' is empty"),
])
def test_medmcqa_bad_rows(tmp_path, change, problem):
  p = _jsonl(tmp_path, "bad.json", [MEDMCQA_1BASED[0], dict(MEDMCQA_1BASED[1], **change)])
  with pytest.raises(data.DataFormatError) as excinfo:
    data.load_medmcqa(p)
  assert problem in _one_line_error(excinfo, p, 2)


# --------------------------------------------------------------------------------------- MMLU-Pro


def test_mmlu_pro_health_filter_jsonl(tmp_path):
  p = _jsonl(tmp_path, "mmlu_pro.jsonl", MMLU_PRO)
  health = data.load_mmlu_pro(p)
  assert [e.id for e in health] == ["7001", "7003"]
  assert health[0].letters == "ABCDEFGHIJ" and health[0].answer == "B" and health[1].answer == "C"
  assert health[0].category == "health" and health[0].meta["src"] == "ori_mmlu-college_medicine"
  everything = data.load_mcqa("mmlu_pro", p, health_only=False)
  assert [e.category for e in everything] == ["health", "math", "health"]
  assert everything[1].meta["cot_content"].startswith("A: Let's")


def test_mmlu_pro_parquet(tmp_path):
  p = tmp_path / "test-00000-of-00001.parquet"
  pq.write_table(pa.Table.from_pylist(MMLU_PRO), p)
  assert [e.answer for e in data.load_mmlu_pro(p)] == ["B", "C"]


def test_mmlu_pro_no_health_rows(tmp_path):
  p = _jsonl(tmp_path, "math.jsonl", [MMLU_PRO[1]])
  with pytest.raises(data.DataFormatError, match="health_only=False") as excinfo:
    data.load_mmlu_pro(p)
  assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("change, problem", [
    ({"options": []}, "'options' is empty"),
    ({"options": {"A": "x"}}, "'options' must be list"),
    ({"options": ["x"] * 11}, "more than 10"),
    ({"options": ["x", 2]}, "options[1] must be a string"),
    ({"answer": "E", "answer_index": None}, "'answer' 'E' is not one of the option letters ABC"),
    ({"answer": "A"}, "disagrees with 'answer_index'"),
    ({"answer_index": 5}, "outside 0..2"),
    ({"answer": None, "answer_index": None}, "missing key 'answer'"),
    ({"category": 3}, "'category' must be str"),
])
def test_mmlu_pro_bad_rows(tmp_path, change, problem):
  p = _jsonl(tmp_path, "bad.jsonl", [MMLU_PRO[0], dict(MMLU_PRO[2], **change)])
  with pytest.raises(data.DataFormatError) as excinfo:
    data.load_mmlu_pro(p)
  assert problem in _one_line_error(excinfo, p, 2)


# ---------------------------------------------------------------------------- round trip, templates


def test_write_jsonl_round_trip(tmp_path):
  ex = [data.MCQAExample(id="s-1", question="Which drug treats Morvexia?", options={"A": "Calbrotin", "B": "Dexolan",
        "C": "Pravitan", "D": "Zelmicin"}, answer="A", category="treatment", meta={"hops": 1, "source": "synthetic"})]
  p = data.write_jsonl(ex, tmp_path / "sub" / "train.jsonl")
  assert not [f for f in (tmp_path / "sub").iterdir() if f.name.endswith(".tmp")]
  assert data.load_mcqa("synthetic_jsonl", p) == ex
  as_medqa = data.load_medqa(p)[0]  # the same file reads as MedQA
  assert as_medqa.answer == "A" and as_medqa.category == "treatment" and as_medqa.meta == {"source": "medqa"}


def test_example_validation():
  with pytest.raises(ValueError, match="not one of the option letters"):
    data.MCQAExample(id="x", question="q", options={"A": "a", "B": "b"}, answer="C")
  with pytest.raises(ValueError, match="consecutive from A"):
    data.MCQAExample(id="x", question="q", options={"B": "a", "A": "b"}, answer="A")
  with pytest.raises(ValueError, match="options are empty"):
    data.MCQAExample(id="x", question="q", options={}, answer="A")


@pytest.mark.parametrize("template", data.TEMPLATES)
def test_templates_carry_question_options_and_tags(template):
  ex = data.MCQAExample(id="x", question="Which drug treats Morvexia?", options={"A": "Calbrotin", "B": "Dexolan",
                        "C": "Pravitan", "D": "Zelmicin"}, answer="C")
  msgs = data.build_messages(ex, template)
  assert msgs[-1]["role"] == "user" and all(set(m) == {"role", "content"} for m in msgs)
  text = "\n".join(m["content"] for m in msgs)
  assert "Which drug treats Morvexia?\nA. Calbrotin\nB. Dexolan\nC. Pravitan\nD. Zelmicin" in text
  assert data.build_messages(ex.to_dict(), template) == msgs  # a to_dict mapping works too
  if template == "plain":
    assert msgs[-1]["content"].endswith("\nAnswer:") and "<think>" not in text
  else:
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
      assert tag in text
  if template == "medrlvr":
    assert [m["role"] for m in msgs] == ["system", "user"] and "letter" in msgs[0]["content"]
  if template == "xreasoner":
    assert len(msgs) == 1 and msgs[0]["content"].index("<answer>") < msgs[0]["content"].index("Morvexia")
  with pytest.raises(ValueError, match="known: medrlvr, xreasoner, plain"):
    data.build_messages(ex, "r1")
