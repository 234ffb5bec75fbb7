"""Per-batch overhead of the input pipeline: `mlx_med.core.data.make_loader` (grain's
dataset API) against grain's `DataLoader` (IndexSampler + Batch, what the trainer used
before) on the same EHR pretraining source, batch and shuffle.

  python bench/loader_overhead.py [--subjects 2000] [--batch 32] [--batches 200]

Prints ms per batch for each, the raw `source[i]` cost of the same records, the ratio and
the load average (the figures are single-threaded Python, so a loaded machine slows both).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--subjects", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=200)
  args = parser.parse_args()

  import grain.python as grain

  from mlx_med.core import config as config_lib
  from mlx_med.core import data as data_lib
  from mlx_med.ehr import pretrain

  config = config_lib.get_config(os.path.join(os.path.dirname(__file__), "..", "configs", "ehr", "pretrain.py") + ":smoke",
                                 [f"data.synth_subjects={args.subjects}"])
  with tempfile.TemporaryDirectory() as workdir:
    source = pretrain.prepare_data(config, workdir, progress=False).train_source

    def time_batches(iterator) -> float:
      next(iterator)  # warm-up
      start = time.perf_counter()
      for _ in range(args.batches):
        next(iterator)
      return (time.perf_counter() - start) / args.batches * 1e3

    ours = time_batches(iter(data_lib.make_loader(source, args.batch, seed=0)))
    sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.NoSharding(), shuffle=True,
                                 num_epochs=None, seed=0)
    peer = time_batches(iter(grain.DataLoader(data_source=source, sampler=sampler,
                                              operations=[grain.Batch(args.batch, drop_remainder=True)],
                                              worker_count=0)))
    start = time.perf_counter()
    for i in range(args.batches * args.batch):
      source[i % len(source)]
    raw = (time.perf_counter() - start) / args.batches * 1e3
  print(f"load average {os.getloadavg()[0]:.2f}; {len(source)} records of {source.seq_len} tokens, batch {args.batch}")
  print(f"  source[i] alone        : {raw:6.2f} ms/batch")
  print(f"  mlx_med make_loader    : {ours:6.2f} ms/batch (grain MapDataset -> IterDataset)")
  print(f"  grain DataLoader (peer): {peer:6.2f} ms/batch")
  print(f"  ratio peer / ours      : {peer / ours:.1f}x")


if __name__ == "__main__":
  main()
