"""laspar_jax: learned sparse retrieval in JAX/Flax NNX.

The short public API (everything else lives in the submodules):
  load_encoder(path_or_hub_id, **overrides) -> (encoder, tokenizer)
  encode_sparse(encoder, tokenizer, texts, kind="query"|"doc", k=...) -> iterator of (idx_bk, val_bk)
    (functions keep their own names: `encode` and `evaluate` are submodules)
  build_index(encoder, tokenizer, collection, path, ...) -> index path
  search(index_or_path, q_idx_bk, q_val_bk, k=1000, mode="exact"|"approx") -> (rows_bk, scores_bk)
  evaluate_encoder(encoder, tokenizer, collection, index, ...) -> metrics and efficiency report
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from laspar_jax.encode import encode_sparse
from laspar_jax.evaluate import evaluate_encoder
from laspar_jax.index import Index
from laspar_jax.index import build_index_from_encoder as build_index
from laspar_jax.models.sparse_encoder import EncoderConfig, load_encoder, save_encoder


def search(index: Index | str | os.PathLike, q_idx_bk: Any, q_val_bk: Any, k: int = 1000,
           **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """Top-k documents for sparse queries (an `Index` or its directory); see `Index.search`."""
  if not isinstance(index, Index):
    index = Index.load(index)
  return index.search(q_idx_bk, q_val_bk, k, **kwargs)


__all__ = ["EncoderConfig", "Index", "build_index", "encode_sparse", "evaluate_encoder", "load_encoder",
           "save_encoder", "search"]
