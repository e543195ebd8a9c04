"""Writes the compressed (format version 2, "blocked") posting files.

Layout of the posting part of a version-2 index (doc_ids.npy and
doc_lengths.npy are those of version 1)::

  dim_counts.npy   uint32 [D]: postings of each dim (offsets are their cumulative sum, at load)
  blk_words.npy    uint32 [ceil(bits / 32) + 2]: bit-packed row gaps of every block (codec.py), 2 zero words of padding
  blk_last.npy     uint32 [NB]: last doc row of each block
  blk_width.npy    uint8 [NB]: bits per gap of each block
  blk_max.npy      value dtype [NB]: largest stored impact of each block
  impacts.npy      value dtype [P]: impact of each posting (uint8/uint16 codes x quant_scale, float16, float32)

`compress_index` turns a version-1 index into a version-2 one (quantizing to
8 bits with one global linear scale by default); `IndexWriter(...,
posting_format="blocked")` builds one directly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time
from typing import Any

import numpy as np

from laspar_jax.index import approx as approx_lib
from laspar_jax.index import codec
from laspar_jax.index import format as fmt
from laspar_jax.index import quantize as quant
from laspar_jax.index.kernels import codes_of

BLOCKED_FILES = ("blk_words.npy", "blk_last.npy", "blk_width.npy", "blk_max.npy", "impacts.npy")
_CHUNK_POSTINGS = 1 << 23


def write_blocked(
  directory: pathlib.Path,
  offsets: np.ndarray,
  rows: np.ndarray,
  vals_fn: Any,
  value_dtype: np.dtype,
) -> dict[str, dict[str, Any]]:
  """Streams the blocked posting files of (offsets, rows, values) into `directory`.

  Args:
    directory: where the files go.
    offsets: int64 [D + 1].
    rows: uint32 [P] doc rows (memory-mapped is fine).
    vals_fn: (p0, p1) -> stored values of postings [p0, p1) in `value_dtype`.
    value_dtype: stored value dtype (uint8, uint16, float16, float32).

  Returns:
    Manifest entries of the written files.
  """
  value_dtype = np.dtype(value_dtype)
  writers = {
    "blk_words.npy": fmt.NpyStreamWriter(directory / "blk_words.npy", np.uint32, None),
    "blk_last.npy": fmt.NpyStreamWriter(directory / "blk_last.npy", np.uint32, None),
    "blk_width.npy": fmt.NpyStreamWriter(directory / "blk_width.npy", np.uint8, None),
    "blk_max.npy": fmt.NpyStreamWriter(directory / "blk_max.npy", value_dtype, None),
    "impacts.npy": fmt.NpyStreamWriter(directory / "impacts.npy", value_dtype, None),
  }
  dim = offsets.size - 1
  d0 = 0
  offsets = np.asarray(offsets)
  counts = np.diff(offsets)
  count_dtype = np.uint32 if not counts.size or counts.max() < 2**32 else np.uint64
  entries = {"dim_counts.npy": fmt.write_array(directory / "dim_counts.npy", counts.astype(count_dtype))}
  carry, bit0 = np.uint32(0), 0
  while d0 < dim:
    # Largest dim range with about _CHUNK_POSTINGS postings (at least one dim).
    d1 = int(np.searchsorted(offsets, offsets[d0] + _CHUNK_POSTINGS, side="right")) - 1
    d1 = min(max(d1, d0 + 1), dim)
    p0, p1 = int(offsets[d0]), int(offsets[d1])
    vals = np.ascontiguousarray(vals_fn(p0, p1), dtype=value_dtype)
    counts = np.diff(offsets[d0 : d1 + 1])
    n_blocks = int((-(-counts // codec.BLOCK)).sum())
    words = np.zeros(p1 - p0 + 2, np.uint32)
    words[0] = carry
    last = np.empty(n_blocks, np.uint32)
    width = np.empty(n_blocks, np.uint8)
    vmax = np.empty(n_blocks, vals.dtype)
    n_bits, nb = codec.encode_lists(
      offsets, np.ascontiguousarray(rows[p0:p1]), codes_of(vals), d0, d1, words, bit0, last, width, codes_of(vmax)
    )
    assert nb == n_blocks
    writers["blk_words.npy"].write(words[: n_bits >> 5])  # full words; the partial one carries over
    carry, bit0 = words[n_bits >> 5], n_bits & 31
    writers["blk_last.npy"].write(last)
    writers["blk_width.npy"].write(width)
    writers["blk_max.npy"].write(vmax)
    writers["impacts.npy"].write(vals)
    d0 = d1
  writers["blk_words.npy"].write(np.array([carry if bit0 else 0, 0, 0][: 3 if bit0 else 2], np.uint32))
  entries.update({name: w.close() for name, w in writers.items()})
  return entries


def compress_index(
  ix: Any,
  dst: str | os.PathLike,
  *,
  value_dtype: str = "uint8",
  overwrite: bool = False,
  approx: bool = False,
  approx_head: int = approx_lib.DEFAULT_HEAD,
) -> pathlib.Path:
  """Writes a compressed (version 2) copy of an open index to `dst` (also `Index.compress`).

  Args:
    ix: an open `Index` (either version).
    dst: the new index directory (written as `<dst>.tmp-<pid>`, renamed when complete).
    value_dtype: stored impacts: "uint8" (linear, scale = max weight / 255 in the manifest),
      "uint16", "float16" or "float32". An already quantized source keeps its codes and scale
      when the dtype is the same.
    overwrite: replace an existing `dst`.
    approx: also write the approximate-search structures (`approx.py`: per-dim
      impact-ordered heads and a forward index; about 3x the 8-bit postings on disk).
    approx_head: postings per dim kept in impact order.

  Returns:
    The path of the new index.
  """
  if value_dtype not in fmt.VALUE_DTYPES:
    raise ValueError(f"value_dtype must be one of {fmt.VALUE_DTYPES}, got {value_dtype!r}")
  dst = pathlib.Path(dst)
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} exists (pass overwrite=True to replace it)")
  t0 = time.time()
  fmt.remove_stale_tmp_dirs(dst)
  tmp = dst.parent / f"{dst.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    offsets = np.asarray(ix.offsets)
    src_dtype = ix.value_dtype
    out_dtype = np.dtype(value_dtype)
    scale = None
    if out_dtype.kind == "u":
      if src_dtype == out_dtype:
        scale = ix.quant_scale
      else:
        vmax = max(
          (
            float(ix.weights_range(p, min(p + _CHUNK_POSTINGS, ix.n_postings)).max())
            for p in range(0, ix.n_postings, _CHUNK_POSTINGS)
          ),
          default=0.0,
        )
        scale = quant.quantize_scale(vmax, 8 * out_dtype.itemsize)

    def vals_fn(p0, p1):
      if src_dtype == out_dtype:
        return ix.stored_range(p0, p1)
      w = ix.weights_range(p0, p1)
      if out_dtype.kind == "u":
        return quant.quantize(w, 8 * out_dtype.itemsize, scale)[0]
      return w.astype(out_dtype)

    files = {}
    files.update(write_blocked(tmp, offsets, ix.rows_array(), vals_fn, out_dtype))
    if approx:
      code_dtype = codes_of(np.zeros(0, out_dtype)).dtype
      files.update(
        approx_lib.write_approx(
          tmp,
          offsets,
          ix.rows_array(),
          lambda p0, p1: codes_of(np.ascontiguousarray(vals_fn(p0, p1), dtype=out_dtype)),
          np.asarray(ix.doc_lengths),
          code_dtype,
          out_dtype,
          approx_head,
        )
      )
    for name in ("doc_ids.npy", "doc_lengths.npy"):
      shutil.copyfile(ix.path / name, tmp / name)
      files[name] = dict(ix.manifest["files"][name])
    manifest = blocked_manifest(ix.manifest, files, value_dtype, scale)
    if approx:
      manifest.update(approx=True, approx_head=int(approx_head))
    manifest["stats"]["compress_seconds"] = time.time() - t0
    fmt.write_manifest(tmp, manifest)
    fmt.fsync_dir(tmp)
    fmt.commit_dir(tmp, dst, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


def blocked_manifest(
  base: dict[str, Any], files: dict[str, dict[str, Any]], value_dtype: str, scale: float | None
) -> dict[str, Any]:
  """A version-2 manifest from a version-1 one (`base`) and the new files."""
  manifest = {k: v for k, v in base.items() if k not in ("files", "approx")}
  manifest.update(
    format_version=fmt.FORMAT_VERSION_BLOCKED,
    posting_format="blocked",
    block_size=codec.BLOCK,
    value_dtype=value_dtype,
    quant_scale=scale,
    approx=False,
    files=files,
    created_unix=time.time(),
  )
  manifest["stats"] = dict(base.get("stats", {}))
  return manifest
