"""Spilled runs of the index build and their merge (numba kernels).

Buffered postings are counting-sorted by dim (O(n + D), stable so rows stay
ascending) and spilled to a run file with dims in *descending* order, so the
merge, which walks dims upwards in chunks that fit the budget, consumes each
run from its end and truncates it as it goes: peak disk is the final index plus
one chunk, not twice the index. Each chunk is assembled in RAM by copying every
run's slice to its per-dim cursor, then appended to the output files.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numba
import numpy as np

from laspar_jax.index import format as fmt
from laspar_jax.index import quantize as quant
from laspar_jax.index.kernels import codes_of


@numba.njit(nogil=True, cache=True)
def spill_sort(dims, rows, vals, dim):
  """Counting sort of postings by dim descending (stable). Returns (rows, vals, counts)."""
  counts = np.zeros(dim, np.int64)
  for i in range(dims.size):
    counts[dims[i]] += 1
  pos = np.empty(dim, np.int64)
  acc = 0
  for j in range(dim - 1, -1, -1):
    pos[j] = acc
    acc += counts[j]
  out_rows = np.empty_like(rows)
  out_vals = np.empty_like(vals)
  for i in range(dims.size):
    j = dims[i]
    p = pos[j]
    out_rows[p] = rows[i]
    out_vals[p] = vals[i]
    pos[j] = p + 1
  return out_rows, out_vals, counts.astype(np.int32)


@numba.njit(nogil=True, cache=True)
def merge_block(out_rows, out_vals, cursor, block_rows, block_vals, counts_chunk):
  """Copies one run's block (dims of the chunk, descending) to per-dim cursors."""
  bp = 0
  for jj in range(counts_chunk.size - 1, -1, -1):
    n = counts_chunk[jj]
    c = cursor[jj]
    for t in range(n):
      out_rows[c + t] = block_rows[bp + t]
      out_vals[c + t] = block_vals[bp + t]
    cursor[jj] = c + n
    bp += n


@numba.njit(nogil=True, cache=True)
def impact_order_kernel(offsets_local, keys, rows, vals, out_rows, out_vals):
  """Per dim, reorders postings by key descending (ties: row ascending)."""
  for j in range(offsets_local.size - 1):
    a = offsets_local[j]
    b = offsets_local[j + 1]
    if b - a == 0:
      continue
    order = np.argsort(-keys[a:b], kind="mergesort")
    for t in range(b - a):
      out_rows[a + t] = rows[a + order[t]]
      out_vals[a + t] = vals[a + order[t]]


@dataclasses.dataclass
class Run:
  """One spilled run: rows and values sorted by dim descending, on disk."""

  rows_path: pathlib.Path
  vals_path: pathlib.Path
  counts: np.ndarray  # int32 [D]
  n: int
  consumed: int = 0  # postings of dims below the merge position (at the file end)
  row_offset: int = 0  # added to the stored rows when merged (a part of a multi-host build)


def write_run(prefix: pathlib.Path, dims: np.ndarray, rows: np.ndarray, vals: np.ndarray, dim: int) -> Run:
  """Sorts buffered postings by dim (descending) and writes them as `<prefix>.rows/.vals`.

  Args:
    prefix: path prefix of the two run files.
    dims: int32 [n] dims.
    rows: uint32 [n] document rows (ascending within a dim after the stable sort).
    vals: [n] weights in the run dtype.
    dim: D.

  Returns:
    The run.
  """
  if dims.size >= np.iinfo(np.int32).max:
    raise ValueError("a run holds >= 2**31 postings; lower ram_budget_bytes")
  s_rows, s_vals, counts = spill_sort(dims, rows, codes_of(vals), dim)
  rp, vp = prefix.with_suffix(".rows"), prefix.with_suffix(".vals")
  s_rows.tofile(rp)
  s_vals.tofile(vp)
  return Run(rp, vp, counts, int(s_rows.size))


def merge_runs(
  runs: list[Run],
  offsets: np.ndarray,
  out_dir: pathlib.Path,
  *,
  run_dtype: np.dtype,
  out_dtype: np.dtype,
  scale: float | None,
  ram_budget_bytes: int,
  impact_order: bool,
) -> dict[str, dict[str, Any]]:
  """Merges the runs into `rows.npy` / `weights.npy` (and the impact-ordered copies).

  Walks dims upwards in chunks that fit half the budget; each run is consumed
  from its end (its dims are descending) and truncated as it goes.

  Args:
    runs: the spilled runs.
    offsets: int64 [D + 1] posting offsets per dim over all runs.
    out_dir: directory of the output arrays.
    run_dtype: value dtype of the runs.
    out_dtype: value dtype of the index (quantized here when it differs).
    scale: quantization scale of integer impacts (None for float values).
    ram_budget_bytes: memory target.
    impact_order: also write `impact_rows.npy` / `impact_weights.npy`.

  Returns:
    {file name: manifest entry} of the arrays written.
  """
  dim, n_postings = offsets.size - 1, int(offsets[-1])
  w_rows = fmt.NpyStreamWriter(out_dir / "rows.npy", np.uint32, n_postings)
  w_vals = fmt.NpyStreamWriter(out_dir / "weights.npy", out_dtype, n_postings)
  if impact_order:
    w_irows = fmt.NpyStreamWriter(out_dir / "impact_rows.npy", np.uint32, n_postings)
    w_ivals = fmt.NpyStreamWriter(out_dir / "impact_weights.npy", out_dtype, n_postings)
  per_posting = 2 * (4 + max(out_dtype.itemsize, run_dtype.itemsize)) + 4
  if impact_order:
    per_posting += 8 + 4 + 8
  chunk_cap = max(1, ram_budget_bytes // 2 // per_posting)
  isz = run_dtype.itemsize
  d0 = 0
  while d0 < dim:
    # Largest d1 with offsets[d1] - offsets[d0] <= chunk_cap (at least one dim).
    d1 = int(np.searchsorted(offsets, offsets[d0] + chunk_cap, side="right")) - 1
    d1 = min(max(d1, d0 + 1), dim)
    n = int(offsets[d1] - offsets[d0])
    out_rows = np.empty(n, np.uint32)
    out_vals = np.empty(n, run_dtype)
    cursor = (offsets[d0:d1] - offsets[d0]).astype(np.int64)
    for r in runs:
      counts_chunk = r.counts[d0:d1]
      m = int(counts_chunk.sum(dtype=np.int64))
      if m == 0:
        continue
      start = r.n - r.consumed - m
      b_rows = np.fromfile(r.rows_path, np.uint32, count=m, offset=4 * start)
      b_vals = np.fromfile(r.vals_path, run_dtype, count=m, offset=isz * start)
      if r.row_offset:
        b_rows += np.uint32(r.row_offset)
      merge_block(out_rows, codes_of(out_vals), cursor, b_rows, codes_of(b_vals), counts_chunk)
      r.consumed += m
      os.truncate(r.rows_path, 4 * start)
      os.truncate(r.vals_path, isz * start)
      del b_rows, b_vals
    if run_dtype != out_dtype:  # float32 runs -> quantized output
      out_vals, _ = quant.quantize(out_vals, 8 * out_dtype.itemsize, scale)
    w_rows.write(out_rows)
    w_vals.write(out_vals)
    if impact_order:
      keys = quant.decode_weights(out_vals, scale)
      i_rows = np.empty_like(out_rows)
      i_vals = np.empty_like(out_vals)
      impact_order_kernel(
        offsets[d0 : d1 + 1] - offsets[d0], keys, out_rows, codes_of(out_vals), i_rows, codes_of(i_vals)
      )
      del keys
      w_irows.write(i_rows)
      w_ivals.write(i_vals)
      del i_rows, i_vals
    del out_rows, out_vals
    d0 = d1
  files = {"rows.npy": w_rows.close(), "weights.npy": w_vals.close()}
  if impact_order:
    files["impact_rows.npy"] = w_irows.close()
    files["impact_weights.npy"] = w_ivals.close()
  return files
