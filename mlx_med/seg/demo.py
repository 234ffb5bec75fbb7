"""BoltzFormer against Mask2Former's masked attention on synthetic CT slices, on a CPU: `make seg-demo`.

  python -m mlx_med.seg.demo [--workdir runs/seg_demo] [--config.train.steps=N ...]

1. generates synthetic CT-like slices with lesions in three size buckets (< 0.1%, 0.1-1%, > 1% of the
   image) and a text prompt per target into <workdir>/synthetic;
2. trains the `smoke` BoltzFormer twice at equal steps through the shared trainer: attention `boltzmann`
   (Boltzmann-sampled keys) and `threshold` (sigmoid > 0.5, Mask2Former); rerunning resumes;
3. evaluates both on the held-out slices (Dice, IoU, HD95 by size bucket with bootstrap intervals),
   and the boltzmann checkpoint under `full` attention too (the FLOPs reference);
4. prints the comparison table (Dice by size bucket, attention GFLOPs per image and the ratio to full,
   wall time) and the two goals as measured, and writes the figures (Dice by bucket; kept keys per
   layer as the temperature anneals, for the smallest targets) into <workdir>.

The demo reports what it measured; it does not fail when a goal is missed (the goals are the paper's
claims, checked on this tiny CPU model, not properties of the code). It exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "seg" / "boltzformer.py"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", default="runs/seg_demo")
  p.add_argument("--modes", default="boltzmann,threshold", help="attention modes to train")
  p.add_argument("--eval-only", default="full", help="modes evaluated on the first mode's checkpoint")
  p.add_argument("--no-progress", action="store_true")
  args, extra = p.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from mlx_med.cli import quiet_backend_probe_logs
  quiet_backend_probe_logs()

  from mlx_med.core import config as config_lib
  from mlx_med.seg import compare as compare_lib

  overrides, rest = config_lib.split_config_args(list(extra))
  if rest:
    p.error(f"unknown arguments {rest}")
  config = config_lib.get_config(f"{CONFIG}:smoke", overrides)
  start = time.perf_counter()
  modes = tuple(m for m in args.modes.split(",") if m)
  eval_only = tuple(m for m in args.eval_only.split(",") if m)
  result = compare_lib.compare(config, args.workdir, modes, eval_only_modes=eval_only, progress=not args.no_progress)
  print()
  print(result["markdown"])
  for name, path in result["paths"].items():
    print(f"{name}: {path}")
  print(f"\nseg demo finished in {time.perf_counter() - start:.0f} s; everything is in {args.workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
