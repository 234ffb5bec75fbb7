"""`make demo`: the EHR foundation-model smoke run, end to end on a CPU.

Generates a synthetic MEDS cohort, fits the timeline tokenizer, trains the smoke
decoder for a minute or two, and prints where the metrics and the loss curve are.
"""

from __future__ import annotations

import os
import sys

from mlx_med import cli


def main() -> int:
  workdir = os.environ.get("MLX_MED_DEMO_WORKDIR", os.path.join("runs", "demo_ehr_smoke"))
  print(f"mlx_med demo: EHR pretraining smoke run in {workdir}/ (re-running resumes or is instant)", flush=True)
  rc = cli.main(["train", "--config", os.path.join("configs", "ehr", "pretrain.py") + ":smoke",
                 "--workdir", workdir])
  if rc:
    return rc
  print("\nDone.")
  print(f"  loss curve   : {os.path.join(workdir, 'loss_curve.png')}")
  print(f"  metrics      : {os.path.join(workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(workdir, 'tensorboard')})")
  print(f"  checkpoints  : {os.path.join(workdir, 'checkpoints')}")
  print(f"  vocabulary   : {os.path.join(workdir, 'vocab.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
