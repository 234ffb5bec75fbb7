"""`mlx-med train` turns bad configs into one-line errors with exit code 2."""

import os

import pytest

from mlx_med import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "ehr", "pretrain.py") + ":smoke"


@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=3"], "unknown key 'stepz'"),
    (["--config.train.steps=many"], "expected int"),
    (["--config.model.dtype=float8"], "dtype 'float8' is not one of"),
    (["--config.model.num_kv_heads=3"], "must be a multiple of num_kv_heads=3"),
    ([], "data directory not found"),
])
def test_train_bad_config_is_one_line_error(tmp_path, capsys, args, message):
  rc = cli.main(["train", "--config", SMOKE, "--workdir", str(tmp_path / "w"),
                 "--config.data.meds_root=" + str(tmp_path / "missing"), *args])
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert message in err and len(err.splitlines()) == 1, err


def test_unknown_variant_and_task(tmp_path, capsys):
  assert cli.main(["train", "--config", SMOKE.replace(":smoke", ":giant"), "--workdir", str(tmp_path)]) == 2
  assert "unknown variant 'giant'" in capsys.readouterr().err
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\ndef get_config(arg=None):\n  return ml_collections.ConfigDict({'task': 'nope'})\n")
  assert cli.main(["train", "--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2
  assert "config.task='nope'" in capsys.readouterr().err


def test_no_tpu_probe_info_line_without_a_tpu():
  # JAX logs "Unable to initialize backend 'tpu': ... libtpu.so ..." at INFO while it
  # looks for platforms; the CLI (and `mlx-med serve`) drop that record unless -v.
  import subprocess
  import sys

  code = ("import logging, sys\n"
          "logging.basicConfig(level=logging.INFO)\n"
          "if sys.argv[1] == 'quiet':\n"
          "  from mlx_med.cli import quiet_backend_probe_logs; quiet_backend_probe_logs()\n"
          "import jax; jax.devices()\n"
          "logging.getLogger('jax._src.xla_bridge').warning('a real warning')\n")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  run = lambda mode: subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True, text=True,
                                    timeout=120)
  loud = run("loud")
  if "Unable to initialize backend 'tpu'" not in loud.stderr:
    pytest.skip("JAX did not probe for a TPU here (a TPU is present or its probe is disabled)")
  quiet = run("quiet")
  assert quiet.returncode == 0, quiet.stderr
  assert "Unable to initialize backend" not in quiet.stderr and "libtpu" not in quiet.stderr
  assert "a real warning" in quiet.stderr


def test_make_demo_installs_the_core_only_and_make_test_adds_cpu_torch(tmp_path):
  # What each command would run on a fresh clone (make -n: print, do not run).
  import shutil
  import subprocess
  import tomllib

  if shutil.which("make") is None:
    pytest.skip("make is not installed")
  for name in ("Makefile", "pyproject.toml"):
    shutil.copy(os.path.join(REPO, name), tmp_path / name)
  # (Under `make test` the environment carries MAKELEVEL/MAKEFLAGS; a nested make would print
  # "Entering directory" lines: --no-print-directory keeps the dry run to the commands.)
  dry = lambda *target: subprocess.run(["make", "-n", "--no-print-directory", *target], cwd=tmp_path,
                                       capture_output=True, text=True, check=True).stdout
  demo = dry("demo")
  assert "pip install -q -e .\n" in demo and "[" not in demo and "torch" not in demo, demo
  test = dry("test")
  assert "--no-deps --index-url https://download.pytorch.org/whl/cpu 'torch==2.13.0'" in test, test
  assert "-e '.[hf,serve,test]'" in test and "pytest" in test
  assert "index-url" not in dry("test", "TORCH_INDEX=")
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  import re
  core = {re.split(r"[<>=!~\[ ;]", dep)[0].lower() for dep in project["dependencies"]}
  assert core.isdisjoint({"torch", "transformers", "pytest", "tensorboard"}), core
  assert f"torch=={test.split('torch==')[1].split(chr(39))[0]}" in project["optional-dependencies"]["hf"]


def test_version(capsys):
  from mlx_med import __version__

  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip() == f"mlx-med {__version__}"


def test_train_help_lists_each_config_and_its_variants(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  out = capsys.readouterr().out
  assert "configs (--config PATH:VARIANT):" in out
  line = next(i for i, text in enumerate(out.splitlines()) if "configs/ehr/pretrain.py" in text)
  variants = out.splitlines()[line + 1]
  assert variants.strip().startswith("variants:") and all(v in variants for v in ("smoke", "small", "base"))


def test_workdir_that_is_a_file_is_one_line_error(tmp_path, capsys):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  assert cli.main(["train", "--config", SMOKE, "--workdir", str(path)]) == 2
  err = capsys.readouterr().err.strip()
  assert "is a file, not a directory" in err and len(err.splitlines()) == 1, err


def test_synth_into_existing_directory_names_the_flag(tmp_path, capsys):
  (tmp_path / "cohort").mkdir()
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["ehr", "synth", "--subjects", "5", "--out", str(tmp_path / "cohort"), "--quiet"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "already exists" in err and "--overwrite on the command line" in err
  assert "overwrite=True (--overwrite)" not in err
