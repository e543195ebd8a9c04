"""launch/teacher_scores.py: BM25 candidates scored by a dense teacher, written as a `.pkl.gz` score file."""

import gzip
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from laspar_jax import teacher
from laspar_jax.data import training
from laspar_jax.models import hf_weights
from tiny_bert import write_tiny_bert

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = {
  f"d{i}": text
  for i, text in enumerate(
    [
      "cats sleep on warm mats",
      "dogs run in the park",
      "quantum mechanics of crystals",
      "a kitten plays with yarn",
      "protein folding in cells",
      "the stock market fell today",
      "rain and wind in the mountains",
      "neural networks learn features",
      "cooking pasta with tomatoes",
      "planets orbit the sun",
    ]
  )
}
QUERIES = {
  "q0": "where do cats sleep",
  "q1": "how do proteins fold",
  "q2": "what orbits the sun",
  "q3": "unjudged query",
}
QRELS = {"q0": {"d0": 1, "d3": 1}, "q1": {"d4": 1}, "q2": {"d9": 1, "d5": 0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
  root = tmp_path_factory.mktemp("ts")
  coll = root / "coll"
  (coll / "qrels").mkdir(parents=True)
  (coll / "corpus.jsonl").write_text(
    "".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in DOCS.items())
  )
  (coll / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in QUERIES.items()))
  (coll / "qrels" / "train.tsv").write_text(
    "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, r in QRELS.items() for d, g in r.items())
  )
  (coll / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td1\t1\n")
  return root, coll, write_tiny_bert(root / "tiny", minilm_path)


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, str(REPO / "launch" / "teacher_scores.py"), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


def test_writes_dense_teacher_scores(setup):
  root, coll, tiny = setup
  out = root / "out" / "train_scores.pkl.gz"
  proc = _run(
    f"--collection={coll}",
    "--split=train",
    f"--out={out}",
    "--depth=3",
    f"--teacher={tiny}",
    "--batch_size=4",
    "--doc_max_len=32",
    "--query_max_len=16",
    "--scale=2",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote" in proc.stdout and sorted(os.listdir(out.parent)) == ["train_scores.pkl.gz"]  # no temp left
  with gzip.open(out, "rb") as f:
    raw = pickle.load(f)
  assert sorted(raw) == ["q0", "q1", "q2"]  # the split's judged queries only
  scores = training.read_teacher_scores(out)
  assert scores == raw
  # Candidates: the BM25 top 3 plus every judged document of the query.
  docs = list(DOCS)
  bm25 = training.bm25_candidates(docs, [DOCS[d] for d in docs], {q: QUERIES[q] for q in QRELS}, depth=3)
  for q in QRELS:
    assert list(scores[q]) == list(dict.fromkeys(bm25[q] + list(QRELS[q])))
  # Scores: 2 x the cosine of the teacher's normalized mean-pooled embeddings.
  loaded = hf_weights.load(tiny, max_length=32)
  qids = sorted(QRELS)
  q_emb = np.concatenate(list(teacher.encode_dense(loaded, [QUERIES[q] for q in qids], batch_size=4, max_length=16)))
  d_emb = np.concatenate(list(teacher.encode_dense(loaded, [DOCS[d] for d in docs], batch_size=4, max_length=32)))
  for i, q in enumerate(qids):
    want = {d: 2 * float(d_emb[docs.index(d)] @ q_emb[i]) for d in scores[q]}
    np.testing.assert_allclose([scores[q][d] for d in want], list(want.values()), atol=1e-5)
  # The file feeds MarginMSE: every positive is scored, no positive is a negative.
  ex = training.build_examples(QRELS, training.scored_candidates(scores), n_neg=2, teacher_scores=scores)
  assert len(ex) == 4 and all(not set(QRELS[e.qid]) - {"d5"} & set(e.neg_ids) for e in ex)


def test_missing_flags_and_bad_collection(setup):
  root, coll, tiny = setup
  assert _run(f"--collection={coll}").returncode != 0  # --out is required
  proc = _run(f"--collection={root / 'nope'}", f"--out={root / 'x.pkl.gz'}", f"--teacher={tiny}")
  assert proc.returncode != 0 and "nope" in proc.stderr and not (root / "x.pkl.gz").exists()
