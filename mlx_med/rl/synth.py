"""Synthetic verifiable medical multiple-choice QA over a random knowledge base.

Why synthetic: the RLVR loop needs questions whose answers a program can check and whose facts a
tiny model can learn on a CPU in minutes, without downloading a dataset. A seeded random knowledge
base gives both: the facts are written out as sentences (`KnowledgeBase.facts`) for pretraining,
and every question is generated from the same facts, so correctness is exact.

The knowledge base (numpy Generator, deterministic in the seed):
  * diseases with made-up, pronounceable names (a syllable generator, e.g. "Morvexia"), each with
    `findings_per_disease` characteristic findings drawn from a pool of real clinical findings.
    Roughly half the diseases share one finding with one other disease, so a single finding can be
    ambiguous; no two diseases share two findings, so any two findings of a disease name it uniquely;
  * drugs (made-up names with drug-like endings) that treat one or two diseases; every disease has
    at least one drug;
  * contraindications: each drug is contraindicated in one of a few comorbid conditions.

Question types (the example's `category`; `meta["hops"]` counts the facts chained):
  diagnosis           vignette of 2+ findings -> the disease                       (1 hop)
  treatment           "Which drug treats <disease>?"                               (1 hop)
  treatment_vignette  vignette -> disease -> drug; the disease is never named      (2 hops)
  contraindication    "Which drug is contraindicated in <condition>?"             (1 hop)
Distractors are plausible (diseases sharing a finding with the vignette, drugs for those diseases)
and never correct: `correct_options` recomputes the correct set from the knowledge base and the
generator asserts it has exactly one member. Answer letters are balanced across positions.

`make_mcqa_splits` returns a training and a held-out set over one knowledge base; no held-out
question repeats a training question (same stem and options). `reference_solution` writes the short
chain of thought an SFT stage imitates: "<think>fever, rash and joint pain point to Morvexia.
Morvexia is treated with Calbrotin.</think><answer>C</answer>".
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlx_med.rl.data import LETTERS, MCQAExample

QUESTION_TYPES = ("diagnosis", "treatment", "treatment_vignette", "contraindication")
HOPS = {"diagnosis": 1, "treatment": 1, "treatment_vignette": 2, "contraindication": 1}

# Real, short finding phrases (the disease names are invented; the findings read naturally).
FINDINGS = (
    "fever", "rash", "joint pain", "cough", "night sweats", "weight loss", "headache", "neck stiffness",
    "chest pain", "shortness of breath", "wheezing", "palpitations", "fainting", "leg swelling", "jaundice",
    "dark urine", "pale stools", "abdominal pain", "vomiting", "diarrhea", "constipation", "bloody stool",
    "blurred vision", "eye pain", "red eyes", "hearing loss", "ear pain", "sore throat", "hoarse voice",
    "neck lump", "tremor", "muscle weakness", "numb feet", "confusion", "seizures", "slurred speech",
    "back pain", "bone pain", "easy bruising", "nosebleeds", "gum bleeding", "pale skin", "fatigue",
    "hair loss", "dry skin", "itching", "hives", "mouth ulcers", "swollen glands", "frequent urination",
    "painful urination", "flank pain", "blood in urine", "excess thirst", "cold hands", "heat intolerance",
    "cold intolerance", "low mood", "anxiety", "insomnia", "memory loss", "dizziness", "ringing ears",
    "facial droop", "drooping eyelid", "double vision", "muscle cramps", "stiff joints", "swollen knee",
    "heel pain", "chest tightness", "bloating", "heartburn", "hiccups", "weak pulse", "fast pulse",
    "slow pulse", "high blood pressure", "low blood pressure", "blue lips", "clubbed fingers",
)
CONDITIONS = (
    "pregnancy", "kidney failure", "liver failure", "asthma", "heart block", "epilepsy", "peptic ulcer",
    "glaucoma", "gout", "low potassium", "myasthenia", "bleeding disorder",
)

_ONSETS = ("b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "pr", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("l", "n", "r", "s", "x", "m")
_DISEASE_ENDINGS = ("xia", "sis", "tis", "mia", "ma", "ria", "nia")
_DRUG_ENDINGS = ("tin", "mab", "pril", "zole", "cin", "dine", "vir", "lol", "pam")


def _join(items: Sequence[str]) -> str:
  """"a", "a and b", "a, b and c"."""
  items = list(items)
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _names(rng: np.random.Generator, n: int, endings: Sequence[str], taken: set[str]) -> list[str]:
  """n new pronounceable names (closed syllable, open syllable, ending: "Mor-ve-xia"); none a substring of another."""
  def pick(options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]

  out: list[str] = []
  for _ in range(200 * n + 1000):
    if len(out) == n:
      return out
    name = (pick(_ONSETS) + pick(_VOWELS) + pick(_CODAS) + pick(_ONSETS) + pick(_VOWELS) + pick(endings)).capitalize()
    low = name.lower()
    if any(low in t or t in low for t in taken):
      continue
    taken.add(low)
    out.append(name)
  raise ValueError(f"could not draw {n} distinct names; ask for fewer diseases or drugs")


@dataclasses.dataclass(frozen=True)
class KnowledgeBase:
  """A random medical knowledge base (see the module doc).

  Attributes:
    seed: the generator seed (for provenance; the contents below are authoritative).
    diseases: {disease: [finding, ...]} in generation order.
    drugs: {drug: [disease it treats, ...]} (1-2 diseases).
    contraindications: {drug: [condition, ...]}.
  """

  seed: int
  diseases: dict[str, list[str]]
  drugs: dict[str, list[str]]
  contraindications: dict[str, list[str]]

  # -------------------------------------------------------------------------------- generation

  @classmethod
  def generate(cls, seed: int, *, num_diseases: int = 24, findings_per_disease: int = 3,
               num_drugs: int | None = None, second_indication_prob: float = 0.25, share_prob: float = 0.5,
               num_conditions: int = 8, contraindications_per_drug: int = 1) -> KnowledgeBase:
    """Draws a knowledge base; the same arguments always give the same base.

    Args:
      seed: numpy Generator seed.
      num_diseases: diseases (>= 4, so four-option questions have distractors).
      findings_per_disease: characteristic findings per disease (>= 2; vignettes show 2 or more).
      num_drugs: drugs (default num_diseases; at least ceil(num_diseases / 2), since a drug treats at most 2).
      second_indication_prob: chance a drug treats a second disease.
      share_prob: chance a disease shares one finding with an earlier disease.
      num_conditions: comorbid conditions used for contraindications (<= len(CONDITIONS)).
      contraindications_per_drug: conditions each drug is contraindicated in.
    """
    num_drugs = num_diseases if num_drugs is None else num_drugs
    if num_diseases < 4:
      raise ValueError(f"num_diseases must be >= 4, got {num_diseases}")
    if findings_per_disease < 2:
      raise ValueError(f"findings_per_disease must be >= 2 (a vignette needs two findings), got {findings_per_disease}")
    if not (num_diseases + 1) // 2 <= num_drugs:
      raise ValueError(f"num_drugs must be >= ceil(num_diseases / 2) = {(num_diseases + 1) // 2} (a drug treats at most 2 diseases), got {num_drugs}")
    if num_drugs < 4:
      raise ValueError(f"num_drugs must be >= 4, got {num_drugs}")
    if not 1 <= num_conditions <= len(CONDITIONS):
      raise ValueError(f"num_conditions must be in 1..{len(CONDITIONS)}, got {num_conditions}")
    if not 1 <= contraindications_per_drug < num_conditions:
      raise ValueError(f"contraindications_per_drug must be in 1..{num_conditions - 1}, got {contraindications_per_drug}")
    rng = np.random.default_rng(seed)
    taken = {f.lower() for f in FINDINGS} | {c.lower() for c in CONDITIONS}
    disease_names = _names(rng, num_diseases, _DISEASE_ENDINGS, taken)
    drug_names = _names(rng, num_drugs, _DRUG_ENDINGS, taken)

    # Findings: the real pool in a seeded order, extended with invented lab findings if a big base needs more.
    pool = [FINDINGS[i] for i in rng.permutation(len(FINDINGS))]
    need = num_diseases * findings_per_disease
    if need > len(pool):
      pool += [f"high {n.lower()} level" for n in _names(rng, need - len(pool), ("ol", "in", "ase"), taken)]
    fresh = iter(pool)
    used_once: list[str] = []
    diseases: dict[str, list[str]] = {}
    for name in disease_names:
      chosen: list[str] = []
      if used_once and rng.random() < share_prob:
        chosen.append(used_once.pop(int(rng.integers(len(used_once)))))  # now used twice: never again
      while len(chosen) < findings_per_disease:
        f = next(fresh)
        chosen.append(f)
        used_once.append(f)
      # A shared finding is the only overlap with any other disease: the others are fresh.
      diseases[name] = [chosen[i] for i in rng.permutation(len(chosen))]

    # Indications: every disease gets one drug (round robin over a shuffled order), then second ones.
    order = [disease_names[i] for i in rng.permutation(num_diseases)]
    drugs: dict[str, list[str]] = {d: [] for d in drug_names}
    for j, disease in enumerate(order):
      drugs[drug_names[j % num_drugs]].append(disease)
    for d in drug_names:
      if not drugs[d]:
        drugs[d].append(disease_names[int(rng.integers(num_diseases))])
      if len(drugs[d]) == 1 and rng.random() < second_indication_prob:
        others = [x for x in disease_names if x not in drugs[d]]
        drugs[d].append(others[int(rng.integers(len(others)))])

    conditions = [CONDITIONS[i] for i in sorted(rng.choice(len(CONDITIONS), num_conditions, replace=False))]
    contraindications = {d: [conditions[i] for i in sorted(rng.choice(num_conditions, contraindications_per_drug,
                                                                     replace=False))] for d in drug_names}
    kb = cls(seed=int(seed), diseases=diseases, drugs=drugs, contraindications=contraindications)
    kb.validate()
    return kb

  def validate(self) -> None:
    """Checks the invariants questions rely on; raises ValueError naming the first violation."""
    names = list(self.diseases)
    for i, a in enumerate(names):
      if len(set(self.diseases[a])) != len(self.diseases[a]) or len(self.diseases[a]) < 2:
        raise ValueError(f"disease {a!r} needs two or more distinct findings")
      for b in names[i + 1:]:
        if len(set(self.diseases[a]) & set(self.diseases[b])) > 1:
          raise ValueError(f"diseases {a!r} and {b!r} share more than one finding, so a vignette could fit both")
    for d, targets in self.drugs.items():
      if not targets or any(t not in self.diseases for t in targets):
        raise ValueError(f"drug {d!r} must treat one or more known diseases")
    untreated = [x for x in names if not self.drugs_for(x)]
    if untreated:
      raise ValueError(f"disease {untreated[0]!r} has no drug")
    if set(self.contraindications) - set(self.drugs):
      raise ValueError("contraindications name an unknown drug")

  def imperfect_teacher(self, fraction: float, seed: int) -> KnowledgeBase:
    """A teacher's copy of this knowledge base in which `fraction` of the facts are wrong, consistently.

    Models the distilled chains of thought of stage-1 SFT: a teacher that is sure of some wrong
    facts. Disjoint pairs of diseases swap their finding sets (the teacher diagnoses one as the
    other), other pairs swap their places in the drugs' indications (the teacher prescribes one's
    drugs for the other), and pairs of drugs swap their contraindications; about `fraction` of the
    diseases and drugs are in some swapped pair. Swaps keep every invariant of `validate`, so the
    teacher's questions are well-formed and its answers consistent with its own beliefs.
    """
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng([int(seed), 17])
    diseases = {k: list(v) for k, v in self.diseases.items()}
    drugs = {k: list(v) for k, v in self.drugs.items()}
    contra = {k: list(v) for k, v in self.contraindications.items()}

    def pairs(names: list[str]) -> list[tuple[str, str]]:
      k = int(round(fraction * len(names) / 2))
      order = [names[i] for i in rng.permutation(len(names))]
      return [(order[2 * i], order[2 * i + 1]) for i in range(min(k, len(order) // 2))]

    names = list(diseases)
    half = [names[i] for i in rng.permutation(len(names))]
    for a, b in pairs(half[:len(half) // 2]):  # findings swapped: wrong diagnoses
      diseases[a], diseases[b] = diseases[b], diseases[a]
    for a, b in pairs(half[len(half) // 2:]):  # indications swapped: wrong treatments
      swap = {a: b, b: a}
      drugs = {d: [swap.get(t, t) for t in targets] for d, targets in drugs.items()}
    for a, b in pairs(list(contra)):  # contraindications swapped
      contra[a], contra[b] = contra[b], contra[a]
    teacher = KnowledgeBase(seed=self.seed, diseases=diseases, drugs=drugs, contraindications=contra)
    teacher.validate()
    return teacher

  # ---------------------------------------------------------------------------------- queries

  @property
  def conditions(self) -> list[str]:
    return sorted({c for cs in self.contraindications.values() for c in cs})

  def drugs_for(self, disease: str) -> list[str]:
    return [d for d, targets in self.drugs.items() if disease in targets]

  def treats(self, drug: str, disease: str) -> bool:
    return disease in self.drugs.get(drug, ())

  def consistent_diseases(self, findings: Sequence[str]) -> list[str]:
    """Diseases that show every one of `findings`."""
    return [x for x, fs in self.diseases.items() if set(findings) <= set(fs)]

  def diagnose(self, findings: Sequence[str]) -> str:
    """The one disease that shows all `findings`; ValueError when none or several do."""
    hits = self.consistent_diseases(findings)
    if len(hits) != 1:
      raise ValueError(f"{len(hits)} diseases fit the findings {list(findings)}; a vignette must fit exactly one")
    return hits[0]

  def facts(self) -> list[str]:
    """Every fact as one sentence, in a fixed order (pretraining text)."""
    out = [f"{x} presents with {_join(fs)}." for x, fs in self.diseases.items()]
    for x in self.diseases:
      out += [f"{x} is treated with {d}." for d in self.drugs_for(x)]
    for d, targets in self.drugs.items():
      out.append(f"{d} treats {_join(targets)}.")
    for d, cs in self.contraindications.items():
      out += [f"{d} is contraindicated in {c}." for c in cs]
    return out

  # ------------------------------------------------------------------------------------- I/O

  def to_dict(self) -> dict:
    return {"seed": self.seed, "diseases": self.diseases, "drugs": self.drugs,
            "contraindications": self.contraindications}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> KnowledgeBase:
    try:
      kb = cls(seed=int(d["seed"]), diseases={k: list(v) for k, v in d["diseases"].items()},
               drugs={k: list(v) for k, v in d["drugs"].items()},
               contraindications={k: list(v) for k, v in d["contraindications"].items()})
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"not a knowledge base: {type(e).__name__} {e}; expected keys seed, diseases, drugs, "
                       "contraindications as written by KnowledgeBase.save") from None
    kb.validate()
    return kb

  def save(self, path: str | os.PathLike) -> str:
    """JSON, written under a temporary name and renamed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
      tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
      os.replace(tmp, p)
    finally:
      if tmp.exists():
        tmp.unlink()
    return str(p)

  @classmethod
  def load(cls, path: str | os.PathLike) -> KnowledgeBase:
    p = Path(path)
    try:
      d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{p}:{e.lineno}: invalid JSON ({e.msg}); write the file with KnowledgeBase.save") from None
    try:
      return cls.from_dict(d)
    except ValueError as e:
      raise ValueError(f"{p}: {e}") from None


# ------------------------------------------------------------------------------------- questions


def _vignette(rng: np.random.Generator, findings: Sequence[str]) -> str:
  age = int(rng.integers(18, 80))
  who = ("man", "woman")[int(rng.integers(2))]
  return f"A {age}-year-old {who} has {_join(findings)}."


def _pick(rng: np.random.Generator, lures: Sequence[str], others: Sequence[str], n: int) -> list[str]:
  """n distractors: up to half of them lures (plausible), the rest from `others`."""
  lures = list(dict.fromkeys(lures))
  n_lure = min(len(lures), max(1, n // 2)) if lures else 0
  chosen = [lures[i] for i in rng.permutation(len(lures))[:n_lure]]
  rest = [o for o in dict.fromkeys(others) if o not in chosen]
  if len(chosen) + len(rest) < n:
    raise ValueError("the knowledge base is too small for this many options; ask for fewer options or a bigger base")
  chosen += [rest[i] for i in rng.permutation(len(rest))[:n - len(chosen)]]
  return chosen


def _draw(kb: KnowledgeBase, rng: np.random.Generator, qtype: str, num_options: int) -> tuple[str, str, list[str], dict]:
  """(question, correct option text, distractor texts, meta) for one question of `qtype`."""
  n = num_options - 1
  names = list(kb.diseases)
  if qtype in ("diagnosis", "treatment_vignette"):
    disease = names[int(rng.integers(len(names)))]
    fs = kb.diseases[disease]
    m = int(rng.integers(2, len(fs) + 1))
    shown = [fs[i] for i in rng.permutation(len(fs))[:m]]
    lure_diseases = [x for x in names if x != disease and set(kb.diseases[x]) & set(shown)]
    meta = {"findings": shown}
    if qtype == "diagnosis":
      others = [x for x in names if x not in kb.consistent_diseases(shown)]
      return f"{_vignette(rng, shown)} What is the most likely diagnosis?", disease, _pick(
          rng, lure_diseases, others, n), meta
    right = kb.drugs_for(disease)
    answer = right[int(rng.integers(len(right)))]
    wrong = [d for d in kb.drugs if not any(kb.treats(d, x) for x in kb.consistent_diseases(shown))]
    lures = [d for d in wrong if any(kb.treats(d, x) for x in lure_diseases)]
    return f"{_vignette(rng, shown)} Which drug treats the most likely disease?", answer, _pick(
        rng, lures, wrong, n), meta
  if qtype == "treatment":
    names = [x for x in names if len(kb.drugs) - len(kb.drugs_for(x)) >= n]
    if not names:
      raise ValueError("the knowledge base is too small for this many options; ask for fewer options or a bigger base")
    disease = names[int(rng.integers(len(names)))]
    right = kb.drugs_for(disease)
    answer = right[int(rng.integers(len(right)))]
    wrong = [d for d in kb.drugs if not kb.treats(d, disease)]
    return f"Which drug treats {disease}?", answer, _pick(rng, [], wrong, n), {"disease": disease}
  if qtype == "contraindication":
    conditions = [c for c in kb.conditions
                  if sum(c not in kb.contraindications.get(d, ()) for d in kb.drugs) >= n]
    if not conditions:
      raise ValueError("the knowledge base is too small for this many options; ask for fewer options or a bigger base")
    condition = conditions[int(rng.integers(len(conditions)))]
    right = [d for d, cs in kb.contraindications.items() if condition in cs]
    answer = right[int(rng.integers(len(right)))]
    wrong = [d for d in kb.drugs if condition not in kb.contraindications.get(d, ())]
    return f"Which drug is contraindicated in {condition}?", answer, _pick(rng, [], wrong, n), {"condition": condition}
  raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def correct_options(example: MCQAExample, kb: KnowledgeBase) -> list[str]:
  """Letters of every option the knowledge base makes correct (exactly one for a valid question)."""
  qtype, meta = example.category, example.meta
  if qtype == "diagnosis":
    fits = set(kb.consistent_diseases(meta["findings"]))
    return [k for k, v in example.options.items() if v in fits]
  if qtype == "treatment_vignette":
    fits = kb.consistent_diseases(meta["findings"])
    return [k for k, v in example.options.items() if any(kb.treats(v, x) for x in fits)]
  if qtype == "treatment":
    return [k for k, v in example.options.items() if kb.treats(v, meta["disease"])]
  if qtype == "contraindication":
    return [k for k, v in example.options.items() if meta["condition"] in kb.contraindications.get(v, ())]
  raise ValueError(f"example {example.id!r}: category {qtype!r} is not a synthetic question type ({', '.join(QUESTION_TYPES)})")


def _type_counts(n: int, two_hop_fraction: float) -> list[str]:
  n_two = round(n * two_hop_fraction)
  one_hop = [t for t in QUESTION_TYPES if HOPS[t] == 1]
  types = ["treatment_vignette"] * n_two
  types += [one_hop[i % len(one_hop)] for i in range(n - n_two)]
  return types


def make_mcqa_splits(kb: KnowledgeBase, *, n_train: int, n_eval: int, seed: int, num_options: int = 4,
                     two_hop_fraction: float = 0.3) -> tuple[list[MCQAExample], list[MCQAExample]]:
  """Training and held-out questions over one knowledge base.

  `two_hop_fraction` of each split are two-hop treatment_vignette questions; the rest cycle through
  the one-hop types. The correct letter is balanced over positions. No question repeats within a
  split, and no held-out question equals a training one (same stem and same options in order).
  """
  if num_options < 2 or num_options > len(LETTERS):
    raise ValueError(f"num_options must be in 2..{len(LETTERS)}, got {num_options}")
  if not 0.0 <= two_hop_fraction <= 1.0:
    raise ValueError(f"two_hop_fraction must be in [0, 1], got {two_hop_fraction}")
  rng = np.random.default_rng([int(seed), 1])
  seen: set[tuple] = set()

  def split(name: str, n: int) -> list[MCQAExample]:
    types = _type_counts(n, two_hop_fraction)
    types = [types[i] for i in rng.permutation(n)]
    positions = [int(p) for p in rng.permutation(np.arange(n) % num_options)]
    out = []
    for i, (qtype, pos) in enumerate(zip(types, positions)):
      for _ in range(1000):
        question, answer, distractors, meta = _draw(kb, rng, qtype, num_options)
        texts = distractors[:pos] + [answer] + distractors[pos:]
        key = (question, tuple(texts))
        if key not in seen:
          break
      else:
        raise ValueError(f"could not draw {n} distinct {name} questions of type {qtype!r}; "
                         "ask for fewer questions or a bigger knowledge base")
      seen.add(key)
      ex = MCQAExample(id=f"synth-{name}-{i:05d}", question=question, options=dict(zip(LETTERS, texts)),
                       answer=LETTERS[pos], category=qtype,
                       meta={"source": "synthetic", "hops": HOPS[qtype], **meta})
      right = correct_options(ex, kb)
      if right != [ex.answer]:  # the generator's contract: exactly one correct option
        raise AssertionError(f"{ex.id}: correct options {right}, expected [{ex.answer!r}]")
      out.append(ex)
    return out

  train = split("train", n_train)
  held_out = split("eval", n_eval)
  return train, held_out


def reference_solution(example: MCQAExample, kb: KnowledgeBase, answer: str = "letter") -> str:
  """A short correct chain of thought naming the facts used, then the answer block (SFT target).

  answer: what the answer block holds: "letter" (the option letter) or "text" (the option
  itself; the prompt templates ask for "one of the options" and the rewards accept either).
  """
  if answer not in ("letter", "text"):
    raise ValueError(f"answer={answer!r}: choose letter or text")
  chosen = example.options[example.answer]
  qtype, meta = example.category, example.meta
  if qtype in ("diagnosis", "treatment_vignette"):
    disease = kb.diagnose(meta["findings"])
    think = f"{_join(meta['findings'])} point to {disease}."
    if qtype == "diagnosis":
      ok = chosen == disease
    else:
      ok = kb.treats(chosen, disease)
      think += f" {disease} is treated with {chosen}."
  elif qtype == "treatment":
    ok = kb.treats(chosen, meta["disease"])
    think = f"{meta['disease']} is treated with {chosen}."
  elif qtype == "contraindication":
    ok = meta["condition"] in kb.contraindications.get(chosen, ())
    think = f"{chosen} is contraindicated in {meta['condition']}."
  else:
    raise ValueError(f"example {example.id!r}: category {qtype!r} is not a synthetic question type")
  if not ok:
    raise ValueError(f"example {example.id!r}: its answer does not follow from this knowledge base")
  shown = example.answer if answer == "letter" else chosen
  return f"<think>{think}</think><answer>{shown}</answer>"
