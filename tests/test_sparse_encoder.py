"""Sparse encoder: save/load roundtrip, shared vs separate towers, heads per side, abstract build, errors."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from etils import epath
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax.models import heads, hf_weights, layers, sparse_encoder  # noqa: E402
from laspar_jax.models.sparse_encoder import EncoderConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)


def _inputs(tok):
  b = tok(["a query about cells", "another much longer query about proteins"], max_length=16)
  return b["input_ids"], b["attention_mask"]


@pytest.mark.parametrize("towers,head", [("separate", "latent_attention"), ("shared", "mlm")])
def test_save_load_roundtrip(tiny_path, tmp_path, towers, head):
  cfg = EncoderConfig(
    backbone=str(tiny_path),
    head=head,
    latent_dim=256,
    towers=towers,
    head_kwargs={"kernel_std": 1.0} if head != "mlm" else {},
    query_prefix="query: ",
    doc_prefix="document: ",
    query_max_len=16,
    doc_max_len=32,
  )
  enc, tok = sparse_encoder.build_encoder(cfg)
  ids, mask = _inputs(tok)
  want_q = np.asarray(enc(ids, mask, kind="query"))
  want_d = np.asarray(enc(ids, mask, kind="doc"))
  path = sparse_encoder.save_encoder(enc, tok, tmp_path / "enc")
  assert json.loads((pathlib.Path(path) / sparse_encoder.CONFIG_NAME).read_text())["towers"] == towers
  enc2, tok2 = sparse_encoder.load_encoder(path)
  assert enc2.config.query_prefix == "query: " and enc2.config.head == head
  assert enc2.output_dim == (256 if head != "mlm" else tok.vocab_size)
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask, kind="query")), want_q)
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask, kind="doc")), want_d)
  assert (tok2(["x y"])["input_ids"] == tok(["x y"])["input_ids"]).all()
  if towers == "separate":
    assert enc2.doc_backbone is not None and enc2.doc_head is not None
    assert not np.allclose(want_q, want_d)  # the towers' heads start from different seeds
  else:
    assert enc2.doc_backbone is None and enc2.doc_head is None
    np.testing.assert_array_equal(want_q, want_d)


def test_separate_towers_train_separately(tiny_path):
  cfg = EncoderConfig(backbone=str(tiny_path), head="latent_sum", latent_dim=128, towers="separate")
  enc, tok = sparse_encoder.build_encoder(cfg)
  # Head initialisation as before the heads package: nnx.Rngs(params=seed), then seed + 1.
  for head, seed in ((enc.query_head, 0), (enc.doc_head, 1)):
    ref = heads.LatentSumHead(32, 128, rngs=nnx.Rngs(params=seed))
    np.testing.assert_array_equal(np.asarray(head.kernel[...]), np.asarray(ref.kernel[...]))
  q_before = np.asarray(enc.query_head.kernel[...]).copy()
  enc.doc_head.kernel.set_value(enc.doc_head.kernel[...] * 0)  # changing one tower ...
  np.testing.assert_array_equal(np.asarray(enc.query_head.kernel[...]), q_before)  # ... leaves the other
  params = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
  assert set(params) == {"query_backbone", "doc_backbone", "query_head", "doc_head"}
  assert (
    params["query_backbone"]["embeddings"]["word_embeddings"]["embedding"]
    is not params["doc_backbone"]["embeddings"]["word_embeddings"]["embedding"]
  )


def test_abstract_build_and_load_errors(tiny_path, tmp_path):
  cfg = EncoderConfig(backbone=str(tiny_path), head="latent_attention", latent_dim=2**22)
  enc, _ = sparse_encoder.build_encoder(cfg, weights=False)  # D = 4M: shapes only, nothing allocated
  kernel = enc.query_head.kernel.get_value()
  assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.shape == (32, 2**22)
  small = EncoderConfig(backbone=str(tiny_path), head="latent_attention", latent_dim=64)
  e, t = sparse_encoder.build_encoder(small)
  path = pathlib.Path(sparse_encoder.save_encoder(e, t, tmp_path / "enc"))
  with pytest.raises(hf_weights.CheckpointError, match="shape"):
    sparse_encoder.load_encoder(path, latent_dim=128)
  (path / sparse_encoder.PARAMS_NAME).write_bytes(b"garbage")
  with pytest.raises(hf_weights.CheckpointError, match="cannot read"):
    sparse_encoder.load_encoder(path)


def test_heads_per_side_on_a_shared_backbone(tiny_path, tmp_path):
  cfg = EncoderConfig(
    backbone=str(tiny_path),
    head="latent_attention",
    latent_dim=256,
    head_kwargs={"kernel_std": 1.0},
    doc_head="latent_max",
    doc_head_kwargs={"tile": 64, "kernel_std": 1.0},
  )
  enc, tok = sparse_encoder.build_encoder(cfg)
  assert enc.doc_backbone is None and enc.backbone("doc") is enc.backbone("query")
  assert isinstance(enc.head("query"), heads.LatentAttentionHead)
  assert isinstance(enc.head("doc"), heads.LatentMaxHead) and enc.head("doc").tile == 64
  params = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
  assert set(params) == {"query_backbone", "query_head", "doc_head"}
  ref = heads.LatentMaxHead(32, 256, rngs=nnx.Rngs(params=1), kernel_std=1.0)  # the doc head draws seed + 1
  np.testing.assert_array_equal(np.asarray(enc.doc_head.kernel[...]), np.asarray(ref.kernel[...]))
  ids, mask = _inputs(tok)
  q, d = np.asarray(enc(ids, mask, kind="query")), np.asarray(enc(ids, mask, kind="doc"))
  assert q.shape == d.shape == (2, 256) and enc.output_dim == 256 and not np.allclose(q, d)
  enc2, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, tmp_path / "enc"))
  assert enc2.config.doc_head == "latent_max"
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask, kind="doc")), d)
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask, kind="query")), q)


def test_fingerprint_unchanged_by_new_fields():
  # Values of configs written before doc_head / doc_head_kwargs / attention_impl existed.
  assert EncoderConfig().fingerprint() == "c2c1d601c3101175"
  # special_tokens "dims" is what configs written before the field did: their fingerprints stay.
  assert EncoderConfig(head="mlm", seed=3, special_tokens="dims").fingerprint() == "ea58c36b24c7aafe"
  assert EncoderConfig(head="mlm", seed=3).fingerprint() != "ea58c36b24c7aafe"  # the family rule reads differently
  assert EncoderConfig(special_tokens="keep").fingerprint() == "c2c1d601c3101175"  # no effect on a latent head
  assert EncoderConfig(doc_head="latent_max").fingerprint() != EncoderConfig().fingerprint()


def test_head_width_mismatch_and_shared_vocab_doc_head(tiny_path, tmp_path):
  with pytest.raises(ValueError, match="same width"):
    sparse_encoder.build_encoder(
      EncoderConfig(backbone=str(tiny_path), head="mlm", latent_dim=64, doc_head="latent_sum"), weights=False
    )
  # A vocabulary document head of its own on a shared backbone (refused before the projection
  # was handed to the head at call time): one lm_head, under query_backbone.
  cfg = EncoderConfig(backbone=str(tiny_path), head="mlm", doc_head_kwargs={"pooling": "sum"}, special_tokens="dims")
  enc, tok = sparse_encoder.build_encoder(cfg)
  params = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
  assert set(params) == {"query_backbone"} and "lm_head" in params["query_backbone"]
  assert enc.doc_head.pooling == "sum" and enc.query_head.pooling == "max"
  ids, mask = _inputs(tok)
  q, d = np.asarray(enc(ids, mask, kind="query")), np.asarray(enc(ids, mask, kind="doc"))
  h = enc.query_backbone(ids, mask)
  proj = enc.query_backbone.lm_head
  np.testing.assert_allclose(
    d,
    np.asarray(heads.VocabHead(proj, vocab=tok.vocab_size, pooling="sum", special_ids=tok.special_ids)(h, mask)),
    rtol=1e-6,
    atol=1e-6,
  )
  assert (d >= q - 1e-6).all() and not np.allclose(q, d)  # sum >= max of non-negative terms
  enc2, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, tmp_path / "enc"))
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask, kind="doc")), d)


def test_vocab_heads_use_the_backbone_lm_head(tiny_path, tmp_path):
  cfg = EncoderConfig(
    backbone=str(tiny_path),
    head="mlm",
    towers="separate",
    seed=3,
    doc_head_kwargs={"pooling": "sum", "tile": 1024},
    special_tokens="dims",
  )
  enc, tok = sparse_encoder.build_encoder(cfg)
  params = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
  assert set(params) == {"query_backbone", "doc_backbone"}  # the vocabulary heads hold no parameters
  for side, seed in (("query", 3), ("doc", 4)):
    lm = params[f"{side}_backbone"]["lm_head"]
    assert set(lm) == {"dense", "layer_norm", "bias"}  # tied decoder: the word embeddings
    assert enc.head(side).projection is None  # handed the backbone's lm_head at each call
    # A fresh lm_head draws as the old MLMHead(d, vocab, rngs=nnx.Rngs(params=seed)) did.
    ref = layers.Dense(32, 32, axes=("embed", None), rngs=nnx.Rngs(params=seed))
    np.testing.assert_array_equal(lm["dense"]["kernel"], np.asarray(ref.kernel[...]))
  assert enc.doc_head.pooling == "sum" and enc.query_head.pooling == "max"
  assert set(enc.query_head.special_ids) == set(tok.special_ids.tolist())
  ids, mask = _inputs(tok)
  q, d = np.asarray(enc(ids, mask, kind="query")), np.asarray(enc(ids, mask, kind="doc"))
  assert q.shape == d.shape == (2, tok.vocab_size) and (q[:, tok.special_ids] == 0).all()
  enc2, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, epath.Path(tmp_path) / "enc"))
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask, kind="doc")), d)


@pytest.mark.parametrize("head", ["latent_attention", "mlm"])
def test_load_encoder_saved_in_the_tower_layout(tiny_path, tmp_path, head):
  cfg = EncoderConfig(backbone=str(tiny_path), head=head, latent_dim=64, towers="separate")
  enc, tok = sparse_encoder.build_encoder(cfg)
  ids, mask = _inputs(tok)
  want = np.asarray(enc(ids, mask, kind="doc"))
  path = pathlib.Path(sparse_encoder.save_encoder(enc, tok, tmp_path / "enc"))
  saved = safetensors.numpy.load_file(str(path / sparse_encoder.PARAMS_NAME))
  old = {}  # the names written before the heads package: {side}_tower.{backbone,head}.*
  for name, arr in saved.items():
    side, _, rest = name.partition("_")
    if rest.startswith("backbone.lm_head."):
      old[f"{side}_tower.head.{rest.removeprefix('backbone.lm_head.')}"] = arr
    else:
      old[f"{side}_tower.{rest}"] = arr
  assert len(old) == len(saved)
  safetensors.numpy.save_file(old, str(path / sparse_encoder.PARAMS_NAME))
  enc2, _ = sparse_encoder.load_encoder(path)
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask, kind="doc")), want)
