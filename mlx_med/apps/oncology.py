"""Synthetic oncology records with gold labels: the embedded default data of UniMedAbstractor.

Offline there is no real patient record, so the abstraction pipeline (mlx_med.apps.uma) is shown and
tested on records this module writes. Each patient is a short cancer journey told by several notes
over time, in the kinds real abstractors read:

* an oncology consult at presentation (clinical TNM, clinical stage group, ECOG, family history and
  a prior unrelated tumour as distractors, "rule out" work-up),
* pathology reports (core biopsy: the specific histology, grade, ER/PR/HER2 for breast; surgical
  resection: pathologic T and N; sometimes an addendum that revises pT; a biopsy of a metastasis
  whose receptor status may differ),
* radiology reports (staging scans with negations such as "no evidence of distant metastatic
  disease"; at progression new metastases),
* clinic notes during treatment (ECOG / PS, the current regimen by drug name, sometimes only the
  vague histology "carcinoma", restaging to stage IV at progression).

Three cancers are drawn (breast, lung, colon), so breast-only attributes (ER/PR/HER2) are "unknown"
for the others and an abstractor must say so. The TNM-to-stage mapping is a simplified, AJCC-like
rule for synthetic data only; it is not a staging reference.

Every fact a note states is recorded as `Fact(patient_id, note_id, date, attribute, value, sentence)`
where `sentence` occurs verbatim in the note text: an oracle can answer from the text alone, and the
gold label of an attribute is exactly what its aggregation rule (see mlx_med.apps.uma) makes of the
facts. Distractor sentences (family history, prior tumours, "rule out", planned treatment) are never
facts. The gold labels are computed from the patient's latent timeline, independently of the facts;
tests check the two agree.

Files:
* `write_cohort(out_dir, notes, gold)` -> out_dir/notes.jsonl (one note per line: patient_id, note_id,
  date, note_type, text) and out_dir/labels.jsonl (patient_id, attribute, value); `tree=True` also
  writes the directory layout out_dir/notes/<patient_id>/<yyyy-mm-dd>_<note_type>[_k].txt.
* `read_notes(path)` reads notes.jsonl, a directory holding notes.jsonl, or a directory tree as above
  (the note id is then "<patient_id>/<file stem>"); `read_labels(path)` reads labels.jsonl.
Malformed input raises ValueError naming the file and line. Writes are atomic (temporary name, rename).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlx_med.core.fileio import read_jsonl_objects, write_jsonl

NOTE_TYPES = ("oncology_consult", "pathology_report", "radiology_report", "clinic_note")
CANCERS = ("breast", "lung", "colon")
UNKNOWN = "unknown"


@dataclasses.dataclass
class Note:
  patient_id: str
  note_id: str
  date: str         # ISO yyyy-mm-dd
  note_type: str
  text: str


@dataclasses.dataclass(frozen=True)
class Fact:
  """One value a note states for an attribute, with the sentence (verbatim in the note) that says it."""
  patient_id: str
  note_id: str
  date: str
  attribute: str
  value: str
  sentence: str


# ----------------------------------------------------------------------------------------- generator

_T_ORDER = ("T1", "T1a", "T1b", "T1c", "T2", "T3", "T4", "T4a", "T4b")
_REGIMENS = {
  "breast": {"chemotherapy": ["AC-T", "dose-dense doxorubicin and cyclophosphamide", "docetaxel and cyclophosphamide (TC)"],
             "endocrine therapy": ["letrozole", "anastrozole", "tamoxifen"],
             "targeted therapy": ["trastuzumab and pertuzumab", "trastuzumab"],
             "radiation therapy": ["whole-breast radiation", "adjuvant radiation to the chest wall"]},
  "lung": {"chemotherapy": ["carboplatin and pemetrexed", "cisplatin and etoposide"],
           "immunotherapy": ["pembrolizumab", "durvalumab consolidation"],
           "targeted therapy": ["osimertinib", "alectinib"],
           "radiation therapy": ["SBRT to the primary", "concurrent chemoradiation"]},
  "colon": {"chemotherapy": ["FOLFOX", "CAPOX", "FOLFIRI"],
            "targeted therapy": ["bevacizumab", "cetuximab"],
            "immunotherapy": ["pembrolizumab"],
            "radiation therapy": ["palliative radiation"]},
}
_SURGERY = {"breast": ["left lumpectomy with sentinel node biopsy", "mastectomy with axillary dissection"],
            "lung": ["right upper lobectomy with mediastinal node dissection", "left lower lobectomy"],
            "colon": ["right hemicolectomy", "sigmoid colectomy", "laparoscopic left hemicolectomy"]}
_HISTOLOGY = {"breast": ["invasive ductal carcinoma", "invasive lobular carcinoma"],
              "lung": ["adenocarcinoma", "squamous cell carcinoma", "small cell carcinoma"],
              "colon": ["adenocarcinoma", "mucinous adenocarcinoma"]}
_SITE_PHRASE = {"breast": ["the {side} breast", "{side} breast"], "lung": ["the {side} lung", "{side} upper lobe of the lung"],
                "colon": ["the sigmoid colon", "the ascending colon", "the colon"]}
_DISTRACTOR_FAMILY = ["Family history: mother with ovarian cancer at 60; father with prostate cancer.",
                      "Family history is notable for a sister with melanoma.",
                      "FHx: maternal aunt with pancreatic cancer.",
                      "Family history of colon cancer in a grandparent."]
_DISTRACTOR_PRIOR = ["Past history of basal cell carcinoma of the skin, excised in 2012.",
                     "Remote history of papillary thyroid carcinoma treated with thyroidectomy in 2009.",
                     "Prior benign thyroid nodule, stable.",
                     "History of a low-grade bladder tumor resected in 2015, no recurrence."]
_MET_SITES = ["hepatic", "osseous", "pulmonary", "brain"]


def _stage_group(t: str, n: str, m: str) -> str:
  """Simplified AJCC-like stage group for the synthetic records (not a clinical reference)."""
  if m == "M1":
    return "IV"
  t0, n0 = t[:2], n
  if n0 == "N3" or t0 == "T4":
    return "IIIB" if n0 != "N3" else "IIIC"
  if n0 == "N2":
    return "IIIA"
  if n0 == "N1":
    return "IIB" if t0 in ("T2", "T3") else "IIA"
  if t0 in ("T2", "T3"):
    return "IIA" if t0 == "T2" else "IIB"
  return "IA"


class _Patient:
  """Builds one patient's notes, recording each stated fact and the latent gold."""

  def __init__(self, patient_id: str, rng: np.random.Generator):
    self.pid, self.rng = patient_id, rng
    self.notes: list[Note] = []
    self.facts: list[Fact] = []
    self._cur: list[str] = []
    self._cur_facts: list[tuple[str, str, str]] = []

  def pick(self, seq: Sequence[Any]) -> Any:
    return seq[int(self.rng.integers(len(seq)))]

  def chance(self, p: float) -> bool:
    return bool(self.rng.random() < p)

  def say(self, sentence: str, **facts: str) -> None:
    """Adds a sentence to the current note; keyword facts are attribute=value pairs it states."""
    self._cur.append(sentence)
    for attr, value in facts.items():
      assert all(a != attr or v == value for a, v, _ in self._cur_facts), f"two values for {attr} in one note"
      self._cur_facts.append((attr, value, sentence))

  def close(self, date: dt.date, note_type: str, header: str) -> None:
    note_id = f"{self.pid}-n{len(self.notes) + 1:02d}"
    iso = date.isoformat()
    text = header + "\n" + " ".join(self._cur)
    self.notes.append(Note(self.pid, note_id, iso, note_type, text))
    for attr, value, sentence in self._cur_facts:
      assert sentence in text
      self.facts.append(Fact(self.pid, note_id, iso, attr, value, sentence))
    self._cur, self._cur_facts = [], []


def _receptor_phrase(p: _Patient, er: str, pr: str, her2: str) -> str:
  sign = {"positive": "+", "negative": "-", "equivocal": " equivocal"}
  style = int(p.rng.integers(3))
  if style == 0:
    return f"ER{sign[er]}/PR{sign[pr]}/HER2{sign[her2]}."
  if style == 1:
    pct = {"positive": f"{int(p.rng.integers(6, 10)) * 10}%", "negative": "<1%"}
    ihc = {"positive": "IHC 3+", "negative": "IHC 1+", "equivocal": "IHC 2+, FISH pending"}
    return (f"Estrogen receptor {er} ({pct[er]}), progesterone receptor {pr} ({pct[pr]}), "
            f"HER2 {her2} ({ihc[her2]}).")
  return f"Receptors: ER {er}, PR {pr}, HER2 {her2}."


def _patient(pid: str, rng: np.random.Generator) -> tuple[_Patient, dict[str, str]]:
  p = _Patient(pid, rng)
  cancer = p.pick(CANCERS)
  she = p.pick(["She", "He"]) if cancer != "breast" else "She"
  side = p.pick(["left", "right"])
  site_phrase = p.pick(_SITE_PHRASE[cancer]).format(side=side)
  histology = p.pick(_HISTOLOGY[cancer])
  grade = None if histology == "small cell carcinoma" else p.pick(["G1", "G2", "G3"])
  de_novo_m1 = p.chance(0.12)
  ct = p.pick(("T1", "T2", "T2", "T3", "T4"))
  cn = p.pick(("N0", "N0", "N1", "N2", "N3"))
  cm = "M1" if de_novo_m1 else "M0"
  stage = _stage_group(ct, cn, cm)
  er = pr = her2 = None
  if cancer == "breast":
    er = p.pick(["positive", "positive", "negative"])
    pr = p.pick(["positive", "negative"]) if er == "positive" else "negative"
    her2 = p.pick(["negative", "negative", "positive", "equivocal"])
  ecog = int(p.pick([0, 0, 1, 1, 2]))
  date = dt.date(2018, 1, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365)))
  gold: dict[str, Any] = {}
  metastatic = de_novo_m1
  treatment = None
  highest_grade = grade

  def ecog_sentence(value: int) -> tuple[str, dict]:
    s = p.pick(["ECOG {v}.", "ECOG performance status {v}.", "PS {v}.", "Performance status: ECOG {v}.",
                "ECOG PS {v}."]).format(v=value)
    return s, {"ecog": str(value)}

  # 1. Biopsy pathology (the specific histology, grade, receptors).
  p.say(f"Specimen: core needle biopsy, {site_phrase}.")
  hist_text = histology if cancer != "lung" else f"{histology} (primary to lung)"
  if grade:
    p.say(p.pick([f"Diagnosis: {hist_text}, grade {grade[1]}.", f"Final diagnosis: {hist_text}; histologic grade {grade}."]),
          histology=histology, grade=grade, primary_site=cancer)
  else:
    p.say(f"Final diagnosis: {hist_text}.", histology=histology, primary_site=cancer)
  if cancer == "breast":
    p.say(_receptor_phrase(p, er, pr, her2), er_status=er, pr_status=pr, her2_status=her2)
  p.say(p.pick(["Lymphovascular invasion not identified.", "Margins cannot be assessed on a core biopsy.",
                "Background tissue shows no other lesion."]))
  p.close(date, "pathology_report", "SURGICAL PATHOLOGY REPORT")

  # 2. Oncology consult: clinical staging, ECOG, distractors, work-up.
  date += dt.timedelta(days=int(rng.integers(5, 15)))
  p.say(p.pick([f"{she} is seen in consultation for newly diagnosed carcinoma of {site_phrase}.",
                f"New patient visit for a biopsy-proven carcinoma involving {site_phrase}."]),
        histology="carcinoma", primary_site=cancer)
  p.say(p.pick(_DISTRACTOR_FAMILY))
  if p.chance(0.6):
    p.say(p.pick(_DISTRACTOR_PRIOR))
  s, f = ecog_sentence(ecog)
  p.say(s, **f)
  p.say(p.pick([f"Clinical staging: c{ct} c{cn} c{cm}.", f"Clinical stage {ct}{cn}{cm} by exam and imaging.",
                f"cTNM: {ct} {cn} {cm}."]), clinical_t=ct, clinical_n=cn, clinical_m=cm)
  p.say(p.pick([f"Overall clinical stage {stage}.", f"This corresponds to stage {stage} disease.",
                f"AJCC stage group {stage}."]), overall_stage=stage)
  if not de_novo_m1:
    p.say(p.pick(["PET/CT ordered to rule out metastatic disease.", "Staging CT to rule out distant metastases.",
                  "Will obtain a bone scan to rule out osseous metastasis."]))
  plan_kind = "surgery" if (stage not in ("IV", "IIIB", "IIIC") and cancer != "lung") or p.chance(0.3) else "chemotherapy"
  p.say(p.pick([f"Plan: discuss {plan_kind} at tumor board.", f"We discussed {plan_kind} as the next step."]))
  p.close(date, "oncology_consult", "MEDICAL ONCOLOGY CONSULTATION")

  # 3. Staging radiology.
  date += dt.timedelta(days=int(rng.integers(3, 10)))
  p.say(p.pick(["CT chest, abdomen and pelvis with contrast.", "FDG PET/CT skull base to mid-thigh."]))
  p.say(f"Known primary malignancy of {site_phrase}, measuring {float(rng.integers(8, 60)) / 10:.1f} cm.",
        primary_site=cancer)
  if de_novo_m1:
    met = p.pick(_MET_SITES)
    p.say(f"Multiple {met} lesions, consistent with metastatic disease.", distant_metastasis="yes")
  else:
    p.say(p.pick(["No evidence of distant metastatic disease.", "No evidence of metastasis in the chest, abdomen or pelvis.",
                  "Impression: no distant metastases."]), distant_metastasis="no")
    if p.chance(0.4):
      p.say("Indeterminate 3 mm pulmonary nodule, likely benign; follow-up suggested.")
  p.close(date, "radiology_report", "RADIOLOGY REPORT")

  # 4. Surgery and surgical pathology (non-metastatic, surgical candidates).
  pt = pn = None
  if not de_novo_m1 and plan_kind == "surgery":
    date += dt.timedelta(days=int(rng.integers(14, 40)))
    pt = p.pick([t for t in _T_ORDER if t[:2] in {ct[:2], _T_ORDER[max(0, _T_ORDER.index(ct) - 1)][:2]}])
    pn = p.pick(["N0", "N0", "N1", "N2"] if cn != "N0" else ["N0", "N0", "N1"])
    p.say(f"Specimen: {p.pick(_SURGERY[cancer])}.")
    if grade:
      surg_grade = grade if p.chance(0.7) else p.pick(["G1", "G2", "G3"])
      highest_grade = max(highest_grade, surg_grade)
      p.say(f"Tumor: residual {histology}, histologic grade {surg_grade[1]} of 3.", grade=surg_grade,
            histology=histology)
    else:
      p.say(f"Tumor: residual {histology}.", histology=histology)
    p.say(p.pick([f"Pathologic stage: p{pt} p{pn}.", f"AJCC 8th edition: p{pt} p{pn}.", f"pTNM: {pt} {pn}."]),
          pathologic_t=pt, pathologic_n=pn)
    p.say("Margins negative; closest margin 4 mm.")
    p.close(date, "pathology_report", "SURGICAL PATHOLOGY REPORT")
    if p.chance(0.25):
      date += dt.timedelta(days=int(rng.integers(2, 8)))
      new_pt = p.pick([t for t in _T_ORDER if t != pt])
      p.say(f"Addendum: after review of deeper levels the pathologic T category is revised to p{new_pt}.",
            pathologic_t=new_pt)
      p.say("Other findings unchanged.")
      p.close(date, "pathology_report", "SURGICAL PATHOLOGY REPORT - ADDENDUM")
      pt = new_pt
    treatment = "surgery"
    stage = _stage_group(pt, pn, "M0")

  # 5. Clinic notes during treatment.
  pool = [k for k in _REGIMENS[cancer] if not (k == "targeted therapy" and cancer == "breast" and her2 != "positive")]
  n_visits = int(rng.integers(1, 4))
  post_surgery_stage_said = False
  for visit in range(n_visits):
    date += dt.timedelta(days=int(rng.integers(21, 90)))
    if p.chance(0.5):
      p.say(f"Follow-up visit for carcinoma of {site_phrase}.", histology="carcinoma", primary_site=cancer)
    else:
      p.say(f"Seen today in follow-up for {cancer} cancer.", primary_site=cancer)
    kind = p.pick(pool)
    drug = p.pick(_REGIMENS[cancer][kind])
    p.say(p.pick([f"Currently receiving {drug}.", f"{she} continues on {drug} ({kind}).",
                  f"Tolerating cycle {int(rng.integers(2, 7))} of {drug} well."]), treatment=kind)
    treatment = kind
    ecog = int(min(4, max(0, ecog + p.pick([-1, 0, 0, 1]))))
    if visit == n_visits - 1 or p.chance(0.7):
      s, f = ecog_sentence(ecog)
      p.say(s, **f)
    if pt is not None and not post_surgery_stage_said:
      p.say(f"Pathologic stage {stage} after resection.", overall_stage=stage)
      post_surgery_stage_said = True
    p.say(p.pick(["Labs reviewed and acceptable.", "No new complaints.", "Mild fatigue, no neuropathy."]))
    if p.chance(0.3):
      p.say(p.pick(["Plan to start immunotherapy if disease progresses.", "Consider radiation therapy later."]))
    p.close(date, "clinic_note", "ONCOLOGY CLINIC NOTE")

  # 6. Progression (restaging, metastasis biopsy, new treatment).
  if not de_novo_m1 and p.chance(0.35):
    metastatic = True
    date += dt.timedelta(days=int(rng.integers(60, 200)))
    met = p.pick(_MET_SITES)
    p.say("Restaging CT chest, abdomen and pelvis.")
    p.say(f"New {met} lesions, consistent with metastatic disease.", distant_metastasis="yes")
    p.close(date, "radiology_report", "RADIOLOGY REPORT")
    if cancer == "breast" and p.chance(0.6):
      date += dt.timedelta(days=int(rng.integers(5, 15)))
      if p.chance(0.4):
        her2 = "positive" if her2 != "positive" else "negative"
      p.say(f"Specimen: biopsy of a {met} lesion.")
      p.say(f"Metastatic {histology}, consistent with the known breast primary.", histology=histology,
            primary_site=cancer, distant_metastasis="yes")
      p.say(_receptor_phrase(p, er, pr, her2), er_status=er, pr_status=pr, her2_status=her2)
      p.close(date, "pathology_report", "SURGICAL PATHOLOGY REPORT")
    date += dt.timedelta(days=int(rng.integers(7, 21)))
    stage = "IV"
    p.say(f"Return visit to discuss restaging: progression with new {met} metastases.", distant_metastasis="yes")
    p.say(p.pick(["Restaged as stage IV.", "Now stage IV disease."]), overall_stage="IV")
    kind = p.pick([k for k in pool if k != treatment] or pool)
    drug = p.pick(_REGIMENS[cancer][kind])
    p.say(f"Started {drug} today.", treatment=kind)
    treatment = kind
    ecog = int(min(4, ecog + 1))
    s, f = ecog_sentence(ecog)
    p.say(s, **f)
    p.close(date, "clinic_note", "ONCOLOGY CLINIC NOTE")

  gold = {"primary_site": cancer, "histology": histology, "grade": highest_grade or UNKNOWN,
          "clinical_t": ct, "clinical_n": cn, "clinical_m": cm,
          "pathologic_t": pt or UNKNOWN, "pathologic_n": pn or UNKNOWN, "overall_stage": stage,
          "ecog": str(ecog), "er_status": er or UNKNOWN, "pr_status": pr or UNKNOWN,
          "her2_status": her2 or UNKNOWN, "treatment": treatment or UNKNOWN,
          "distant_metastasis": "yes" if metastatic else "no"}
  return p, gold


def generate_cohort_with_facts(n_patients: int, *, seed: int = 0
                               ) -> tuple[list[Note], dict[str, dict[str, str]], list[Fact]]:
  """`generate_cohort` plus every stated fact (attribute, value, verbatim sentence, note)."""
  if int(n_patients) < 1:
    raise ValueError(f"n_patients={n_patients}; generate at least one patient")
  rng = np.random.default_rng(seed)
  notes, gold, facts = [], {}, []
  for i in range(int(n_patients)):
    pid = f"P{i:05d}"
    p, g = _patient(pid, rng)
    notes += p.notes
    facts += p.facts
    gold[pid] = g
  return notes, gold, facts


def generate_cohort(n_patients: int, *, seed: int = 0) -> tuple[list[Note], dict[str, dict[str, str]]]:
  """`n_patients` synthetic oncology journeys: (notes in date order per patient, gold[patient][attribute])."""
  notes, gold, _ = generate_cohort_with_facts(n_patients, seed=seed)
  return notes, gold


# ----------------------------------------------------------------------------------------- files

def _tree_names(notes: Sequence[Note]) -> list[str]:
  seen: dict[str, int] = {}
  names = []
  for n in notes:
    base = f"{n.patient_id}/{n.date}_{n.note_type}"
    k = seen.get(base, 0)
    seen[base] = k + 1
    names.append(base + (f"_{k}" if k else "") + ".txt")
  return names


def write_cohort(out_dir: str | os.PathLike, notes: Sequence[Note], gold: dict[str, dict[str, str]], *,
                 tree: bool = False) -> None:
  """out_dir/notes.jsonl and out_dir/labels.jsonl; with `tree` also out_dir/notes/<patient>/<date>_<type>[_k].txt."""
  out = Path(out_dir)
  write_jsonl(out / "notes.jsonl", (dataclasses.asdict(n) for n in notes))
  write_jsonl(out / "labels.jsonl", ({"patient_id": pid, "attribute": a, "value": v}
                                     for pid, attrs in gold.items() for a, v in attrs.items()))
  if tree:
    from mlx_med.core.fileio import write_text_dir

    for pid in dict.fromkeys(n.patient_id for n in notes):
      mine = [n for n in notes if n.patient_id == pid]
      write_text_dir(out / "notes" / pid, {name.split("/", 1)[1]: n.text for name, n in zip(_tree_names(mine), mine)})


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TREE_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})_([A-Za-z][A-Za-z0-9_]*?)(?:_(\d+))?\.txt$")


def _check_date(value: Any, where: str) -> str:
  if not isinstance(value, str) or not _DATE.match(value):
    raise ValueError(f"{where}: date {value!r} is not an ISO date yyyy-mm-dd")
  try:
    dt.date.fromisoformat(value)
  except ValueError:
    raise ValueError(f"{where}: date {value!r} is not a valid calendar date") from None
  return value


def _read_jsonl(path: Path, fields: Sequence[str]) -> list[dict]:
  rows = []
  for where, row in read_jsonl_objects(path, f"a JSON object with fields {list(fields)}"):
    missing = [k for k in fields if k not in row]
    if missing:
      raise ValueError(f"{where}: missing field(s) {missing}; each line needs {list(fields)}")
    bad = [k for k in fields if not isinstance(row[k], str)]
    if bad:
      raise ValueError(f"{where}: field(s) {bad} must be strings")
    rows.append((where, row))
  return rows


def read_notes(path: str | os.PathLike) -> list[Note]:
  """Notes from notes.jsonl, a directory holding notes.jsonl, or a tree DIR/<patient_id>/<date>_<type>[_k].txt."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"notes path {path} does not exist; give notes.jsonl or a directory of patient folders")
  if path.is_dir() and (path / "notes.jsonl").is_file():
    path = path / "notes.jsonl"
  notes: list[Note] = []
  if path.is_file():
    seen = set()
    for where, row in _read_jsonl(path, ("patient_id", "note_id", "date", "note_type", "text")):
      _check_date(row["date"], where)
      key = (row["patient_id"], row["note_id"])
      if key in seen:
        raise ValueError(f"{where}: duplicate note_id {row['note_id']!r} for patient {row['patient_id']!r}")
      seen.add(key)
      notes.append(Note(row["patient_id"], row["note_id"], row["date"], row["note_type"], row["text"]))
  else:
    root = path / "notes" if (path / "notes").is_dir() else path
    for pdir in sorted(d for d in root.iterdir() if d.is_dir()):
      for f in sorted(pdir.iterdir()):
        if f.name.startswith(".") or not f.is_file():
          continue
        m = _TREE_NAME.match(f.name)
        if not m:
          raise ValueError(f"{f}: note file names must be <yyyy-mm-dd>_<note_type>[_k].txt")
        _check_date(m.group(1), str(f))
        notes.append(Note(pdir.name, f"{pdir.name}/{f.stem}", m.group(1), m.group(2),
                          f.read_text(encoding="utf-8")))
    if not notes:
      raise ValueError(f"{path}: no notes.jsonl and no <patient_id>/<yyyy-mm-dd>_<note_type>.txt files")
  notes.sort(key=lambda n: (n.patient_id, n.date))
  return notes


def read_labels(path: str | os.PathLike) -> dict[str, dict[str, str]]:
  """labels.jsonl (patient_id, attribute, value per line) -> gold[patient_id][attribute]; a directory holding it is accepted."""
  path = Path(path)
  if path.is_dir():
    path = path / "labels.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"labels file {path} does not exist; write one with write_cohort or give labels.jsonl")
  gold: dict[str, dict[str, str]] = {}
  for where, row in _read_jsonl(path, ("patient_id", "attribute", "value")):
    attrs = gold.setdefault(row["patient_id"], {})
    if row["attribute"] in attrs:
      raise ValueError(f"{where}: a second label for {row['patient_id']}/{row['attribute']}")
    attrs[row["attribute"]] = row["value"]
  return gold
