"""laspar_jax: learned sparse retrieval in JAX/Flax NNX.

The short public API (imported on first use; everything else lives in the
submodules):

  encoder, tokenizer = laspar_jax.load_encoder(path_or_hub_id, **overrides)
  for idx_bk, val_bk in laspar_jax.encode_sparse(encoder, tokenizer, texts, kind="query", k=128): ...
  path = laspar_jax.build_index(encoder, tokenizer, collection, "/tmp/index", k_doc=512)
  rows_bk, scores_bk = laspar_jax.search(path_or_index, q_idx_bk, q_val_bk, k=1000)
  report = laspar_jax.evaluate_encoder(encoder, tokenizer, collection, path, run_path="run.trec")

The functions keep their own names: `laspar_jax.encode` and
`laspar_jax.evaluate` are the submodules that hold them.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> (module, attribute)
_API = {
  "EncoderConfig": ("laspar_jax.models.sparse_encoder", "EncoderConfig"),
  "load_encoder": ("laspar_jax.models.sparse_encoder", "load_encoder"),
  "save_encoder": ("laspar_jax.models.sparse_encoder", "save_encoder"),
  "encode_sparse": ("laspar_jax.encode", "encode_sparse"),
  "build_index": ("laspar_jax.distributed_index", "index_collection"),
  "Index": ("laspar_jax.index.search", "Index"),
  "search": ("laspar_jax.index.search", "search"),
  "evaluate_encoder": ("laspar_jax.evaluate", "evaluate_encoder"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
  if name not in _API:
    raise AttributeError(f"module 'laspar_jax' has no attribute {name!r}")
  module, attr = _API[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value  # cache: later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_API))
