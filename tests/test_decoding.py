"""Read-out modes (models/decoding.py) and mixed heads against plain numpy references.

The references take hidden states or LM logits as given (transformers' own,
from the fixtures' reference.npz, where they exist; else the JAX backbone's)
and redo the read-out in numpy: decoder inputs and positions, pool masks,
log1p(relu), max / sum pooling, the echo construction, the last index, the
MLP head's scatter.
"""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax.models import decoding, heads, hf_weights, llama, opt, sparse_encoder  # noqa: E402
from laspar_jax.models.sparse_encoder import EncoderConfig  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ATOL = 2e-4
BOS = {"opt_pre": 2, "opt_post": 2, "llama3": 1, "qwen2": 1}


# Eager on purpose: op-by-op dispatch shares compiled ops across the tests' encoders (cheaper
# here than compiling each encoder whole).
def _rep(enc, ids, mask, kind="doc"):
  return enc(ids, mask, kind=kind)


def _states(model, ids, mask):
  return model(ids, mask)


_read = decoding.read


def _build(name, **kw):
  return sparse_encoder.build_encoder(EncoderConfig(backbone=str(FIXTURES / name), **kw))


def _ref(name):
  return np.load(FIXTURES / name / "reference.npz")


def _np_logits(proj, h_btd):
  """LM logits in numpy from given hidden states and the projection's weights."""
  h = np.asarray(h_btd, np.float64) * float(getattr(proj, "scale", 1.0))
  return h @ np.asarray(proj.kernel_dv(), np.float64)


def _np_pool(logits_btv, pool_bt, pooling="max", special=()):
  act = np.where(pool_bt[..., None] > 0, np.log1p(np.maximum(np.nan_to_num(logits_btv), 0)), 0.0)
  rep = act.max(1) if pooling == "max" else act.sum(1)
  rep[:, list(special)] = 0
  return rep


def _np_mlp(h_btd, pool_bt, ids_bt, head, vocab, pooling):
  k = np.asarray(head.linear.kernel[...], np.float64)[:, 0]
  c = float(np.asarray(head.linear.bias[...])[0])
  w = np.maximum(np.asarray(h_btd, np.float64) @ k + c, 0) * (pool_bt > 0)
  w[np.isin(ids_bt, list(head.special_ids))] = 0
  rep = np.zeros((ids_bt.shape[0], vocab))
  for b in range(ids_bt.shape[0]):
    for t in range(ids_bt.shape[1]):
      i = ids_bt[b, t]
      rep[b, i] = rep[b, i] + w[b, t] if pooling == "sum" else max(rep[b, i], w[b, t])
  return rep


def _close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", ["t5_flan", "t5_v10"])
@pytest.mark.parametrize("drop_first,mask_eos", [(True, False), (False, True)])
def test_multi_token(name, drop_first, mask_eos, tmp_path):
  ref = _ref(name)
  ids, mask = ref["ids_right"], ref["mask_right"]
  enc, tok = _build(
    name, head="mlm", decoding="multi_token", decoding_kwargs={"drop_first": drop_first, "mask_eos": mask_eos}
  )
  dec_ids = np.concatenate([np.zeros_like(ids[:, :1]), ids[:, :-1]], 1)  # start token = pad = 0
  pool = np.concatenate([np.ones_like(mask[:, :1]), mask[:, :-1]], 1)
  np.testing.assert_array_equal(dec_ids, ref["dec_ids_right"])
  if drop_first:
    pool[:, 0] = 0
  if mask_eos:
    pool[dec_ids == 1] = 0  # </s>
  assert (dec_ids == 1).any() and pool.sum() < mask.sum() + len(mask)
  # transformers' own LM logits of the teacher-forced decoder
  want = _np_pool(ref["logits_right"], pool)  # T5 keeps special tokens (the family's rule)
  got = np.asarray(_rep(enc, ids, mask))
  _close(got, want)
  if name == "t5_flan" and drop_first:  # the decoding fields travel with the saved encoder
    enc2, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, tmp_path / "enc"))
    assert enc2.config.decoding == "multi_token" and enc2.config.decoding_kwargs == {
      "drop_first": True,
      "mask_eos": False,
    }
    np.testing.assert_array_equal(np.asarray(_rep(enc2, ids, mask)), got)


def test_single_token_vocab_and_mlp():
  ref = _ref("t5_flan")
  ids, mask = ref["ids_right"], ref["mask_right"]
  enc, tok = _build("t5_flan", head="mlm", doc_head="mlp", doc_head_kwargs={"pooling": "max"}, decoding="single_token")
  model = enc.query_backbone
  start = np.zeros((len(ids), 1), np.int32)
  enc_bld = np.asarray(model.encode(ids, mask))
  dec_b1d = np.asarray(model.decode(start, np.ones_like(start), enc_bld, mask))
  want_q = _np_pool(_np_logits(model.lm_head, dec_b1d), np.ones((len(ids), 1)))
  _close(_rep(enc, ids, mask, "query"), want_q)
  # the MLP head weighs each input token from its encoder state plus the decoder state
  want_d = _np_mlp(enc_bld + dec_b1d, mask, ids, enc.doc_head, tok.vocab_size, "max")
  got_d = np.asarray(_rep(enc, ids, mask))
  _close(got_d, want_d)
  row = got_d[0][np.unique(ids[0][mask[0] > 0])]
  assert len(np.unique(np.round(row[row > 0], 6))) > 1  # not one weight for every token


@pytest.mark.parametrize("name", ["t5_flan", "t5_v10"])
def test_encoder_only_and_decoder_stack(name):
  ref = _ref(name)
  ids, mask = ref["ids_right"], ref["mask_right"]
  # decoder_stack with shift=False (ours before): the decoder stack over x, transformers' states.
  for mode, states, kw in (
    ("plain", ref["enc_right"], {}),
    ("decoder_stack", ref["dec_alone_right"], {"shift": False}),
  ):
    enc, tok = _build(name, head="mlm", decoding=mode, head_kwargs={"pooling": "sum"}, decoding_kwargs=kw)
    want = _np_pool(_np_logits(enc.query_backbone.lm_head, states), mask, "sum")
    _close(_rep(enc, ids, mask, "query"), want)


@pytest.mark.parametrize("name", ["opt_pre", "llama3", "qwen2"])
def test_decoder_only_causal(name):
  ref = _ref(name)
  enc, tok = _build(name, head="mlm")
  assert enc.skip_ids == (BOS[name],)
  for side in ("right", "left"):
    ids, mask = ref[f"ids_{side}"], ref[f"mask_{side}"]
    pool = mask * (ids != BOS[name])
    _close(_rep(enc, ids, mask), _np_pool(ref[f"logits_{side}"], pool, special=tok.special_ids))
  # BOS positions are never pooled
  ids, mask = ref["ids_left"].copy(), ref["mask_left"]
  first = mask.argmax(1)
  ids[np.arange(len(ids)), first] = BOS[name]
  _, pool, pids = _read(enc.query_backbone, ids, mask, skip_ids=enc.skip_ids)
  want_pool = mask.copy()
  want_pool[np.arange(len(ids)), first] = 0
  np.testing.assert_array_equal(np.asarray(pool), want_pool)
  np.testing.assert_array_equal(np.asarray(pids), ids)
  h = np.asarray(_states(enc.query_backbone, ids, mask))
  _close(_rep(enc, ids, mask), _np_pool(_np_logits(enc.query_backbone.lm_head, h), want_pool, special=tok.special_ids))


@pytest.mark.parametrize("name,family", [("opt_pre", opt), ("llama3", llama)])
def test_decoder_only_bidirectional(name, family):
  ref = _ref(name)
  ids, mask = ref["ids_right"], ref["mask_right"]
  enc, tok = _build(name, head="mlm", bidirectional=True)
  assert enc.query_backbone.config.bidirectional
  # reference states: the backbone built with the config flag, not switched after loading
  ld = hf_weights.load(FIXTURES / name, lm_head=True)
  cfg = dataclasses.replace(ld.config, bidirectional=True)
  other = nnx.eval_shape(lambda: family.build(cfg, rngs=nnx.Rngs(0)))
  hf_weights.load_tensors(other, str(FIXTURES / name), family.FAMILY.checkpoint_names(cfg))
  h = np.asarray(_states(other, ids, mask))
  assert np.abs(h - np.asarray(_states(ld.model, ids, mask))).max() > 1e-3  # not the causal states
  want = _np_pool(_np_logits(ld.model.lm_head, h), mask * (ids != BOS[name]), special=tok.special_ids)
  _close(_rep(enc, ids, mask), want)


def _np_echo(ids, mask, pad):
  b, l = ids.shape
  eids, emask, pool = np.full((b, 2 * l), pad), np.zeros((b, 2 * l), np.int32), np.zeros((b, 2 * l))
  for i in range(b):
    real = ids[i][mask[i] > 0]
    n = len(real)
    eids[i, : 2 * n] = np.concatenate([real, real])
    emask[i, : 2 * n] = 1
    pool[i, n : 2 * n] = 1
  return eids, emask, pool


@pytest.mark.parametrize("name", ["opt_pre", "llama3"])
def test_decoder_only_echo(name):
  ref = _ref(name)
  enc, tok = _build(name, head="mlm", decoding="echo")
  model = enc.query_backbone
  for side in ("left", "right"):
    ids, mask = ref[f"ids_{side}"].copy(), ref[f"mask_{side}"]
    ids[np.arange(len(ids)), mask.argmax(1)] = BOS[name]  # each row starts with BOS
    eids, emask, pool = _np_echo(ids, mask, model.pad_id)
    pool = pool * (eids != BOS[name])
    h, got_pool, got_ids = _read(model, ids, mask, mode="echo", skip_ids=enc.skip_ids)
    np.testing.assert_array_equal(np.asarray(got_ids), eids)
    np.testing.assert_array_equal(np.asarray(got_pool), pool)
    h = np.asarray(_states(model, eids, emask))
    want = _np_pool(_np_logits(model.lm_head, h), pool, special=tok.special_ids)
    _close(_rep(enc, ids, mask), want)


@pytest.mark.parametrize("name", ["opt_pre", "qwen2"])
def test_decoder_only_last_token(name):
  ref = _ref(name)
  enc, tok = _build(name, head="mlm", decoding="last_token")
  for side in ("right", "left"):
    ids, mask = ref[f"ids_{side}"], ref[f"mask_{side}"]
    last = np.array([max(np.flatnonzero(m)) for m in mask])
    logits = ref[f"logits_{side}"][np.arange(len(ids)), last][:, None]  # transformers' logits
    pool = (ids[np.arange(len(ids)), last] != BOS[name])[:, None]
    _close(_rep(enc, ids, mask), _np_pool(logits, pool, special=tok.special_ids))


@pytest.mark.parametrize("towers", ["shared", "separate"])
@pytest.mark.parametrize("query_head", ["mlm", "mlp"])
def test_mixed_heads(towers, query_head, tmp_path):
  name, ref = "opt_pre", _ref("opt_pre")
  ids, mask = ref["ids_right"], ref["mask_right"]
  doc_head = "mlp" if query_head == "mlm" else "mlm"
  kw = {"mlp": {"pooling": "sum"}, "mlm": {}}
  enc, tok = _build(
    name,
    head=query_head,
    head_kwargs=kw[query_head],
    doc_head=doc_head,
    doc_head_kwargs={"pooling": "max"},
    towers=towers,
  )
  vocab_side = "query" if query_head == "mlm" else "doc"
  params = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
  mlp_node = "doc_head" if vocab_side == "query" else "query_head"
  assert set(params) == (
    {"query_backbone", mlp_node} if towers == "shared" else {"query_backbone", "doc_backbone", mlp_node}
  )
  lm_owner = "query_backbone" if towers == "shared" else f"{vocab_side}_backbone"
  # OPT ties the LM head to embed_tokens: it holds no parameter of its own, and the vocabulary
  # head none at all; its projection is the backbone's own
  assert "lm_head" not in params[lm_owner] and enc.head(vocab_side).projection is None
  assert enc.backbone(vocab_side).lm_head.tied is enc.backbone(vocab_side).embed_tokens
  pool = mask * (ids != BOS[name])
  want = {vocab_side: _np_pool(ref["logits_right"], pool, special=tok.special_ids)}
  mlp_side = "doc" if vocab_side == "query" else "query"
  want[mlp_side] = _np_mlp(
    ref["hidden_right"], pool, ids, enc.head(mlp_side), tok.vocab_size, "max" if mlp_side == "doc" else "sum"
  )
  got = {side: np.asarray(_rep(enc, ids, mask, side)) for side in ("query", "doc")}
  for side in ("query", "doc"):
    _close(got[side], want[side])
  assert (got[mlp_side] > 0).sum() <= (pool > 0).sum()  # term weighting: no expansion
  if towers == "shared" and query_head == "mlp":  # the layout refused before: saved and reloaded
    enc2, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, tmp_path / "enc"))
    for side in ("query", "doc"):
      np.testing.assert_array_equal(np.asarray(_rep(enc2, ids, mask, side)), got[side])


@pytest.mark.parametrize("name", ["llama3", "opt_pre"])
@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_tiled_vocab_head_equals_untiled_on_a_decoder(name, pooling):
  ref = _ref(name)
  ids, mask = jnp.asarray(ref["ids_left"]), jnp.asarray(ref["mask_left"])
  model = hf_weights.load(FIXTURES / name, lm_head=True).model
  V = model.vocab_size
  h = _states(model, ids, mask)
  coef = jnp.asarray(np.random.default_rng(0).normal(size=(ids.shape[0], V)), jnp.float32)
  head = heads.VocabHead(vocab=V, pooling=pooling, tile=48)  # 3 tiles, padded

  def tiled(m, h):
    return (head(h, mask, ids, projection=m.lm_head) * coef).sum()

  def untiled(m, h):  # plain jnp over B x L x V
    logits = jnp.einsum(
      "btd,dv->btv", m.lm_head.transform(h), m.lm_head.kernel_dv(), precision=jax.lax.Precision.HIGHEST
    )
    act = jnp.where(mask[..., None] > 0, jnp.log1p(jax.nn.relu(logits)), 0.0)
    return ((act.max(1) if pooling == "max" else act.sum(1)) * coef).sum()

  (v1, (gm1, gh1)) = nnx.value_and_grad(tiled, argnums=(0, 1))(model, h)
  (v2, (gm2, gh2)) = nnx.value_and_grad(untiled, argnums=(0, 1))(model, h)
  np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(gh1, gh2, rtol=1e-4, atol=1e-5)
  w = "lm_head" if name == "llama3" else "embed_tokens"  # untied kernel / tied embeddings
  g1, g2 = (nnx.to_pure_dict(g)[w] for g in (gm1, gm2))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert np.abs(np.asarray(b)).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bert_path(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)


def test_modes_a_family_cannot_do(tiny_bert_path):
  def build(backbone, **kw):
    return sparse_encoder.build_encoder(EncoderConfig(backbone=str(backbone), head="mlm", **kw), weights=False)

  with pytest.raises(ValueError, match=r"multi_token.*'opt'"):
    build(FIXTURES / "opt_pre", decoding="multi_token")
  with pytest.raises(ValueError, match=r"decoder_stack.*'llama'"):
    build(FIXTURES / "llama3", decoding="decoder_stack")
  with pytest.raises(ValueError, match=r"echo.*'bert'"):
    build(tiny_bert_path, decoding="echo")
  with pytest.raises(ValueError, match=r"last_token.*'t5'"):
    build(FIXTURES / "t5_flan", decoding="last_token")
  with pytest.raises(ValueError, match=r"bidirectional.*'t5'"):
    build(FIXTURES / "t5_flan", bidirectional=True)
  with pytest.raises(ValueError, match=r"bidirectional.*'bert'"):
    build(tiny_bert_path, bidirectional=True)
  with pytest.raises(ValueError, match="one of"):
    build(FIXTURES / "t5_flan", decoding="multi-token")
  with pytest.raises(ValueError, match="drop_frist"):
    build(FIXTURES / "t5_flan", decoding="multi_token", decoding_kwargs={"drop_frist": False})
  enc, tok = build(tiny_bert_path)  # plain on BERT: the family's rule skips special positions
  assert enc.skip_ids == tuple(sorted(int(i) for i in tok.special_ids)) and enc.config.decoding == "plain"
  enc, _ = build(tiny_bert_path, special_tokens="dims")  # ours before: no skip ids, special dims zeroed
  assert enc.skip_ids == () and enc.query_head.special_ids == tuple(int(i) for i in tok.special_ids)
  with pytest.raises(ValueError, match="token_ids"):
    build(FIXTURES / "t5_flan", decoding="multi_token", decoding_kwargs={"token_ids": "next"})


def test_fingerprints_and_defaults():
  assert EncoderConfig().fingerprint() == "c2c1d601c3101175"  # configs written before these fields
  for kw in ({"decoding": "multi_token"}, {"decoding_kwargs": {"mask_eos": True}}, {"bidirectional": True}):
    assert EncoderConfig(**kw).fingerprint() != EncoderConfig().fingerprint()
