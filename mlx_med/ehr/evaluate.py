"""Clinical utility of a pretrained timeline model: zero-shot, linear probe and count baseline.

`evaluate_run(workdir)` loads a finished `mlx-med train --config configs/ehr/pretrain.py` run
(config.json, vocab.json, the newest checkpoint), reads task labels in the MEDS label schema
(subject_id, prediction_time, boolean_value) and scores three evaluators on the held-out split,
each with AUROC and AUPRC and bootstrap 95% intervals, beside the oracle AUROC of the
generator's true probabilities when the labels come from the synthetic cohort. The result goes
to WORKDIR/eval.json.

What a model may see. A label row's context is the subject's tokens with time <= prediction_time
(the MEDS label convention, the one ACES uses: events AT the prediction time are known, so a
readmission row predicted at discharge sees its discharge events). [TIMELINE_END] is never
visible. Histories longer than the context keep their last tokens, with the static prefix
(sex, birth, age) in front (`dataset.build_task_examples`). The count baseline counts codes
under the same rule (`baseline.count_features`).

Evaluators:
  zero_shot  ETHOS's: continue the timeline K times with the sampler (batched, KV-cached,
             temperature 1) and take the share of trajectories in which the outcome happens.
  probe      the decoder's final hidden state at the last context token; an L2 logistic
             regression on standardised features fitted on the train split's label rows,
             its C chosen on tuning AUROC, scored on held_out (CLMBR/femr-style).
  baseline   logistic regression on log(1 + code counts) up to prediction_time
             (`mlx_med.ehr.baseline`), C chosen on tuning likewise.

Zero-shot outcome definitions (`OUTCOMES`; a task named by an alias or by the generator's name).
Time inside a sampled trajectory comes from its gap tokens: each [GAP x] counts as the geometric
middle of its bin (the top bin, which repeats once per year, as its lower edge); gaps under the
smallest bin have no token and count as zero. So generated time is an estimate, and horizons
are read on that estimate.
  mortality (in_hospital_mortality)  outcome: MEDS_DEATH or a HOSPITAL_DISCHARGE//DIED-like
             discharge (discharge codes containing DIED / EXPIRED / DEATH); ends: any other
             hospital discharge. No time horizon: the stay runs until one of them.
  readmission (readmission_30d)  outcome: any HOSPITAL_ADMISSION//* within 30 days of the
             prediction time (the discharge); ends: MEDS_DEATH.
  long_stay (long_los)  outcome: 7 days pass since the admission (the last HOSPITAL_ADMISSION
             at or before the prediction time, known exactly from the data) before a hospital
             discharge or MEDS_DEATH is generated.
  icu_mortality (the ACES task in configs/ehr/aces/)  outcome as for mortality; ends: an ICU
             or hospital discharge. An ICU discharge closes the window only when time moves on,
             so a death recorded at the same minute as the ICU discharge still counts.
Every trajectory also ends at [TIMELINE_END]. A trajectory that reaches the token limit
(`max_new_tokens`) undecided is censored: the risk is the share with the outcome among the
trajectories that resolved (a row with none resolved scores 1/2); eval.json reports the share
of undecided trajectories (`undecided`) so a too-short limit is visible. Task files under --labels whose
stem has no definition get probe and baseline only (zero_shot says why it was skipped).

Sampling stops on the device at outcome and end tokens and at any single gap token that alone
passes the horizon; the rest of the horizon rule (gaps adding up) is applied on the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlx_med.ehr import labels as labels_lib
from mlx_med.ehr.meds import (
  DEATH_CODE,
  HELD_OUT_SPLIT,
  TIME_NULL,
  TRAIN_SPLIT,
  TUNING_SPLIT,
  MEDSFormatError,
  MEDSReader,
)

log = logging.getLogger("mlx_med.ehr.evaluate")

EVALUATORS = ("zero_shot", "probe", "baseline")
DEFAULT_TASKS = ("mortality", "readmission", "long_stay")
TASK_ALIASES = {"mortality": "in_hospital_mortality", "readmission": "readmission_30d", "long_stay": "long_los"}
EVAL_FILE = "eval.json"
_DAY_S = 86400.0
_DIED_MARKERS = ("DIED", "EXPIRED", "DEATH")


@dataclasses.dataclass(frozen=True)
class OutcomeSpec:
  """How a sampled trajectory answers one task.

  kind: "event" (the outcome is an event before the window ends / the horizon passes) or
    "duration" (the outcome is the horizon passing before an end event).
  outcome / ends: code patterns; "X//" matches every code starting with it, else exact.
  died_discharge_is_outcome: hospital discharges whose code says DIED/EXPIRED/DEATH are
    outcomes (and not ends).
  hard_ends: end events stop the trajectory at once; otherwise the window closes at the next
    gap token after one (events at the same time still count).
  horizon_days: None, or the horizon from `origin` ("prediction" or "admission").
  """

  kind: str
  outcome: tuple[str, ...] = ()
  ends: tuple[str, ...] = ()
  died_discharge_is_outcome: bool = False
  hard_ends: bool = True
  horizon_days: float | None = None
  origin: str = "prediction"


OUTCOMES: dict[str, OutcomeSpec] = {
  "in_hospital_mortality": OutcomeSpec("event", outcome=(DEATH_CODE,), ends=("HOSPITAL_DISCHARGE//",), died_discharge_is_outcome=True),
  "readmission_30d": OutcomeSpec("event", outcome=("HOSPITAL_ADMISSION//",), ends=(DEATH_CODE,), horizon_days=30.0),
  "long_los": OutcomeSpec("duration", ends=("HOSPITAL_DISCHARGE//", DEATH_CODE), horizon_days=7.0, origin="admission"),
  "icu_mortality": OutcomeSpec("event", outcome=(DEATH_CODE,), ends=("ICU_DISCHARGE//", "HOSPITAL_DISCHARGE//"),
                               died_discharge_is_outcome=True, hard_ends=False),
}
_ADMISSION_PREFIX = "HOSPITAL_ADMISSION//"


# ----------------------------------------------------------------------------------- metrics


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """AUPRC as average precision: sum over thresholds of (recall step) x precision.

  Tied scores form one threshold (as sklearn's average_precision_score does). NaN when there
  is no positive.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, bool)
  n_pos = int(labels.sum())
  if n_pos == 0:
    return float("nan")
  order = np.argsort(-scores, kind="mergesort")
  s, y = scores[order], labels[order]
  last_of_tie = np.append(np.flatnonzero(np.diff(s)), len(s) - 1)
  tp = np.cumsum(y)[last_of_tie]
  predicted = last_of_tie + 1
  precision = tp / predicted
  recall_step = np.diff(np.concatenate([[0], tp])) / n_pos
  return float(np.sum(recall_step * precision))


def bootstrap_metrics(scores: np.ndarray, labels: np.ndarray, *, resamples: int = 500, seed: int = 0) -> dict[str, Any]:
  """AUROC and AUPRC with percentile bootstrap 95% intervals (resampling label rows).

  Resamples holding a single class are skipped; an interval from fewer than 20 usable
  resamples is reported as None.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, bool)
  out: dict[str, Any] = {"n": int(len(labels)), "auroc": _nan_to_none(labels_lib.binary_auroc(scores, labels)),
                         "auprc": _nan_to_none(average_precision(scores, labels))}
  rng = np.random.default_rng(seed)
  aurocs, auprcs = [], []
  for _ in range(resamples):
    idx = rng.integers(0, len(labels), len(labels))
    y = labels[idx]
    if y.all() or not y.any():
      continue
    aurocs.append(labels_lib.binary_auroc(scores[idx], y))
    auprcs.append(average_precision(scores[idx], y))
  for name, values in (("auroc_ci", aurocs), ("auprc_ci", auprcs)):
    out[name] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) >= 20 else None
  return out


def _nan_to_none(x: float) -> float | None:
  return None if x is None or not math.isfinite(x) else float(x)


# ----------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class LoadedRun:
  """A finished pretraining run, ready to evaluate."""

  workdir: Path
  config: Any
  tokenizer: Any
  model_cfg: Any
  params: Any
  step: int
  meds_root: Path
  cache_dir: Path


def load_run(workdir: str | os.PathLike[str], meds_root: str | os.PathLike[str] | None = None) -> LoadedRun:
  """config.json + vocab.json + the newest checkpoint's parameters (EMA ones when the run kept them)."""
  import ml_collections

  from mlx_med.core import checkpoint as checkpoint_lib
  from mlx_med.ehr import pretrain
  from mlx_med.ehr.tokenizer import TimelineTokenizer

  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise ValueError(f"{workdir}: no config.json, so this is not a training run directory; fix: pass the --workdir of a finished `mlx-med train --config configs/ehr/pretrain.py` run")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  if "data" not in config or "model" not in config:
    raise ValueError(f"{config_path}: not an EHR pretraining config (no data/model sections); fix: pass a run of configs/ehr/pretrain.py")
  default_root, vocab_path, cache_dir = pretrain.resolve_paths(config, str(workdir))
  root = Path(meds_root) if meds_root else Path(default_root)
  if not Path(vocab_path).is_file():
    raise ValueError(f"{vocab_path}: vocabulary not found; fix: pass the workdir of a run that finished its data preparation")
  tokenizer = TimelineTokenizer.load(vocab_path)
  ckpt_dir = workdir / "checkpoints"
  restored = checkpoint_lib.restore_latest_state(ckpt_dir)
  if restored is None:
    raise ValueError(f"{ckpt_dir}: no checkpoint; fix: train the run first (`mlx-med train --config configs/ehr/pretrain.py:smoke --workdir {workdir}`) or pass another --workdir")
  state, step = restored
  params = state.get("ema_params", state["params"])
  model_cfg = pretrain.model_config(config, tokenizer.vocab_size)
  return LoadedRun(workdir, config, tokenizer, model_cfg, params, int(step), root, Path(cache_dir))


# ----------------------------------------------------------------------------------- labels


def resolve_tasks(tasks: Sequence[str] | None, labels_dir: str | os.PathLike[str] | None, meds_root: Path) -> dict[str, tuple[str, list[Path], Path | None]]:
  """Task name -> (canonical name, label files, true-probability file or None).

  Without labels_dir the synthetic cohort's ROOT/task_labels/<task>/ is read; with it, every
  DIR/<stem>.parquet (or DIR/<stem>/*.parquet, ACES's sharded output) is a task.
  """
  out: dict[str, tuple[str, list[Path], Path | None]] = {}
  if labels_dir is None:
    base = meds_root / labels_lib.LABELS_DIR
    names = list(tasks) if tasks else list(DEFAULT_TASKS)
    for name in names:
      canonical = TASK_ALIASES.get(name, name)
      if canonical not in labels_lib.TASKS and not (base / canonical).is_dir():
        raise ValueError(f"unknown task '{name}'; fix: choose from {', '.join(DEFAULT_TASKS)} (or {', '.join(labels_lib.TASKS)}), or pass --labels DIR with one parquet file per task")
      task_dir = base / canonical
      files = sorted(p for p in task_dir.glob("*.parquet") if p.name != "true_probability.parquet")
      if not files:
        raise MEDSFormatError(f"{task_dir}: no label parquet files for task '{name}'; fix: pass --labels DIR (MEDS label files, one per task) or a --meds-root made by `mlx-med ehr synth`")
      truth = task_dir / "true_probability.parquet"
      out[name] = (canonical, files, truth if truth.is_file() else None)
    return out
  labels_dir = Path(labels_dir)
  if not labels_dir.is_dir():
    raise ValueError(f"--labels {labels_dir}: not a directory; fix: pass a folder of MEDS label parquet files, one per task (file stem = task name)")
  available: dict[str, list[Path]] = {p.stem: [p] for p in sorted(labels_dir.glob("*.parquet")) if p.is_file()}
  for d in sorted(p for p in labels_dir.iterdir() if p.is_dir()):
    files = sorted(d.glob("*.parquet"))
    if files and d.name not in available:
      available[d.name] = files
  if not available:
    raise MEDSFormatError(f"--labels {labels_dir}: no parquet files; fix: write one MEDS label file per task there (ACES writes <task>.parquet)")
  names = list(tasks) if tasks else sorted(available)
  for name in names:
    stem = name if name in available else TASK_ALIASES.get(name, name)
    if stem not in available:
      raise ValueError(f"unknown task '{name}': no {labels_dir}/{name}.parquet; fix: choose from {', '.join(sorted(available))}")
    out[name] = (stem, available[stem], None)
  return out


def read_labels(files: list[Path], truth: Path | None) -> pa.Table:
  """Label files of one task -> subject_id (int64), prediction_time (timestamp us), boolean_value (bool)[, true_probability]."""
  tables = []
  for f in files:
    t = pq.read_table(f)
    for column in ("subject_id", "prediction_time", "boolean_value"):
      if column not in t.column_names:
        raise MEDSFormatError(f"{f}: column '{column}' is missing; fix: write labels in the MEDS label schema (subject_id, prediction_time, boolean_value)")
    for column in ("subject_id", "prediction_time", "boolean_value"):
      if t.column(column).null_count:
        raise MEDSFormatError(f"{f}: column '{column}' has nulls; fix: drop label rows without a {column}")
    if not pa.types.is_timestamp(t.column("prediction_time").type):
      raise MEDSFormatError(f"{f}: column 'prediction_time' has type {t.column('prediction_time').type}, not a timestamp; fix: write it as timestamp[us]")
    tables.append(pa.table({
      "subject_id": pc.cast(t.column("subject_id"), pa.int64()),
      "prediction_time": pc.cast(t.column("prediction_time"), pa.timestamp("us")),
      "boolean_value": pc.cast(t.column("boolean_value"), pa.bool_()),
    }))
  table = pa.concat_tables(tables)
  if table.num_rows == 0:
    raise MEDSFormatError(f"{files[0]}: no label rows; fix: the task's label file is empty, regenerate it (e.g. rerun ACES) or drop the task")
  table = table.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
  if truth is not None:
    tt = pq.read_table(truth).sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    same = tt.num_rows == table.num_rows and tt.column("subject_id").equals(table.column("subject_id")) and \
        pc.cast(tt.column("prediction_time"), pa.timestamp("us")).equals(table.column("prediction_time"))
    if not same:
      raise MEDSFormatError(f"{truth}: rows do not match {files[0]} (subject_id, prediction_time); fix: regenerate the cohort")
    table = table.append_column("true_probability", pc.cast(tt.column("true_probability"), pa.float64()))
  return table


def _times_us(table: pa.Table) -> np.ndarray:
  return pc.cast(table.column("prediction_time"), pa.int64()).to_numpy().astype(np.int64)


def check_labels(table: pa.Table, streams: dict[str, Any], source: str) -> np.ndarray:
  """Every row's subject must have a timeline and its prediction time must lie inside it.

  Returns the split name of each row. The timeline spans the subject's first to last timed event.
  """
  sids = table.column("subject_id").to_numpy().astype(np.int64)
  pred = _times_us(table)
  split = np.full(len(sids), "", object)
  first = np.zeros(len(sids), np.int64)
  last = np.zeros(len(sids), np.int64)
  for name, stream in streams.items():
    rows = stream.index_of(sids)
    hit = np.flatnonzero(rows >= 0)
    split[hit] = name
    for i in hit.tolist():
      _, times = stream.subject(int(rows[i]))
      timed = times[(times != TIME_NULL) & (times != np.iinfo(np.int64).max)]
      first[i], last[i] = (timed[0], timed[-1]) if len(timed) else (np.iinfo(np.int64).max, np.iinfo(np.int64).min)
  unknown = np.flatnonzero(split == "")
  if len(unknown):
    raise MEDSFormatError(f"{source}: {len(unknown)} label row(s) name subjects that are not in the MEDS data (first subject_id {sids[unknown[0]]}); fix: pass the --meds-root the labels were made from")
  outside = np.flatnonzero((pred < first) | (pred > last))
  if len(outside):
    i = outside[0]
    raise MEDSFormatError(f"{source}: {len(outside)} label row(s) have a prediction_time outside the subject's timeline (first: subject_id {sids[i]}, row {i}); fix: predict between a subject's first and last event")
  return split


def _subsample(idx: np.ndarray, max_examples: int | None, seed: int, salt: str) -> np.ndarray:
  if max_examples is None or len(idx) <= max_examples:
    return idx
  h = int(hashlib.sha256(f"{seed}:{salt}".encode()).hexdigest()[:8], 16)
  return np.sort(np.random.default_rng(h).choice(idx, max_examples, replace=False))


# ----------------------------------------------------------------------------------- contexts


def contexts_for(stream: Any, table: pa.Table, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Each label row's visible tokens (time <= prediction_time), last `length` kept: (inputs [N, length], lengths [N])."""
  from mlx_med.ehr.dataset import build_task_examples

  ex = build_task_examples(stream, table, length, keep_prefix=True)
  if ex.skipped_rows:
    raise AssertionError("rows were assigned to this split's stream, so none may be skipped")
  if (ex.lengths == 0).any():
    raise MEDSFormatError("a label row has an empty history; fix: predict after the subject's first event")
  return ex.inputs, ex.lengths


def _admission_times(stream: Any, table: pa.Table, tokenizer: Any) -> np.ndarray:
  """Time (us) of the last hospital admission at or before each row's prediction time (prediction time if none)."""
  adm_ids = np.array([i for i, t in enumerate(tokenizer.tokens) if t.startswith(_ADMISSION_PREFIX)], np.int64)
  sids = table.column("subject_id").to_numpy().astype(np.int64)
  pred = _times_us(table)
  rows = stream.index_of(sids)
  out = pred.copy()
  for i, (r, t) in enumerate(zip(rows.tolist(), pred.tolist())):
    tokens, times = stream.subject(r)
    cut = int(np.searchsorted(times, np.int64(t), side="right"))
    hits = np.flatnonzero(np.isin(tokens[:cut], adm_ids))
    if len(hits):
      out[i] = times[hits[-1]]
  return out


# ----------------------------------------------------------------------------------- zero-shot


@dataclasses.dataclass
class OutcomeTokens:
  """An OutcomeSpec resolved against one vocabulary."""

  spec: OutcomeSpec
  outcome: frozenset[int]
  ends: frozenset[int]
  timeline_end: int
  gap_seconds: dict[int, float]  # gap token id -> seconds it stands for

  @property
  def horizon_s(self) -> float | None:
    return None if self.spec.horizon_days is None else self.spec.horizon_days * _DAY_S

  def hard_stops(self) -> tuple[int, ...]:
    stops = set(self.outcome) | {self.timeline_end}
    if self.spec.hard_ends or self.spec.kind == "duration":
      stops |= set(self.ends)
    if self.horizon_s is not None:
      stops |= {t for t, s in self.gap_seconds.items() if s > self.horizon_s}
    return tuple(sorted(stops))

  def resolve(self, tokens: Sequence[int], elapsed_s: float) -> tuple[bool, bool]:
    """One trajectory -> (outcome happened, decided). `elapsed_s`: horizon clock at the prediction time."""
    spec, horizon = self.spec, self.horizon_s
    clock = elapsed_s
    closing = False
    for tok in tokens:
      seconds = self.gap_seconds.get(tok)
      if seconds is not None:
        if closing:
          return False, True
        clock += seconds
        if horizon is not None and clock > horizon:
          return spec.kind == "duration", True
        continue
      if tok == self.timeline_end:
        return False, True
      if spec.kind == "event" and tok in self.outcome:
        return True, True
      if tok in self.ends:
        if spec.kind == "duration" or spec.hard_ends:
          return False, True
        closing = True
    return False, closing


def outcome_tokens(spec: OutcomeSpec, tokenizer: Any) -> OutcomeTokens:
  from mlx_med.ehr.tokenizer import TIMELINE_END

  def matches(patterns: tuple[str, ...]) -> set[int]:
    return {i for i, (tok, kind) in enumerate(zip(tokenizer.tokens, tokenizer.kinds)) if kind == "code" and
            any(tok.startswith(p) if p.endswith("//") else tok == p for p in patterns)}

  outcome = matches(spec.outcome)
  ends = matches(spec.ends)
  if spec.died_discharge_is_outcome:
    died = {i for i in matches(("HOSPITAL_DISCHARGE//",)) if any(m in tokenizer.tokens[i].upper() for m in _DIED_MARKERS)}
    outcome |= died
    ends -= died
  if spec.kind == "event" and not outcome:
    raise ValueError(f"the vocabulary has no token for the outcome {spec.outcome}; fix: check the code names in your MEDS data")
  ends -= outcome
  bins = [s for _, s in tokenizer.config.time_gap_bins]
  gap_ids = [i for i, k in enumerate(tokenizer.kinds) if k == "gap"]
  gap_seconds = {}
  for j, tok_id in enumerate(gap_ids):
    gap_seconds[tok_id] = bins[j] if j == len(bins) - 1 else math.sqrt(bins[j] * bins[j + 1])
  return OutcomeTokens(spec, frozenset(outcome), frozenset(ends), tokenizer.token_id(TIMELINE_END), gap_seconds)


def zero_shot_risk(run: LoadedRun, inputs: np.ndarray, lengths: np.ndarray, elapsed_s: np.ndarray, resolved: OutcomeTokens, *,
                   num_trajectories: int, max_new_tokens: int, seed: int = 0, batch_trajectories: int = 256,
                   sampler: Any = None) -> tuple[np.ndarray, float]:
  """Risk per row = share with the outcome among its K sampled futures that resolved (see below);
  also the share of futures left undecided at the token limit."""
  from mlx_med.core.sampler import Sampler, SamplingParams, bucket
  from mlx_med.ehr.tokenizer import PAD_ID

  k = int(num_trajectories)
  rows_per_call = max(1, batch_trajectories // k)
  if sampler is None:
    sampler = Sampler(run.model_cfg, pad_id=PAD_ID, min_prompt_bucket=int(inputs.shape[1]),
                      min_new_bucket=max_new_tokens, min_batch_bucket=bucket(rows_per_call * k, minimum=1))
  stops = resolved.hard_stops()
  risk = np.zeros(len(lengths))
  undecided = 0
  for lo in range(0, len(lengths), rows_per_call):
    rows = range(lo, min(lo + rows_per_call, len(lengths)))
    prompts, sampling = [], []
    for r in rows:
      prompt = inputs[r, : lengths[r]].tolist()
      for j in range(k):
        prompts.append(prompt)
        sampling.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=stops,
                                       seed=(seed * 1_000_003 + r * 1009 + j) % (2**32)))
    outputs = sampler.generate(run.params, prompts, sampling)
    for n, r in enumerate(rows):
      hits, decided_here = 0, 0
      for out in outputs[n * k:(n + 1) * k]:
        hit, decided = resolved.resolve(out.tokens, float(elapsed_s[r]))
        hits += hit
        decided_here += decided
      undecided += k - decided_here
      # Share with the outcome among the futures that resolved within the token limit (+1/2 over
      # +1: a row with none resolved scores 1/2, "unknown"). Counting an unresolved future as
      # "no outcome" instead ranks sicker patients (more events a day, so fewer simulated days)
      # as safer: measured on a smoke sweep model, AUROC 0.41 vs 0.60 (mortality), 0.48 vs 0.60
      # (long stay), 0.68 either way (readmission, which resolves early).
      risk[r] = (hits + 0.5) / (decided_here + 1.0)
  return risk, undecided / max(1, len(lengths) * k)


# ----------------------------------------------------------------------------------- probe


def hidden_states(run: LoadedRun, inputs: np.ndarray, lengths: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Final (normed) hidden state of the decoder at each row's last context token: [N, d_model] float32."""
  import jax
  import jax.numpy as jnp

  from mlx_med.core.transformer import Decoder

  model = Decoder(run.model_cfg)

  @jax.jit
  def last_hidden(params, tokens, last):
    _, hidden = model.apply({"params": params}, tokens, return_hidden=True)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)

  out = []
  for lo in range(0, len(lengths), batch_size):
    tok = inputs[lo:lo + batch_size]
    last = lengths[lo:lo + batch_size] - 1
    pad = batch_size - len(tok)
    if pad:
      tok = np.concatenate([tok, np.zeros((pad, tok.shape[1]), tok.dtype)])
      last = np.concatenate([last, np.zeros(pad, last.dtype)])
    out.append(np.asarray(last_hidden(run.params, jnp.asarray(tok), jnp.asarray(last, jnp.int32)))[: batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, run.model_cfg.d_model), np.float32)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_tuning: np.ndarray, y_tuning: np.ndarray,
              Cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)):
  """Standardise, then L2 logistic regression; C chosen on tuning AUROC. Returns a fitted sklearn pipeline."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  if len(np.unique(y_train)) < 2:
    raise ValueError("linear probe: the training label rows hold one class only; fix: use more subjects or another task")
  best, best_auc = None, -np.inf
  for C in Cs:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    model.fit(x_train, np.asarray(y_train, bool))
    auc = labels_lib.binary_auroc(model.predict_proba(x_tuning)[:, 1], y_tuning) if len(y_tuning) else np.nan
    if best is None or (np.isfinite(auc) and auc > best_auc):
      best, best_auc = model, auc
  return best


# ----------------------------------------------------------------------------------- driver


def _write_atomic(path: Path, data: dict) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
  os.replace(tmp, path)


def evaluate_run(workdir: str | os.PathLike[str], *, tasks: Sequence[str] | None = DEFAULT_TASKS,
                 labels_dir: str | os.PathLike[str] | None = None, meds_root: str | os.PathLike[str] | None = None,
                 evaluators: Sequence[str] = EVALUATORS, num_trajectories: int = 20, max_new_tokens: int | None = None,
                 max_examples: int | None = None, bootstrap: int = 500, seed: int = 0, write: bool = True,
                 progress: bool = False) -> dict[str, Any]:
  """Scores every task with every evaluator on the held-out split; writes WORKDIR/eval.json.

  Args:
    tasks: task names; None means every task there is (the synthetic three, or every file
      under labels_dir). With labels_dir given and tasks left at the synthetic default, the
      tasks are every file under labels_dir.
    max_new_tokens: zero-shot trajectory limit; default half the model's context (the other
      half holds the history).
    max_examples: cap on label rows per split (train, tuning, held_out), drawn at random with
      a fixed seed: keeps smoke studies fast.
  """
  from mlx_med.ehr import baseline as baseline_lib
  from mlx_med.ehr.dataset import tokenize_split

  start = time.perf_counter()
  evaluators = tuple(evaluators)
  bad = [e for e in evaluators if e not in EVALUATORS]
  if bad:
    raise ValueError(f"unknown evaluator(s) {bad}; fix: choose from {', '.join(EVALUATORS)}")
  if num_trajectories < 1:
    raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
  if labels_dir is not None and tasks is not None and tuple(tasks) == DEFAULT_TASKS:
    tasks = None
  run = load_run(workdir, meds_root)
  if not run.meds_root.is_dir():
    raise MEDSFormatError(f"{run.meds_root}: MEDS root not found; fix: pass --meds-root (the data the run was trained on)")
  resolved_tasks = resolve_tasks(tasks, labels_dir, run.meds_root)
  reader = MEDSReader(run.meds_root)
  seq_len = int(run.config.data.seq_len)
  new_tokens = int(max_new_tokens or seq_len // 2)
  if not 1 <= new_tokens < seq_len:
    raise ValueError(f"max_new_tokens must be in [1, {seq_len}) for a model of context {seq_len}, got {new_tokens}")
  ctx_len = seq_len - new_tokens
  streams = {}
  for split in (TRAIN_SPLIT, TUNING_SPLIT, HELD_OUT_SPLIT):
    if split in reader.split_names:
      streams[split], _ = tokenize_split(reader, run.tokenizer, split, run.cache_dir, progress=progress)
  if HELD_OUT_SPLIT not in streams:
    raise MEDSFormatError(f"{run.meds_root}: no '{HELD_OUT_SPLIT}' split; fix: assign subjects to held_out in metadata/subject_splits.parquet")
  sampler = None
  results: dict[str, Any] = {}
  for name, (canonical, files, truth) in resolved_tasks.items():
    t0 = time.perf_counter()
    table = read_labels(files, truth)
    split = check_labels(table, streams, str(files[0]))
    picks = {s: _subsample(np.flatnonzero(split == s), max_examples, seed, f"{canonical}:{s}") for s in streams}
    held = table.take(pa.array(picks[HELD_OUT_SPLIT], pa.int64()))
    y_held = held.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)
    entry: dict[str, Any] = {"n": int(len(y_held)), "prevalence": float(y_held.mean()) if len(y_held) else None,
                             "oracle_auroc": None, "label_files": [str(f) for f in files]}
    if "true_probability" in held.column_names:
      entry["oracle_auroc"] = _nan_to_none(labels_lib.binary_auroc(held.column("true_probability").to_numpy(), y_held))
    if len(y_held) == 0 or y_held.all() or not y_held.any():
      entry["error"] = "held_out rows hold one class only (or none): AUROC is undefined"
      results[name] = entry
      continue
    parts = {s: table.take(pa.array(picks[s], pa.int64())) for s in (TRAIN_SPLIT, TUNING_SPLIT) if s in streams}
    ys = {s: t.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool) for s, t in parts.items()}

    if "zero_shot" in evaluators:
      spec = OUTCOMES.get(canonical) or OUTCOMES.get(TASK_ALIASES.get(canonical, canonical))
      if spec is None:
        entry["zero_shot"] = {"skipped": f"no zero-shot outcome definition for task '{canonical}'; known: {', '.join(sorted(OUTCOMES))}"}
      else:
        resolved = outcome_tokens(spec, run.tokenizer)
        inputs, lengths = contexts_for(streams[HELD_OUT_SPLIT], held, ctx_len)
        elapsed = np.zeros(len(lengths))
        if spec.origin == "admission":
          elapsed = (_times_us(held) - _admission_times(streams[HELD_OUT_SPLIT], held, run.tokenizer)) / 1e6
        if sampler is None:
          from mlx_med.core.sampler import Sampler, bucket
          from mlx_med.ehr.tokenizer import PAD_ID

          rows_per_call = max(1, 256 // num_trajectories)
          sampler = Sampler(run.model_cfg, pad_id=PAD_ID, min_prompt_bucket=ctx_len, min_new_bucket=new_tokens,
                            min_batch_bucket=bucket(rows_per_call * num_trajectories, minimum=1))
        z0 = time.perf_counter()
        risk, undecided = zero_shot_risk(run, inputs, lengths, elapsed, resolved, num_trajectories=num_trajectories,
                                         max_new_tokens=new_tokens, seed=seed, sampler=sampler)
        entry["zero_shot"] = {**bootstrap_metrics(risk, y_held, resamples=bootstrap, seed=seed),
                              "undecided": round(undecided, 4), "seconds": round(time.perf_counter() - z0, 2)}

    if "probe" in evaluators:
      if TRAIN_SPLIT not in parts or TUNING_SPLIT not in parts:
        entry["probe"] = {"skipped": "needs train and tuning splits"}
      else:
        feats = {}
        for s, t in (*parts.items(), (HELD_OUT_SPLIT, held)):
          inputs, lengths = contexts_for(streams[s], t, seq_len)
          feats[s] = hidden_states(run, inputs, lengths)
        try:
          model = fit_probe(feats[TRAIN_SPLIT], ys[TRAIN_SPLIT], feats[TUNING_SPLIT], ys[TUNING_SPLIT])
          entry["probe"] = {**bootstrap_metrics(model.predict_proba(feats[HELD_OUT_SPLIT])[:, 1], y_held, resamples=bootstrap, seed=seed),
                            "train_rows": int(len(ys[TRAIN_SPLIT]))}
        except ValueError as e:
          entry["probe"] = {"skipped": str(e)}

    if "baseline" in evaluators:
      if TRAIN_SPLIT not in parts or TUNING_SPLIT not in parts:
        entry["baseline"] = {"skipped": "needs train and tuning splits"}
      else:
        x_train, vocab = baseline_lib.count_features(reader, parts[TRAIN_SPLIT])
        x_tune, _ = baseline_lib.count_features(reader, parts[TUNING_SPLIT], vocab)
        x_held, _ = baseline_lib.count_features(reader, held, vocab)
        try:
          model = baseline_lib.fit_count_logistic_regression(x_train, ys[TRAIN_SPLIT], x_tune, ys[TUNING_SPLIT])
          scores = model.predict_proba(baseline_lib.log1p_counts(x_held))[:, 1]
          entry["baseline"] = {**bootstrap_metrics(scores, y_held, resamples=bootstrap, seed=seed), "train_rows": int(len(ys[TRAIN_SPLIT]))}
        except ValueError as e:
          entry["baseline"] = {"skipped": str(e)}
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    results[name] = entry
    log.info("%s: %s", name, {k: (v.get("auroc") if isinstance(v, dict) else v) for k, v in entry.items() if k in EVALUATORS})

  out = {
    "tasks": results,
    "settings": {
      "workdir": str(run.workdir), "checkpoint_step": run.step, "meds_root": str(run.meds_root),
      "labels_dir": str(labels_dir) if labels_dir is not None else None, "evaluators": list(evaluators),
      "num_trajectories": int(num_trajectories), "max_new_tokens": new_tokens, "context_tokens": ctx_len,
      "probe_context_tokens": seq_len, "max_examples": max_examples, "bootstrap_resamples": int(bootstrap),
      "seed": int(seed), "scored_split": HELD_OUT_SPLIT, "visibility": "events with time <= prediction_time",
      "seconds": round(time.perf_counter() - start, 2),
    },
  }
  if write:
    _write_atomic(run.workdir / EVAL_FILE, out)
  return out
