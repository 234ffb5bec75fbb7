"""End-to-end runs of `mlx-med train` as separate processes.

* resume: a run killed with SIGKILL and restarted with the same command ends with
  bitwise the same parameters as an uninterrupted run;
* multi-process: two local processes joined by jax.distributed.initialize (CPU
  collectives) train a sharded model for several steps and agree.
"""

import os
import re
import signal
import subprocess
import sys

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlx_med.ehr.synth import generate_cohort

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "ehr", "pretrain.py") + ":smoke"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp("meds") / "cohort"
  generate_cohort(400, seed=3, out_dir=root, progress=False)
  return str(root)


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _train_cmd(workdir, cohort, *extra):
  return [sys.executable, "-m", "mlx_med.cli", "train", "--config", CONFIG, "--workdir", str(workdir),
          "--no-progress", f"--config.data.meds_root={cohort}", "--config.train.steps=10",
          "--config.train.ckpt_every=4", "--config.train.eval_every=0", "--config.train.log_every=1",
          "--config.train.batch_size=8", "--config.data.seq_len=64", *extra]


# The run that gets killed: the same training as `mlx-med train ...`, with a step callback
# that dies like a preempted VM would, after the last checkpoint is durable but with
# unsaved steps since.
_KILLED_RUN = """
import os, signal, sys
from mlx_med.core import config as config_lib
from mlx_med.core.config import split_config_args
from mlx_med.ehr import pretrain
overrides, rest = split_config_args(sys.argv[1:])
config_path, workdir, kill_at = rest

def kill(trainer, step):
  if step == int(kill_at):
    trainer.checkpointer.wait()
    os.kill(os.getpid(), signal.SIGKILL)

pretrain.run(config_lib.get_config(config_path, overrides), workdir, progress=False, callbacks=[kill])
"""


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return step, restored["state"]["params"]


def test_sigkill_and_restart_resumes_bitwise(tmp_path, cohort):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  # The uninterrupted run and the run that gets killed go side by side.
  uninterrupted = subprocess.Popen(_train_cmd(straight, cohort), env=_env(1), cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  cmd = _train_cmd(killed, cohort)
  overrides = [a for a in cmd if a.startswith("--config.")]
  # Checkpoint at 4 is durable; steps 5-6 are lost.
  first = subprocess.run([sys.executable, "-c", _KILLED_RUN, CONFIG, str(killed), "6", *overrides], env=_env(1),
                         cwd=REPO, capture_output=True, timeout=600)
  _, err = uninterrupted.communicate(timeout=600)
  assert uninterrupted.returncode == 0, err[-2000:]
  assert first.returncode == -signal.SIGKILL, first.stderr.decode()[-2000:]
  assert sorted(os.listdir(killed / "checkpoints")) == ["4"]
  second = subprocess.run(cmd, env=_env(1), cwd=REPO, capture_output=True, timeout=600, text=True)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resumed from step 4" in second.stderr

  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(killed)
  assert step_a == step_b == 10
  chex.assert_trees_all_equal(params_a, params_b)
  # The metrics log is rewound to the checkpoint, so each step appears once.
  steps = [int(line.split('"step": ')[1].split(",")[0].rstrip("}"))
           for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)) == list(range(1, 11))


def test_two_processes_train_sharded_and_agree(tmp_path, cohort):
  import portpicker

  port = portpicker.pick_unused_port()
  workdir = tmp_path / "two"
  procs = []
  for pid in range(2):
    cmd = _train_cmd(workdir, cohort, "--config.train.steps=4", "--config.mesh.shape.data=2",
                     "--config.mesh.shape.fsdp=2", "--config.train.ckpt_every=2",
                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid))
    procs.append(subprocess.Popen(cmd, env=_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  finals = [re.search(r"\[process (\d)\] final step (\d+) loss (\S+) params_checksum (\S+)", o) for o in outs]
  assert all(finals), outs
  assert {m.group(1) for m in finals} == {"0", "1"}
  assert all(m.group(2) == "4" for m in finals)
  assert finals[0].group(3) == finals[1].group(3)  # identical loss on both hosts
  assert finals[0].group(4) == finals[1].group(4)  # identical parameters
  assert np.isfinite(float(finals[0].group(3)))
