"""Sparsification of dense sparse-head outputs: top-k per row, thresholds, quantization.

`topk` turns rep_bv (B x D, D up to 4M) into (idx_bk, val_bk) postings. For a
rep_bv sharded over D on a mesh axis, `sharded_topk` runs a per-shard top-k and
then a top-k over the B x (k * n_shards) candidates; that equals the global
top-k because every global top-k element is in its own shard's top-k.
`quantize` / `dequantize` (re-exported from `laspar_jax.index.quantize`, where
the numpy index keeps them) map non-negative weights to uint8/uint16 impacts
with a stored scale (the form PISA and Anserini expect).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from laspar_jax.index.quantize import dequantize, quantize, quantize_scale

__all__ = ["dequantize", "quantize", "quantize_scale", "sharded_topk", "topk"]


def _apply_threshold(idx_bk: jax.Array, val_bk: jax.Array, min_weight: float) -> tuple[jax.Array, jax.Array]:
  """Zeroes weights <= min_weight (consumers drop val <= 0)."""
  keep_bk = val_bk > min_weight
  return idx_bk, jnp.where(keep_bk, val_bk, jnp.zeros_like(val_bk))


@functools.partial(jax.jit, static_argnames=("k", "approx", "recall_target"))
def topk(
  rep_bv: jax.Array, k: int, *, min_weight: float = 0.0, approx: bool = False, recall_target: float = 0.95
) -> tuple[jax.Array, jax.Array]:
  """Top-k dims per row, sorted by weight descending.

  Args:
    rep_bv: [B, D] sparse representation (non-negative for LSR heads).
    k: number of dims kept per row (clipped to D).
    min_weight: weights <= this are set to 0 (the index drops them).
    approx: use `lax.approx_max_k` (fast on TPU; exact on CPU).
    recall_target: recall target of approx_max_k.

  Returns:
    idx_bk int32 [B, k] dims, val_bk [B, k] weights (0 where dropped).
  """
  k = min(k, rep_bv.shape[-1])
  if approx:
    val_bk, idx_bk = jax.lax.approx_max_k(rep_bv, k, recall_target=recall_target)
  else:
    val_bk, idx_bk = jax.lax.top_k(rep_bv, k)
  return _apply_threshold(idx_bk.astype(jnp.int32), val_bk, min_weight)


def sharded_topk(
  rep_bv: jax.Array, k: int, mesh: Mesh, axis: str = "model", *, batch_axis: str | None = None, min_weight: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """Two-stage top-k of a D-sharded rep_bv; equals the global `topk`.

  Stage 1 (inside `jax.shard_map`): each shard takes the top-k of its D/n
  columns and offsets the indices to global dims. Stage 2: top-k over the
  B x (n * k) candidates. No shard ever gathers its full D columns.

  Args:
    rep_bv: [B, D] array; D must be divisible by the size of `axis`.
    k: dims kept per row.
    mesh: device mesh.
    axis: mesh axis that shards D.
    batch_axis: optional mesh axis that shards B (e.g. "data").
    min_weight: weights <= this are set to 0.

  Returns:
    idx_bk int32 [B, k], val_bk [B, k], sorted by weight descending.
  """
  n_shards = mesh.shape[axis]
  d = rep_bv.shape[-1]
  if d % n_shards:
    raise ValueError(f"D={d} is not divisible by mesh axis {axis!r} of size {n_shards}")
  d_shard = d // n_shards
  k_local = min(k, d_shard)
  spec = P(batch_axis, axis)

  def _local(rep_local_bv):
    val_bk, idx_bk = jax.lax.top_k(rep_local_bv, k_local)
    offset = jax.lax.axis_index(axis) * d_shard
    return val_bk, idx_bk.astype(jnp.int32) + offset.astype(jnp.int32)

  @jax.jit
  def _run(rep_bv):
    rep_bv = jax.lax.with_sharding_constraint(rep_bv, NamedSharding(mesh, spec))
    cand_val, cand_idx = jax.shard_map(_local, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(rep_bv)
    kk = min(k, d)
    val_bk, pos_bk = jax.lax.top_k(cand_val, kk)
    idx_bk = jnp.take_along_axis(cand_idx, pos_bk, axis=-1)
    return _apply_threshold(idx_bk, val_bk, min_weight)

  return _run(rep_bv)
