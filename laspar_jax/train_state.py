"""TrainState: everything a train step changes, placed on the mesh.

Parameters are sharded by their logical axes (`laspar_jax.mesh`); every
optimizer-state array that mirrors a parameter (Adam's moments) takes that
parameter's sharding, found by its key path (the trailing dict keys of an
optimizer-state leaf are the parameter's path, whatever the nesting of
`multi_transform`/`masked`/`chain` states above it); counts and other
scalars are replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from laspar_jax import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step changes (a pytree; checkpointed whole).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the encoder's nnx.Param values as a pure nested dict.
    opt_state: the optax state.
    rng: uint32 [2] raw key data; the step's key is fold_in(rng, step).
    bad_step: int32 scalar, the first step whose loss or gradient was not
      finite, -1 while none was.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  bad_step: jax.Array

  def to_tree(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_tree(cls, tree: Mapping[str, Any]) -> "TrainState":
    return cls(**tree)


def encoder_params(encoder: nnx.Module) -> Any:
  """The encoder's nnx.Param values as a pure nested dict (what TrainState.params holds)."""
  return nnx.to_pure_dict(nnx.state(encoder, nnx.Param))


def _dict_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
  """The trailing run of dict keys of a key path (a parameter's path inside an optimizer state)."""
  out: list[Any] = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    out.append(k.key)
  return tuple(reversed(out))


def state_shardings(
  encoder: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES
) -> TrainState:
  """A TrainState of NamedShardings: params by logical axes, Adam moments like their params.

  Args:
    encoder: the sparse encoder (concrete or abstract).
    tx: the optimizer.
    mesh: the device mesh.
    rules: logical-axis rules (`mesh.rules_from_config(config)`).

  Returns:
    A TrainState whose leaves are NamedShardings.
  """
  sh_all = mesh_lib.state_shardings(encoder, mesh, rules)
  sh_params = nnx.to_pure_dict(nnx.split_state(sh_all, nnx.Param, ...)[0])
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), encoder_params(encoder))
  by_path = {
    tuple(k.key for k in path): (sh, shapes_leaf)
    for (path, sh), shapes_leaf in zip(jax.tree_util.tree_flatten_with_path(sh_params)[0], jax.tree.leaves(shapes))
  }
  replicated = NamedSharding(mesh, P())

  def opt_sharding(path, leaf):
    hit = by_path.get(_dict_path(path))
    if hit is not None and hit[1].shape == leaf.shape:
      return hit[0]
    return replicated

  sh_opt = jax.tree_util.tree_map_with_path(opt_sharding, jax.eval_shape(tx.init, shapes))
  return TrainState(step=replicated, params=sh_params, opt_state=sh_opt, rng=replicated, bad_step=replicated)


def create_train_state(
  encoder: nnx.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  seed: int = 0,
  rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES,
  rng_impl: str = "threefry2x32",
) -> tuple[nnx.GraphDef, Any, TrainState, TrainState]:
  """Places the encoder on the mesh and builds the initial TrainState.

  Args:
    encoder: the (concrete) sparse encoder; its parameters are moved in place.
    tx: the optimizer.
    mesh: the ('data', 'model') mesh.
    seed: RNG seed (dropout).
    rules: logical axis rules.
    rng_impl: PRNG implementation of the dropout key ("threefry2x32": the
      same bits whatever the sharding; "rbg"/"unsafe_rbg": much faster to
      compile and run on CPU, bits depend on the sharding).

  Returns:
    (graphdef, rest, state, shardings): `rest` holds the encoder's non-Param
    variables (constant during training); `shardings` is a TrainState of
    NamedShardings.
  """
  shardings = state_shardings(encoder, tx, mesh, rules)
  mesh_lib.shard_model(encoder, mesh, rules)
  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  rep = NamedSharding(mesh, P())
  state = TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), rep),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(jax.random.key_data(jax.random.key(seed, impl=rng_impl)), rep),
    bad_step=jax.device_put(jnp.full((), -1, jnp.int32), rep),
  )
  return graphdef, rest, state, shardings


def abstract_train_state(
  encoder: nnx.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES,
  rng_impl: str = "threefry2x32",
) -> tuple[nnx.GraphDef, Any, TrainState, TrainState]:
  """Like `create_train_state` with ShapeDtypeStruct leaves (nothing allocated).

  For an abstract encoder (`build_encoder(cfg, weights=False)`): lowering and
  compiling the step against it shows that a model builds and fits a mesh
  (`.lower(...).compile().memory_analysis()`) without the memory to run it.
  """
  shardings = state_shardings(encoder, tx, mesh, rules)
  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params = jax.tree.map(sds, params, shardings.params)
  opt_state = jax.tree.map(sds, jax.eval_shape(tx.init, params), shardings.opt_state)
  key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=rng_impl)))
  state = TrainState(
    step=sds(jax.ShapeDtypeStruct((), jnp.int32), shardings.step),
    params=params,
    opt_state=opt_state,
    rng=sds(key, shardings.rng),
    bad_step=sds(jax.ShapeDtypeStruct((), jnp.int32), shardings.bad_step),
  )
  return graphdef, rest, state, shardings
