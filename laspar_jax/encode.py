"""Batched, jitted sparse encoding of texts to top-k (dims, weights) rows.

Texts are encoded in length-sorted windows (less padding, fewer shapes) and
given back in input order. Used by indexing, search and evaluation.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from laspar_jax import sparsify, xla_options
from laspar_jax.data.tokenize import Tokenizer
from laspar_jax.models.sparse_encoder import SparseEncoder


@functools.lru_cache(maxsize=32)
def _encode_fn(graphdef, kind: str, k: int, min_weight: float, compute_dtype: str):
  def fn(state, ids_bl, mask_bl):
    encoder = nnx.merge(graphdef, state)
    rep_bv = encoder(ids_bl, mask_bl, kind=kind)
    return sparsify.topk(rep_bv, k, min_weight=min_weight)
  return xla_options.jit(fn, compute_dtype=compute_dtype)


def encode_sparse(encoder: SparseEncoder, tokenizer: Tokenizer, texts: Iterable[str], *, kind: str,
                  k: int, batch_size: int = 64, max_length: int | None = None, min_weight: float = 0.0,
                  window: int = 16, total: int | None = None, progress: bool = False,
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

  Yields:
    (idx_bk int32 [b, k], val_bk float32 [b, k]) per batch of up to batch_size
    texts; rows with fewer than k positive weights carry 0 in the tail.
  """
  cfg = encoder.config
  prefix = cfg.query_prefix if kind == "query" else cfg.doc_prefix
  max_length = max_length or (cfg.query_max_len if kind == "query" else cfg.doc_max_len)
  graphdef, state = nnx.split(encoder)
  fn = _encode_fn(graphdef, kind, int(k), float(min_weight), cfg.dtype)
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
      rows = order[s:s + batch_size]
      b = tokenizer([chunk[i] for i in rows], max_length=max_length, prefix=prefix)
      pad = batch_size - len(rows)
      ids, mask = b["input_ids"], b["attention_mask"]
      if pad:
        ids = np.pad(ids, ((0, pad), (0, 0)), constant_values=tokenizer.pad_id)
        mask = np.pad(mask, ((0, pad), (0, 0)))
      i_bk, v_bk = jax.device_get(fn(state, ids, mask))
      idx_nk[rows], val_nk[rows] = i_bk[:len(rows)], v_bk[:len(rows)]
      bar.update(len(rows))
    for s in range(0, len(chunk), batch_size):
      yield idx_nk[s:s + batch_size], val_nk[s:s + batch_size]
  bar.close()
