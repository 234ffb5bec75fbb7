"""Bag-of-codes baseline: what counting a subject's codes, with no order or timing, can predict.

A label row (subject_id, prediction_time) becomes a sparse vector: for every code, how many
of the subject's events carry it at or before prediction_time (static, time-less events
always count). Nothing after prediction_time is read, so the features have no look-ahead.
A logistic regression on these counts is the usual "count baseline" of EHR studies; the
gap between it and a sequence model (or the synthetic generator's true probability) is the
part of the signal that lives in order, timing and values rather than in which codes occur.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from mlx_med.ehr.meds import MEDSFormatError, MEDSReader


def _prediction_times_us(labels: pa.Table) -> np.ndarray:
  col = labels.column("prediction_time")
  if not pa.types.is_timestamp(col.type):
    raise MEDSFormatError(f"labels: column 'prediction_time' has type {col.type}, not a timestamp; fix: write prediction_time as timestamp[us]")
  if col.null_count:
    raise MEDSFormatError("labels: column 'prediction_time' has nulls; fix: every label row needs a prediction_time")
  unit = col.type.unit
  raw = pc.cast(col, pa.int64()).to_numpy().astype(np.int64)
  return {"s": raw * 1_000_000, "ms": raw * 1_000, "us": raw, "ns": raw // 1_000}[unit]


def count_features(
  meds_root: str | os.PathLike[str] | MEDSReader,
  labels: pa.Table,
  vocab: Mapping[str, int] | None = None,
) -> tuple[sp.csr_matrix, dict[str, int]]:
  """Counts each label row's codes among the subject's events at or before prediction_time.

  Args:
    meds_root: MEDS root (or an open MEDSReader) holding the labels' subjects.
    labels: a table with subject_id (int) and prediction_time (timestamp) columns, e.g.
      `labels.read_task_labels(root, task)` filtered to one split. Row order is kept.
    vocab: code -> column. Codes outside it are ignored (so a vocabulary fitted on the
      training rows can be applied to held-out rows). None builds one from the codes that
      occur in the counted events, sorted.

  Returns:
    (X, vocab): X is a float32 CSR matrix [len(labels), len(vocab)] of event counts; row i
    belongs to labels row i.

  Raises:
    MEDSFormatError: a column is missing or mistyped, or a label's subject has no events.
  """
  for column in ("subject_id", "prediction_time"):
    if column not in labels.column_names:
      raise MEDSFormatError(f"labels: column '{column}' is missing; fix: pass a table with subject_id and prediction_time (MEDS label schema)")
  reader = meds_root if isinstance(meds_root, MEDSReader) else MEDSReader(meds_root)
  label_sid = labels.column("subject_id").to_numpy().astype(np.int64)
  label_t = _prediction_times_us(labels)
  n_rows = len(label_sid)

  # One pass over the shards holding the labels' subjects; per shard, each label row owns
  # the prefix of its subject's (time-sorted) events up to prediction_time.
  parts: list[tuple[np.ndarray, np.ndarray]] = []  # (label row, code string index into `tables`)
  tables: list[np.ndarray] = []
  found = np.zeros(n_rows, bool)
  wanted = np.unique(label_sid)
  shard_subjects = reader.shard_subjects()
  for shard in range(len(shard_subjects)):
    if not np.isin(shard_subjects[shard], wanted, assume_unique=True).any():
      continue
    batch = reader.read_shard(shard)
    pos = np.searchsorted(batch.subject_ids, label_sid)
    pos_c = np.minimum(pos, len(batch.subject_ids) - 1)
    rows = np.flatnonzero(batch.subject_ids[pos_c] == label_sid)
    if len(rows) == 0:
      continue
    found[rows] = True
    b = pos_c[rows]
    lo, hi = batch.offsets[b], batch.offsets[b + 1]
    counts = np.array([np.searchsorted(batch.time_us[l:h], t, side="right") for l, h, t in zip(lo, hi, label_t[rows])], np.int64)
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    event_rows = np.repeat(lo, counts) + (np.arange(total) - starts)
    parts.append((np.repeat(rows, counts), batch.code_index[event_rows]))
    tables.append(batch.code_table)
  if not found.all():
    missing = np.unique(label_sid[~found])
    raise MEDSFormatError(
      f"{reader.root}: {len(missing)} label subject(s) have no events (first subject_id {missing[0]}); "
      "fix: pass the MEDS root the labels were made from"
    )

  if vocab is None:
    used: set[str] = set()
    for (_, code_idx), table in zip(parts, tables):
      used.update(table[np.unique(code_idx)].tolist())
    vocab = {code: j for j, code in enumerate(sorted(used))}
  else:
    vocab = dict(vocab)
  row_parts, col_parts = [], []
  for (rows, code_idx), table in zip(parts, tables):
    column_of_code = np.array([vocab.get(c, -1) for c in table.tolist()], np.int64)
    cols = column_of_code[code_idx]
    keep = cols >= 0
    row_parts.append(rows[keep])
    col_parts.append(cols[keep])
  rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
  cols = np.concatenate(col_parts) if col_parts else np.zeros(0, np.int64)
  X = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_rows, len(vocab)), dtype=np.float32)
  X.sum_duplicates()
  return X, vocab


def fit_count_logistic_regression(
  X_train: sp.spmatrix,
  y_train: np.ndarray,
  X_tuning: sp.spmatrix,
  y_tuning: np.ndarray,
  *,
  Cs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0),
  max_iter: int = 2000,
):
  """L2 logistic regression on log1p(counts), its inverse regularisation C chosen on tuning AUROC.

  Returns the fitted sklearn model (refitting is not needed: each C is fitted on train only).
  Score new rows with `model.predict_proba(log1p_counts(X))[:, 1]`.
  """
  from sklearn.linear_model import LogisticRegression

  from mlx_med.ehr.labels import binary_auroc

  if len(np.unique(y_train)) < 2:
    raise ValueError("count baseline: the training labels hold one class only; fix: use more subjects or another task")
  best, best_auc = None, -np.inf
  Xt, Xv = log1p_counts(X_train), log1p_counts(X_tuning)
  for C in Cs:
    model = LogisticRegression(C=C, max_iter=max_iter)
    model.fit(Xt, np.asarray(y_train, bool))
    auc = binary_auroc(model.predict_proba(Xv)[:, 1], y_tuning)
    if best is None or (np.isfinite(auc) and auc > best_auc):
      best, best_auc = model, auc
  return best


def log1p_counts(X: sp.spmatrix) -> sp.csr_matrix:
  """log(1 + count), elementwise on the stored entries (zeros stay zeros)."""
  X = sp.csr_matrix(X, dtype=np.float32, copy=True)
  np.log1p(X.data, out=X.data)
  return X
