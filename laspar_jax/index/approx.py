"""Approximate-search structures of a compressed (version 2) index, and their writer.

`compress_index(..., approx=True)` writes, beside the blocked postings::

  impact_counts.npy   uint32 [D]: head length of each dim, min(postings, head)
  impact_rows.npy     uint32 [H]: each dim's `head` highest-impact postings, impact
                      descending (ties: row ascending)
  impact_weights.npy  value dtype [H]: their stored impacts
  fwd_offsets.npy     int64 [N + 1]: the forward (doc-major) index ...
  fwd_dims.npy        uint16 (D <= 65,536) | uint32 [P]: ... each doc's dims, ascending
  fwd_weights.npy     value dtype [P]: ... their stored impacts

`Index.search(mode="approx")` then runs `search` over them: score at a time
over the heads (`kernels.saat_threshold`: one global impact threshold keeps
about `budget` postings with q_j * w >= tau; the partial scores in a
cache-sized hash table), the `n_cand` best partial scores (selection, not a
heap) re-scored exactly from the forward index. Nothing of size N or D is
allocated per query: the tables are per-thread buffers (`Buffers`), reset
through the slots they touched. Queries with few postings run exact search
instead (`Index.search`'s `exact_below`).

Why score-at-a-time and not block-max pruning: with ~30 query terms the sum
of block maxima stays far above the k-th score, so block-max pruning skips
nothing, while the top documents almost always carry one of the few largest
products q_j * w (measured in `benchmarks/retrieval.py`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import numba
import numpy as np

from laspar_jax.index import format as fmt
from laspar_jax.index.kernels import (
  codes_of,
  heap_drain,
  heap_push,
  rescore_query_order,
  saat_end,
  saat_threshold,
  select_top,
  weight,
)

APPROX_FILES = (
  "impact_counts.npy",
  "impact_rows.npy",
  "impact_weights.npy",
  "fwd_offsets.npy",
  "fwd_dims.npy",
  "fwd_weights.npy",
)
# Default head: postings kept per dim in impact order. A query reads at most `budget` postings in
# all, so a head longer than the largest useful budget (a few 10^4) is never read to its end.
DEFAULT_HEAD = 1 << 14
_CHUNK_POSTINGS = 1 << 23


# Re-scoring reads query weights branch-free: up to this D from a dense per-thread [D] array, above
# it from a 2^16-slot hash table (a query whose dims collide there takes `kernels.rescore_query_order`).
DENSE_MAX_DIM = 1 << 17
_HASH_BITS = 16


class Buffers:
  """Per-thread approximate-search buffers (made once per thread, reused by every query).

  The partial scores live in an open-addressing table of >= 2 x min(budget,
  N) slots (rows as keys: it stays in cache where an N-sized accumulator
  would not); query weights in a dense [D] array or a hash table (see
  DENSE_MAX_DIM).
  """

  def __init__(self, n_docs: int, dim: int):
    self.n_docs = n_docs
    self.akeys = np.zeros(0, np.int64)
    self.avals = np.zeros(0, np.float32)
    self.aslots = np.zeros(0, np.int64)
    dense = dim <= DENSE_MAX_DIM
    self.qdense = np.zeros(dim if dense else 0, np.float32)
    self.hkeys = np.full(0 if dense else 1 << _HASH_BITS, -1, np.int64)
    self.hvals = np.zeros(0 if dense else 1 << _HASH_BITS, np.float32)
    self.qbits = np.zeros(0 if dense else dim // 64 + 1, np.uint64)
    self.sink = np.zeros(1, np.int64)  # the touch loops' sum, stored so the compiler keeps those loads

  def ensure(self, budget: int) -> None:
    """Sizes the partial-score table for `budget` postings per query."""
    need = 2 * max(1, min(int(budget), self.n_docs))
    if self.akeys.size < need:
      size = 1 << max(10, (need - 1).bit_length())
      self.akeys = np.full(size, -1, np.int64)
      self.avals = np.zeros(size, np.float32)
      self.aslots = np.zeros(size // 2, np.int64)


@numba.njit(inline="always")
def _slot(d):
  return ((d * 2654435761) & 0xFFFFFFFF) >> (32 - _HASH_BITS)


@numba.njit(nogil=True)
def _saat_hashed(hoffsets, irows, ivals, table, q_dims, q_w, a, b, budget, kc, akeys, avals, aslots, cand_r):
  """`kernels.saat_candidates` with the partial scores in an open-addressing table keyed by row."""
  tau = saat_threshold(hoffsets, ivals, table, q_dims, q_w, a, b, budget)
  mask = akeys.size - 1
  bits = 0
  while (1 << bits) < akeys.size:
    bits += 1
  shift = 64 - bits
  nt = 0
  for t in range(a, b):
    d = q_dims[t]
    w = q_w[t]
    for p in range(hoffsets[d], saat_end(hoffsets, ivals, table, d, w, tau)):
      r = np.int64(irows[p])
      h = ((r * np.int64(-7046029254386353131)) >> shift) & mask  # Fibonacci hashing on the high bits
      while akeys[h] != r and akeys[h] != -1:
        h = (h + 1) & mask
      if akeys[h] == -1:
        akeys[h] = r
        avals[h] = 0.0
        aslots[nt] = h
        nt += 1
      avals[h] += w * weight(ivals, table, p)
  rows = np.empty(nt, np.int64)
  scores = np.empty(nt, np.float32)
  for i in range(nt):
    h = aslots[i]
    rows[i] = akeys[h]
    scores[i] = avals[h]
    akeys[h] = -1
  return select_top(rows, scores, nt, kc, cand_r)


@numba.njit(nogil=True, fastmath=True)
def _rescore(
  fwd_offsets, fwd_dims, fvals, table, q_dims, q_w, a, b, cand_r, nc, k, qdense, hkeys, hvals, heap_s, heap_r
):
  """Scores of candidates cand_r[:nc] from the forward index into a top-k heap; returns (size, sink).

  The candidates' forward rows are touched first, in loops of independent
  loads that the CPU overlaps, so the scoring loop reads them from cache; the
  scoring loop is branch-free (query weights from `qdense`, or from the hash
  table `hkeys`/`hvals` when qdense is empty; zero off the query). Sums run in
  the doc's dim order: scores equal exact search's up to float32 rounding.
  Returns size -1 (nothing done) when query dims collide in the hash table.
  """
  dense = qdense.size > 0
  for t in range(a, b):
    d = q_dims[t]
    if dense:
      qdense[d] += q_w[t]  # += : a dim listed twice counts twice, as in exact search
    else:
      h = _slot(d)
      if hkeys[h] != -1:  # collision: undo, let the caller take the bitmap path
        for u in range(a, t):
          hkeys[_slot(q_dims[u])] = -1
        return -1, 0
      hkeys[h] = d
      hvals[h] = q_w[t]
  sink = 0
  p0 = np.empty(nc, np.int64)
  p1 = np.empty(nc, np.int64)
  for i in range(nc):  # independent loads: the CPU keeps many misses in flight
    p0[i] = fwd_offsets[cand_r[i]]
    p1[i] = fwd_offsets[cand_r[i] + 1]
  for i in range(nc):  # each row's first lines (a candidate has postings: its partial score is > 0)
    sink += np.int64(fwd_dims[p0[i]]) + np.int64(fvals[p0[i]])
  for i in range(nc):  # the rest of each row
    for p in range(p0[i] + 16, p1[i], 16):
      sink += np.int64(fwd_dims[p]) + np.int64(fvals[p])
  n = 0
  for i in range(nc):
    r = cand_r[i]
    s = np.float32(0.0)
    if dense:
      for p in range(p0[i], p1[i]):
        s += qdense[fwd_dims[p]] * weight(fvals, table, p)
    else:
      for p in range(p0[i], p1[i]):
        d = np.int64(fwd_dims[p])
        h = _slot(d)
        s += np.float32(hkeys[h] == d) * hvals[h] * weight(fvals, table, p)
    if s > 0.0:  # heap_push keeps it only if it beats the heap's worst
      n = heap_push(heap_s, heap_r, n, k, s, r)
  for t in range(a, b):
    if dense:
      qdense[q_dims[t]] = 0.0
    else:
      hkeys[_slot(q_dims[t])] = -1
  return n, sink


@numba.njit(nogil=True, cache=True)
def search(
  hoffsets,
  irows,
  ivals,
  fwd_offsets,
  fwd_dims,
  fvals,
  table,
  q_ptr,
  q_dims,
  q_w,
  k,
  budget,
  n_cand,
  akeys,
  avals,
  aslots,
  qdense,
  hkeys,
  hvals,
  qbits,
  sink,
  heap_s,
  heap_r,
  cand_r,
  out_rows,
  out_scores,
):
  """Approximate top-k over a compressed index's heads and forward index (see the module docstring)."""
  kc = min(n_cand, cand_r.size)
  for qi in range(q_ptr.size - 1):
    a = q_ptr[qi]
    b = q_ptr[qi + 1]
    nc = _saat_hashed(hoffsets, irows, ivals, table, q_dims, q_w, a, b, budget, kc, akeys, avals, aslots, cand_r)
    n, z = _rescore(
      fwd_offsets, fwd_dims, fvals, table, q_dims, q_w, a, b, cand_r, nc, k, qdense, hkeys, hvals, heap_s, heap_r
    )
    sink[0] += z
    if n < 0:
      n = rescore_query_order(
        fwd_offsets, fwd_dims, fvals, table, q_dims, q_w, a, b, cand_r, nc, k, qbits, heap_s, heap_r
      )
    heap_drain(heap_s, heap_r, n, out_scores[qi], out_rows[qi])


def run(ix: Any, table: np.ndarray, q_ptr, q_dims, q_w, k: int, budget: int, n_cand: int, s: Any, out_rows, out_scores):
  """`search` over an open compressed `Index` with approx structures, `s` its per-thread scratch (heaps)."""
  if s.buffers is None:
    s.buffers = Buffers(ix.n_docs, ix.dim)
  buf = s.buffers
  buf.ensure(budget)

  search(
    ix.impact_offsets,
    ix.impact_rows,
    codes_of(ix.impact_weights),
    ix.fwd_offsets,
    ix.fwd_dims,
    codes_of(ix.fwd_weights),
    table,
    q_ptr,
    q_dims,
    q_w,
    k,
    budget,
    n_cand,
    buf.akeys,
    buf.avals,
    buf.aslots,
    buf.qdense,
    buf.hkeys,
    buf.hvals,
    buf.qbits,
    buf.sink,
    s.heap_s,
    s.heap_r,
    s.cand_r,
    out_rows,
    out_scores,
  )


@numba.njit(nogil=True, cache=True)
def _head_counts(counts, head, out):
  for d in range(counts.size):
    out[d] = min(counts[d], head)


@numba.njit(nogil=True, cache=True)
def _heads(offsets, rows, codes, head, out_rows, out_codes):
  """Fills each dim's head (impact desc, row asc) for the dims of this chunk; returns items written."""
  p_base = offsets[0]
  n = 0
  for j in range(offsets.size - 1):
    p0 = offsets[j] - p_base
    p1 = offsets[j + 1] - p_base
    m = min(p1 - p0, head)
    if m == 0:
      continue
    # Stable sort on -code keeps rows ascending among equal impacts (rows are ascending in a list).
    key = np.empty(p1 - p0, np.float64)
    for p in range(p0, p1):
      key[p - p0] = -np.float64(codes[p])
    order = np.argsort(key, kind="mergesort")
    for i in range(m):
      out_rows[n + i] = rows[p0 + order[i]]
      out_codes[n + i] = codes[p0 + order[i]]
    n += m
  return n


@numba.njit(nogil=True, cache=True)
def _scatter(offsets, rows, codes, d0, pos, fwd_dims, fwd_codes):
  """Appends the postings of dims [d0, d0 + len(offsets) - 1) to their docs' forward rows."""
  p_base = offsets[0]
  for j in range(offsets.size - 1):
    for p in range(offsets[j] - p_base, offsets[j + 1] - p_base):
      r = rows[p]
      q = pos[r]
      fwd_dims[q] = d0 + j
      fwd_codes[q] = codes[p]
      pos[r] = q + 1


def _entry(path: pathlib.Path, dtype: np.dtype, n: int) -> dict[str, Any]:
  """Fsyncs a file written through a memory map and returns its manifest entry."""
  with open(path, "rb+") as f:
    os.fsync(f.fileno())
  return {"bytes": path.stat().st_size, "blake2b": fmt.file_checksum(path), "dtype": dtype.str, "shape": [int(n)]}


def write_approx(
  directory: pathlib.Path,
  offsets: np.ndarray,
  rows: np.ndarray,
  codes_fn: Callable[[int, int], np.ndarray],
  doc_lengths: np.ndarray,
  code_dtype: np.dtype,
  value_dtype: np.dtype,
  head: int = DEFAULT_HEAD,
) -> dict[str, dict[str, Any]]:
  """Writes the approximate-search files (see the module docstring) into `directory`.

  Args:
    directory: the index directory being written.
    offsets: int64 [D + 1] posting offsets.
    rows: uint32 [P] doc rows, ascending within a dim (memory-mapped is fine).
    codes_fn: (p0, p1) -> stored impacts of postings [p0, p1) as comparable codes
      (`kernels.codes_of`: float16 as its uint16 bits).
    doc_lengths: [N] postings per doc.
    code_dtype: dtype of the codes.
    value_dtype: dtype the weights files declare (the index's value dtype).
    head: postings kept per dim in impact order.

  Returns:
    Manifest entries of the written files.
  """
  if head < 1:
    raise ValueError(f"approx head must be >= 1, got {head}")
  offsets = np.asarray(offsets, np.int64)
  dim = offsets.size - 1
  n_docs = int(np.asarray(doc_lengths).shape[0])
  n_postings = int(offsets[-1])
  counts = np.diff(offsets)
  hcounts = np.empty(dim, np.uint32)
  _head_counts(counts, head, hcounts)
  entries = {"impact_counts.npy": fmt.write_array(directory / "impact_counts.npy", hcounts)}
  fwd_offsets = np.zeros(n_docs + 1, np.int64)
  np.cumsum(np.asarray(doc_lengths, np.int64), out=fwd_offsets[1:])
  if int(fwd_offsets[-1]) != n_postings:
    raise ValueError(f"doc lengths add up to {int(fwd_offsets[-1])} postings, the lists hold {n_postings}")
  entries["fwd_offsets.npy"] = fmt.write_array(directory / "fwd_offsets.npy", fwd_offsets)
  dims_dtype = np.dtype(np.uint16 if dim <= 1 << 16 else np.uint32)
  value_dtype = np.dtype(value_dtype)
  mm = {
    name: np.lib.format.open_memmap(directory / name, mode="w+", dtype=dt, shape=(max(n, 0),))
    for name, dt, n in (
      ("fwd_dims.npy", dims_dtype, n_postings),
      ("fwd_weights.npy", value_dtype, n_postings),
    )
  }
  w_rows = fmt.NpyStreamWriter(directory / "impact_rows.npy", np.uint32, int(hcounts.sum(dtype=np.int64)))
  w_vals = fmt.NpyStreamWriter(directory / "impact_weights.npy", value_dtype, int(hcounts.sum(dtype=np.int64)))
  pos = fwd_offsets[:-1].copy()
  fwd_dims = mm["fwd_dims.npy"].view(np.ndarray)
  fwd_codes = mm["fwd_weights.npy"].view(np.ndarray).view(code_dtype)
  d0 = 0
  while d0 < dim:
    d1 = int(np.searchsorted(offsets, offsets[d0] + _CHUNK_POSTINGS, side="right")) - 1
    d1 = min(max(d1, d0 + 1), dim)
    p0, p1 = int(offsets[d0]), int(offsets[d1])
    r = np.ascontiguousarray(rows[p0:p1], dtype=np.uint32)
    c = np.ascontiguousarray(codes_fn(p0, p1), dtype=code_dtype)
    sub = offsets[d0 : d1 + 1]
    n_head = int(hcounts[d0:d1].sum(dtype=np.int64))
    h_rows = np.empty(n_head, np.uint32)
    h_codes = np.empty(n_head, code_dtype)
    _heads(sub, r, c, head, h_rows, h_codes)
    w_rows.write(h_rows)
    w_vals.write(h_codes.view(value_dtype))
    _scatter(sub, r, c, d0, pos, fwd_dims, fwd_codes)
    d0 = d1
  for name, a in mm.items():
    a.flush()
    del a
  mm.clear()
  del fwd_dims, fwd_codes
  entries["impact_rows.npy"] = w_rows.close()
  entries["impact_weights.npy"] = w_vals.close()
  entries["fwd_dims.npy"] = _entry(directory / "fwd_dims.npy", dims_dtype, n_postings)
  entries["fwd_weights.npy"] = _entry(directory / "fwd_weights.npy", value_dtype, n_postings)
  return entries


def head_offsets(impact_counts: np.ndarray) -> np.ndarray:
  """int64 [D + 1] offsets of the heads from their counts."""
  out = np.zeros(impact_counts.shape[0] + 1, np.int64)
  np.cumsum(impact_counts, out=out[1:])
  return out


def approx_bytes(manifest: dict[str, Any]) -> int:
  """Bytes of the approximate-search files an index holds (0 if none)."""
  return sum(int(e["bytes"]) for n, e in manifest["files"].items() if n in APPROX_FILES)
