"""Training examples: (query, positive, hard negatives, teacher scores).

Negatives come from candidate lists `{qid: [doc_id, ...]}` (best first) built
from a TREC run file (`read_run`), from BM25 over the collection
(`bm25_candidates`, with the `bm25s` library) or from any retriever, e.g. the
model's own index (`retriever_candidates`). `build_examples` then samples a
pool of n negatives per (query, positive), deterministically from a seed and the
query id, never picking a document the qrels mark relevant (grade > 0). The
pipeline draws `n_neg` of the pool per epoch.

Teacher scores (`read_teacher_scores`): the `{qid: {pid: score}}` pickles
(optionally gzipped) of the LSR community (e.g. the MiniLM cross-encoder scores
of sentence-transformers' msmarco-hard-negatives, RankLLaMA scores; int ids
become strings) or a TSV/whitespace file `qid pid score`. With teacher scores,
the candidates of a query are limited to scored documents, and a (query,
positive) whose positive has no score is skipped: every example then carries
1 + len(neg_ids) scores for MarginMSE / KL distillation. `scored_candidates`
turns a score file into candidate lists (negatives drawn from the scored
documents, as the community's MarginMSE recipes do, never a relevant one), and
`calibrate_scores` maps one teacher's scores onto another's scale (affine,
global or per query: RankLLaMA scores onto the MiniLM cross-encoder's).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import pickle
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from laspar_jax.data import formats
from laspar_jax.data.formats import DataFormatError

_LOG = logging.getLogger(__name__)

Candidates = dict[str, list[str]]


@dataclasses.dataclass(frozen=True)
class TrainExample:
  """One training group: a query, its positive, a pool of negatives, optional teacher scores.

  Attributes:
    qid: query id.
    pos_id: positive document id.
    neg_ids: negative document ids (a pool; the pipeline draws n_neg per epoch).
    teacher_scores: None, or 1 + len(neg_ids) scores aligned with (pos_id, *neg_ids).
  """

  qid: str
  pos_id: str
  neg_ids: tuple[str, ...]
  teacher_scores: tuple[float, ...] | None = None


def positive_pairs(qrels: Mapping[str, Mapping[str, int]], *, min_grade: int = 1) -> list[tuple[str, str]]:
  """(qid, doc_id) for every qrels pair with grade >= min_grade, in sorted order."""
  return sorted((q, d) for q, docs in qrels.items() for d, g in docs.items() if g >= min_grade)


def _rows(f, path, n_cols: int, what: str):
  """Yields (line number, whitespace-split columns) of non-blank lines; wrong widths raise."""
  for lineno, raw in enumerate(f, 1):
    cols = raw.decode("utf-8", errors="replace").split()
    if not cols:
      continue
    if len(cols) != n_cols:
      raise DataFormatError(path, lineno, f"{what} has {len(cols)} columns, expected {n_cols}")
    yield lineno, cols


def read_run(path: str | os.PathLike, *, depth: int | None = None) -> Candidates:
  """Reads a TREC run (`qid Q0 docid rank score tag`) into candidates {qid: [docid, ...]} by score.

  Raises:
    DataFormatError: a malformed line (see `formats.read_trec_run`).
  """
  return {q: list(docs) for q, docs in formats.read_trec_run(path, depth=depth).items()}


def bm25_candidates(
  doc_ids: Sequence[str],
  doc_texts: Sequence[str],
  queries: Mapping[str, str],
  *,
  depth: int = 100,
  k1: float = 0.9,
  b: float = 0.4,
  show_progress: bool = False,
) -> Candidates:
  """BM25 top-`depth` documents per query (bm25s; English stopwords, no stemming).

  Args:
    doc_ids: corpus ids (the whole corpus is indexed in memory by bm25s).
    doc_texts: their texts, aligned.
    queries: {qid: text}.
    depth: documents kept per query.
    k1, b: BM25 parameters (Anserini's MS MARCO defaults).
    show_progress: bm25s progress bars.

  Returns:
    {qid: [doc_id, ...]} best first.
  """
  import bm25s  # pylint: disable=g-import-not-at-top  (1.4 s on its own: imported on first use)

  retriever = bm25s.BM25(k1=k1, b=b)
  retriever.index(
    bm25s.tokenize(list(doc_texts), stopwords="en", show_progress=show_progress), show_progress=show_progress
  )
  qids = list(queries)
  # Query tokens as strings: bm25s maps them through the corpus vocabulary.
  q_tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", return_ids=False, show_progress=show_progress)
  k = min(depth, len(doc_ids))
  rows_qk, _ = retriever.retrieve(q_tokens, k=k, show_progress=show_progress)
  ids = np.asarray(doc_ids)
  return {q: ids[r].tolist() for q, r in zip(qids, rows_qk)}


def retriever_candidates(
  search: Callable[[list[str]], Sequence[Sequence[str]]], queries: Mapping[str, str], *, batch_size: int = 256
) -> Candidates:
  """Candidates from any retriever, e.g. the model's own index.

  Args:
    search: maps a list of query texts to, per query, doc ids best first.
    queries: {qid: text}.
    batch_size: queries per call.

  Returns:
    {qid: [doc_id, ...]}.
  """
  qids = list(queries)
  out: Candidates = {}
  for i in range(0, len(qids), batch_size):
    chunk = qids[i : i + batch_size]
    for q, docs in zip(chunk, search([queries[x] for x in chunk])):
      out[q] = list(docs)
  return out


def read_teacher_scores(path: str | os.PathLike) -> dict[str, dict[str, float]]:
  """Reads teacher scores {qid: {pid: score}} from a (gzipped) pickle or a `qid pid score` text file.

  Raises:
    DataFormatError: a malformed text line, or a pickle that is not a dict of dicts.
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  if ".pkl" in path or ".pickle" in path:
    with opener(path, "rb") as f:
      raw = pickle.load(f)  # the community's format; only load files you trust
    if not isinstance(raw, Mapping):
      raise DataFormatError(path, None, f"expected a dict {{qid: {{pid: score}}}}, got {type(raw).__name__}")
    out = {}
    for q, docs in raw.items():
      if not isinstance(docs, Mapping):
        raise DataFormatError(path, None, f"query {q!r}: expected a dict of scores")
      out[str(q)] = {str(d): float(s) for d, s in docs.items()}
    return out
  out: dict[str, dict[str, float]] = {}
  with opener(path, "rb") as f:
    for lineno, cols in _rows(f, path, 3, "`qid pid score` line"):
      try:
        out.setdefault(cols[0], {})[cols[1]] = float(cols[2])
      except ValueError:
        raise DataFormatError(path, lineno, f"bad score {cols[2]!r}") from None
  return out


def _rng(seed: int, *keys: str) -> np.random.Generator:
  return np.random.default_rng([seed & 0xFFFFFFFF] + [zlib.crc32(k.encode("utf-8")) for k in keys])


def build_examples(
  qrels: Mapping[str, Mapping[str, int]],
  candidates: Mapping[str, Sequence[str]] | None,
  *,
  n_neg: int,
  seed: int = 0,
  min_grade: int = 1,
  teacher_scores: Mapping[str, Mapping[str, float]] | None = None,
  depth: int | None = None,
  queries: Iterable[str] | None = None,
) -> list[TrainExample]:
  """Builds one TrainExample per (query, positive) pair.

  Args:
    qrels: {qid: {doc_id: grade}}.
    candidates: {qid: [doc_id, ...]} best first (run file, BM25, index,
      `scored_candidates`), or None for no hard negatives (in-batch negatives
      only). A document the qrels mark relevant (grade > 0), or the positive
      itself, is never a negative, even when it is a scored candidate.
    n_neg: negatives sampled per example (without replacement; if a query has
      fewer usable candidates, with replacement; with none, the example is
      skipped and counted in the log).
    seed: the sample depends only on (seed, qid, pos_id).
    min_grade: qrels grade that counts as positive.
    teacher_scores: {qid: {doc_id: score}}; when given, only scored candidates
      are used and examples whose positive is unscored are skipped.
    depth: use only the top `depth` candidates.
    queries: restrict to these query ids (e.g. those with text).

  Returns:
    Examples sorted by (qid, pos_id).
  """
  keep_q = set(queries) if queries is not None else None
  out, skipped = [], {"no_candidates": 0, "no_teacher_score": 0}
  for qid, pos_id in positive_pairs(qrels, min_grade=min_grade):
    if keep_q is not None and qid not in keep_q:
      continue
    scores = None
    if teacher_scores is not None:
      scores = teacher_scores.get(qid, {})
      if pos_id not in scores:
        skipped["no_teacher_score"] += 1
        continue
    neg_ids: tuple[str, ...] = ()
    if candidates is not None and n_neg > 0:
      relevant = {d for d, g in qrels[qid].items() if g > 0} | {pos_id}
      pool = [d for d in candidates.get(qid, ())[:depth] if d not in relevant and (scores is None or d in scores)]
      pool = list(dict.fromkeys(pool))
      if not pool:
        skipped["no_candidates"] += 1
        continue
      rng = _rng(seed, qid, pos_id)
      pick = rng.choice(len(pool), size=n_neg, replace=len(pool) < n_neg)
      neg_ids = tuple(pool[i] for i in pick)
    ts = None if scores is None else tuple(float(scores[d]) for d in (pos_id, *neg_ids))
    out.append(TrainExample(qid, pos_id, neg_ids, ts))
  if any(skipped.values()):
    _LOG.warning("build_examples: skipped %s", skipped)
  return out


def scored_candidates(teacher_scores: Mapping[str, Mapping[str, float]]) -> Candidates:
  """Candidates from a teacher score file: each query's scored documents, best score first.

  Ties keep the file's order. `build_examples` then samples negatives from all
  of them (no depth cut), leaving out the query's relevant documents.
  """
  return {q: [d for d, _ in sorted(docs.items(), key=lambda kv: -kv[1])] for q, docs in teacher_scores.items()}


CALIBRATIONS = ("none", "global", "per_query")


def _stats(values: np.ndarray) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values))


def _all_scores(scores: Mapping[str, Mapping[str, float]], name: str) -> np.ndarray:
  flat = np.fromiter((s for docs in scores.values() for s in docs.values()), np.float64)
  if not flat.size:
    raise ValueError(f"{name}: no teacher scores to calibrate")
  if not np.all(np.isfinite(flat)):
    raise ValueError(f"{name}: non-finite teacher scores")
  return flat


def calibrate_scores(
  src: Mapping[str, Mapping[str, float]],
  ref: Mapping[str, Mapping[str, float]] | None,
  mode: str,
  *,
  src_name: str = "data.teacher_scores",
  ref_name: str = "data.teacher_calibration_reference",
) -> dict[str, dict[str, float]]:
  """Affine calibration of teacher scores onto a reference teacher's scale.

  s' = (s - mean_src) / std_src * std_ref + mean_ref, with (population) means
  and standard deviations:
    global     over all scores of each file;
    per_query  of each query's scores in `src`, mapped to the same query's
               reference statistics when the reference scores that query with
               at least two distinct values, else to the reference's global ones.
  A query (per_query) whose source scores are all equal (e.g. one scored
  document) has std 0: its scores are only centred, i.e. all become the
  reference mean. A whole source (global) or reference with std 0 is an error.

  Args:
    src: {qid: {pid: score}} to calibrate.
    ref: {qid: {pid: score}} of the reference teacher (ignored for "none").
    mode: "none" (a copy of src), "global" or "per_query".
    src_name, ref_name: how errors name the two inputs (file or config field).

  Returns:
    New {qid: {pid: score}} with the same keys as src.

  Raises:
    ValueError: an unknown mode, a missing or empty reference, non-finite
      scores, or constant scores (std 0) over a whole file.
  """
  if mode not in CALIBRATIONS:
    raise ValueError(f"teacher calibration must be one of {CALIBRATIONS}, got {mode!r}")
  if mode == "none":
    return {q: dict(docs) for q, docs in src.items()}
  if ref is None:
    raise ValueError(f"calibration {mode!r} needs reference scores ({ref_name})")
  src_mean, src_std = _stats(_all_scores(src, src_name))
  ref_mean, ref_std = _stats(_all_scores(ref, ref_name))
  for name, std in ((src_name, src_std), (ref_name, ref_std)):
    if std == 0:
      raise ValueError(f"{name}: every score is the same (std 0): nothing to calibrate {mode!r}")
  out: dict[str, dict[str, float]] = {}
  for q, docs in src.items():
    values = np.fromiter(docs.values(), np.float64, count=len(docs))
    if mode == "global":
      mean, std, to_mean, to_std = src_mean, src_std, ref_mean, ref_std
    else:
      mean, std = _stats(values) if values.size else (0.0, 0.0)
      ref_q = np.fromiter(ref.get(q, {}).values(), np.float64)
      to_mean, to_std = _stats(ref_q) if ref_q.size > 1 and np.std(ref_q) > 0 else (ref_mean, ref_std)
    scale = to_std / std if std > 0 else 0.0  # std 0: centred only
    out[q] = {d: float((v - mean) * scale + to_mean) for d, v in zip(docs, values)}
  return out
