"""Batched, jitted sparse encoding of texts to top-k (dims, weights) rows; encoder -> index glue.

Texts are encoded in length-sorted windows (less padding, fewer shapes) and
given back in input order. Used by indexing, search and evaluation.
Batches are padded to the tokenizer's length buckets (one compile per
bucket); the top-k runs on the device, and batch i + 1 is padded and
dispatched before batch i is fetched, so host work overlaps device work.
`doc_batches` streams a collection's documents through `encode_sparse`;
`distributed_index.index_collection` writes them into an index (on one or
many hosts; the index itself knows no encoder).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from laspar_jax import platform, prefetch, prompts, sparsify, zeroshot
from laspar_jax.data import sources
from laspar_jax.models import layers
from laspar_jax.models.sparse_encoder import SparseEncoder
from laspar_jax.tokenizer import Tokenizer


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
  filtered: bool = False,
  impacts: str = "float",
):
  def fn(state, ids_bl, mask_bl, text_bl, allowed_bv):
    encoder = nnx.merge(graphdef, state)
    rep_bv = encoder(ids_bl, mask_bl, kind=kind, text_mask_bl=text_bl)
    rep_bv, fell_back_b = zeroshot.filter_and_scale(rep_bv, allowed_bv if filtered else None, impacts)
    if mesh is not None:  # D sharded on 'model': per-shard top-k, then top-k of the candidates
      return *sparsify.sharded_topk(rep_bv, k, mesh, "model", min_weight=min_weight), fell_back_b
    return *sparsify.topk(rep_bv, k, min_weight=min_weight), fell_back_b

  return platform.jit(fn, compute_dtype=compute_dtype, matmul_precision=matmul_precision)


def inference_state(encoder: SparseEncoder) -> tuple[nnx.GraphDef, nnx.State]:
  """`nnx.split(encoder)` with the kernels a bf16 layer casts at every use cast once (`layers.cast_once`).

  The encoder itself is unchanged; the state shares its other arrays. Every encoder
  call then reads bf16 kernels (no per-call conversion, half the weight bytes), for
  the same outputs; the bf16 copies live as long as the state.
  """
  graphdef, state = nnx.split(encoder)
  view = nnx.merge(graphdef, nnx.to_pure_dict(state))  # new variables over the same arrays
  if layers.cast_once(view) == 0:
    return graphdef, state
  return nnx.split(view)


def new_stats() -> dict[str, Any]:
  """A truncation/fallback tally for `encode_sparse(stats=...)`: texts, cut, max_length, fallbacks."""
  return {"texts": 0, "cut": 0, "max_length": 0, "fallbacks": 0}


def tokenize(
  encoder: SparseEncoder, tokenizer: Tokenizer, texts: list[str], *, kind: str, max_length: int
) -> tuple[list[list[int]], list[list[int]] | None, np.ndarray]:
  """Token rows of texts as the encoder reads them: prompted (`config.prompt`) or with the side's prefix.

  Returns:
    (rows, text flags per row or None without a prompt, cut_b bool [B]).
  """
  cfg = encoder.config
  if cfg.prompt:
    preset = prompts.get_preset(cfg.prompt)
    composed, cut_b = prompts.compose(tokenizer, texts, preset=preset, kind=kind, max_length=max_length)
    return [r[0] for r in composed], [r[1] for r in composed], cut_b
  prefix = cfg.query_prefix if kind == "query" else cfg.doc_prefix
  rows, cut_b = tokenizer.encode_rows(texts, max_length=max_length, prefix=prefix)
  return rows, None, cut_b


def encode_sparse(
  encoder: SparseEncoder,
  tokenizer: Tokenizer,
  texts: Iterable[str],
  *,
  kind: str,
  k: int,
  batch_size: int = 0,
  max_length: int | None = None,
  min_weight: float = 0.0,
  window: int = 16,
  total: int | None = None,
  progress: bool = False,
  mesh: Mesh | None = None,
  stats: dict[str, Any] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Encodes texts to their top-k sparse rows, in input order.

  Zero-shot settings of the encoder's config (`zeroshot.py`: prompt, in-text
  filter, term cap, impacts) apply here; with the in-text filter and
  `term_cap` 0 a row keeps every in-text term, so rows may be wider than k.

  Args:
    encoder: the sparse encoder.
    tokenizer: its tokenizer.
    texts: strings (any iterable; consumed in windows of batch_size * window).
    kind: "query" or "doc" (tower, prefix or prompt, and default max length).
    k: dims kept per row.
    batch_size: rows per jitted call (the last batch is padded to it); 0: `platform.encode_batch_size()`
      (64 on CPU, 256 on accelerators).
    max_length: truncation (default: the config's query/doc max length), prompt included.
    min_weight: weights <= this become 0.
    window: batches per length-sorted window.
    total: number of texts (for the progress bar).
    progress: show a tqdm bar (advanced by tokens within each window, so its
      estimate holds although each window is encoded shortest first).
    mesh: the encoder's device mesh; when it has a 'model' axis of size > 1
      that divides D, the top-k runs per D-shard and then over the shards'
      candidates (`sparsify.sharded_topk`, equal to the global top-k), so no
      device gathers the full B x D output.
    stats: a `new_stats()` dict, updated with the texts seen, the texts cut at
      max_length and the in-text filter's fallbacks.

  Yields:
    (idx_bk int32 [b, w], val_bk float32 [b, w]) per batch of up to batch_size
    texts (w = k, or wider under the in-text filter, equal within a window);
    rows with fewer positive weights carry 0 in the tail.
  """
  cfg = encoder.config
  zeroshot.check_config(cfg)
  batch_size = platform.encode_batch_size(batch_size)
  max_length = max_length or (cfg.query_max_len if kind == "query" else cfg.doc_max_len)
  graphdef, state = inference_state(encoder)
  shard_mesh = mesh if _model_shards(mesh, encoder.output_dim) > 1 else None
  k = min(int(k), encoder.output_dim)
  filt = zeroshot.InTextFilter(tokenizer, encoder.output_dim, match=cfg.filter_match) if cfg.in_text_filter else None
  stats = new_stats() if stats is None else stats
  stats["max_length"] = max_length
  bar = tqdm(total=total, desc=f"encode {kind}s", unit=kind, disable=not progress)
  it = iter(texts)
  while True:
    chunk = [t for _, t in zip(range(batch_size * window), it)]
    if not chunk:
      break
    rows, flags, cut_b = tokenize(encoder, tokenizer, chunk, kind=kind, max_length=max_length)
    stats["texts"] += len(chunk)
    stats["cut"] += int(cut_b.sum())
    allowed = None if filt is None else filt.allowed_ids(chunk)
    w = k if allowed is None else min(zeroshot.width(max(map(len, allowed)), k, cfg.term_cap), encoder.output_dim)
    fn = _encode_fn(
      graphdef, kind, w, float(min_weight), cfg.dtype, shard_mesh, cfg.matmul_precision, filt is not None, cfg.impacts
    )
    order = np.argsort([len(t) for t in chunk], kind="stable")  # by characters, as always
    window_tokens, done, seen = max(sum(len(r) for r in rows), 1), 0, bar.n
    idx_nk = np.zeros((len(chunk), w), np.int32)
    val_nk = np.zeros(idx_nk.shape, np.float32)
    padded = _padded(tokenizer, rows, flags, order, batch_size, max_length, allowed, encoder.output_dim)
    for sel, out in prefetch.one_ahead((sel, fn(state, *arrays)) for sel, *arrays in padded):
      i_bk, v_bk, fb_b = jax.device_get(out)
      fb_b = np.asarray(fb_b[: len(sel)]) & (allowed is not None)
      idx_nk[sel], val_nk[sel] = i_bk[: len(sel)], v_bk[: len(sel)]
      if allowed is not None:
        val_nk[sel] = zeroshot.cap_rows(val_nk[sel], fb_b, k, cfg.term_cap)
        stats["fallbacks"] += int(fb_b.sum())
      done += sum(len(rows[i]) for i in sel)
      bar.update(round(seen + len(chunk) * done / window_tokens) - bar.n)  # texts, advanced by tokens
    for s in range(0, len(chunk), batch_size):
      yield idx_nk[s : s + batch_size], val_nk[s : s + batch_size]
  bar.close()


def _padded(
  tokenizer: Tokenizer,
  rows: list[list[int]],
  flags: list[list[int]] | None,
  order: np.ndarray,
  batch_size: int,
  max_length: int,
  allowed: list[np.ndarray] | None,
  dim: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
  """(rows of the batch, ids_bl, mask_bl, text_bl, allowed_bv) per batch of `order`, padded to batch_size rows."""
  for s in range(0, len(order), batch_size):
    sel = order[s : s + batch_size]
    b = tokenizer.pad(
      [rows[i] for i in sel], max_length=max_length, flags=None if flags is None else [flags[i] for i in sel]
    )
    pad = batch_size - len(sel)
    ids, mask = b["input_ids"], b["attention_mask"]
    text = b.get("text_mask", mask)
    if pad:
      ids = np.pad(ids, ((0, pad), (0, 0)), constant_values=tokenizer.pad_id)
      mask, text = np.pad(mask, ((0, pad), (0, 0))), np.pad(text, ((0, pad), (0, 0)))
    allowed_bv = None
    if allowed is not None:
      allowed_bv = np.zeros((batch_size, dim), bool)
      for j, i in enumerate(sel):
        allowed_bv[j, allowed[i]] = True
    yield sel, ids, mask, text, allowed_bv


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
  progress: bool = False,
  total: int | None = None,
  stats: dict[str, Any] | None = None,
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
    progress=progress,
    total=total,
    stats=stats,
  ):
    ids = [pending.popleft() for _ in range(idx_bk.shape[0])]
    yield ids, np.asarray(idx_bk), np.asarray(val_bk)
