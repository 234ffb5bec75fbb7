"""Task labels in the MEDS label schema, and the AUROC used to score them.

Labels live at ROOT/task_labels/<task>/labels.parquet (subject_id, prediction_time,
boolean_value). The synthetic generator also writes true_probability.parquet beside them,
the generator's own P(label) for each row, which is what bounds any model's AUROC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlx_med.ehr.meds import MEDSFormatError

TASKS = ("in_hospital_mortality", "long_los", "readmission_30d")
LABELS_DIR = "task_labels"


def binary_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve via the Mann-Whitney statistic, ties counted as one half.

  Returns NaN when only one class is present (AUROC is undefined there, and a silent 0.5
  would read as a real result).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, bool)
  n_pos = int(labels.sum())
  n_neg = len(labels) - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  # Average ranks (1-based) over runs of tied scores.
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(scores)]])
  avg_rank = (starts + ends + 1) / 2.0
  ranks = np.empty(len(scores))
  ranks[order] = np.repeat(avg_rank, ends - starts)
  rank_sum = ranks[labels].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def read_task_labels(root: str | Path, task: str, with_true_probability: bool = False) -> pa.Table:
  """Reads every parquet file of one task (optionally joined with the generator's truth).

  Returns a table with subject_id, prediction_time, boolean_value (and split,
  true_probability when requested), sorted by subject_id then prediction_time.
  """
  task_dir = Path(root) / LABELS_DIR / task
  files = sorted(p for p in task_dir.glob("*.parquet") if p.name != "true_probability.parquet")
  if not files:
    raise MEDSFormatError(f"{task_dir}: no label parquet files for task '{task}'; fix: write {LABELS_DIR}/{task}/labels.parquet (MEDS label schema)")
  table = pa.concat_tables([pq.read_table(f) for f in files])
  for column in ("subject_id", "prediction_time", "boolean_value"):
    if column not in table.column_names:
      raise MEDSFormatError(f"{files[0]}: column '{column}' is missing; fix: write labels with the MEDS label schema (subject_id, prediction_time, boolean_value)")
  table = table.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
  if with_true_probability:
    truth_path = task_dir / "true_probability.parquet"
    if not truth_path.is_file():
      raise MEDSFormatError(f"{truth_path}: file not found; fix: only synthetic cohorts (mlx-med ehr synth) carry true probabilities")
    truth = pq.read_table(truth_path).sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    same = truth.num_rows == table.num_rows and truth.column("subject_id").equals(table.column("subject_id")) and truth.column("prediction_time").equals(table.column("prediction_time"))
    if not same:
      raise MEDSFormatError(f"{truth_path}: rows do not match {files[0]} (subject_id, prediction_time); fix: regenerate the cohort")
    table = table.append_column("split", truth.column("split")).append_column("true_probability", truth.column("true_probability"))
  return table
