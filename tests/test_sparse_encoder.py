"""Sparse encoder: save/load roundtrip, shared vs separate towers, abstract build, errors."""
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax.models import hf_weights, sparse_encoder  # noqa: E402
from laspar_jax.models.sparse_encoder import EncoderConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)


def _inputs(tok):
  b = tok(["a query about cells", "another much longer query about proteins"], max_length=16)
  return b["input_ids"], b["attention_mask"]


@pytest.mark.parametrize("towers,head", [("separate", "latent_attention"), ("shared", "mlm")])
def test_save_load_roundtrip(tiny_path, tmp_path, towers, head):
  cfg = EncoderConfig(backbone=str(tiny_path), head=head, latent_dim=256, towers=towers,
                      head_kwargs={"kernel_std": 1.0} if head != "mlm" else {},
                      query_prefix="query: ", doc_prefix="document: ", query_max_len=16, doc_max_len=32)
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
    assert enc2.doc_tower is not None
    assert not np.allclose(want_q, want_d)  # the towers' heads start from different seeds
  else:
    assert enc2.doc_tower is None
    np.testing.assert_array_equal(want_q, want_d)


def test_separate_towers_train_separately(tiny_path):
  cfg = EncoderConfig(backbone=str(tiny_path), head="latent_sum", latent_dim=128, towers="separate")
  enc, tok = sparse_encoder.build_encoder(cfg)
  q_before = np.asarray(enc.query_tower.head.kernel[...]).copy()
  enc.doc_tower.head.kernel.set_value(enc.doc_tower.head.kernel[...] * 0)  # changing one tower ...
  np.testing.assert_array_equal(np.asarray(enc.query_tower.head.kernel[...]), q_before)  # ... leaves the other
  params = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
  assert set(params) == {"query_tower", "doc_tower"}
  assert params["query_tower"]["backbone"]["embeddings"]["word_embeddings"]["embedding"] is not \
      params["doc_tower"]["backbone"]["embeddings"]["word_embeddings"]["embedding"]


def test_abstract_build_and_load_errors(tiny_path, tmp_path):
  cfg = EncoderConfig(backbone=str(tiny_path), head="latent_attention", latent_dim=2 ** 22)
  enc, _ = sparse_encoder.build_encoder(cfg, weights=False)  # D = 4M: shapes only, nothing allocated
  kernel = enc.query_tower.head.kernel.get_value()
  assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.shape == (32, 2 ** 22)
  small = EncoderConfig(backbone=str(tiny_path), head="latent_attention", latent_dim=64)
  e, t = sparse_encoder.build_encoder(small)
  path = pathlib.Path(sparse_encoder.save_encoder(e, t, tmp_path / "enc"))
  with pytest.raises(hf_weights.CheckpointError, match="shape"):
    sparse_encoder.load_encoder(path, latent_dim=128)
  (path / sparse_encoder.PARAMS_NAME).write_bytes(b"garbage")
  with pytest.raises(hf_weights.CheckpointError, match="cannot read"):
    sparse_encoder.load_encoder(path)
