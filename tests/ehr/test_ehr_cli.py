"""`mlx-med ehr` commands through argparse, as the console script will call them."""

from __future__ import annotations

import argparse
import json

import pytest

from mlx_med.ehr import cli


def _run(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="mlx-med")
  cli.register(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(argv)
  return args.func(args)


def test_synth_validate_tokenize(tmp_path, capsys):
  root = tmp_path / "meds"
  assert _run(["ehr", "synth", "--subjects", "120", "--seed", "1", "--out", str(root), "--quiet"]) == 0
  assert "best_auroc" in capsys.readouterr().out
  assert _run(["ehr", "validate", "--meds-root", str(root), "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "valid MEDS" in out and "subjects=120" in out
  vocab = tmp_path / "vocab.json"
  assert _run(["ehr", "tokenize", "--meds-root", str(root), "--out", str(vocab), "--min-count", "2", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
  out = capsys.readouterr().out
  assert json.loads(vocab.read_text())["config"]["min_count"] == 2
  assert "train:" in out and "held_out:" in out


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    _run(["ehr", "validate", "--meds-root", str(tmp_path / "missing"), "--quiet"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "data directory not found" in err
  (tmp_path / "exists").mkdir()
  with pytest.raises(SystemExit) as e:
    _run(["ehr", "synth", "--subjects", "5", "--out", str(tmp_path / "exists"), "--quiet"])
  assert e.value.code == 2 and "already exists" in capsys.readouterr().err
