"""One train step on a data=2 x fsdp=2 x tensor=2 mesh equals the single-device step."""

import jax
import numpy as np
import pytest

from mlx_med.core import config as config_lib
from mlx_med.core import optim, sharding, trainer
from mlx_med.core.train_step import make_train_step
from mlx_med.core.transformer import DecoderConfig

CFG = DecoderConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128)


def _batch(seed=0, b=8, t=16):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2:] = 2  # two packed segments per row
  seg[0, -3:] = 0  # padding
  pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0).astype(np.int32)
  return {"inputs": inputs, "targets": np.roll(inputs, -1, 1), "segment_ids": seg, "positions": pos,
          "loss_mask": (seg > 0).astype(np.float32)}


def _run(mesh_shape, devices):
  train_cfg = config_lib.default_train_config()
  train_cfg.warmup_steps = 0
  # AdamW's first update is lr * g / (|g| + eps): near g = 0 it amplifies fp32
  # reduction-order noise in g by lr / eps. With the default eps = 1e-8 a grad
  # element of ~1e-8 that differs in its 7th digit between meshes moves a param
  # by ~5e-5. eps = 1e-5 (Llama's setting) bounds that by lr * 1e-8 / 1e-5 << 1e-5;
  # the gradients themselves are compared separately below.
  train_cfg.eps = 1e-5
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.ShardingRules(mesh)
  optimizer, schedule = optim.make_optimizer(train_cfg)
  _, state_sh = trainer.state_shardings(CFG, optimizer, rules, seed=0)
  b_sh = trainer.batch_shardings(rules)
  state = jax.jit(lambda: trainer.init_train_state(trainer._init_params_unjitted(CFG, 0), optimizer, 0),
                  out_shardings=state_sh)()
  step = jax.jit(make_train_step(CFG, optimizer, schedule, 1, rules), in_shardings=(state_sh, b_sh),
                 out_shardings=(state_sh, None), donate_argnums=(0,))
  batch = {k: jax.device_put(v, b_sh[k]) for k, v in _batch().items()}
  losses = []
  for _ in range(1):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_sharded_step_matches_single_device():
  assert jax.device_count() == 8
  single_state, single_losses = _run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  sharded_state, sharded_losses = _run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  # Parameters really are distributed on the 8-device mesh.
  q = sharded_state["params"]["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len({s.device for s in q.addressable_shards}) == 8
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(sharded_state["params"])),
                  jax.tree.leaves(jax.device_get(single_state["params"]))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_sharded_gradients_match_single_device():
  from mlx_med.core import params as params_lib
  from mlx_med.core.train_step import make_loss_fn

  def grads(mesh_shape, devices):
    rules = sharding.ShardingRules(sharding.make_mesh(mesh_shape, devices))
    p = jax.device_put(trainer._init_params_unjitted(CFG, 0), params_lib.param_shardings(CFG, rules))
    b_sh = trainer.batch_shardings(rules)
    batch = {k: jax.device_put(v, b_sh[k]) for k, v in _batch().items()}
    loss_fn = make_loss_fn(CFG, rules)
    return jax.device_get(jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))(p, batch))

  single = grads({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  sharded = grads({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    # Summed (not averaged) token losses: gradients are O(1-10); fp32 relative 1e-6.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mesh_shape_resolution_and_rules():
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="not divisible"):
    sharding.resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="uses 4 devices but 8"):
    sharding.resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.ShardingRules(mesh)
  P = jax.sharding.PartitionSpec
  assert rules.spec(("batch", "length")) == P(("data", "fsdp"), None)
  # One KV head cannot be split over tensor=2: it stays replicated.
  assert rules.spec(("embed", "kv_heads", "head_dim"), (64, 1, 16)) == P("fsdp", None, None)
  with pytest.raises(KeyError, match="no sharding rule"):
    rules.spec(("nonsense",))


_COMPILE_SHARDED_STEP = """
import jax
import test_sharding as T
from mlx_med.core import config, optim, sharding, trainer
from mlx_med.core.train_step import make_train_step
rules = sharding.ShardingRules(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()))
optimizer, schedule = optim.make_optimizer(config.default_train_config())
_, state_sh = trainer.state_shardings(T.CFG, optimizer, rules, seed=0)
batch_sh = trainer.batch_shardings(rules)
shapes = jax.eval_shape(lambda: trainer.init_train_state(trainer._init_params_unjitted(T.CFG, 0), optimizer, 0))
state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in T._batch().items()}
jax.jit(make_train_step(T.CFG, optimizer, schedule, 1, rules), in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None)).lower(state, batch).compile()
print("compiled")
"""


def test_sharded_step_has_no_replicated_fallbacks():
  """The SPMD partitioner finds an efficient plan for every op of the 3-axis train step.

  Its fallback (replicating a whole tensor and re-partitioning it) is only a warning
  on stderr, so the step is compiled in a subprocess whose stderr is checked. The
  embedding lookup on the vocab x embed sharded table used to hit it.
  """
  import os
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", _COMPILE_SHARDED_STEP], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-2000:]
  assert "Involuntary full rematerialization" not in out.stderr, out.stderr[-2000:]
