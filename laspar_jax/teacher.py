"""Dense-teacher embeddings cached on disk, and clustered batching over them.

`dense_embeddings(cache_dir, model, items)` encodes (id, text) items with a
dense model (the project's BertModel with real weights from
`laspar_jax.models.hf_weights.load`, mean pooling, L2 normalisation, as
sentence-transformers' all-MiniLM-L6-v2) and caches them in `cache_dir`:

  embeddings.npy   float16 [N, E], memory-mapped on load
  ids.npy          the N ids (unicode), row order
  fingerprint.json model (resolved path, config.json hash, quick hash of the
                   weight files: names, sizes, first and last MiB), sha256 of
                   the ids and texts, count, max_length, prefix, pooling, dim

A later call recomputes the fingerprint (one pass over the texts; the model is
not loaded unless needed). A cache whose fingerprint differs in anything is
stale: with on_stale="recompute" (default) it is rebuilt, with "error"
`StaleCacheError` is raised; it is never used silently. A cache directory
without a readable fingerprint, or whose arrays do not match it, counts as
stale too. Writing goes to a temporary sibling directory renamed into place
(`io_utils.atomic_directory`), so a killed run leaves either the old cache or
the new one. The cache is memory-mapped, so it must be a local directory.

`balanced_clusters` groups training examples by their teacher query
embedding (`data.batching = "clustered"` in `data.assemble`).

Cross-encoder teacher *scores* are read by `laspar_jax.data.training.read_teacher_scores`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tqdm
from flax import nnx

from laspar_jax import io_utils
from laspar_jax import platform
from laspar_jax.data.sources import doc_text
from laspar_jax.models import hf_weights
from laspar_jax.models.heads import pooling

FORMAT_VERSION = 1


class StaleCacheError(RuntimeError):
  """The cached embeddings were made from another model, texts or settings."""


@dataclasses.dataclass
class DenseEmbeddings:
  """Embeddings [N, E] (float16, memory-mapped) with their ids."""

  ids: np.ndarray
  emb: np.ndarray
  fingerprint: dict[str, Any]

  def __post_init__(self):
    self._row = {str(k): i for i, k in enumerate(self.ids.tolist())}

  def __len__(self) -> int:
    return len(self.ids)

  def lookup(self, ids: Sequence[str]) -> np.ndarray:
    """float32 [len(ids), E] rows for the ids. Raises KeyError for an unknown id."""
    rows = np.fromiter((self._row[i] for i in ids), np.int64, count=len(ids))
    return np.asarray(self.emb[rows], np.float32)


@dataclasses.dataclass
class TeacherEmbeddings:
  """Dense-teacher embeddings of queries and documents (what TrainPipeline takes)."""

  queries: DenseEmbeddings
  docs: DenseEmbeddings


def _quick_file_hash(path: str, h) -> None:
  size = os.path.getsize(path)
  h.update(f"{os.path.basename(path)}:{size}".encode())
  with open(path, "rb") as f:
    h.update(f.read(1 << 20))
    if size > 2 << 20:
      f.seek(-(1 << 20), os.SEEK_END)
      h.update(f.read())


def model_fingerprint(model_path: str) -> dict[str, str]:
  """Identifies a model folder: its path, config.json hash, quick hash of the weights."""
  cfg = os.path.join(model_path, "config.json")
  h = hashlib.sha256()
  for name in sorted(os.listdir(model_path)):
    if name.endswith((".safetensors", ".bin")):
      _quick_file_hash(os.path.join(model_path, name), h)
  with open(cfg, "rb") as f:
    cfg_hash = hashlib.sha256(f.read()).hexdigest()
  return {"model_path": os.path.abspath(model_path), "config_sha256": cfg_hash, "weights_quick_sha256": h.hexdigest()}


def _texts_fingerprint(items: Iterable[tuple[str, str]]) -> tuple[str, int]:
  h, n = hashlib.sha256(), 0
  for doc_id, text in items:
    h.update(doc_id.encode("utf-8", "replace") + b"\x00" + text.encode("utf-8", "replace") + b"\x01")
    n += 1
  return h.hexdigest(), n


def encode_dense(
  loaded, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 256, prefix: str = ""
) -> Iterator[np.ndarray]:
  """Mean-pooled, L2-normalised embeddings of texts, float32 [b, E] per batch.

  Args:
    loaded: `hf_weights.load(...)` result (model + tokenizer).
    texts: the strings.
    batch_size: texts per forward pass.
    max_length: truncation length.
    prefix: prepended to every text.

  Yields:
    e_bd float32 arrays, in text order.
  """
  graphdef, state = nnx.split(loaded.model)

  def embed_fn(state, ids_bl, mask_bl):
    model = nnx.merge(graphdef, state)
    h_btd = model(ids_bl, mask_bl, deterministic=True)
    return pooling.l2_normalize(pooling.mean_pool(h_btd, mask_bl))

  embed = platform.jit(embed_fn, compute_dtype=loaded.model.dtype)

  for i in range(0, len(texts), batch_size):
    chunk = list(texts[i : i + batch_size])
    n = len(chunk)
    chunk += [""] * (batch_size - n)  # one shape per bucket: pad the last batch
    tok = loaded.tokenizer(chunk, max_length=max_length, prefix=prefix)
    e_bd = embed(state, tok["input_ids"], tok["attention_mask"])
    yield np.asarray(e_bd[:n], np.float32)


def _read_cache(path: str) -> DenseEmbeddings | None:
  try:
    with open(os.path.join(path, "fingerprint.json")) as f:
      fp = json.load(f)
    ids = np.load(os.path.join(path, "ids.npy"))
    emb = np.load(os.path.join(path, "embeddings.npy"), mmap_mode="r")
  except (OSError, ValueError):
    return None
  if emb.dtype != np.float16 or emb.shape != (fp.get("count"), fp.get("dim")) or len(ids) != fp.get("count"):
    return None
  return DenseEmbeddings(ids, emb, fp)


def _diff(a: dict, b: dict) -> str:
  keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return ", ".join(f"{k}: cached {a.get(k)!r} != wanted {b.get(k)!r}" for k in keys)


def dense_embeddings(
  cache_dir: str | os.PathLike,
  model,
  items: Callable[[], Iterable[tuple[str, str]]] | Sequence[tuple[str, str]],
  *,
  max_length: int = 256,
  batch_size: int = 64,
  prefix: str = "",
  on_stale: str = "recompute",
  progress: bool = True,
) -> DenseEmbeddings:
  """Loads the cached embeddings of items, or encodes and caches them.

  Args:
    cache_dir: cache directory (created; one per item set and model).
    model: a model folder / hub id (loaded only when encoding is needed) or an
      `hf_weights.load(...)` result.
    items: (id, text) pairs, or a callable returning a fresh iterable of them
      (e.g. `lambda: ((d.doc_id, doc_text(d)) for d in collection.docs())`);
      iterated once to fingerprint and, when encoding, once more.
    max_length: truncation length.
    batch_size: encoding batch size.
    prefix: text prefix (part of the fingerprint).
    on_stale: "recompute" or "error" for a cache that does not match.
    progress: tqdm bar while encoding.

  Returns:
    DenseEmbeddings with a float16 memory-mapped [N, E] array.

  Raises:
    StaleCacheError: the cache does not match and on_stale == "error".
  """
  if on_stale not in ("recompute", "error"):
    raise ValueError(f"on_stale must be 'recompute' or 'error', got {on_stale!r}")
  if not io_utils.is_local(cache_dir):
    raise ValueError(f"{cache_dir}: the dense-teacher cache is memory-mapped and must be a local directory")
  get_items = items if callable(items) else (lambda: items)
  cache_dir = os.fspath(cache_dir)
  loaded = None if isinstance(model, (str, os.PathLike)) else model
  model_path = hf_weights.resolve(model) if loaded is None else loaded.path
  texts_hash, count = _texts_fingerprint(get_items())
  want = {
    "format": FORMAT_VERSION,
    **model_fingerprint(model_path),
    "texts_sha256": texts_hash,
    "count": count,
    "max_length": max_length,
    "prefix": prefix,
    "pooling": "mean+l2",
    "dtype": "float16",
  }

  if os.path.exists(cache_dir):
    cached = _read_cache(cache_dir)
    have = {k: v for k, v in (cached.fingerprint if cached else {}).items() if k != "dim"}
    if cached is not None and have == want:
      return cached
    why = _diff(have, want) if cached is not None else "unreadable or inconsistent cache files"
    if on_stale == "error":
      raise StaleCacheError(f"{cache_dir}: stale dense-teacher cache ({why})")

  if loaded is None:
    loaded = hf_weights.load(model_path, max_length=max_length)
  ids, texts = [], []
  for doc_id, text in get_items():
    ids.append(doc_id)
    texts.append(text)
  with io_utils.atomic_directory(os.path.abspath(cache_dir)) as tmp_path:
    tmp = os.fspath(tmp_path)
    emb = None
    row = 0
    bar = tqdm.tqdm(
      total=count, desc=f"dense teacher -> {os.path.basename(cache_dir)}", disable=not progress, unit="text"
    )
    for e_bd in encode_dense(loaded, texts, batch_size=batch_size, max_length=max_length, prefix=prefix):
      if emb is None:
        emb = np.lib.format.open_memmap(
          os.path.join(tmp, "embeddings.npy"), mode="w+", dtype=np.float16, shape=(count, e_bd.shape[1])
        )
      emb[row : row + len(e_bd)] = e_bd
      row += len(e_bd)
      bar.update(len(e_bd))
    bar.close()
    dim = 0 if emb is None else emb.shape[1]
    if emb is None:
      np.save(os.path.join(tmp, "embeddings.npy"), np.zeros((0, 0), np.float16))
    else:
      emb.flush()
      del emb
    np.save(os.path.join(tmp, "ids.npy"), np.array(ids, dtype=str))
    with open(os.path.join(tmp, "fingerprint.json"), "w") as f:
      json.dump({**want, "dim": dim}, f, indent=1)
  out = _read_cache(cache_dir)
  assert out is not None
  return out


def teacher_embeddings(
  cache_root: str | os.PathLike,
  model,
  collection,
  examples,
  *,
  q_len: int = 32,
  d_len: int = 256,
  batch_size: int = 64,
  on_stale: str = "recompute",
  progress: bool = True,
) -> TeacherEmbeddings:
  """Dense-teacher embeddings of the queries and documents that training examples use.

  Only the documents named by the examples (positives and negative pools) are
  encoded, not the whole corpus. Caches live in <cache_root>/queries and
  <cache_root>/docs (see dense_embeddings); temporary folders of killed runs
  there are removed first.

  Args:
    cache_root: directory for the two caches.
    model: model folder / hub id, or an `hf_weights.load(...)` result.
    collection: a Collection (`.queries`, `.doc(id)`).
    examples: TrainExamples.
    q_len, d_len: truncation lengths for queries and documents.
    batch_size: encoding batch size.
    on_stale: "recompute" or "error".
    progress: tqdm bars.

  Returns:
    TeacherEmbeddings for TrainPipeline(teacher=...).
  """
  if isinstance(model, (str, os.PathLike)):
    model = hf_weights.resolve(model)
  io_utils.remove_stale_tmp(cache_root)  # `queries.tmp-<pid>` / `docs.tmp-<pid>` of killed runs
  qids = sorted({e.qid for e in examples})
  dids = sorted({d for e in examples for d in (e.pos_id, *e.neg_ids)})
  kw = dict(batch_size=batch_size, on_stale=on_stale, progress=progress)
  q = dense_embeddings(
    os.path.join(cache_root, "queries"),
    model,
    lambda: ((i, collection.queries[i]) for i in qids),
    max_length=q_len,
    **kw,
  )
  d = dense_embeddings(
    os.path.join(cache_root, "docs"),
    model,
    lambda: ((i, doc_text(collection.doc(i))) for i in dids),
    max_length=d_len,
    **kw,
  )
  return TeacherEmbeddings(q, d)


# ----------------------------------------------------------------------------- clustered batching


def balanced_clusters(x_nd: np.ndarray, size: int, *, seed: int = 0, iters: int = 5) -> list[np.ndarray]:
  """Splits rows into clusters of exactly `size` rows (one may be smaller) that lie close together.

  Balanced k-means by recursive bisection: each node runs a few rounds of
  2-means whose assignment splits at a balanced rank of the distance
  difference, so the left part holds size * ceil(nb / 2) rows (nb = batches in
  the node). Cost O(N d log(N / size)); numpy only.

  Args:
    x_nd: embeddings (e.g. teacher query embeddings, one per example).
    size: cluster size (the batch size).
    seed: centroid initialisation.
    iters: 2-means rounds per split.

  Returns:
    A list of index arrays, sorted by their first index.
  """
  x_nd = np.asarray(x_nd, np.float32)
  rng = np.random.default_rng(seed)
  out: list[np.ndarray] = []
  stack = [np.arange(len(x_nd))]
  while stack:
    idx = stack.pop()
    if len(idx) <= size:
      out.append(np.sort(idx))
      continue
    n_left = size * ((-(-len(idx) // size) + 1) // 2)
    x = x_nd[idx]
    c = x[rng.choice(len(idx), 2, replace=False)]
    for _ in range(iters):
      d = ((x - c[0]) ** 2).sum(1) - ((x - c[1]) ** 2).sum(1)
      order = np.argsort(d, kind="stable")
      left, right = order[:n_left], order[n_left:]
      c = np.stack([x[left].mean(0), x[right].mean(0)])
    stack += [idx[right], idx[left]]
  return sorted(out, key=lambda a: int(a[0]))
