"""THE evaluation: effectiveness (ir-measures) and efficiency of a sparse encoder + index.

Used by training (`evaluate_config`, periodic and final evaluation) and by
`launch/evaluate.py` (`evaluate_encoder`). Runs are
`dict[qid, dict[doc_id, score]]`; measures are ir-measures strings ("RR@10",
"nDCG@10", "R@100", "AP", ...).

Which queries count (one convention everywhere, as `trec_eval -c`): the
evaluated queries are the collection's judged queries (those with qrels and a
text), in sorted id order, the first `max_queries` of them when given. Each
measure is the mean over ALL of them; a query that retrieves no document (and
so has no line in the run file) scores 0. Qrels of queries without a text are
not evaluated. A corpus cut to its first `max_docs` documents (runlocal
evaluation) keeps every relevance judgement, so documents left out count as
relevant but not retrieved.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ir_measures
import ml_collections
import numpy as np

from laspar_jax import distributed, distributed_index
from laspar_jax import encode as encode_lib
from laspar_jax import io_utils
from laspar_jax.data import formats
from laspar_jax.data import sources
from laspar_jax.data.collection import CutCorpus
from laspar_jax.index import Index

DEFAULT_MEASURES = ("RR@10", "nDCG@10", "R@100", "R@1000")
Run = dict[str, dict[str, float]]


def parse_measures(measures: Iterable[str | Any]) -> list[Any]:
  """ir-measures objects from strings (objects pass through)."""
  return [ir_measures.parse_measure(m) if isinstance(m, str) else m for m in measures]


def evaluate_run(
  run: Mapping[str, Mapping[str, float]],
  qrels: Mapping[str, Mapping[str, int]],
  measures: Sequence[str | Any] = DEFAULT_MEASURES,
) -> dict[str, float]:
  """Mean of each measure over every query of `qrels` (a query missing from the run scores 0).

  Args:
    run: qid -> doc_id -> score.
    qrels: qid -> doc_id -> relevance (exactly the evaluated queries).
    measures: ir-measures strings or objects.

  Returns:
    measure name (str of the ir-measures object) -> mean over the queries of `qrels`.
  """
  ms = parse_measures(measures)
  per_q: dict[str, dict[str, float]] = {str(m): {} for m in ms}
  run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items() if q in qrels}
  qrels = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()}
  for metric in ir_measures.iter_calc(ms, qrels, run):
    per_q[str(metric.measure)][metric.query_id] = float(metric.value)
  n = max(len(qrels), 1)
  return {name: sum(vals.get(q, 0.0) for q in qrels) / n for name, vals in per_q.items()}


def results_to_run(index: Any, qids: Sequence[str], rows_bk: np.ndarray, scores_bk: np.ndarray) -> Run:
  """Search output (doc rows, scores) -> run dict with doc id strings (rows < 0 dropped)."""
  ids_bk = index.lookup(rows_bk)
  run: Run = {}
  for i, qid in enumerate(qids):
    keep = rows_bk[i] >= 0
    run[str(qid)] = dict(zip(ids_bk[i][keep].tolist(), scores_bk[i][keep].astype(float).tolist()))
  return run


def latency_ms(
  index: Any, q_idx_bk: np.ndarray, q_val_bk: np.ndarray, *, k: int, n: int | None = None, **search_kwargs
) -> np.ndarray:
  """Per-query single-thread latency (one query per call), in ms."""
  n = q_idx_bk.shape[0] if n is None else min(n, q_idx_bk.shape[0])
  index.search(q_idx_bk[:1], q_val_bk[:1], k=k, threads=1, **search_kwargs)  # warm-up
  out = np.empty(n)
  for i in range(n):
    t = time.perf_counter()
    index.search(q_idx_bk[i : i + 1], q_val_bk[i : i + 1], k=k, threads=1, **search_kwargs)
    out[i] = (time.perf_counter() - t) * 1e3
  return out


def efficiency_report(
  index: Any,
  q_idx_bk: np.ndarray,
  q_val_bk: np.ndarray,
  *,
  k: int = 1000,
  query_encode_seconds: float | None = None,
  **search_kwargs,
) -> dict[str, float]:
  """Sparsity, FLOPS, index size, encode throughput, latency and QPS.

  Args:
    index: a loaded `laspar_jax.index.Index`.
    q_idx_bk, q_val_bk: the encoded queries.
    k: depth of the timed searches.
    query_encode_seconds: wall time of encoding the queries (for throughput).
    **search_kwargs: passed to `index.search` (mode, budget, ...).

  Returns:
    A flat dict of numbers.
  """
  st = index.stats(q_idx_bk, q_val_bk)
  lat = latency_ms(index, q_idx_bk, q_val_bk, k=k, **search_kwargs)
  t = time.perf_counter()
  index.search(q_idx_bk, q_val_bk, k=k, threads=None, **search_kwargs)
  batch_s = time.perf_counter() - t
  meta = index.manifest.get("metadata", {})
  nq = q_idx_bk.shape[0]
  rep = {
    "active_q": st["mean_query_length"],
    "active_d": st["mean_doc_length"],
    "flops_per_query": st["flops_per_query"],
    "flops_expected_doc_query": st["flops_expected_doc_query"],
    "index_bytes": st["index_bytes"],
    "n_docs": st["n_docs"],
    "n_postings": st["n_postings"],
    "latency_mean_ms": float(lat.mean()),
    "latency_p99_ms": float(np.percentile(lat, 99)),
    "qps_single_thread": 1e3 / float(lat.mean()),
    "qps_all_threads": nq / max(batch_s, 1e-9),
  }
  if meta.get("encode_docs_per_second"):
    rep["encode_docs_per_second"] = float(meta["encode_docs_per_second"])
  if query_encode_seconds:
    rep["encode_queries_per_second"] = nq / query_encode_seconds
  return rep


def encode_queries(
  encoder: Any,
  tokenizer: Any,
  queries: Mapping[str, str],
  *,
  k_query: int = 128,
  batch_size: int = 64,
  max_length: int | None = None,
  stats: dict[str, Any] | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray, float]:
  """Encodes queries (in the mapping's order) -> (qids, idx_bk, val_bk, seconds).

  Rows of different widths (the in-text filter keeps every in-text term) are
  padded with zero weights to the widest. `stats` (`encode.new_stats()`) gets
  the truncation tally.
  """
  qids = list(queries)
  t = time.perf_counter()
  parts = list(
    encode_lib.encode_sparse(
      encoder,
      tokenizer,
      [queries[q] for q in qids],
      kind="query",
      k=k_query,
      batch_size=batch_size,
      max_length=max_length,
      stats=stats,
    )
  )
  secs = time.perf_counter() - t
  if not parts:
    return qids, np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32), secs
  w = max(p[0].shape[1] for p in parts)
  idx = np.concatenate([np.pad(p[0], ((0, 0), (0, w - p[0].shape[1]))) for p in parts])
  val = np.concatenate([np.pad(p[1], ((0, 0), (0, w - p[1].shape[1]))) for p in parts])
  return qids, idx, val, secs


def format_report(metrics: Mapping[str, float], efficiency: Mapping[str, float]) -> str:
  """Two plain-text tables."""
  lines = ["effectiveness", "-------------"]
  lines += [f"{k:28s} {v:.4f}" for k, v in metrics.items()]
  lines += ["", "efficiency", "----------"]
  for k, v in efficiency.items():
    lines.append(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
  return "\n".join(lines)


class EncoderMismatchError(ValueError):
  """The index was built by another encoder than the one encoding the queries."""


def check_encoder_matches(encoder: Any, index: Any, *, allow: bool = False) -> None:
  """Raises EncoderMismatchError when the index manifest's encoder fingerprint is not the encoder's.

  Args:
    encoder: the encoder that will encode the queries.
    index: the loaded Index: its manifest's "encoder_hash" (config fingerprint) and
      metadata "encoder_params" (`encode.params_digest`) are compared; a field
      the index lacks is not checked.
    allow: only warn (for those who mean to mix encoders).
  """
  meta = index.manifest.get("metadata") or {}
  want = (index.manifest.get("encoder_hash") or "", meta.get("encoder_params") or "")
  have = (encode_lib.encoder_fingerprint(encoder), encode_lib.params_digest(encoder) or "")
  if all(not w or not h or w == h for w, h in zip(want, have)):
    return
  what = "config" if want[0] and want[0] != have[0] else "parameters"
  msg = (
    f"the index {getattr(index, 'path', '')} was built by another encoder (its {what} differ: "
    f"index {'/'.join(w for w in want if w)}, this encoder {'/'.join(h for h in have if h)}); "
    "scores from two encoders are meaningless. Rebuild "
    "the index with this encoder, or pass allow_encoder_mismatch=True "
    "(--allow_encoder_mismatch) if you mean it"
  )
  if not allow:
    raise EncoderMismatchError(msg)
  print(f"warning: {msg}")


def evaluate_encoder(
  encoder: Any,
  tokenizer: Any,
  collection: Any,
  index: Any,
  *,
  k: int = 1000,
  k_query: int = 128,
  measures: Sequence[str] = DEFAULT_MEASURES,
  run_path: io_utils.PathLike | None = None,
  tag: str = "laspar",
  batch_size: int = 64,
  threads: int | None = None,
  verbose: bool = True,
  max_queries: int | None = None,
  efficiency: bool = True,
  allow_encoder_mismatch: bool = False,
  verify: str = "auto",
  **search_kwargs,
) -> dict[str, Any]:
  """Encodes the judged queries, searches the index, scores the run (see the module docstring).

  Args:
    encoder, tokenizer: the sparse encoder (see `load_encoder`).
    collection: `laspar_jax.data.sources.Collection` (queries + qrels).
    index: an `Index` or the path of one.
    k: documents retrieved per query (at most the index's documents).
    k_query: dims kept per query.
    measures: ir-measures strings.
    run_path: where to write the TREC run (optional; local or gs://).
    tag: run tag.
    batch_size: query encoding batch size.
    threads: search threads for the run (None = all cores).
    verbose: print the report.
    max_queries: evaluate the first `max_queries` judged queries by id (None/0: all).
    efficiency: time the searches (`efficiency_report`; training skips it).
    allow_encoder_mismatch: evaluate even when the index was built by another
      encoder (its manifest's fingerprint differs); else EncoderMismatchError.
    verify: checks of the index files when `index` is a path ("auto", "size",
      "full": re-hash every file, "none"; see `Index.load`).
    **search_kwargs: passed to `index.search` (mode="approx", budget, ...).

  Returns:
    {"metrics": {measure: mean}, "efficiency": {...} (empty when not timed),
     "run_path": str | None, "n_queries": int, "active_q": mean dims per
     query, "active_d": mean postings per document}.
  """
  if not isinstance(index, Index):
    index = Index.load(index, verify=verify)
  check_encoder_matches(encoder, index, allow=allow_encoder_mismatch)
  judged = collection.judged_queries
  if not judged:
    raise ValueError(f"{collection!r} has no judged queries")
  qids = sorted(judged)[: max_queries or None]
  stats = encode_lib.new_stats()
  qids, q_idx, q_val, enc_s = encode_queries(
    encoder, tokenizer, {q: judged[q] for q in qids}, k_query=k_query, batch_size=batch_size, stats=stats
  )
  print(f"truncation: {stats['cut']} of {stats['texts']} queries cut at {stats['max_length']} tokens")
  k = min(k, index.n_docs)
  rows, scores = index.search(q_idx, q_val, k=k, threads=threads, **search_kwargs)
  run = results_to_run(index, qids, rows, scores)
  metrics = evaluate_run(run, {q: collection.qrels[q] for q in qids}, measures)
  eff = efficiency_report(index, q_idx, q_val, k=k, query_encode_seconds=enc_s, **search_kwargs) if efficiency else {}
  if run_path is not None:
    run_path = formats.write_trec_run(run, run_path, tag)  # queries without results: no lines
  if verbose:
    print(format_report(metrics, eff))
  return {
    "metrics": metrics,
    "efficiency": eff,
    "run_path": run_path,
    "n_queries": len(qids),
    "active_q": float(np.mean(np.sum(q_val > 0, axis=1))) if len(qids) else 0.0,
    "active_d": float(index.n_postings / max(index.n_docs, 1)),
    "flops_per_query": eff.get("flops_per_query", index.stats(q_idx, q_val).get("flops_per_query")),  # measured
    "queries_cut": stats["cut"],
    "queries_max_length": stats["max_length"],
    "query_filter_fallbacks": stats["fallbacks"],
  }


FirstDocs = CutCorpus  # the cut corpus of config.eval.max_docs: judged documents of the evaluated queries kept


def evaluate_config(
  encoder: Any,
  tokenizer: Any,
  ev: ml_collections.ConfigDict,
  out_dir: io_utils.PathLike,
  *,
  progress: bool = True,
  efficiency: bool = False,
  all_hosts: bool = False,
  bm25: bool = False,
  verbose: bool = False,
  collection: Any = None,
  index_path: io_utils.PathLike | None = None,
) -> dict[str, Any]:
  """THE evaluation of an encoder: collection -> index -> search -> measures -> files.

  Used by training (periodic and final evaluation), the study runner (trained
  and zero-shot variants) and `launch/evaluate.py`. Writes OUT_DIR/index,
  OUT_DIR/run.trec and OUT_DIR/metrics.json (`flat_metrics` of the report).

  Args:
    encoder, tokenizer: the sparse encoder (trained or zero-shot).
    ev: config.eval (collection, split, q_topk, d_topk, batch_size, measures,
      max_queries, max_docs, search_threads; optional strict).
    out_dir: where the index, the run and the metrics go (local or gs://).
    progress: tqdm bar while indexing.
    efficiency: time the searches (`efficiency_report`).
    all_hosts: every process takes part in the index build (call it on every
      host; only process 0 evaluates, the others return {}); else this process
      builds the whole index (training's evaluation on the lead host).
    bm25: also evaluate BM25 on the same corpus and queries ("bm25" sub-report).
    verbose: print the report.
    collection: the loaded collection (default: loaded from `ev`).
    index_path: where the index goes (default OUT_DIR/index; replaced when there).

  Returns:
    {"metrics", "active_q", "active_d", "flops_per_query", "n_queries",
    "run_path", "index", "efficiency", "index_seconds", "eval_seconds",
    "docs_cut", "docs_encoded", "docs_max_length", "queries_cut",
    "queries_max_length", ...} (and "bm25").
  """
  coll = collection or sources.load_collection(
    ev.collection, split=ev.split or None, strict=bool(ev.get("strict", False))
  )
  docs = FirstDocs(coll, ev.max_docs, ev.max_queries) if ev.max_docs else coll
  out_dir = io_utils.as_path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  one = {} if all_hosts else {"process_index": 0, "process_count": 1}
  path = distributed_index.index_collection(
    encoder,
    tokenizer,
    docs,
    os.fspath(index_path or out_dir / "index"),
    k_doc=ev.d_topk,
    batch_size=ev.batch_size,
    dim=encoder.output_dim,
    progress=progress,
    overwrite=True,
    **one,
  )
  t_index = time.time() - t0
  if all_hosts and not distributed.is_lead():
    return {}
  index = Index.load(path)
  out = evaluate_encoder(
    encoder,
    tokenizer,
    coll,
    index,
    k=1000,
    k_query=ev.q_topk,
    measures=ev.measures.split(","),
    run_path=out_dir / "run.trec",
    batch_size=ev.batch_size,
    threads=ev.search_threads or None,
    verbose=verbose,
    max_queries=ev.max_queries or None,
    efficiency=efficiency,
  )
  meta = index.manifest.get("metadata", {})
  out.update(
    index=os.fspath(path),
    index_seconds=t_index,
    eval_seconds=time.time() - t0,
    **{k: meta[k] for k in ("docs_cut", "docs_encoded", "docs_max_length", "docs_filter_fallbacks") if k in meta},
  )
  if bm25:
    qids = sorted(coll.judged_queries)[: ev.max_queries or None]
    out["bm25"] = bm25_report(coll, qids, measures=ev.measures.split(","), run_path=out_dir / "run.bm25.trec")
  io_utils.write_text_atomic(out_dir / "metrics.json", json.dumps(flat_metrics(out), indent=1))
  return out


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
  """The numbers of an `evaluate_config` report, flat: each measure, active_q, active_d, flops_per_query, seconds."""
  keys = ("active_q", "active_d", "flops_per_query", "index_seconds", "eval_seconds", "docs_cut", "queries_cut")
  return dict(report["metrics"], **{k: float(report[k]) for k in keys if report.get(k) is not None})


def bm25_report(
  collection: Any,
  qids: Sequence[str],
  *,
  measures: Sequence[str],
  k: int = 1000,
  k1: float = 0.9,
  b: float = 0.4,
  run_path: io_utils.PathLike | None = None,
) -> dict[str, Any]:
  """BM25 (bm25s, English stop words, no stemming; Anserini's k1/b) on the collection's queries `qids`.

  Returns:
    {"metrics", "run_path", "n_queries", "flops_per_query" (mean over queries of the document
    frequencies of their distinct terms), "active_q", "active_d" (distinct terms)}.
  """
  import bm25s  # pylint: disable=g-import-not-at-top  (1.4 s on its own; only for the baseline)

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
  run: Run = {}
  keep = [i for i, t in enumerate(terms) if t]  # bm25s cannot retrieve for a query without known terms
  if keep:
    rows_qk, scores_qk = retriever.retrieve([q_tokens[i] for i in keep], k=kk, show_progress=False)
    for j, i in enumerate(keep):
      run[qids[i]] = {ids[r]: float(s) for r, s in zip(rows_qk[j], scores_qk[j]) if s > 0}
  metrics = evaluate_run(run, {q: collection.qrels[q] for q in qids}, measures)
  if run_path is not None:
    run_path = formats.write_trec_run(run, run_path, "bm25")
  return {
    "metrics": metrics,
    "run_path": run_path,
    "n_queries": len(qids),
    "flops_per_query": float(np.mean([df[t].sum() for t in terms])) if terms else 0.0,
    "active_q": float(np.mean([len(t) for t in terms])) if terms else 0.0,
    "active_d": float(np.mean([t.size for t in doc_terms])) if doc_terms else 0.0,
  }


def format_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
  """Reports side by side as a markdown table: measures, FLOPS/query, active dims per query and document."""
  measures = list(rows[0][1]["metrics"]) if rows else []
  head = ["system", *measures, "FLOPS/q", "active q", "active d"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, r in rows:
    cells = [f"{r['metrics'].get(m, float('nan')):.4f}" for m in measures]
    cells += [f"{r.get('flops_per_query') or 0:.4g}", f"{r.get('active_q') or 0:.1f}", f"{r.get('active_d') or 0:.1f}"]
    lines.append("| " + " | ".join([label, *cells]) + " |")
  return "\n".join(lines)
