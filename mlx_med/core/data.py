"""Input pipeline on grain: deterministic, sharded per host, checkpointable.

Any random-access source (`__len__`, `__getitem__ -> dict of numpy arrays`) becomes
an infinite, shuffled stream of per-host batches. Each host reads a disjoint, equal
shard of the records (every process_count-th record from its index); each epoch is a
fresh seeded permutation; the iterator's position is part of the checkpoint, so a
resumed run sees exactly the batches an uninterrupted run would have seen.

Built on grain's dataset API (`MapDataset` -> `IterDataset`) rather than its
`DataLoader`: the same records and state for about a quarter of the per-batch
overhead (bench/loader_overhead.py, 32 records a batch: 3.4 ms against 12.3 ms),
which was most of a step for the small models of a scaling sweep.

Per-example random transforms (training augmentation) are a `transform` of the loader,
applied after the shuffle and the repeat with grain's seeded `random_map`: the random
generator of each example is derived from the seed, the host and the example's position
in the repeated stream, so every epoch draws new augmentations of the same record, a
rerun draws the same ones, and a restored iterator (which stores only its position)
continues exactly where the saved one stopped. The trainer passes a train source's
`train_transform` attribute here (see `mlx_med.core.trainer`); evaluation loaders take none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain.python as grain
import jax
import numpy as np

# A per-example random transform: a grain RandomMapTransform (its `random_map(record, rng)`) or a
# plain callable (record, np.random.Generator) -> record. It must pickle when worker_count > 0.
RandomTransform = grain.RandomMapTransform | Callable[[Any, np.random.Generator], Any]

# Salt of the augmentation seeds, so they are not the shuffle's seed reused.
_TRANSFORM_SALT = 0x6D6C786D


def transform_seed(seed: int, process_index: int) -> int:
  """The `random_map` seed of host `process_index` for a run seeded `seed` (a uint32): hosts draw
  independent augmentations of their disjoint records, and the stream is unrelated to the shuffle's."""
  return int(np.random.SeedSequence([_TRANSFORM_SALT, int(seed) % 2**63, int(process_index)]).generate_state(1)[0])


def make_loader(source: Any, global_batch_size: int, seed: int, *, shuffle: bool = True,
                num_epochs: int | None = None, worker_count: int = 0,
                process_index: int | None = None, process_count: int | None = None,
                transform: RandomTransform | None = None) -> grain.IterDataset:
  """This host's slice of each global batch, as an iterable whose iterators checkpoint
  (`get_state`/`set_state`; Orbax saves them with grain's checkpoint handler).

  `transform`: a per-example random transform (`RandomTransform`) applied after the shuffle and
  the repeat, before batching, with a generator seeded by (`transform_seed(seed, process_index)`,
  position in the stream): new draws every epoch, the same draws on a rerun or after a restore."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be divisible by the {process_count} hosts")
  if len(source) < process_count:
    raise ValueError(f"the data source has {len(source)} records, fewer than the {process_count} hosts")
  per_host = len(source) // process_count
  ds = grain.MapDataset.source(source)[: per_host * process_count][process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if transform is not None:
    ds = ds.random_map(transform, seed=transform_seed(seed, process_index))
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  iterable = ds.to_iter_dataset()
  if worker_count > 0:
    mark_flags_parsed()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iterable


def mark_flags_parsed() -> None:
  """grain's worker processes read absl flags, which a library caller (or a CLI on argparse) never
  parsed; marking them parsed lets the workers start with grain's defaults."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
  """Assembles per-host numpy batches into global sharded arrays; the keys must match exactly."""
  if set(batch) != set(shardings):
    unknown, missing = sorted(set(batch) - set(shardings)), sorted(set(shardings) - set(batch))
    raise ValueError(f"batch keys {sorted(batch)} do not match the task's batch_axes {sorted(shardings)}"
                     + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else "")
                     + " (add the key to the task's batch_axes, or drop it from the data source)")
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}
