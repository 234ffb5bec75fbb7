"""Synthetic MEDS cohort generation: wall time for 20,000 subjects, against the parquet floor.

Generates a cohort with `mlx_med.ehr.synth.generate_cohort` (the `mlx-med ehr synth`
path, progress bar off) and reports seconds, subjects/s and events/s. The goal is under
60 s for 20,000 subjects on 2 CPU cores.

The peer is the I/O floor of the same output: reading back every data shard the
generator wrote and writing it again with pyarrow (same files, same row groups, default
compression). Generation can never beat that, so generation / floor says how much of
the time is spent drawing the cohort rather than storing it.

  python bench/ehr_synth_timing.py                       # 20,000 subjects, goal check
  python bench/ehr_synth_timing.py --subjects 2000 --repeats 3 --json /tmp/synth.json

Exits 1 when the goal is not met (only checked at the default 20,000 subjects).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 60.0
GOAL_SUBJECTS = 20_000


def _rewrite_seconds(root: Path, scratch: Path) -> float:
  """Seconds to read every data shard under `root` and write it again under `scratch`."""
  import pyarrow.parquet as pq

  start = time.perf_counter()
  for path in sorted((root / "data").rglob("*.parquet")):
    out = scratch / path.relative_to(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(path), out)
  return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--subjects", type=int, default=GOAL_SUBJECTS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=1, help="timed generations (median reported)")
  parser.add_argument("--workdir", default=None, help="where cohorts are written (default: a temp dir, removed)")
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args(argv)

  from mlx_med.ehr import synth

  work = Path(args.workdir or tempfile.mkdtemp(prefix="ehr_synth_bench_"))
  try:
    gen_times, floor_times, summary = [], [], {}
    for r in range(max(1, args.repeats)):
      root = work / f"cohort_{r}"
      start = time.perf_counter()
      summary = synth.generate_cohort(args.subjects, seed=args.seed, out_dir=root, overwrite=True, progress=False)
      gen_times.append(time.perf_counter() - start)
      floor_times.append(_rewrite_seconds(root, work / f"rewrite_{r}"))
      shutil.rmtree(work / f"rewrite_{r}")
  finally:
    if args.workdir is None:
      shutil.rmtree(work, ignore_errors=True)

  gen, floor = statistics.median(gen_times), statistics.median(floor_times)
  figures = {
      "subjects": args.subjects, "seed": args.seed, "repeats": len(gen_times),
      "num_events": summary["num_events"], "num_codes_used": summary["num_codes_used"],
      "generation_seconds": round(gen, 2), "subjects_per_second": round(args.subjects / gen),
      "events_per_second": round(summary["num_events"] / gen),
      "parquet_rewrite_seconds": round(floor, 2), "generation_over_rewrite": round(gen / floor, 2),
      "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
      "python": platform.python_version(),
  }
  print(f"{args.subjects} subjects, {figures['num_events']:,} events, {figures['num_codes_used']} codes "
        f"(median of {len(gen_times)}; {os.cpu_count()} cores, load {figures['load_average']})")
  print(f"  generation       {gen:7.2f} s   {figures['subjects_per_second']:,} subjects/s, "
        f"{figures['events_per_second']:,} events/s")
  print(f"  parquet rewrite  {floor:7.2f} s   (read + write the same shards with pyarrow)")
  print(f"  generation / rewrite: {gen / floor:.2f}x")
  ok = True
  if args.subjects == GOAL_SUBJECTS:
    ok = gen < GOAL_SECONDS
    print(f"  goal: {GOAL_SUBJECTS} subjects in < {GOAL_SECONDS:.0f} s: {'met' if ok else 'NOT met'}")
  if args.json:
    Path(args.json).write_text(json.dumps(figures, indent=2))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
