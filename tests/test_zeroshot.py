"""Zero-shot read-off vs numpy (text pooling, last token, in-text filter, top-k, fallback); end to end with BM25."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from laspar_jax import prompts, zeroshot
from laspar_jax.data import sources
from laspar_jax.index import Index
from laspar_jax.models import hf_weights
from laspar_jax.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
LLAMA = str(REPO / "tests" / "fixtures" / "llama3")  # word-level "w0".."w127" (w0 = unk = pad)
TEXTS = ["w5 the w7 w12 w5", "w9", "the and of", "w3 w4 w5 w6 w7 w8 w9 w10 w11 w13 w14"]


@pytest.fixture(scope="module")
def loaded():
  return hf_weights.load(LLAMA, lm_head=True)


def _reference(loaded, texts, preset, *, last=False, allowed=None, k=128, max_len=64):
  """numpy: log1p(relu(h W)) max over the text positions (or at the last token), filter, fallback, top-k."""
  rows = prompts.compose(loaded.tokenizer, texts, preset=preset, kind="doc", max_text_len=max_len)
  ids_bl, mask_bl, text_bl = prompts.pad_rows(rows, pad_id=0)  # right padding: causal states unchanged
  h_bld = np.asarray(_forward(loaded.model, jnp.asarray(ids_bl), jnp.asarray(mask_bl)), np.float64)
  out = np.zeros((len(texts), loaded.model.vocab_size), np.float32)
  w_dv = np.asarray(loaded.model.lm_head.kernel_dv(), np.float64)
  for b, (ids, _) in enumerate(rows):
    z_tv = np.log1p(np.maximum(h_bld[b, : len(ids)] @ w_dv, 0.0))
    rep = z_tv[-1] if last else z_tv[text_bl[b, : len(ids)] > 0].max(0)
    if allowed is not None:
      kept = np.zeros_like(rep)
      kept[allowed[b]] = rep[allowed[b]]
      rep = kept if (kept > 0).any() else rep
    top = np.argsort(-rep, kind="stable")[:k]
    out[b, top] = rep[top]
  return out


@nnx.jit
def _forward(model, ids_bl, mask_bl):
  return model(ids_bl, mask_bl)


def _dense(idx, val, v=128):
  out = np.zeros((idx.shape[0], v), np.float32)
  np.put_along_axis(out, idx, val, axis=1)
  return out


def test_readoff_matches_numpy(loaded):
  ref = prompts.get_preset("reference")
  enc = zeroshot.ZeroShotEncoder(zeroshot.ZeroShotConfig(backbone=LLAMA, batch_size=3), loaded)
  i, v = enc.encode(TEXTS, "doc")
  np.testing.assert_allclose(_dense(i, v), _reference(loaded, TEXTS, ref), atol=2e-5)
  pr = zeroshot.ZeroShotEncoder(zeroshot.ZeroShotConfig(backbone=LLAMA, preset="promptreps", topk=5), loaded)
  i, v = pr.encode(TEXTS, "doc")
  assert pr.mode == "last_token" and i.shape == (4, 5)
  np.testing.assert_allclose(
    _dense(i, v), _reference(loaded, TEXTS, prompts.get_preset("promptreps"), last=True, k=5), atol=2e-5
  )


def test_in_text_filter_stopwords_topk_fallback(loaded):
  cfg = zeroshot.ZeroShotConfig(backbone=LLAMA, in_text_filter=True, topk=2, batch_size=2, doc_max_len=6)
  enc = zeroshot.ZeroShotEncoder(cfg, loaded)
  allowed = enc.filter.allowed_ids(["w5 the W7 w12 w5", "the and of", ""])
  assert [a.tolist() for a in allowed] == [[5, 7, 12], [], []]  # "the" (unk w0 in the model) is a stop word
  i, v = enc.encode(TEXTS, "doc")
  # doc_max_len=6 cuts text 3 after w8: the filter sees the kept words only.
  want = [[5, 7, 12], [9], [], [3, 4, 5, 6, 7, 8]]
  np.testing.assert_allclose(
    _dense(i, v), _reference(loaded, TEXTS, prompts.get_preset("reference"), allowed=want, k=2, max_len=6), atol=2e-5
  )
  assert ((v > 0).sum(1) <= 2).all() and set(i[0][v[0] > 0]) <= {5, 7, 12}
  assert enc.fallbacks == 1  # "the and of": nothing left, the unfiltered top-k
  assert (v[2] > 0).sum() == 2
  assert zeroshot.ZeroShotConfig.from_dict({"backbone": LLAMA, "topk": 2}).topk == 2
  with pytest.raises(ValueError, match="unknown zero-shot config fields"):
    zeroshot.ZeroShotConfig.from_dict({"bogus": 1})
  by_id = zeroshot.InTextFilter(loaded.tokenizer, 128, match="id", stop=frozenset({"w5"}))
  assert by_id.allowed_ids(["w5 w6 w6"])[0].tolist() == [6]


def test_filter_matches_lowercased_strings_without_the_word_marker():
  smol = Tokenizer.from_gguf(hf_weights.resolve("HuggingFaceTB/SmolLM2-135M-Instruct"))
  f = zeroshot.InTextFilter(smol, smol.vocab_size)
  raw = smol._tok  # pylint: disable=protected-access
  got = {raw.id_to_token(int(i)) for i in f.allowed_ids(["The Cells of the body"])[0]}
  assert {"cells", "Ġcells", "ĠCells", "body", "Ġbody"} <= got
  assert not {"The", "Ġthe", "Ġof"} & got


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


def test_evaluate_zeroshot_end_to_end_with_bm25(tmp_path, loaded):
  coll = sources.load_collection(str(_collection(tmp_path)), split="test")
  cfg = zeroshot.ZeroShotConfig(backbone=LLAMA, in_text_filter=True, topk=16, batch_size=4)
  enc = zeroshot.ZeroShotEncoder(cfg, loaded)
  out = zeroshot.evaluate_zeroshot(
    cfg,
    coll,
    tmp_path / "ix",
    measures=["nDCG@10", "R@100"],
    bm25=True,
    run_path=tmp_path / "zs.run",
    encoder=enc,
    progress=False,
  )
  assert {
    "metrics",
    "efficiency",
    "run_path",
    "n_queries",
    "active_q",
    "active_d",
    "flops_per_query",
    "mean_active_q",
    "mean_active_d",
    "bm25",
  } <= set(out)
  assert out["n_queries"] == 4 and set(out["metrics"]) == {"nDCG@10", "R@100"}
  assert out["metrics"]["R@100"] == pytest.approx(1.0)  # every query's words are its document's: all found
  assert out["flops_per_query"] == out["efficiency"]["flops_per_query"] > 0
  assert out["bm25"]["metrics"]["nDCG@10"] == pytest.approx(0.75)  # q3's word is in no document
  assert out["bm25"]["flops_per_query"] == pytest.approx((3 + 2 + 2 + 0) / 4)  # q0: w5 in d0, d4; w6 in d0
  assert pathlib.Path(out["run_path"]).exists() and pathlib.Path(out["bm25"]["run_path"]).exists()
  ix = Index.load(tmp_path / "ix")
  assert ix.n_docs == 6 and ix.manifest["encoder_hash"] == cfg.fingerprint()
  assert ix.manifest["metadata"]["zeroshot"]["preset"] == "reference"
  table = zeroshot.format_table(out)
  assert "| BM25 |" in table and "nDCG@10" in table
  again = zeroshot.evaluate_zeroshot(
    cfg, coll, tmp_path / "ix", measures=["nDCG@10"], encoder=enc, progress=False, efficiency=False
  )  # the index is reused
  assert again["metrics"]["nDCG@10"] == pytest.approx(out["metrics"]["nDCG@10"])
  other = zeroshot.ZeroShotConfig(backbone=LLAMA, topk=8)
  with pytest.raises(FileExistsError, match="another encoder"):
    zeroshot.evaluate_zeroshot(
      other, coll, tmp_path / "ix", encoder=zeroshot.ZeroShotEncoder(other, loaded), progress=False
    )


def test_launch_zeroshot(tmp_path):
  coll = _collection(tmp_path)
  res = subprocess.run(
    [
      sys.executable,
      str(REPO / "launch" / "evaluate.py"),
      "--zeroshot",
      "promptreps",
      "--encoder",
      LLAMA,
      "--collection",
      str(coll),
      "--index",
      str(tmp_path / "ix"),
      "--in_text_filter",
      "--bm25",
      "--measures",
      "nDCG@10,R@100",
      "--k_doc",
      "8",
      "--batch_size",
      "4",
      "--json",
      str(tmp_path / "r.json"),
    ],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=600,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["zeroshot"]["preset"] == "promptreps" and report["zeroshot"]["topk"] == 8
  assert set(report["bm25"]["metrics"]) == {"nDCG@10", "R@100"} and report["n_queries"] == 4
  assert "| BM25 |" in res.stdout
