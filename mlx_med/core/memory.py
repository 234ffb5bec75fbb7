"""Will this run fit? A training-memory estimate made before anything is compiled or allocated.

Parameters, optimizer state and EMA are counted exactly per device from their
abstract shapes and shardings. Activations come from the task
(`Task.activation_bytes_per_example`, an estimate: the decoder's counts what its
remat policy keeps per layer, one layer's full working set during the backward
pass, the attention scores where the backend materialises them, and the logits).
A run whose estimate exceeds the device memory is refused with one line that
says what to change, instead of dying in the allocator after minutes of setup.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax

GB = 1e9


class MemoryBudgetError(ValueError):
  """The run would not fit in device memory (one-line message with the estimate and the fixes)."""


@dataclasses.dataclass
class MemoryEstimate:
  params: float  # bytes per device
  optimizer: float
  activations: float | None  # None: the task gives no estimate
  examples_per_device: int

  @property
  def total(self) -> float:
    return self.params + self.optimizer + (self.activations or 0.0)

  def describe(self) -> str:
    acts = "activations ?" if self.activations is None else f"activations {self.activations / GB:.2f} GB"
    return (f"about {self.total / GB:.2f} GB per device (params {self.params / GB:.2f} GB + optimizer "
            f"{self.optimizer / GB:.2f} GB + {acts} for {self.examples_per_device} example(s) per micro-batch)")


def _device_bytes(abstract: Any, shardings: Any) -> float:
  total = 0.0
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def estimate(task, abstract_state: dict, state_shardings: dict, batch_sharding, global_batch: int,
             grad_accum: int) -> MemoryEstimate:
  params = _device_bytes(abstract_state["params"], state_shardings["params"])
  rest = {k: v for k, v in abstract_state.items() if k != "params"}
  optimizer = _device_bytes(rest, {k: state_shardings[k] for k in rest})
  micro = global_batch // max(grad_accum, 1)
  try:
    local = batch_sharding.shard_shape((micro,))[0]
  except ValueError:  # not divisible: the largest shard
    local = math.ceil(micro / batch_sharding.num_devices)
  per_example = task.activation_bytes_per_example()
  acts = None if per_example is None else per_example * local
  return MemoryEstimate(params, optimizer, acts, local)


def device_memory(device: jax.Device | None = None) -> tuple[float | None, str]:
  """(bytes usable by one device, a description). CPU devices share the host's available memory."""
  device = device or jax.local_devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):  # some backends do not implement it
    stats = None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), f"{device.device_kind}"
  available = _host_available_bytes()
  if available is None:
    return None, device.device_kind
  share = available / max(len(jax.local_devices()), 1)
  return share, f"{device.platform}: host memory {available / GB:.1f} GB available over {len(jax.local_devices())} device(s)"


def _host_available_bytes() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
  except (ValueError, OSError, AttributeError):
    return None


def check_fits(est: MemoryEstimate, *, what: str = "this run", headroom: float = 0.9) -> None:
  """Raises MemoryBudgetError when the estimate exceeds `headroom` x the device memory."""
  limit, device = device_memory()
  if limit is None or est.total <= headroom * limit:
    return
  raise MemoryBudgetError(
      f"{what} needs {est.describe()}, but a device has {limit / GB:.1f} GB usable ({device}); use a smaller "
      "variant (e.g. :smoke) or model, lower train.batch_size or the sequence length, raise train.grad_accum, "
      "set model.remat=full, or shard over more devices (config.mesh); train.check_memory=False skips this check")
