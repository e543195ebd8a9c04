"""Training examples: positives, deterministic hard negatives, teacher score files."""

import gzip
import json
import pickle

import ml_collections
import numpy as np
import pytest

from laspar_jax.data import assemble, training
from laspar_jax.data.formats import DataFormatError
from laspar_jax.data.sources import doc_text, load_collection
from laspar_jax.tokenizer import Tokenizer

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


def test_positive_never_a_negative_even_when_scored():
  # The reference samples negatives from all scored documents, positives included; we never do.
  qrels = {"q1": {"p1": 1, "p2": 2, "n0": 0}, "q2": {"p3": 1}}
  scores = {"q1": {"p1": 9.0, "p2": 8.0, "n0": 1.0, "n1": 3.0, "n2": 2.0}, "q2": {"p3": 5.0, "n3": 1.0}}
  cand = training.scored_candidates(scores)
  assert cand == {"q1": ["p1", "p2", "n1", "n2", "n0"], "q2": ["p3", "n3"]}
  for seed in range(20):
    ex = training.build_examples(qrels, cand, n_neg=4, seed=seed, teacher_scores=scores)
    assert [(e.qid, e.pos_id) for e in ex] == [("q1", "p1"), ("q1", "p2"), ("q2", "p3")]
    for e in ex:
      assert not {"p1", "p2", "p3"} & set(e.neg_ids), e
      assert e.teacher_scores == tuple(scores[e.qid][d] for d in (e.pos_id, *e.neg_ids))
  # min_grade=0 makes a grade-0 document a positive: it is still never its own negative.
  ex = training.build_examples({"q": {"a": 0}}, {"q": ["a", "b"]}, n_neg=3, min_grade=0)
  assert ex[0].neg_ids == ("b",) * 3


def _np_calibrate_global(src, ref):
  s = np.array([v for d in src.values() for v in d.values()])
  r = np.array([v for d in ref.values() for v in d.values()])
  return {q: {p: (v - s.mean()) / s.std() * r.std() + r.mean() for p, v in d.items()} for q, d in src.items()}


def _close(a, b):
  assert a.keys() == b.keys()
  for q in a:
    assert a[q].keys() == b[q].keys()
    np.testing.assert_allclose([a[q][p] for p in a[q]], [b[q][p] for p in a[q]], rtol=1e-9, atol=1e-9)


def test_calibrate_scores_global_and_per_query():
  rng = np.random.default_rng(0)
  src = {f"q{i}": {f"d{j}": float(rng.normal(3 * i, 1 + i)) for j in range(5 + i)} for i in range(4)}
  ref = {f"q{i}": {f"d{j}": float(rng.normal(-i, 0.5)) for j in range(6)} for i in range(3)}
  ref["q2"] = {"d0": 7.0}  # one reference score: this query falls back to the global statistics
  assert training.calibrate_scores(src, None, "none") == src
  _close(training.calibrate_scores(src, ref, "global"), _np_calibrate_global(src, ref))
  r_all = np.array([v for d in ref.values() for v in d.values()])
  want = {}
  for q, d in src.items():
    v = np.array(list(d.values()))
    if q in ("q0", "q1"):
      r = np.array(list(ref[q].values()))
      to_mean, to_std = r.mean(), r.std()
    else:  # q2: a single reference score; q3: not in the reference
      to_mean, to_std = r_all.mean(), r_all.std()
    want[q] = dict(zip(d, (v - v.mean()) / v.std() * to_std + to_mean))
  got = training.calibrate_scores(src, ref, "per_query")
  _close(got, want)
  g = np.array(list(got["q0"].values()))
  np.testing.assert_allclose(
    [g.mean(), g.std()], [np.mean(list(ref["q0"].values())), np.std(list(ref["q0"].values()))], rtol=1e-9
  )
  # Margins (what MarginMSE sees) only change scale under the global calibration.
  m = lambda s: s["q1"]["d0"] - s["q1"]["d1"]
  glob = training.calibrate_scores(src, ref, "global")
  s_all = np.array([v for d in src.values() for v in d.values()])
  np.testing.assert_allclose(m(glob), m(src) * r_all.std() / s_all.std(), rtol=1e-9)


def test_calibrate_scores_constant_and_errors():
  ref = {"a": {"x": 1.0, "y": 3.0}}
  src = {"a": {"x": 5.0, "y": 9.0}, "b": {"z": 4.0}, "c": {"u": 2.0, "v": 2.0}}
  got = training.calibrate_scores(src, ref, "per_query")
  assert got["a"] == {"x": 1.0, "y": 3.0}
  assert got["b"] == {"z": 2.0} and got["c"] == {"u": 2.0, "v": 2.0}  # std 0: centred, at the reference mean
  with pytest.raises(ValueError, match="data.teacher_calibration_reference"):
    training.calibrate_scores(src, None, "global")
  with pytest.raises(ValueError, match="one of"):
    training.calibrate_scores(src, ref, "minmax")
  with pytest.raises(ValueError, match="src.pkl.gz: every score is the same"):
    training.calibrate_scores({"a": {"x": 1.0, "y": 1.0}}, ref, "global", src_name="src.pkl.gz")
  with pytest.raises(ValueError, match="ref.pkl.gz: every score is the same"):
    training.calibrate_scores(src, {"a": {"x": 2.0}}, "per_query", ref_name="ref.pkl.gz")
  with pytest.raises(ValueError, match="no teacher scores"):
    training.calibrate_scores({}, ref, "global")
  with pytest.raises(ValueError, match="non-finite"):
    training.calibrate_scores({"a": {"x": float("nan"), "y": 1.0}}, ref, "global")


def _tiny_beir(path):
  path.mkdir()
  docs = {f"d{i}": f"document number {i} about topic {i % 3} words" for i in range(12)}
  (path / "corpus.jsonl").write_text(
    "".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items())
  )
  (path / "queries.jsonl").write_text(
    "".join(json.dumps({"_id": f"q{i}", "text": f"topic {i}"}) + "\n" for i in range(4))
  )
  (path / "qrels").mkdir()
  (path / "qrels" / "train.tsv").write_text(
    "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))
  )
  return path


def _data_config(coll, **data):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
    collection=str(coll),
    split="train",
    negatives="scores",
    n_neg=2,
    neg_pool=3,
    neg_depth=100,
    teacher="scores",
    teacher_scores="",
    teacher_model="",
    teacher_cache="",
    batching="random",
    prefetch=0,
    teacher_calibration="none",
    teacher_calibration_reference="",
  )
  c.data.update(data)
  c.model = dict(query_max_len=8, doc_max_len=16, query_prefix="", doc_prefix="")
  c.optim = dict(batch_size=2)
  return c


def test_margin_mse_from_a_score_file(tmp_path, minilm_path):
  coll = _tiny_beir(tmp_path / "coll")
  rng = np.random.default_rng(1)
  scores = {f"q{i}": {f"d{j}": float(rng.normal()) for j in range(12)} for i in range(4)}
  ref = {f"q{i}": {f"d{j}": float(rng.normal(10, 4)) for j in range(12)} for i in range(4)}
  for name, s in (("src.pkl.gz", scores), ("ref.pkl.gz", ref)):
    with gzip.open(tmp_path / name, "wb") as f:
      pickle.dump(s, f)
  tok = Tokenizer.from_dir(minilm_path, max_length=16)
  c = _data_config(coll, teacher_scores=str(tmp_path / "src.pkl.gz"))
  pipe, info = assemble.build_pipeline(c, tok, tmp_path, progress=False)
  try:
    assert info["examples"] == 4 and info["steps_per_epoch"] == 2
    for e in pipe.examples:
      assert e.pos_id not in e.neg_ids and len(e.neg_ids) == 3
      assert e.teacher_scores == tuple(scores[e.qid][d] for d in (e.pos_id, *e.neg_ids))
    b = pipe.batch_at(0, 0)
    assert b["teacher_scores"].shape == (2, 3) and b["d_input_ids"].shape == (6, 16)
  finally:
    pipe.close()
  c.data.teacher_calibration = "per_query"
  c.data.teacher_calibration_reference = str(tmp_path / "ref.pkl.gz")
  cal = assemble.teacher_scores(c.data)
  _close(cal, training.calibrate_scores(scores, ref, "per_query"))
  c.data.teacher_calibration_reference = str(tmp_path / "nope.pkl.gz")
  with pytest.raises(FileNotFoundError, match="data.teacher_calibration_reference=.*nope.pkl.gz"):
    assemble.teacher_scores(c.data)
  c.data.teacher_calibration_reference = ""
  with pytest.raises(ValueError, match="data.teacher_calibration_reference is empty"):
    assemble.teacher_scores(c.data)
  c.data.teacher_scores = str(tmp_path / "missing.pkl.gz")
  with pytest.raises(FileNotFoundError, match="data.teacher_scores=.*missing.pkl.gz"):
    assemble.build_pipeline(c, tok, tmp_path, progress=False)
  c = _data_config(coll, teacher="none")
  with pytest.raises(ValueError, match="negatives='scores' needs data.teacher='scores'"):
    assemble.build_pipeline(c, tok, tmp_path, progress=False)
