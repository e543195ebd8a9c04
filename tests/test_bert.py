"""BERT backbone: parity with sentence-transformers/PyTorch, sharding, loader errors."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from laspar_jax import mesh as mesh_lib
from laspar_jax.models import bert, hf_weights
from laspar_jax.models.heads import pooling

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def loaded(minilm_path):
  return hf_weights.load(minilm_path, max_length=256)


@pytest.fixture(scope="module")
def ref():
  return np.load(FIXTURE)


@nnx.jit
def _embed(model, ids, mask):
  h = model(ids, mask)
  return h, pooling.l2_normalize(pooling.mean_pool(h, mask))


def test_hub_id_resolves_offline_to_package(minilm_path):
  assert pathlib.Path(hf_weights.resolve("sentence-transformers/all-MiniLM-L6-v2")) == minilm_path


def test_tokenizer_matches_reference_ids(loaded, ref):
  texts = [str(t) for t in ref["texts"]]
  batch = loaded.tokenizer(texts)
  offs = np.concatenate([[0], np.cumsum(ref["ids_lens"])])
  for i in range(len(texts)):
    n = int(ref["ids_lens"][i])
    np.testing.assert_array_equal(batch["input_ids"][i, :n], ref["ids"][offs[i] : offs[i + 1]])
    assert batch["attention_mask"][i].sum() == n
  assert batch["input_ids"].shape[1] in loaded.tokenizer.buckets


def test_embeddings_match_sentence_transformers(loaded, ref):
  texts = [str(t) for t in ref["texts"]]
  assert len(texts) >= 32
  b = loaded.tokenizer(texts)
  h, e = _embed(loaded.model, b["input_ids"], b["attention_mask"])
  np.testing.assert_allclose(np.asarray(e), ref["embeddings"], atol=1e-4, rtol=0)
  offs = np.concatenate([[0], np.cumsum(ref["token_lens"])])
  for j, i in enumerate(ref["token_pick"]):
    n = int(ref["token_lens"][j])
    np.testing.assert_allclose(np.asarray(h[i, :n]), ref["token_states"][offs[j] : offs[j + 1]], atol=1e-3, rtol=0)


def test_padding_bucket_does_not_change_output(loaded):
  b = loaded.tokenizer(["a short query about cells"])
  _, e_short = _embed(loaded.model, b["input_ids"], b["attention_mask"])
  pad = lambda x: np.pad(x, ((0, 0), (0, 64 - x.shape[1])))
  _, e_long = _embed(loaded.model, pad(b["input_ids"]), pad(b["attention_mask"]))
  np.testing.assert_allclose(np.asarray(e_short), np.asarray(e_long), atol=1e-5)


def test_sharded_equals_unsharded(minilm_path, ref):
  texts = [str(t) for t in ref["texts"][:16]]
  loaded = hf_weights.load(minilm_path)
  b = loaded.tokenizer(texts)
  h0, _ = _embed(loaded.model, b["input_ids"], b["attention_mask"])
  mesh = mesh_lib.make_mesh(data=2, model=4)
  mesh_lib.shard_model(loaded.model, mesh)
  kernel = loaded.model.layers[0].mlp_in.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert len(kernel.addressable_shards) == 8
  put = lambda x: jax.device_put(x, mesh_lib.batch_sharding(mesh))
  h1, _ = _embed(loaded.model, put(b["input_ids"]), put(b["attention_mask"]))
  assert h1.sharding.spec[0] == "data"
  np.testing.assert_allclose(np.asarray(h0), np.asarray(h1), atol=1e-4)


def test_bf16_compute_close(minilm_path, ref):
  loaded = hf_weights.load(minilm_path, dtype=jnp.bfloat16)
  texts = [str(t) for t in ref["texts"][:8]]
  b = loaded.tokenizer(texts)
  _, e = _embed(loaded.model, b["input_ids"], b["attention_mask"])
  assert loaded.model.layers[0].query.kernel.get_value().dtype == jnp.float32  # fp32 master params
  cos = (np.asarray(e, np.float32) * ref["embeddings"][:8]).sum(-1)
  assert cos.min() > 0.99


def test_dropout_active_only_in_training(loaded):
  b = loaded.tokenizer(["dropout check"])
  h_eval = loaded.model(b["input_ids"], b["attention_mask"])
  h_train = loaded.model(b["input_ids"], b["attention_mask"], deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert float(jnp.abs(h_eval - h_train).max()) > 1e-3
  with pytest.raises(ValueError, match="rngs"):
    loaded.model(b["input_ids"], b["attention_mask"], deterministic=False)


def _copy_model(minilm_path, tmp_path):
  dst = tmp_path / "model"
  shutil.copytree(minilm_path, dst)
  return dst


def test_missing_tensor_names_it(minilm_path, tmp_path):
  from safetensors.numpy import load_file, save_file

  dst = _copy_model(minilm_path, tmp_path)
  tensors = load_file(dst / "model.safetensors")
  del tensors["encoder.layer.3.output.dense.weight"]
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(hf_weights.CheckpointError, match=r"encoder\.layer\.3\.output\.dense\.weight"):
    hf_weights.load(dst)


def test_unexpected_and_misshaped_tensor(minilm_path, tmp_path):
  from safetensors.numpy import load_file, save_file

  dst = _copy_model(minilm_path, tmp_path)
  tensors = load_file(dst / "model.safetensors")
  tensors["encoder.layer.0.extra.weight"] = np.zeros((2, 2), np.float32)
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(hf_weights.CheckpointError, match=r"unexpected tensor 'encoder\.layer\.0\.extra"):
    hf_weights.load(dst)
  del tensors["encoder.layer.0.extra.weight"]
  tensors["encoder.layer.1.intermediate.dense.bias"] = np.zeros((7,), np.float32)
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(hf_weights.CheckpointError, match=r"intermediate\.dense\.bias.*shape"):
    hf_weights.load(dst)


def test_corrupt_file_names_it(minilm_path, tmp_path):
  dst = _copy_model(minilm_path, tmp_path)
  data = (dst / "model.safetensors").read_bytes()
  (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(hf_weights.CheckpointError, match="model.safetensors"):
    hf_weights.load(dst)


def test_mlm_head_loaded_when_present(minilm_path, tmp_path):
  from safetensors.numpy import load_file, save_file

  dst = _copy_model(minilm_path, tmp_path)
  tensors = {"bert." + k: v for k, v in load_file(dst / "model.safetensors").items()}
  tensors["cls.predictions.bias"] = np.arange(30522, dtype=np.float32)
  tensors["cls.predictions.transform.dense.weight"] = np.eye(384, dtype=np.float32)
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(hf_weights.CheckpointError, match=r"missing tensors.*transform\.LayerNorm"):
    hf_weights.load(dst, lm_head=True)  # a partial MLM head is an error
  tensors["cls.predictions.transform.dense.bias"] = np.full((384,), 0.5, np.float32)
  tensors["cls.predictions.transform.LayerNorm.gamma"] = np.full((384,), 2.0, np.float32)
  tensors["cls.predictions.transform.LayerNorm.beta"] = np.full((384,), 3.0, np.float32)
  tensors["cls.predictions.decoder.weight"] = np.zeros((30522, 384), np.float32)  # tied: ignored
  save_file(tensors, dst / "model.safetensors")
  loaded = hf_weights.load(dst, lm_head=True)
  head = loaded.model.vocab_projection()
  assert float(head.bias_v()[5]) == 5.0
  np.testing.assert_array_equal(np.asarray(head.dense.kernel[...]), np.eye(384))
  assert float(head.dense.bias[0]) == 0.5
  assert float(head.layer_norm.scale[0]) == 2.0 and float(head.layer_norm.bias[0]) == 3.0
  assert head.tied is loaded.model.embeddings.word_embeddings
  np.testing.assert_array_equal(
    np.asarray(head.kernel_dv()), np.asarray(loaded.model.embeddings.word_embeddings.embedding[...]).T
  )
  assert hf_weights.load(dst).model.lm_head is None  # not requested: cls.predictions.* ignored


def test_distilbert_names_map(tmp_path):
  """A random DistilBERT checkpoint in HF names loads and runs."""
  from safetensors.numpy import save_file

  cfg = dict(
    model_type="distilbert",
    vocab_size=50,
    dim=32,
    n_layers=2,
    n_heads=4,
    hidden_dim=64,
    max_position_embeddings=40,
    activation="gelu",
  )
  rng = np.random.default_rng(0)
  t = {
    "distilbert.embeddings.word_embeddings.weight": (50, 32),
    "distilbert.embeddings.position_embeddings.weight": (40, 32),
    "distilbert.embeddings.LayerNorm.weight": (32,),
    "distilbert.embeddings.LayerNorm.bias": (32,),
  }
  for i in range(2):
    for n, s in [
      ("attention.q_lin", (32, 32)),
      ("attention.k_lin", (32, 32)),
      ("attention.v_lin", (32, 32)),
      ("attention.out_lin", (32, 32)),
      ("ffn.lin1", (64, 32)),
      ("ffn.lin2", (32, 64)),
    ]:
      t[f"distilbert.transformer.layer.{i}.{n}.weight"] = s
      t[f"distilbert.transformer.layer.{i}.{n}.bias"] = (s[0],)
    for n in ("sa_layer_norm", "output_layer_norm"):
      t[f"distilbert.transformer.layer.{i}.{n}.weight"] = (32,)
      t[f"distilbert.transformer.layer.{i}.{n}.bias"] = (32,)
  save_file({k: rng.normal(size=s).astype(np.float32) for k, s in t.items()}, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "vocab.txt").write_text(
    "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)])
  )
  loaded = hf_weights.load(tmp_path)
  assert loaded.config.type_vocab_size == 0 and loaded.config.num_hidden_layers == 2
  b = loaded.tokenizer(["w1 w2 w3"])
  h = loaded.model(b["input_ids"], b["attention_mask"])
  assert h.shape == (1, b["input_ids"].shape[1], 32) and bool(jnp.isfinite(h).all())


def test_gelu_erf_equals_exact_gelu():
  gelu_erf = bert.gelu_erf
  x = jnp.linspace(-12.0, 12.0, 20001)
  np.testing.assert_allclose(
    np.asarray(gelu_erf(x)), np.asarray(jax.nn.gelu(x, approximate=False)), atol=2e-6, rtol=1e-6
  )
  g = jax.vmap(jax.grad(gelu_erf))(x)
  g_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=2e-6)


def test_remat_with_dropout_equals_plain(minilm_path, tmp_path):
  """remat=True trains with dropout (rngs pass into the remat trace) and gives the plain model's gradients."""
  from tiny_bert import write_tiny_bert  # pylint: disable=g-import-not-at-top

  path = write_tiny_bert(tmp_path / "tiny", minilm_path)
  ids = jnp.asarray(np.arange(2 * 12).reshape(2, 12) % 500 + 100, jnp.int32)
  mask = jnp.ones((2, 12), jnp.int32).at[1, 8:].set(0)
  grads = []
  for remat in (False, True):
    model = hf_weights.load(path, remat=remat).model
    loss = lambda m: m(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=3)).astype(jnp.float32).sum()
    grads.append(nnx.to_flat_state(nnx.jit(nnx.grad(loss))(model)))
  for (p0, g0), (p1, g1) in zip(*grads):
    assert p0 == p1
    np.testing.assert_allclose(np.asarray(g1.get_value()), np.asarray(g0.get_value()), rtol=1e-5, atol=1e-6)
