"""Clinical-utility evaluators on a tiny decoder trained through the real trainer.

One run (configs/ehr/pretrain.py:smoke on a small synthetic cohort, 400 steps) is
shared by the module. The AUROC bar for zero-shot and probe mortality is 0.6 on all held-out
mortality rows: the generator's oracle AUROC there is ~0.85-0.9 and the trained model lands
well above 0.6, while a model that had learnt nothing scores 0.5 +- ~0.08 (one standard error
with ~25 positives among ~350 rows), so 0.6 separates "learnt the outcome" from chance without
depending on a lucky seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mlx_med.ehr import evaluate
from mlx_med.ehr import labels as labels_lib
from mlx_med.ehr.dataset import tokenize_split
from mlx_med.ehr.meds import MEDSReader

AUROC_BAR = 0.6
TRAJECTORIES = 8
# Of the 128-token context: 64 tokens of history + 64 generated (evaluate_run's default split).
# Measured on this cohort (zero-shot mortality AUROC, held_out, 334 rows): 150 steps 0.545 with
# 96 generated / 0.555 with 64; 400 steps 0.558 with 96 / 0.653 [0.533, 0.756] with 64. More
# history helps more than longer continuations once unresolved futures are censored.
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
  from configs.ehr.pretrain import get_config
  from mlx_med.ehr import pretrain

  workdir = tmp_path_factory.mktemp("eval_run") / "run"
  config = get_config("smoke")
  config.data.synth_subjects = 2500
  config.train.steps = 400
  config.train.eval_every = 0
  config.train.ckpt_every = 0
  pretrain.run(config, str(workdir), progress=False)
  return workdir


@pytest.fixture(scope="module")
def mortality_eval(trained_run) -> dict:
  return evaluate.evaluate_run(trained_run, tasks=("mortality",), num_trajectories=TRAJECTORIES, max_new_tokens=NEW_TOKENS,
                               bootstrap=200, seed=0)


def test_probe_and_baseline_beat_chance_on_mortality(mortality_eval):
  entry = mortality_eval["tasks"]["mortality"]
  assert entry["n"] >= 200 and entry["oracle_auroc"] > 0.75
  assert entry["probe"]["auroc"] >= AUROC_BAR, entry["probe"]
  assert entry["baseline"]["auroc"] >= AUROC_BAR, entry["baseline"]


def test_zero_shot_beats_chance_on_mortality(mortality_eval):
  entry = mortality_eval["tasks"]["mortality"]
  assert entry["zero_shot"]["auroc"] >= AUROC_BAR, entry["zero_shot"]


def test_eval_json_structure(trained_run, mortality_eval):
  on_disk = json.loads((trained_run / evaluate.EVAL_FILE).read_text())
  assert on_disk == json.loads(json.dumps(mortality_eval))
  entry = on_disk["tasks"]["mortality"]
  assert 0 < entry["prevalence"] < 1
  for name in evaluate.EVALUATORS:
    r = entry[name]
    assert r["n"] == entry["n"]
    for metric in ("auroc", "auprc"):
      lo, hi = r[f"{metric}_ci"]
      assert 0 <= lo <= r[metric] <= hi <= 1, (name, metric, r)
  assert 0 <= entry["zero_shot"]["undecided"] <= 1
  s = on_disk["settings"]
  assert s["num_trajectories"] == TRAJECTORIES and s["max_new_tokens"] == NEW_TOKENS and s["context_tokens"] == 128 - NEW_TOKENS


def test_average_precision_matches_sklearn():
  from sklearn.metrics import average_precision_score

  rng = np.random.default_rng(0)
  for trial in range(20):
    n = int(rng.integers(5, 200))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    if not y.any():
      y[0] = True
    scores = np.round(rng.random(n) + 0.5 * y, 1 if trial % 2 else 6)  # coarse rounding makes many ties
    assert abs(evaluate.average_precision(scores, y) - average_precision_score(y, scores)) < 1e-12


def test_bootstrap_is_deterministic_and_brackets_the_estimate():
  rng = np.random.default_rng(1)
  y = rng.random(300) < 0.2
  scores = rng.random(300) + 0.5 * y  # overlapping classes: AUROC ~0.875
  a = evaluate.bootstrap_metrics(scores, y, resamples=300, seed=3)
  assert a == evaluate.bootstrap_metrics(scores, y, resamples=300, seed=3)
  assert a["auroc_ci"][0] < a["auroc"] < a["auroc_ci"][1] and a["auroc_ci"][1] - a["auroc_ci"][0] < 0.2
  assert a["auroc"] == pytest.approx(labels_lib.binary_auroc(scores, y))


def test_outcome_rules(trained_run):
  run = evaluate.load_run(trained_run)
  tok = run.tokenizer
  ids = {t: i for i, t in enumerate(tok.tokens)}
  gap = lambda label: ids[f"[GAP {label}]"]  # noqa: E731
  mort = evaluate.outcome_tokens(evaluate.OUTCOMES["in_hospital_mortality"], tok)
  lab = next(i for i, t in enumerate(tok.tokens) if t.startswith("LAB//"))
  assert mort.resolve([gap("1d"), lab, ids["HOSPITAL_DISCHARGE//DIED"]], 0.0) == (True, True)
  assert mort.resolve([gap("1d"), lab, ids["MEDS_DEATH"]], 0.0) == (True, True)
  assert mort.resolve([lab, ids["HOSPITAL_DISCHARGE//HOME"], ids["MEDS_DEATH"]], 0.0) == (False, True)
  assert mort.resolve([lab, gap("1d"), lab], 0.0) == (False, False)  # ran out of tokens: undecided
  assert ids["HOSPITAL_DISCHARGE//HOME"] in mort.hard_stops() and ids["MEDS_DEATH"] in mort.hard_stops()
  readmit = evaluate.outcome_tokens(evaluate.OUTCOMES["readmission_30d"], tok)
  admit = ids["HOSPITAL_ADMISSION//EMERGENCY"]
  assert readmit.resolve([gap("1w"), admit], 0.0) == (True, True)  # ~14.6 days
  assert readmit.resolve([gap("1w"), gap("1w"), gap("1d"), admit], 0.0) == (False, True)  # ~31 days: past 30
  assert readmit.resolve([gap("1mo")], 0.0) == (False, True) and gap("1mo") in readmit.hard_stops()
  los = evaluate.outcome_tokens(evaluate.OUTCOMES["long_los"], tok)
  day = 86400.0
  assert los.resolve([gap("3d"), ids["HOSPITAL_DISCHARGE//HOME"]], 1 * day) == (False, True)  # ~1 + 5.2 days
  assert los.resolve([gap("3d"), lab, gap("1d")], 1 * day) == (True, True)  # ~1 + 5.2 + 1.7 days > 7
  icu = evaluate.outcome_tokens(evaluate.OUTCOMES["icu_mortality"], tok)
  icu_out = next(i for i, t in enumerate(tok.tokens) if t.startswith("ICU_DISCHARGE//"))
  assert icu.resolve([lab, icu_out, lab, ids["MEDS_DEATH"]], 0.0) == (True, True)  # same minute as the ICU discharge
  assert icu.resolve([lab, icu_out, gap("1h"), ids["MEDS_DEATH"]], 0.0) == (False, True)  # after it
  assert icu_out not in icu.hard_stops()


def _truncated_root(src: Path, dst: Path, cut: dict[int, int]) -> None:
  """Copies a MEDS root, deleting every event after cut[subject] (microseconds) for the subjects in `cut`."""
  import shutil

  shutil.copytree(src, dst)
  subjects = pa.array(list(cut), pa.int64())
  limits = pa.array([cut[s] for s in cut], pa.int64())
  for shard in sorted((dst / "data").rglob("*.parquet")):
    table = pq.read_table(shard)
    pos = pc.index_in(table.column("subject_id"), value_set=subjects)
    limit = pc.take(limits, pos)
    t = pc.cast(table.column("time"), pa.int64())
    drop = pc.fill_null(pc.greater(t, limit), False)
    pq.write_table(table.filter(pc.invert(drop)), shard)


def test_no_look_ahead(trained_run, tmp_path):
  """Deleting everything after each label's prediction time changes no context, feature or score."""
  from mlx_med.ehr import baseline as baseline_lib

  run = evaluate.load_run(trained_run)
  table = labels_lib.read_task_labels(run.meds_root, "in_hospital_mortality")
  held = set(MEDSReader(run.meds_root).split_subject_ids("held_out").tolist())
  sids = table.column("subject_id").to_numpy()
  first = [i for i in range(len(sids)) if sids[i] in held and (i == 0 or sids[i - 1] != sids[i])][:24]
  rows = table.select(["subject_id", "prediction_time", "boolean_value"]).take(pa.array(first, pa.int64()))
  pred = pc.cast(rows.column("prediction_time"), pa.int64()).to_numpy()
  cut_root = tmp_path / "cut"
  _truncated_root(run.meds_root, cut_root, dict(zip(rows.column("subject_id").to_numpy().tolist(), pred.tolist())))

  outputs = []
  spec = evaluate.outcome_tokens(evaluate.OUTCOMES["in_hospital_mortality"], run.tokenizer)
  for root, cache in ((run.meds_root, tmp_path / "c1"), (cut_root, tmp_path / "c2")):
    reader = MEDSReader(root)
    stream, _ = tokenize_split(reader, run.tokenizer, "held_out", cache)
    full_tokens = sum(len(stream.subject(int(r))[0]) for r in stream.index_of(rows.column("subject_id").to_numpy()))
    inputs, lengths = evaluate.contexts_for(stream, rows, 32)
    risk, _ = evaluate.zero_shot_risk(run, inputs, lengths, np.zeros(len(lengths)), spec, num_trajectories=4, max_new_tokens=96, seed=5)
    probe_in, probe_len = evaluate.contexts_for(stream, rows, 128)
    hidden = evaluate.hidden_states(run, probe_in, probe_len)
    counts, _ = baseline_lib.count_features(reader, rows, {c: j for j, c in enumerate(run.tokenizer.code_counts)})
    outputs.append(dict(full_tokens=full_tokens, inputs=inputs, lengths=lengths, risk=risk, probe_in=probe_in, hidden=hidden,
                        counts=counts.toarray()))
  before, after = outputs
  assert after["full_tokens"] < before["full_tokens"]  # the cut really removed events
  for key in ("inputs", "lengths", "risk", "probe_in", "hidden", "counts"):
    np.testing.assert_array_equal(before[key], after[key], err_msg=key)


def _labels_dir(tmp_path: Path, stem: str, table: pa.Table) -> Path:
  d = tmp_path / "labels"
  d.mkdir(exist_ok=True)
  pq.write_table(table, d / f"{stem}.parquet")
  return d


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
  from mlx_med.ehr import cli

  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err.strip()
  return e.value.code, err


def test_labels_dir_evaluates_any_task(trained_run, tmp_path):
  """ACES-style: one MEDS label file per task, the task named by the file stem."""
  run = evaluate.load_run(trained_run)
  table = labels_lib.read_task_labels(run.meds_root, "long_los").select(["subject_id", "prediction_time", "boolean_value"])
  d = _labels_dir(tmp_path, "my_long_stay", table)
  out = evaluate.evaluate_run(trained_run, labels_dir=d, evaluators=("baseline", "zero_shot"), max_examples=60, bootstrap=50, write=False)
  entry = out["tasks"]["my_long_stay"]
  assert entry["oracle_auroc"] is None and entry["n"] == 60
  assert "skipped" in entry["zero_shot"] and entry["baseline"]["n"] == 60


@pytest.mark.parametrize("case", ["empty", "unknown_subject", "before_timeline", "after_timeline", "unknown_task", "no_checkpoint"])
def test_bad_input_is_one_line(trained_run, tmp_path, capsys, case):
  run = evaluate.load_run(trained_run)
  table = labels_lib.read_task_labels(run.meds_root, "in_hospital_mortality").select(["subject_id", "prediction_time", "boolean_value"]).slice(0, 40)
  workdir = trained_run
  args = ["--tasks", "mortality"]
  ts = pc.cast(table.column("prediction_time"), pa.int64()).to_numpy()
  if case == "empty":
    args = ["--labels", str(_labels_dir(tmp_path, "mortality", table.slice(0, 0)))]
    expect = "no label rows"
  elif case == "unknown_subject":
    sid = table.column("subject_id").to_numpy().copy()
    sid[3] = 10**12
    args = ["--labels", str(_labels_dir(tmp_path, "mortality", table.set_column(0, "subject_id", pa.array(sid, pa.int64()))))]
    expect = "not in the MEDS data (first subject_id 1000000000000)"
  elif case in ("before_timeline", "after_timeline"):
    ts = ts.copy()
    ts[5] = 0 if case == "before_timeline" else 4_000_000_000_000_000  # 1970 / 2096
    bad = table.set_column(1, "prediction_time", pa.array(ts, pa.timestamp("us")))
    args = ["--labels", str(_labels_dir(tmp_path, "mortality", bad))]
    expect = "prediction_time outside the subject's timeline"
  elif case == "unknown_task":
    args = ["--tasks", "mortality,frailty"]
    expect = "unknown task 'frailty'"
  else:
    workdir = tmp_path / "empty_run"
    workdir.mkdir()
    (workdir / "config.json").write_text((trained_run / "config.json").read_text())
    (workdir / "vocab.json").write_text((trained_run / "vocab.json").read_text())
    args = ["--meds-root", str(run.meds_root)]
    expect = "no checkpoint"
  code, err = _run_cli(["ehr", "evaluate", "--workdir", str(workdir), "--quiet", *args], capsys)
  assert code == 2
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and expect in err, err
