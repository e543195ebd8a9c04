"""Sparsification of dense sparse-head outputs: top-k per row, thresholds, quantization.

`topk` turns rep_bv (B x D, D up to 4M) into (idx_bk, val_bk) postings. For a
rep_bv sharded over D on a mesh axis, `sharded_topk` runs a per-shard top-k and
then a top-k over the B x (k * n_shards) candidates; that equals the global
top-k because every global top-k element is in its own shard's top-k.
`quantize` / `dequantize` map non-negative weights to uint8/uint16 impacts with
a stored scale (the form PISA and Anserini expect).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _apply_threshold(idx_bk: jax.Array, val_bk: jax.Array,
                     min_weight: float) -> tuple[jax.Array, jax.Array]:
  """Zeroes weights <= min_weight (consumers drop val <= 0)."""
  keep_bk = val_bk > min_weight
  return idx_bk, jnp.where(keep_bk, val_bk, jnp.zeros_like(val_bk))


@functools.partial(jax.jit, static_argnames=("k", "approx", "recall_target"))
def topk(rep_bv: jax.Array, k: int, *, min_weight: float = 0.0,
         approx: bool = False, recall_target: float = 0.95
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


def sharded_topk(rep_bv: jax.Array, k: int, mesh: Mesh, axis: str = "model", *,
                 batch_axis: str | None = None, min_weight: float = 0.0
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
    cand_val, cand_idx = jax.shard_map(
        _local, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(rep_bv)
    kk = min(k, d)
    val_bk, pos_bk = jax.lax.top_k(cand_val, kk)
    idx_bk = jnp.take_along_axis(cand_idx, pos_bk, axis=-1)
    return _apply_threshold(idx_bk, val_bk, min_weight)

  return _run(rep_bv)


def quantize_scale(val_max: float, bits: int) -> float:
  """Scale such that `val_max` maps to the largest integer of `bits` bits."""
  top = float(2 ** bits - 1)
  return float(val_max) / top if val_max > 0 else 1.0


def quantize(val: np.ndarray | jax.Array, bits: int = 8, scale: float | None = None
             ) -> tuple[np.ndarray, float]:
  """Maps non-negative weights to integer impacts: q = round(val / scale).

  Positive weights never map to 0 (they are clipped to at least 1), so a
  posting survives quantization. Values above 2**bits-1 saturate.

  Args:
    val: weights (any shape), non-negative.
    bits: 8 (uint8) or 16 (uint16).
    scale: weight per integer step; default max(val) / (2**bits - 1).

  Returns:
    (q, scale): q of dtype uint8/uint16, and the scale (val ~= q * scale).
  """
  if bits not in (8, 16):
    raise ValueError(f"bits must be 8 or 16, got {bits}")
  val = np.asarray(val, dtype=np.float32)
  if scale is None:
    scale = quantize_scale(float(val.max()) if val.size else 0.0, bits)
  top = 2 ** bits - 1
  q = np.rint(val / np.float32(scale))
  q = np.where(val > 0, np.maximum(q, 1), 0)
  q = np.clip(q, 0, top).astype(np.uint8 if bits == 8 else np.uint16)
  return q, float(scale)


def dequantize(q: np.ndarray, scale: float) -> np.ndarray:
  """Inverse of `quantize`: float32 q * scale."""
  return q.astype(np.float32) * np.float32(scale)
