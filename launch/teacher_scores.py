r"""Writes dense-teacher scores `{qid: {pid: score}}` (a `.pkl.gz`) for a collection split.

The candidates of each judged query of the split are its BM25 top `--depth`
documents (`training.bm25_candidates`) plus its judged documents (so every
positive has a score, as `training.build_examples` needs); each (query,
document) pair is scored by the dense teacher (default all-MiniLM-L6-v2,
resolved offline from its PyPI package): the dot product of the mean-pooled,
L2-normalised embeddings (the cosine of the dense-teacher losses), times
`--scale`. The file is the community's format (as sentence-transformers'
msmarco-hard-negatives cross-encoder scores), read by
`laspar_jax.data.training.read_teacher_scores`, and written atomically.

  python launch/teacher_scores.py --collection ../shared/data/scifact --split train \
      --out /tmp/scifact_train_minilm.pkl.gz

Then train with MarginMSE on it:
  --config.data.teacher=scores --config.data.teacher_scores=/tmp/scifact_train_minilm.pkl.gz \
  --config.data.negatives=scores --config.data.n_neg=1 --config.loss.distill=margin_mse
"""

import gzip
import math
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402

from laspar_jax import teacher as teacher_lib  # noqa: E402
from laspar_jax.data import sources, training  # noqa: E402
from laspar_jax.models import hf_weights  # noqa: E402

_COLLECTION = flags.DEFINE_string("collection", None, "collection (BEIR/TSV dir or ir_datasets id)")
_SPLIT = flags.DEFINE_string("split", "train", "qrels split whose judged queries are scored")
_OUT = flags.DEFINE_string("out", None, "output file (.pkl.gz)")
_DEPTH = flags.DEFINE_integer("depth", 100, "BM25 candidates per query")
_TEACHER = flags.DEFINE_string(
  "teacher", "sentence-transformers/all-MiniLM-L6-v2", "dense teacher: model folder or hub id"
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "texts per teacher forward pass")
_QUERY_MAX_LEN = flags.DEFINE_integer("query_max_len", 64, "query truncation (tokens)")
_DOC_MAX_LEN = flags.DEFINE_integer("doc_max_len", 256, "document truncation (tokens)")
_SCALE = flags.DEFINE_float("scale", 1.0, "scores = scale * cosine")
_WITH_QRELS = flags.DEFINE_bool("with_qrels", True, "also score each query's judged documents")
_STRICT = flags.DEFINE_bool("strict", False, "a collection file breaking its format is an error")
flags.mark_flags_as_required(["collection", "out"])


def _embed(loaded, texts, *, batch_size, max_length, desc):
  """float32 [len(texts), E] normalised embeddings, with a progress bar."""
  chunks = teacher_lib.encode_dense(loaded, texts, batch_size=batch_size, max_length=max_length)
  total = math.ceil(len(texts) / batch_size)
  out = list(tqdm.tqdm(chunks, total=total, desc=desc, unit="batch"))
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def dense_teacher_scores(
  coll, *, model, depth=100, batch_size=64, query_max_len=64, doc_max_len=256, scale=1.0, with_qrels=True
):
  """{qid: {pid: score}} for the judged queries of a collection: BM25 candidates scored by a dense teacher.

  Args:
    coll: a `sources.Collection` (its qrels name the queries).
    model: model folder / hub id of the dense teacher.
    depth: BM25 candidates per query.
    batch_size: texts per forward pass.
    query_max_len, doc_max_len: truncation lengths.
    scale: scores = scale * cosine.
    with_qrels: add each query's judged documents to its candidates.

  Returns:
    {qid: {pid: float score}}, candidates in BM25 order (judged documents last).
  """
  qids = sorted(q for q in coll.qrels if q in coll.queries)
  docs = list(tqdm.tqdm(coll.docs(), total=coll.num_docs, desc="corpus", unit="doc"))
  candidates = training.bm25_candidates(
    [d.doc_id for d in docs],
    [sources.doc_text(d) for d in docs],
    {q: coll.queries[q] for q in qids},
    depth=depth,
    show_progress=True,
  )
  text = {d.doc_id: sources.doc_text(d) for d in docs}
  del docs
  pairs = {}
  for q in qids:
    extra = [d for d in coll.qrels[q] if d in text] if with_qrels else []
    pairs[q] = list(dict.fromkeys([*candidates.get(q, ()), *extra]))
  doc_ids = list(dict.fromkeys(d for q in qids for d in pairs[q]))
  loaded = hf_weights.load(model, max_length=max(query_max_len, doc_max_len))
  q_emb = _embed(
    loaded, [coll.queries[q] for q in qids], batch_size=batch_size, max_length=query_max_len, desc="queries"
  )
  d_emb = _embed(loaded, [text[d] for d in doc_ids], batch_size=batch_size, max_length=doc_max_len, desc="documents")
  row = {d: i for i, d in enumerate(doc_ids)}
  out = {}
  for i, q in enumerate(tqdm.tqdm(qids, desc="scores", unit="query")):
    rows = np.fromiter((row[d] for d in pairs[q]), np.int64, count=len(pairs[q]))
    s = scale * (d_emb[rows] @ q_emb[i])
    out[q] = {d: float(v) for d, v in zip(pairs[q], s.tolist())}
  return out


def write_scores(path, scores):
  """Pickles `scores` gzipped to `path` through a temporary sibling and a rename."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with gzip.open(tmp, "wb") as f:
      pickle.dump(scores, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv):
  del argv
  coll = sources.load_collection(_COLLECTION.value, split=_SPLIT.value, strict=_STRICT.value)
  scores = dense_teacher_scores(
    coll,
    model=_TEACHER.value,
    depth=_DEPTH.value,
    batch_size=_BATCH_SIZE.value,
    query_max_len=_QUERY_MAX_LEN.value,
    doc_max_len=_DOC_MAX_LEN.value,
    scale=_SCALE.value,
    with_qrels=_WITH_QRELS.value,
  )
  write_scores(_OUT.value, scores)
  n = sum(len(v) for v in scores.values())
  print(f"wrote {_OUT.value}: {len(scores)} queries, {n} scores", flush=True)


if __name__ == "__main__":
  app.run(main)
