"""Device mesh and logical-axis sharding rules.

Parameters name their dimensions with logical axes (`embed`, `heads`, `mlp`,
`vocab`, ...). A rule table maps each logical axis to mesh axes of the named
mesh ('data', 'fsdp', 'tensor'). A dimension that the mapped mesh axes do not
divide is replicated instead (tiny CPU models on big meshes), and a mesh axis
is never used twice in one spec.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. 'batch' shards activations; the rest are weights.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,  # the stacked layer axis of a scanned model (jaxlab.models.decoder)
}


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over ('data','fsdp','tensor'); one entry may be -1 to take the rest of the devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config key mesh.shape must have {len(MESH_AXES)} entries "
                     f"{MESH_AXES}, got {tuple(shape)}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config key mesh.shape={tuple(shape)}: sizes must be positive, "
                     "at most one may be -1")
  n = len(devices)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ValueError(f"config key mesh.shape={tuple(shape)} does not fit {n} devices "
                       f"({n} is not divisible by {known})")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ValueError(f"config key mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {n} are available; use -1 for one axis to take the rest")
  # Explicit Auto axis types: jax.make_mesh defaults to Explicit sharding mode.
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_and_rules(config, devices: Sequence[jax.Device] | None = None):
  """The device mesh (over `devices`, default all) and the logical-axis rules from config.mesh
  (its `rules` update DEFAULT_RULES)."""
  rules = dict(DEFAULT_RULES)
  rules.update({k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                for k, v in config.mesh.get("rules", {}).items()})
  return make_mesh(config.mesh.shape, devices), rules


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> P:
  """PartitionSpec for an array with logical `axes`, replicating non-divisible dims."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; add it to config.mesh.rules")
    target = rules.get(name) if name is not None else None
    target = (target,) if isinstance(target, str) else tuple(target or ())
    target = tuple(a for a in target if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in target)
    if not target or dim % size:
      spec.append(None)
      continue
    used.update(target)
    spec.append(target[0] if len(target) == 1 else target)
  return P(*spec)


def tree_shardings(axes_tree, abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree of arrays given a matching pytree of logical-axes tuples."""
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
  return jax.tree.map(
      lambda axes, a: NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh, rules)),
      axes_tree, abstract_tree, is_leaf=is_axes)


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a batch array: dim `leading` over the 'batch' rule, the rest replicated."""
  spec = [None] * ndim
  batch_axes = rules["batch"]
  spec[leading] = batch_axes
  return NamedSharding(mesh, P(*spec))


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, leading: int = 0,
                         rules=DEFAULT_RULES) -> dict[str, jax.Array]:
  """Assembles a global batch from each host's rows (multi-host ready)."""
  out = {}
  for k, v in batch.items():
    sharding = batch_sharding(mesh, v.ndim, leading, rules)
    global_shape = list(v.shape)
    global_shape[leading] *= jax.process_count()
    out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(global_shape))
  return out
