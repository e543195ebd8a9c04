"""Shared Flax NNX layers whose parameters carry logical axis names.

Every parameter is an `nnx.Param` annotated with a tuple of *logical* axis names
(`'embed'`, `'mlp'`, `'heads'`, `'vocab'`, `'sparse'`, ...). `laspar_jax.mesh`
maps them to mesh axes by rules from the config. Parameters are created
unsharded (no eager sharding); `mesh.shard_model` places them afterwards, so a
module can be built the same way with or without a mesh.

A layer that casts parameters to its compute dtype at every use lists them in
`CAST_AT_USE` (Dense: `kernel`); `cast_once` casts those of a whole model once,
so a scanned or rematerialised stack does not convert them again per layer and
use (the layer's own cast is then a no-op).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def normal_init(key: jax.Array, shape: Sequence[int], std: float, dtype: Any = jnp.float32) -> jax.Array:
  """Truncation-free normal init N(0, std^2)."""
  return std * jax.random.normal(key, shape, dtype)


class Dense(nnx.Module):
  """y = x W + b with W [in, out] annotated by `axes`.

  Attributes:
    kernel: [in, out] with logical axes `axes`.
    bias: [out] with logical axis `axes[1]` (if use_bias).
  """

  CAST_AT_USE = ("kernel",)  # read only as `kernel.astype(dtype)` (`cast_once`)

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    axes: Axes = ("embed", "mlp"),
    use_bias: bool = True,
    std: float = 0.02,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.kernel = param(normal_init(rngs.params(), (in_features, out_features), std), axes)
    self.bias = param(jnp.zeros((out_features,)), (axes[1],)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """x W + b. `rngs` (a dropout stream, passed while training) is for adapters
    that wrap a Dense (`lora.LoRADense`); a plain Dense ignores it."""
    del rngs
    # Inputs in the compute dtype, products accumulated and biased in fp32,
    # output cast back: bf16 x bf16 -> fp32 is the form XLA:CPU hands to
    # YNNPACK's AMX / AVX512-BF16 kernels (a bf16-output dot is upcast to an
    # fp32 dot instead), and what GPUs and TPUs accumulate in anyway.
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(self.dtype)


def cast_once(module: nnx.Module) -> int:
  """Casts, in place, each parameter a layer reads only in its compute dtype (`CAST_AT_USE`) to that dtype.

  Layers whose `dtype` is float32 are left alone, as are norms, biases, embeddings
  and everything a layer also reads in float32. Values are those the layers
  computed anyway (a cast commutes with slicing a stacked layer); gradients flow
  through the cast to the float32 originals. Call it on a model merged inside a
  traced function (the train step), once per forward pass that should share the cast.

  Returns:
    The number of parameters cast.
  """
  n = 0
  for _, m in nnx.iter_modules(module):
    dtype = getattr(m, "dtype", None)
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
      continue
    for name in getattr(type(m), "CAST_AT_USE", ()):
      var = getattr(m, name, None)
      if isinstance(var, nnx.Variable) and var.get_value().dtype != jnp.dtype(dtype):
        var.set_value(var.get_value().astype(dtype))
        n += 1
  return n


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

  def __init__(self, num: int, features: int, *, axes: Axes = ("vocab", "embed"), std: float = 0.02, rngs: nnx.Rngs):
    self.embedding = param(normal_init(rngs.params(), (num, features), std), axes)

  def __call__(self, ids: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


def dropout(x: jax.Array, rate: float, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout; identity when deterministic or rate == 0."""
  if deterministic or rate == 0.0:
    return x
  if rngs is None:
    raise ValueError("dropout with deterministic=False needs rngs (pass rngs=nnx.Rngs(dropout=...))")
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm without mean or bias (Llama, T5).

  As Hugging Face's LlamaRMSNorm: the variance in fp32, x * rsqrt(var + eps),
  cast back to the input dtype, then multiplied by the weight (the result has
  the promoted dtype of weight and input; fp32 weights give fp32 for fp32
  inputs, and it is cast back to the input dtype here).
  """

  def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str | None = "embed"):
    self.scale = param(jnp.ones((features,)), (axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), -1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return (self.scale[...] * y.astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS = {
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5))),  # exact (erf)
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
# Hugging Face spellings of the same functions.
ACTIVATIONS.update(
  swish=ACTIVATIONS["silu"], gelu_new=ACTIVATIONS["gelu_tanh"], gelu_pytorch_tanh=ACTIVATIONS["gelu_tanh"]
)


def activation(name: str):
  """The activation function called `name` (HF spellings accepted); ValueError if unknown."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class MLP(nnx.Module):
  """out(act(in(x))): the plain two-layer FFN (OPT fc1/fc2, T5 v1.0 wi/wo).

  Submodules are named `names` = (in, out) so each family keeps its HF names.
  """

  def __init__(
    self,
    features: int,
    hidden: int,
    *,
    act: str = "relu",
    names: tuple[str, str] = ("fc1", "fc2"),
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.names = names
    self.act = act
    activation(act)
    setattr(self, names[0], Dense(features, hidden, axes=("embed", "mlp"), use_bias=use_bias, dtype=dtype, rngs=rngs))
    setattr(self, names[1], Dense(hidden, features, axes=("mlp", "embed"), use_bias=use_bias, dtype=dtype, rngs=rngs))

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    h = ACTIVATIONS[self.act](getattr(self, self.names[0])(x, rngs=rngs))
    return getattr(self, self.names[1])(h, rngs=rngs)


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)): SwiGLU or gated-GELU.

  act "silu": SwiGLU (Llama gate_proj/up_proj/down_proj); act "gelu_tanh":
  T5 v1.1 gated-GELU (wi_0/wi_1/wo). Submodules are named `names` = (gate, up, down); no biases by default.
  """

  def __init__(
    self,
    features: int,
    hidden: int,
    *,
    act: str = "silu",
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    use_bias: bool = False,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.names = names
    self.act = act
    activation(act)
    for name in names[:2]:
      setattr(self, name, Dense(features, hidden, axes=("embed", "mlp"), use_bias=use_bias, dtype=dtype, rngs=rngs))
    setattr(self, names[2], Dense(hidden, features, axes=("mlp", "embed"), use_bias=use_bias, dtype=dtype, rngs=rngs))

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    gate, up, down = (getattr(self, n) for n in self.names)
    return down(ACTIVATIONS[self.act](gate(x, rngs=rngs)) * up(x, rngs=rngs), rngs=rngs)


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None) -> np.ndarray:
  """Rotary inverse frequencies [head_dim // 2] (fp32), as Hugging Face computes them.

  Args:
    head_dim: rotated dimension per head.
    theta: `rope_theta` (the base).
    scaling: `rope_scaling` dict; None / type "default" leave the frequencies,
      type "llama3" applies Llama 3.1's smooth low/high-frequency adjustment
      (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
      type "linear" divides them by `factor`.

  Returns:
    float32 numpy array.
  """
  exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind == "default":
    return inv
  factor = np.float32(scaling["factor"])
  if kind == "linear":
    return (inv / factor).astype(np.float32)
  if kind != "llama3":
    raise ValueError(f"unsupported rope_scaling type {kind!r} (default, linear, llama3)")
  low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
  old = np.float32(scaling["original_max_position_embeddings"])
  wavelen = np.float32(2 * np.pi) / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, head_dim] (fp32) for integer positions, halves repeated as HF does."""
  freqs_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb_btd = jnp.concatenate([freqs_btf, freqs_btf], -1)
  return jnp.cos(emb_btd), jnp.sin(emb_btd)


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] over the last axis (HF's convention, not interleaved)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], -1)


def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
  """Rotates queries or keys [B, T, H, D] by position (in fp32, cast back to x's dtype)."""
  x32 = x_bthd.astype(jnp.float32)
  cos, sin = cos_btd[:, :, None], sin_btd[:, :, None]
  return (x32 * cos + rotate_half(x32) * sin).astype(x_bthd.dtype)


class LMHead(nnx.Module):
  """A decoder's LM head as a `backbone.VocabProjection`: logits = (scale * h) E^T, no bias.

  Tied (`tied` is the backbone's `Embed` module itself, so NNX keeps one shared
  parameter) or untied with its own `kernel` [d, V] (HF `lm_head.weight`
  transposed). `scale` is 1 except for T5 v1.0's tied head (d_model ** -0.5).
  """

  def __init__(self, features: int, vocab: int, *, tied: Embed | None = None, scale: float = 1.0, rngs: nnx.Rngs):
    self.tied = tied
    self.scale = scale
    self.kernel = (
      None if tied is not None else param(normal_init(rngs.params(), (features, vocab), 0.02), ("embed", "vocab"))
    )

  def transform(self, h_btd: jax.Array) -> jax.Array:
    """float32 h (times `scale`)."""
    h_btd = h_btd.astype(jnp.float32)
    return h_btd if self.scale == 1.0 else h_btd * self.scale

  def kernel_dv(self) -> jax.Array:
    """[d, V]: the untied kernel or the tied embedding table transposed."""
    return self.kernel[...] if self.kernel is not None else self.tied.embedding[...].T

  def bias_v(self) -> None:
    """No vocabulary bias."""
    return None

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """[B, T, V] float32 over the full vocabulary (tests and tiny configs only)."""
    return jnp.dot(self.transform(h_btd), self.kernel_dv().astype(jnp.float32), preferred_element_type=jnp.float32)


REMAT_POLICIES = ("full", "dots", "dots_all")
"""Names of `remat_policy` (encoder config `model.remat_policy`), what a rematerialized layer keeps for the backward:

  "full": nothing (every activation of the layer is recomputed; `jax.checkpoint`'s default, the
    behaviour before the field existed); least memory, most recomputation.
  "dots": the outputs of matmuls without batch dimensions (the q/k/v/o projections and the MLP;
    `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`); attention scores, norms and
    activations are recomputed.
  "dots_all": every matmul output, attention's batched q.k and p.v too (`dots_saveable`).
"""


def remat_policy(remat: bool | str) -> Callable[..., bool] | None:
  """The `jax.checkpoint` policy of a model's `remat` setting: False/True ("full") or a `REMAT_POLICIES` name.

  Raises:
    ValueError: an unknown policy name.
  """
  name = "full" if remat is True else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; known: {', '.join(REMAT_POLICIES)}")
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return jax.checkpoint_policies.dots_saveable if name == "dots_all" else None


def remat_setting(remat: bool, policy: str = "full") -> bool | str:
  """A model's `remat` argument from the encoder config's `remat` and `remat_policy` (False when off)."""
  remat_policy(policy)  # validates the name even when remat is off
  return policy if remat else False


def rematerialized(fn: Callable, remat: bool | str, *, nnx_transform: bool = True) -> Callable:
  """`fn` rematerialized in the backward pass under the policy of `remat` (`remat_policy`); `fn` when falsy.

  Every family applies its layers through this (loop: `nnx.remat` over a module argument; scan:
  `jax.checkpoint` of the scan body, `nnx_transform=False`). A dropout stream must go in as an
  argument (a remat trace may not mutate an `nnx.Rngs` it closes over).
  """
  if not remat:
    return fn
  policy = remat_policy(remat)
  return nnx.remat(fn, policy=policy) if nnx_transform else jax.checkpoint(fn, policy=policy)


@functools.partial(jax.jit, donate_argnums=0)
def _put_row(stacked: Any, row: Any, i: int) -> Any:
  """`stacked` with row i of every leaf set to `row`'s leaf, in place (the stack is donated)."""
  return jax.tree.map(lambda a, b: a.at[i].set(b), stacked, row)


class Stacked(nnx.Module):
  """`n` copies of a layer with stacked parameters (leading logical axis "layers"), run by `lax.scan`.

  The copies are built one after another, `make_layer(i)` for i = 0..n-1 (so
  they draw the same random numbers as an unstacked list would), each written
  into the stack in place and dropped before the next is built;
  every copy must have the same structure. One compiled layer body serves
  every layer (deep stacks compile in the time of one layer). The parameters
  live once, under `layer`, with a leading axis of size n: a checkpoint name
  map addresses layer i's tensor as row i of `(..., "layer", ...)` and the
  loader stacks the rows (no views, no module state of loading).
  """

  def __init__(self, make_layer: Callable[[int], nnx.Module], n: int):
    first = make_layer(0)
    graphdef, state = nnx.split(first)
    stacked = jax.tree.map(lambda x: jnp.zeros((n,) + x.shape, x.dtype), state)
    stacked = _put_row(stacked, state, 0)
    del first, state
    for i in range(1, n):  # one copy alive at a time: the build peaks at the stack plus one layer, not twice the stack
      stacked = _put_row(stacked, nnx.state(make_layer(i)), i)
    self.layer = nnx.merge(graphdef, stacked)
    for _, var in nnx.iter_graph(self.layer):
      if isinstance(var, nnx.Variable):
        axes = logical_axes(var)
        if axes is not None:
          var.set_metadata("out_sharding", ("layers",) + tuple(axes))
    self.num_layers = n

  def __len__(self) -> int:
    return self.num_layers

  def __call__(
    self, h: jax.Array, *args, remat: bool | str = False, rngs: nnx.Rngs | None = None, **kwargs
  ) -> jax.Array:
    """Runs the layers in order: h = layer_i(h, *args, rngs=r_i, **kwargs).

    Args:
      h: the carried hidden states.
      *args, **kwargs: the same for every layer (closed over).
      remat: False, or a `rematerialized` setting (True / a `REMAT_POLICIES` name) for the scan body.
      rngs: a dropout stream (training) or None: one key is drawn from `rngs.dropout()` and split
        per layer, and layer i gets `nnx.Rngs(dropout=key_i)` (so dropout masks are not those of
        an unscanned loop, which draws from one stream in turn; deterministic results are).
    """
    graphdef, state = nnx.split(self.layer)
    keys = None if rngs is None else jax.random.split(rngs.dropout(), self.num_layers)

    def body(h, xs):
      layer_state, key = xs
      r = None if key is None else nnx.Rngs(dropout=key)
      return nnx.merge(graphdef, layer_state)(h, *args, rngs=r, **kwargs), None

    h, _ = jax.lax.scan(rematerialized(body, remat, nnx_transform=False), h, (state, keys))
    return h
