"""Shared Flax NNX layers whose parameters carry logical axis names.

Every parameter is an `nnx.Param` annotated with a tuple of *logical* axis names
(`'embed'`, `'mlp'`, `'heads'`, `'vocab'`, `'sparse'`, ...). `laspar_jax.mesh`
maps them to mesh axes by rules from the config. Parameters are created
unsharded (no eager sharding); `mesh.shard_model` places them afterwards, so a
module can be built the same way with or without a mesh.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax import mesh as mesh_lib

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
  """Makes an `nnx.Param` annotated with logical axis names (not sharded yet)."""
  axes = tuple(axes)
  if len(axes) != value.ndim:
    raise ValueError(f"axes {axes} do not match a parameter of shape {value.shape}")
  return nnx.Param(value, eager_sharding=False, out_sharding=axes)


logical_axes = mesh_lib.logical_axes  # re-exported: parameters' logical names


def normal_init(key: jax.Array, shape: Sequence[int], std: float,
                dtype: Any = jnp.float32) -> jax.Array:
  """Truncation-free normal init N(0, std^2)."""
  return std * jax.random.normal(key, shape, dtype)


class Dense(nnx.Module):
  """y = x W + b with W [in, out] annotated by `axes`.

  Attributes:
    kernel: [in, out] with logical axes `axes`.
    bias: [out] with logical axis `axes[1]` (if use_bias).
  """

  def __init__(self, in_features: int, out_features: int, *, axes: Axes = ("embed", "mlp"),
               use_bias: bool = True, std: float = 0.02, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.kernel = param(normal_init(rngs.params(), (in_features, out_features), std), axes)
    self.bias = param(jnp.zeros((out_features,)), (axes[1],)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # Inputs in the compute dtype, products accumulated and biased in fp32,
    # output cast back: bf16 x bf16 -> fp32 is the form XLA:CPU hands to
    # YNNPACK's AMX / AVX512-BF16 kernels (a bf16-output dot is upcast to an
    # fp32 dot instead), and what GPUs and TPUs accumulate in anyway.
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in fp32 whatever the input dtype."""

  def __init__(self, features: int, *, eps: float = 1e-12, axis_name: str | None = "embed"):
    self.scale = param(jnp.ones((features,)), (axis_name,))
    self.bias = param(jnp.zeros((features,)), (axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Embed(nnx.Module):
  """Embedding table [num, features] with logical axes (`vocab`, `embed`)."""

  def __init__(self, num: int, features: int, *, axes: Axes = ("vocab", "embed"),
               std: float = 0.02, rngs: nnx.Rngs):
    self.embedding = param(normal_init(rngs.params(), (num, features), std), axes)

  def __call__(self, ids: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


def dropout(x: jax.Array, rate: float, *, deterministic: bool,
            rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout; identity when deterministic or rate == 0."""
  if deterministic or rate == 0.0:
    return x
  if rngs is None:
    raise ValueError("dropout with deterministic=False needs rngs (pass rngs=nnx.Rngs(dropout=...))")
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
