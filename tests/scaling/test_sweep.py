"""IsoFLOP sweep: the plan's FLOP and token counts, bad budgets, a resumed sweep, job emission."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from mlx_med import cli
from mlx_med.core import config as config_lib
from mlx_med.core import params as params_lib
from mlx_med.scaling import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "ehr", "isoflops.py") + ":smoke"
TINY = ["data.synth_subjects=300", "data.seq_len=32", "train.batch_size=8", "sweep.widths=(8, 16, 24)",
        "sweep.head_dim=8", "sweep.aspect_ratio=8.0", "sweep.budgets=(2e8, 6e8)", "sweep.min_steps=2",
        "train.ckpt_every=3", "train.log_every=5", "evaluation.tasks=()"]


def _config(*extra):
  return config_lib.get_config(CONFIG, TINY + list(extra))


def test_plan_counts_flops_tokens_and_params_by_hand():
  config = _config()
  runs = sweep_lib.plan(config, vocab_size=128)
  assert [(r.budget, r.model.d_model) for r in runs] == [(b, w) for b in (2e8, 6e8) for w in (8, 16, 24)]
  run = runs[4]  # budget 6e8, d_model 16: 2 layers (16 / aspect 8), 2 heads of 8, MLP 48 (8/3 x 16 -> 16s)
  m = run.model
  assert (m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim) == (2, 2, 2, 48)
  # Hand count, forward multiply-adds x 2, x 3 for training (see core/flops.py):
  # per layer q,k,v,o 4 x 2*16*16 = 2048; MLP 3 x 2*16*48 = 4608; attention 2 x 2 x 16 x (32+1)/2 = 1056
  # LM head 2*16*128 = 4096.
  forward = 2 * (2048 + 4608 + 1056) + 4096
  assert run.flops_per_token == 3 * forward
  assert run.steps == round(6e8 / (3 * forward) / (8 * 32))
  assert run.tokens == run.steps * 8 * 32
  # Parameter counts equal the initialised model's.
  all_params = params_lib.count_params(params_lib.abstract_params(m))
  assert (run.params, run.params_nonembed) == (all_params, all_params - 2 * 128 * 16)


def test_budget_too_small_for_a_model_is_one_clear_line():
  with pytest.raises(sweep_lib.SweepError, match=r"budget 1e\+06 FLOPs gives the d_model=8 model .* only 0 steps"):
    sweep_lib.plan(_config("sweep.budgets=(1e6,)"), vocab_size=128)
  with pytest.raises(sweep_lib.SweepError, match="at least 3"):
    sweep_lib.plan(_config("sweep.widths=(8, 16)"), vocab_size=128)
  with pytest.raises(sweep_lib.SweepError, match="not a multiple of sweep.head_dim"):
    sweep_lib.plan(_config("sweep.widths=(8, 12, 16)"), vocab_size=128)


class _Stop(Exception):
  pass


def test_sweep_resumes_skips_finished_runs_and_emits_jobs(tmp_path, caplog):
  workdir = str(tmp_path / "sweep")
  study = sweep_lib.Sweep(_config(), workdir, progress=False)
  runs = study.plan()
  # Interrupt the second run after its first checkpoint (step 3).
  def stop(trainer_, step):
    if trainer_.workdir == study.run_dir(runs[1]) and step == 4:
      raise _Stop
  with pytest.raises(_Stop):
    study.run(callbacks=[stop])
  assert study.result(runs[0]) is not None and study.result(runs[1]) is None
  rows = sweep_lib.read_runs(os.path.join(workdir, "runs.csv"))
  assert [r["status"] for r in rows] == ["done"] + ["pending"] * 5

  jobs = str(tmp_path / "jobs.txt")
  assert study.emit_jobs(jobs, CONFIG, ["train.lr=0.001"]) == 5
  with open(jobs) as f:
    lines = f.read().splitlines()
  assert len(lines) == 5 and all(f"--only {r.run_id}" in line for r, line in zip(runs[1:], lines))
  assert shlex.split(lines[0])[:4] == ["mlx-med", "scaling", "run", "--config"] and "--config.train.lr=0.001" in lines[0]

  caplog.set_level("INFO")
  rows = sweep_lib.Sweep(_config(), workdir, progress=False).run()
  assert "1 of 6 runs already finished" in caplog.text
  assert f"resumed from step 3 in {study.run_dir(runs[1])}" in caplog.text
  assert [r["status"] for r in rows] == ["done"] * 6
  for r in rows:
    assert r["val_loss"] > 0 and r["train_loss"] > 0 and r["tokens"] == r["steps"] * 8 * 32
    assert r["compute"] == pytest.approx(r["tokens"] * r["flops_per_token"])
  with open(os.path.join(study.run_dir(runs[1]), "result.json")) as f:
    assert json.load(f)["status"] == "done"
  assert sweep_lib.Sweep(_config(), workdir, progress=False).emit_jobs(jobs, CONFIG, []) == 0


def test_cli_plan_and_wrong_config(tmp_path, capsys):
  args = ["scaling", "run", "--config", CONFIG, "--workdir", str(tmp_path / "w"), "--plan"] + [f"--config.{o}" for o in TINY]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert out.count("\n") == 6 and "6N=" in out and "F/token=" in out
  pretrain = os.path.join(REPO, "configs", "ehr", "pretrain.py") + ":smoke"
  assert cli.main(["scaling", "run", "--config", pretrain, "--workdir", str(tmp_path / "w")]) == 2
  assert "takes an IsoFLOP sweep config" in capsys.readouterr().err
