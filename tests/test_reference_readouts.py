"""The reference's read-out rules (JingfenQiao/Decoder4LSR, lsr/models/*.py) rebuilt in numpy.

Each test redoes one reference forward in numpy from given hidden states:
decoder inputs shift_right(x) = [0, x_0 .. x_{L-2}] (T5's `_shift_right`, start
= pad = 0), the reference's masks (its `_shift_right(attention_mask)` puts 0
first), log1p(relu) and max pooling for vocabulary heads, relu(Linear(h)) placed
at the reference's indices for MLP heads (query side sum, document side max
over repeated ids), T5's special tokens kept. Hidden states are transformers'
own where the fixture has them (the teacher-forced decoder), else the JAX
backbone's (the decoder stack over shifted inputs; its parity with transformers
is tested in test_t5.py).
"""

import json
import pathlib
import sys

import numpy as np
import pytest
from flax import nnx

from laspar_jax.models import sparse_encoder

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402
from laspar_jax.models.sparse_encoder import EncoderConfig  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
NAMES = ["t5_flan", "t5_v10"]
ATOL = 1e-5
MLP_Q = {"pooling": "sum", "bias_init": 0.2}
MLP_D = {"pooling": "max", "bias_init": 0.2}


def _build(name, **kw):
  return sparse_encoder.build_encoder(EncoderConfig(backbone=str(FIXTURES / name), **kw))


def _shift(x, first=0):
  return np.concatenate([np.full_like(x[:, :1], first), x[:, :-1]], 1)


def _np_vocab(h_btd, proj, pool_bt):
  """mlm_de_multi_t5 / mlm_en_de_multi: log1p(relu(lm_head(h) * mask)), max over positions."""
  logits = (np.asarray(h_btd, np.float64) * proj.scale) @ np.asarray(proj.kernel_dv(), np.float64)
  return np.log1p(np.maximum(logits * pool_bt[..., None], 0)).max(1)


def _np_mlp(h_btd, linear, weight_mask_bt, indices_bt, vocab, pooling):
  """relu(linear(h)) * mask at `indices` (the reference's SparseRep), densified by sum or max."""
  k = np.asarray(linear.kernel[...], np.float64)[:, 0]
  c = float(np.asarray(linear.bias[...])[0])
  w = np.maximum(np.asarray(h_btd, np.float64) @ k + c, 0) * weight_mask_bt
  rep = np.zeros((len(w), vocab))
  for b in range(len(w)):
    for t in range(w.shape[1]):
      i = indices_bt[b, t]
      rep[b, i] = rep[b, i] + w[b, t] if pooling == "sum" else max(rep[b, i], w[b, t])
  return rep


def _close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_decoder_stack_vocab(name):
  ref = np.load(FIXTURES / name / "reference.npz")
  ids, mask = ref["ids_right"], ref["mask_right"]
  enc, _ = _build(name, head="mlm", decoding="decoder_stack")
  model = enc.query_backbone
  h = np.asarray(model.decode(_shift(ids), mask))  # the decoder alone on shift_right(x), unshifted mask
  want = _np_vocab(h, model.lm_head, _shift(mask))
  _close(enc(ids, mask, kind="query"), want)
  assert (want[:, :3] > 0).any()  # T5 keeps special dims (pad 0, </s> 1, unk 2)


@pytest.mark.parametrize("name", NAMES)
def test_mlp_multi_token(name):
  ref = np.load(FIXTURES / name / "reference.npz")
  ids, mask = ref["ids_right"], ref["mask_right"]
  enc, tok = _build(name, head="mlp", head_kwargs=MLP_Q, doc_head="mlp", doc_head_kwargs=MLP_D, decoding="multi_token")
  # transformers' teacher-forced decoder states; step t's weight goes to input_ids[t] under the shifted mask
  for kind, pooling in (("query", "sum"), ("doc", "max")):
    want = _np_mlp(ref["dec_right"], enc.query_head.linear, _shift(mask), ids, tok.vocab_size, pooling)
    _close(enc(ids, mask, kind=kind), want)
  # ours before: the weight at the decoder input x[t-1]
  old, _ = _build(
    name, head="mlp", head_kwargs=MLP_Q, decoding="multi_token", decoding_kwargs={"token_ids": "decoder_input"}
  )
  want = _np_mlp(ref["dec_right"], old.query_head.linear, _shift(mask), _shift(ids), tok.vocab_size, "sum")
  _close(old(ids, mask, kind="query"), want)


@pytest.mark.parametrize("name", NAMES)
def test_mlp_decoder_stack(name):
  ref = np.load(FIXTURES / name / "reference.npz")
  ids, mask = ref["ids_right"], ref["mask_right"]
  enc, tok = _build(
    name, head="mlp", head_kwargs=MLP_Q, doc_head="mlp", doc_head_kwargs=MLP_D, decoding="decoder_stack"
  )
  h = np.asarray(enc.query_backbone.decode(_shift(ids), mask))
  for kind, pooling in (("query", "sum"), ("doc", "max")):
    # mlp_de_multi_t5: weights under the unshifted mask, at the (shifted) decoder input ids
    want = _np_mlp(h, enc.query_head.linear, mask, _shift(ids), tok.vocab_size, pooling)
    _close(enc(ids, mask, kind=kind), want)
  # shift=False (ours before): the decoder stack over x itself, transformers' states
  old, _ = _build(name, head="mlp", head_kwargs=MLP_Q, decoding="decoder_stack", decoding_kwargs={"shift": False})
  _close(
    old(ids, mask, kind="query"),
    _np_mlp(ref["dec_alone_right"], old.query_head.linear, mask, ids, tok.vocab_size, "sum"),
  )


def test_shared_backbone_mlp_is_one_linear(tmp_path):
  ref = np.load(FIXTURES / "t5_flan" / "reference.npz")
  ids, mask = ref["ids_right"], ref["mask_right"]
  kw = dict(head="mlp", head_kwargs=MLP_Q, doc_head="mlp", doc_head_kwargs=MLP_D, decoding="multi_token")
  enc, tok = _build("t5_flan", **kw)
  assert enc.doc_head.linear is enc.query_head.linear
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(enc, nnx.Param))}
  assert {p for p in paths if "_head." in p} == {"doc_head.linear.kernel", "doc_head.linear.bias"}  # saved once
  q, d = np.asarray(enc(ids, mask, kind="query")), np.asarray(enc(ids, mask, kind="doc"))
  assert (q >= d - 1e-6).all() and ((q > 0) == (d > 0)).all()  # one weight per token: sum vs max only
  # saved and loaded: still one Linear
  enc2, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, tmp_path / "enc"))
  assert enc2.doc_head.linear is enc2.query_head.linear
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask, kind="doc")), d)
  # separate_linear (ours before): a Linear of its own; a folder saved before the field loads as it was
  old_kw = dict(special_tokens="dims", decoding_kwargs={"token_ids": "decoder_input"})  # as encoders were then
  sep, _ = _build("t5_flan", **dict(kw, doc_head_kwargs={**MLP_D, "separate_linear": True}, **old_kw))
  assert sep.doc_head.linear is not sep.query_head.linear
  folder = sparse_encoder.save_encoder(sep, tok, tmp_path / "old")
  cfg = json.loads((pathlib.Path(folder) / "encoder_config.json").read_text())
  cfg["doc_head_kwargs"].pop("separate_linear")
  cfg.pop("special_tokens")
  cfg["decoding_kwargs"] = {}
  (pathlib.Path(folder) / "encoder_config.json").write_text(json.dumps(cfg))
  old, _ = sparse_encoder.load_encoder(folder)
  assert old.doc_head.linear is not old.query_head.linear and old.config.special_tokens == "dims"
  np.testing.assert_array_equal(np.asarray(old(ids, mask, kind="doc")), np.asarray(sep(ids, mask, kind="doc")))


@pytest.fixture(scope="module")
def tiny_bert_path(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)


def test_special_tokens_rule_per_family(tiny_bert_path):
  enc, tok = sparse_encoder.build_encoder(EncoderConfig(backbone=str(tiny_bert_path), head="mlm"))
  rows = tok(["a cat sat on the mat", "dogs"], max_length=12)
  ids, mask = np.asarray(rows["input_ids"]), np.asarray(rows["attention_mask"])
  special = np.isin(ids, tok.special_ids)
  assert (special & (mask > 0)).any()  # [CLS] / [SEP] in every row
  proj = enc.query_backbone.lm_head
  h = np.asarray(enc.query_backbone(ids, mask), np.float64)
  # BERT (lsr's mlm encoder): logits * attention_mask * (1 - special_tokens_mask), log1p(relu), max
  t = np.asarray(proj.transform(h.astype(np.float32)), np.float64)
  logits = t @ np.asarray(proj.kernel_dv(), np.float64) + np.asarray(proj.bias_v(), np.float64)
  want = np.log1p(np.maximum(logits * (mask * ~special)[..., None], 0)).max(1)
  _close(enc(ids, mask), want)
  dims, _ = sparse_encoder.build_encoder(
    EncoderConfig(backbone=str(tiny_bert_path), head="mlm", special_tokens="dims")
  )  # ours before: every position pooled, the special dims zeroed
  want_dims = np.log1p(np.maximum(np.where(mask[..., None] > 0, logits, 0), 0)).max(1)
  want_dims[:, list(tok.special_ids)] = 0
  _close(dims(ids, mask), want_dims)
