"""Zero-shot encoders: RQ1 read-off vs a numpy rebuild of the reference, in-text filter, impacts, one pipeline."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from laspar_jax import encode, evaluate, prompts, zeroshot
from laspar_jax.data import sources
from laspar_jax.index import Index
from laspar_jax.models import hf_weights, sparse_encoder
from laspar_jax.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
LLAMA = str(REPO / "tests" / "fixtures" / "llama3")  # word-level "w0".."w127" (w0 = unk = pad; BOS id 1)
TEXTS = ["w5 the w7 w12 w5", "w9", "the and of", "w3 w4 w5 w6 w7 w8 w9 w10 w11 w13 w14"]


def _encoder(**kw):
  cfg = sparse_encoder.EncoderConfig(backbone=LLAMA, head="mlm", **{"prompt": "reference", **kw})
  return sparse_encoder.build_encoder(cfg)


def _dense(idx, val, v=128):
  out = np.zeros((idx.shape[0], v), np.float32)
  np.put_along_axis(out, idx, val, axis=1)
  return out


def _encode(enc, tok, texts, k=128, kind="doc"):
  parts = list(encode.encode_sparse(enc, tok, texts, kind=kind, k=k, batch_size=3))
  return np.concatenate([_dense(i, v) for i, v in parts])


@nnx.jit
def _forward(model, ids_bl, mask_bl):
  return model(ids_bl, mask_bl)


def _reference_readoff(enc, tok, texts, *, pool="all", kind="doc"):
  """numpy, the reference's rule (lsr/inference_zeroshot.py): the prompt prepended, the whole prompted
  input read (cut at max length), w_v = max over its positions of log1p(relu(h W)), BOS not pooled."""
  preset = prompts.get_preset(enc.config.prompt)
  rows, _ = prompts.compose(tok, texts, preset=preset, kind=kind, max_length=enc.config.doc_max_len)
  w_dv = np.asarray(enc.query_backbone.lm_head.kernel_dv(), np.float64)
  out = np.zeros((len(texts), w_dv.shape[1]), np.float64)
  for b, (ids, flags) in enumerate(rows):
    ids_1l = jnp.asarray([ids], jnp.int32)
    h_ld = np.asarray(_forward(enc.query_backbone, ids_1l, jnp.ones_like(ids_1l)), np.float64)[0]
    z_lv = np.log1p(np.maximum(h_ld @ w_dv, 0.0))
    keep = np.asarray([i != 1 and (pool == "all" or f == 1) for i, f in zip(ids, flags)], bool)  # 1: the family's BOS
    out[b] = z_lv[keep].max(0)
  return out


def test_rq1_pooling_over_prompt_and_text_matches_numpy():
  enc, tok = _encoder(doc_max_len=250)
  got = _encode(enc, tok, TEXTS)
  want = _reference_readoff(enc, tok, TEXTS)
  np.testing.assert_allclose(got, want, atol=1e-5)
  text_enc, _ = _encoder(doc_max_len=250, prompt_pool="text")
  text_only = _encode(text_enc, tok, TEXTS)
  np.testing.assert_allclose(text_only, _reference_readoff(enc, tok, TEXTS, pool="text"), atol=1e-5)
  assert np.abs(text_only - got).max() > 1e-3  # the prompt's positions count under "all"


def test_in_text_filter_int100_every_term_and_fallback():
  enc, tok = _encoder(in_text_filter=True, filter_match="id", impacts="int100", doc_max_len=250)
  got = _encode(enc, tok, TEXTS, k=2)
  full = _reference_readoff(enc, tok, TEXTS)
  allowed = [[5, 7, 12], [9], [], [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14]]  # "the"/"and"/"of" are stop words
  for b, ids in enumerate(allowed):
    want = np.zeros(128)
    if ids and (np.floor(full[b, ids] * 100) > 0).any():
      want[ids] = np.floor(full[b, ids] * 100)  # every in-text term, more than k=2
    else:  # the reference's fallback: the unfiltered top-k
      top = np.argsort(-full[b], kind="stable")[:2]
      want[top] = np.floor(full[b, top] * 100)
    np.testing.assert_allclose(got[b], want, atol=1.0 + 1e-6)  # int(w*100): one unit of float round-off
    assert np.count_nonzero(got[b]) == np.count_nonzero(want)
  assert (got == np.floor(got)).all()
  capped, _ = _encoder(in_text_filter=True, filter_match="id", term_cap=2, doc_max_len=250)
  assert (np.count_nonzero(_encode(capped, tok, TEXTS, k=8), axis=1) <= [2, 2, 8, 2]).all()


def test_filter_matches_lowercased_strings_without_the_word_marker():
  smol = Tokenizer.from_gguf(hf_weights.resolve("HuggingFaceTB/SmolLM2-135M-Instruct"))
  f = zeroshot.InTextFilter(smol, smol.vocab_size)
  got = {smol.id_to_token(int(i)) for i in f.allowed_ids(["The Cells of the body"])[0]}
  assert {"cells", "Ġcells", "ĠCells", "body", "Ġbody"} <= got
  assert not {"The", "Ġthe", "Ġof"} & got


def test_bad_zeroshot_settings_name_the_field():
  enc, tok = _encoder(impacts="int")
  with pytest.raises(ValueError, match="EncoderConfig.impacts"):
    _encode(enc, tok, TEXTS)
  fields, ev = zeroshot.encoder_fields({"backbone": LLAMA, "preset": "promptreps", "topk": 8})
  assert fields["decoding"] == "last_token" and fields["prompt"] == "promptreps" and ev["d_topk"] == 8


def _collection(root):
  coll = root / "beir"
  (coll / "qrels").mkdir(parents=True)
  docs = ["w5 w6 w7", "w8 w9 the w10", "w11 w12", "w13 w14 w15 w16", "w5 w20", ""]
  (coll / "corpus.jsonl").write_text(
    "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(docs))
  )
  queries = ["w5 w6", "w9 w10", "w13 w16", "w30"]
  (coll / "queries.jsonl").write_text(
    "".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(queries))
  )
  (coll / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td3\t1\nq3\td2\t1\n")
  return coll


def test_zeroshot_encoder_through_the_one_pipeline_saved_and_reloaded(tmp_path):
  coll = sources.load_collection(str(_collection(tmp_path)), split="test")
  enc, tok = _encoder(in_text_filter=True, impacts="int100", query_max_len=250, doc_max_len=250)
  ev = ml_collections.ConfigDict(
    dict(q_topk=16, d_topk=16, batch_size=4, measures="nDCG@10,R@100", search_threads=0, max_queries=0, max_docs=0)
  )
  out = evaluate.evaluate_config(
    enc, tok, ev, tmp_path / "eval", progress=False, efficiency=True, bm25=True, collection=coll
  )
  assert {"metrics", "efficiency", "active_q", "active_d", "flops_per_query", "docs_cut", "queries_cut", "bm25"} <= set(
    out
  )
  assert out["n_queries"] == 4 and out["metrics"]["R@100"] == pytest.approx(1.0)  # every query's words are in its doc
  assert out["flops_per_query"] == out["efficiency"]["flops_per_query"] > 0 and out["docs_cut"] == 0
  assert out["bm25"]["metrics"]["nDCG@10"] == pytest.approx(0.75)  # q3's word is in no document
  assert out["bm25"]["flops_per_query"] == pytest.approx((3 + 2 + 2 + 0) / 4)  # q0: w5 in d0, d4; w6 in d0
  flat = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert flat["nDCG@10"] == out["metrics"]["nDCG@10"] and flat["active_q"] == out["active_q"]
  ix = Index.load(tmp_path / "eval" / "index")
  assert ix.manifest["encoder_hash"] == enc.config.fingerprint() and ix.manifest["metadata"]["docs_encoded"] == 6
  sparse_encoder.save_encoder(enc, tok, tmp_path / "saved")
  back, back_tok = sparse_encoder.load_encoder(tmp_path / "saved")
  assert back.config.fingerprint() == enc.config.fingerprint() and back.config.prompt == "reference"
  np.testing.assert_array_equal(_encode(back, back_tok, TEXTS, k=16), _encode(enc, tok, TEXTS, k=16))
  assert "| BM25 |" in evaluate.format_table([("zs", out), ("BM25", out["bm25"])])


def test_truncation_is_counted(tmp_path):
  enc, tok = _encoder(doc_max_len=60)  # the reference prompt alone is ~30 word tokens here
  stats = encode.new_stats()
  list(encode.encode_sparse(enc, tok, ["w5 " * 100, "w6"], kind="doc", k=4, batch_size=2, stats=stats))
  assert stats == {"texts": 2, "cut": 1, "max_length": 60, "fallbacks": 0}


def _launch(tmp_path, *args):
  return subprocess.run(
    [sys.executable, str(REPO / "launch" / "evaluate.py"), *map(str, args)],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=600,
  )


def test_launch_zeroshot_and_bm25_alone(tmp_path):
  coll = _collection(tmp_path)
  common = ["--collection", coll, "--measures", "nDCG@10,R@100", "--batch_size", "4"]
  res = _launch(
    tmp_path, "--zeroshot", "promptreps", "--encoder", LLAMA, "--index", tmp_path / "ix", "--in_text_filter",
    "--bm25", "--k_doc", "8", "--json", tmp_path / "r.json", *common,
  )  # fmt: skip
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["encoder"]["prompt"] == "promptreps" and report["encoder"]["decoding"] == "last_token"
  assert set(report["bm25"]["metrics"]) == {"nDCG@10", "R@100"} and report["n_queries"] == 4
  assert "| BM25 |" in res.stdout and "truncation: 0 of 6 documents cut at 250 tokens" in res.stdout
  alone = _launch(tmp_path, "--bm25", "--json", tmp_path / "b.json", *common)
  assert alone.returncode == 0, alone.stderr[-3000:]
  assert json.loads((tmp_path / "b.json").read_text())["metrics"]["nDCG@10"] == pytest.approx(0.75)
