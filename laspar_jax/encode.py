"""Batched, jitted sparse encoding of texts to top-k (dims, weights) rows; encoder -> index glue.

Texts are encoded in length-sorted windows (less padding, fewer shapes) and
given back in input order. Used by indexing, search and evaluation.
`index_collection` streams a collection's documents through `encode_sparse`
into `laspar_jax.index.IndexWriter` (the index itself knows no encoder).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import pathlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from laspar_jax import index as index_lib
from laspar_jax import io_utils
from laspar_jax import platform, sparsify
from laspar_jax.data import sources
from laspar_jax.tokenizer import Tokenizer
from laspar_jax.models.sparse_encoder import SparseEncoder


def _model_shards(mesh: Mesh | None, dim: int) -> int:
  """Shards of D on the mesh's 'model' axis (1: no two-stage top-k)."""
  n = 1 if mesh is None else dict(mesh.shape).get("model", 1)
  return n if n > 1 and dim % n == 0 else 1


@functools.lru_cache(maxsize=32)
def _encode_fn(
  graphdef,
  kind: str,
  k: int,
  min_weight: float,
  compute_dtype: str,
  mesh: Mesh | None = None,
  matmul_precision: str = "default",
):
  def fn(state, ids_bl, mask_bl):
    encoder = nnx.merge(graphdef, state)
    rep_bv = encoder(ids_bl, mask_bl, kind=kind)
    if mesh is not None:  # D sharded on 'model': per-shard top-k, then top-k of the candidates
      return sparsify.sharded_topk(rep_bv, k, mesh, "model", min_weight=min_weight)
    return sparsify.topk(rep_bv, k, min_weight=min_weight)

  return platform.jit(fn, compute_dtype=compute_dtype, matmul_precision=matmul_precision)


def encode_sparse(
  encoder: SparseEncoder,
  tokenizer: Tokenizer,
  texts: Iterable[str],
  *,
  kind: str,
  k: int,
  batch_size: int = 64,
  max_length: int | None = None,
  min_weight: float = 0.0,
  window: int = 16,
  total: int | None = None,
  progress: bool = False,
  mesh: Mesh | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Encodes texts to their top-k sparse rows, in input order.

  Args:
    encoder: the sparse encoder.
    tokenizer: its tokenizer.
    texts: strings (any iterable; consumed in windows of batch_size * window).
    kind: "query" or "doc" (tower, prefix and default max length).
    k: dims kept per row.
    batch_size: rows per jitted call (the last batch is padded to it).
    max_length: truncation (default: the config's query/doc max length).
    min_weight: weights <= this become 0.
    window: batches per length-sorted window.
    total: number of texts (for the progress bar).
    progress: show a tqdm bar.
    mesh: the encoder's device mesh; when it has a 'model' axis of size > 1
      that divides D, the top-k runs per D-shard and then over the shards'
      candidates (`sparsify.sharded_topk`, equal to the global top-k), so no
      device gathers the full B x D output.

  Yields:
    (idx_bk int32 [b, k], val_bk float32 [b, k]) per batch of up to batch_size
    texts; rows with fewer than k positive weights carry 0 in the tail.
  """
  cfg = encoder.config
  prefix = cfg.query_prefix if kind == "query" else cfg.doc_prefix
  max_length = max_length or (cfg.query_max_len if kind == "query" else cfg.doc_max_len)
  graphdef, state = nnx.split(encoder)
  shard_mesh = mesh if _model_shards(mesh, encoder.output_dim) > 1 else None
  fn = _encode_fn(graphdef, kind, int(k), float(min_weight), cfg.dtype, shard_mesh, cfg.matmul_precision)
  bar = tqdm(total=total, desc=f"encode {kind}s", unit=kind, disable=not progress)
  it = iter(texts)
  while True:
    chunk = [t for _, t in zip(range(batch_size * window), it)]
    if not chunk:
      break
    order = np.argsort([len(t) for t in chunk], kind="stable")
    idx_nk = np.zeros((len(chunk), min(k, encoder.output_dim)), np.int32)
    val_nk = np.zeros(idx_nk.shape, np.float32)
    for s in range(0, len(chunk), batch_size):
      rows = order[s : s + batch_size]
      b = tokenizer([chunk[i] for i in rows], max_length=max_length, prefix=prefix)
      pad = batch_size - len(rows)
      ids, mask = b["input_ids"], b["attention_mask"]
      if pad:
        ids = np.pad(ids, ((0, pad), (0, 0)), constant_values=tokenizer.pad_id)
        mask = np.pad(mask, ((0, pad), (0, 0)))
      i_bk, v_bk = jax.device_get(fn(state, ids, mask))
      idx_nk[rows], val_nk[rows] = i_bk[: len(rows)], v_bk[: len(rows)]
      bar.update(len(rows))
    for s in range(0, len(chunk), batch_size):
      yield idx_nk[s : s + batch_size], val_nk[s : s + batch_size]
  bar.close()


# ----------------------------------------------------------------------------- encoder -> index


def encoder_fingerprint(encoder: Any, **extra: Any) -> str:
  """sha256 (16 hex) of the encoder's config (if any), class name and `extra`."""
  cfg = getattr(encoder, "config", None)
  if hasattr(cfg, "fingerprint") and not extra:
    return str(cfg.fingerprint())
  if dataclasses.is_dataclass(cfg):
    cfg = dataclasses.asdict(cfg)
  blob = json.dumps({"class": type(encoder).__name__, "config": cfg, "extra": extra}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def params_digest(encoder: Any) -> str | None:
  """blake2b (16 hex) of an NNX encoder's parameter values (None: not NNX, or not all on this host).

  Two encoders of one config (e.g. before and after training) share
  `encoder_fingerprint` but not this; `index_collection` stores it in the
  manifest metadata ("encoder_params") and evaluation compares it.
  """
  if not isinstance(encoder, nnx.Module):
    return None
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(encoder, nnx.Param))[0]
  h = hashlib.blake2b(digest_size=8)
  for path, leaf in leaves:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    arr = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{arr.dtype}:{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).data)
  return h.hexdigest()


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


def doc_batches(
  encoder: Any,
  tokenizer: Any,
  docs: Iterable[sources.Doc],
  *,
  k: int,
  batch_size: int = 32,
  max_length: int | None = None,
  min_weight: float = 0.0,
  mesh: Mesh | None = None,
  window: int = 16,
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
  """Encodes a doc stream once: (doc ids, idx_bk, val_bk) per batch, in stream order.

  Args are those of `encode_sparse` (kind="doc"); `window` batches are length-sorted together.
  """
  pending: collections.deque[str] = collections.deque()

  def texts():
    for doc in docs:
      pending.append(doc.doc_id)
      yield sources.doc_text(doc)

  for idx_bk, val_bk in encode_sparse(
    encoder,
    tokenizer,
    texts(),
    kind="doc",
    k=k,
    batch_size=batch_size,
    max_length=max_length,
    min_weight=min_weight,
    mesh=mesh,
    window=window,
  ):
    ids = [pending.popleft() for _ in range(idx_bk.shape[0])]
    yield ids, np.asarray(idx_bk), np.asarray(val_bk)


def index_collection(
  encoder: SparseEncoder,
  tokenizer: Tokenizer,
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
  mesh: Mesh | None = None,
  **writer_kwargs: Any,
) -> pathlib.Path:
  """Encodes every document and writes the inverted index at `path`.

  Args:
    encoder: the sparse encoder (e.g. from `sparse_encoder.load_encoder`).
    tokenizer: its tokenizer.
    docs: a `data.sources.Collection` (its `.docs()` is streamed; its `name`
      and `num_docs` go to the manifest and progress bar) or an iterable of
      `Doc`.
    path: index directory.
    k_doc: dims kept per document.
    batch_size: documents per jitted encoder call.
    value_dtype: stored weights: float32 | float16 | uint8 | uint16.
    approx: also write the structures of `Index.search(mode="approx")`.
    ram_budget_bytes: memory target of the index build.
    overwrite: replace an existing index (atomically, when complete).
    progress: show a tqdm bar.
    max_length: document truncation (default: the encoder config's).
    min_weight: weights <= this are dropped.
    dim: D (default: read from the encoder / tokenizer).
    mesh: passed to `encode_sparse` (two-stage top-k when D is sharded).
    **writer_kwargs: more `IndexWriter` arguments (quant_scale, encoder_hash,
      metadata).

  Returns:
    The index path. Encode throughput (docs/s) and the encoder's
    `params_digest` ("encoder_params") are stored in the manifest metadata.

  Raises:
    ValueError: the corpus has no document (nothing is written).
  """
  dim = dim or encoder_dim(encoder, tokenizer)
  writer_kwargs.setdefault("encoder_hash", encoder_fingerprint(encoder))
  meta = dict(writer_kwargs.pop("metadata", None) or {})
  meta.update(collection=getattr(docs, "name", None), k_doc=k_doc)
  if (digest := params_digest(encoder)) is not None:
    meta["encoder_params"] = digest
  stream = docs.docs() if hasattr(docs, "docs") else iter(docs)
  try:
    first = next(stream)
  except StopIteration:
    raise ValueError(
      f"the corpus {getattr(docs, 'name', '')!r} has no documents: no index written at {os.fspath(path)}"
    ) from None
  stream = itertools.chain([first], stream)
  batches = doc_batches(
    encoder, tokenizer, stream, k=k_doc, batch_size=batch_size, max_length=max_length, min_weight=min_weight, mesh=mesh
  )
  bar = tqdm(total=getattr(docs, "num_docs", None), unit="doc", desc="index", disable=not progress)
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
      bar.update(len(ids))
    encode_s = time.time() - t0
    w.metadata["encode_seconds"] = encode_s
    w.metadata["encode_docs_per_second"] = w.n_docs / max(encode_s, 1e-9)
  bar.close()
  return w.path
