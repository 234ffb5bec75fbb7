"""A run's life as a user sees it: refused early when it cannot fit, a workdir that belongs
to one config, Ctrl-C and SIGTERM that checkpoint and say where to resume, plain log
lines for batch jobs, TensorBoard that agrees with metrics.jsonl after a resume."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import jax
import ml_collections
import pytest

from mlx_med import cli
from mlx_med.core import config as config_lib
from mlx_med.core import memory, trainer
from mlx_med.core.lm_task import DecoderLMTask
from mlx_med.core.transformer import DecoderConfig
from mlx_med.ehr.synth import generate_cohort

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "ehr", "pretrain.py") + ":smoke"


def test_memory_refusal_is_one_line_and_comes_before_any_data_work(tmp_path, capsys):
  workdir = tmp_path / "run"
  rc = cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), "--config.data.seq_len=100000"])
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert len(err.splitlines()) == 1, err
  assert err.startswith(f"mlx-med: error: {CONFIG}: decoder LM"), err
  assert "GB per device" in err and "usable" in err and "model.remat=full" in err
  # Nothing was generated or claimed: the same workdir works with a size that fits.
  assert not workdir.exists() or os.listdir(workdir) == []


def test_memory_estimate_counts_params_and_optimizer_exactly():
  cfg = DecoderConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
  task = DecoderLMTask(cfg, seq_len=32)
  config = ml_collections.ConfigDict({"seed": 0, "train": config_lib.default_train_config(),
                                      "mesh": config_lib.default_mesh_config()})
  config.train.batch_size = 16
  config.mesh.shape.update({"data": 4, "fsdp": 2})
  est = trainer.check_memory(config, task)
  n = sum(x.size for x in jax.tree.leaves(trainer.params_lib.abstract_params(task)))
  assert n == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 2 * 128 * 64 + 64
  # fsdp=2 halves every matrix along "embed"; the 5 norm scales (64 each) stay replicated.
  # Adam keeps two moments of each parameter, sharded alike, plus a few scalar counters.
  norms = 5 * 64
  per_device = (n - norms) * 4 / 2 + norms * 4
  assert est.params == per_device
  assert 2 * per_device <= est.optimizer <= 2 * per_device + 64
  assert est.examples_per_device == 16 // 8
  assert est.activations == 2 * task.activation_bytes_per_example()
  remat = DecoderLMTask(DecoderConfig(**{**cfg.__dict__, "remat": "full"}), seq_len=32)
  assert remat.activation_bytes_per_example() < task.activation_bytes_per_example()
  with pytest.raises(memory.MemoryBudgetError, match="needs about"):
    memory.check_fits(memory.MemoryEstimate(1e15, 0.0, None, 1))


def ehr_config(**train) -> ml_collections.ConfigDict:
  config = config_lib.load_config_file(CONFIG)
  with config.unlocked():
    config.train.update(train)
  return config


def test_workdir_belongs_to_one_config(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.claim_workdir(ehr_config(), workdir)
  trainer.claim_workdir(ehr_config(), workdir)  # the same config: fine
  other = ehr_config()
  other.model.d_model = 32
  other.data.seq_len = 64
  with pytest.raises(trainer.ConfigMismatchError, match=r"data.seq_len \(128 -> 64\), model.d_model \(64 -> 32\)"):
    trainer.claim_workdir(other, workdir)
  with pytest.raises(trainer.ConfigMismatchError, match="--allow-config-change accepts"):
    trainer.claim_workdir(ehr_config(steps=90), workdir)
  trainer.claim_workdir(ehr_config(steps=90), workdir, allow_config_change=True)
  trainer.claim_workdir(ehr_config(steps=90), workdir)  # recorded: now the run's config
  with pytest.raises(trainer.ConfigMismatchError, match="new --workdir"):
    trainer.claim_workdir(ehr_config(lr=1.0), workdir, allow_config_change=True)
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    trainer.claim_workdir(ehr_config(), str(a_file))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_the_step_boundary_and_raises(tmp_path, signum):
  from conv_task import ConvClassifierTask, ImageSource, image_config

  def send(trainer_, step):
    if step == 3:
      os.kill(os.getpid(), signum)

  config = image_config(ckpt_every=100, eval_every=0)
  # A test process started in the background has SIGINT ignored; the trainer respects an
  # ignored signal, so give SIGINT its interactive default for this test.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(trainer.TrainingInterrupted) as info:
      trainer.train(config, str(tmp_path), ConvClassifierTask("xent"), ImageSource(64, 0), progress=False,
                    callbacks=[send])
    restored = signal.getsignal(signal.SIGINT)
  finally:
    signal.signal(signal.SIGINT, outer)
  assert info.value.step == 3 and info.value.exit_code == 128 + signum
  assert "last checkpoint: step 3" in str(info.value)
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  assert restored is signal.default_int_handler  # handlers restored


def _read_tfrecords(path):
  from tensorboardX.proto import event_pb2
  with open(path, "rb") as f:
    data = f.read()
  events, i = [], 0
  while i < len(data):
    (length,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[i + 12:i + 12 + length])
    events.append(event)
    i += 12 + length + 4
  return events


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp("meds") / "cohort"
  generate_cohort(300, seed=5, out_dir=root, progress=False)
  return str(root)


@pytest.mark.slow
def test_ctrl_c_mismatch_and_resume_from_the_command_line(tmp_path, cohort):
  workdir = tmp_path / "run"
  base = [sys.executable, "-m", "mlx_med.cli", "train", "--config", CONFIG, "--workdir", str(workdir),
          "--no-progress", f"--config.data.meds_root={cohort}", "--config.data.seq_len=64",
          "--config.train.batch_size=8", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.ckpt_every=1000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # Under a background `make test` SIGINT is ignored, and a child inherits that; the interactive
  # command gets Python's usual Ctrl-C handler first.
  interactive = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "from mlx_med.cli import main; sys.exit(main(sys.argv[1:]))"] + base[3:]
  proc = subprocess.Popen(interactive + ["--config.train.steps=100000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  lines, deadline = [], time.time() + 300
  while time.time() < deadline:  # plain progress lines arrive while it trains
    line = proc.stderr.readline()
    lines.append(line)
    if " step 3/100000 " in line:
      break
  assert " step 3/100000 (0%) loss " in lines[-1] and "tok/s" in lines[-1] and "ETA" in lines[-1], lines[-5:]
  proc.send_signal(signal.SIGINT)
  _, rest = proc.communicate(timeout=120)
  assert proc.returncode == 130, rest[-2000:]
  assert "Traceback" not in rest, rest[-3000:]
  final = rest.strip().splitlines()[-1]
  assert final.startswith("mlx-med: SIGINT: stopped after step ") and "run the same command again" in final
  saved = int(final.split("stopped after step ")[1].split(";")[0])
  assert os.listdir(workdir / "checkpoints") == [str(saved)]

  changed = subprocess.run(base + ["--config.train.steps=100000", "--config.model.d_model=32"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert changed.returncode == 2
  assert changed.stderr.strip().splitlines()[-1].startswith("mlx-med: error: ") and "model.d_model (64 -> 32)" in \
      changed.stderr, changed.stderr[-2000:]

  resume = base + [f"--config.train.steps={saved + 2}"]
  refused = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and "--allow-config-change" in refused.stderr, refused.stderr[-2000:]
  resumed = subprocess.run(resume + ["--allow-config-change"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved}" in resumed.stderr
  assert f"final step {saved + 2} " in resumed.stdout
  # TensorBoard agrees with metrics.jsonl: the resumed writer purges the earlier run's later steps.
  files = sorted((workdir / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime)
  starts = [e.step for e in _read_tfrecords(files[-1]) if e.HasField("session_log")
            and e.session_log.status == e.session_log.START]
  assert starts == [saved + 1]
