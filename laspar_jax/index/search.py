"""Loading and searching the inverted index.

    index = Index.load(path)                      # memory-mapped, verified
    rows_bk, scores_bk = index.search(q_idx_bk, q_val_bk, k=1000)
    ids = index.lookup(rows_bk)                   # doc id strings

`search` is exact by default (equal to brute-force dot products; see
`kernels.py`) and spreads the queries over `threads` threads. `mode="approx"`
needs an index built with `approx=True`. Result rows are -1 (score
-inf) past the last document with a positive score.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import threading
from typing import Any

import numpy as np
import scipy.sparse as sp

from laspar_jax.index import approx as approx_lib
from laspar_jax.index import blocked_kernels, codec, compress, kernels
from laspar_jax.index import format as fmt
from laspar_jax.index import quantize as quant


def queries_to_csr(q_idx_bk: Any, q_val_bk: Any, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """[B, K] query postings -> (q_ptr int64 [B+1], q_dims int64, q_w float32), dropping w <= 0."""
  q_idx_bk = np.asarray(q_idx_bk)
  q_val_bk = np.asarray(q_val_bk, dtype=np.float32)
  if q_idx_bk.ndim == 1:
    q_idx_bk, q_val_bk = q_idx_bk[None], q_val_bk[None]
  if q_idx_bk.shape != q_val_bk.shape:
    raise ValueError(f"idx {q_idx_bk.shape} and val {q_val_bk.shape} differ")
  mask_bk = q_val_bk > 0
  q_dims = q_idx_bk[mask_bk].astype(np.int64)
  if q_dims.size and (q_dims.min() < 0 or q_dims.max() >= dim):
    raise ValueError(f"query dims must lie in [0, {dim})")
  q_ptr = np.zeros(q_idx_bk.shape[0] + 1, np.int64)
  np.cumsum(mask_bk.sum(axis=1), out=q_ptr[1:])
  return q_ptr, q_dims, q_val_bk[mask_bk]


# Rows per accumulator window of the blocked search (fits L1 with the decode buffers).
_WINDOW = 16384


def _weight_table(dtype: np.dtype, scale: float | None) -> np.ndarray:
  if dtype == np.float16:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
  if dtype.kind == "u":
    return np.arange(1 << (8 * dtype.itemsize), dtype=np.float32) * np.float32(scale or 1.0)
  return np.zeros(0, np.float32)


# exact_below default, in postings: what approx costs (budget + n_cand x mean doc length, times a
# factor: version 1 / compressed) less what exact costs whatever the query (compressed: a pass over
# the N docs' windows, ~N/8 postings' worth). Measured in benchmarks/retrieval.py.
_EXACT_BELOW_FACTOR = {False: 4.0, True: 3.0}
_EXACT_FIXED_PER_DOC = {False: 0.0, True: 1 / 8}


class _Scratch:
  """Per-thread accumulators (reused across calls)."""

  def __init__(self, n_docs: int, dim: int):
    self.acc = np.zeros(max(n_docs, 1), np.float32)
    self.qbits = np.zeros(dim // 64 + 1, np.uint64)
    self.touched = np.zeros(max(n_docs, 1), np.uint32)
    self.cap = 0
    self.buffers: approx_lib.Buffers | None = None  # compressed indexes: N-sized, made at the first approx query
    self.heap_s = self.heap_r = self.cand_r = None

  def ensure(self, k: int, n_cand: int) -> None:
    cap = max(k, n_cand, 1)
    if cap > self.cap:
      self.cap = cap
      self.heap_s = np.zeros(cap, np.float32)
      self.heap_r = np.zeros(cap, np.int64)
      self.cand_r = np.zeros(cap, np.int64)


class Index:
  """A memory-mapped inverted index (see `format.py` for the layout)."""

  def __init__(self, path: pathlib.Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]):
    self.path = path
    self.manifest = manifest
    self.dim = int(manifest["dim"])
    self.n_docs = int(manifest["n_docs"])
    self.n_postings = int(manifest["n_postings"])
    self.quant_scale = manifest.get("quant_scale")
    self.offsets = arrays["offsets.npy"]
    self.blocked = manifest.get("posting_format") == "blocked"
    self.rows = arrays.get("rows.npy")
    self.weights = arrays.get("weights.npy")
    if self.blocked:
      self.blk_words = arrays["blk_words.npy"]
      self.blk_last = arrays["blk_last.npy"]
      self.blk_width = arrays["blk_width.npy"]
      self.blk_max = arrays["blk_max.npy"]
      self.weights = arrays["impacts.npy"]  # stored values, one per posting, as in version 1
      self.blk_ptr, self.blk_bit, self.dim_max = codec.derive(
        np.asarray(self.offsets), np.asarray(self.blk_last), np.asarray(self.blk_width), kernels.codes_of(self.blk_max)
      )
      n_words = (int(self.blk_bit[-1]) + 31) // 32 + 2
      if n_words != self.blk_words.shape[0] or self.blk_ptr[-1] != self.blk_last.shape[0]:
        raise fmt.IndexCorruptError(
          f"{path / 'blk_words.npy'}: its length disagrees with blk_width.npy, blk_last.npy and dim_counts.npy"
        )
    self.doc_lengths = arrays["doc_lengths.npy"]
    self._doc_ids_raw = arrays["doc_ids.npy"]
    self.impact_rows = arrays.get("impact_rows.npy")
    self.impact_weights = arrays.get("impact_weights.npy")
    self.fwd_offsets = arrays.get("fwd_offsets.npy")
    self.fwd_dims = arrays.get("fwd_dims.npy")
    self.fwd_weights = arrays.get("fwd_weights.npy")
    self.impact_offsets = None
    if self.impact_rows is not None:
      counts = arrays.get("impact_counts.npy")  # compressed: heads of `approx_head` postings per dim
      self.impact_offsets = self.offsets if counts is None else approx_lib.head_offsets(np.asarray(counts))
      if int(self.impact_offsets[-1]) != self.impact_rows.shape[0] or (
        self.fwd_offsets is not None and int(self.fwd_offsets[-1]) != self.n_postings
      ):
        raise fmt.IndexCorruptError(f"{path}: the approximate-search arrays disagree with the postings")
    self._table = _weight_table(self.weights.dtype, self.quant_scale)
    self._doc_ids = None
    self._pool: list[_Scratch] = []
    self._lock = threading.Lock()

  @classmethod
  def load(cls, path: str | os.PathLike, *, verify: str = "auto") -> "Index":
    """Opens an index directory.

    Args:
      path: directory written by `IndexWriter`.
      verify: "size" (default for > 1 GiB), "full" (re-hash every file),
        "auto", or "none".

    Returns:
      The Index (arrays memory-mapped read-only).

    Raises:
      FileNotFoundError, IndexFormatError (incomplete build), IndexCorruptError
      (a named file is missing, truncated or modified).
    """
    path = pathlib.Path(path)
    manifest = fmt.read_manifest(path)
    fmt.verify_files(path, manifest, verify)
    # Plain ndarray views of the maps: numba types an ndarray subclass (np.memmap) on a slow path at every call.
    arrays = {name: fmt.load_array(path, name, entry).view(np.ndarray) for name, entry in manifest["files"].items()}
    blocked = manifest.get("posting_format") == "blocked"
    postings = "impacts.npy" if blocked else "rows.npy"
    dims_file = "dim_counts.npy" if blocked else "offsets.npy"
    for name in (dims_file, postings, "doc_ids.npy", "doc_lengths.npy"):
      if name not in arrays:
        raise fmt.IndexCorruptError(f"{path / fmt.MANIFEST}: does not list {name}")
    if blocked:  # offsets from the per-dim counts (in RAM: 8 bytes per dim)
      counts = arrays["dim_counts.npy"]
      if counts.shape[0] != manifest["dim"]:
        raise fmt.IndexCorruptError(f"{path / dims_file}: {counts.shape[0]} dims, the manifest says {manifest['dim']}")
      offsets = np.zeros(manifest["dim"] + 1, np.int64)
      np.cumsum(counts, out=offsets[1:])
      arrays["offsets.npy"] = offsets
    if (
      arrays["offsets.npy"].shape[0] != manifest["dim"] + 1
      or (arrays[postings].shape[0] != manifest["n_postings"])
      or (arrays["doc_ids.npy"].shape[0] != manifest["n_docs"])
    ):
      raise fmt.IndexCorruptError(f"{path}: array lengths disagree with the manifest")
    if int(arrays["offsets.npy"][-1]) != manifest["n_postings"]:
      raise fmt.IndexCorruptError(f"{path / dims_file}: the postings do not add up to n_postings")
    return cls(path, manifest, arrays)

  # -- doc ids
  @property
  def doc_ids(self) -> np.ndarray:
    """All doc ids as a numpy str array (decoded once, cached)."""
    if self._doc_ids is None:
      self._doc_ids = np.char.decode(np.asarray(self._doc_ids_raw), "utf-8")
    return self._doc_ids

  def lookup(self, rows: np.ndarray) -> np.ndarray:
    """Doc id strings of `rows` (any shape); -1 maps to ''."""
    rows = np.asarray(rows)
    out = np.char.decode(self._doc_ids_raw[np.where(rows < 0, 0, rows)], "utf-8")
    return np.where(rows < 0, "", out)

  # -- search
  def _get_scratch(self) -> _Scratch:
    with self._lock:
      if self._pool:
        return self._pool.pop()
    if self.blocked:  # a window-sized accumulator: nothing of size N or D per thread
      return _Scratch(_WINDOW, 1)
    return _Scratch(self.n_docs, self.dim)

  def _put_scratch(self, s: _Scratch) -> None:
    with self._lock:
      self._pool.append(s)

  def search(
    self,
    q_idx_bk: Any,
    q_val_bk: Any,
    k: int = 1000,
    *,
    threads: int | None = 1,
    mode: str = "exact",
    budget: int = 10_000,
    n_cand: int = 500,
    theta: float | None = None,
    exact_below: int | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k documents for a batch of sparse queries.

    Args:
      q_idx_bk: [B, K] int query dims (or [K] for one query).
      q_val_bk: [B, K] weights; entries <= 0 are ignored.
      k: documents per query.
      threads: worker threads (None = os.cpu_count()).
      mode: "exact" (equals brute force) or "approx": score at a time over the
        impact-ordered lists (version 1 built with approx=True; compressed with
        approx=True: per-dim heads, `approx.py`), about `budget` postings per
        query, then exact re-scoring of the `n_cand` best candidates from the
        forward index. A compressed index without those lists (or given
        `theta`): block-max pruning against theta x the k-th score.
      budget: approx: postings read per query from the impact-ordered lists.
      n_cand: approx: candidates re-scored exactly (>= k).
      theta: approx, compressed: block-max pruning factor (default 1.5 where there
        are no impact-ordered lists; 1 = exact; larger = faster, lower recall).
      exact_below: approx: queries with fewer postings than this run exact search
        instead (default: score at a time: F x (budget + n_cand x mean doc length),
        the postings approx reads, F = 4 version 1; compressed F = 3, less N / 8 for
        the pass over the docs that exact search makes anyway; block-max: 20,000).

    Returns:
      doc_rows_bk int64 [B, k] best first (-1 past the matches) and
      scores_bk float32 [B, k] (-inf past the matches).
    """
    if mode not in ("exact", "approx"):
      raise ValueError(f"mode must be exact|approx, got {mode!r}")
    if mode == "approx" and self.impact_rows is None and not self.blocked:
      raise ValueError(f"{self.path}: mode='approx' needs an index built with approx=True")
    # Score-at-a-time over impact-ordered lists where the index has them (a compressed index: unless
    # theta asks for block-max pruning).
    saat = mode == "approx" and self.impact_rows is not None and (theta is None or not self.blocked)
    q_ptr, q_dims, q_w = queries_to_csr(q_idx_bk, q_val_bk, self.dim)
    nq = q_ptr.size - 1
    out_rows = np.full((nq, k), -1, np.int64)
    out_scores = np.full((nq, k), -np.inf, np.float32)
    if nq == 0 or k <= 0 or self.n_docs == 0:
      return out_rows, out_scores
    threads = min(threads or os.cpu_count() or 1, nq)

    def run(lo, hi):
      s = self._get_scratch()
      try:
        s.ensure(k, max(n_cand, k))
        sub_ptr = q_ptr[lo : hi + 1]
        modes = None
        if saat:  # few postings: exact search is cheaper than the approximate machinery
          below = exact_below
          if below is None:  # exact's cost ~ its postings; approx's ~ budget + re-scored postings
            below = (
              _EXACT_BELOW_FACTOR[self.blocked] * (budget + max(n_cand, k) * self.n_postings / max(self.n_docs, 1))
              - _EXACT_FIXED_PER_DOC[self.blocked] * self.n_docs
            )
          modes = kernels.query_postings(self.offsets, sub_ptr, q_dims) >= below  # one call: per-query cost matters
          if not modes.any():
            modes = None  # all exact: the exact path as is
        if self.blocked and modes is None:
          th = (1.5 if theta is None else theta) if mode == "approx" and not saat else 1.0
          below = 20_000 if exact_below is None else exact_below
          self._run_blocked(sub_ptr, q_dims, q_w, k, th, below, s, out_rows[lo:hi], out_scores[lo:hi])
          return
        if modes is None:
          modes = np.full(hi - lo, mode == "approx" and not saat)
        i = 0
        while i < hi - lo:  # runs of queries with the same mode
          j = i + 1
          while j < hi - lo and modes[j] == modes[i]:
            j += 1
          m = "approx" if modes[i] else "exact"
          ptr = sub_ptr[i : j + 1]
          self._run(
            m, ptr, q_dims, q_w, k, budget, max(n_cand, k), s, out_rows[lo + i : lo + j], out_scores[lo + i : lo + j]
          )
          i = j
      finally:
        self._put_scratch(s)

    if threads == 1:
      run(0, nq)
    else:
      bounds = np.linspace(0, nq, threads + 1).astype(np.int64)
      with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        list(ex.map(run, bounds[:-1], bounds[1:]))
    return out_rows, out_scores

  def _run_blocked(self, q_ptr, q_dims, q_w, k, theta, exact_below, s, out_rows, out_scores):
    blocked_kernels.search(
      self.offsets,
      self.blk_ptr,
      self.blk_bit,
      self.blk_last,
      self.blk_width,
      kernels.codes_of(self.blk_max),
      self.blk_words,
      kernels.codes_of(self.weights),
      self._table,
      kernels.codes_of(self.dim_max),
      q_ptr,
      q_dims,
      q_w,
      k,
      float(theta),
      int(exact_below),
      _WINDOW,
      s.acc,
      s.heap_s,
      s.heap_r,
      out_rows,
      out_scores,
    )

  # -- exchange
  def to_ciff(self, path: str | os.PathLike, **kwargs: Any) -> pathlib.Path:
    """Exports as a CIFF file (see `ciff.export_ciff` for kwargs)."""
    from laspar_jax.index import ciff  # pylint: disable=g-import-not-at-top  (protobuf only when used)

    return ciff.export_ciff(self, path, **kwargs)

  @classmethod
  def from_ciff(cls, ciff_path: str | os.PathLike, path: str | os.PathLike, **kwargs: Any) -> "Index":
    """Builds an index at `path` from a CIFF file and opens it (kwargs: `ciff.import_ciff`)."""
    from laspar_jax.index import ciff  # pylint: disable=g-import-not-at-top  (protobuf only when used)

    return cls.load(ciff.import_ciff(ciff_path, path, **kwargs))

  def compress(self, path: str | os.PathLike, **kwargs: Any) -> "Index":
    """Writes a compressed (version 2) copy at `path` and opens it (kwargs: `compress.compress_index`)."""
    return Index.load(compress.compress_index(self, path, **kwargs))

  # -- raw access (both versions)
  @property
  def value_dtype(self) -> np.dtype:
    """dtype of the stored impacts."""
    return self.weights.dtype

  def stored_range(self, p0: int, p1: int) -> np.ndarray:
    """Stored values (codes) of postings [p0, p1)."""
    return np.asarray(self.weights[p0:p1])

  def weights_range(self, p0: int, p1: int) -> np.ndarray:
    """float32 weights of postings [p0, p1) (dequantized)."""
    return quant.decode_weights(self.stored_range(p0, p1), self.quant_scale)

  def rows_array(self, d0: int = 0, d1: int | None = None) -> np.ndarray:
    """uint32 doc rows of the postings of dims [d0, d1) (decoded for a compressed index)."""
    d1 = self.dim if d1 is None else d1
    p0, p1 = int(self.offsets[d0]), int(self.offsets[d1])
    if not self.blocked:
      return self.rows[p0:p1]
    out = np.empty(p1 - p0, np.uint32)
    codec.decode_all(np.asarray(self.offsets), self.blk_words, self.blk_ptr, self.blk_bit, self.blk_width, d0, d1, out)
    return out

  def _run(self, mode, q_ptr, q_dims, q_w, k, budget, n_cand, s, out_rows, out_scores):
    if mode == "exact" and self.blocked:
      self._run_blocked(q_ptr, q_dims, q_w, k, 1.0, 0, s, out_rows, out_scores)
      return
    if mode == "approx" and self.blocked:
      approx_lib.run(self, self._table, q_ptr, q_dims, q_w, k, budget, n_cand, s, out_rows, out_scores)
      return
    if mode == "exact":
      kernels.exact(
        self.offsets,
        self.rows,
        kernels.codes_of(self.weights),
        self._table,
        q_ptr,
        q_dims,
        q_w,
        k,
        s.acc,
        s.touched,
        s.heap_s,
        s.heap_r,
        out_rows,
        out_scores,
      )
    else:
      kernels.approx(
        self.offsets,
        self.impact_rows,
        kernels.codes_of(self.impact_weights),
        self.fwd_offsets,
        self.fwd_dims,
        kernels.codes_of(self.fwd_weights),
        self._table,
        q_ptr,
        q_dims,
        q_w,
        k,
        budget,
        n_cand,
        s.acc,
        s.touched,
        s.qbits,
        s.heap_s,
        s.heap_r,
        s.cand_r,
        out_rows,
        out_scores,
      )

  # -- statistics
  def postings_per_dim(self) -> np.ndarray:
    """int64 [D] posting-list lengths."""
    return np.diff(np.asarray(self.offsets))

  def stats(self, q_idx_bk: Any = None, q_val_bk: Any = None) -> dict[str, float]:
    """Index statistics; with queries also their mean length and expected FLOPS.

    FLOPS per query = sum over the query's dims of the posting-list length
    (multiply-adds of term-at-a-time scoring), averaged over the queries.
    The corpus-only estimate `flops_expected_doc_query` = sum_j p_j^2 * N
    (p_j = fraction of docs with dim j; SPLADE's FLOPS, queries distributed
    like docs).
    """
    ppd = self.postings_per_dim()
    p = ppd / max(self.n_docs, 1)
    out = {
      "n_docs": self.n_docs,
      "dim": self.dim,
      "n_postings": self.n_postings,
      "mean_doc_length": self.n_postings / max(self.n_docs, 1),
      "empty_docs": int((np.asarray(self.doc_lengths) == 0).sum()),
      "nonempty_dims": int((ppd > 0).sum()),
      "max_postings_per_dim": int(ppd.max()) if ppd.size else 0,
      "mean_postings_per_nonempty_dim": float(ppd[ppd > 0].mean()) if (ppd > 0).any() else 0.0,
      "flops_expected_doc_query": float((p**2).sum() * self.n_docs),
      "index_bytes": self.size_bytes(),
    }
    if q_idx_bk is not None:
      q_ptr, q_dims, _ = queries_to_csr(q_idx_bk, q_val_bk, self.dim)
      nq = max(q_ptr.size - 1, 1)
      out["mean_query_length"] = q_dims.size / nq
      out["flops_per_query"] = float(ppd[q_dims].sum() / nq)
    return out

  def size_bytes(self) -> int:
    """Bytes of all index files."""
    return sum(int(e["bytes"]) for e in self.manifest["files"].values())

  def brute_force(self, q_idx_bk: Any, q_val_bk: Any) -> np.ndarray:
    """Dense [B, N] float64 scores from the postings (for tests; small indexes)."""
    w = self.weights_range(0, self.n_postings).astype(np.float64)
    x_nd = sp.csc_matrix(
      (w, np.asarray(self.rows_array()).astype(np.int64), np.asarray(self.offsets)), shape=(self.n_docs, self.dim)
    )
    q_ptr, q_dims, q_w = queries_to_csr(q_idx_bk, q_val_bk, self.dim)
    q_bd = sp.csr_matrix((q_w.astype(np.float64), q_dims, q_ptr), shape=(q_ptr.size - 1, self.dim))
    return np.asarray((q_bd @ x_nd.T).todense())


def search(
  index: Index | str | os.PathLike, q_idx_bk: Any, q_val_bk: Any, k: int = 1000, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k documents for sparse queries, given an `Index` or its directory.

  Args:
    index: an open `Index`, or the path of one (opened with `Index.load`).
    q_idx_bk: [B, K] query dims.
    q_val_bk: [B, K] query weights.
    k: documents per query.
    **kwargs: passed to `Index.search` (threads, mode, ...).

  Returns:
    (rows_bk, scores_bk): document rows (-1 past the hits) and scores.
  """
  if not isinstance(index, Index):
    index = Index.load(index)
  return index.search(q_idx_bk, q_val_bk, k, **kwargs)
