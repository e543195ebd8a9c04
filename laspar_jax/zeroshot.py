"""Zero-shot sparse retrieval with a language model's vocabulary head (RQ1), beside BM25.

`ZeroShotEncoder` wraps a backbone of any family (`hf_weights.load`, real
weights, its vocabulary projection) and a `VocabHead`: each query / passage is
put in a prompt (`prompts.py`) and read off as w_v = max_t log1p(relu(logit_tv))
over the *text* positions (not the prompt; "all" positions for MLMs without a
prompt), or at the last token (PromptReps), or through any `decoding` mode
(T5 multi-token pools the decoder steps whose input is a text token).

In-text filter (`in_text_filter`): only vocabulary ids occurring in the text
after English stop-word removal keep their weight (words: lowercased `\\w+`
runs of the kept text, `laspar_jax.data.stopwords.english()` removed, joined
by spaces and tokenized). `filter_match` says what "occurs" means:
"string" (default): a vocabulary id is kept when its token string, without the
word-start marker (Ġ, ▁, ##) and lowercased, equals that of a token of the
filtered text, so "Ġcells", "cells" and "ĠCells" all count for the word
"cells" (the model may put its weight on any of them); "id": only the ids of
the filtered text's own tokenization (the reference's rule). When every kept
weight of a text is 0 the unfiltered weights are used instead (the
reference's fallback). Each text keeps its `topk` largest weights.

Texts are sorted by prompted length, batched and padded to multiples of
`length_multiple` (one jitted function per (batch, length) shape).
`evaluate_zeroshot` builds the index with the usual writer and manifest (an
existing index of the same zero-shot config is reused), then searches and
scores with `laspar_jax.evaluate`'s run, metrics and efficiency code; with
`bm25=True` BM25 (bm25s, as `data.training.bm25_candidates`) runs on the same
corpus and queries.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from laspar_jax import evaluate as evaluate_lib
from laspar_jax import platform, prompts, sparsify
from laspar_jax.data import formats, sources, stopwords
from laspar_jax.index import Index, IndexWriter
from laspar_jax.models import decoding as decoding_lib
from laspar_jax.models import hf_weights
from laspar_jax.models.heads.vocab import VocabHead

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_WORD = re.compile(r"\w+")
_MARKERS = ("Ġ", "▁", "##")


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
  """A zero-shot encoder (all fields JSON-able).

  Attributes:
    backbone: model folder, .gguf file or hub id (packaged ids resolve offline).
    preset: prompt preset (`prompts.PRESETS`).
    decoding: read-off mode (`decoding.MODES`; "" = the preset's: "plain" or "last_token").
    pool: "plain"-family modes pool "text" positions or "all" ("" = the preset's).
    query_max_len / doc_max_len: text tokens kept (the prompt not counted).
    in_text_filter: keep only ids occurring in the text (see the module docstring).
    filter_match: "string" or "id" (see the module docstring).
    topk: dims kept per document (and per query unless query_topk).
    query_topk: dims kept per query (0: topk).
    pooling: "max" or "sum" over the pooled positions.
    dtype: compute dtype, "float32" or "bfloat16".
    batch_size: texts per jitted call.
    length_multiple: padded lengths are multiples of this.
    decoding_kwargs: more `decoding.read` arguments (drop_first, mask_eos).
  """

  backbone: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
  preset: str = "reference"
  decoding: str = ""
  pool: str = ""
  query_max_len: int = 64
  doc_max_len: int = 256
  in_text_filter: bool = False
  filter_match: str = "string"
  topk: int = 128
  query_topk: int = 0
  pooling: str = "max"
  dtype: str = "float32"
  batch_size: int = 16
  length_multiple: int = 32
  decoding_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ZeroShotConfig":
    """From a dict or ConfigDict (e.g. `config.zeroshot`).

    Raises:
      ValueError: unknown fields (lists the known ones).
    """
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - names):
      raise ValueError(f"unknown zero-shot config fields {unknown}; known: {sorted(names)}")
    return cls(**d)

  def fingerprint(self) -> str:
    """sha256 (16 hex) of what shapes the document vectors (not batch size or query settings)."""
    d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_size", "query_topk", "query_max_len")}
    return hashlib.sha256(json.dumps({"zeroshot": d}, sort_keys=True).encode()).hexdigest()[:16]


class _Reader(nnx.Module):
  """The backbone and its vocabulary head (the head holds the backbone's projection by reference)."""

  def __init__(self, backbone: nnx.Module, head: VocabHead):
    self.backbone = backbone
    self.head = head


def _norm(token: str) -> str:
  """A token string without its word-start marker (Ġ, ▁, ##), lowercased."""
  return next((token[len(m) :] for m in _MARKERS if token.startswith(m)), token).lower()


class InTextFilter:
  """Vocabulary ids occurring in a text after stop-word removal (see the module docstring)."""

  def __init__(self, tokenizer: Any, vocab: int, *, match: str = "string", stop: frozenset[str] | None = None):
    if match not in ("string", "id"):
      raise ValueError(f"filter_match must be 'string' or 'id', got {match!r}")
    self._raw = tokenizer._tok  # pylint: disable=protected-access
    self.match = match
    self.stop = stopwords.english() if stop is None else stop
    special = set(np.asarray(tokenizer.special_ids).tolist())
    groups: dict[str, list[int]] = {}
    for tok, i in self._raw.get_vocab().items():
      if i < vocab and i not in special:
        groups.setdefault(_norm(tok), []).append(i)
    self._groups = {k: np.asarray(sorted(v), np.int32) for k, v in groups.items()}
    self._special = special
    self._id_to_token = self._raw.id_to_token

  def words(self, text: str) -> list[str]:
    """Lowercased words of `text` without stop words."""
    return [w for w in _WORD.findall(text.lower()) if w not in self.stop]

  def allowed_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Per text, the int32 vocabulary ids kept by the filter."""
    joined = [" ".join(self.words(t)) for t in texts]
    encs = self._raw.encode_batch(joined, add_special_tokens=False)
    out = []
    for j, enc in zip(joined, encs):
      ids = {i for i in enc.ids if i not in self._special} if j else set()
      if self.match == "id":
        out.append(np.asarray(sorted(ids), np.int32))
        continue
      keys = {_norm(self._id_to_token(i)) for i in ids}
      parts = [self._groups[k] for k in keys if k in self._groups]
      out.append(np.unique(np.concatenate(parts)) if parts else np.zeros((0,), np.int32))
    return out


@functools.lru_cache(maxsize=16)
def _read_fn(
  graphdef: Any, mode: str, pool_text: bool, k: int, filtered: bool, dtype: str, kwargs: tuple[tuple[str, Any], ...]
):
  """jit: (state, ids, mask, text, allowed) -> (idx_bk, val_bk, fell_back_b)."""

  def fn(state, ids_bl, mask_bl, text_bl, allowed_bv):
    reader = nnx.merge(graphdef, state)
    h_btd, pool_bt, pids_bt = decoding_lib.read(reader.backbone, ids_bl, mask_bl, mode=mode, **dict(kwargs))
    if pool_text and mode in ("plain", "decoder_stack"):
      pool_bt = pool_bt * text_bl
    elif pool_text and mode == "multi_token":  # decoder position t reads x_{t-1}: its text flag
      pool_bt = pool_bt * jnp.pad(text_bl, ((0, 0), (1, 0)))[:, :-1]
    elif pool_text and mode == "echo":  # the text's positions in the second copy
      echoed, _, second = decoding_lib.echo_inputs(text_bl, mask_bl, 0)
      pool_bt = pool_bt * echoed * second
    rep_bv = reader.head(h_btd, pool_bt, pids_bt)
    fell_back = jnp.zeros((rep_bv.shape[0],), bool)
    if filtered:
      kept_bv = jnp.where(allowed_bv, rep_bv, 0.0)
      fell_back = ~jnp.any(kept_bv > 0, axis=1)
      rep_bv = jnp.where(fell_back[:, None], rep_bv, kept_bv)
    idx_bk, val_bk = sparsify.topk(rep_bv, k)
    return idx_bk, val_bk, fell_back

  return platform.jit(fn, compute_dtype=_DTYPES[dtype])


class ZeroShotEncoder:
  """A prompted backbone + vocabulary head encoding texts to top-k sparse rows.

  Attributes:
    config: the ZeroShotConfig.
    tokenizer: the backbone's tokenizer.
    preset: the prompt preset.
    mode / pool_text: the read-off mode and whether it pools the text positions only.
    output_dim: V.
    fallbacks: texts whose filtered weights were all 0 (the unfiltered ones were used).
  """

  def __init__(self, config: ZeroShotConfig, loaded: hf_weights.Loaded | None = None):
    if config.dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
    self.config = config
    self.preset = prompts.get_preset(config.preset)
    self.mode = config.decoding or self.preset.decoding
    pool = config.pool or self.preset.pool
    if pool not in ("text", "all"):
      raise ValueError(f"pool must be 'text' or 'all', got {pool!r}")
    self.pool_text = pool == "text"
    if loaded is None:
      loaded = hf_weights.load(
        config.backbone,
        dtype=_DTYPES[config.dtype],
        lm_head=True,
        max_length=max(config.query_max_len, config.doc_max_len),
      )
    backbone = loaded.model
    decoding_lib.check_mode(backbone, self.mode)
    self.tokenizer = loaded.tokenizer
    self.output_dim = int(backbone.vocab_size)
    head = VocabHead(
      backbone.vocab_projection(),
      vocab=self.output_dim,
      pooling=config.pooling,
      special_ids=self.tokenizer.special_ids,
      dtype=_DTYPES[config.dtype],
    )
    self._graphdef, self._state = nnx.split(_Reader(backbone, head))
    self.filter = (
      InTextFilter(self.tokenizer, self.output_dim, match=config.filter_match) if config.in_text_filter else None
    )
    self.fallbacks = 0

  def encode(
    self, texts: Sequence[str], kind: str, *, k: int | None = None, progress: bool = False, bar: Any = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Encodes texts (in input order) to (idx_nk int32, val_nk float32).

    Args:
      texts: the queries or passages.
      kind: "query" or "doc".
      k: dims kept per text (default: the config's topk / query_topk).
      progress: show a tqdm bar.
      bar: a tqdm bar to update instead.
    """
    cfg = self.config
    k = min(k or (cfg.query_topk or cfg.topk if kind == "query" else cfg.topk), self.output_dim)
    max_len = cfg.query_max_len if kind == "query" else cfg.doc_max_len
    rows = prompts.compose(self.tokenizer, texts, preset=self.preset, kind=kind, max_text_len=max_len)
    empty = np.asarray([not r[0] for r in rows], bool)  # no token at all (an empty text, no prompt)
    rows = [([self.tokenizer.pad_id], [0]) if e else r for r, e in zip(rows, empty)]
    allowed = None
    if self.filter is not None:
      raw = self.tokenizer._tok  # pylint: disable=protected-access
      kept = raw.decode_batch([[i for i, f in zip(*r) if f] for r in rows])
      allowed = self.filter.allowed_ids(kept)
    fn = _read_fn(
      self._graphdef,
      self.mode,
      self.pool_text,
      int(k),
      allowed is not None,
      cfg.dtype,
      tuple(sorted(cfg.decoding_kwargs.items())),
    )
    n, bs = len(rows), cfg.batch_size
    idx_nk = np.zeros((n, k), np.int32)
    val_nk = np.zeros((n, k), np.float32)
    order = np.argsort([len(r[0]) for r in rows], kind="stable")
    own = bar is None
    desc = "zero-shot " + ("queries" if kind == "query" else "docs")
    bar = tqdm(total=n, desc=desc, unit=kind, disable=not progress) if own else bar
    for s in range(0, n, bs):
      sel = order[s : s + bs]
      batch = [rows[i] for i in sel]
      batch += [batch[-1]] * (bs - len(batch))  # a full batch: one shape per length bucket
      ids_bl, mask_bl, text_bl = prompts.pad_rows(batch, pad_id=self.tokenizer.pad_id, multiple=cfg.length_multiple)
      allowed_bv = None
      if allowed is not None:
        allowed_bv = np.zeros((bs, self.output_dim), bool)
        for j, i in enumerate(sel):
          allowed_bv[j, allowed[i]] = True
      i_bk, v_bk, fb_b = jax.device_get(fn(self._state, ids_bl, mask_bl, text_bl, allowed_bv))
      idx_nk[sel], val_nk[sel] = i_bk[: len(sel)], v_bk[: len(sel)]
      self.fallbacks += int(np.sum(fb_b[: len(sel)]))
      bar.update(len(sel))
    if own:
      bar.close()
    val_nk[empty] = 0.0
    return idx_nk, val_nk


def build_index(
  encoder: ZeroShotEncoder,
  docs: Any,
  path: str | os.PathLike,
  *,
  overwrite: bool = False,
  progress: bool = True,
  chunk: int = 8192,
) -> Index:
  """Encodes every document and writes the index (reused when one of the same config is there).

  Args:
    encoder: the zero-shot encoder.
    docs: a `data.sources.Collection` (or anything with `.docs()`; `name` goes to the manifest).
    path: the index directory.
    overwrite: rebuild even when an index of the same config exists.
    progress: tqdm bar.
    chunk: documents encoded per call of `encoder.encode` (sorted by length within it).

  Returns:
    The loaded index.

  Raises:
    FileExistsError: an index of another encoder is at `path` (and not overwrite).
  """
  fp = encoder.config.fingerprint()
  encoder.fallbacks = 0
  if os.path.exists(os.path.join(os.fspath(path), "manifest.json")) and not overwrite:
    index = Index.load(path)
    if index.manifest.get("encoder_hash") == fp:
      return index
    raise FileExistsError(
      f"{path} holds an index of another encoder ({index.manifest.get('encoder_hash')}, "
      f"this zero-shot config: {fp}); pass overwrite=True (--overwrite) to rebuild it"
    )
  meta = {
    "collection": getattr(docs, "name", None),
    "k_doc": encoder.config.topk,
    "zeroshot": dataclasses.asdict(encoder.config),
  }
  stream = docs.docs() if hasattr(docs, "docs") else iter(docs)
  bar = tqdm(total=getattr(docs, "num_docs", None), unit="doc", desc="index", disable=not progress)
  t0 = time.time()
  with IndexWriter(path, encoder.output_dim, encoder_hash=fp, overwrite=overwrite, metadata=meta) as w:
    while True:
      part = [d for _, d in zip(range(chunk), stream)]
      if not part:
        break
      idx_nk, val_nk = encoder.encode([sources.doc_text(d) for d in part], "doc", bar=bar)
      w.add([d.doc_id for d in part], idx_nk, val_nk)
    secs = time.time() - t0
    w.metadata.update(
      encode_seconds=secs, encode_docs_per_second=w.n_docs / max(secs, 1e-9), fallback_docs=encoder.fallbacks
    )
  bar.close()
  return Index.load(path)


def bm25_report(
  collection: Any,
  qids: Sequence[str],
  *,
  measures: Sequence[str],
  k: int = 1000,
  k1: float = 0.9,
  b: float = 0.4,
  run_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
  """BM25 (bm25s, English stop words, no stemming; Anserini's k1/b) on the collection's queries `qids`.

  Returns:
    {"metrics", "run_path", "n_queries", "flops_per_query" (mean over queries of the document
    frequencies of their distinct terms), "mean_active_q", "mean_active_d" (distinct terms)}.
  """
  import bm25s  # pylint: disable=g-import-not-at-top  (1.4 s on its own; only with bm25=True)

  ids, texts = [], []
  for d in collection.docs():
    ids.append(d.doc_id)
    texts.append(sources.doc_text(d))
  corpus = bm25s.tokenize(texts, stopwords="en", show_progress=False)
  retriever = bm25s.BM25(k1=k1, b=b)
  retriever.index(corpus, show_progress=False)
  df = np.zeros(len(corpus.vocab), np.int64)
  doc_terms = [np.unique(np.asarray(t, np.int64)) for t in corpus.ids]
  for t in doc_terms:
    df[t] += 1
  q_tokens = bm25s.tokenize(
    [collection.queries[q] for q in qids], stopwords="en", return_ids=False, show_progress=False
  )
  terms = [sorted({corpus.vocab[w] for w in q if w in corpus.vocab}) for q in q_tokens]
  kk = min(k, len(ids))
  run: evaluate_lib.Run = {}
  keep = [i for i, t in enumerate(terms) if t]  # bm25s cannot retrieve for a query without known terms
  if keep:
    rows_qk, scores_qk = retriever.retrieve([q_tokens[i] for i in keep], k=kk, show_progress=False)
    for j, i in enumerate(keep):
      run[qids[i]] = {ids[r]: float(s) for r, s in zip(rows_qk[j], scores_qk[j]) if s > 0}
  metrics = evaluate_lib.evaluate_run(run, {q: collection.qrels[q] for q in qids}, measures)
  if run_path is not None:
    run_path = formats.write_trec_run(run, run_path, "bm25")
  return {
    "metrics": metrics,
    "run_path": run_path,
    "n_queries": len(qids),
    "flops_per_query": float(np.mean([df[t].sum() for t in terms])) if terms else 0.0,
    "mean_active_q": float(np.mean([len(t) for t in terms])) if terms else 0.0,
    "mean_active_d": float(np.mean([t.size for t in doc_terms])) if doc_terms else 0.0,
  }


def evaluate_zeroshot(
  zcfg: ZeroShotConfig,
  collection: Any,
  index_dir: str | os.PathLike,
  *,
  measures: Sequence[str] = evaluate_lib.DEFAULT_MEASURES,
  k: int = 1000,
  run_path: str | os.PathLike | None = None,
  bm25: bool = False,
  max_queries: int | None = None,
  overwrite: bool = False,
  progress: bool = True,
  verbose: bool = False,
  threads: int | None = None,
  efficiency: bool = True,
  encoder: ZeroShotEncoder | None = None,
) -> dict[str, Any]:
  """Zero-shot evaluation: index the corpus, encode the judged queries, search, score.

  Args:
    zcfg: the zero-shot config.
    collection: `data.sources.Collection` (corpus, queries, qrels).
    index_dir: the index directory (built, or reused when it holds this config's index).
    measures: ir-measures strings.
    k: documents retrieved per query.
    run_path: TREC run to write (BM25's goes beside it with a ".bm25" suffix).
    bm25: also evaluate BM25 on the same corpus and queries ("bm25" sub-report).
    max_queries: the first judged queries by id only (None: all).
    overwrite: rebuild the index even when it exists.
    progress: tqdm bars.
    verbose: print the table.
    threads: search threads (None: all cores).
    efficiency: time the searches (`evaluate.efficiency_report`).
    encoder: an already built encoder of `zcfg` (default: built here).

  Returns:
    `evaluate.evaluate_encoder`'s keys ("metrics", "efficiency", "run_path",
    "n_queries", "active_q", "active_d") plus "flops_per_query", "mean_active_q",
    "mean_active_d", "fallback_queries", "fallback_docs", "zeroshot" (the config),
    and "bm25" (same measures) with bm25=True.
  """
  encoder = encoder or ZeroShotEncoder(zcfg)
  judged = collection.judged_queries
  if not judged:
    raise ValueError(f"{collection!r} has no judged queries")
  qids = sorted(judged)[: max_queries or None]
  index = build_index(encoder, collection, index_dir, overwrite=overwrite, progress=progress)
  encoder.fallbacks = 0
  t = time.perf_counter()
  q_idx, q_val = encoder.encode([judged[q] for q in qids], "query", progress=progress)
  enc_s = time.perf_counter() - t
  kk = min(k, index.n_docs)
  rows, scores = index.search(q_idx, q_val, k=kk, threads=threads)
  run = evaluate_lib.results_to_run(index, qids, rows, scores)
  metrics = evaluate_lib.evaluate_run(run, {q: collection.qrels[q] for q in qids}, measures)
  eff = evaluate_lib.efficiency_report(index, q_idx, q_val, k=kk, query_encode_seconds=enc_s) if efficiency else {}
  if run_path is not None:
    run_path = formats.write_trec_run(run, run_path, f"zeroshot-{zcfg.preset}")
  st = index.stats(q_idx, q_val)
  active_q = float(np.mean(np.sum(q_val > 0, axis=1))) if len(qids) else 0.0
  active_d = float(index.n_postings / max(index.n_docs, 1))
  out = {
    "metrics": metrics,
    "efficiency": eff,
    "run_path": run_path,
    "n_queries": len(qids),
    "active_q": active_q,
    "active_d": active_d,
    "flops_per_query": st["flops_per_query"],
    "mean_active_q": active_q,
    "mean_active_d": active_d,
    "fallback_queries": encoder.fallbacks,
    "fallback_docs": index.manifest.get("metadata", {}).get("fallback_docs"),
    "zeroshot": dataclasses.asdict(zcfg),
  }
  if bm25:
    out["bm25"] = bm25_report(
      collection, qids, measures=measures, k=k, run_path=None if run_path is None else f"{run_path}.bm25"
    )
  if verbose:
    print(format_table(out))
  return out


def format_table(report: Mapping[str, Any], name: str | None = None) -> str:
  """The zero-shot report (and its BM25 row) as a small side-by-side markdown table."""
  rows = [(name or f"zero-shot {report.get('zeroshot', {}).get('preset', '')}".strip(), report)]
  if "bm25" in report:
    rows.append(("BM25", report["bm25"]))
  measures = list(report["metrics"])
  head = ["system", *measures, "FLOPS/q", "active q", "active d"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, r in rows:
    cells = [f"{r['metrics'].get(m, float('nan')):.4f}" for m in measures]
    cells += [f"{r['flops_per_query']:.4g}", f"{r['mean_active_q']:.1f}", f"{r['mean_active_d']:.1f}"]
    lines.append("| " + " | ".join([label, *cells]) + " |")
  return "\n".join(lines)
