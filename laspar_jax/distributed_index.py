"""Indexing on several hosts: each encodes its share into its own part, process 0 merges.

`index_collection(...)` is the one index build: on one process it streams
the encoded documents into an `IndexWriter`; with P > 1 processes
(`jax.distributed`):

  1. every host counts the corpus and takes a contiguous block of documents
     (`distributed.share`), cut at multiples of the encoder's window
     (batch_size * WINDOW documents, sorted by length inside), so each
     document is encoded in the same batch as on one host;
  2. host p encodes its block into `<index>.parts/part-<p>` (its own spill
     runs, `index.merge.PartWriter`); no host writes the index itself;
  3. after a barrier, process 0 merges the parts in host order into
     `<index>` (`index.merge.merge_parts`: rows offset by the documents of
     the hosts before) and removes the parts; a second barrier lets the
     other hosts return once the index exists.

The result equals, doc for doc and posting for posting, the index one
process builds (tests/test_multihost.py). `<index>` and its `.parts` folder
must be on a filesystem every host sees (NFS, gcsfuse); on one machine any
local path works. Encoding needs no collectives: each host runs the encoder
on its own devices.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from laspar_jax import distributed, encode, io_utils, platform
from laspar_jax import index as index_lib
from laspar_jax.index import merge as merge_lib

WINDOW = 16  # batches per length-sorted window: `encode.encode_sparse`'s default, used by index_collection


def _count(docs: Any) -> int:
  n = getattr(docs, "num_docs", None)
  if isinstance(n, (int, np.integer)):
    return int(n)
  return sum(1 for _ in docs.docs())


def parts_root(path: str | os.PathLike) -> pathlib.Path:
  """Where the hosts' parts of the index at `path` are written: `<path>.parts`."""
  path = pathlib.Path(path)
  return path.parent / f"{path.name}.parts"


def index_collection(
  encoder: Any,
  tokenizer: Any,
  docs: Any,
  path: str | os.PathLike,
  *,
  k_doc: int = 512,
  batch_size: int = 32,
  value_dtype: str = "float32",
  approx: bool = False,
  ram_budget_bytes: int = 4 << 30,
  overwrite: bool = False,
  progress: bool = True,
  max_length: int | None = None,
  min_weight: float = 0.0,
  dim: int | None = None,
  mesh: Any = None,
  process_index: int | None = None,
  process_count: int | None = None,
  **writer_kwargs: Any,
) -> pathlib.Path:
  """Encodes every document and writes the inverted index at `path` (THE index build; see the module docstring).

  On one process the documents stream straight into an `IndexWriter`; on
  several each host writes its share as a part and process 0 merges them.
  How many documents were cut at max_length is printed and stored in the
  manifest metadata (docs_cut, docs_encoded, docs_max_length).

  Args:
    encoder: the sparse encoder (e.g. from `sparse_encoder.load_encoder`).
    tokenizer: its tokenizer.
    docs: a `data.sources.Collection` (its `.docs()` is streamed; its `name`
      and `num_docs` go to the manifest and progress bar); on one process
      also any iterable of `Doc`.
    path: index directory.
    k_doc: dims kept per document.
    batch_size: documents per jitted encoder call (0: `platform.encode_batch_size()`).
    value_dtype: stored weights: float32 | float16 | uint8 | uint16.
    approx: also write the structures of `Index.search(mode="approx")`.
    ram_budget_bytes: memory target of the index build.
    overwrite: replace an existing index (atomically, when complete).
    progress: show a tqdm bar.
    max_length: document truncation (default: the encoder config's).
    min_weight: weights <= this are dropped.
    dim: D (default: read from the encoder / tokenizer).
    mesh: one process: passed to `encode_sparse` (two-stage top-k when D is sharded).
    process_index, process_count: this host's share (default: jax's).
    **writer_kwargs: more `IndexWriter` arguments (quant_scale, encoder_hash, metadata).

  Returns:
    The index path (on every host, once the index is complete). Encode
    throughput and the encoder's `params_digest` ("encoder_params") are in the
    manifest metadata.

  Raises:
    ValueError: the corpus has no document (nothing is written).
  """
  p = jax.process_index() if process_index is None else process_index
  n_proc = jax.process_count() if process_count is None else process_count
  dim = dim or encode.encoder_dim(encoder, tokenizer)
  writer_kwargs.setdefault("encoder_hash", encode.encoder_fingerprint(encoder))
  meta = dict(writer_kwargs.pop("metadata", None) or {})
  meta.update(collection=getattr(docs, "name", None), k_doc=k_doc)
  if (digest := encode.params_digest(encoder)) is not None:
    meta["encoder_params"] = digest
  stats = encode.new_stats()
  batch_size = platform.encode_batch_size(batch_size)  # 0: the platform's default
  enc_kw = dict(k=k_doc, batch_size=batch_size, max_length=max_length, min_weight=min_weight, window=WINDOW)
  if n_proc == 1:
    stream = docs.docs() if hasattr(docs, "docs") else iter(docs)
    try:
      first = next(stream)
    except StopIteration:
      raise ValueError(
        f"the corpus {getattr(docs, 'name', '')!r} has no documents: no index written at {os.fspath(path)}"
      ) from None
    total = getattr(docs, "num_docs", None)
    batches = encode.doc_batches(
      encoder,
      tokenizer,
      itertools.chain([first], stream),
      mesh=mesh,
      progress=progress,
      total=total,
      stats=stats,
      **enc_kw,
    )
    t0 = time.time()
    with (
      io_utils.disk_space_errors(path, "the index"),
      index_lib.IndexWriter(
        path,
        dim,
        value_dtype=value_dtype,
        approx=approx,
        ram_budget_bytes=ram_budget_bytes,
        overwrite=overwrite,
        metadata=meta,
        **writer_kwargs,
      ) as w,
    ):
      for ids, idx_bk, val_bk in batches:
        w.add(ids, idx_bk, val_bk)
      encode_s = time.time() - t0
      w.metadata["encode_seconds"] = encode_s
      w.metadata["encode_docs_per_second"] = w.n_docs / max(encode_s, 1e-9)
      w.metadata.update(truncation_report(stats, "docs"))
    print(truncation_line(stats, "documents"))
    return w.path
  path = pathlib.Path(os.path.abspath(os.fspath(path)))
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
  n = _count(docs)
  if n == 0:
    raise ValueError(f"the corpus {getattr(docs, 'name', '')!r} has no documents: no index written at {path}")
  lo, hi = distributed.share(n, p, n_proc, align=batch_size * WINDOW)
  t0 = time.time()
  part = merge_lib.part_dir(parts_root(path), p)
  bar = tqdm(total=hi - lo, unit="doc", desc=f"index (host {p})", disable=not progress)
  with merge_lib.PartWriter(
    part, dim, value_dtype=value_dtype, approx=approx, ram_budget_bytes=ram_budget_bytes, metadata=meta, **writer_kwargs
  ) as w:
    if hi > lo:
      for ids, idx_bk, val_bk in encode.doc_batches(
        encoder, tokenizer, itertools.islice(docs.docs(), lo, hi), stats=stats, **enc_kw
      ):
        w.add(ids, idx_bk, val_bk)
        bar.update(len(ids))
    w.metadata["encode_seconds"] = time.time() - t0
    w.metadata.update(truncation_report(stats, "docs"))
  bar.close()
  print(truncation_line(stats, f"documents (host {p})"))
  distributed.barrier("laspar_index_parts")
  if p == 0:
    meta["encode_seconds"] = time.time() - t0  # the slowest host's, barrier included
    meta["encode_docs_per_second"] = n / max(meta["encode_seconds"], 1e-9)
    meta["hosts"] = n_proc
    parts_meta = [
      merge_lib.read_part(merge_lib.part_dir(parts_root(path), i)).get("metadata", {}) for i in range(n_proc)
    ]
    meta.update(truncation_report(sum_stats(parts_meta), "docs"))
    parts = [merge_lib.part_dir(parts_root(path), i) for i in range(n_proc)]
    merge_lib.merge_parts(parts, path, ram_budget_bytes=ram_budget_bytes, overwrite=overwrite, metadata=meta)
    os.rmdir(parts_root(path))
  distributed.barrier("laspar_index_merged")
  return path


def truncation_report(stats: dict[str, Any], what: str) -> dict[str, Any]:
  """Manifest/JSON keys of an `encode.new_stats()` tally: {what}_cut, {what}_encoded, {what}_max_length, fallbacks."""
  out = {f"{what}_cut": stats["cut"], f"{what}_encoded": stats["texts"], f"{what}_max_length": stats["max_length"]}
  if stats.get("fallbacks"):
    out[f"{what}_filter_fallbacks"] = stats["fallbacks"]
  return out


def sum_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
  """One tally from the hosts' `truncation_report(..., "docs")` metadata."""
  return {
    "cut": sum(int(m.get("docs_cut", 0)) for m in parts),
    "texts": sum(int(m.get("docs_encoded", 0)) for m in parts),
    "max_length": max([int(m.get("docs_max_length", 0)) for m in parts] or [0]),
    "fallbacks": sum(int(m.get("docs_filter_fallbacks", 0)) for m in parts),
  }


def truncation_line(stats: dict[str, Any], what: str) -> str:
  """One line saying how many texts were cut at which length (never silent)."""
  return f"truncation: {stats['cut']} of {stats['texts']} {what} cut at {stats['max_length']} tokens"
