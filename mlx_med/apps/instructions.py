"""A local instruction-tuning data set: where METASCALE draws problem-solving strategies from.

METASCALE seeds part of its meta-thought pool with strategies read off instruction/response
pairs (how an expert answer to a similar request was organised). Offline there is no public
instruction corpus to draw from, so this module writes a seeded synthetic one: medical
instructions in several categories (differential diagnosis, medication safety, patient
education, ...), each with a response whose *structure* follows the category's approach (the filled-in facts are random and are not
medical advice: only the shape of the answer matters here). Any
other JSONL file with "instruction" and "response" fields (an exported chat log, a public
instruction set the user has locally) loads the same way.

It also makes the synthetic evaluation prompts of the METASCALE demo: open medical questions with
the key points a good answer covers (so a deterministic keyword scorer has a known optimum).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from typing import Any

from mlx_med.core.fileio import read_jsonl_objects, write_jsonl

# category -> (expert role, the approach its responses follow, instruction templates, response skeleton)
CATEGORIES: dict[str, dict[str, Any]] = {
    "differential_diagnosis": {
        "role": "an internist who reasons from the presentation to a ranked differential",
        "approach": "list the findings, rank the likely causes by probability and danger, then name the "
                    "test that separates the top candidates",
        "instructions": ["A {age}-year-old presents with {symptom} and {symptom2}. What is the differential?",
                         "Which conditions explain {symptom} with {symptom2} in a {age}-year-old patient?"],
        "response": "Key findings: {symptom}, {symptom2}. Most likely: {dx1}; must not miss: {dx2}. "
                    "Next step: {test} to separate them.",
    },
    "medication_safety": {
        "role": "a clinical pharmacist who checks every prescription for harm",
        "approach": "check indication, dose against weight and kidney function, interactions and "
                    "contraindications, then state a safe plan and what to monitor",
        "instructions": ["Is {drug} safe for a patient with {condition}?",
                         "Review the dose of {drug} for a {age}-year-old with {condition}."],
        "response": "Indication checked. Dose: adjust {drug} for {condition}. Interactions: review the "
                    "medication list. Monitor: {test}.",
    },
    "patient_education": {
        "role": "a nurse educator who explains medicine in plain words",
        "approach": "explain what the condition is in one sentence, what the patient should do, and which "
                    "warning signs need urgent care, avoiding jargon",
        "instructions": ["Explain {condition} to a patient in simple terms.",
                         "How should I describe the warning signs of {condition} to a family?"],
        "response": "{condition} means the body is not working as it should. What to do: take {drug} as "
                    "prescribed. Seek help at once if {symptom} appears.",
    },
    "guideline_summary": {
        "role": "an evidence-based-medicine specialist who summarises guidelines",
        "approach": "state the recommendation, its strength and evidence level, who it applies to, and "
                    "the main exception",
        "instructions": ["Summarise the management of {condition}.",
                         "What do guidelines recommend first for {condition}?"],
        "response": "Recommendation: {drug} first line for {condition} (strong, high-quality evidence). "
                    "Applies to adults; exception: contraindication to {drug}.",
    },
    "triage": {
        "role": "an emergency physician who decides urgency first",
        "approach": "check airway, breathing and circulation red flags, decide the urgency level, then "
                    "the immediate actions",
        "instructions": ["A patient calls with {symptom}. How urgent is it?",
                         "Triage a {age}-year-old with {symptom} and {symptom2}."],
        "response": "Red flags: {symptom2}. Urgency: same-day assessment, emergency if it worsens. "
                    "Immediate action: {test}.",
    },
    "lab_interpretation": {
        "role": "a laboratory physician who reads results in clinical context",
        "approach": "compare each value with its reference range, group the abnormal values into a "
                    "pattern, and link the pattern to a cause and a next test",
        "instructions": ["Interpret an abnormal {test} in a patient with {symptom}.",
                         "What does a raised result on {test} suggest with {condition}?"],
        "response": "Abnormal: {test}. Pattern: consistent with {dx1}. Next: repeat {test} and assess "
                    "for {dx2}.",
    },
}

_FILL = {
    "age": ["24", "37", "52", "68", "81"],
    "symptom": ["chest pain", "fever", "shortness of breath", "headache", "abdominal pain", "fatigue"],
    "symptom2": ["weight loss", "cough", "confusion", "palpitations", "night sweats", "vomiting"],
    "condition": ["chronic kidney disease", "heart failure", "type 2 diabetes", "asthma", "atrial fibrillation",
                  "hypertension"],
    "drug": ["metformin", "warfarin", "lisinopril", "amoxicillin", "furosemide", "apixaban"],
    "dx1": ["pneumonia", "heart failure", "anaemia", "hypothyroidism", "urinary infection"],
    "dx2": ["pulmonary embolism", "sepsis", "myocardial infarction", "malignancy", "aortic dissection"],
    "test": ["a full blood count", "troponin", "a chest X-ray", "creatinine", "an ECG", "a CT scan"],
}


def _draw(rng: random.Random) -> dict[str, str]:
  return {k: rng.choice(v) for k, v in _FILL.items()}


def generate_instructions(n: int, *, seed: int = 0) -> list[dict[str, str]]:
  """`n` synthetic medical instruction/response records {"instruction", "response", "category"}."""
  if n < 0:
    raise ValueError(f"n={n}; give a non-negative number of instructions")
  rng = random.Random(seed)
  names = sorted(CATEGORIES)
  rows = []
  for i in range(n):
    cat = names[i % len(names)] if i < len(names) else rng.choice(names)
    spec = CATEGORIES[cat]
    template = rng.choice(spec["instructions"])
    values = _draw(rng)  # one draw fills instruction and response alike, so the answer matches the request
    instruction, response = template.format(**values), spec["response"].format(**values)
    rows.append({"instruction": instruction, "response": response, "category": cat})
  return rows


def write_instructions(path: str | os.PathLike, n: int = 120, *, seed: int = 0) -> int:
  """Writes `generate_instructions(n, seed=seed)` to `path` (JSONL); returns the count."""
  return write_jsonl(path, generate_instructions(n, seed=seed))


def load_instructions(path: str | os.PathLike) -> list[dict[str, str]]:
  """Reads any JSONL whose lines hold string "instruction" and "response" fields ("category" optional)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"instruction file {path} does not exist; write one with "
                            "mlx_med.apps.instructions.write_instructions(path) or point to your JSONL")
  rows = []
  for where, row in read_jsonl_objects(path, "a JSON object with 'instruction' and 'response'"):
    for key in ("instruction", "response"):
      if not isinstance(row.get(key), str) or not row[key].strip():
        raise ValueError(f"{where}: field {key!r} is missing or not a non-empty string; "
                         "each line needs string 'instruction' and 'response' fields")
    rows.append({"instruction": row["instruction"], "response": row["response"],
                 "category": str(row.get("category", ""))})
  if not rows:
    raise ValueError(f"{path}: no instruction records; the file is empty")
  return rows


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> set[str]:
  return set(_WORD.findall(text.lower()))


def most_relevant(rows: Sequence[dict[str, str]], query: str, k: int, *, seed: int = 0) -> list[dict[str, str]]:
  """The `k` records whose instruction shares the most words with `query` (Jaccard; seeded tie-break).

  METASCALE draws strategies from instruction data *relevant to the task*; word overlap is enough
  to prefer a dosing example for a dosing question without another index.
  """
  if k <= 0 or not rows:
    return []
  q = _words(query)
  rng = random.Random(seed)
  keyed = []
  for row in rows:
    w = _words(row["instruction"])
    jac = len(q & w) / max(1, len(q | w))
    keyed.append((-jac, rng.random(), row))
  keyed.sort(key=lambda t: (t[0], t[1]))
  return [row for _, _, row in keyed[:k]]


# The demo's evaluation prompts: open questions with the key points a complete answer covers.
_EVAL_PROMPTS = [
    ("A 68-year-old with heart failure starts furosemide. What should be monitored?",
     ["potassium", "creatinine", "weight", "blood pressure"]),
    ("Explain atrial fibrillation and why anticoagulation is offered.",
     ["irregular", "stroke", "clot", "bleeding"]),
    ("A patient with chronic kidney disease takes metformin. Is the dose safe?",
     ["egfr", "lactic acidosis", "dose", "kidney"]),
    ("Which red flags in a headache need emergency imaging?",
     ["sudden", "neurological", "fever", "worst"]),
    ("How should type 2 diabetes be managed first?",
     ["lifestyle", "metformin", "hba1c", "diet"]),
    ("A 24-year-old has fever and cough. What is the differential?",
     ["pneumonia", "viral", "x-ray", "oxygen"]),
    ("Interpret a raised troponin in a patient with chest pain.",
     ["myocardial", "ecg", "repeat", "infarction"]),
    ("Triage an 81-year-old with confusion and vomiting.",
     ["urgent", "sepsis", "glucose", "dehydration"]),
]


def eval_prompts(n: int | None = None) -> list[dict[str, Any]]:
  """Synthetic open medical questions {"prompt", "key_points"} (the first `n`, cycling if larger)."""
  rows = [{"prompt": p, "key_points": list(k)} for p, k in _EVAL_PROMPTS]
  if n is None:
    return rows
  return [rows[i % len(rows)] for i in range(n)]
