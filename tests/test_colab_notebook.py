"""The colab notebook runs top to bottom, in one fresh kernel, in an environment without mlx_med.

A user opens the notebook on a fresh runtime: mlx_med is not installed, jax may be
(an accelerator build on Colab). The notebook's own setup cell has to install the
package and make it importable in that same kernel. To test that honestly and fast,
the kernel runs in a new virtual environment that sees the project environment's
packages (so pip finds every dependency already satisfied and works offline) except
mlx_med itself: its editable-install hook and metadata are left out.
"""

import json
import os
import subprocess
import sys
import sysconfig

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colabs", "ehr_pretraining_smoke.ipynb")


def _is_mlx_med_install(name: str) -> bool:
  lowered = name.lower().replace("-", "_")
  return lowered.startswith(("mlx_med", "__editable__.mlx_med", "__editable___mlx_med"))


def _fresh_venv(root) -> str:
  """A venv whose site-packages reaches the project's packages minus mlx_med; returns its python."""
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  # A directory of links to the project's installed packages (pip and ipykernel included), mlx_med
  # excluded, added as a site directory so that its own .pth files are processed too.
  seed = root / "seed"
  seed.mkdir()
  project_site = sysconfig.get_paths()["purelib"]
  for name in os.listdir(project_site):
    if not _is_mlx_med_install(name):
      os.symlink(os.path.join(project_site, name), seed / name)
  with open(os.path.join(site, "project_packages.pth"), "w") as f:
    f.write(f"import site; site.addsitedir({str(seed)!r})\n")
  return python


def _kernel_env(root, python: str) -> None:
  """A kernelspec `mlx-med-fresh` that starts the fresh venv's python."""
  spec_dir = root / "jupyter" / "kernels" / "mlx-med-fresh"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fresh venv", "language": "python"}))


@pytest.mark.slow
def test_ehr_notebook_runs_in_one_fresh_kernel_without_mlx_med(tmp_path, monkeypatch):
  python = _fresh_venv(tmp_path)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  probe = subprocess.run([python, "-c", "import mlx_med"], cwd=os.path.join(REPO, "colabs"), env=env,
                         capture_output=True, text=True)
  assert probe.returncode != 0 and "No module named 'mlx_med'" in probe.stderr, "mlx_med must not be importable"
  probe = subprocess.run([python, "-c", "import jax, flax, ipykernel"], env=env, capture_output=True, text=True)
  assert probe.returncode == 0, probe.stderr

  _kernel_env(tmp_path, python)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # pip stays offline: every dependency is already satisfied, and the build backend
  # (setuptools) is taken from the environment instead of a download.
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
  monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
  monkeypatch.setenv("MLX_MED_NB_SUBJECTS", "300")
  monkeypatch.setenv("MLX_MED_NB_STEPS", "6")
  monkeypatch.setenv("MLX_MED_NB_WORKDIR", str(tmp_path / "nb"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="mlx-med-fresh",
                 resources={"metadata": {"path": os.path.join(REPO, "colabs")}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "installing mlx_med from " + REPO in outputs  # the notebook's own install cell did the work
  assert "mlx_med from " + os.path.join(REPO, "mlx_med") in outputs
  assert "vocabulary size:" in outputs
  assert "final train loss" in outputs
  assert (tmp_path / "nb" / "metrics.jsonl").exists()
  assert (tmp_path / "nb" / "loss_curve.png").exists()
  # The install landed in the fresh environment and left the seeded jax alone.
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True).stdout.strip()
  installed = os.listdir(site)
  assert any(name.startswith("mlx_med-") and name.endswith(".dist-info") for name in installed), installed
  assert not any(name.startswith(("jax-", "jaxlib-")) for name in installed), installed
