"""Streaming, out-of-core construction of the inverted index.

`IndexWriter.add` takes batches of (doc ids, idx_bk, val_bk). Postings are
buffered in RAM; when the buffer passes a third of `ram_budget_bytes` it is
counting-sorted by dim (O(n + D), stable so rows stay ascending) and spilled to
a run file. Runs are written with dims in *descending* order, so the merge,
which walks dims upwards in chunks that fit the budget, consumes each run from
its end and truncates it as it goes: peak disk is the final index plus one
chunk, not twice the index. Each chunk is assembled in RAM by copying every
run's slice to its per-dim cursor, then appended to the output files while
their blake2b is computed. The finished directory is renamed into place.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any, Iterable, Iterator, Sequence

import numba
import numpy as np

from laspar_jax import sparsify
from laspar_jax.index import format as fmt

_RUN_VAL_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8,
                   "uint16": np.uint16}


# ----------------------------------------------------------------------------- kernels
@numba.njit(nogil=True, cache=True)
def _spill_sort(dims, rows, vals, dim):
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
def _merge_block(out_rows, out_vals, cursor, block_rows, block_vals, counts_chunk):
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
def _impact_order(offsets_local, keys, rows, vals, out_rows, out_vals):
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


def _bits_view(arr: np.ndarray) -> np.ndarray:
  """float16 arrays are seen by numba as uint16 (it has no float16)."""
  return arr.view(np.uint16) if arr.dtype == np.float16 else arr


def decode_weights(vals: np.ndarray, scale: float | None) -> np.ndarray:
  """Stored weights -> float32 (dequantizes integer impacts)."""
  if vals.dtype.kind == "u":
    return sparsify.dequantize(vals, scale if scale is not None else 1.0)
  return vals.astype(np.float32)


# ----------------------------------------------------------------------------- writer
@dataclasses.dataclass
class _Run:
  rows_path: pathlib.Path
  vals_path: pathlib.Path
  counts: np.ndarray  # int32 [D]
  n: int
  consumed: int = 0   # postings of dims below the merge position (at the file end)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_tmp_dirs(path: str | os.PathLike) -> list[pathlib.Path]:
  """Removes `<path>.tmp-<pid>` left by builds whose process is dead."""
  path = pathlib.Path(path)
  removed = []
  for cand in path.parent.glob(path.name + ".tmp-*"):
    try:
      pid = int(cand.name.rsplit("-", 1)[1])
    except ValueError:
      continue
    if pid != os.getpid() and not _pid_alive(pid):
      shutil.rmtree(cand, ignore_errors=True)
      removed.append(cand)
  return removed


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

  def __init__(self, path: str | os.PathLike, dim: int, *, value_dtype: str = "float32",
               quant_scale: float | None = None, ram_budget_bytes: int = 2 << 30,
               encoder_hash: str = "", approx: bool = False,
               overwrite: bool = False, metadata: dict[str, Any] | None = None):
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
    """
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
    self.impact_order = approx
    if approx and value_dtype.startswith("uint") and quant_scale is None:
      raise ValueError("approx=True with a quantized value_dtype needs quant_scale")
    self.overwrite = overwrite
    self.metadata = dict(metadata or {})
    quantized = value_dtype.startswith("uint")
    self._run_dtype = np.dtype(np.float32 if quantized and quant_scale is None
                               else _RUN_VAL_DTYPES[value_dtype])
    self._bytes_per_posting = 8 + self._run_dtype.itemsize  # dim + row + value
    remove_stale_tmp_dirs(self.path)
    self.tmp = self.path.parent / f"{self.path.name}.tmp-{os.getpid()}"
    if self.tmp.exists():
      shutil.rmtree(self.tmp)
    (self.tmp / "runs").mkdir(parents=True)
    self._ids_file = open(self.tmp / "runs" / "doc_ids.txt", "wb")
    if approx:
      self._fwd_dims = fmt.NpyStreamWriter(self.tmp / "fwd_dims.npy", np.int32, None)
      self._fwd_vals = fmt.NpyStreamWriter(self.tmp / "fwd_weights.npy", self._run_dtype, None)
    self._max_id_len = 1
    self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self._buf_n = 0
    self._runs: list[_Run] = []
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
      raise ValueError(f"shape mismatch: {len(doc_ids)} ids, idx {idx_bk.shape}, "
                       f"val {val_bk.shape}")
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
      vals, _ = sparsify.quantize(vals, 8 * self._run_dtype.itemsize, self.quant_scale)
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
    if dims.size >= np.iinfo(np.int32).max:
      raise ValueError("a run holds >= 2**31 postings; lower ram_budget_bytes")
    s_rows, s_vals, counts = _spill_sort(dims, rows, _bits_view(vals), self.dim)
    del dims, rows, vals
    i = len(self._runs)
    rp = self.tmp / "runs" / f"run{i:05d}.rows"
    vp = self.tmp / "runs" / f"run{i:05d}.vals"
    s_rows.tofile(rp)
    s_vals.tofile(vp)
    self._runs.append(_Run(rp, vp, counts, int(s_rows.size)))

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
    return sparsify.quantize_scale(self._val_max, 8 if self.value_dtype == "uint8" else 16)

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
    w_rows = fmt.NpyStreamWriter(self.tmp / "rows.npy", np.uint32, self.n_postings)
    w_vals = fmt.NpyStreamWriter(self.tmp / "weights.npy", out_dtype, self.n_postings)
    if self.impact_order:
      w_irows = fmt.NpyStreamWriter(self.tmp / "impact_rows.npy", np.uint32, self.n_postings)
      w_ivals = fmt.NpyStreamWriter(self.tmp / "impact_weights.npy", out_dtype,
                                    self.n_postings)
    per_posting = 2 * (4 + max(out_dtype.itemsize, self._run_dtype.itemsize)) + 4
    if self.impact_order:
      per_posting += 8 + 4 + 8
    chunk_cap = max(1, self.ram_budget_bytes // 2 // per_posting)
    d0 = 0
    while d0 < self.dim:
      # Largest d1 with offsets[d1] - offsets[d0] <= chunk_cap (at least one dim).
      d1 = int(np.searchsorted(offsets, offsets[d0] + chunk_cap, side="right")) - 1
      d1 = min(max(d1, d0 + 1), self.dim)
      n = int(offsets[d1] - offsets[d0])
      out_rows = np.empty(n, np.uint32)
      out_vals = np.empty(n, self._run_dtype)
      cursor = (offsets[d0:d1] - offsets[d0]).astype(np.int64)
      for r in self._runs:
        counts_chunk = r.counts[d0:d1]
        m = int(counts_chunk.sum(dtype=np.int64))
        if m == 0:
          continue
        end = r.n - r.consumed
        start = end - m
        isz = self._run_dtype.itemsize
        b_rows = np.fromfile(r.rows_path, np.uint32, count=m, offset=4 * start)
        b_vals = np.fromfile(r.vals_path, self._run_dtype, count=m, offset=isz * start)
        _merge_block(out_rows, _bits_view(out_vals), cursor, b_rows, _bits_view(b_vals),
                     counts_chunk)
        r.consumed += m
        os.truncate(r.rows_path, 4 * start)
        os.truncate(r.vals_path, isz * start)
        del b_rows, b_vals
      if self._run_dtype != out_dtype:  # float32 runs -> quantized output
        out_vals, _ = sparsify.quantize(out_vals, 8 * out_dtype.itemsize, scale)
      w_rows.write(out_rows)
      w_vals.write(out_vals)
      if self.impact_order:
        keys = decode_weights(out_vals, scale)
        i_rows = np.empty_like(out_rows)
        i_vals = np.empty_like(out_vals)
        _impact_order((offsets[d0:d1 + 1] - offsets[d0]), keys, out_rows, _bits_view(out_vals),
                      i_rows, _bits_view(i_vals))
        del keys
        w_irows.write(i_rows)
        w_ivals.write(i_vals)
        del i_rows, i_vals
      del out_rows, out_vals
      d0 = d1
    files["rows.npy"] = w_rows.close()
    files["weights.npy"] = w_vals.close()
    if self.impact_order:
      files["impact_rows.npy"] = w_irows.close()
      files["impact_weights.npy"] = w_ivals.close()
    doc_lengths = (np.concatenate(self._doc_lengths) if self._doc_lengths
                   else np.zeros(0, np.int32))
    files["doc_lengths.npy"] = fmt.write_array(self.tmp / "doc_lengths.npy", doc_lengths)
    files["doc_ids.npy"] = self._write_doc_ids()
    if self.impact_order:
      fwd_offsets = np.zeros(self.n_docs + 1, np.int64)
      np.cumsum(doc_lengths, out=fwd_offsets[1:])
      files["fwd_offsets.npy"] = fmt.write_array(self.tmp / "fwd_offsets.npy", fwd_offsets)
      files["fwd_dims.npy"] = self._fwd_dims.close()
      files["fwd_weights.npy"] = self._fwd_vals.close()
    shutil.rmtree(self.tmp / "runs")
    nonempty = counts_total > 0
    manifest = {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
        "dim": self.dim, "n_docs": self.n_docs, "n_postings": self.n_postings,
        "value_dtype": self.value_dtype, "quant_scale": scale,
        "encoder_hash": self.encoder_hash, "approx": self.impact_order,
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
        "created_unix": time.time(), "metadata": self.metadata,
    }
    fmt.write_manifest(self.tmp, manifest)
    _fsync_dir(self.tmp)
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
    old = None
    if self.path.exists():
      if not self.overwrite:
        raise FileExistsError(f"{self.path} appeared during the build")
      old = self.path.parent / f"{self.path.name}.old-{os.getpid()}"
      os.rename(self.path, old)
    os.rename(self.tmp, self.path)
    _fsync_dir(self.path.parent)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


# ----------------------------------------------------------------------------- helpers
def build_index(batches: Iterable[tuple[Sequence[str], Any, Any]], path: str | os.PathLike,
                dim: int, **writer_kwargs) -> pathlib.Path:
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


def encoder_fingerprint(encoder: Any, **extra: Any) -> str:
  """sha256 (16 hex) of the encoder's config (if any), class name and `extra`."""
  cfg = getattr(encoder, "config", None)
  if hasattr(cfg, "fingerprint") and not extra:
    return str(cfg.fingerprint())
  if dataclasses.is_dataclass(cfg):
    cfg = dataclasses.asdict(cfg)
  blob = json.dumps({"class": type(encoder).__name__, "config": cfg, "extra": extra},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encoder_dim(encoder: Any, tokenizer: Any = None) -> int:
  """D of an encoder's output, from the usual attribute names."""
  for obj in (encoder, getattr(encoder, "head", None), getattr(encoder, "doc_head", None)):
    for name in ("output_dim", "out_dim", "dim", "sparse_dim", "vocab_size", "num_outputs"):
      v = getattr(obj, name, None) if obj is not None else None
      if isinstance(v, (int, np.integer)) and v > 0:
        return int(v)
  if tokenizer is not None and getattr(tokenizer, "vocab_size", None):
    return int(tokenizer.vocab_size)
  raise ValueError("cannot tell the encoder's output dim; pass dim=")


def _doc_batches(encoder: Any, tokenizer: Any, docs: Iterable[Any], *, k: int,
                 batch_size: int, max_length: int | None, min_weight: float
                 ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
  """Encodes a doc stream once, pairing each encoded batch with its doc ids."""
  from laspar_jax import encode as encode_lib
  from laspar_jax.data import sources
  pending: collections.deque[str] = collections.deque()

  def texts():
    for doc in docs:
      pending.append(doc.doc_id)
      yield sources.doc_text(doc)

  for idx_bk, val_bk in encode_lib.encode_sparse(
      encoder, tokenizer, texts(), kind="doc", k=k, batch_size=batch_size,
      max_length=max_length, min_weight=min_weight):
    ids = [pending.popleft() for _ in range(idx_bk.shape[0])]
    yield ids, np.asarray(idx_bk), np.asarray(val_bk)


def build_index_from_encoder(encoder: Any, tokenizer: Any, collection: Any,
                             path: str | os.PathLike, *, k_doc: int = 512,
                             batch_size: int = 64, max_length: int | None = None,
                             min_weight: float = 0.0, dim: int | None = None,
                             progress: bool = True, **writer_kwargs) -> pathlib.Path:
  """Encodes every document of `collection` and writes the index at `path`.

  Args:
    encoder, tokenizer: from `laspar_jax.models.sparse_encoder.load_encoder`.
    collection: a `laspar_jax.data.sources.Collection` (its `.docs()` is streamed).
    path: index directory.
    k_doc: dims kept per document.
    batch_size, max_length, min_weight: passed to `encode_sparse`.
    dim: D (default: read from the encoder / tokenizer).
    progress: show a tqdm bar.
    **writer_kwargs: passed to `IndexWriter` (value_dtype, ram_budget_bytes, ...).

  Returns:
    The index path. Encode throughput (docs/s) is stored in the manifest metadata.
  """
  dim = dim or encoder_dim(encoder, tokenizer)
  writer_kwargs.setdefault("encoder_hash", encoder_fingerprint(encoder))
  meta = dict(writer_kwargs.pop("metadata", None) or {})
  meta.update(collection=getattr(collection, "name", None), k_doc=k_doc)
  batches = _doc_batches(encoder, tokenizer, collection.docs(), k=k_doc,
                         batch_size=batch_size, max_length=max_length, min_weight=min_weight)
  if progress:
    import tqdm
    total = getattr(collection, "num_docs", None)
    bar = tqdm.tqdm(total=total, unit="doc", desc="index")
  t0 = time.time()
  with IndexWriter(path, dim, metadata=meta, **writer_kwargs) as w:
    for ids, idx_bk, val_bk in batches:
      w.add(ids, idx_bk, val_bk)
      if progress:
        bar.update(len(ids))
    encode_s = time.time() - t0
    w.metadata["encode_seconds"] = encode_s
    w.metadata["encode_docs_per_second"] = w.n_docs / max(encode_s, 1e-9)
  if progress:
    bar.close()
  return w.path
