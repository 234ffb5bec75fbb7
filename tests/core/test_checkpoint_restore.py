"""`core.checkpoint.restore_latest_state`: a run's newest train state, placed on one device whatever
mesh wrote it (what every capability's model loader uses), without touching the data iterator item."""

import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import checkpoint as checkpoint_lib
from mlx_med.core import sharding as sharding_lib


def test_sharded_checkpoint_restores_on_one_device(tmp_path):
  assert checkpoint_lib.restore_latest_state(tmp_path / "missing") is None
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2, save_every=1, async_save=False)
  assert checkpoint_lib.restore_latest_state(tmp_path / "checkpoints") is None  # no step yet
  mesh = sharding_lib.make_mesh({"data": 8})
  w = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None)))
  assert len(sharded.sharding.device_set) == 8
  for step in (1, 2):
    ckpt.save(step, {"params": {"w": sharded * step}, "step": jnp.asarray(step)}, force=True)
  ckpt.close()
  state, step = checkpoint_lib.restore_latest_state(tmp_path / "checkpoints")
  assert step == 2
  leaf = state["params"]["w"]
  assert leaf.sharding.device_set == {jax.local_devices()[0]}
  np.testing.assert_array_equal(np.asarray(leaf), 2 * w)
  assert int(state["step"]) == 2
