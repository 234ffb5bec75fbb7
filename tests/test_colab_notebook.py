"""The colab notebook runs top to bottom at smoke size."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ehr_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("MLX_MED_NB_SUBJECTS", "300")
  monkeypatch.setenv("MLX_MED_NB_STEPS", "6")
  monkeypatch.setenv("MLX_MED_NB_WORKDIR", str(tmp_path / "nb"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(REPO, "colabs", "ehr_pretraining_smoke.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "colabs")}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "vocabulary size:" in outputs
  assert "final train loss" in outputs
  assert (tmp_path / "nb" / "metrics.jsonl").exists()
  assert (tmp_path / "nb" / "loss_curve.png").exists()
