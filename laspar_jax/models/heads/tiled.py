"""Token pooling of log1p(relu(h W + b)) over a wide output, never B x L x V; top-k masks.

`token_pool` computes s_bv = reduce_t log1p(relu(h_t W + b)) over unmasked
tokens for W [d, V] with V up to millions (latent D or a vocabulary). The V
columns are processed in *strided* tiles: tile k holds columns
{k, k + n, k + 2n, ...} (n tiles). The reshape [d, V] -> [d, tile, n] is free
(no copy of W; a step slices tile k from the last axis and its backward writes
the tile's gradient in place), and with W sharded in contiguous blocks on V the
shard boundaries fall on the `tile` axis, so every step works on each device's
share at once (no gather of W). Max pooling has an argmax-based custom VJP.

`topk_mask` / `topk_indices` / `scatter_rows` are the training-time top-k of the
heads; the indices come from `sparsify.topk` (the one top-k of the codebase).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from laspar_jax import sparsify
from laspar_jax.mesh import constrain
from laspar_jax.models.heads.pooling import NEG, log_relu

# ---------------------------------------------------------------------------
# Training-time top-k
# ---------------------------------------------------------------------------


def topk_indices(rep_bv: jax.Array, k: int) -> jax.Array:
  """Indices [B, k] (int32) of the k largest entries per row, on stop-gradient scores."""
  return sparsify.topk(jax.lax.stop_gradient(rep_bv), k)[0]


def scatter_rows(val_bk: jax.Array, idx_bk: jax.Array, D: int) -> jax.Array:
  """Dense [B, D] with val_bk at idx_bk, zeros elsewhere (gradient flows to val_bk)."""
  B = val_bk.shape[0]
  rows = jnp.arange(B)[:, None]
  return jnp.zeros((B, D), val_bk.dtype).at[rows, idx_bk].set(val_bk)


def topk_mask(rep_bv: jax.Array, k: int | None) -> jax.Array:
  """Keeps each row's k largest entries (chosen on stop-gradient scores), zeros the rest.

  Args:
    rep_bv: [B, V].
    k: entries kept per row (None or k >= V keeps everything).

  Returns:
    [B, V], same dtype; gradients flow to the kept entries only.
  """
  if k is None or k >= rep_bv.shape[-1]:
    return rep_bv
  idx_bk = topk_indices(rep_bv, k)
  keep = scatter_rows(jnp.ones(idx_bk.shape, rep_bv.dtype), idx_bk, rep_bv.shape[-1])
  return rep_bv * keep


# ---------------------------------------------------------------------------
# One column block, optionally scanning the tokens in chunks
# ---------------------------------------------------------------------------


def _pool_block(h_btd, mask_bt, k_dv, b_v, reduce, token_chunk, dtype):
  """reduce_t over unmasked t of log1p(relu(h_t k + b)) for one column block: [B, v].

  For reduce="max" returns the max of the *pre-activation* (log1p relu is
  monotone; apply `log_relu` afterwards). For "sum" returns the activation sum.
  """
  B, L, _ = h_btd.shape
  m_bt = mask_bt.astype(bool)

  def chunk(h_bcd, m_bc):
    z = jnp.einsum(
      "bcd,dv->bcv", h_bcd.astype(dtype), k_dv.astype(dtype), preferred_element_type=jnp.float32
    ) + b_v.astype(jnp.float32)
    if reduce == "max":
      return jnp.max(jnp.where(m_bc[..., None], z, NEG), axis=1)
    return jnp.sum(jnp.where(m_bc[..., None], log_relu(z), 0.0), axis=1)

  if token_chunk is None or token_chunk >= L:
    return chunk(h_btd, m_bt)
  nc = -(-L // token_chunk)
  pad = nc * token_chunk - L
  h = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
  m = jnp.pad(m_bt, ((0, 0), (0, pad)))
  h_cbtd = h.reshape(B, nc, token_chunk, -1).transpose(1, 0, 2, 3)
  m_cbt = m.reshape(B, nc, token_chunk).transpose(1, 0, 2)
  init = jnp.full((B, k_dv.shape[1]), NEG if reduce == "max" else 0.0, jnp.float32)

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
    z = jnp.einsum(
      "btd,dv->btv", h_btd.astype(dtype), k_dt.astype(dtype), preferred_element_type=jnp.float32
    ) + b_t.astype(jnp.float32)
    z = jnp.where(m, z, NEG)
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
    dh_bld = dh_bld + jnp.einsum(
      "blt,dt->bld", oh_blt.astype(dtype), k_dt.astype(dtype), preferred_element_type=jnp.float32
    )
    return (dh_bld, dk_dtn), None

  init = (jnp.zeros((B, L, d), jnp.float32), jnp.zeros_like(k_dtn))
  n = k_dtn.shape[2]
  (dh_bld, dk_dtn), _ = jax.lax.scan(step, init, (jnp.arange(n), g_nbt, a_nbt))
  db_tn = jnp.sum(g_nbt, axis=1).T.astype(b_tn.dtype)
  return dh_bld.astype(h_btd.dtype), None, dk_dtn, db_tn


_tiled_max_argmax.defvjp(_tiled_max_fwd, _tiled_max_bwd)


# ---------------------------------------------------------------------------
# Public kernels
# ---------------------------------------------------------------------------


def token_pool(
  h_btd: jax.Array,
  mask_bt: jax.Array,
  kernel_dv: jax.Array,
  bias_v: jax.Array,
  *,
  reduce: str = "max",
  tile: int | None = None,
  token_chunk: int | None = None,
  remat: bool = True,
  backward: str = "remat",
  dtype: Any = jnp.float32,
) -> jax.Array:
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
      that keeps the argmax token per column, int32 [B, V], and computes dW by
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
  finish = log_relu if reduce == "max" else (lambda r: r)
  if tile is None or tile >= V:
    return finish(_pool_block(h_btd, mask_bt, kernel_dv, bias_v, reduce, token_chunk, dtype))

  n = -(-V // tile)
  Vp = n * tile
  if Vp != V:
    kernel_dv = jnp.pad(kernel_dv, ((0, 0), (0, Vp - V)))
    bias_v = jnp.pad(bias_v.astype(jnp.float32), (0, Vp - V), constant_values=NEG)
  # Strided tiles: column j = t * n + k lives in tile k at position t.
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


def token_pool_at(
  h_btd: jax.Array,
  mask_bt: jax.Array,
  kernel_dv: jax.Array,
  bias_v: jax.Array,
  idx_bk: jax.Array,
  *,
  reduce: str = "max",
  dtype: Any = jnp.float32,
) -> jax.Array:
  """`token_pool` evaluated only at columns idx_bk (per row): [B, k], O(B*L*k) memory.

  Args:
    h_btd: hidden states [B, L, d].
    mask_bt: [B, L].
    kernel_dv: [d, V].
    bias_v: [V].
    idx_bk: int [B, k] columns per row.
    reduce: "max" or "sum".
    dtype: compute dtype of the matmul.

  Returns:
    float32 [B, k].
  """
  k_dbk = jnp.take(kernel_dv, idx_bk, axis=1)
  b_bk = jnp.take(bias_v, idx_bk).astype(jnp.float32)
  z_blk = (
    jnp.einsum("bld,dbk->blk", h_btd.astype(dtype), k_dbk.astype(dtype), preferred_element_type=jnp.float32)
    + b_bk[:, None, :]
  )
  m = mask_bt.astype(bool)[..., None]
  if reduce == "max":
    return log_relu(jnp.max(jnp.where(m, z_blk, NEG), axis=1))
  return jnp.sum(jnp.where(m, log_relu(z_blk), 0.0), axis=1)
