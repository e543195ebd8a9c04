"""Tests for laspar_jax.evaluate and the encoder -> index -> run path (fake encoder)."""
import dataclasses
import zlib

import ir_measures
import numpy as np
import pytest

from laspar_jax import evaluate
from laspar_jax.data.sources import Doc
from laspar_jax.index import Index, build_index_from_encoder

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


def test_trec_run_roundtrip_validates(tmp_path):
  run = {"q1": {"d1": 2.0, "d9": 3.0}, "q2": {"d3": 1.0}}
  path = evaluate.write_trec_run(run, tmp_path / "x.run", tag="t")
  lines = path.read_text().splitlines()
  assert lines[0] == "q1 Q0 d9 1 3.000000 t"
  assert evaluate.read_trec_run(path) == run
  assert len(list(ir_measures.read_trec_run(str(path)))) == 3


@dataclasses.dataclass
class _FakeConfig:
  name: str = "fake"

  def fingerprint(self):
    return "fake0123"


class _FakeEncoder:
  """Bag of hashed words, weight = 1 + log(count)."""
  config = _FakeConfig()
  output_dim = 4096


def _fake_encode_sparse(encoder, tokenizer, texts, *, kind, k, batch_size=64, max_length=None,
                        min_weight=0.0, **_):
  texts = list(texts)
  for s in range(0, len(texts), batch_size):
    chunk = texts[s:s + batch_size]
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
  _docs = [Doc("d1", "", "apples and pears"), Doc("d2", "Title", "pears only"),
           Doc("d3", "", "the river bank"), Doc("d4", "", ""), Doc("d5", "", "bank of apples")]
  queries = {"q1": "apples", "q2": "river bank", "q3": "nothing matches zzz", "q4": "unjudged"}
  qrels = {"q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d4": 1}}
  num_docs = 5

  def docs(self):
    return iter(self._docs)

  @property
  def judged_queries(self):
    return {q: t for q, t in self.queries.items() if q in self.qrels}


def test_build_and_evaluate_with_fake_encoder(tmp_path, monkeypatch, capsys):
  from laspar_jax import encode as encode_lib
  monkeypatch.setattr(encode_lib, "encode_sparse", _fake_encode_sparse)
  enc = _FakeEncoder()
  path = build_index_from_encoder(enc, None, _FakeCollection(), tmp_path / "ix", k_doc=8,
                                  batch_size=2, progress=False)
  ix = Index.load(path)
  assert ix.doc_ids.tolist() == ["d1", "d2", "d3", "d4", "d5"]
  assert ix.manifest["encoder_hash"] == "fake0123" and ix.manifest["stats"]["empty_docs"] == 1
  out = evaluate.evaluate_encoder(enc, None, _FakeCollection(), path, k=10, k_query=8,
                                  run_path=tmp_path / "r.run", measures=["RR@10", "R@100"])
  assert out["n_queries"] == 3
  # q1 -> d1 first (d5 also has "apples" but is longer? equal weight: tie by row -> d1).
  assert out["metrics"]["RR@10"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
  run = evaluate.read_trec_run(out["run_path"])
  assert set(run) == {"q1", "q2"} and "q3" not in run  # nothing matches: no lines, scores 0
  eff = out["efficiency"]
  assert eff["mean_active_dims_query"] == pytest.approx((1 + 2 + 3) / 3)
  assert eff["latency_mean_ms"] > 0 and eff["index_bytes"] > 0 and eff["qps_single_thread"] > 0
  assert "encode_docs_per_second" in eff
  assert "effectiveness" in capsys.readouterr().out
