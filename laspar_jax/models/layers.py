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


_BOUND_SLACK = 60.0  # e^60 ~ 1.1e26: headroom below the fp32 / bf16 max (3.4e38)
_MIN_SUM = 1e-25  # smallest row sum of exponentials "bound" accepts (else: "max")


def dot_product_attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
                          mask_bs: jax.Array | None, *, offset: str = "bound") -> jax.Array:
  """Softmax attention over keys; padding keys (mask 0) get no weight.

  Works in the heads-major layout [B, H, T, D] (about 2x faster on XLA:CPU
  than contracting in [B, T, H, D]) and normalizes after the value product
  (divides [B, H, T, D], not [B, H, T, S]).

  `offset` is what is subtracted from the logits before `exp` (softmax is
  invariant to it; it only guards overflow):
    "max":   the row max over keys, as usual (one reduction over [B, H, T, S]).
    "bound": the Cauchy-Schwarz bound |q_t| * max_s |k_s| >= every logit of the
             row, minus `_BOUND_SLACK` (60), from [B, H, T] and [B, H, S] norms
             only: no reduction over the largest tensor. Against "max" on
             XLA:CPU (batch 32, 12 heads, interleaved): fp32 0.95x at L = 128,
             1.08x at L = 256; bf16 1.16x at L = 128. Exponentials stay <= e^60 (sums of 10^4
             keys times values of 10^8 still fit fp32 and bf16); if a row's
             bound is so loose that its sum falls below 1e-25 (a logit gap
             over ~117), the whole call falls back to "max" under `lax.cond`.
             all-MiniLM-L6-v2 peaks at a gap of 59 on SciFact texts (layer 0)
             and 106.5 on texts padded with "." to 128 tokens. Above 1e-25,
             the terms flushed to zero (< 1.2e-38 each, 8192 keys) change the
             sum by < 1e-9 relative.
  Logits and exponentials are fp32.
  """
  d = q_bthd.shape[-1]
  q_bhtd, v_bhsd = (x.transpose(0, 2, 1, 3) for x in (q_bthd, v_bshd))
  # Keys go [B, H, D, S] so both products contract a row-major right operand:
  # the form XLA:CPU's YNNPACK dots accept (they reject a transposed one).
  k_bhds = k_bshd.transpose(0, 2, 3, 1)
  q_bhtd = q_bhtd * jnp.asarray(1.0 / float(d) ** 0.5, q_bhtd.dtype)
  logits_bhts = jnp.einsum("bhtd,bhds->bhts", q_bhtd, k_bhds, preferred_element_type=jnp.float32)
  keep_b11s = None if mask_bs is None else (mask_bs > 0)[:, None, None, :]
  # On CPU the value product also sums the weights (a column of ones, no extra
  # pass); on accelerators a head size of D + 1 would break MXU/tensor-core
  # tiling, so the sum is a fused reduction there.
  sum_in_product = jax.default_backend() == "cpu"
  if sum_in_product:
    v_bhsd = jnp.concatenate([v_bhsd, jnp.ones(v_bhsd.shape[:-1] + (1,), v_bhsd.dtype)], -1)

  def attend(offset_bht1):
    """[B, H, T, D + 1]: weighted values, then the weights' sum."""
    e_bhts = jnp.exp(logits_bhts - jax.lax.stop_gradient(offset_bht1))
    if keep_b11s is not None:
      e_bhts = jnp.where(keep_b11s, e_bhts, 0.0)
    o_bhtd = jnp.einsum("bhts,bhsd->bhtd", e_bhts.astype(v_bhsd.dtype), v_bhsd,
                        preferred_element_type=jnp.float32)
    if sum_in_product:
      return o_bhtd
    return jnp.concatenate([o_bhtd, e_bhts.sum(-1, keepdims=True)], -1)

  def row_max():
    masked = logits_bhts if keep_b11s is None else jnp.where(keep_b11s, logits_bhts, -jnp.inf)
    return attend(masked.max(-1, keepdims=True))

  if offset == "max":
    o_bhtd = row_max()
  elif offset == "bound":
    q32_bhtd, k32_bhds = q_bhtd.astype(jnp.float32), k_bhds.astype(jnp.float32)
    k_norm_bh11 = jnp.sqrt(jnp.max(jnp.sum(k32_bhds * k32_bhds, -2), -1))[..., None, None]
    bound_bht1 = jnp.sqrt(jnp.sum(q32_bhtd * q32_bhtd, -1, keepdims=True)) * k_norm_bh11
    o_bhtd = attend(bound_bht1 - _BOUND_SLACK)
    if keep_b11s is None:
      ok = jnp.all(o_bhtd[..., -1] >= _MIN_SUM)
    else:  # rows of all-padding sequences sum to 0 with any offset
      ok = jnp.all((o_bhtd[..., -1] >= _MIN_SUM) | ~jnp.any(keep_b11s, -1))
    o_bhtd = jax.lax.cond(ok, lambda: o_bhtd, row_max)
  else:
    raise ValueError(f"offset must be 'max' or 'bound', got {offset!r}")
  # Divide by the sum s through a constant 1/s (no gradient): d(o/s)/ds is
  # -o/s^2, and s^2 leaves the fp32 range for s up to S * e^60 or down to
  # 1e-25; (o r) / (s r) has the same value and keeps every factor in range.
  sum_bht1 = jnp.maximum(o_bhtd[..., -1:], 1e-30)
  r_bht1 = jax.lax.stop_gradient(1.0 / sum_bht1)
  out_bhtd = (o_bhtd[..., :-1] * r_bht1) / (sum_bht1 * r_bht1)
  return out_bhtd.astype(v_bshd.dtype).transpose(0, 2, 1, 3)
