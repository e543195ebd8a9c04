"""Sparse heads: hidden states h_btd (mask m_bt) -> representation rep_bv.

Heads (all NNX modules called as `head(h_btd, mask_bt, *, topk=None) -> rep_bv`,
float32 output):

- `LatentAttentionHead` (LASPAR default): pool tokens with learned weights a_t,
  then s = log1p(relu(pool(h) U + b)), clamp, L2 normalize.
- `LatentSumHead`: sum_t (h_t U + b) over unmasked tokens computed as ONE
  projection of the summed hidden state (linear before the nonlinearity), then
  log1p relu, clamp, L2 normalize.
- `LatentMaxHead`: s_j = max_t log1p(relu(h_t U_j + b_j)) over unmasked tokens,
  tiled over D (and optionally L) with rematerialization: never B x L x D.
- `MLMHead` (SPLADE): log1p(relu(MLM logits)), max or sum pooled over unmasked
  tokens, special tokens zeroed; tiled over the vocabulary the same way.
- `DenseHead`: mean-pooled (or CLS) h, L2-normalized; no sparsity (ablation).

`make_head(name, ...)` builds one by name through the plain dict `HEADS`.

U [d, D] carries the logical axes ("embed", "sparse") and b [D] ("sparse",), so
`mesh.shard_model` puts the D axis on the mesh 'model' axis.

D tiles are *strided*: tile k holds columns {k, k + n, k + 2n, ...} (n tiles).
The reshape [d, D] -> [d, tile, n] is free (no copy of U; a
scan step slices tile k from the last axis and its backward writes the tile's
gradient in place), and with U sharded in contiguous blocks on D the shard
boundaries fall on the `tile` axis, so every step works on each device's share
at once (no gather of U).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.core.spmd
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from laspar_jax import mesh as mesh_lib
from laspar_jax.models import layers

_NEG = -1e30  # pre-activation for masked tokens / padded columns (relu -> 0)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical axis names, only inside a mesh context.

  Outside `jax.set_mesh(...)` this is the identity. Rules come from flax's
  logical-axis-rules context when set, else `mesh.DEFAULT_RULES`. Mesh axes that
  do not divide their dimension are dropped (replicated).

  Args:
    x: array to constrain.
    axes: one logical name (or None) per dimension of x.

  Returns:
    x, with a sharding constraint when a mesh is set.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  rules = flax.core.spmd.get_logical_axis_rules() or mesh_lib.DEFAULT_RULES
  spec = mesh_lib.logical_to_spec(axes, rules)
  fitted = []
  for dim, ax in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
    ok = ax is not None and ax in mesh.axis_names and dim % mesh.shape[ax] == 0
    fitted.append(ax if ok else None)
  return jax.lax.with_sharding_constraint(x, P(*fitted))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal_rows(key: jax.Array, d: int, D: int, std: float) -> jax.Array:
  # One row of D at a time: peak = the [d, D] output + a few rows of temporaries
  # (jax.random.normal on the whole [d, D] peaks at about 4x the kernel).
  row = lambda i: std * jax.random.normal(jax.random.fold_in(key, i), (D,), jnp.float32)
  return jax.lax.map(row, jnp.arange(d))


def init_projection(key: jax.Array, d: int, D: int, std: float | None = None) -> jax.Array:
  """N(0, std^2) kernel [d, D] generated row by row (cheap peak memory).

  Args:
    key: PRNG key.
    d: input width.
    D: output (latent) width.
    std: standard deviation; default 1/sqrt(d).

  Returns:
    float32 [d, D].
  """
  std = 1.0 / math.sqrt(d) if std is None else float(std)
  return _normal_rows(key, d, D, std)


def log_relu(z: jax.Array) -> jax.Array:
  """log1p(relu(z))."""
  return jnp.log1p(jax.nn.relu(z))


def l2_normalize(x_bv: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Row-wise x / max(||x||, eps)."""
  n = jnp.sqrt(jnp.sum(jnp.square(x_bv), axis=-1, keepdims=True))
  return x_bv / jnp.maximum(n, eps)


def masked_softmax(logits_bt: jax.Array, mask_bt: jax.Array | None) -> jax.Array:
  """Softmax over t restricted to mask_bt != 0 (all positions when mask is None).

  A row with no unmasked token gets all-zero weights.
  """
  logits_bt = logits_bt.astype(jnp.float32)
  if mask_bt is None:
    return jax.nn.softmax(logits_bt, axis=-1)
  m = mask_bt.astype(bool)
  z = jnp.where(m, logits_bt, _NEG)
  z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  e = jnp.where(m, jnp.exp(z), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


def topk_indices(rep_bv: jax.Array, k: int) -> jax.Array:
  """Indices [B, k] (int32) of the k largest entries per row, on stop-gradient scores."""
  return jax.lax.top_k(jax.lax.stop_gradient(rep_bv), k)[1].astype(jnp.int32)


def scatter_rows(val_bk: jax.Array, idx_bk: jax.Array, D: int) -> jax.Array:
  """Dense [B, D] with val_bk at idx_bk, zeros elsewhere (gradient flows to val_bk)."""
  B = val_bk.shape[0]
  rows = jnp.arange(B)[:, None]
  return jnp.zeros((B, D), val_bk.dtype).at[rows, idx_bk].set(val_bk)


def topk_mask(rep_bv: jax.Array, k: int) -> jax.Array:
  """Keeps each row's k largest entries (chosen on stop-gradient scores), zeros the rest.

  Args:
    rep_bv: [B, V].
    k: entries kept per row (k >= V keeps everything).

  Returns:
    [B, V], same dtype; gradients flow to the kept entries only.
  """
  if k is None or k >= rep_bv.shape[-1]:
    return rep_bv
  idx_bk = topk_indices(rep_bv, k)
  keep = scatter_rows(jnp.ones(idx_bk.shape, rep_bv.dtype), idx_bk, rep_bv.shape[-1])
  return rep_bv * keep


# ---------------------------------------------------------------------------
# Token-level pooling of log1p(relu(h W + b)), tiled over the output width
# ---------------------------------------------------------------------------


def _pool_block(h_btd, mask_bt, k_dv, b_v, reduce, token_chunk, dtype):
  """reduce_t over unmasked t of log1p(relu(h_t k + b)) for one column block: [B, v].

  For reduce="max" returns the max of the *pre-activation* (log1p relu is
  monotone; apply `log_relu` afterwards). For "sum" returns the activation sum.
  """
  B, L, _ = h_btd.shape
  m_bt = mask_bt.astype(bool)

  def chunk(h_bcd, m_bc):
    z = jnp.einsum("bcd,dv->bcv", h_bcd.astype(dtype), k_dv.astype(dtype),
                   preferred_element_type=jnp.float32) + b_v.astype(jnp.float32)
    if reduce == "max":
      return jnp.max(jnp.where(m_bc[..., None], z, _NEG), axis=1)
    return jnp.sum(jnp.where(m_bc[..., None], log_relu(z), 0.0), axis=1)

  if token_chunk is None or token_chunk >= L:
    return chunk(h_btd, m_bt)
  nc = -(-L // token_chunk)
  pad = nc * token_chunk - L
  h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
  m = jnp.pad(m_bt, ((0, 0), (0, pad)))
  h_cbtd = h.reshape(B, nc, token_chunk, -1).transpose(1, 0, 2, 3)
  m_cbt = m.reshape(B, nc, token_chunk).transpose(1, 0, 2)
  init = jnp.full((B, k_dv.shape[1]), _NEG if reduce == "max" else 0.0, jnp.float32)

  def step(acc, xs):
    r = chunk(*xs)
    return (jnp.maximum(acc, r) if reduce == "max" else acc + r), None

  acc, _ = jax.lax.scan(step, init, (h_cbtd, m_cbt))
  return acc


# ---------------------------------------------------------------------------
# Max pooling with an argmax backward (no rematerialization)
# ---------------------------------------------------------------------------


def _tile_max_argmax(h_btd, mask_bt, k_dtn, b_tn, dtype):
  """Per strided tile: masked max over t of the pre-activation and its argmax."""
  m = mask_bt.astype(bool)[..., None]

  def one(k):
    k_dt = jax.lax.dynamic_index_in_dim(k_dtn, k, axis=2, keepdims=False)
    b_t = jax.lax.dynamic_index_in_dim(b_tn, k, axis=1, keepdims=False)
    z = jnp.einsum("btd,dv->btv", h_btd.astype(dtype), k_dt.astype(dtype),
                   preferred_element_type=jnp.float32) + b_t.astype(jnp.float32)
    z = jnp.where(m, z, _NEG)
    return jnp.max(z, axis=1), jnp.argmax(z, axis=1).astype(jnp.int32)

  return jax.lax.map(one, jnp.arange(k_dtn.shape[2]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tiled_max_argmax(h_btd, mask_bt, k_dtn, b_tn, dtype):
  return _tile_max_argmax(h_btd, mask_bt, k_dtn, b_tn, dtype)[0]


def _tiled_max_fwd(h_btd, mask_bt, k_dtn, b_tn, dtype):
  m_nbt, a_nbt = _tile_max_argmax(h_btd, mask_bt, k_dtn, b_tn, dtype)
  return m_nbt, (h_btd, mask_bt, k_dtn, b_tn, a_nbt)


def _tiled_max_bwd(dtype, res, g_nbt):
  # d max_t z_tj = one-hot at the argmax: dU_j = sum_b g_bj h[b, a_bj] (a gather),
  # dh[b, t] = sum_j [a_bj = t] g_bj U_j (a one-hot matmul per tile), db_j = sum_b g_bj.
  h_btd, mask_bt, k_dtn, b_tn, a_nbt = res
  B, L, d = h_btd.shape
  has_b = jnp.any(mask_bt.astype(bool), axis=1)
  g_nbt = jnp.where(has_b[None, :, None], g_nbt, 0.0)
  h32 = h_btd.astype(jnp.float32)

  def step(carry, xs):
    dh_bld, dk_dtn = carry
    k, g_bt, a_bt = xs
    k_dt = jax.lax.dynamic_index_in_dim(k_dtn, k, axis=2, keepdims=False)
    hg_btd = jnp.take_along_axis(h32, a_bt[..., None], axis=1)
    dk_dt = jnp.einsum("bt,btd->dt", g_bt, hg_btd)
    dk_dtn = jax.lax.dynamic_update_index_in_dim(dk_dtn, dk_dt.astype(dk_dtn.dtype), k, axis=2)
    oh_blt = jnp.where(a_bt[:, None, :] == jnp.arange(L)[None, :, None], g_bt[:, None, :], 0.0)
    dh_bld = dh_bld + jnp.einsum("blt,dt->bld", oh_blt.astype(dtype), k_dt.astype(dtype),
                                 preferred_element_type=jnp.float32)
    return (dh_bld, dk_dtn), None

  init = (jnp.zeros((B, L, d), jnp.float32), jnp.zeros_like(k_dtn))
  n = k_dtn.shape[2]
  (dh_bld, dk_dtn), _ = jax.lax.scan(step, init, (jnp.arange(n), g_nbt, a_nbt))
  db_tn = jnp.sum(g_nbt, axis=1).T.astype(b_tn.dtype)
  return dh_bld.astype(h_btd.dtype), None, dk_dtn, db_tn


_tiled_max_argmax.defvjp(_tiled_max_fwd, _tiled_max_bwd)


def token_pool(h_btd: jax.Array, mask_bt: jax.Array, kernel_dv: jax.Array,
               bias_v: jax.Array, *, reduce: str = "max", tile: int | None = None,
               token_chunk: int | None = None, remat: bool = True,
               backward: str = "remat", dtype: Any = jnp.float32) -> jax.Array:
  """s_bv = reduce_t log1p(relu(h_t W + b)) over unmasked tokens, never B x L x V.

  With `tile`, the V columns are processed in strided tiles of width `tile`
  (lax.map over tile indices; each tile rematerialized in the backward pass), so the
  peak activation memory is O(B*V + B*L*tile) (O(B*V + B*token_chunk*tile) with
  `token_chunk`, which scans over L with a running max/sum). tile=None is the
  untiled path (materializes [B, L, V]; for tests and small V).

  Args:
    h_btd: hidden states [B, L, d].
    mask_bt: [B, L], nonzero for real tokens.
    kernel_dv: [d, V].
    bias_v: [V].
    reduce: "max" or "sum".
    tile: columns per tile (V is padded up to a multiple of it); None: untiled.
    token_chunk: tokens per step of an inner scan over L; None: all at once.
    remat: rematerialize each tile in the backward pass (keep True when tiled).
    backward: for reduce="max" with tiles: "remat" (autodiff of the max,
      recomputing each tile: ~4 matmul passes per step) or "argmax" (custom VJP
      that keeps the argmax token per column, int32 [B, V], and computes dU by
      a gather and dh by a one-hot matmul: ~2 passes). Same gradients except
      on exact ties (then "remat" splits, "argmax" picks the first token).
      With token_chunk, "argmax" falls back to "remat".
    dtype: compute dtype of the matmul (accumulation in float32).

  Returns:
    float32 [B, V]: log1p(relu(.)) pooled; rows without tokens are 0.
  """
  if reduce not in ("max", "sum"):
    raise ValueError(f"reduce must be 'max' or 'sum', got {reduce!r}")
  d, V = kernel_dv.shape
  B = h_btd.shape[0]
  finish = (lambda r: log_relu(r)) if reduce == "max" else (lambda r: r)
  if tile is None or tile >= V:
    return finish(_pool_block(h_btd, mask_bt, kernel_dv, bias_v, reduce, token_chunk, dtype))

  n = -(-V // tile)
  Vp = n * tile
  if Vp != V:
    kernel_dv = jnp.pad(kernel_dv, ((0, 0), (0, Vp - V)))
    bias_v = jnp.pad(bias_v.astype(jnp.float32), (0, Vp - V), constant_values=_NEG)
  # Strided tiles: column j = t * n + k lives in tile k at position t. The
  # reshape is free (no copy of the kernel); each step slices its tile from the
  # last axis, and the backward pass writes the tile's gradient in place.
  k_dtn = constrain(kernel_dv.reshape(d, tile, n), ("embed", "sparse", None))
  b_tn = bias_v.reshape(tile, n)

  def one(k):
    k_dt = jax.lax.dynamic_index_in_dim(k_dtn, k, axis=2, keepdims=False)
    b_t = jax.lax.dynamic_index_in_dim(b_tn, k, axis=1, keepdims=False)
    return _pool_block(h_btd, mask_bt, k_dt, b_t, reduce, token_chunk, dtype)

  if reduce == "max" and backward == "argmax" and token_chunk is None:
    r_nbt = _tiled_max_argmax(h_btd, mask_bt, k_dtn, b_tn, dtype)
  elif backward in ("remat", "argmax"):
    if remat:
      one = jax.checkpoint(one)
    r_nbt = jax.lax.map(one, jnp.arange(n))
  else:
    raise ValueError(f"backward must be 'remat' or 'argmax', got {backward!r}")
  r_bv = r_nbt.transpose(1, 2, 0).reshape(B, Vp)[:, :V]
  return finish(constrain(r_bv, ("batch", "sparse")))


def token_pool_at(h_btd: jax.Array, mask_bt: jax.Array, kernel_dv: jax.Array,
                  bias_v: jax.Array, idx_bk: jax.Array, *, reduce: str = "max",
                  dtype: Any = jnp.float32) -> jax.Array:
  """`token_pool` evaluated only at columns idx_bk (per row): [B, k], O(B*L*k) memory."""
  k_dbk = jnp.take(kernel_dv, idx_bk, axis=1)
  b_bk = jnp.take(bias_v, idx_bk).astype(jnp.float32)
  z_blk = jnp.einsum("bld,dbk->blk", h_btd.astype(dtype), k_dbk.astype(dtype),
                     preferred_element_type=jnp.float32) + b_bk[:, None, :]
  m = mask_bt.astype(bool)[..., None]
  if reduce == "max":
    return log_relu(jnp.max(jnp.where(m, z_blk, _NEG), axis=1))
  return jnp.sum(jnp.where(m, log_relu(z_blk), 0.0), axis=1)


# ---------------------------------------------------------------------------
# Latent heads
# ---------------------------------------------------------------------------


class _LatentHead(nnx.Module):
  """Shared U [d, D], b [D], clamp, normalization and top-k logic."""

  def __init__(self, d: int, D: int, *, rngs: nnx.Rngs, bias_init: float = 3.0,
               clamp: float | None = 10.0, normalize: bool = True,
               kernel_std: float | None = None, dtype: Any = jnp.float32):
    self.d, self.D = d, D
    self.kernel = layers.param(init_projection(rngs.params(), d, D, kernel_std), ("embed", "sparse"))
    self.bias = layers.param(jnp.full((D,), bias_init, jnp.float32), ("sparse",))
    self.clamp = clamp
    self.normalize = normalize
    self.dtype = dtype

  # Subclasses define the activations at all D columns and at gathered columns.
  def scores(self, h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    raise NotImplementedError

  def scores_at(self, h_btd: jax.Array, mask_bt: jax.Array, idx_bk: jax.Array) -> jax.Array:
    raise NotImplementedError

  def _clamp(self, s):
    return s if self.clamp is None else jnp.minimum(s, self.clamp)

  def __call__(self, h_btd: jax.Array, mask_bt: jax.Array, *, topk: int | None = None,
               topk_mode: str = "gather") -> jax.Array:
    """rep_bv (float32 [B, D]).

    Args:
      h_btd: backbone hidden states [B, L, d].
      mask_bt: [B, L] attention mask.
      topk: keep each row's top-k activations (before normalization, which then
        runs over the kept entries only). None: keep all.
      topk_mode: "gather": choose indices on stop-gradient scores and recompute
        the kept values from gathered columns U[:, idx_bk] (the backward pass
        touches only k columns per row); "mask": mask the dense activations.
        Both give the same values and gradients.
    """
    if topk is None or topk >= self.D:
      s = self._clamp(self.scores(h_btd, mask_bt))
    elif topk_mode == "mask":
      s = topk_mask(self._clamp(self.scores(h_btd, mask_bt)), topk)
    elif topk_mode == "gather":
      idx_bk = topk_indices(self._clamp(self.scores(h_btd, mask_bt)), topk)
      s_bk = self._clamp(self.scores_at(h_btd, mask_bt, idx_bk))
      s = scatter_rows(s_bk, idx_bk, self.D)
    else:
      raise ValueError(f"topk_mode must be 'gather' or 'mask', got {topk_mode!r}")
    s = constrain(s.astype(jnp.float32), ("batch", "sparse"))
    return l2_normalize(s) if self.normalize else s


class _PooledLatentHead(_LatentHead):
  """Heads that pool h first and project once: z = x_bd U + c_b b."""

  def pooled(self, h_btd: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_bd, c_b): pooled hidden state and the bias multiplier."""
    raise NotImplementedError

  def scores(self, h_btd, mask_bt):
    x_bd, c_b = self.pooled(h_btd, mask_bt)
    z = jnp.dot(x_bd.astype(self.dtype), self.kernel[...].astype(self.dtype),
                preferred_element_type=jnp.float32)
    z = constrain(z, ("batch", "sparse")) + c_b[:, None] * self.bias[...]
    return log_relu(z)

  def scores_at(self, h_btd, mask_bt, idx_bk):
    x_bd, c_b = self.pooled(h_btd, mask_bt)
    k_dbk = jnp.take(self.kernel[...], idx_bk, axis=1)
    z = jnp.einsum("bd,dbk->bk", x_bd.astype(self.dtype), k_dbk.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return log_relu(z + c_b[:, None] * jnp.take(self.bias[...], idx_bk))


class LatentAttentionHead(_PooledLatentHead):
  """LASPAR head: s = normalize(clamp(log1p(relu(sum_t a_t h_t U + b)))).

  Pooling weights a_t (all start as mean pooling: zero logits):
    "position": one learned logit per position, softmax over ALL positions
      (padding included: the original LASPAR behaviour, kept as an option);
    "mask" (default): per-position logits, softmax over unmasked tokens;
    "content": logits h_t . v with a learned vector v, softmax over unmasked.

  Initialization of U: N(0, kernel_std^2) with kernel_std = 1/sqrt(d) by
  default, so x U_j ~ N(0, ||x||^2 / d): its scale is the RMS of the pooled
  hidden state's coordinates. With b = 3, s_j = log(4 + x U_j) (for x U_j > -3):
  when x U_j is much smaller than 3 every dim sits at log 4 and all documents
  look alike (dense, uninformative); when it is comparable to 3 the
  representation varies with the input and a share of the dims is already 0.
  Pass a larger kernel_std for backbones whose pooled states are small (e.g.
  MiniLM's mean-pooled states have an RMS well below 1).
  """

  def __init__(self, d: int, D: int, *, pooling: str = "mask", max_len: int = 512,
               rngs: nnx.Rngs, bias_init: float = 3.0, clamp: float | None = 10.0,
               normalize: bool = True, kernel_std: float | None = None,
               dtype: Any = jnp.float32):
    super().__init__(d, D, rngs=rngs, bias_init=bias_init, clamp=clamp, normalize=normalize,
                     kernel_std=kernel_std, dtype=dtype)
    if pooling not in ("mask", "position", "content"):
      raise ValueError(f"pooling must be 'mask', 'position' or 'content', got {pooling!r}")
    self.pooling = pooling
    self.max_len = max_len
    if pooling == "content":
      self.score_vec = layers.param(jnp.zeros((d,), jnp.float32), ("embed",))
    else:
      self.pos_logits = layers.param(jnp.zeros((max_len,), jnp.float32), ("length",))

  def weights(self, h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Pooling weights a_bt (rows sum to 1, or 0 when a row has no token)."""
    L = h_btd.shape[1]
    if self.pooling == "content":
      logits = jnp.einsum("btd,d->bt", h_btd.astype(jnp.float32), self.score_vec[...])
      return masked_softmax(logits, mask_bt)
    if L > self.max_len:
      raise ValueError(f"sequence length {L} > max_len {self.max_len}")
    logits = jnp.broadcast_to(self.pos_logits[...][:L], h_btd.shape[:2])
    return masked_softmax(logits, None if self.pooling == "position" else mask_bt)

  def pooled(self, h_btd, mask_bt):
    a_bt = self.weights(h_btd, mask_bt)
    x_bd = jnp.einsum("bt,btd->bd", a_bt, h_btd.astype(jnp.float32))
    return x_bd, jnp.ones((h_btd.shape[0],), jnp.float32)


class LatentSumHead(_PooledLatentHead):
  """sum_t (h_t U + b) over unmasked tokens = (sum_t h_t) U + n_tokens * b, one projection.

  Then log1p relu, clamp, L2 normalize. Equal to projecting every token and
  summing (the original "token-level upscaling followed by addition"), without
  the [B, L, D] tensor.
  """

  def pooled(self, h_btd, mask_bt):
    m = mask_bt.astype(jnp.float32)
    return jnp.einsum("bt,btd->bd", m, h_btd.astype(jnp.float32)), jnp.sum(m, axis=1)


class LatentMaxHead(_LatentHead):
  """s_j = max over unmasked t of log1p(relu(h_t U_j + b_j)); clamp; L2 normalize.

  Computed as log1p(relu(max_t (h_t U_j + b_j))) in strided D tiles of width
  `tile` (lax.map + jax.checkpoint), optionally scanning L in chunks of
  `token_chunk`: peak memory O(B*D + B*L*tile), never B x L x D. tile=None is
  the untiled path (tests, small D). backward="argmax" (default) replaces the
  rematerialized backward by an argmax-based custom VJP (see `token_pool`;
  2.4x faster on CPU at D=2^16); "remat" is plain autodiff with jax.checkpoint
  (used whenever token_chunk is set).
  """

  def __init__(self, d: int, D: int, *, rngs: nnx.Rngs, tile: int | None = 4096,
               token_chunk: int | None = None, backward: str = "argmax", bias_init: float = 3.0,
               clamp: float | None = 10.0, normalize: bool = True,
               kernel_std: float | None = None, dtype: Any = jnp.float32):
    super().__init__(d, D, rngs=rngs, bias_init=bias_init, clamp=clamp, normalize=normalize,
                     kernel_std=kernel_std, dtype=dtype)
    self.tile = tile
    self.token_chunk = token_chunk
    self.backward = backward

  def scores(self, h_btd, mask_bt):
    return token_pool(h_btd, mask_bt, self.kernel[...], self.bias[...], reduce="max",
                      tile=self.tile, token_chunk=self.token_chunk, backward=self.backward,
                      dtype=self.dtype)

  def scores_at(self, h_btd, mask_bt, idx_bk):
    return token_pool_at(h_btd, mask_bt, self.kernel[...], self.bias[...], idx_bk,
                         reduce="max", dtype=self.dtype)


# ---------------------------------------------------------------------------
# SPLADE MLM head
# ---------------------------------------------------------------------------


class MLMHead(nnx.Module):
  """SPLADE head: w_j = pool_t log1p(relu(logit_tj)), pool = max or sum over unmasked t.

  logits = LayerNorm(gelu(h W_t + b_t)) E^T + c (BERT's cls.predictions), with
  the decoder E [V, d] either tied or the head's own. Tying: pass
  `tied_embedding`, an `nnx.Variable` holding [V, d] (e.g.
  `bert.embeddings.word_embeddings.embedding`) or a module with an `.embedding`
  variable; NNX keeps the shared reference through split/merge, so gradients
  reach the word embeddings. Alternatively pass `embedding_vd` at call time.
  The vocabulary is processed in strided tiles (`token_pool`).
  Dims of `special_ids` are zeroed.
  """

  def __init__(self, d: int, vocab: int, *, rngs: nnx.Rngs, tied_embedding: Any = None,
               pooling: str = "max", special_ids: Sequence[int] = (),
               tile: int | None = 8192, token_chunk: int | None = None,
               backward: str = "argmax", layer_norm_eps: float = 1e-12, dtype: Any = jnp.float32):
    if pooling not in ("max", "sum"):
      raise ValueError(f"pooling must be 'max' or 'sum', got {pooling!r}")
    self.d, self.vocab = d, vocab
    self.dense = layers.Dense(d, d, axes=("embed", None), rngs=rngs)
    self.layer_norm = layers.LayerNorm(d, eps=layer_norm_eps)
    self.bias = layers.param(jnp.zeros((vocab,), jnp.float32), ("vocab",))
    if tied_embedding is None:
      self.tied = None
      self.decoder = layers.param(
          layers.normal_init(rngs.params(), (d, vocab), 0.02), ("embed", "vocab"))
    else:
      self.tied = tied_embedding
      self.decoder = None
    self.pooling = pooling
    self.special_ids = tuple(int(i) for i in np.asarray(special_ids).reshape(-1))
    self.tile = tile
    self.token_chunk = token_chunk
    self.backward = backward
    self.dtype = dtype

  def decoder_dv(self, embedding_vd: jax.Array | None = None) -> jax.Array:
    """The decoder as [d, V]."""
    if embedding_vd is not None:
      return embedding_vd.T
    if self.decoder is not None:
      return self.decoder[...]
    tied = self.tied.embedding if isinstance(self.tied, nnx.Module) else self.tied
    return tied[...].T

  def transform(self, h_btd: jax.Array) -> jax.Array:
    """BERT cls.predictions.transform: dense, exact gelu, LayerNorm (float32)."""
    y = self.dense(h_btd.astype(jnp.float32))
    return self.layer_norm(jax.nn.gelu(y, approximate=False))

  def __call__(self, h_btd: jax.Array, mask_bt: jax.Array, *, topk: int | None = None,
               embedding_vd: jax.Array | None = None) -> jax.Array:
    """rep_bv float32 [B, V]."""
    t_btd = self.transform(h_btd)
    w_dv = self.decoder_dv(embedding_vd)
    rep = token_pool(t_btd, mask_bt, w_dv, self.bias[...], reduce=self.pooling,
                     tile=self.tile, token_chunk=self.token_chunk, backward=self.backward,
                     dtype=self.dtype)
    if self.special_ids:
      keep = jnp.ones((self.vocab,), jnp.float32).at[jnp.array(self.special_ids)].set(0.0)
      rep = rep * keep
    return topk_mask(rep, topk) if topk else rep

  def load_hf(self, tensors: dict[str, np.ndarray]) -> None:
    """Sets the head from Hugging Face `cls.predictions.*` tensors (in place).

    Accepted names (with or without the "cls.predictions." prefix):
    transform.dense.weight [d, d] (PyTorch [out, in]), transform.dense.bias,
    transform.LayerNorm.weight/bias (or gamma/beta), bias [V], and
    decoder.weight [V, d] (only used when the head has its own decoder; a tied
    head keeps using the word embeddings).
    """
    t = {k.removeprefix("cls.predictions."): np.asarray(v) for k, v in tensors.items()}

    def get(*names):
      for n in names:
        if n in t:
          return t[n]
      raise KeyError(f"none of {names} in the MLM head tensors ({sorted(t)})")

    self.dense.kernel.set_value(jnp.asarray(get("transform.dense.weight").T, jnp.float32))
    self.dense.bias.set_value(jnp.asarray(get("transform.dense.bias"), jnp.float32))
    self.layer_norm.scale.set_value(jnp.asarray(
        get("transform.LayerNorm.weight", "transform.LayerNorm.gamma"), jnp.float32))
    self.layer_norm.bias.set_value(jnp.asarray(
        get("transform.LayerNorm.bias", "transform.LayerNorm.beta"), jnp.float32))
    self.bias.set_value(jnp.asarray(get("bias", "decoder.bias"), jnp.float32))
    if self.decoder is not None and "decoder.weight" in t:
      self.decoder.set_value(jnp.asarray(t["decoder.weight"].T, jnp.float32))


# ---------------------------------------------------------------------------
# Dense head (ablation)
# ---------------------------------------------------------------------------


class DenseHead(nnx.Module):
  """Pooled hidden state, no sparsity: mean over unmasked tokens (or CLS), L2-normalized."""

  def __init__(self, d: int, *, pooling: str = "mean", normalize: bool = True):
    if pooling not in ("mean", "cls"):
      raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    self.d = d
    self.pooling = pooling
    self.normalize = normalize

  def __call__(self, h_btd: jax.Array, mask_bt: jax.Array, *, topk: int | None = None) -> jax.Array:
    """e_bd float32 [B, d]. topk is accepted and ignored (dense)."""
    h = h_btd.astype(jnp.float32)
    if self.pooling == "cls":
      e = h[:, 0]
    else:
      m = mask_bt.astype(jnp.float32)
      e = jnp.einsum("bt,btd->bd", m, h) / jnp.maximum(m.sum(1, keepdims=True), 1.0)
    return l2_normalize(e) if self.normalize else e


# ---------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------


HEADS: dict[str, Callable[..., nnx.Module]] = {
    "latent_attention": LatentAttentionHead,
    "latent_sum": LatentSumHead,
    "latent_max": LatentMaxHead,
    "mlm": MLMHead,
    "dense": DenseHead,
}


def make_head(name: str, *, d: int, D: int | None = None, vocab: int | None = None,
              rngs: nnx.Rngs | None = None, **kwargs: Any) -> nnx.Module:
  """Builds a head by name.

  Args:
    name: a key of HEADS ("latent_attention", "latent_sum", "latent_max", "mlm", "dense").
    d: backbone width.
    D: latent width (latent heads).
    vocab: vocabulary size (mlm).
    rngs: nnx.Rngs (not needed by "dense").
    **kwargs: passed to the head's constructor (pooling, tile, clamp, ...).

  Returns:
    The head module.
  """
  if name not in HEADS:
    raise ValueError(f"unknown head {name!r}; known: {sorted(HEADS)}")
  cls = HEADS[name]
  if name == "dense":
    return cls(d, **kwargs)
  if rngs is None:
    raise ValueError(f"head {name!r} needs rngs")
  if name == "mlm":
    if vocab is None:
      raise ValueError("the mlm head needs vocab")
    return cls(d, vocab, rngs=rngs, **kwargs)
  if D is None:
    raise ValueError(f"head {name!r} needs D")
  return cls(d, D, rngs=rngs, **kwargs)


def output_dim(head: nnx.Module) -> int:
  """Width of the head's representation (D, vocab or d)."""
  for attr in ("D", "vocab", "d"):
    if hasattr(head, attr):
      return int(getattr(head, attr))
  raise ValueError(f"cannot tell the output width of {type(head).__name__}")
