"""T5's relative position bias: the bucket of each relative position, and the bias of a bucket table.

Both stacks compute it once, from their first block's table (or, scanned, the stack's own), and
share it across blocks (`t5.T5Stack`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def relative_position_buckets(
  q_len: int, k_len: int, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
  """T5's bucket of each relative position (key - query), [q_len, k_len] int32.

  Computed on the host in float32 as Hugging Face's `_relative_position_bucket`
  does in torch, so that every backend gets the same buckets.
  """
  rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    ratio = np.log(rel.astype(np.float32) / np.float32(max_exact))
  ratio = ratio / np.float32(np.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
  large = max_exact + np.where(rel < max_exact, 0, ratio).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


def position_bias(table_nh: jax.Array, t: int, *, bidirectional: bool, max_distance: int) -> jax.Array:
  """The relative position bias [1, H, t, t] (float32) of self-attention from a bucket table [buckets, H]."""
  buckets_tt = relative_position_buckets(
    t, t, bidirectional=bidirectional, num_buckets=table_nh.shape[0], max_distance=max_distance
  )
  return jnp.take(table_nh, jnp.asarray(buckets_tt), axis=0).transpose(2, 0, 1)[None].astype(jnp.float32)
