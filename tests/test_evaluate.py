"""The one evaluation path (laspar_jax.evaluate): queries without results count 0, figures match the written run."""

import dataclasses
import json
import zlib

import ir_measures
import ml_collections
import numpy as np
import pytest

from laspar_jax import encode as encode_lib
from laspar_jax import evaluate
from laspar_jax.data import formats
from laspar_jax.data.sources import Doc
from laspar_jax.distributed_index import index_collection
from laspar_jax.index import Index

QRELS = {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}, "q3": {"d4": 1}}


def test_evaluate_run_counts_every_judged_query():
  run = {"q1": {"d1": 2.0, "d9": 3.0}, "q2": {"d3": 1.0}, "qx": {"d1": 1.0}}
  m = evaluate.evaluate_run(run, QRELS, ["RR@10", "R@100", "nDCG@10", "P@1"])
  # q1: d1 at rank 2 -> RR 0.5; q2: rank 1 -> 1; q3 missing -> 0.
  assert m["RR@10"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert m["R@100"] == pytest.approx(2 / 3)
  assert m["P@1"] == pytest.approx(1 / 3)
  with pytest.raises(Exception):
    evaluate.parse_measures(["NotAMeasure@3"])


@dataclasses.dataclass
class _FakeConfig:
  name: str = "fake"

  def fingerprint(self):
    return "fake0123"


class _FakeEncoder:
  """Bag of hashed words, weight = 1 + log(count)."""

  config = _FakeConfig()
  output_dim = 4096


def _fake_encode_sparse(encoder, tokenizer, texts, *, kind, k, batch_size=64, max_length=None, min_weight=0.0, **_):
  texts = list(texts)
  for s in range(0, len(texts), batch_size):
    chunk = texts[s : s + batch_size]
    idx = np.zeros((len(chunk), k), np.int32)
    val = np.zeros((len(chunk), k), np.float32)
    for b, t in enumerate(chunk):
      counts = {}
      for w in t.lower().split():
        d = zlib.crc32(w.encode()) % encoder.output_dim
        counts[d] = counts.get(d, 0) + 1
      top = sorted(counts.items(), key=lambda x: -x[1])[:k]
      for j, (d, c) in enumerate(top):
        idx[b, j], val[b, j] = d, 1.0 + np.log(c)
    yield idx, val


class _FakeCollection:
  name = "fake"
  _docs = [
    Doc("d1", "", "apples and pears"),
    Doc("d2", "Title", "pears only"),
    Doc("d3", "", "the river bank"),
    Doc("d4", "", ""),
    Doc("d5", "", "bank of apples"),
  ]
  queries = {"q1": "apples", "q2": "river bank", "q3": "nothing matches zzz", "q4": "unjudged"}
  qrels = {"q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d4": 1}}
  num_docs = 5

  def docs(self):
    return iter(self._docs)

  @property
  def judged_queries(self):
    return {q: t for q, t in self.queries.items() if q in self.qrels}


def _mean_on_written_run(run_path, qrels, measures):
  """ir-measures per query on the run file as written, averaged over ALL judged queries (absent = 0)."""
  run = formats.read_trec_run(run_path)
  per_q = {str(m): {} for m in measures}
  for x in ir_measures.iter_calc([ir_measures.parse_measure(m) for m in measures], qrels, run):
    per_q[str(x.measure)][x.query_id] = x.value
  return {m: sum(v.get(q, 0.0) for q in qrels) / len(qrels) for m, v in per_q.items()}


def test_build_and_evaluate_with_fake_encoder(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(encode_lib, "encode_sparse", _fake_encode_sparse)
  enc = _FakeEncoder()
  path = index_collection(enc, None, _FakeCollection(), tmp_path / "ix", k_doc=8, batch_size=2, progress=False)
  ix = Index.load(path)
  assert ix.doc_ids.tolist() == ["d1", "d2", "d3", "d4", "d5"]
  assert ix.manifest["encoder_hash"] == "fake0123" and ix.manifest["stats"]["empty_docs"] == 1
  out = evaluate.evaluate_encoder(
    enc, None, _FakeCollection(), path, k=10, k_query=8, run_path=tmp_path / "r.run", measures=["RR@10", "R@100"]
  )
  assert out["n_queries"] == 3
  # q1 -> d1 first (d5 also has "apples" but is longer? equal weight: tie by row -> d1).
  assert out["metrics"]["RR@10"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
  run = formats.read_trec_run(out["run_path"])
  assert set(run) == {"q1", "q2"} and "q3" not in run  # nothing matches: no lines, scores 0
  assert out["active_q"] == pytest.approx((1 + 2 + 3) / 3)
  assert out["active_d"] == pytest.approx(ix.n_postings / 5)
  eff = out["efficiency"]
  assert eff["active_q"] == pytest.approx((1 + 2 + 3) / 3)
  assert eff["latency_mean_ms"] > 0 and eff["index_bytes"] > 0 and eff["qps_single_thread"] > 0
  assert "encode_docs_per_second" in eff
  assert "effectiveness" in capsys.readouterr().out


def _write_beir(root, docs, queries, qrels):
  root.mkdir()
  (root / "corpus.jsonl").write_text(
    "".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in docs.items())
  )
  (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
  (root / "qrels").mkdir()
  (root / "qrels" / "test.tsv").write_text(
    "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, rel in qrels.items() for d, r in rel.items())
  )


@pytest.mark.parametrize("max_queries, max_docs", [(0, 0), (4, 4)])
def test_training_evaluation_counts_empty_queries_as_zero(tmp_path, monkeypatch, max_queries, max_docs):
  """The training-time path (evaluate_config): its figure is ir-measures on the WRITTEN run, all judged queries."""
  monkeypatch.setattr(encode_lib, "encode_sparse", _fake_encode_sparse)
  docs = {
    "d1": "apples and pears",
    "d2": "pears only",
    "d3": "the river bank",
    "d4": "bank of apples",
    "d5": "green apples",
    "d6": "river boats",
  }
  queries = {
    "q1": "apples",
    "q2": "river bank",
    "q3": "nothing matches zzz",
    "q4": "pears",
    "q5": "no hit either",
    "q6": "boats",
    "q7": "unjudged apples",
  }
  qrels = {
    "q1": {"d4": 1, "d5": 1},
    "q2": {"d3": 2, "d6": 1},
    "q3": {"d1": 1},
    "q4": {"d2": 1},
    "q5": {"d2": 1},
    "q6": {"d6": 1},
  }
  _write_beir(tmp_path / "coll", docs, queries, qrels)
  ev = ml_collections.ConfigDict(
    dict(
      collection=str(tmp_path / "coll"),
      split="test",
      q_topk=8,
      d_topk=8,
      batch_size=2,
      measures="nDCG@10,RR@10,R@100,AP",
      max_queries=max_queries,
      max_docs=max_docs,
      search_threads=1,
    )
  )
  res = evaluate.flat_metrics(
    evaluate.evaluate_config(_FakeEncoder(), None, ev, tmp_path / "eval" / "3", progress=False)
  )
  out = tmp_path / "eval" / "3"
  assert json.loads((out / "metrics.json").read_text()) == res
  judged_docs = {d for q in sorted(qrels)[: max_queries or None] for d in qrels[q]}  # a cut corpus keeps these
  kept = set(list(docs)[:max_docs]) | judged_docs if max_docs else set(docs)
  assert Index.load(out / "index").n_docs == len(kept)
  assert {"nDCG@10", "RR@10", "R@100", "AP", "active_q", "active_d", "index_seconds", "eval_seconds"} <= set(res)
  judged = sorted(qrels)[: max_queries or None]
  run = formats.read_trec_run(out / "run.trec")
  assert "q3" not in run and "q5" not in run and "q7" not in run  # no results / unjudged: no lines
  assert set(run) <= set(judged)
  want = _mean_on_written_run(out / "run.trec", {q: qrels[q] for q in judged}, ["nDCG@10", "RR@10", "R@100", "AP"])
  for m, v in want.items():
    assert res[m] == pytest.approx(v, abs=1e-12), m
  # Queries that retrieve nothing pull the mean down (they are not skipped).
  ranked = [q for q in judged if q in run]
  assert len(ranked) < len(judged) and res["RR@10"] < 1.0
  assert res["RR@10"] == pytest.approx(
    sum(
      1.0 / (1 + list(run[q]).index(next(iter(d for d in run[q] if d in qrels[q]))))
      if any(d in qrels[q] for d in run[q])
      else 0.0
      for q in ranked
    )
    / len(judged)
  )
