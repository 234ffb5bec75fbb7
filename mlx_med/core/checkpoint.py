"""Checkpoints with Orbax: train state (params, optimizer, RNG, counters) and the
grain iterator position, saved together per step; keep the newest N.

A SIGKILL during a save leaves only a temporary directory, which Orbax ignores
on restore, so the newest *complete* checkpoint is always the one resumed.
"""

from __future__ import annotations

import os
from typing import Any

import grain.python as grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, save_every: int = 1000, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.PyGrainCheckpointHandler()})
    self.save_every = save_every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None, force: bool = False) -> bool:
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.PyGrainCheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()



def restore_latest_state(directory: str | os.PathLike) -> tuple[Any, int] | None:
  """The newest complete train state under `directory` (a run's checkpoints/) as (state, step), placed
  on this process's first device whatever mesh trained it (a checkpoint written on a pod or on 8 fake
  devices loads on a laptop); None when there is no checkpoint yet. Only the state item is read (the
  grain iterator position is for resuming training, not for using the model; its handler is registered
  so Orbax knows the item it skips and does not warn about it)."""
  path = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(path):
    return None
  manager = ocp.CheckpointManager(path, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                      "data": grain.PyGrainCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      return None
    meta = manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta,
                          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  finally:
    manager.close()
  return state, int(step)
