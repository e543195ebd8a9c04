"""Device mesh, logical-axis rules and shardings.

Parameters carry logical axis names (`layers.param`); `rules` map each logical
name to a mesh axis (`'data'`, `'model'`) or None (replicated). Batches are
sharded on `'data'`; the huge sparse head on `'model'`.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from laspar_jax.models import layers

Rules = Sequence[tuple[str, str | None]]

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("sparse", "model"),
    ("length", None),
)


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


def logical_to_sharding(mesh: Mesh, axes: Sequence[str | None] | None,
                        rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """NamedSharding on `mesh` for logical axis names."""
  return NamedSharding(mesh, logical_to_spec(axes, rules))


def _fits(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (replicate instead)."""
  out = []
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    out.append(ax if ax is None or dim % mesh.shape[ax] == 0 else None)
  return P(*out)


def state_shardings(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
  """A State like nnx.state(model) whose leaves are NamedShardings (by logical axes)."""
  state = nnx.state(model)

  def to_sharding(var):
    spec = _fits(var.get_value().shape, logical_to_spec(layers.logical_axes(var), rules), mesh)
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Places every variable of `model` on the sharding given by its logical axes (in place)."""
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      spec = _fits(var.get_value().shape, logical_to_spec(layers.logical_axes(var), rules), mesh)
      var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
  return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a batch array: leading axis on 'data', the rest replicated."""
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))
