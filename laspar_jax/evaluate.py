"""Effectiveness (ir-measures) and efficiency of a sparse encoder + index.

Runs are `dict[qid, dict[doc_id, score]]`. Measures are ir-measures strings
("RR@10", "nDCG@10", "R@100", "R@1000", "AP", ...). Every judged query counts:
a judged query missing from the run scores 0, and the index always holds the
full corpus.
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Iterable, Mapping, Sequence

import ir_measures
import numpy as np

DEFAULT_MEASURES = ("RR@10", "nDCG@10", "R@100", "R@1000")
Run = dict[str, dict[str, float]]


def parse_measures(measures: Iterable[str | Any]) -> list[Any]:
  """ir-measures objects from strings (objects pass through)."""
  return [ir_measures.parse_measure(m) if isinstance(m, str) else m for m in measures]


def evaluate_run(run: Mapping[str, Mapping[str, float]],
                 qrels: Mapping[str, Mapping[str, int]],
                 measures: Sequence[str | Any] = DEFAULT_MEASURES) -> dict[str, float]:
  """Mean of each measure over every judged query (missing queries score 0).

  Args:
    run: qid -> doc_id -> score.
    qrels: qid -> doc_id -> relevance.
    measures: ir-measures strings or objects.

  Returns:
    measure name -> mean over the queries of `qrels`.
  """
  ms = parse_measures(measures)
  per_q: dict[str, dict[str, float]] = {str(m): {} for m in ms}
  run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items() if q in qrels}
  qrels = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()}
  for metric in ir_measures.iter_calc(ms, qrels, run):
    per_q[str(metric.measure)][metric.query_id] = float(metric.value)
  n = max(len(qrels), 1)
  return {name: sum(vals.get(q, 0.0) for q in qrels) / n for name, vals in per_q.items()}


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                   tag: str = "laspar") -> pathlib.Path:
  """Writes a TREC run file (qid Q0 docid rank score tag), best first per query."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    for qid in sorted(run):
      ranked = sorted(run[qid].items(), key=lambda x: (-x[1], x[0]))
      for rank, (doc, score) in enumerate(ranked, 1):
        f.write(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n")
  return path


def read_trec_run(path: str | os.PathLike) -> Run:
  """Reads a TREC run file into qid -> doc_id -> score."""
  run: Run = {}
  for sd in ir_measures.read_trec_run(str(path)):
    run.setdefault(sd.query_id, {})[sd.doc_id] = float(sd.score)
  return run


def results_to_run(index: Any, qids: Sequence[str], rows_bk: np.ndarray,
                   scores_bk: np.ndarray) -> Run:
  """Search output (doc rows, scores) -> run dict with doc id strings."""
  ids_bk = index.lookup(rows_bk)
  run: Run = {}
  for i, qid in enumerate(qids):
    keep = rows_bk[i] >= 0
    run[str(qid)] = dict(zip(ids_bk[i][keep].tolist(), scores_bk[i][keep].astype(float).tolist()))
  return run


def latency_ms(index: Any, q_idx_bk: np.ndarray, q_val_bk: np.ndarray, *, k: int,
               n: int | None = None, **search_kwargs) -> np.ndarray:
  """Per-query single-thread latency (one query per call), in ms."""
  n = q_idx_bk.shape[0] if n is None else min(n, q_idx_bk.shape[0])
  index.search(q_idx_bk[:1], q_val_bk[:1], k=k, threads=1, **search_kwargs)  # warm-up
  out = np.empty(n)
  for i in range(n):
    t = time.perf_counter()
    index.search(q_idx_bk[i:i + 1], q_val_bk[i:i + 1], k=k, threads=1, **search_kwargs)
    out[i] = (time.perf_counter() - t) * 1e3
  return out


def efficiency_report(index: Any, q_idx_bk: np.ndarray, q_val_bk: np.ndarray, *, k: int = 1000,
                      query_encode_seconds: float | None = None,
                      **search_kwargs) -> dict[str, float]:
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
      "mean_active_dims_query": st["mean_query_length"],
      "mean_active_dims_doc": st["mean_doc_length"],
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


def encode_queries(encoder: Any, tokenizer: Any, queries: Mapping[str, str], *, k_query: int = 128,
                   batch_size: int = 64, max_length: int | None = None
                   ) -> tuple[list[str], np.ndarray, np.ndarray, float]:
  """Encodes queries -> (qids, idx_bk, val_bk, seconds)."""
  from laspar_jax import encode as encode_lib
  qids = list(queries)
  t = time.perf_counter()
  parts = list(encode_lib.encode_sparse(encoder, tokenizer, [queries[q] for q in qids],
                                        kind="query", k=k_query, batch_size=batch_size,
                                        max_length=max_length))
  secs = time.perf_counter() - t
  if not parts:
    return qids, np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32), secs
  return (qids, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
          secs)


def format_report(metrics: Mapping[str, float], efficiency: Mapping[str, float]) -> str:
  """Two plain-text tables."""
  lines = ["effectiveness", "-------------"]
  lines += [f"{k:28s} {v:.4f}" for k, v in metrics.items()]
  lines += ["", "efficiency", "----------"]
  for k, v in efficiency.items():
    lines.append(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
  return "\n".join(lines)


def evaluate_encoder(encoder: Any, tokenizer: Any, collection: Any, index: Any, *,
                     k: int = 1000, k_query: int = 128,
                     measures: Sequence[str] = DEFAULT_MEASURES,
                     run_path: str | os.PathLike | None = None, tag: str = "laspar",
                     batch_size: int = 64, threads: int | None = None,
                     verbose: bool = True, **search_kwargs) -> dict[str, Any]:
  """Encodes every judged query, searches the full index, scores the run.

  Args:
    encoder, tokenizer: the sparse encoder (see `load_encoder`).
    collection: `laspar_jax.data.sources.Collection` (queries + qrels).
    index: an `Index` or the path of one (built over the whole corpus).
    k: documents retrieved per query.
    k_query: dims kept per query.
    measures: ir-measures strings.
    run_path: where to write the TREC run (optional).
    tag: run tag.
    batch_size: query encoding batch size.
    threads: search threads for the run (None = all cores).
    verbose: print the report.
    **search_kwargs: passed to `index.search` (mode="approx", budget, ...).

  Returns:
    {"metrics": {...}, "efficiency": {...}, "run_path": str | None, "n_queries": int}.
  """
  from laspar_jax.index import Index
  if not isinstance(index, Index):
    index = Index.load(index)
  queries = collection.judged_queries
  if not queries:
    raise ValueError(f"{collection!r} has no judged queries")
  qids, q_idx, q_val, enc_s = encode_queries(encoder, tokenizer, queries, k_query=k_query,
                                             batch_size=batch_size)
  rows, scores = index.search(q_idx, q_val, k=k, threads=threads, **search_kwargs)
  run = results_to_run(index, qids, rows, scores)
  metrics = evaluate_run(run, collection.qrels, measures)
  eff = efficiency_report(index, q_idx, q_val, k=k, query_encode_seconds=enc_s,
                          **search_kwargs)
  if run_path is not None:
    run_path = str(write_trec_run(run, run_path, tag))
  if verbose:
    print(format_report(metrics, eff))
  return {"metrics": metrics, "efficiency": eff, "run_path": run_path, "n_queries": len(qids)}
