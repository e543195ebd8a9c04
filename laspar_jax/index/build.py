"""Streaming, out-of-core construction of the inverted index.

`IndexWriter.add` takes batches of (doc ids, idx_bk, val_bk). Postings are
buffered in RAM; when the buffer passes a third of `ram_budget_bytes` it is
sorted by dim and spilled to a run file, and `close` merges the runs within
the budget (`spill.py`), appending to the output files while their blake2b is
computed. The finished directory is renamed into place.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from laspar_jax.index import approx as approx_lib
from laspar_jax.index import compress, spill
from laspar_jax.index import format as fmt
from laspar_jax.index import quantize as quant
from laspar_jax.index.kernels import codes_of

_RUN_VAL_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}


# ----------------------------------------------------------------------------- writer
class IndexWriter:
  """Builds an index directory from streamed batches, within a RAM budget.

  Usage::

    with IndexWriter(path, dim=30522) as w:
      for ids, idx_bk, val_bk in batches:
        w.add(ids, idx_bk, val_bk)
    # path now holds a complete, checksummed index.

  Dims must be unique within a row (top-k output is). Postings with weight
  <= 0 are dropped; documents with no postings are kept (they score 0).
  """

  def __init__(
    self,
    path: str | os.PathLike,
    dim: int,
    *,
    value_dtype: str = "float32",
    quant_scale: float | None = None,
    ram_budget_bytes: int = 2 << 30,
    encoder_hash: str = "",
    approx: bool = False,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    posting_format: str = "raw",
  ):
    """Creates `<path>.tmp-<pid>` to build into.

    Args:
      path: final index directory (must not exist unless overwrite).
      dim: D, number of dims.
      value_dtype: float32 | float16 | uint8 | uint16 (integer = quantized).
      quant_scale: weight per integer step for uint dtypes; None = max / (2**bits-1)
        over the whole collection (runs then hold float32 until the merge).
      ram_budget_bytes: target for buffered + merge memory.
      encoder_hash: fingerprint of the encoder config, stored in the manifest.
      approx: also write what `Index.search(mode="approx")` needs: per-dim
        weight-ordered postings and a forward (doc-major) index. With a uint
        value_dtype this needs an explicit quant_scale.
      overwrite: replace an existing index at `path` (atomically, at close).
      metadata: extra JSON-able info for the manifest.
      posting_format: "raw" (format version 1: uint32 rows + values) or
        "blocked" (version 2: bit-packed row gaps in blocks of 128 with per-block
        max impacts, see compress.py; searched with block-max pruning; with
        approx, impact-ordered heads and a forward index, see approx.py).
    """
    if posting_format not in ("raw", "blocked"):
      raise ValueError(f"posting_format must be raw|blocked, got {posting_format!r}")
    self.posting_format = posting_format
    self.approx = bool(approx)
    if value_dtype not in fmt.VALUE_DTYPES:
      raise ValueError(f"value_dtype must be one of {fmt.VALUE_DTYPES}, got {value_dtype!r}")
    if dim <= 0 or dim > np.iinfo(np.int32).max:
      raise ValueError(f"dim must be in [1, 2**31), got {dim}")
    self.path = pathlib.Path(path)
    if self.path.exists() and not overwrite:
      raise FileExistsError(f"{self.path} exists (pass overwrite=True to replace it)")
    self.dim = int(dim)
    self.value_dtype = value_dtype
    self.quant_scale = quant_scale
    self.ram_budget_bytes = int(ram_budget_bytes)
    self.encoder_hash = encoder_hash
    self.impact_order = approx and posting_format == "raw"  # version 1's full impact-ordered copies
    if self.impact_order and value_dtype.startswith("uint") and quant_scale is None:
      raise ValueError("approx=True with a quantized value_dtype needs quant_scale")
    self.overwrite = overwrite
    self.metadata = dict(metadata or {})
    quantized = value_dtype.startswith("uint")
    self._run_dtype = np.dtype(np.float32 if quantized and quant_scale is None else _RUN_VAL_DTYPES[value_dtype])
    self._bytes_per_posting = 8 + self._run_dtype.itemsize  # dim + row + value
    fmt.remove_stale_tmp_dirs(self.path)
    self.tmp = self.path.parent / f"{self.path.name}.tmp-{os.getpid()}"
    if self.tmp.exists():
      shutil.rmtree(self.tmp)
    (self.tmp / "runs").mkdir(parents=True)
    self._ids_file = open(self.tmp / "runs" / "doc_ids.txt", "wb")
    if self.impact_order:
      self._fwd_dims = fmt.NpyStreamWriter(self.tmp / "fwd_dims.npy", np.int32, None)
      self._fwd_vals = fmt.NpyStreamWriter(self.tmp / "fwd_weights.npy", self._run_dtype, None)
    self._max_id_len = 1
    self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self._buf_n = 0
    self._runs: list[spill.Run] = []
    self._doc_lengths: list[np.ndarray] = []
    self.n_docs = 0
    self.n_postings = 0
    self._val_max = 0.0
    self._closed = False
    self._t0 = time.time()

  # -- context manager
  def __enter__(self) -> "IndexWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()

  def abort(self) -> None:
    """Drops the partial build (the temporary directory)."""
    if not self._closed:
      self._closed = True
      self._ids_file.close()
      shutil.rmtree(self.tmp, ignore_errors=True)

  # -- input
  def add(self, doc_ids: Sequence[str], idx_bk: Any, val_bk: Any) -> None:
    """Adds a batch of documents (rows n_docs .. n_docs + B - 1).

    Args:
      doc_ids: B doc id strings (no newlines).
      idx_bk: [B, K] int dims in [0, D).
      val_bk: [B, K] weights; entries <= 0 are dropped.
    """
    if self._closed:
      raise RuntimeError("IndexWriter is closed")
    idx_bk = np.asarray(idx_bk)
    val_bk = np.asarray(val_bk, dtype=np.float32)
    if idx_bk.ndim != 2 or idx_bk.shape != val_bk.shape or idx_bk.shape[0] != len(doc_ids):
      raise ValueError(f"shape mismatch: {len(doc_ids)} ids, idx {idx_bk.shape}, val {val_bk.shape}")
    b = idx_bk.shape[0]
    lines = []
    for d in doc_ids:
      e = str(d).encode("utf-8")
      if b"\n" in e or not e:
        raise ValueError(f"doc id {d!r} is empty or contains a newline")
      lines.append(e)
    if self.n_docs + b > np.iinfo(np.uint32).max:
      raise ValueError("more than 2**32-1 documents")
    mask_bk = val_bk > 0
    rb, _ = np.nonzero(mask_bk)
    dims = idx_bk[mask_bk]
    if dims.size and (dims.min() < 0 or dims.max() >= self.dim):
      raise ValueError(f"dims must lie in [0, {self.dim}), got [{dims.min()}, {dims.max()}]")
    vals = val_bk[mask_bk]
    if vals.size:
      self._val_max = max(self._val_max, float(vals.max()))
    if self._run_dtype.kind == "u":
      vals, _ = quant.quantize(vals, 8 * self._run_dtype.itemsize, self.quant_scale)
    else:
      vals = vals.astype(self._run_dtype)
    rows = (rb + self.n_docs).astype(np.uint32)
    if self.impact_order:
      self._fwd_dims.write(dims)
      self._fwd_vals.write(vals)
    self._buf.append((dims.astype(np.int32), rows, vals))
    self._buf_n += dims.size
    self._doc_lengths.append(mask_bk.sum(axis=1).astype(np.int32))
    self._max_id_len = max([self._max_id_len] + [len(e) for e in lines])
    self._ids_file.write(b"\n".join(lines) + b"\n")
    self.n_docs += b
    self.n_postings += dims.size
    if self._buf_n * self._bytes_per_posting > self.ram_budget_bytes // 3:
      self._spill()

  def _spill(self) -> None:
    if not self._buf:
      return
    dims = np.concatenate([x[0] for x in self._buf])
    rows = np.concatenate([x[1] for x in self._buf])
    vals = np.concatenate([x[2] for x in self._buf])
    self._buf, self._buf_n = [], 0
    self._runs.append(spill.write_run(self.tmp / "runs" / f"run{len(self._runs):05d}", dims, rows, vals, self.dim))

  # -- merge
  def close(self) -> pathlib.Path:
    """Merges runs, writes arrays + manifest, renames into place. Returns the path."""
    if self._closed:
      raise RuntimeError("IndexWriter is closed")
    try:
      return self._finish()
    except BaseException:
      self.abort()
      raise

  def _final_scale(self) -> float | None:
    if not self.value_dtype.startswith("uint"):
      return None
    if self.quant_scale is not None:
      return float(self.quant_scale)
    return quant.quantize_scale(self._val_max, 8 if self.value_dtype == "uint8" else 16)

  def _finish(self) -> pathlib.Path:
    self._ids_file.close()
    self._spill()
    t_merge = time.time()
    counts_total = np.zeros(self.dim, np.int64)
    for r in self._runs:
      counts_total += r.counts
    offsets = np.zeros(self.dim + 1, np.int64)
    np.cumsum(counts_total, out=offsets[1:])
    assert offsets[-1] == self.n_postings
    scale = self._final_scale()
    out_dtype = np.dtype(_RUN_VAL_DTYPES[self.value_dtype])
    files: dict[str, dict[str, Any]] = {}
    files["offsets.npy"] = fmt.write_array(self.tmp / "offsets.npy", offsets)
    files.update(
      spill.merge_runs(
        self._runs,
        offsets,
        self.tmp,
        run_dtype=self._run_dtype,
        out_dtype=out_dtype,
        scale=scale,
        ram_budget_bytes=self.ram_budget_bytes,
        impact_order=self.impact_order,
      )
    )
    doc_lengths = np.concatenate(self._doc_lengths) if self._doc_lengths else np.zeros(0, np.int32)
    files["doc_lengths.npy"] = fmt.write_array(self.tmp / "doc_lengths.npy", doc_lengths)
    files["doc_ids.npy"] = self._write_doc_ids()
    if self.impact_order:
      fwd_offsets = np.zeros(self.n_docs + 1, np.int64)
      np.cumsum(doc_lengths, out=fwd_offsets[1:])
      files["fwd_offsets.npy"] = fmt.write_array(self.tmp / "fwd_offsets.npy", fwd_offsets)
      files["fwd_dims.npy"] = self._fwd_dims.close()
      files["fwd_weights.npy"] = self._fwd_vals.close()
    shutil.rmtree(self.tmp / "runs")
    if self.posting_format == "blocked":
      rows = np.load(self.tmp / "rows.npy", mmap_mode="r") if self.n_postings else np.zeros(0, np.uint32)
      vals = np.load(self.tmp / "weights.npy", mmap_mode="r") if self.n_postings else np.zeros(0, out_dtype)
      files.update(compress.write_blocked(self.tmp, offsets, rows, lambda p0, p1: vals[p0:p1], out_dtype))
      if self.approx:
        codes = codes_of(vals)
        files.update(
          approx_lib.write_approx(
            self.tmp, offsets, rows, lambda p0, p1: codes[p0:p1], doc_lengths, codes.dtype, out_dtype
          )
        )
        del codes
      del rows, vals
      for name in ("rows.npy", "weights.npy", "offsets.npy"):
        (self.tmp / name).unlink()
        del files[name]
    nonempty = counts_total > 0
    manifest = {
      "format": fmt.FORMAT_NAME,
      "format_version": fmt.FORMAT_VERSION,
      "dim": self.dim,
      "n_docs": self.n_docs,
      "n_postings": self.n_postings,
      "value_dtype": self.value_dtype,
      "quant_scale": scale,
      "encoder_hash": self.encoder_hash,
      "approx": self.impact_order,
      "files": files,
      "stats": {
        "mean_doc_length": float(doc_lengths.mean()) if doc_lengths.size else 0.0,
        "empty_docs": int((doc_lengths == 0).sum()),
        "nonempty_dims": int(nonempty.sum()),
        "max_postings_per_dim": int(counts_total.max()) if self.dim else 0,
        "n_runs": len(self._runs),
        "build_seconds": time.time() - self._t0,
        "merge_seconds": time.time() - t_merge,
      },
      "created_unix": time.time(),
      "metadata": self.metadata,
    }
    if self.posting_format == "blocked":
      manifest = compress.blocked_manifest(manifest, files, self.value_dtype, scale)
      if self.approx:
        manifest.update(approx=True, approx_head=approx_lib.DEFAULT_HEAD)
    fmt.write_manifest(self.tmp, manifest)
    fmt.fsync_dir(self.tmp)
    self._closed = True
    self._commit()
    return self.path

  def _write_doc_ids(self) -> dict[str, Any]:
    dtype = np.dtype(f"S{self._max_id_len}")
    w = fmt.NpyStreamWriter(self.tmp / "doc_ids.npy", dtype, self.n_docs)
    with open(self.tmp / "runs" / "doc_ids.txt", "rb") as f:
      while True:
        lines = f.readlines(1 << 24)
        if not lines:
          break
        w.write(np.array([ln.rstrip(b"\n") for ln in lines], dtype=dtype))
    return w.close()

  def _commit(self) -> None:
    fmt.commit_dir(self.tmp, self.path, self.overwrite)


# ----------------------------------------------------------------------------- helpers
def build_index(
  batches: Iterable[tuple[Sequence[str], Any, Any]], path: str | os.PathLike, dim: int, **writer_kwargs
) -> pathlib.Path:
  """Builds an index from an iterable of (doc_ids, idx_bk, val_bk) batches.

  Args:
    batches: the documents, in row order.
    path: index directory to create.
    dim: D.
    **writer_kwargs: passed to `IndexWriter`.

  Returns:
    The index path.
  """
  with IndexWriter(path, dim, **writer_kwargs) as w:
    for doc_ids, idx_bk, val_bk in batches:
      w.add(doc_ids, idx_bk, val_bk)
  return w.path
