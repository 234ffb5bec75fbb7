"""Multi-host start-up: `jax.distributed.initialize` only when launched that way.

The same command runs on every worker (TPU pod: `gcloud ... ssh --worker=all`;
GPU cluster: `srun`). On those platforms JAX discovers the coordinator itself;
for local multi-process runs (tests, a workstation) pass it explicitly.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("mlx_med.distributed")

_MULTI_HOST_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def launched_multi_host() -> bool:
  if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    return True
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def maybe_initialize(distributed: bool = False, coordinator: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Calls jax.distributed.initialize when asked to or when launched multi-host."""
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator needs --num-processes and --process-id")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif distributed or launched_multi_host():
    jax.distributed.initialize()
  else:
    return False
  log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True
