"""encode.py: sparse encoding (with a D-sharded two-stage top-k) and the encoder -> index glue."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax import distributed_index, encode, mesh as mesh_lib, prefetch  # noqa: E402
from laspar_jax.data.sources import Doc, doc_text  # noqa: E402
from laspar_jax.index import Index  # noqa: E402
from laspar_jax.models import sparse_encoder  # noqa: E402
from laspar_jax.models.sparse_encoder import EncoderConfig  # noqa: E402

TEXTS = [
  "cells and proteins",
  "a much longer text about the river bank and its many fish",
  "zinc",
  "the effect of vitamin d on bone density in older adults",
  "",
  "b cells",
]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, minilm_path):
  path = tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)
  cfg = EncoderConfig(backbone=str(path), head="latent_attention", latent_dim=1024, query_max_len=16, doc_max_len=24)
  return sparse_encoder.build_encoder(cfg)


def _encode(enc, tok, **kw):
  out = list(encode.encode_sparse(enc, tok, TEXTS, kind="doc", k=32, batch_size=4, **kw))
  return np.concatenate([i for i, _ in out]), np.concatenate([v for _, v in out])


def test_sharded_topk_path_equals_global(encoder):
  enc, tok = encoder
  ref_idx, ref_val = _encode(enc, tok)
  mesh = mesh_lib.make_mesh(data=2, model=4)
  assert encode._model_shards(mesh, enc.output_dim) == 4  # pylint: disable=protected-access
  idx, val = _encode(enc, tok, mesh=mesh)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6, atol=1e-7)
  assert encode._model_shards(mesh_lib.make_mesh(data=8, model=1), 1024) == 1  # pylint: disable=protected-access
  assert encode._model_shards(mesh, 1022) == 1  # pylint: disable=protected-access


def test_index_collection_holds_the_encoded_postings(encoder, tmp_path):
  enc, tok = encoder
  docs = [Doc(f"d{i}", "", t) for i, t in enumerate(TEXTS)]
  path = distributed_index.index_collection(enc, tok, docs, tmp_path / "ix", k_doc=32, batch_size=4, progress=False)
  ix = Index.load(path)
  assert ix.doc_ids.tolist() == [d.doc_id for d in docs] and ix.dim == enc.output_dim
  assert ix.manifest["encoder_hash"] == encode.encoder_fingerprint(enc)
  assert ix.manifest["metadata"]["k_doc"] == 32 and ix.manifest["metadata"]["encode_docs_per_second"] > 0
  idx, val = _encode(enc, tok)
  assert [doc_text(d) for d in docs] == TEXTS  # untitled docs: the text is the input
  dense = np.zeros((len(docs), ix.dim), np.float32)
  np.put_along_axis(dense, idx, val, axis=1)
  q_idx = idx[:2, :4]
  q_val = np.ones_like(q_idx, np.float32)
  np.testing.assert_allclose(ix.brute_force(q_idx, q_val), dense[:, q_idx].sum(-1).T, rtol=1e-5)
  with pytest.raises(FileExistsError):
    distributed_index.index_collection(enc, tok, docs, tmp_path / "ix", progress=False)


def test_encoder_dim():
  class _E:
    output_dim = 77

  assert encode.encoder_dim(_E()) == 77
  with pytest.raises(ValueError, match="pass dim="):
    encode.encoder_dim(object())


def test_one_ahead_takes_the_next_batch_before_giving_this_one():
  taken = []

  def items():
    for i in range(3):
      taken.append(i)
      yield i

  seen = [(x, list(taken)) for x in prefetch.one_ahead(items())]
  assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]
  assert list(prefetch.one_ahead(iter([]))) == []


def test_batches_in_flight_give_the_rows_of_one_batch_at_a_time(encoder):
  """Several batches per window (dispatched one ahead) give the same rows as one text per batch, in input order."""
  enc, tok = encoder
  idx, val = _encode(enc, tok)  # batch_size 4: two batches in the window, the second padded
  for i, text in enumerate(TEXTS):
    ((one_idx, one_val),) = encode.encode_sparse(enc, tok, [text], kind="doc", k=32, batch_size=4)
    np.testing.assert_array_equal(one_idx[0], idx[i])
    np.testing.assert_allclose(one_val[0], val[i], rtol=1e-5, atol=1e-6)


def test_bf16_kernels_cast_once_for_inference(tmp_path, minilm_path):
  """A bf16 encoder's kernels are cast once for all calls: same representations, fp32 encoders untouched."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  path = tiny_bert.write_tiny_bert(tmp_path / "bert", minilm_path)
  cfg = EncoderConfig(backbone=str(path), head="mlm", dtype="bfloat16", query_max_len=16, doc_max_len=24)
  enc, tok = sparse_encoder.build_encoder(cfg)
  graphdef, state = encode.inference_state(enc)
  dtypes = {"/".join(map(str, p)): v.get_value().dtype for p, v in nnx.to_flat_state(state)}
  cast = sorted(k for k, d in dtypes.items() if d == jnp.bfloat16)
  assert len(cast) == 12 and all(k.endswith("/kernel") for k in cast)  # 6 Dense per layer, 2 layers
  assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(enc, nnx.Param)))
  batch = tok(TEXTS, max_length=24)
  ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
  run = jax.jit(lambda s: nnx.merge(graphdef, s)(ids, mask, kind="doc"))
  np.testing.assert_array_equal(np.asarray(run(state)), np.asarray(run(nnx.split(enc)[1])))
  fp32, _ = sparse_encoder.build_encoder(EncoderConfig(**{**cfg.to_dict(), "dtype": "float32"}))
  assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(encode.inference_state(fp32)[1]))
