"""MEDS reader: valid roots read back exactly; every kind of bad input gets a one-line error
that names the file, the column, the first bad row and a fix, and leaks no event content."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlx_med.ehr.meds import TIME_NULL, MEDSFormatError, MEDSReader

SECRET = "SECRET_DIAGNOSIS_TEXT"


def _good_rows(h):
  return [
    (1, None, "GENDER//F", None),
    (1, h.us(1950, 6, 1), "MEDS_BIRTH", None),
    (1, h.us(2010, 1, 1, 9), "LAB//GLUCOSE//mg/dL", 101.0),
    (1, h.us(2010, 1, 1, 9), "ICD10CM//E11.9", None),
    (1, h.us(2011, 3, 2), SECRET, None),
    (2, None, "GENDER//M", None),
    (2, h.us(1970, 1, 1), "MEDS_BIRTH", None),
    (2, h.us(2015, 5, 5), "HOSPITAL_ADMISSION//EMERGENCY", None),
  ]


def _assert_one_line(err: MEDSFormatError, *must_contain: str) -> str:
  msg = str(err)
  assert "\n" not in msg
  assert "fix:" in msg
  for part in must_contain:
    assert part in msg, (part, msg)
  assert SECRET not in msg  # never echo event contents
  return msg


def test_reads_a_valid_root_grouped_by_subject(make_meds_root, h):
  root = make_meds_root({"train/0": h.events_table(_good_rows(h))}, {1: "train", 2: "held_out"})
  reader = MEDSReader(root)
  subjects = {s.subject_id: s for s in reader.iter_subjects("train")}
  assert list(subjects) == [1]
  s = subjects[1]
  assert s.times[0] == TIME_NULL and s.codes[0] == "GENDER//F"
  assert list(s.codes[2:4]) == ["LAB//GLUCOSE//mg/dL", "ICD10CM//E11.9"]
  assert s.numeric_values[2] == pytest.approx(101.0) and np.isnan(s.numeric_values[3])
  assert [x.subject_id for x in reader.iter_subjects("held_out")] == [2]
  summary = reader.validate()
  assert summary.num_events == 8 and summary.num_subjects == 2 and summary.num_static_events == 2
  assert summary.num_births == 2 and summary.split_sizes == {"held_out": 1, "train": 1}


def test_missing_data_dir(tmp_path):
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(tmp_path / "nowhere")
  _assert_one_line(e.value, "nowhere/data", "data directory not found")


def test_missing_splits_file(make_meds_root, h):
  root = make_meds_root({"0": h.events_table(_good_rows(h))}, None)
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(root)
  _assert_one_line(e.value, "subject_splits.parquet", "not found", "subject_id", "split")


def test_missing_column(make_meds_root, h):
  table = h.events_table(_good_rows(h)).drop_columns(["code"])
  root = make_meds_root({"0": table}, {1: "train", 2: "train"})
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(root)
  _assert_one_line(e.value, "0.parquet", "column 'code' is missing")


def test_wrong_dtype(make_meds_root, h):
  table = h.events_table(_good_rows(h))
  table = table.set_column(1, "time", table.column("time").cast(pa.string()))
  root = make_meds_root({"0": table}, {1: "train", 2: "train"})
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(root)
  _assert_one_line(e.value, "0.parquet", "column 'time'", "timestamp[us]")


def test_null_code_names_row_and_subject(make_meds_root, h):
  rows = _good_rows(h)
  rows[6] = (2, h.us(1970, 1, 1), None, None)
  root = make_meds_root({"0": h.events_table(rows)}, {1: "train", 2: "train"})
  reader = MEDSReader(root)  # footers are fine; the null shows when data is read
  with pytest.raises(MEDSFormatError) as e:
    list(reader.iter_batches("train"))
  _assert_one_line(e.value, "0.parquet", "column 'code'", "row 6", "subject_id 2")


def test_unsorted_times_within_subject(make_meds_root, h):
  rows = _good_rows(h)
  rows[2], rows[4] = rows[4], rows[2]  # 2011 before 2010 within subject 1
  root = make_meds_root({"0": h.events_table(rows)}, {1: "train", 2: "train"})
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(root).validate()
  _assert_one_line(e.value, "0.parquet", "column 'time'", "subject_id 1", "row 3")


def test_static_event_after_timed_event_is_unsorted(make_meds_root, h):
  rows = _good_rows(h)
  rows.insert(3, (1, None, "RACE//X", None))
  root = make_meds_root({"0": h.events_table(rows)}, {1: "train", 2: "train"})
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(root).validate()
  _assert_one_line(e.value, "column 'time'", "row 3")


def test_subject_split_across_shards(make_meds_root, h):
  rows = _good_rows(h)
  root = make_meds_root({"a": h.events_table(rows[:3]), "b": h.events_table(rows[3:])}, {1: "train", 2: "train"})
  with pytest.raises(MEDSFormatError) as e:
    list(MEDSReader(root).iter_batches("train"))
  msg = _assert_one_line(e.value, "b.parquet", "a.parquet", "subject_id 1", "row 0", "one shard")
  assert msg.startswith(str(root / "data" / "b.parquet"))


def test_splits_file_problems(make_meds_root, h):
  root = make_meds_root({"0": h.events_table(_good_rows(h))}, {1: "train", 2: "train"})
  path = root / "metadata" / "subject_splits.parquet"
  pq.write_table(pa.table({"subject_id": pa.array([1, 2, 1], pa.int64()), "split": ["train", "train", "held_out"]}), path)
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(root)
  _assert_one_line(e.value, "subject_splits.parquet", "repeats subject_id 1", "row 2")
  pq.write_table(pa.table({"subject_id": pa.array([1, 2], pa.int64())}), path)
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(root)
  _assert_one_line(e.value, "subject_splits.parquet", "column 'split' is missing")


def test_not_parquet(make_meds_root, h):
  root = make_meds_root({"0": h.events_table(_good_rows(h))}, {1: "train", 2: "train"})
  (root / "data" / "junk.parquet").write_text("not parquet")
  with pytest.raises(MEDSFormatError) as e:
    MEDSReader(root)
  _assert_one_line(e.value, "junk.parquet", "not a readable parquet")


def test_interleaved_subjects_are_regrouped_keeping_their_order(make_meds_root, h):
  rows = _good_rows(h)
  interleaved = [rows[0], rows[5], rows[1], rows[6], rows[2], rows[3], rows[7], rows[4]]
  root = make_meds_root({"0": h.events_table(interleaved)}, {1: "train", 2: "train"})
  subjects = list(MEDSReader(root).iter_subjects("train"))
  assert [s.subject_id for s in subjects] == [1, 2]
  assert list(subjects[0].codes) == [r[2] for r in rows[:5]]


def test_nothing_dropped_silently(make_meds_root, h):
  """Subjects without a split, text values and extra columns are counted, not lost quietly."""
  rows = _good_rows(h) + [(3, h.us(2000), "X", None)]
  table = h.events_table(rows)
  table = table.append_column("text_value", pa.array(["note"] + [None] * (len(rows) - 1), pa.large_string()))
  table = table.append_column("hadm_id", pa.array(range(len(rows)), pa.int64()))
  root = make_meds_root({"0": table}, {1: "train", 2: "tuning"})
  reader = MEDSReader(root)
  summary = reader.validate()
  assert summary.subjects_without_split == 1
  assert summary.num_text_values == 1
  assert summary.extra_columns == ["hadm_id"]
  assert "dataset.json" in " ".join(summary.notes)
  assert [s.subject_id for s in reader.iter_subjects("train")] == [1]
  text = summary.format()
  assert "subjects_without_split=1" in text and SECRET not in text


def test_other_time_units_are_read_as_microseconds(make_meds_root, h):
  table = h.events_table(_good_rows(h))
  table = table.set_column(1, "time", table.column("time").cast(pa.timestamp("ms")))
  root = make_meds_root({"0": table}, {1: "train", 2: "train"})
  reader = MEDSReader(root)
  first = next(reader.iter_subjects("train"))
  assert first.times[1] == h.us(1950, 6, 1)
  assert any("timestamp[ms]" in n for n in reader.validate().notes)


def test_unknown_split_name(make_meds_root, h):
  root = make_meds_root({"0": h.events_table(_good_rows(h))}, {1: "train", 2: "train"})
  with pytest.raises(MEDSFormatError) as e:
    list(MEDSReader(root).iter_batches("validation"))
  _assert_one_line(e.value, "split 'validation'", "train")
