"""Indexing on several hosts: each encodes its share into its own part, process 0 merges.

`index_collection(...)` has the arguments of `encode.index_collection` and
is the same call on one process. With P > 1 processes (`jax.distributed`):

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

from laspar_jax import distributed
from laspar_jax import encode
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
  process_index: int | None = None,
  process_count: int | None = None,
  **writer_kwargs: Any,
) -> pathlib.Path:
  """`encode.index_collection` over all processes: one share each, one merge (see the module docstring).

  Args:
    encoder, tokenizer, docs, path, k_doc, batch_size, value_dtype, approx, ram_budget_bytes,
      overwrite, progress, max_length, min_weight, dim, **writer_kwargs: as `encode.index_collection`
      (docs must be a Collection: every host reads it).
    process_index, process_count: this host's share (default: jax's).

  Returns:
    The index path (on every host, once the index is complete).
  """
  p = jax.process_index() if process_index is None else process_index
  n_proc = jax.process_count() if process_count is None else process_count
  if n_proc == 1:
    return encode.index_collection(
      encoder,
      tokenizer,
      docs,
      path,
      k_doc=k_doc,
      batch_size=batch_size,
      value_dtype=value_dtype,
      approx=approx,
      ram_budget_bytes=ram_budget_bytes,
      overwrite=overwrite,
      progress=progress,
      max_length=max_length,
      min_weight=min_weight,
      dim=dim,
      **writer_kwargs,
    )
  path = pathlib.Path(os.path.abspath(os.fspath(path)))
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
  dim = dim or encode.encoder_dim(encoder, tokenizer)
  writer_kwargs.setdefault("encoder_hash", encode.encoder_fingerprint(encoder))
  meta = dict(writer_kwargs.pop("metadata", None) or {})
  meta.update(collection=getattr(docs, "name", None), k_doc=k_doc)
  if (digest := encode.params_digest(encoder)) is not None:
    meta["encoder_params"] = digest
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
        encoder,
        tokenizer,
        itertools.islice(docs.docs(), lo, hi),
        k=k_doc,
        batch_size=batch_size,
        max_length=max_length,
        min_weight=min_weight,
        window=WINDOW,
      ):
        w.add(ids, idx_bk, val_bk)
        bar.update(len(ids))
    w.metadata["encode_seconds"] = time.time() - t0
  bar.close()
  distributed.barrier("laspar_index_parts")
  if p == 0:
    meta["encode_seconds"] = time.time() - t0  # the slowest host's, barrier included
    meta["encode_docs_per_second"] = n / max(meta["encode_seconds"], 1e-9)
    meta["hosts"] = n_proc
    parts = [merge_lib.part_dir(parts_root(path), i) for i in range(n_proc)]
    merge_lib.merge_parts(parts, path, ram_budget_bytes=ram_budget_bytes, overwrite=overwrite, metadata=meta)
    os.rmdir(parts_root(path))
  distributed.barrier("laspar_index_merged")
  return path
