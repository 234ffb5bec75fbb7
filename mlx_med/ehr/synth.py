"""Synthetic MEDS cohort generator with structure a sequence model can learn at several scales.

Why a generator rather than a fixture: the scaling-law experiments need cohorts from a few
hundred to 10^5 subjects whose signal does not saturate at small model sizes, and the
clinical-utility evaluation needs labels whose Bayes-optimal AUROC is known. Every outcome
here is drawn from an explicit probability, which is written next to the label.

The generative story, per subject:
  * sex, age at the start of follow-up, three latent factors (cardiometabolic, smoking /
    pulmonary, psychosocial) and a diabetes-control latent;
  * 16 chronic conditions drawn in a fixed order, each with a logit from the latents, age,
    sex and the conditions drawn before it (obesity -> diabetes -> CKD -> heart failure...),
    so comorbidities are correlated; each condition picks one ICD-10-CM code of its family;
  * a chronic-disease burden that drives admission rate, out-of-hospital death hazard and
    every in-hospital outcome; chronic medications tied to the conditions;
  * outpatient visits with diagnoses, vitals, labs and medication refills whose values
    depend on the conditions (HbA1c on diabetes control, creatinine on CKD stage, ...);
  * admissions with a reason (pneumonia, sepsis, NSTEMI, ...) whose odds depend on the
    conditions; a latent acute severity; labs, vitals, medications and procedures tied to
    the reason and severity; ICU stays; length of stay; in-hospital death; discharge
    disposition; and a 30-day readmission drawn from an explicit probability;
  * diagnoses recorded at discharge, plus background ICD-10-CM / ICD-10-PCS codes from
    Zipf-distributed pools (a few thousand codes) whose chapter mix follows the conditions;
  * a kidney trajectory: each subject's own creatinine baseline plus a chronic drift (log-
    creatinine per year of follow-up, faster with diabetes, hypertension and CKD) that every
    creatinine, BUN and potassium value carries; on admission an acute kidney injury adds a
    rise over the subject's current level, which recovers (partly) over the stay in the
    daily labs of survivors and worsens before death;
  * a chemotherapy course for most subjects with cancer: outpatient cycles every 21 days
    (visit, infusion procedure, carboplatin, ondansetron) with a low white-cell count at the
    nadir ten days later; an admission 4-14 days after a cycle (with no stay in between) is
    in the neutropenic window, where sepsis and pneumonia become likelier;
  * after a heart-failure exacerbation the loop diuretic at discharge is a drawn decision.

Outcome probabilities (in-hospital mortality, length of stay > 7 days, 30-day readmission)
are exact functions of the latent state, so their AUROC against the drawn labels is the best
any model can reach on these labels; models see the state only through noisy events.

Much of that state is deliberately invisible to a bag of code counts and readable only from
order, timing and values in the timeline: the chronic creatinine drift (a trend across the
subject's earlier values), the acute rise (admission creatinine against the subject's own
history) and how far it had recovered by the last daily lab, the days since the previous
discharge, whether a chemotherapy cycle fell 4-14 days before the admission, heart failure
together with CKD stage 4+ (an interaction), and, for readmission after a heart-failure
exacerbation, whether this discharge (not an earlier refill) carried the loop diuretic.
On held_out rows a logistic regression on code counts up to prediction time
(`mlx_med.ehr.baseline`) stays well below the true probability's AUROC on mortality and
long stay, which leaves room for sequence models to improve with scale.

Output is a valid MEDS 0.4 root, written under a temporary name and renamed when complete:

  OUT/data/{train,tuning,held_out}/<chunk>.parquet
  OUT/metadata/{codes.parquet, subject_splits.parquet, dataset.json}
  OUT/task_labels/<task>/labels.parquet              MEDS label schema
  OUT/task_labels/<task>/true_probability.parquet    subject_id, prediction_time, split, true_probability
  OUT/task_labels/summary.json                       prevalence and best AUROC per task and split
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlx_med.core.fileio import replace_dir
from mlx_med.ehr import labels as labels_lib
from mlx_med.ehr.meds import BIRTH_CODE, DEATH_CODE, HELD_OUT_SPLIT, TRAIN_SPLIT, TUNING_SPLIT

GENERATOR_NAME = "mlx_med.ehr.synth"
GENERATOR_VERSION = "2"
SPLIT_NAMES = (TRAIN_SPLIT, TUNING_SPLIT, HELD_OUT_SPLIT)

# All generator times are float days since 2000-01-01 (UTC); they are rounded to whole
# minutes and converted to microseconds since 1970 when written.
_EPOCH_2000_US = 946_684_800_000_000
_FOLLOW_UP_START = (dt.date(2012, 1, 1) - dt.date(2000, 1, 1)).days
_FOLLOW_UP_SPAN_DAYS = 6 * 365.25
_DATA_END = float((dt.date(2024, 1, 1) - dt.date(2000, 1, 1)).days)
_HOUR = 1.0 / 24.0
_YEAR = 365.25
_RECENT_DAYS = 45.0  # e-folding time of the risk carried over from a previous discharge
_CHEMO_EVERY_DAYS = 21.0  # chemotherapy cycle length
_MAX_RENAL_DRIFT = 2.0  # cap on the chronic log-creatinine drift


# ----------------------------------------------------------------------------------- code book


class _CodeBook:
  """Every code the generator can emit, with a description and parents for codes.parquet."""

  def __init__(self) -> None:
    self.codes: list[str] = []
    self.descriptions: list[str] = []
    self.parents: list[list[str]] = []
    self._ids: dict[str, int] = {}

  def add(self, code: str, description: str, parents: list[str] | None = None) -> int:
    if code in self._ids:
      return self._ids[code]
    self._ids[code] = len(self.codes)
    self.codes.append(code)
    self.descriptions.append(description)
    self.parents.append(parents or [])
    return self._ids[code]

  def id(self, code: str) -> int:
    return self._ids[code]

  def __contains__(self, code: str) -> bool:
    return code in self._ids

  def __len__(self) -> int:
    return len(self.codes)


def _icd(code: str) -> str:
  return f"ICD10CM//{code}"


def _icd_parents(body: str) -> list[str]:
  return [_icd(body.split(".")[0])] if "." in body else []


@dataclasses.dataclass(frozen=True)
class _Condition:
  name: str
  codes: tuple[tuple[str, float, str], ...]  # (ICD-10-CM code, weight, description)
  base_logit: float
  loadings: tuple[float, float, float]  # on (cardiometabolic, pulmonary, psychosocial)
  age_per_decade: float
  male: float
  after: tuple[tuple[str, float], ...] = ()  # logit boosts from conditions drawn earlier
  burden: float = 0.3
  meds: tuple[tuple[str, float], ...] = ()  # (drug, probability of being on it)


_CONDITIONS: tuple[_Condition, ...] = (
  _Condition("tobacco", (("F17.210", 0.6, "Nicotine dependence, cigarettes"), ("Z87.891", 0.4, "History of nicotine dependence")), -1.4, (0.0, 1.3, 0.3), -0.05, 0.3, burden=0.2, meds=(("NICOTINE_PATCH", 0.15),)),
  _Condition("obesity", (("E66.9", 0.7, "Obesity, unspecified"), ("E66.01", 0.3, "Morbid obesity due to excess calories")), -1.1, (1.0, 0.0, 0.2), 0.0, 0.0, burden=0.2),
  _Condition("htn", (("I10", 1.0, "Essential hypertension"),), -0.6, (0.9, 0.0, 0.0), 0.55, 0.2, (("obesity", 0.6),), 0.3, (("LISINOPRIL", 0.5), ("AMLODIPINE", 0.4), ("HYDROCHLOROTHIAZIDE", 0.25))),
  _Condition("hld", (("E78.5", 0.7, "Hyperlipidemia, unspecified"), ("E78.00", 0.3, "Pure hypercholesterolemia")), -0.5, (0.8, 0.0, 0.0), 0.35, 0.2, (("obesity", 0.3),), 0.1, (("ATORVASTATIN", 0.7),)),
  _Condition("t2dm", (("E11.9", 0.5, "Type 2 diabetes without complications"), ("E11.65", 0.25, "Type 2 diabetes with hyperglycemia"), ("E11.22", 0.15, "Type 2 diabetes with diabetic CKD"), ("E11.40", 0.1, "Type 2 diabetes with neuropathy")), -2.0, (1.0, 0.0, 0.0), 0.3, 0.15, (("obesity", 1.0), ("htn", 0.3)), 0.6, (("METFORMIN", 0.7), ("INSULIN_GLARGINE", 0.3), ("EMPAGLIFLOZIN", 0.2))),
  _Condition("cad", (("I25.10", 0.8, "Atherosclerotic heart disease of native coronary artery"), ("I25.119", 0.2, "Atherosclerotic heart disease with angina")), -3.0, (0.8, 0.4, 0.0), 0.6, 0.7, (("tobacco", 0.7), ("t2dm", 0.5), ("htn", 0.4), ("hld", 0.4)), 0.6, (("ASPIRIN", 0.8), ("ATORVASTATIN", 0.7), ("METOPROLOL", 0.5))),
  _Condition("af", (("I48.91", 0.7, "Atrial fibrillation, unspecified"), ("I48.20", 0.3, "Chronic atrial fibrillation")), -3.6, (0.3, 0.0, 0.0), 0.75, 0.3, (("htn", 0.4),), 0.5, (("APIXABAN", 0.6), ("WARFARIN", 0.2), ("METOPROLOL", 0.6))),
  _Condition("hf", (("I50.22", 0.3, "Chronic systolic heart failure"), ("I50.32", 0.4, "Chronic diastolic heart failure"), ("I50.42", 0.3, "Chronic combined heart failure")), -4.2, (0.6, 0.2, 0.0), 0.7, 0.3, (("cad", 1.2), ("af", 0.8), ("htn", 0.5), ("t2dm", 0.3)), 1.1, (("FUROSEMIDE", 0.8), ("CARVEDILOL", 0.6), ("SACUBITRIL_VALSARTAN", 0.3))),
  _Condition("ckd", (("N18.30", 0.55, "Chronic kidney disease, stage 3"), ("N18.4", 0.3, "Chronic kidney disease, stage 4"), ("N18.6", 0.15, "End stage renal disease")), -3.8, (0.5, 0.0, 0.0), 0.6, 0.1, (("t2dm", 1.0), ("htn", 0.7), ("hf", 0.5)), 0.7, ()),
  _Condition("copd", (("J44.9", 1.0, "Chronic obstructive pulmonary disease"),), -3.5, (0.0, 1.2, 0.0), 0.5, 0.0, (("tobacco", 1.6),), 0.8, (("TIOTROPIUM", 0.6), ("ALBUTEROL", 0.8))),
  _Condition("asthma", (("J45.909", 0.7, "Unspecified asthma, uncomplicated"), ("J45.40", 0.3, "Moderate persistent asthma")), -2.6, (0.0, 0.5, 0.0), -0.15, -0.3, burden=0.2, meds=(("ALBUTEROL", 0.8), ("FLUTICASONE", 0.5))),
  _Condition("depression", (("F32.9", 0.6, "Major depressive disorder, single episode"), ("F33.1", 0.4, "Major depressive disorder, recurrent, moderate")), -2.0, (0.0, 0.0, 1.0), -0.05, -0.5, burden=0.3, meds=(("SERTRALINE", 0.5), ("ESCITALOPRAM", 0.3))),
  _Condition("cancer", (("C34.90", 0.3, "Malignant neoplasm of lung"), ("C50.919", 0.25, "Malignant neoplasm of breast"), ("C18.9", 0.2, "Malignant neoplasm of colon"), ("C61", 0.25, "Malignant neoplasm of prostate")), -3.8, (0.0, 0.4, 0.0), 0.6, 0.1, (("tobacco", 0.6),), 1.2, (("ONDANSETRON", 0.4),)),
  _Condition("cirrhosis", (("K74.60", 0.5, "Cirrhosis of liver, unspecified"), ("K70.30", 0.5, "Alcoholic cirrhosis of liver")), -4.8, (0.3, 0.0, 1.2), 0.2, 0.5, (("obesity", 0.4),), 1.2, (("LACTULOSE", 0.6), ("SPIRONOLACTONE", 0.5))),
  _Condition("hypothyroid", (("E03.9", 1.0, "Hypothyroidism, unspecified"),), -2.6, (0.0, 0.0, 0.0), 0.3, -1.2, burden=0.1, meds=(("LEVOTHYROXINE", 0.9),)),
  _Condition("dementia", (("F03.90", 0.6, "Unspecified dementia"), ("G30.9", 0.4, "Alzheimer disease, unspecified")), -5.0, (0.0, 0.0, 0.2), 1.1, -0.1, (("htn", 0.3), ("t2dm", 0.3)), 1.0, (("DONEPEZIL", 0.5),)),
)
_COND_INDEX = {c.name: i for i, c in enumerate(_CONDITIONS)}
_CKD_EFFECT = np.array([0.0, 0.5, 0.95, 1.7])  # log-creatinine shift by CKD level 0 (none) .. 3 (ESRD)
_CKD_BURDEN = np.array([0.0, 0.6, 1.0, 1.6])


@dataclasses.dataclass(frozen=True)
class _Reason:
  """Why a subject is admitted; drives labs, medications, procedures and outcomes."""

  name: str
  codes: tuple[tuple[str, float, str], ...]
  log_weight: float
  boosts: tuple[tuple[str, float], ...]
  age: float = 0.0
  male: float = 0.0
  severity: float = 0.0
  icu: float = 0.0
  mortality: float = 0.0
  los: float = 0.0
  readmit: float = 0.0
  unit: str = "MICU"
  elective: bool = False
  labs: tuple[str, ...] = ()
  meds: tuple[tuple[str, float], ...] = ()
  procedures: tuple[tuple[str, float, str], ...] = ()


_REASONS: tuple[_Reason, ...] = (
  _Reason("pneumonia", (("J18.9", 1.0, "Pneumonia, unspecified organism"),), 0.0, (("copd", 1.2), ("asthma", 0.4), ("dementia", 0.6), ("tobacco", 0.3), ("hf", 0.3)), age=0.25, severity=0.3, mortality=0.3, los=0.1, meds=(("CEFTRIAXONE", 0.8), ("AZITHROMYCIN", 0.6))),
  _Reason("sepsis", (("A41.9", 1.0, "Sepsis, unspecified organism"),), -1.0, (("cancer", 0.8), ("ckd", 0.5), ("t2dm", 0.3), ("dementia", 0.7), ("cirrhosis", 0.6)), age=0.3, severity=1.2, icu=1.0, mortality=0.8, los=0.35, readmit=0.2, labs=("LACTATE",), meds=(("VANCOMYCIN", 0.8), ("PIPERACILLIN_TAZOBACTAM", 0.8)), procedures=(("02HV33Z", 0.35, "Insertion of infusion device into superior vena cava"),)),
  _Reason("nstemi", (("I21.4", 1.0, "Non-ST elevation myocardial infarction"),), -1.4, (("cad", 1.6), ("t2dm", 0.4), ("htn", 0.3), ("hld", 0.3)), age=0.3, male=0.5, severity=0.5, icu=0.6, mortality=0.3, readmit=0.1, unit="CCU", labs=("TROPONIN_T", "BNP"), meds=(("ASPIRIN", 0.95), ("HEPARIN", 0.8), ("ATORVASTATIN", 0.7), ("CLOPIDOGREL", 0.6)), procedures=(("4A023N7", 0.7, "Measurement of cardiac sampling and pressure, left heart"), ("027034Z", 0.55, "Dilation of coronary artery with drug-eluting stent"))),
  _Reason("hf_exacerbation", (("I50.23", 0.4, "Acute on chronic systolic heart failure"), ("I50.33", 0.4, "Acute on chronic diastolic heart failure"), ("I50.43", 0.2, "Acute on chronic combined heart failure")), -2.5, (("hf", 3.0),), age=0.2, severity=0.5, icu=0.1, mortality=0.4, los=0.25, readmit=0.6, unit="CCU", labs=("BNP", "TROPONIN_T"), meds=(("FUROSEMIDE_IV", 0.95),)),
  _Reason("stroke", (("I63.9", 1.0, "Cerebral infarction, unspecified"),), -2.0, (("af", 1.3), ("htn", 0.6), ("t2dm", 0.3)), age=0.45, severity=0.7, icu=0.4, mortality=0.5, los=0.4, readmit=0.1, unit="NEURO_ICU", meds=(("ASPIRIN", 0.7), ("ALTEPLASE", 0.15)), procedures=(("B020ZZZ", 0.9, "CT of head"),)),
  _Reason("copd_exacerbation", (("J44.1", 1.0, "COPD with acute exacerbation"),), -2.2, (("copd", 3.0), ("tobacco", 0.3)), age=0.1, severity=0.3, icu=0.2, mortality=0.2, readmit=0.5, meds=(("PREDNISONE", 0.8), ("ALBUTEROL_IPRATROPIUM", 0.9), ("AZITHROMYCIN", 0.4)), procedures=(("5A09357", 0.2, "Assistance with respiratory ventilation, CPAP, <24 hours"),)),
  _Reason("hyperglycemic_crisis", (("E11.10", 0.6, "Type 2 diabetes with ketoacidosis"), ("E11.00", 0.4, "Type 2 diabetes with hyperosmolarity")), -3.5, (("t2dm", 2.5),), age=-0.3, severity=0.4, icu=0.9, mortality=-0.3, los=-0.2, readmit=0.4, labs=("LACTATE",), meds=(("INSULIN_REGULAR_IV", 0.95), ("POTASSIUM_CHLORIDE", 0.7))),
  _Reason("acute_kidney_injury", (("N17.9", 1.0, "Acute kidney failure, unspecified"),), -2.0, (("ckd", 1.5), ("hf", 0.5), ("t2dm", 0.3)), age=0.3, severity=0.5, icu=0.1, mortality=0.3, los=0.2, readmit=0.3, meds=(("SODIUM_CHLORIDE_0.9%", 0.8),), procedures=(("5A1D70Z", 0.15, "Performance of urinary filtration, intermittent"),)),
  _Reason("uti", (("N39.0", 1.0, "Urinary tract infection, site not specified"),), -1.6, (("dementia", 1.0), ("t2dm", 0.3)), age=0.35, male=-0.7, severity=-0.3, icu=-0.8, mortality=-0.3, los=-0.1, readmit=0.1, meds=(("CEFTRIAXONE", 0.8), ("NITROFURANTOIN", 0.3))),
  _Reason("gi_bleed", (("K92.2", 1.0, "Gastrointestinal hemorrhage, unspecified"),), -2.4, (("cirrhosis", 1.8), ("af", 0.6), ("cancer", 0.3)), age=0.3, severity=0.6, icu=0.6, mortality=0.4, los=0.1, readmit=0.3, labs=("INR",), meds=(("PANTOPRAZOLE", 0.9), ("OCTREOTIDE", 0.3)), procedures=(("0DJ08ZZ", 0.8, "Inspection of upper intestinal tract, endoscopic"), ("30233N1", 0.6, "Transfusion of red blood cells, peripheral vein"))),
  _Reason("hip_fracture", (("S72.001A", 1.0, "Fracture of right femoral neck, initial encounter"),), -3.0, (("dementia", 1.0),), age=0.8, male=-0.6, icu=-0.5, los=0.4, readmit=0.2, unit="SICU", meds=(("OXYCODONE", 0.7), ("ENOXAPARIN", 0.8)), procedures=(("0QS604Z", 0.9, "Reposition right upper femur with internal fixation"),)),
  _Reason("syncope", (("R55", 1.0, "Syncope and collapse"),), -2.0, (("af", 0.5), ("cad", 0.3)), age=0.35, severity=-0.8, icu=-1.0, mortality=-1.0, los=-0.4, readmit=-0.1, unit="CCU", labs=("TROPONIN_T",)),
  _Reason("chest_pain", (("R07.9", 1.0, "Chest pain, unspecified"),), -1.6, (("cad", 0.8),), severity=-1.0, icu=-1.5, mortality=-2.0, los=-0.6, readmit=-0.2, unit="CCU", labs=("TROPONIN_T",)),
  _Reason("cellulitis", (("L03.115", 1.0, "Cellulitis of right lower limb"),), -2.2, (("t2dm", 0.7), ("obesity", 0.7)), severity=-0.3, icu=-1.0, mortality=-1.0, meds=(("CEFAZOLIN", 0.8), ("VANCOMYCIN", 0.3))),
  _Reason("knee_replacement", (("M17.11", 1.0, "Primary osteoarthritis, right knee"),), -2.5, (("obesity", 0.8),), age=0.2, severity=-1.2, icu=-2.0, mortality=-2.5, los=-0.3, readmit=-0.3, unit="SICU", elective=True, meds=(("CEFAZOLIN", 0.9), ("OXYCODONE", 0.8), ("ENOXAPARIN", 0.6)), procedures=(("0SRD0J9", 1.0, "Replacement of left knee joint with synthetic substitute, cemented"),)),
  _Reason("chemotherapy", (("Z51.11", 1.0, "Encounter for antineoplastic chemotherapy"),), -3.5, (("cancer", 3.5),), severity=-0.5, icu=-1.5, mortality=-0.5, los=-0.3, readmit=0.7, elective=True, meds=(("ONDANSETRON", 0.9), ("CARBOPLATIN", 0.6)), procedures=(("3E04305", 0.95, "Introduction of antineoplastic into central vein"),)),
  _Reason("afib_rvr", (("I48.91", 1.0, "Atrial fibrillation, unspecified"),), -2.6, (("af", 2.0),), age=0.3, severity=-0.3, mortality=-0.8, los=-0.3, readmit=0.2, unit="CCU", labs=("TROPONIN_T", "BNP"), meds=(("DILTIAZEM", 0.8), ("METOPROLOL", 0.6), ("HEPARIN", 0.4))),
  _Reason("alcohol_withdrawal", (("F10.239", 1.0, "Alcohol dependence with withdrawal"),), -3.2, (("cirrhosis", 1.5),), age=-0.3, male=0.7, severity=0.2, icu=0.4, mortality=-0.3, los=0.1, readmit=0.6, labs=("ALT", "BILIRUBIN"), meds=(("LORAZEPAM", 0.9), ("THIAMINE", 0.9))),
)
_REASON_INDEX = {r.name: i for i, r in enumerate(_REASONS)}
_INFECTIONS = ("pneumonia", "sepsis", "uti", "cellulitis")

# Inpatient medications given regardless of reason, with Zipf-like popularity.
_COMMON_INPATIENT_MEDS = (
  "ACETAMINOPHEN", "HEPARIN_SQ", "ONDANSETRON", "DOCUSATE", "PANTOPRAZOLE", "SENNA", "POTASSIUM_CHLORIDE",
  "MAGNESIUM_SULFATE", "INSULIN_LISPRO", "OXYCODONE", "MORPHINE", "LORAZEPAM", "MELATONIN", "POLYETHYLENE_GLYCOL",
  "SODIUM_CHLORIDE_0.9%", "DEXTROSE_5%", "FAMOTIDINE", "TRAZODONE", "QUETIAPINE", "HALOPERIDOL",
)
_ADMISSION_TYPES = ("EMERGENCY", "URGENT", "ELECTIVE")
_DISPOSITIONS = ("HOME", "HOME_HEALTH", "SKILLED_NURSING", "REHAB", "DIED")
_ICU_UNITS = ("MICU", "CCU", "SICU", "NEURO_ICU")


@dataclasses.dataclass(frozen=True)
class _Measurement:
  key: str
  code: str
  decimals: int
  description: str


_LABS: tuple[_Measurement, ...] = (
  _Measurement("GLUCOSE", "LAB//GLUCOSE//mg/dL", 0, "Glucose"),
  _Measurement("HBA1C", "LAB//HBA1C//%", 1, "Hemoglobin A1c"),
  _Measurement("CREATININE", "LAB//CREATININE//mg/dL", 2, "Creatinine"),
  _Measurement("BUN", "LAB//BUN//mg/dL", 0, "Urea nitrogen"),
  _Measurement("SODIUM", "LAB//SODIUM//mmol/L", 0, "Sodium"),
  _Measurement("POTASSIUM", "LAB//POTASSIUM//mmol/L", 1, "Potassium"),
  _Measurement("BICARBONATE", "LAB//BICARBONATE//mmol/L", 0, "Bicarbonate"),
  _Measurement("WBC", "LAB//WBC//K/uL", 1, "White blood cells"),
  _Measurement("HEMOGLOBIN", "LAB//HEMOGLOBIN//g/dL", 1, "Hemoglobin"),
  _Measurement("PLATELETS", "LAB//PLATELETS//K/uL", 0, "Platelet count"),
  _Measurement("LACTATE", "LAB//LACTATE//mmol/L", 1, "Lactate"),
  _Measurement("TROPONIN_T", "LAB//TROPONIN_T//ng/mL", 3, "Troponin T"),
  _Measurement("BNP", "LAB//BNP//pg/mL", 0, "B-type natriuretic peptide"),
  _Measurement("INR", "LAB//INR//ratio", 1, "INR (PT)"),
  _Measurement("ALT", "LAB//ALT//IU/L", 0, "Alanine aminotransferase"),
  _Measurement("BILIRUBIN", "LAB//BILIRUBIN//mg/dL", 1, "Bilirubin, total"),
  _Measurement("ALBUMIN", "LAB//ALBUMIN//g/dL", 1, "Albumin"),
  _Measurement("LDL", "LAB//LDL//mg/dL", 0, "Cholesterol, LDL"),
  _Measurement("TSH", "LAB//TSH//mIU/L", 2, "Thyroid stimulating hormone"),
  _Measurement("HEART_RATE", "VITAL//HEART_RATE//bpm", 0, "Heart rate"),
  _Measurement("SBP", "VITAL//SYSTOLIC_BP//mmHg", 0, "Systolic blood pressure"),
  _Measurement("RESP_RATE", "VITAL//RESP_RATE//insp/min", 0, "Respiratory rate"),
  _Measurement("SPO2", "VITAL//SPO2//%", 0, "Oxygen saturation"),
  _Measurement("TEMPERATURE", "VITAL//TEMPERATURE//C", 1, "Temperature"),
  _Measurement("BMI", "VITAL//BMI//kg/m2", 1, "Body mass index"),
)
_LAB_INDEX = {m.key: i for i, m in enumerate(_LABS)}
_ADMISSION_PANEL = ("SODIUM", "POTASSIUM", "CREATININE", "BUN", "GLUCOSE", "BICARBONATE", "WBC", "HEMOGLOBIN", "PLATELETS")
_DAILY_PANEL = ("CREATININE", "POTASSIUM", "HEMOGLOBIN", "WBC", "GLUCOSE")
_ICU_VITALS = ("HEART_RATE", "SBP", "RESP_RATE", "SPO2", "TEMPERATURE")

# Real ICD-10-CM chapter ranges; background codes are drawn inside them so that the chapter /
# category hierarchy the tokenizer can exploit is the real one. (letter, first, last, weight)
_CHAPTER_POOLS = (
  ("A", 0, 99, 1.0), ("B", 0, 99, 0.8), ("C", 0, 96, 0.8), ("D", 0, 89, 1.0), ("E", 0, 89, 1.6), ("F", 1, 99, 1.2),
  ("G", 0, 99, 1.2), ("H", 0, 95, 0.9), ("I", 0, 99, 1.8), ("J", 0, 99, 1.4), ("K", 0, 95, 1.5), ("L", 0, 99, 0.8),
  ("M", 0, 99, 1.6), ("N", 0, 99, 1.3), ("O", 0, 99, 0.3), ("R", 0, 99, 2.0), ("S", 0, 99, 0.8), ("T", 0, 88, 0.7),
  ("Z", 0, 99, 2.0),
)
_CHAPTER_AFFINITY = {  # condition -> {pool letter: log-odds boost}
  "t2dm": {"E": 1.0, "N": 0.3, "H": 0.3}, "obesity": {"E": 0.5, "M": 0.3}, "htn": {"I": 0.6}, "hld": {"E": 0.3},
  "cad": {"I": 0.8}, "af": {"I": 0.8}, "hf": {"I": 1.0, "R": 0.3}, "ckd": {"N": 1.2, "D": 0.4}, "copd": {"J": 1.2},
  "asthma": {"J": 0.8}, "depression": {"F": 1.2, "G": 0.3}, "cancer": {"C": 1.8, "D": 0.6, "Z": 0.4},
  "cirrhosis": {"K": 1.4, "D": 0.4}, "hypothyroid": {"E": 0.6}, "dementia": {"F": 0.8, "G": 1.0, "S": 0.4},
  "tobacco": {"J": 0.4, "Z": 0.3},
}
_NUM_BACKGROUND_DX = 2600
_NUM_BACKGROUND_PX = 260
_PCS_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # ICD-10-PCS avoids I and O.


@dataclasses.dataclass
class _Vocabulary:
  """Code book plus the integer tables the vectorised generator indexes."""

  book: _CodeBook
  cond_codes: np.ndarray  # [K, max_subtypes] code ids (-1 padded)
  cond_weights: np.ndarray  # [K, max_subtypes]
  reason_codes: np.ndarray  # [R, max_codes]
  reason_weights: np.ndarray
  med_ids: dict[str, int]
  lab_ids: np.ndarray  # [num_labs]
  bg_dx_ids: np.ndarray  # background diagnosis code ids, grouped by pool
  bg_dx_pool_offsets: np.ndarray  # [num_pools+1]
  bg_dx_cum: np.ndarray  # cumulative within-pool Zipf weights (each pool ends at 1)
  bg_px_ids: np.ndarray
  bg_px_cum: np.ndarray
  pool_letters: tuple[str, ...]


def _build_vocabulary() -> _Vocabulary:
  """Builds the fixed code book. Uses its own RNG so every cohort shares one code universe."""
  book = _CodeBook()
  book.add(BIRTH_CODE, "Birth")
  book.add(DEATH_CODE, "Death")
  for sex, desc in (("F", "female"), ("M", "male")):
    book.add(f"GENDER//{sex}", f"Sex: {desc}")
  for kind in _ADMISSION_TYPES:
    book.add(f"HOSPITAL_ADMISSION//{kind}", f"Hospital admission, {kind.lower()}")
  for disp in _DISPOSITIONS:
    book.add(f"HOSPITAL_DISCHARGE//{disp}", f"Hospital discharge to {disp.lower()}")
  for unit in _ICU_UNITS:
    book.add(f"ICU_ADMISSION//{unit}", f"ICU admission ({unit})")
    book.add(f"ICU_DISCHARGE//{unit}", f"ICU discharge ({unit})")
  for visit in ("PRIMARY_CARE", "SPECIALTY"):
    book.add(f"OUTPATIENT_VISIT//{visit}", f"Outpatient visit, {visit.lower().replace('_', ' ')}")

  def add_icd(body: str, description: str) -> int:
    return book.add(_icd(body), description, _icd_parents(body))

  max_sub = max(len(c.codes) for c in _CONDITIONS)
  cond_codes = np.full((len(_CONDITIONS), max_sub), -1, np.int32)
  cond_weights = np.zeros((len(_CONDITIONS), max_sub))
  for k, cond in enumerate(_CONDITIONS):
    for j, (body, weight, desc) in enumerate(cond.codes):
      cond_codes[k, j] = add_icd(body, desc)
      cond_weights[k, j] = weight
  max_rc = max(len(r.codes) for r in _REASONS)
  reason_codes = np.full((len(_REASONS), max_rc), -1, np.int32)
  reason_weights = np.zeros((len(_REASONS), max_rc))
  for r, reason in enumerate(_REASONS):
    for j, (body, weight, desc) in enumerate(reason.codes):
      reason_codes[r, j] = add_icd(body, desc)
      reason_weights[r, j] = weight
    for body, _, desc in reason.procedures:
      book.add(f"ICD10PCS//{body}", desc)
  for body, desc in (("5A1935Z", "Respiratory ventilation, less than 24 hours"), ("5A1945Z", "Respiratory ventilation, 24-96 hours"), ("5A1955Z", "Respiratory ventilation, greater than 96 hours"), ("5A1D70Z", "Performance of urinary filtration, intermittent"), ("02HV33Z", "Insertion of infusion device into superior vena cava")):
    book.add(f"ICD10PCS//{body}", desc)
  meds = set(_COMMON_INPATIENT_MEDS) | {"NOREPINEPHRINE", "SEVELAMER", "EPOETIN_ALFA"}
  for cond in _CONDITIONS:
    meds.update(m for m, _ in cond.meds)
  for reason in _REASONS:
    meds.update(m for m, _ in reason.meds)
  med_ids = {m: book.add(f"MEDICATION//{m}", f"Medication: {m.lower().replace('_', ' ')}") for m in sorted(meds)}
  lab_ids = np.array([book.add(m.code, m.description) for m in _LABS], np.int32)

  rng = np.random.default_rng(20240601)
  weights = np.array([w for *_, w in _CHAPTER_POOLS])
  per_pool = np.maximum(20, np.round(_NUM_BACKGROUND_DX * weights / weights.sum())).astype(int)
  ids, offsets, cums = [], [0], []
  for (letter, lo, hi, _), count in zip(_CHAPTER_POOLS, per_pool):
    pool: list[int] = []
    while len(pool) < count:
      category = f"{letter}{rng.integers(lo, hi + 1):02d}"
      depth = rng.choice(3, p=[0.15, 0.55, 0.30])
      body = category if depth == 0 else f"{category}.{''.join(str(d) for d in rng.integers(0, 10, depth))}"
      if _icd(body) in book:
        continue
      pool.append(add_icd(body, f"Synthetic diagnosis in {category}"))
    ranks = rng.permutation(len(pool)) + 1
    zipf = 1.0 / ranks**1.1
    ids.extend(pool)
    cums.append(np.cumsum(zipf) / zipf.sum())
    offsets.append(offsets[-1] + len(pool))
  px: list[int] = []
  while len(px) < _NUM_BACKGROUND_PX:
    body = "0" + "".join(rng.choice(list(_PCS_ALPHABET), 6))
    if f"ICD10PCS//{body}" in book:
      continue
    px.append(book.add(f"ICD10PCS//{body}", "Synthetic procedure"))
  px_zipf = 1.0 / (rng.permutation(len(px)) + 1) ** 1.2
  return _Vocabulary(
    book=book,
    cond_codes=cond_codes,
    cond_weights=cond_weights,
    reason_codes=reason_codes,
    reason_weights=reason_weights,
    med_ids=med_ids,
    lab_ids=lab_ids,
    bg_dx_ids=np.array(ids, np.int32),
    bg_dx_pool_offsets=np.array(offsets),
    bg_dx_cum=np.concatenate(cums),
    bg_px_ids=np.array(px, np.int32),
    bg_px_cum=np.cumsum(px_zipf) / px_zipf.sum(),
    pool_letters=tuple(p[0] for p in _CHAPTER_POOLS),
  )


# ----------------------------------------------------------------------------- small helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _normal_sf(x: np.ndarray) -> np.ndarray:
  """P(Z > x) for a standard normal Z, vectorised through math.erfc (no scipy needed)."""
  return 0.5 * np.vectorize(math.erfc, otypes=[float])(np.asarray(x, float) / math.sqrt(2.0))


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
  """One draw per row of a [n, k] probability matrix."""
  cum = np.cumsum(probs, axis=1)
  u = rng.random(len(probs)) * cum[:, -1]
  return np.minimum((u[:, None] > cum).sum(axis=1), probs.shape[1] - 1)


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
  """[0..c0-1, 0..c1-1, ...] for a vector of counts."""
  total = int(counts.sum())
  starts = np.repeat(np.cumsum(counts) - counts, counts)
  return np.arange(total) - starts


class _Events:
  """Collects events as parallel arrays; sorted by (subject, time, order) at the end."""

  def __init__(self) -> None:
    self._parts: list[tuple[np.ndarray, ...]] = []

  def add(self, subject, day, code, value=None, order=0) -> None:
    subject = np.asarray(subject, np.int64)
    n = len(subject)
    if n == 0:
      return
    day = np.broadcast_to(np.asarray(day, np.float64), (n,))
    code = np.broadcast_to(np.asarray(code, np.int32), (n,))
    value = np.full(n, np.nan, np.float32) if value is None else np.broadcast_to(np.asarray(value, np.float32), (n,))
    order = np.broadcast_to(np.asarray(order, np.int8), (n,))
    self._parts.append((subject, day, code, value, order))

  def build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    subject, day, code, value, order = (np.concatenate(x) for x in zip(*self._parts))
    # Static events carry NaN days; they sort first within the subject.
    minutes = np.where(np.isnan(day), np.iinfo(np.int64).min, _minutes(np.nan_to_num(day)))
    perm = np.lexsort((order, minutes, subject))
    return subject[perm], minutes[perm], code[perm], value[perm]


@dataclasses.dataclass
class _Context:
  """State arrays aligned with the rows of a measurement batch, for the value formulas."""

  rng: np.random.Generator
  male: np.ndarray
  age_dec: np.ndarray
  cond: np.ndarray  # [n, K] float
  ckd: np.ndarray  # int level 0..3
  dm_control: np.ndarray
  reason: np.ndarray  # int, -1 for outpatient
  acute: np.ndarray  # acute severity x phase (0 outpatient)
  phase: np.ndarray  # 1 at admission, decays in survivors, rises before death; 0 outpatient
  icu: np.ndarray
  statin: np.ndarray
  warfarin: np.ndarray
  cr_shift: np.ndarray  # log-creatinine above the CKD stage: own baseline + chronic drift + acute injury

  def c(self, name: str) -> np.ndarray:
    return self.cond[:, _COND_INDEX[name]]

  def rx(self, *names: str) -> np.ndarray:
    hit = np.isin(self.reason, [_REASON_INDEX[n] for n in names])
    return hit * self.phase

  def noise(self, sd: float) -> np.ndarray:
    return self.rng.normal(0.0, sd, len(self.male))


def _measure(key: str, x: _Context) -> np.ndarray:
  """The value formula of one lab or vital: the place where patient state becomes numbers."""
  ckd_effect = _CKD_EFFECT[x.ckd]
  infection = x.rx(*_INFECTIONS)
  match key:
    case "GLUCOSE":
      return 95 * np.exp(0.45 * x.c("t2dm") * (1 + 0.35 * x.dm_control) + 0.06 * x.acute + 1.1 * x.rx("hyperglycemic_crisis") + 0.1 * x.rx("sepsis") + x.noise(0.12))
    case "HBA1C":
      return np.maximum(4.0, 5.3 + x.c("t2dm") * (1.6 + 0.9 * x.dm_control) + x.noise(0.3))
    case "CREATININE":
      return np.minimum(25.0, (0.8 + 0.2 * x.male) * np.exp(ckd_effect + x.cr_shift + 0.05 * x.acute + 0.1 * x.c("hf") + x.noise(0.07)))
    case "BUN":
      return 14 * np.exp(0.4 * ckd_effect + 0.6 * x.cr_shift + 0.25 * x.c("hf") + 0.08 * x.acute + 0.3 * x.rx("gi_bleed") + x.noise(0.2))
    case "SODIUM":
      return 139 - 2.5 * x.c("hf") - 3.0 * x.c("cirrhosis") - 1.0 * x.acute - 2.0 * x.rx("hf_exacerbation") + x.noise(2.5)
    case "POTASSIUM":
      return 4.1 + 0.25 * x.ckd + 0.4 * np.maximum(x.cr_shift, 0.0) + 0.6 * x.rx("hyperglycemic_crisis") + x.noise(0.35)
    case "BICARBONATE":
      return 25 - 1.2 * x.acute - 9.0 * x.rx("hyperglycemic_crisis") - 0.8 * x.ckd + 2.0 * x.c("copd") + x.noise(2.0)
    case "WBC":
      return 7.2 * np.exp(0.45 * infection + 0.6 * x.rx("sepsis") + 0.06 * x.acute + x.noise(0.22))
    case "HEMOGLOBIN":
      return np.maximum(4.0, 12.8 + 1.4 * x.male - 0.5 * x.ckd - 1.0 * x.c("cancer") - 3.2 * x.rx("gi_bleed") - 0.7 * x.c("cirrhosis") - 0.25 * x.acute + x.noise(1.0))
    case "PLATELETS":
      return 245 * np.exp(-0.6 * x.c("cirrhosis") - 0.3 * x.rx("sepsis") + x.noise(0.22))
    case "LACTATE":
      return 1.0 * np.exp(0.28 * x.acute + 0.6 * x.rx("sepsis") + 0.3 * x.c("cirrhosis") + x.noise(0.25))
    case "TROPONIN_T":
      return 0.008 * np.exp(3.0 * x.rx("nstemi") + 0.4 * x.ckd + 0.25 * x.acute + 0.5 * x.c("hf") + x.noise(0.5))
    case "BNP":
      return 60 * np.exp(1.6 * x.c("hf") + 0.9 * x.rx("hf_exacerbation") + 0.4 * x.c("af") + 0.35 * x.ckd + 0.25 * x.age_dec + x.noise(0.45))
    case "INR":
      return np.exp(0.35 * x.c("cirrhosis") + 0.8 * x.warfarin + 0.1 * x.rx("sepsis") + x.noise(0.08))
    case "ALT":
      return 24 * np.exp(0.6 * x.c("cirrhosis") + 0.8 * x.rx("alcohol_withdrawal") + x.noise(0.35))
    case "BILIRUBIN":
      return 0.6 * np.exp(1.1 * x.c("cirrhosis") + 0.3 * x.rx("sepsis") + x.noise(0.3))
    case "ALBUMIN":
      return np.maximum(1.0, 4.0 - 0.8 * x.c("cirrhosis") - 0.15 * x.acute - 0.35 * x.c("cancer") + x.noise(0.3))
    case "LDL":
      return np.maximum(30.0, 105 + 35 * x.c("hld") - 40 * x.statin + x.noise(22.0))
    case "TSH":
      return 1.8 * np.exp(0.8 * x.c("hypothyroid") + x.noise(0.45))
    case "HEART_RATE":
      return 76 + 7 * x.acute + 10 * x.c("af") + 25 * x.rx("afib_rvr") + 6 * infection + x.noise(9.0)
    case "SBP":
      return 124 + 13 * x.c("htn") + 3 * x.age_dec - 9 * x.acute * x.icu + x.noise(12.0)
    case "RESP_RATE":
      return np.maximum(6.0, 16 + 2.2 * x.acute + 3.0 * x.rx("pneumonia", "copd_exacerbation") + x.noise(2.5))
    case "SPO2":
      return np.minimum(100.0, 97 - 1.2 * x.acute - 2.5 * x.c("copd") - 2.5 * x.rx("pneumonia", "copd_exacerbation") + x.noise(1.5))
    case "TEMPERATURE":
      return 36.8 + 0.9 * infection + 0.3 * x.rx("sepsis") + x.noise(0.35)
    case "BMI":
      return np.maximum(14.0, 26 + 8 * x.c("obesity") - 1.5 * x.c("cancer") + x.noise(3.0))
  raise KeyError(key)


# ------------------------------------------------------------------------------ one chunk


@dataclasses.dataclass
class _Chunk:
  """Generated subjects of one chunk: sorted events, splits and label rows."""

  subject_ids: np.ndarray
  splits: np.ndarray  # int index into SPLIT_NAMES per subject
  ev_subject: np.ndarray  # row -> local subject index
  ev_minutes: np.ndarray
  ev_code: np.ndarray
  ev_value: np.ndarray
  labels: dict[str, dict[str, np.ndarray]]
  stats: dict[str, int]


def _generate_chunk(rng: np.random.Generator, first_index: int, n: int, voc: _Vocabulary, max_admissions: int) -> _Chunk:
  """Generates `n` subjects; all arithmetic is vectorised over subjects or admissions."""
  K = len(_CONDITIONS)
  ev = _Events()
  stats: dict[str, int] = {}
  subj = np.arange(n)

  # Demographics and latent state.
  male = rng.random(n) < 0.48
  age0 = np.clip(rng.normal(52, 18, n), 18, 95)
  # Follow-up starts at an outpatient visit during clinic hours (08:00-17:00).
  t0 = np.floor(_FOLLOW_UP_START + rng.random(n) * _FOLLOW_UP_SPAN_DAYS) + (8 + 9 * rng.random(n)) * _HOUR
  birth = t0 - age0 * _YEAR - rng.random(n)
  z = rng.normal(size=(n, 3))
  dm_control = rng.normal(size=n)
  age_dec0 = (age0 - 60.0) / 10.0

  cond = np.zeros((n, K), bool)
  subtype = np.zeros((n, K), np.int64)
  for k, c in enumerate(_CONDITIONS):
    logit = c.base_logit + z @ np.array(c.loadings) + c.age_per_decade * age_dec0 + c.male * male
    for other, boost in c.after:
      logit = logit + boost * cond[:, _COND_INDEX[other]]
    cond[:, k] = rng.random(n) < _sigmoid(logit)
    w = voc.cond_weights[k, : len(c.codes)]
    subtype[:, k] = _categorical(rng, np.broadcast_to(w, (n, len(w))))
  # Sex-specific cancers: breast mostly female, prostate only male.
  ci = _COND_INDEX["cancer"]
  breast, prostate = 1, 3
  subtype[:, ci] = np.where(male & (subtype[:, ci] == breast), prostate, subtype[:, ci])
  subtype[:, ci] = np.where(~male & (subtype[:, ci] == prostate), breast, subtype[:, ci])
  ckd_level = np.where(cond[:, _COND_INDEX["ckd"]], subtype[:, _COND_INDEX["ckd"]] + 1, 0)
  cond_code = voc.cond_codes[np.arange(K)[None, :], subtype]  # [n, K] code id of each condition
  burden_w = np.array([c.burden for c in _CONDITIONS])
  burden_w[_COND_INDEX["ckd"]] = 0.0
  burden = cond @ burden_w + _CKD_BURDEN[ckd_level] + 0.3 * age_dec0 + 0.3 * np.maximum(dm_control, 0) * cond[:, _COND_INDEX["t2dm"]]
  n_cond = cond.sum(axis=1)

  # Kidney trajectory: an own creatinine baseline and a chronic drift (log-creatinine per year
  # of follow-up), faster with diabetes (worse when poorly controlled), hypertension and CKD.
  # The drift is only visible as a trend across a subject's creatinine values.
  t2dm_ = cond[:, _COND_INDEX["t2dm"]]
  cr_base = rng.normal(0.0, 0.15, n)
  kd_rate = np.exp(rng.normal(-2.7 + 0.7 * t2dm_ + 0.5 * cond[:, _COND_INDEX["htn"]] + 0.6 * (ckd_level > 0) + 0.3 * t2dm_ * np.maximum(dm_control, 0), 0.9))

  def renal_drift(rows: np.ndarray, day: np.ndarray) -> np.ndarray:
    return np.minimum(kd_rate[rows] * np.maximum(day - t0[rows], 0.0) / _YEAR, _MAX_RENAL_DRIFT)

  # One chemotherapy course for most subjects with cancer: outpatient cycles every 21 days.
  has_course = cond[:, _COND_INDEX["cancer"]] & (rng.random(n) < 0.6)
  chemo_start = np.where(has_course, np.floor(t0 + 1.0 + rng.random(n) * 4 * _YEAR) + (8 + 8 * rng.random(n)) * _HOUR, np.inf)
  chemo_cycles = rng.integers(4, 7, n)

  # Chronic medications.
  med_names = sorted(voc.med_ids)
  med_col = {m: j for j, m in enumerate(med_names)}
  on_med = np.zeros((n, len(med_names)), bool)
  for k, c in enumerate(_CONDITIONS):
    for med, p in c.meds:
      on_med[:, med_col[med]] |= cond[:, k] & (rng.random(n) < p)
  on_med[:, med_col["INSULIN_GLARGINE"]] |= cond[:, _COND_INDEX["t2dm"]] & (dm_control > 1.0)
  esrd = ckd_level == 3
  on_med[:, med_col["SEVELAMER"]] |= esrd & (rng.random(n) < 0.7)
  on_med[:, med_col["EPOETIN_ALFA"]] |= esrd & (rng.random(n) < 0.6)
  statin = on_med[:, med_col["ATORVASTATIN"]]
  warfarin = on_med[:, med_col["WARFARIN"]]
  med_code_ids = np.array([voc.med_ids[m] for m in med_names], np.int32)

  # Static and birth events.
  ev.add(subj, np.nan, np.where(male, voc.book.id("GENDER//M"), voc.book.id("GENDER//F")))
  ev.add(subj, birth, voc.book.id(BIRTH_CODE))

  # ------------------------------------------------------------------ admission process
  reason_logw = np.array([r.log_weight for r in _REASONS])
  reason_boost = np.zeros((K, len(_REASONS)))
  for r, reason in enumerate(_REASONS):
    for name, b in reason.boosts:
      reason_boost[_COND_INDEX[name], r] = b
  reason_age = np.array([r.age for r in _REASONS])
  reason_male = np.array([r.male for r in _REASONS])
  reason_arr = {f: np.array([getattr(r, f) for r in _REASONS]) for f in ("severity", "icu", "mortality", "los", "readmit")}

  neutropenic_boost = np.zeros(len(_REASONS))
  neutropenic_boost[[_REASON_INDEX["sepsis"], _REASON_INDEX["pneumonia"]]] = (2.0, 1.0)
  cardiorenal = cond[:, _COND_INDEX["hf"]] & (ckd_level >= 2)

  t = t0.copy()
  active = np.ones(n, bool)
  readmit_next = np.zeros(n, bool)
  death_day = np.full(n, np.nan)
  num_adm = np.zeros(n, np.int64)
  adm_parts: list[dict[str, np.ndarray]] = []
  for k in range(max_admissions):
    idx = np.flatnonzero(active)
    if len(idx) == 0:
      break
    age_dec = ((t[idx] - birth[idx]) / _YEAR - 60.0) / 10.0
    readmit = readmit_next[idx]
    rate_adm = np.exp(-2.2 + 0.45 * burden[idx] + 0.1 * age_dec) / _YEAR
    min_gap = 0.0 if k == 0 else 30.0
    gap_adm = np.where(readmit, 1.0 + rng.random(len(idx)) * 29.0, min_gap + rng.exponential(1.0 / rate_adm))
    rate_death = np.exp(-5.0 + 0.55 * burden[idx] + 0.5 * age_dec) / _YEAR
    gap_death = np.where(readmit, np.inf, rng.exponential(1.0 / rate_death))
    t_adm, t_death = t[idx] + gap_adm, t[idx] + gap_death
    dies = (t_death < t_adm) & (t_death < _DATA_END)
    admitted = ~dies & (t_adm < _DATA_END)
    death_day[idx[dies]] = t_death[dies]
    active[idx[~admitted]] = False
    a = idx[admitted]
    if len(a) == 0:
      continue
    m = len(a)
    t_a = t_adm[admitted]
    age_dec_a = age_dec[admitted]
    # Timing: days since the previous discharge, and whether a chemotherapy cycle 4-14 days
    # ago (after any previous stay) puts this admission in the neutropenic window.
    t_prev = t[a]
    recent = np.where(num_adm[a] > 0, np.exp(-(t_a - t_prev) / _RECENT_DAYS), 0.0)
    last_cycle = chemo_start[a] + _CHEMO_EVERY_DAYS * np.clip(np.floor((t_a - chemo_start[a]) / _CHEMO_EVERY_DAYS), 0, chemo_cycles[a] - 1)
    since_cycle = t_a - last_cycle
    neutropenic = (since_cycle >= 4.0) & (since_cycle <= 14.0) & (last_cycle > t_prev)
    renal = renal_drift(a, t_a)
    logits = reason_logw + cond[a].astype(float) @ reason_boost + np.outer(age_dec_a, reason_age) + np.outer(male[a], reason_male) + np.outer(neutropenic, neutropenic_boost)
    reason = _categorical(rng, _softmax(logits))
    severity = reason_arr["severity"][reason] + rng.normal(size=m)
    # Acute kidney injury: a creatinine rise over the subject's own current level, partly
    # recovered by discharge.
    aki_mu = -0.3 + 1.1 * (reason == _REASON_INDEX["acute_kidney_injury"]) + 0.4 * (reason == _REASON_INDEX["sepsis"]) + 0.3 * (reason == _REASON_INDEX["hf_exacerbation"]) + 0.15 * severity + 0.2 * renal
    aki = np.maximum(aki_mu + 0.45 * rng.normal(size=m), 0.0)
    recovery = rng.beta(2.0, 1.2, m)
    p_icu = _sigmoid(-2.5 + 1.3 * severity + reason_arr["icu"][reason])
    icu = rng.random(m) < p_icu
    hidden_mort = 1.5 * renal + 1.6 * aki + 1.0 * recent + 1.8 * neutropenic + 0.8 * cardiorenal[a]
    p_mort = _sigmoid(-5.9 + 0.9 * severity + 0.3 * burden[a] + 0.3 * age_dec_a + reason_arr["mortality"][reason] + hidden_mort)
    died = rng.random(m) < p_mort
    hidden_los = 0.45 * renal + 0.55 * aki + 0.5 * recent + 0.5 * neutropenic
    los_mu = 0.3 + 0.35 * severity + 0.08 * burden[a] + 0.1 * age_dec_a + 0.5 * icu + reason_arr["los"][reason] + hidden_los
    los_sd = 0.55
    los = 1.0 + np.exp(los_mu + los_sd * rng.normal(size=m))
    p_long = _normal_sf((math.log(6.0) - los_mu) / los_sd)  # P(LOS > 7 days) given the state
    disp_logits = np.stack(
      [
        np.zeros(m),
        -1.5 + 0.4 * age_dec_a + 0.3 * burden[a],
        -2.5 + 0.7 * age_dec_a + 0.4 * burden[a] + 1.0 * (reason == _REASON_INDEX["hip_fracture"]),
        -3.0 + 2.0 * np.isin(reason, [_REASON_INDEX[r] for r in ("stroke", "hip_fracture", "knee_replacement")]),
      ],
      axis=1,
    )
    disposition = np.where(died, 4, _categorical(rng, _softmax(disp_logits)))
    # Heart-failure exacerbations discharged without a loop diuretic come back more often.
    hf_exac = reason == _REASON_INDEX["hf_exacerbation"]
    loop_at_discharge = hf_exac & (rng.random(m) < 0.6)
    hidden_readmit = 1.5 * renal + 3.0 * aki * (1.0 - recovery) + 1.8 * recent + hf_exac * (1.5 * ~loop_at_discharge - 0.5)
    p_readmit = _sigmoid(-3.7 + 0.3 * burden[a] + 0.25 * severity + reason_arr["readmit"][reason] + 0.4 * (disposition == 2) + 0.1 * np.minimum(num_adm[a], 5) + hidden_readmit)
    readmitted = ~died & (rng.random(m) < p_readmit)
    t_d = t_a + los
    adm_parts.append(
      dict(
        subject=a, t_a=t_a, t_d=t_d, los=los, reason=reason, severity=severity, icu=icu, died=died,
        disposition=disposition, p_mort=p_mort, p_long=p_long, p_readmit=p_readmit, readmitted=readmitted,
        index=np.full(m, k), elective=np.array([_REASONS[r].elective for r in reason]), age_dec=age_dec_a,
        renal=renal, aki=aki, recovery=recovery, loop_at_discharge=loop_at_discharge,
      )
    )
    num_adm[a] += 1
    t[a] = t_d
    death_day[a[died]] = t_d[died]
    active[a[died]] = False
    readmit_next[a] = readmitted
  stats["subjects_at_admission_cap"] = int(active.sum())
  cap_end = np.where(active, t, np.inf)  # record ends at the last discharge for capped subjects
  adm = {key: np.concatenate([p[key] for p in adm_parts]) for key in adm_parts[0]} if adm_parts else None
  record_end = np.minimum(np.where(np.isnan(death_day), _DATA_END, death_day), cap_end)

  # ------------------------------------------------------------------ outpatient visits
  years = np.maximum(record_end - t0, 0.0) / _YEAR
  n_visits = np.minimum(rng.poisson((0.8 + 0.35 * n_cond) * years), 60) + 1  # +1: the index visit at t0
  v_subj = np.repeat(subj, n_visits)
  first = _ragged_arange(n_visits) == 0
  v_day = t0[v_subj] + rng.random(len(v_subj)) * (record_end[v_subj] - t0[v_subj])
  v_day = np.where(first, t0[v_subj], np.floor(v_day) + (8 + 9 * rng.random(len(v_subj))) * _HOUR)
  # Visit events span up to 40 minutes; keep them clear of the end of the record (death).
  v_ok = first | ((v_day > t0[v_subj]) & (v_day < record_end[v_subj] - _HOUR))
  v_subj, v_day, first = v_subj[v_ok], v_day[v_ok], first[v_ok]
  keep = ~_inside_stay(adm, v_subj, v_day) | first  # no visits inside a hospital stay
  v_subj, v_day, first = v_subj[keep], v_day[keep], first[keep]
  nv = len(v_subj)
  visit_kind = np.where(rng.random(nv) < 0.7, voc.book.id("OUTPATIENT_VISIT//PRIMARY_CARE"), voc.book.id("OUTPATIENT_VISIT//SPECIALTY"))
  ev.add(v_subj, v_day, visit_kind, order=0)
  # Chronic diagnoses documented at the visit (almost always at the index visit).
  p_doc = np.where(first, 0.9, 0.45)[:, None]
  rows, ks = np.nonzero(cond[v_subj] & (rng.random((nv, K)) < p_doc))
  ev.add(v_subj[rows], v_day[rows], cond_code[v_subj[rows], ks], order=1)
  _background_dx(rng, ev, voc, v_subj, v_day, 0.6 + 0.15 * n_cond[v_subj], cond, order=1)
  # Vitals and labs.
  vital_probability = {"SBP": 0.95, "HEART_RATE": 0.6, "BMI": 0.5, "SPO2": 0.3}
  out_masks = {key: rng.random(nv) < p for key, p in vital_probability.items()}
  bmp = rng.random(nv) < np.minimum(0.25 + 0.05 * n_cond[v_subj], 0.7)
  for key in ("CREATININE", "POTASSIUM", "GLUCOSE"):
    out_masks[key] = bmp
  c_at = lambda name: cond[v_subj, _COND_INDEX[name]]  # noqa: E731
  out_masks["HBA1C"] = rng.random(nv) < np.where(c_at("t2dm"), 0.5, 0.05)
  out_masks["LDL"] = rng.random(nv) < np.where(c_at("hld"), 0.3, 0.08)
  out_masks["TSH"] = rng.random(nv) < np.where(c_at("hypothyroid"), 0.4, 0.04)
  out_masks["HEMOGLOBIN"] = rng.random(nv) < 0.2 + 0.3 * (ckd_level[v_subj] > 0)
  out_masks["BNP"] = rng.random(nv) < np.where(c_at("hf"), 0.3, 0.01)
  out_masks["INR"] = rng.random(nv) < np.where(warfarin[v_subj], 0.6, 0.01)
  liver = rng.random(nv) < np.where(c_at("cirrhosis"), 0.5, 0.05)
  out_masks["ALT"] = liver
  out_masks["BILIRUBIN"] = liver
  v_age_dec = ((v_day - birth[v_subj]) / _YEAR - 60.0) / 10.0
  zeros = np.zeros(nv)
  for key, mask in out_masks.items():
    r = np.flatnonzero(mask)
    ctx = _Context(
      rng=rng, male=male[v_subj[r]].astype(float), age_dec=v_age_dec[r], cond=cond[v_subj[r]].astype(float),
      ckd=ckd_level[v_subj[r]], dm_control=dm_control[v_subj[r]], reason=np.full(len(r), -1), acute=zeros[r],
      phase=zeros[r], icu=zeros[r], statin=statin[v_subj[r]].astype(float), warfarin=warfarin[v_subj[r]].astype(float),
      cr_shift=cr_base[v_subj[r]] + renal_drift(v_subj[r], v_day[r]),
    )
    offset = (5 if key in ("SBP", "HEART_RATE", "BMI", "SPO2") else 40) / 1440.0
    values = np.round(_measure(key, ctx), _LABS[_LAB_INDEX[key]].decimals)
    ev.add(v_subj[r], v_day[r] + offset, voc.lab_ids[_LAB_INDEX[key]], values, order=2)
  rows, meds = np.nonzero(on_med[v_subj] & (rng.random((nv, len(med_names))) < 0.35))
  ev.add(v_subj[rows], v_day[rows] + 20 / 1440.0, med_code_ids[meds], order=3)

  # Chemotherapy cycles (skipped while in hospital), each with a white-cell count at its
  # nadir ten days later.
  c_subj = np.repeat(np.flatnonzero(has_course), chemo_cycles[has_course])
  c_day = chemo_start[c_subj] + _CHEMO_EVERY_DAYS * _ragged_arange(chemo_cycles[has_course])
  keep = (c_day < record_end[c_subj] - _HOUR) & ~_inside_stay(adm, c_subj, c_day)
  c_subj, c_day = c_subj[keep], c_day[keep]
  ev.add(c_subj, c_day, voc.book.id("OUTPATIENT_VISIT//SPECIALTY"), order=0)
  ev.add(c_subj, c_day + 30 / 1440.0, voc.book.id("ICD10PCS//3E04305"), order=4)
  ev.add(c_subj, c_day + 40 / 1440.0, voc.med_ids["ONDANSETRON"], order=4)
  ev.add(c_subj, c_day + 60 / 1440.0, voc.med_ids["CARBOPLATIN"], order=4)
  nadir = c_day + 10.0
  keep = (rng.random(len(c_subj)) < 0.7) & (nadir < record_end[c_subj] - _HOUR) & ~_inside_stay(adm, c_subj, nadir)
  wbc = np.round(7.2 * np.exp(-1.1 + rng.normal(0.0, 0.3, int(keep.sum()))), _LABS[_LAB_INDEX["WBC"]].decimals)
  ev.add(c_subj[keep], nadir[keep], voc.lab_ids[_LAB_INDEX["WBC"]], wbc, order=2)
  stats["chemotherapy_cycles"] = int(len(c_subj))

  # Out-of-hospital deaths (in-hospital deaths are written with their admission).
  in_hospital_death = np.zeros(n, bool)
  if adm is not None:
    in_hospital_death[adm["subject"][adm["died"]]] = True
  out_death = ~np.isnan(death_day) & ~in_hospital_death
  ev.add(subj[out_death], death_day[out_death], voc.book.id(DEATH_CODE), order=9)
  stats["deaths_out_of_hospital"] = int(out_death.sum())
  stats["deaths_in_hospital"] = int(in_hospital_death.sum())

  labels: dict[str, dict[str, np.ndarray]] = {}
  if adm is not None:
    _admission_events(rng, ev, voc, adm, cond, cond_code, ckd_level, dm_control, male, on_med, med_code_ids, statin, warfarin, n_cond, cr_base, stats)
    labels = _label_rows(adm, max_admissions)
  stats["outpatient_visits"] = nv

  ev_subject, ev_minutes, ev_code, ev_value = ev.build()
  splits = rng.choice(len(SPLIT_NAMES), size=n, p=[0.8, 0.1, 0.1])
  return _Chunk(
    subject_ids=first_index + np.arange(n, dtype=np.int64),
    splits=splits,
    ev_subject=ev_subject,
    ev_minutes=ev_minutes,
    ev_code=ev_code,
    ev_value=ev_value,
    labels=labels,
    stats=stats,
  )


def _inside_stay(adm: dict[str, np.ndarray] | None, subj: np.ndarray, day: np.ndarray) -> np.ndarray:
  """Whether each (subject, day) falls inside one of the subject's hospital stays."""
  if adm is None or len(subj) == 0:
    return np.zeros(len(subj), bool)
  key_adm = adm["subject"] * 1e6 + adm["t_a"]
  order = np.argsort(key_adm)
  pos = np.searchsorted(key_adm[order], subj * 1e6 + day, side="right") - 1
  at = order[np.maximum(pos, 0)]
  return (pos >= 0) & (adm["subject"][at] == subj) & (day < adm["t_d"][at])


def _background_dx(rng, ev: _Events, voc: _Vocabulary, subj_rows, day_rows, rate, cond, order: int) -> None:
  """Zipf-distributed diagnoses whose chapter mix follows the subject's conditions."""
  counts = rng.poisson(rate)
  s = np.repeat(subj_rows, counts)
  d = np.repeat(day_rows, counts)
  if len(s) == 0:
    return
  letters = voc.pool_letters
  affinity = np.zeros((len(_CONDITIONS), len(letters)))
  for name, boosts in _CHAPTER_AFFINITY.items():
    for letter, b in boosts.items():
      affinity[_COND_INDEX[name], letters.index(letter)] = b
  base = np.log([w for *_, w in _CHAPTER_POOLS])
  pool = _categorical(rng, _softmax(base + cond[s].astype(float) @ affinity))
  ev.add(s, d, voc.bg_dx_ids[_pool_search(voc, pool, rng.random(len(s)))], order=order)


def _pool_search(voc: _Vocabulary, pool: np.ndarray, u: np.ndarray) -> np.ndarray:
  """Zipf pick inside each row's pool, vectorised over rows.

  Each pool's cumulative weights run from ~0 to 1; shifting pool p's by p makes the
  concatenation globally increasing, so one searchsorted of (p + u) lands inside pool p.
  """
  offsets = voc.bg_dx_pool_offsets
  pool_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
  shifted = voc.bg_dx_cum + pool_of
  return np.clip(np.searchsorted(shifted, pool + u), offsets[pool], offsets[pool + 1] - 1)


def _admission_events(rng, ev, voc, adm, cond, cond_code, ckd_level, dm_control, male, on_med, med_code_ids, statin, warfarin, n_cond, cr_base, stats) -> None:
  """Writes every event of every admission; vectorised over admissions."""
  K = len(_CONDITIONS)
  s, t_a, t_d, los, reason = adm["subject"], adm["t_a"], adm["t_d"], adm["los"], adm["reason"]
  severity, icu, died, disposition = adm["severity"], adm["icu"], adm["died"], adm["disposition"]
  m = len(s)
  book = voc.book
  stats["admissions"] = m
  stats["icu_stays"] = int(icu.sum())

  # Admission, discharge, death.
  kind = np.where(adm["elective"], 2, np.where(rng.random(m) < 0.85, 0, 1))
  adm_ids = np.array([book.id(f"HOSPITAL_ADMISSION//{k}") for k in _ADMISSION_TYPES])
  ev.add(s, t_a, adm_ids[kind], order=0)
  dis_ids = np.array([book.id(f"HOSPITAL_DISCHARGE//{d}") for d in _DISPOSITIONS])
  ev.add(s, t_d, dis_ids[disposition], order=6)
  ev.add(s[died], t_d[died], book.id(DEATH_CODE), order=9)

  # ICU stay.
  unit_of_reason = np.array([_ICU_UNITS.index(r.unit) for r in _REASONS])
  unit = unit_of_reason[reason]
  icu_in = t_a + (1 + rng.random(m) * 11) * _HOUR
  icu_in = np.minimum(icu_in, t_a + 0.3 * los)
  icu_out = icu_in + (0.3 + 0.5 * rng.random(m)) * (t_d - icu_in)
  icu_out = np.where(died & (rng.random(m) < 0.7), t_d, icu_out)
  i = np.flatnonzero(icu)
  in_ids = np.array([book.id(f"ICU_ADMISSION//{u}") for u in _ICU_UNITS])
  out_ids = np.array([book.id(f"ICU_DISCHARGE//{u}") for u in _ICU_UNITS])
  ev.add(s[i], icu_in[i], in_ids[unit[i]], order=1)
  ev.add(s[i], icu_out[i], out_ids[unit[i]], order=5)

  def context(rows: np.ndarray, phase: np.ndarray, in_icu: np.ndarray, frac: np.ndarray | float) -> _Context:
    subj_rows = s[rows]
    # The acute kidney injury recovers over the stay in survivors and worsens before death.
    aki = adm["aki"][rows] * np.where(died[rows], 1.0 + 0.3 * frac, 1.0 - adm["recovery"][rows] * frac)
    return _Context(
      rng=rng, male=male[subj_rows].astype(float), age_dec=adm["age_dec"][rows], cond=cond[subj_rows].astype(float),
      ckd=ckd_level[subj_rows], dm_control=dm_control[subj_rows], reason=reason[rows], acute=severity[rows] * phase,
      phase=phase, icu=in_icu.astype(float), statin=statin[subj_rows].astype(float), warfarin=warfarin[subj_rows].astype(float),
      cr_shift=cr_base[subj_rows] + adm["renal"][rows] + aki,
    )

  def emit(key: str, rows: np.ndarray, day: np.ndarray, phase: np.ndarray, in_icu: np.ndarray, order: int, frac: np.ndarray | float = 0.0) -> None:
    if len(rows) == 0:
      return
    values = np.round(_measure(key, context(rows, phase, in_icu, frac)), _LABS[_LAB_INDEX[key]].decimals)
    ev.add(s[rows], day, voc.lab_ids[_LAB_INDEX[key]], values, order=order)

  # Admission labs: the standard panel, the reason's labs, condition-driven labs.
  draw_day = t_a + (0.5 + 1.5 * rng.random(m)) * _HOUR
  ones = np.ones(m)
  reason_labs = {key: np.zeros(len(_REASONS), bool) for key in _LAB_INDEX}
  for r, rs in enumerate(_REASONS):
    for key in rs.labs:
      reason_labs[key][r] = True
  c_of = lambda name: cond[s, _COND_INDEX[name]]  # noqa: E731
  blood_tests = [m.key for m in _LABS if m.code.startswith("LAB//") and m.key not in ("LDL", "TSH")]
  for key in blood_tests:
    p = np.where(reason_labs[key][reason], 0.9, 0.0)
    if key in _ADMISSION_PANEL:
      p = np.maximum(p, 0.95)
    if key == "BNP":
      p = np.maximum(p, 0.5 * c_of("hf"))
    if key in ("INR", "ALT", "BILIRUBIN", "ALBUMIN"):
      p = np.maximum(p, 0.7 * c_of("cirrhosis"))
    if key == "INR":
      p = np.maximum(p, 0.7 * warfarin[s])
    if key == "HBA1C":
      p = np.maximum(p, 0.3 * c_of("t2dm"))
    if key == "LACTATE":
      p = np.maximum(p, 0.8 * (severity > 1.0))
    rows = np.flatnonzero(rng.random(m) < p)
    emit(key, rows, draw_day[rows], ones[rows], np.zeros(len(rows), bool), order=2)

  # Daily labs while in hospital; values recover in survivors and worsen before death.
  n_days = np.minimum(np.floor(los - 0.35), 8).astype(np.int64).clip(0)  # draws end before discharge
  rows = np.repeat(np.arange(m), n_days)
  day_index = _ragged_arange(n_days) + 1
  day = t_a[rows] + day_index + (4 + 4 * rng.random(len(rows))) * _HOUR
  frac = (day - t_a[rows]) / los[rows]
  phase = np.where(died[rows], 1.0 + 0.6 * frac, np.maximum(1.0 - 0.8 * frac, 0.1))
  in_icu = icu[rows] & (day >= icu_in[rows]) & (day < icu_out[rows])
  for key in _DAILY_PANEL:
    keep = rng.random(len(rows)) < 0.85
    emit(key, rows[keep], day[keep], phase[keep], in_icu[keep], order=2, frac=frac[keep])

  # ICU vitals every 4 hours (at most 12 rounds).
  dur = np.where(icu, icu_out - icu_in, 0.0)
  n_rounds = np.where(icu & (dur > 0.5 * _HOUR), np.minimum(np.floor((dur - 0.5 * _HOUR) / (4 * _HOUR)) + 1, 12), 0).astype(np.int64)
  rows = np.repeat(np.arange(m), n_rounds)
  day = icu_in[rows] + (0.5 + 4.0 * _ragged_arange(n_rounds)) * _HOUR
  frac = np.clip((day - t_a[rows]) / los[rows], 0, 1)
  phase = np.where(died[rows], 1.0 + 0.6 * frac, np.maximum(1.0 - 0.8 * frac, 0.1))
  for key in _ICU_VITALS:
    emit(key, rows, day, phase, np.ones(len(rows), bool), order=3)
  # Ward vitals at admission.
  for key in ("HEART_RATE", "SBP", "RESP_RATE", "SPO2", "TEMPERATURE"):
    emit(key, np.arange(m), t_a + 0.25 * _HOUR, ones, np.zeros(m, bool), order=1)

  # Medications: home medications continued, the reason's treatment, common ward drugs.
  n_meds = on_med.shape[1]
  rows, meds = np.nonzero(on_med[s] & (rng.random((m, n_meds)) < 0.6))
  ev.add(s[rows], t_a[rows] + (2 + 4 * rng.random(len(rows))) * _HOUR, med_code_ids[meds], order=4)
  for r, rs in enumerate(_REASONS):
    for med, p in rs.meds:
      rows = np.flatnonzero((reason == r) & (rng.random(m) < p))
      ev.add(s[rows], t_a[rows] + (1 + 7 * rng.random(len(rows))) * _HOUR, voc.med_ids[med], order=4)
  pressor = np.flatnonzero(icu & (severity > 1.5) & (rng.random(m) < 0.7))
  ev.add(s[pressor], icu_in[pressor] + 0.5 * _HOUR, voc.med_ids["NOREPINEPHRINE"], order=4)
  common = np.array([voc.med_ids[x] for x in _COMMON_INPATIENT_MEDS])
  zipf = 1.0 / np.arange(1, len(common) + 1) ** 1.0
  counts = rng.poisson(1.0 + 0.5 * np.minimum(los, 10))
  rows = np.repeat(np.arange(m), counts)
  pick = np.searchsorted(np.cumsum(zipf) / zipf.sum(), rng.random(len(rows)))
  ev.add(s[rows], t_a[rows] + rng.random(len(rows)) * los[rows], common[np.minimum(pick, len(common) - 1)], order=4)

  # Procedures: the reason's, ventilation / lines in the ICU, dialysis, background Zipf pool.
  for r, rs in enumerate(_REASONS):
    for body, p, _ in rs.procedures:
      rows = np.flatnonzero((reason == r) & (rng.random(m) < p))
      ev.add(s[rows], t_a[rows] + (4 * _HOUR + 0.4 * los[rows] * rng.random(len(rows))), book.id(f"ICD10PCS//{body}"), order=4)
  respiratory = np.isin(reason, [_REASON_INDEX[x] for x in ("pneumonia", "sepsis", "copd_exacerbation")])
  vent = icu & (rng.random(m) < _sigmoid(-1.5 + 1.2 * severity + 1.5 * respiratory))
  vent_code = np.where(dur < 1.0, book.id("ICD10PCS//5A1935Z"), np.where(dur < 4.0, book.id("ICD10PCS//5A1945Z"), book.id("ICD10PCS//5A1955Z")))
  rows = np.flatnonzero(vent)
  ev.add(s[rows], icu_in[rows] + rng.random(len(rows)) * 2 * _HOUR, vent_code[rows], order=4)
  stats["ventilated_stays"] = int(len(rows))
  line = np.flatnonzero(icu & (severity > 0.5) & (rng.random(m) < 0.5))
  ev.add(s[line], icu_in[line] + rng.random(len(line)) * _HOUR, book.id("ICD10PCS//02HV33Z"), order=4)
  dial = np.flatnonzero(((ckd_level[s] == 3) & (rng.random(m) < 0.9)) | ((reason == _REASON_INDEX["acute_kidney_injury"]) & (severity > 1.0) & (rng.random(m) < 0.5)))
  ev.add(s[dial], t_a[dial] + (6 + 18 * rng.random(len(dial))) * _HOUR, book.id("ICD10PCS//5A1D70Z"), order=4)
  counts = rng.poisson(0.4 + 0.1 * np.minimum(los, 10))
  rows = np.repeat(np.arange(m), counts)
  pick = np.minimum(np.searchsorted(voc.bg_px_cum, rng.random(len(rows))), len(voc.bg_px_ids) - 1)
  ev.add(s[rows], t_a[rows] + rng.random(len(rows)) * los[rows], voc.bg_px_ids[pick], order=4)

  # Diagnoses coded at discharge: the reason, documented chronic conditions, background codes.
  rc = voc.reason_codes[reason]
  rw = voc.reason_weights[reason]
  primary = rc[np.arange(m), _categorical(rng, rw)]
  ev.add(s, t_d, primary, order=5)
  rows, ks = np.nonzero(cond[s] & (rng.random((m, K)) < 0.85))
  ev.add(s[rows], t_d[rows], cond_code[s[rows], ks], order=5)
  _background_dx(rng, ev, voc, s, t_d, 1.5 + 0.3 * n_cond[s] + 0.3 * np.maximum(severity, 0), cond, order=5)

  # Discharge medications for survivors; after a heart-failure exacerbation the loop diuretic
  # is the drawn decision that the readmission risk depends on.
  alive = ~died
  hf_exac = reason == _REASON_INDEX["hf_exacerbation"]
  loop_col = med_code_ids == voc.med_ids["FUROSEMIDE"]
  rows, meds = np.nonzero(on_med[s] & alive[:, None] & (rng.random((m, n_meds)) < 0.8) & ~(hf_exac[:, None] & loop_col[None, :]))
  ev.add(s[rows], t_d[rows], med_code_ids[meds], order=7)
  rows = np.flatnonzero(alive & adm["loop_at_discharge"])
  ev.add(s[rows], t_d[rows], voc.med_ids["FUROSEMIDE"], order=7)


def _minutes(day: np.ndarray) -> np.ndarray:
  """Generator days -> whole minutes, exactly as event times are rounded when written."""
  return np.round(day * 1440.0).astype(np.int64)


def _label_rows(adm: dict[str, np.ndarray], max_admissions: int) -> dict[str, dict[str, np.ndarray]]:
  """Label rows (local subject index, prediction minute, label, true probability) per task.

  Labels are computed from the rounded event times so that they agree exactly with what a
  reader of the MEDS files sees.
  """
  admit, discharge = _minutes(adm["t_a"]), _minutes(adm["t_d"])
  day1 = admit + 1440  # every stay lasts more than one day by construction
  out = {
    "in_hospital_mortality": dict(subject=adm["subject"], minute=day1, label=adm["died"], prob=adm["p_mort"]),
    "long_los": dict(subject=adm["subject"], minute=day1, label=(discharge - admit) > 7 * 1440, prob=adm["p_long"]),
  }
  # Readmission needs 30 days of follow-up inside the data and a discharge alive; the
  # admission cap would truncate a drawn readmission, so capped admissions are excluded.
  ok = ~adm["died"] & (adm["t_d"] + 30.0 <= _DATA_END) & (adm["index"] < max_admissions - 1)
  out["readmission_30d"] = dict(subject=adm["subject"][ok], minute=discharge[ok], label=adm["readmitted"][ok], prob=adm["p_readmit"][ok])
  return out


# ------------------------------------------------------------------------------ writing


def _to_us(minutes: np.ndarray) -> pa.Array:
  null = minutes == np.iinfo(np.int64).min
  us = np.where(null, 0, minutes * 60_000_000 + _EPOCH_2000_US)
  return pa.array(us, type=pa.timestamp("us"), mask=null)


def _write_chunk(chunk: _Chunk, index: int, root: Path, code_strings: pa.Array) -> dict[str, int]:
  written = {}
  split_of_row = chunk.splits[chunk.ev_subject]
  for si, split in enumerate(SPLIT_NAMES):
    rows = np.flatnonzero(split_of_row == si)
    if len(rows) == 0:
      continue
    values = chunk.ev_value[rows]
    table = pa.table(
      {
        "subject_id": pa.array(chunk.subject_ids[chunk.ev_subject[rows]], pa.int64()),
        "time": _to_us(chunk.ev_minutes[rows]),
        "code": code_strings.take(pa.array(chunk.ev_code[rows])),
        "numeric_value": pa.array(values, pa.float32(), mask=np.isnan(values)),
      }
    )
    path = root / "data" / split / f"{index}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=1 << 20)
    written[split] = len(rows)
  return written


def generate_cohort(
  num_subjects: int,
  seed: int,
  out_dir: str | os.PathLike[str],
  *,
  chunk_size: int = 5000,
  max_admissions: int = 30,
  overwrite: bool = False,
  progress: bool = True,
) -> dict[str, Any]:
  """Generates a synthetic MEDS cohort at `out_dir` and returns its summary.

  The cohort is a deterministic function of (num_subjects, seed, chunk_size): chunk i uses
  its own child seed, so the first chunks of a larger cohort equal those of a smaller one.
  Output is assembled in a sibling temporary directory and renamed into place at the end;
  an interrupted run leaves no half-written cohort at `out_dir`.

  Args:
    num_subjects: number of subjects (>= 1).
    seed: random seed.
    out_dir: MEDS root to create.
    chunk_size: subjects generated (and written as one shard per split) at a time.
    max_admissions: cap on admissions per subject (records of capped subjects end there).
    overwrite: replace an existing `out_dir` (otherwise it is an error).
    progress: show a tqdm bar with subjects/s.

  Returns:
    The summary dict also written to task_labels/summary.json.
  """
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
  out = Path(out_dir)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out}: already exists; choose another output directory, or replace it "
                          "(--overwrite on the command line, overwrite=True from Python)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
  start = time.perf_counter()
  try:
    summary = _generate_into(tmp, num_subjects, seed, chunk_size, max_admissions, progress)
    summary["generation_seconds"] = round(time.perf_counter() - start, 2)
    (tmp / "task_labels" / "summary.json").write_text(json.dumps(summary, indent=2))
    replace_dir(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return summary


def _finite_or_none(x: float) -> float | None:
  """JSON has no NaN: undefined figures (e.g. AUROC of a split without positives) become null."""
  return float(x) if np.isfinite(x) else None


def _generate_into(root: Path, num_subjects: int, seed: int, chunk_size: int, max_admissions: int, progress: bool) -> dict[str, Any]:
  voc = _build_vocabulary()
  code_strings = pa.array(voc.book.codes, pa.string())
  num_chunks = -(-num_subjects // chunk_size)
  children = np.random.SeedSequence(seed).spawn(num_chunks)
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=num_subjects, desc="synth MEDS", unit="subject")
  split_ids, split_names = [], []
  label_parts: dict[str, list[dict[str, np.ndarray]]] = {}
  stats: dict[str, int] = {}
  events_per_split = {s: 0 for s in SPLIT_NAMES}
  used_codes = np.zeros(len(voc.book), bool)
  for c in range(num_chunks):
    first = c * chunk_size
    n = min(chunk_size, num_subjects - first)
    chunk = _generate_chunk(np.random.default_rng(children[c]), 10_000_000 + first, n, voc, max_admissions)
    for split, count in _write_chunk(chunk, c, root, code_strings).items():
      events_per_split[split] += count
    used_codes[np.unique(chunk.ev_code)] = True
    split_ids.append(chunk.subject_ids)
    split_names.append(chunk.splits)
    for key, value in chunk.stats.items():
      stats[key] = stats.get(key, 0) + value
    for task, rows in chunk.labels.items():
      label_parts.setdefault(task, []).append(
        dict(
          subject_id=chunk.subject_ids[rows["subject"]], time=rows["minute"] * 60_000_000 + _EPOCH_2000_US, label=rows["label"],
          prob=rows["prob"], split=chunk.splits[rows["subject"]],
        )
      )
    if bar is not None:
      bar.update(n)
  if bar is not None:
    bar.close()

  meta = root / "metadata"
  meta.mkdir(parents=True, exist_ok=True)
  ids = np.concatenate(split_ids)
  names = np.array(SPLIT_NAMES)[np.concatenate(split_names)]
  pq.write_table(pa.table({"subject_id": pa.array(ids, pa.int64()), "split": pa.array(names.tolist(), pa.string())}), meta / "subject_splits.parquet")
  pq.write_table(
    pa.table(
      {
        "code": pa.array(voc.book.codes, pa.string()),
        "description": pa.array(voc.book.descriptions, pa.string()),
        "parent_codes": pa.array(voc.book.parents, pa.list_(pa.string())),
      }
    ),
    meta / "codes.parquet",
  )
  dataset = {
    "dataset_name": f"mlx_med_synthetic_{num_subjects}_seed{seed}",
    "dataset_version": GENERATOR_VERSION,
    "etl_name": GENERATOR_NAME,
    "etl_version": GENERATOR_VERSION,
    "meds_version": "0.4",
    "created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds"),
    "license": "CC0-1.0 (synthetic data, no real patients)",
  }
  (meta / "dataset.json").write_text(json.dumps(dataset, indent=2))

  tasks_summary = {}
  for task, parts in label_parts.items():
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((rows["time"], rows["subject_id"]))
    rows = {k: v[order] for k, v in rows.items()}
    task_dir = root / "task_labels" / task
    task_dir.mkdir(parents=True, exist_ok=True)
    pred_time = pa.array(rows["time"], pa.timestamp("us"))
    pq.write_table(
      pa.table({"subject_id": pa.array(rows["subject_id"], pa.int64()), "prediction_time": pred_time, "boolean_value": pa.array(rows["label"], pa.bool_())}),
      task_dir / "labels.parquet",
    )
    split_strings = np.array(SPLIT_NAMES)[rows["split"]]
    pq.write_table(
      pa.table(
        {
          "subject_id": pa.array(rows["subject_id"], pa.int64()),
          "prediction_time": pred_time,
          "split": pa.array(split_strings.tolist(), pa.string()),
          "true_probability": pa.array(rows["prob"], pa.float64()),
        }
      ),
      task_dir / "true_probability.parquet",
    )
    per_split = {}
    for si, split in enumerate(["all", *SPLIT_NAMES]):
      mask = np.ones(len(rows["label"]), bool) if split == "all" else rows["split"] == si - 1
      y, p = rows["label"][mask], rows["prob"][mask]
      per_split[split] = {
        "num_rows": int(mask.sum()),
        "prevalence": _finite_or_none(y.mean() if mask.any() else np.nan),
        "best_auroc": _finite_or_none(labels_lib.binary_auroc(p, y)),
        "mean_true_probability": _finite_or_none(p.mean() if mask.any() else np.nan),
      }
    tasks_summary[task] = per_split

  return {
    "generator": GENERATOR_NAME,
    "generator_version": GENERATOR_VERSION,
    "num_subjects": num_subjects,
    "seed": seed,
    "chunk_size": chunk_size,
    "num_events": int(sum(events_per_split.values())),
    "events_per_split": events_per_split,
    "subjects_per_split": {s: int((names == s).sum()) for s in SPLIT_NAMES},
    "num_codes_in_book": len(voc.book),
    "num_codes_used": int(used_codes.sum()),
    "stats": stats,
    "tasks": tasks_summary,
    "note": "best_auroc is the AUROC of the generator's true probability against the drawn labels: the ceiling for any model on these labels.",
  }
