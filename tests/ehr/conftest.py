"""Shared fixtures for the EHR tests: one small synthetic cohort per session, and a builder
for hand-made (often deliberately broken) MEDS roots."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlx_med.ehr import synth
from mlx_med.ehr.tokenizer import TimelineTokenizer, TokenizerConfig
from mlx_med.ehr.meds import MEDSReader

COHORT_SUBJECTS = 800


@pytest.fixture(scope="session")
def cohort_root(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("cohort") / "meds"
  synth.generate_cohort(COHORT_SUBJECTS, seed=7, out_dir=root, chunk_size=300, progress=False)
  return root


@pytest.fixture(scope="session")
def cohort_reader(cohort_root) -> MEDSReader:
  return MEDSReader(cohort_root)


@pytest.fixture(scope="session")
def cohort_tokenizer(cohort_reader) -> TimelineTokenizer:
  return TimelineTokenizer(TokenizerConfig(min_count=5)).fit(cohort_reader)


def us(year: int, month: int = 1, day: int = 1, hour: int = 0, minute: int = 0) -> int:
  """Microseconds since the epoch for a naive UTC datetime."""
  return int(dt.datetime(year, month, day, hour, minute, tzinfo=dt.timezone.utc).timestamp() * 1_000_000)


def events_table(rows: list[tuple[int, int | None, str | None, float | None]]) -> pa.Table:
  """(subject_id, time_us or None, code or None, numeric_value or None) -> MEDS data table."""
  return pa.table(
    {
      "subject_id": pa.array([r[0] for r in rows], pa.int64()),
      "time": pa.array([r[1] for r in rows], pa.timestamp("us")),
      "code": pa.array([r[2] for r in rows], pa.string()),
      "numeric_value": pa.array([r[3] for r in rows], pa.float32()),
    }
  )


@pytest.fixture
def make_meds_root(tmp_path):
  """Writes a MEDS root from {shard_name: table} and {subject_id: split}; returns its path."""

  def make(shards: dict[str, pa.Table], splits: dict[int, str] | None, name: str = "root") -> Path:
    root = tmp_path / name
    for shard, table in shards.items():
      path = root / "data" / f"{shard}.parquet"
      path.parent.mkdir(parents=True, exist_ok=True)
      pq.write_table(table, path)
    if splits is not None:
      (root / "metadata").mkdir(parents=True, exist_ok=True)
      ids = np.array(list(splits), np.int64)
      pq.write_table(
        pa.table({"subject_id": pa.array(ids, pa.int64()), "split": pa.array(list(splits.values()), pa.string())}),
        root / "metadata" / "subject_splits.parquet",
      )
    return root

  return make


class _Helpers:
  us = staticmethod(us)
  events_table = staticmethod(events_table)


@pytest.fixture
def h() -> type[_Helpers]:
  """Small helpers (time in microseconds, event tables) for building test data."""
  return _Helpers
