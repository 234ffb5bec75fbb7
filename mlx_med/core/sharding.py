"""Device meshes and logical-axis sharding rules.

Models name the axes of their parameters and activations logically ("batch",
"embed", "heads", ...). A `ShardingRules` object, built from the config, maps those
names onto the physical mesh axes ("data", "fsdp", "tensor"). We keep the mapping
explicit (a value passed to the model, not a context manager) so that the same
model code runs unchanged on one CPU, on fake CPU devices in tests, and on a pod.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LogicalAxes = tuple[str | None, ...]

# Default logical -> mesh rules. A logical name may map to several mesh axes.
# Parameters are sharded FSDP-style along "embed" and tensor-parallel along the
# head / MLP / vocab dimensions; activations are sharded along batch.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)

DEFAULT_MESH_AXES = ("data", "fsdp", "tensor")


def _auto_axis_types(n: int):
  # Axis types are chosen on purpose: Auto lets jit's in/out shardings and
  # sharding constraints drive propagation (newer JAX can default to Explicit).
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:
    return None
  return (axis_type.Auto,) * n


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Replaces one -1 entry with the remaining devices; checks the product."""
  shape = dict(shape)
  unknown = [name for name, size in shape.items() if size == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = math.prod(size for size in shape.values() if size != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape[unknown[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"mesh shape {shape} uses {math.prod(shape.values())} devices but {num_devices} are present; "
                     "set one axis to -1 to take the rest")
  return shape


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh with Auto axis types from {axis_name: size} (-1 = the rest)."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(shape or {"data": -1, "fsdp": 1, "tensor": 1}, len(devices))
  names = tuple(shape.keys())
  sizes = tuple(shape.values())
  axis_types = _auto_axis_types(len(names))
  if devices == jax.devices():
    kwargs = {"axis_types": axis_types} if axis_types is not None else {}
    return jax.make_mesh(sizes, names, **kwargs)
  array = np.asarray(devices, dtype=object).reshape(sizes)
  kwargs = {"axis_types": axis_types} if axis_types is not None else {}
  return Mesh(array, names, **kwargs)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Maps logical axis names to mesh axes for one mesh."""

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def __hash__(self):
    return hash((id(self.mesh), self.rules))

  def _mesh_axes_for(self, name: str | None) -> tuple[str, ...]:
    if name is None:
      return ()
    for logical, physical in self.rules:
      if logical == name:
        if physical is None:
          return ()
        if isinstance(physical, str):
          return (physical,)
        return tuple(physical)
    raise KeyError(f"logical axis {name!r} has no sharding rule; add it to config.sharding.rules")

  def spec(self, logical: LogicalAxes, shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical axes. Mesh axes of size 1 are dropped, a mesh axis
    is used at most once, and a dimension that does not divide evenly stays
    replicated (e.g. one KV head on a tensor-parallel mesh)."""
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical):
      axes = []
      size = 1
      for axis in self._mesh_axes_for(name):
        if axis not in self.mesh.shape or axis in used or self.mesh.shape[axis] == 1:
          continue
        if shape is not None and shape[dim] % (size * self.mesh.shape[axis]):
          continue
        axes.append(axis)
        size *= self.mesh.shape[axis]
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)

  def named(self, logical: LogicalAxes, shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical, shape))

  def constrain(self, x: jax.Array, logical: LogicalAxes) -> jax.Array:
    """Sharding constraint on an activation inside jit."""
    return jax.lax.with_sharding_constraint(x, self.named(logical, x.shape))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def rules_from_config(mesh: Mesh, rules_cfg: Sequence[Sequence[Any]] | None) -> ShardingRules:
  """Config rules are (logical, physical) pairs overriding/adding to the defaults."""
  merged = dict(DEFAULT_RULES)
  for pair in rules_cfg or ():
    logical, physical = pair
    merged[logical] = tuple(physical) if isinstance(physical, list) else physical
  return ShardingRules(mesh, tuple(merged.items()))


def constrain(rules: ShardingRules | None, x: jax.Array, logical: LogicalAxes) -> jax.Array:
  """`rules.constrain` that is a no-op when no rules are given (single device)."""
  if rules is None:
    return x
  return rules.constrain(x, logical)


def tree_shardings(rules: ShardingRules, logical_tree: Any, shape_tree: Any) -> Any:
  """NamedShardings for a tree of logical specs and a matching tree of shapes."""
  return jax.tree.map(
      lambda spec, leaf: rules.named(tuple(spec), leaf.shape),
      logical_tree, shape_tree,
      is_leaf=lambda x: isinstance(x, P))
