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
