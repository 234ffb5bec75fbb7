"""The synthetic outcomes reward models that read order, timing and values.

A logistic regression on bag-of-code counts (the subject's events up to prediction time, no
look-ahead) must stay well below the generator's true probability on held-out rows, while
still beating chance: the tasks are learnable, and the part counting cannot see is large.
The count features themselves are checked against a naive per-row count.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mlx_med.ehr import synth
from mlx_med.ehr.baseline import count_features, fit_count_logistic_regression, log1p_counts
from mlx_med.ehr.labels import TASKS, binary_auroc, read_task_labels
from mlx_med.ehr.meds import MEDSFormatError, MEDSReader

HEADROOM_SUBJECTS = 5000
MIN_GAP = 0.05  # oracle AUROC minus count-baseline AUROC, on held_out


@pytest.fixture(scope="module")
def headroom_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("headroom") / "meds"
  synth.generate_cohort(HEADROOM_SUBJECTS, seed=0, out_dir=root, progress=False)
  return root


def _held_out_aurocs(reader: MEDSReader, task: str) -> tuple[float, float, int]:
  """(oracle AUROC, count-LR AUROC, rows) on held_out; the LR is fit on train, C chosen on tuning."""
  table = read_task_labels(reader.root, task, with_true_probability=True)
  split = np.asarray(table.column("split").to_pylist())
  y = table.column("boolean_value").to_numpy(zero_copy_only=False)
  p = table.column("true_probability").to_numpy()
  train, tune, held = (np.flatnonzero(split == s) for s in ("train", "tuning", "held_out"))
  X_train, vocab = count_features(reader, table.take(train))
  X_tune, _ = count_features(reader, table.take(tune), vocab)
  X_held, _ = count_features(reader, table.take(held), vocab)
  model = fit_count_logistic_regression(X_train, y[train], X_tune, y[tune])
  count_auroc = binary_auroc(model.predict_proba(log1p_counts(X_held))[:, 1], y[held])
  return binary_auroc(p[held], y[held]), count_auroc, len(held)


def test_count_baseline_stays_below_the_oracle(headroom_root):
  reader = MEDSReader(headroom_root)
  results = {task: _held_out_aurocs(reader, task) for task in TASKS}
  report = ", ".join(f"{t}: oracle {o:.3f} counts {c:.3f} (n={n})" for t, (o, c, n) in results.items())
  for task, (oracle, counts, n) in results.items():
    assert n > 400, (task, report)
    assert oracle > 0.75, report  # the labels carry real signal
    assert counts > 0.6, report  # and counting codes finds some of it
  gaps = [oracle - counts for oracle, counts, _ in results.values()]
  assert sum(g >= MIN_GAP for g in gaps) >= 2, report


def _naive_counts(reader: MEDSReader, labels: pa.Table, vocab: dict[str, int]) -> np.ndarray:
  events = {s.subject_id: s for s in reader.iter_subjects()}
  out = np.zeros((labels.num_rows, len(vocab)))
  times = labels.column("prediction_time").cast(pa.int64()).to_pylist()
  for i, (sid, t) in enumerate(zip(labels.column("subject_id").to_pylist(), times)):
    subject = events[sid]
    for time, code in zip(subject.times.tolist(), subject.codes.tolist()):
      if time <= t and code in vocab:  # static events carry the minimum int64 time
        out[i, vocab[code]] += 1
  return out


def test_count_features_match_a_naive_count(make_meds_root, h):
  rows = [
    (1, None, "GENDER//F", None), (1, h.us(1980), "MEDS_BIRTH", None), (1, h.us(2020, 1, 1, 8), "LAB//A", 1.0),
    (1, h.us(2020, 1, 1, 8), "DX//X", None), (1, h.us(2020, 1, 2), "LAB//A", 2.0), (1, h.us(2020, 3, 1), "DX//Y", None),
    (2, None, "GENDER//M", None), (2, h.us(1990), "MEDS_BIRTH", None), (2, h.us(2021, 5, 5), "DX//X", None),
    (2, h.us(2021, 5, 5), "DX//X", None), (2, h.us(2021, 6, 1), "LAB//A", 3.0),
  ]
  root = make_meds_root({"0": h.events_table(rows)}, {1: "train", 2: "train"})
  reader = MEDSReader(root)
  ts = pa.timestamp("us")
  labels = pa.table({
    "subject_id": pa.array([2, 1, 1, 1], pa.int64()),
    # before any timed event, exactly at an event (included), between events, after all.
    "prediction_time": pa.array([h.us(2021, 5, 5), h.us(1970, 1, 2), h.us(2020, 1, 1, 8), h.us(2030)], ts),
  })
  X, vocab = count_features(reader, labels)
  assert X.shape == (4, len(vocab)) and list(vocab) == sorted(vocab)
  np.testing.assert_array_equal(X.toarray(), _naive_counts(reader, labels, vocab))
  assert X[0, vocab["DX//X"]] == 2 and X[0, vocab["LAB//A"]] == 0  # ties at prediction_time count, later events do not
  assert X[1].sum() == 1  # only the static sex event precedes 1970-01-02
  # A fixed vocabulary drops unknown codes and keeps its own column order.
  fixed = {"LAB//A": 0, "DX//Y": 1}
  X2, vocab2 = count_features(root, labels, fixed)
  assert vocab2 == fixed
  np.testing.assert_array_equal(X2.toarray(), _naive_counts(reader, labels, fixed))
  with pytest.raises(MEDSFormatError, match="label subject"):
    count_features(reader, pa.table({"subject_id": pa.array([3], pa.int64()), "prediction_time": pa.array([h.us(2020)], ts)}))
  with pytest.raises(MEDSFormatError, match="prediction_time"):
    count_features(reader, pa.table({"subject_id": pa.array([1], pa.int64())}))
