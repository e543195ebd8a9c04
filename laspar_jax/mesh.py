"""Device mesh, logical-axis rules and shardings: the one place batches and parameters meet the mesh.

Parameters carry logical axis names (`models.layers.param` stores them as the
variable's `out_sharding` metadata); `rules` map each logical name to a mesh
axis (`'data'`, `'model'`, optionally `'fsdp'`) or None (replicated). The rules
come from the config (`config.sharding_rules`, see `configs/common.py`);
`DEFAULT_RULES` is their default. Batches are global `jax.Array`s sharded on
`'data'` (`put_batch`); in-batch negatives span the global batch.

This module imports nothing from `laspar_jax.models` (models import it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.core.spmd
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, str | None]]
Axes = tuple[str | None, ...]

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
  ("batch", "data"),
  ("embed", None),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv", None),
  ("vocab", "model"),
  ("sparse", "model"),
  ("length", None),
)


def rules_from_config(config: Any) -> tuple[tuple[str, str | None], ...]:
  """The logical-axis rules of a config (`config.sharding_rules`), else DEFAULT_RULES.

  Accepts a sequence of (logical, mesh axis or None) pairs; raises ValueError
  naming the bad entry otherwise.
  """
  rules = config.get("sharding_rules", None) if hasattr(config, "get") else None
  if rules is None:
    return DEFAULT_RULES
  out = []
  for i, pair in enumerate(rules):
    if len(pair) != 2 or not isinstance(pair[0], str) or not (pair[1] is None or isinstance(pair[1], str)):
      raise ValueError(f"config.sharding_rules[{i}] = {pair!r}: expected (logical_name, mesh_axis | None)")
    out.append((pair[0], pair[1]))
  return tuple(out)


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh; -1 takes all remaining devices.

  Args:
    data: size of the data axis (-1: len(devices) // model).
    model: size of the model axis (-1: len(devices) // data).
    devices: defaults to jax.devices().
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data == -1 and model == -1:
    raise ValueError("at most one of mesh data/model may be -1")
  if data == -1:
    data = n // model
  if model == -1:
    model = n // data
  if data * model != n:
    raise ValueError(f"mesh data={data} x model={model} does not use the {n} devices")
  return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def mesh_from_config(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """`make_mesh` from a config section {data, model}."""
  return make_mesh(data=int(mesh_config["data"]), model=int(mesh_config["model"]), devices=devices)


def logical_axes(var: nnx.Variable) -> Axes | None:
  """Logical axis names of a variable (across flax metadata spellings)."""
  meta = var.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    if meta.get(key) is not None:
      return tuple(meta[key])
  return None


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES) -> P:
  """PartitionSpec for logical axis names (unknown names and None replicate)."""
  if axes is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for a in axes:
    m = table.get(a) if a is not None else None
    if m is not None and m in used:  # a mesh axis may shard only one dimension
      m = None
    if m is not None:
      used.add(m)
    out.append(m)
  return P(*out)


def logical_to_sharding(mesh: Mesh, axes: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """NamedSharding on `mesh` for logical axis names."""
  return NamedSharding(mesh, logical_to_spec(axes, rules))


def fit_spec(shape: Sequence[int], spec: P, mesh: Any) -> P:
  """Drops mesh axes that the mesh lacks or that do not divide their dimension (replicate instead)."""
  out = []
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    ok = ax is not None and ax in mesh.axis_names and dim % mesh.shape[ax] == 0
    out.append(ax if ok else None)
  return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical axis names, only inside a mesh context.

  Outside `jax.set_mesh(...)` this is the identity. Rules come from flax's
  logical-axis-rules context when set, else `DEFAULT_RULES`. Mesh axes that do
  not divide their dimension are dropped (replicated).

  Args:
    x: array to constrain.
    axes: one logical name (or None) per dimension of x.

  Returns:
    x, with a sharding constraint when a mesh is set.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  rules = flax.core.spmd.get_logical_axis_rules() or DEFAULT_RULES
  return jax.lax.with_sharding_constraint(x, fit_spec(x.shape, logical_to_spec(axes, rules), mesh))


def _var_spec(var: nnx.Variable, mesh: Mesh, rules: Rules) -> P:
  return fit_spec(var.get_value().shape, logical_to_spec(logical_axes(var), rules), mesh)


def state_shardings(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
  """A State like nnx.state(model) whose leaves are NamedShardings (by logical axes)."""
  state = nnx.state(model)

  def to_sharding(var):
    return var.replace(NamedSharding(mesh, _var_spec(var, mesh, rules)))

  return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Places every variable of `model` on the sharding given by its logical axes (in place)."""
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, _var_spec(var, mesh, rules))))
  return model


def batch_sharding(mesh: Mesh, ndim: int = 2, accum: bool = False) -> NamedSharding:
  """Rows on 'data', the rest replicated (after a leading micro-batch axis when `accum`)."""
  lead = (None,) if accum else ()
  return NamedSharding(mesh, P(*lead, "data", *([None] * (ndim - len(lead) - 1))))


def put_batch(batch: Mapping[str, Any], mesh: Mesh, accum: bool = False) -> dict[str, jax.Array]:
  """Global jax.Arrays from this host's numpy rows, sharded on 'data'.

  Every host passes its own share of rows; the global batch is their
  concatenation in process order (`jax.make_array_from_process_local_data`).

  Args:
    batch: {name: array [rows, ...]} (or [A, rows, ...] when `accum`).
    mesh: the device mesh.
    accum: arrays carry a leading micro-batch axis (gradient accumulation).
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, accum), v)
  return out
