"""Backbone contract and family registry: dispatch by model_type, the vocabulary head, attention choice."""

import dataclasses
import json
import re
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax.models import backbone, bert, hf_weights, layers  # noqa: E402


@pytest.fixture(scope="module")
def tiny(minilm_path, tmp_path_factory):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny"), minilm_path)


def test_registry_serves_bert_and_distilbert():
  assert backbone.FAMILIES["bert"] is backbone.FAMILIES["distilbert"] is bert.FAMILY
  backbone.register(bert.FAMILY)  # idempotent
  with pytest.raises(ValueError, match="already served"):
    backbone.register(dataclasses.replace(bert.FAMILY, name="other"))


def test_unknown_model_type_names_config_and_known_types(tiny, tmp_path):
  for f in tiny.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="no_such_family")))
  known = ", ".join(repr(t) for t in sorted(backbone.FAMILIES))
  assert "'bert'" in known and "'llama'" in known
  with pytest.raises(hf_weights.CheckpointError, match=rf"config\.json.*'no_such_family'.*\[{re.escape(known)}\]"):
    hf_weights.load(tmp_path)


def test_contract_properties(tiny):
  model = hf_weights.load(tiny).model
  assert isinstance(model, backbone.Backbone)
  assert (model.hidden_size, model.vocab_size, model.pad_id, model.dtype) == (32, 30522, 0, jnp.float32)
  assert model.lm_head is None
  with pytest.raises(ValueError, match="lm_head=True"):
    model.vocab_projection()


def test_fresh_lm_head_draw_order(tiny):
  """A fresh head takes the dense kernel as the first draw of rngs.params(); tied: nothing else."""
  model = hf_weights.load(tiny, lm_head=True, rngs=nnx.Rngs(params=3)).model
  head = model.vocab_projection()
  assert isinstance(head, backbone.VocabProjection)
  want = layers.Dense(32, 32, rngs=nnx.Rngs(params=3)).kernel[...]
  np.testing.assert_array_equal(np.asarray(head.dense.kernel[...]), np.asarray(want))
  assert head.decoder is None and head.tied is model.embeddings.word_embeddings
  np.testing.assert_array_equal(np.asarray(head.bias_v()), np.zeros(30522))
  # untied: the decoder [d, V] is the second draw
  untied = bert.make_lm_head(
    model, dataclasses.replace(model.config, tie_word_embeddings=False), rngs=nnx.Rngs(params=3)
  )
  rngs = nnx.Rngs(params=3)
  rngs.params()
  np.testing.assert_array_equal(
    np.asarray(untied.kernel_dv()), np.asarray(layers.normal_init(rngs.params(), (32, 30522), 0.02))
  )


def test_tied_head_is_one_parameter_and_gets_gradients(tiny):
  model = hf_weights.load(tiny, lm_head=True).model
  plain = hf_weights.load(tiny).model
  n_params = lambda m: len(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  assert n_params(model) == n_params(plain) + 5  # dense kernel/bias, LayerNorm scale/bias, vocab bias
  abstract = hf_weights.load(tiny, lm_head=True, weights=False).model
  assert n_params(abstract) == n_params(model)
  assert abstract.lm_head.tied is abstract.embeddings.word_embeddings
  assert isinstance(abstract.lm_head.dense.kernel.get_value(), jax.ShapeDtypeStruct)

  ids = jnp.array([[101, 2000, 2001, 102]])

  def loss(m):
    h = m(ids, jnp.ones_like(ids))
    head = m.vocab_projection()
    return jnp.sum(jax.nn.relu(head.transform(h) @ head.kernel_dv() + head.bias_v())[:, :, 3000:3100])

  grads = nnx.grad(loss)(model)
  g_emb = np.asarray(grads["embeddings"]["word_embeddings"]["embedding"][...])
  assert np.abs(g_emb[3000:3100]).sum() > 0  # rows reached only through the tied decoder


def test_untied_checkpoint_loads_its_decoder(tiny, tmp_path):
  for f in tiny.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=False)))
  t = load_file(tmp_path / "model.safetensors")
  rng = np.random.default_rng(0)
  t.update(
    {
      "cls.predictions.transform.dense.weight": rng.normal(size=(32, 32)).astype(np.float32),
      "cls.predictions.transform.dense.bias": np.zeros(32, np.float32),
      "cls.predictions.transform.LayerNorm.weight": np.ones(32, np.float32),
      "cls.predictions.transform.LayerNorm.bias": np.zeros(32, np.float32),
      "cls.predictions.decoder.bias": np.full(30522, 2.0, np.float32),  # the alias of .bias
      "cls.predictions.decoder.weight": rng.normal(size=(30522, 32)).astype(np.float32),
    }
  )
  save_file(t, tmp_path / "model.safetensors")
  head = hf_weights.load(tmp_path, lm_head=True).model.lm_head
  assert head.tied is None
  np.testing.assert_array_equal(np.asarray(head.kernel_dv()), t["cls.predictions.decoder.weight"].T)
  np.testing.assert_array_equal(np.asarray(head.dense.kernel[...]), t["cls.predictions.transform.dense.weight"].T)
  assert float(head.bias_v()[7]) == 2.0
  t["cls.predictions.bias"] = np.full(30522, 5.0, np.float32)  # preferred over decoder.bias
  save_file(t, tmp_path / "model.safetensors")
  assert float(hf_weights.load(tmp_path, lm_head=True).model.lm_head.bias_v()[7]) == 5.0


def test_distilbert_vocab_head(tmp_path):
  cfg = dict(
    model_type="distilbert", vocab_size=50, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=40
  )
  rng = np.random.default_rng(0)
  shapes = {
    "distilbert.embeddings.word_embeddings.weight": (50, 32),
    "distilbert.embeddings.position_embeddings.weight": (40, 32),
    "distilbert.embeddings.LayerNorm.weight": (32,),
    "distilbert.embeddings.LayerNorm.bias": (32,),
    "vocab_transform.weight": (32, 32),
    "vocab_transform.bias": (32,),
    "vocab_layer_norm.weight": (32,),
    "vocab_layer_norm.bias": (32,),
    "vocab_projector.weight": (50, 32),
    "vocab_projector.bias": (50,),
  }
  for n, s in [
    ("attention.q_lin", (32, 32)),
    ("attention.k_lin", (32, 32)),
    ("attention.v_lin", (32, 32)),
    ("attention.out_lin", (32, 32)),
    ("ffn.lin1", (64, 32)),
    ("ffn.lin2", (32, 64)),
    ("sa_layer_norm", (32,)),
    ("output_layer_norm", (32,)),
  ]:
    shapes[f"distilbert.transformer.layer.0.{n}.weight"] = s
    shapes[f"distilbert.transformer.layer.0.{n}.bias"] = (s[0],)
  t = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  save_file(t, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "vocab.txt").write_text(
    "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)])
  )
  head = hf_weights.load(tmp_path, lm_head=True).model.vocab_projection()
  np.testing.assert_array_equal(np.asarray(head.bias_v()), t["vocab_projector.bias"])
  np.testing.assert_array_equal(np.asarray(head.dense.kernel[...]), t["vocab_transform.weight"].T)
  np.testing.assert_array_equal(np.asarray(head.layer_norm.scale[...]), t["vocab_layer_norm.weight"])
  assert head.tied is not None  # vocab_projector.weight is the word embedding table


def test_attention_impl_reaches_the_layers(tiny):
  cpu = hf_weights.load(tiny)  # "auto" on CPU
  xla = hf_weights.load(tiny, attention_impl="xla")
  assert cpu.model.layers[0].attention_impl == "cpu" and xla.model.layers[1].attention_impl == "xla"
  b = cpu.tokenizer(["a query about cells", "and a somewhat longer document about proteins"])
  h_cpu = cpu.model(b["input_ids"], b["attention_mask"])
  h_xla = xla.model(b["input_ids"], b["attention_mask"])
  np.testing.assert_allclose(np.asarray(h_cpu), np.asarray(h_xla), atol=1e-4)
  with pytest.raises(ValueError, match="attention"):
    hf_weights.load(tiny, attention_impl="flash")
