"""Synthetic cohort: valid MEDS by the `meds` package's own schemas, deterministic, atomic,
fast, with labels that agree with the events and carry real, learnable structure."""

from __future__ import annotations

import datetime as dt
import json
import re

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from mlx_med.ehr import synth
from mlx_med.ehr.labels import TASKS, binary_auroc, read_task_labels
from mlx_med.ehr.tokenizer import icd10cm_chapter

DAY_US = 86_400_000_000


def test_cohort_is_valid_meds(cohort_root):
  shards = sorted((cohort_root / "data").rglob("*.parquet"))
  assert {p.parent.name for p in shards} == {"train", "tuning", "held_out"}
  data_codes = set()
  for path in shards:
    table = pq.read_table(path)
    meds.DataSchema.validate(table)
    data_codes.update(table.column("code").unique().to_pylist())
  splits = pq.read_table(cohort_root / meds.subject_splits_filepath)
  meds.SubjectSplitSchema.validate(splits)
  assert set(splits.column("split").to_pylist()) == {meds.train_split, meds.tuning_split, meds.held_out_split}
  codes = pq.read_table(cohort_root / meds.code_metadata_filepath)
  meds.CodeMetadataSchema.validate(codes)
  assert data_codes <= set(codes.column("code").to_pylist())
  meds.DatasetMetadataSchema.validate(json.loads((cohort_root / meds.dataset_metadata_filepath).read_text()))
  for task in TASKS:
    labels = pq.read_table(cohort_root / "task_labels" / task / "labels.parquet")
    meds.LabelSchema.validate(labels)
    assert labels.num_rows > 0
  assert meds.birth_code in data_codes and meds.death_code in data_codes


def test_reader_validates_cohort(cohort_reader):
  summary = cohort_reader.validate()
  assert summary.num_subjects == 800 and summary.subjects_without_split == 0 and summary.split_subjects_without_data == 0
  assert summary.num_births == 800 and summary.num_static_events == 800


def test_codes_are_hierarchical_and_zipf_like(cohort_root):
  df = pl.concat([pl.read_parquet(p) for p in sorted((cohort_root / "data").rglob("*.parquet"))])
  counts = df["code"].value_counts().sort("count", descending=True)
  assert counts.height > 1500  # a few thousand codes at full scale; most show up in 800 subjects
  icd = [c for c in counts["code"].to_list() if c.startswith("ICD10CM//")]
  pattern = re.compile(r"^ICD10CM//[A-Z][0-9]{2}(\.[0-9A-Z]{1,4})?$")
  assert all(pattern.match(c) for c in icd)
  assert all(icd10cm_chapter(c.split("//")[1][:3]) is not None for c in icd)
  freq = counts["count"].to_numpy().astype(float)
  top = int(0.1 * len(freq))
  assert freq[:top].sum() / freq.sum() > 0.7  # heavy head, long tail
  ranks = np.arange(1, len(freq) + 1)
  slope = np.polyfit(np.log(ranks[10:]), np.log(freq[10:]), 1)[0]
  assert slope < -1.0
  assert {"HOSPITAL_ADMISSION//EMERGENCY", "HOSPITAL_DISCHARGE//HOME", "ICU_ADMISSION//MICU", "ICU_DISCHARGE//MICU"} <= set(counts["code"].to_list())


def _admissions(cohort_root) -> pl.DataFrame:
  """Admission and discharge rows paired in order per subject."""
  df = pl.concat([pl.read_parquet(p) for p in sorted((cohort_root / "data").rglob("*.parquet"))])
  adm = df.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//")).select("subject_id", t_a="time")
  dis = df.filter(pl.col("code").str.starts_with("HOSPITAL_DISCHARGE//")).select("subject_id", t_d="time", disposition="code")
  adm = adm.with_columns(k=pl.int_range(pl.len()).over("subject_id"))
  dis = dis.with_columns(k=pl.int_range(pl.len()).over("subject_id"))
  return adm.join(dis, on=["subject_id", "k"])


def test_labels_agree_with_events(cohort_root):
  stays = _admissions(cohort_root).with_columns(prediction_time=pl.col("t_a") + pl.duration(days=1))
  mort = pl.from_arrow(read_task_labels(cohort_root, "in_hospital_mortality")).join(stays, on=["subject_id", "prediction_time"])
  assert mort.height == stays.height
  assert (mort["boolean_value"] == (mort["disposition"] == "HOSPITAL_DISCHARGE//DIED")).all()
  los = pl.from_arrow(read_task_labels(cohort_root, "long_los")).join(stays, on=["subject_id", "prediction_time"])
  assert (los["boolean_value"] == ((los["t_d"] - los["t_a"]) > dt.timedelta(days=7))).all()
  nxt = stays.sort("subject_id", "t_a").with_columns(next_admission=pl.col("t_a").shift(-1).over("subject_id"))
  readmit = pl.from_arrow(read_task_labels(cohort_root, "readmission_30d")).join(nxt, left_on=["subject_id", "prediction_time"], right_on=["subject_id", "t_d"])
  assert readmit.height == pl.from_arrow(read_task_labels(cohort_root, "readmission_30d")).height
  within = (readmit["next_admission"] - readmit["prediction_time"]) <= dt.timedelta(days=30)
  assert (readmit["boolean_value"] == within.fill_null(False)).all()


def test_no_events_after_death_and_stays_are_closed(cohort_root):
  df = pl.concat([pl.read_parquet(p) for p in sorted((cohort_root / "data").rglob("*.parquet"))])
  deaths = df.filter(pl.col("code") == "MEDS_DEATH").group_by("subject_id").agg(death=pl.col("time").max(), n=pl.len())
  assert (deaths["n"] == 1).all()
  last = df.group_by("subject_id").agg(last=pl.col("time").max()).join(deaths, on="subject_id")
  assert last.height > 0 and (last["last"] == last["death"]).all()
  # Every admission has a later discharge before the next admission.
  stays = _admissions(cohort_root).sort("subject_id", "t_a")
  assert (stays["t_d"] > stays["t_a"] + dt.timedelta(days=1)).all()
  nxt = stays.with_columns(next_a=pl.col("t_a").shift(-1).over("subject_id")).drop_nulls("next_a")
  assert (nxt["next_a"] > nxt["t_d"]).all()


def test_true_probabilities_beat_chance_and_outcomes_follow_state(cohort_root):
  summary = json.loads((cohort_root / "task_labels" / "summary.json").read_text())
  for task in TASKS:
    table = read_task_labels(cohort_root, task, with_true_probability=True)
    y = table.column("boolean_value").to_numpy(zero_copy_only=False)
    p = table.column("true_probability").to_numpy()
    auroc = binary_auroc(p, y)
    assert auroc == pytest.approx(summary["tasks"][task]["all"]["best_auroc"])
    assert auroc > 0.65, (task, auroc)
    assert abs(p.mean() - y.mean()) < 0.05  # calibrated: the labels are draws from p
  # Model-free structure: in-hospital mortality rises with age and with chronic disease
  # (subjects with two or more of heart failure, CKD, COPD, cancer, cirrhosis, dementia).
  df = pl.concat([pl.read_parquet(p) for p in sorted((cohort_root / "data").rglob("*.parquet"))])
  births = df.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", birth="time")
  family = pl.col("code").str.extract(r"^ICD10CM//(I50\.[234]2|N18|J44\.9|C|K7[04]|F03|G30)", 1).str.slice(0, 3)
  burden = df.with_columns(family=family).filter(pl.col("family").is_not_null()).group_by("subject_id").agg(n=pl.col("family").n_unique())
  mort = (
    pl.from_arrow(read_task_labels(cohort_root, "in_hospital_mortality"))
    .join(births, on="subject_id")
    .join(burden, on="subject_id", how="left")
    .with_columns(age=(pl.col("prediction_time") - pl.col("birth")).dt.total_days() / 365.25, n=pl.col("n").fill_null(0))
  )
  rate = lambda expr: mort.filter(expr)["boolean_value"].mean()  # noqa: E731
  assert rate(pl.col("age") >= 75) > 2.0 * rate(pl.col("age") < 55)
  assert rate(pl.col("n") >= 2) > 1.3 * rate(pl.col("n") == 0)


def test_deterministic_and_atomic(tmp_path):
  a = synth.generate_cohort(60, seed=3, out_dir=tmp_path / "a", progress=False)
  b = synth.generate_cohort(60, seed=3, out_dir=tmp_path / "b", progress=False)
  c = synth.generate_cohort(60, seed=4, out_dir=tmp_path / "c", progress=False)
  ta, tb, tc = (pq.read_table(tmp_path / x / "data" / "train" / "0.parquet") for x in "abc")
  assert ta.equals(tb) and not ta.equals(tc)
  assert a["tasks"] == b["tasks"]
  with pytest.raises(FileExistsError, match="already exists"):
    synth.generate_cohort(10, seed=3, out_dir=tmp_path / "a", progress=False)
  synth.generate_cohort(10, seed=3, out_dir=tmp_path / "a", overwrite=True, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no partial or old directories left
  assert c["num_subjects"] == 60


def test_summary_matches_the_files_and_scales_by_chunks(cohort_root, tmp_path):
  """The summary's counts are the files' counts, and a bigger cohort only appends chunks.

  The 20k-subject timing (under a minute on 2 cores) lives in bench/ehr_synth_timing.py.
  """
  summary = json.loads((cohort_root / "task_labels" / "summary.json").read_text())
  df = pl.concat([pl.read_parquet(p).with_columns(split=pl.lit(p.parent.name))
                  for p in sorted((cohort_root / "data").rglob("*.parquet"))])
  assert summary["num_subjects"] == df["subject_id"].n_unique() == 800
  assert summary["num_events"] == df.height > 100 * summary["num_subjects"]  # >2M events at 20k subjects
  assert summary["num_codes_used"] == df["code"].n_unique()
  per_split = df.group_by("split").agg(events=pl.len(), subjects=pl.col("subject_id").n_unique())
  assert {r["split"]: r["events"] for r in per_split.iter_rows(named=True)} == summary["events_per_split"]
  assert {r["split"]: r["subjects"] for r in per_split.iter_rows(named=True)} == summary["subjects_per_split"]
  for task in TASKS:
    assert 0.65 < summary["tasks"][task]["all"]["best_auroc"] < 0.99, task
  # A larger cohort appends chunks: the first chunk of a 3-chunk cohort is the 1-chunk cohort.
  small = synth.generate_cohort(40, seed=5, out_dir=tmp_path / "small", chunk_size=40, progress=False)
  big = synth.generate_cohort(120, seed=5, out_dir=tmp_path / "big", chunk_size=40, progress=False)
  for split in ("train", "tuning", "held_out"):
    path = f"data/{split}/0.parquet"
    assert pq.read_table(tmp_path / "small" / path).equals(pq.read_table(tmp_path / "big" / path)), split
  assert big["num_events"] > 2 * small["num_events"]
