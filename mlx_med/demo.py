"""`make demo`: the EHR scaling-law study at smoke size, end to end on a CPU.

Generates a synthetic MEDS cohort, fits the timeline tokenizer, trains an IsoFLOP sweep
(3 FLOP budgets x 5 decoder sizes, each on exactly budget / FLOPs-per-token tokens),
scores every run's clinical utility (linear probe and count baseline beside the oracle),
fits the scaling laws (Chinchilla approaches 2 and 3) and writes report.md with plots.
Re-running resumes: finished runs are skipped.
"""

from __future__ import annotations

import os
import sys

from mlx_med import cli


def main() -> int:
  workdir = os.environ.get("MLX_MED_DEMO_WORKDIR", os.path.join("runs", "demo_scaling"))
  print(f"mlx_med demo: EHR IsoFLOP scaling study (smoke size) in {workdir}/ (about 15 minutes on 2 CPU cores; "
        "re-running resumes)", flush=True)
  rc = cli.main(["scaling", "run", "--config", os.path.join("configs", "ehr", "isoflops.py") + ":smoke",
                 "--workdir", workdir, "--no-progress"])
  if rc:
    return rc
  print("\nDone.")
  print(f"  report       : {os.path.join(workdir, 'report.md')}")
  print(f"  plots        : {os.path.join(workdir, 'plots')}/ (IsoFLOP curves, N_opt/D_opt vs compute, AUROC)")
  print(f"  runs table   : {os.path.join(workdir, 'runs.csv')}; fits: {os.path.join(workdir, 'fits.json')}")
  print(f"  each run     : {os.path.join(workdir, 'runs', '<run>')}/ (checkpoints, metrics.jsonl, eval.json)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
