"""Training examples: positives, deterministic hard negatives, teacher score files."""
import gzip
import pickle

import pytest

from laspar_jax.data import training
from laspar_jax.data.formats import DataFormatError
from laspar_jax.data.sources import doc_text, load_collection

QRELS = {"q1": {"d1": 2, "d2": 1, "d3": 0}, "q2": {"d5": 1}}


def test_positive_pairs_min_grade():
  assert training.positive_pairs(QRELS) == [("q1", "d1"), ("q1", "d2"), ("q2", "d5")]
  assert training.positive_pairs(QRELS, min_grade=2) == [("q1", "d1")]


def test_read_run_orders_by_score(tmp_path):
  p = tmp_path / "run.txt"
  p.write_text("q1 Q0 d9 2 1.5 t\nq1 Q0 d8 1 2.5 t\nq2 Q0 d1 1 0.3 t\n\nq1 Q0 d7 3 -1 t\n")
  assert training.read_run(p) == {"q1": ["d8", "d9", "d7"], "q2": ["d1"]}
  assert training.read_run(p, depth=1)["q1"] == ["d8"]
  p.write_text("q1 Q0 d9 2 1.5 t\nq1 Q0 d8 1\n")
  with pytest.raises(DataFormatError, match="run.txt:2:"):
    training.read_run(p)


def test_negatives_deterministic_and_exclude_relevant():
  cand = {"q1": ["d1", "d2", "d3", "d4", "d6", "d7", "d8", "d9"], "q2": ["d5", "d1"]}
  a = training.build_examples(QRELS, cand, n_neg=3, seed=7)
  b = training.build_examples(QRELS, cand, n_neg=3, seed=7)
  c = training.build_examples(QRELS, cand, n_neg=3, seed=8)
  assert a == b and [e.neg_ids for e in a] != [e.neg_ids for e in c]
  assert [(e.qid, e.pos_id) for e in a] == [("q1", "d1"), ("q1", "d2"), ("q2", "d5")]
  for e in a[:2]:
    assert len(set(e.neg_ids)) == 3 and not {"d1", "d2"} & set(e.neg_ids)  # d3 (grade 0) allowed
  assert a[2].neg_ids == ("d1",) * 3  # one usable candidate: drawn with replacement
  # Changing another query's candidates does not change this query's sample.
  cand2 = dict(cand, q2=["d1", "d2", "d3"])
  assert training.build_examples(QRELS, cand2, n_neg=3, seed=7)[:2] == a[:2]
  assert len(training.build_examples(QRELS, {"q1": ["d1"]}, n_neg=2)) == 0  # no candidates: skipped


def test_teacher_scores_pickle_and_tsv(tmp_path):
  scores = {1: {11: 5.0, 12: -1.0, 13: 0.5}, 2: {21: 1.0}}
  with gzip.open(tmp_path / "ce.pkl.gz", "wb") as f:
    pickle.dump(scores, f)
  got = training.read_teacher_scores(tmp_path / "ce.pkl.gz")
  assert got == {"1": {"11": 5.0, "12": -1.0, "13": 0.5}, "2": {"21": 1.0}}
  (tmp_path / "ce.tsv").write_text("1\t11\t5\n1\t12\t-1.0\n1 13 0.5\n2\t21\t1\n")
  assert training.read_teacher_scores(tmp_path / "ce.tsv") == got
  (tmp_path / "bad.tsv").write_text("1\t11\t5\n1\t12\tx\n")
  with pytest.raises(DataFormatError, match="bad.tsv:2: bad score"):
    training.read_teacher_scores(tmp_path / "bad.tsv")

  qrels = {"1": {"11": 1}, "2": {"21": 1}, "3": {"31": 1}}
  cand = {"1": ["11", "12", "13", "14"], "2": ["22"], "3": ["32"]}
  ex = training.build_examples(qrels, cand, n_neg=2, teacher_scores=got, seed=0)
  assert len(ex) == 1  # q2: no scored negatives; q3: unscored positive
  e = ex[0]
  assert set(e.neg_ids) == {"12", "13"} and "14" not in e.neg_ids
  assert e.teacher_scores == tuple(got["1"][d] for d in (e.pos_id, *e.neg_ids))


def test_bm25_negatives_on_scifact(shared_data):
  c = load_collection(shared_data / "scifact")
  docs = [d for _, d in zip(range(800), c.docs())]
  ids = {d.doc_id for d in docs}
  qrels = {q: r for q, r in c.qrels.items() if set(r) <= ids}
  queries = {q: c.queries[q] for q in qrels}
  assert len(queries) >= 20
  cand = training.bm25_candidates([d.doc_id for d in docs], [doc_text(d) for d in docs], queries, depth=20)
  hits = sum(any(d in qrels[q] for d in cand[q][:10]) for q in queries)
  assert hits / len(queries) > 0.6  # BM25 finds the positive in the top 10 for most queries
  ex = training.build_examples(qrels, cand, n_neg=4, seed=0)
  assert ex and all(len(e.neg_ids) == 4 and e.pos_id not in e.neg_ids for e in ex)


def test_retriever_candidates():
  calls = []
  def search(texts):
    calls.append(len(texts))
    return [[t + "-a", t + "-b"] for t in texts]
  got = training.retriever_candidates(search, {"1": "x", "2": "y", "3": "z"}, batch_size=2)
  assert got == {"1": ["x-a", "x-b"], "2": ["y-a", "y-b"], "3": ["z-a", "z-b"]} and calls == [2, 1]
