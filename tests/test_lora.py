"""LoRA: adapters leave a fresh model unchanged, merge exactly, save/load with the encoder, freeze the base."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax import optim  # noqa: E402
from laspar_jax.models import bert, layers, llama, lora, sparse_encoder  # noqa: E402
from laspar_jax.models.sparse_encoder import EncoderConfig  # noqa: E402

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": "default"}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)


def _bert():
  cfg = bert.BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
  )
  return bert.build(cfg, rngs=nnx.Rngs(0))


def _inputs():
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (2, 12)))
  return ids, jnp.asarray([[1] * 12, [1] * 7 + [0] * 5])


def _randomize_b(module, seed=3, std=0.1):
  for i, m in enumerate(lora.lora_modules(module)):
    m.lora_b.set_value(std * jax.random.normal(jax.random.key(seed + i), m.lora_b.get_value().shape))


def _optim(**over):
  c = ml_collections.ConfigDict(
    dict(
      lr=1e-3,
      warmup_steps=0,
      schedule="constant",
      end_lr=0.0,
      weight_decay=0.01,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip=1.0,
      head_lr_mult=1.0,
      freeze=(),
      lora_trainable=(),
    )
  )
  c.update(over)
  return c


def test_fresh_adapters_change_nothing_and_carry_axes():
  model = _bert()
  ids, mask = _inputs()
  want = model(ids, mask)
  n = lora.apply_lora(model, targets=lora.default_targets("bert"), rank=4, alpha=8, rngs=nnx.Rngs(1))
  assert n == 2 * 6
  np.testing.assert_array_equal(model(ids, mask), want)
  layer = model.layers[0]
  assert isinstance(layer.query, lora.LoRADense) and isinstance(layer.query.base, layers.Dense)
  assert layers.logical_axes(layer.query.lora_a) == ("embed", None)
  assert layers.logical_axes(layer.query.lora_b) == (None, "heads")
  assert layers.logical_axes(layer.mlp_out.lora_a) == ("mlp", None)
  a = np.asarray(layer.query.lora_a[...])
  assert a.shape == (32, 4) and np.abs(a).max() <= 32**-0.5 and a.std() > 0.05  # U(-1/sqrt(in), 1/sqrt(in))
  assert not np.asarray(layer.query.lora_b[...]).any()
  assert lora.lora_param_count(model) == 2 * (4 * (32 * 4 + 4 * 32) + (32 * 4 + 4 * 64) + (64 * 4 + 4 * 32))
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert layers.logical_axes(var) is not None


def test_bad_targets():
  with pytest.raises(ValueError, match="no Dense layer named"):
    lora.apply_lora(_bert(), targets=("q_proj",), rank=4, alpha=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no default LoRA targets"):
    lora.default_targets("gpt9")
  with pytest.raises(ValueError, match="rank"):
    lora.apply_lora(_bert(), targets=("query",), rank=0, alpha=8, rngs=nnx.Rngs(0))


def test_merge_equals_unmerged():
  model = _bert()
  ids, mask = _inputs()
  lora.apply_lora(model, targets=("query", "value", "mlp_in"), rank=2, alpha=16, rngs=nnx.Rngs(1))
  _randomize_b(model)
  adapted = np.asarray(model(ids, mask))
  assert np.abs(adapted - np.asarray(_bert()(ids, mask))).max() > 1e-2  # the adapters matter
  lora.merge_lora(model)
  assert not lora.lora_modules(model) and isinstance(model.layers[1].query, layers.Dense)
  np.testing.assert_allclose(np.asarray(model(ids, mask)), adapted, atol=2e-5)


def test_dropout_only_when_training():
  """Adapter dropout draws from the rngs passed down the call (training), never from module state."""
  model = _bert()
  ids, mask = _inputs()
  lora.apply_lora(model, targets=("query",), rank=2, alpha=4, dropout=0.5, rngs=nnx.Rngs(1))
  _randomize_b(model, std=1.0)
  want = np.asarray(model(ids, mask))
  np.testing.assert_array_equal(model(ids, mask, deterministic=True, rngs=nnx.Rngs(dropout=0)), want)
  adapter = lora.lora_modules(model)[0]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 32)), jnp.float32)
  before = nnx.state(adapter)
  np.testing.assert_array_equal(adapter(x), adapter(x, rngs=None))
  dropped = adapter(x, rngs=nnx.Rngs(dropout=0))
  assert np.abs(np.asarray(dropped) - np.asarray(adapter(x))).max() > 1e-3
  np.testing.assert_array_equal(dropped, adapter(x, rngs=nnx.Rngs(dropout=0)))  # a function of the key
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), before, nnx.state(adapter)))
  np.testing.assert_array_equal(model(ids, mask), want)


def test_labels_freeze_the_base_but_not_the_heads():
  params = {
    "query_head": {"kernel": jnp.ones((4, 8))},
    "query_backbone": {
      "layers": {
        0: {
          "query": {
            "base": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
            "lora_a": jnp.ones((4, 2)),
            "lora_b": jnp.ones((2, 4)),
          },
          "norm": {"scale": jnp.ones(4)},
        }
      },
      "lm_head": {"bias": jnp.ones(8)},
    },
  }
  labels = optim.param_labels(params, _optim())
  layer = labels["query_backbone"]["layers"][0]
  assert layer["query"] == {"base": {"kernel": "frozen", "bias": "frozen"}, "lora_a": "lora", "lora_b": "lora"}
  assert layer["norm"]["scale"] == "frozen" and labels["query_backbone"]["lm_head"]["bias"] == "frozen"
  assert labels["query_head"]["kernel"] == "head"
  labels = optim.param_labels(params, _optim(lora_trainable=("lm_head", "norm")))
  assert labels["query_backbone"]["lm_head"]["bias"] == "head"
  assert labels["query_backbone"]["layers"][0]["norm"]["scale"] == "base"
  tx, _ = optim.make_optimizer(_optim(), 10, params)
  sizes = sum(x.size for x in jax.tree.leaves(tx.init(params)) if x.ndim > 0)
  assert sizes == 2 * (8 + 8 + 32)  # Adam moments of lora_a, lora_b and the head kernel only


def _encode(enc, tok):
  b = tok(["a query about cells", "another much longer query about proteins"], max_length=16)
  return (
    np.asarray(enc(b["input_ids"], b["attention_mask"], kind="query")),
    np.asarray(enc(b["input_ids"], b["attention_mask"], kind="doc")),
  )


@pytest.mark.parametrize("towers,head", [("shared", "mlm"), ("separate", "latent_attention")])
def test_encoder_save_load_and_merged_export(tiny_path, tmp_path, towers, head):
  cfg = EncoderConfig(
    backbone=str(tiny_path), head=head, latent_dim=256, towers=towers, lora=LORA, query_max_len=16, doc_max_len=16
  )
  enc, tok = sparse_encoder.build_encoder(cfg)
  plain, _ = sparse_encoder.build_encoder(EncoderConfig(**{**cfg.to_dict(), "lora": {}}))
  for got, want in zip(_encode(enc, tok), _encode(plain, tok)):
    np.testing.assert_array_equal(got, want)  # B = 0: a fresh adapter changes nothing
  n = len(lora.lora_modules(enc.query_backbone))
  assert n == 2 * 6 and (towers == "shared" or len(lora.lora_modules(enc.doc_backbone)) == n)
  _randomize_b(enc, std=0.5)
  want = _encode(enc, tok)
  assert np.abs(want[1] - _encode(plain, tok)[1]).max() > 1e-3
  sparse_encoder.save_encoder(enc, tok, tmp_path / "lora")
  assert json.loads((tmp_path / "lora" / sparse_encoder.CONFIG_NAME).read_text())["lora"] == LORA
  loaded, tok2 = sparse_encoder.load_encoder(tmp_path / "lora")
  assert lora.lora_param_count(loaded) == lora.lora_param_count(enc)
  for got, w in zip(_encode(loaded, tok2), want):
    np.testing.assert_array_equal(got, w)
  sparse_encoder.save_encoder(enc, tok, tmp_path / "merged", merge_lora=True)
  assert lora.lora_modules(enc)  # the encoder itself is not merged
  assert json.loads((tmp_path / "merged" / sparse_encoder.CONFIG_NAME).read_text())["lora"] == {}
  merged, tok3 = sparse_encoder.load_encoder(tmp_path / "merged")
  assert not lora.lora_modules(merged)
  for got, w in zip(_encode(merged, tok3), want):
    np.testing.assert_allclose(got, w, atol=1e-4, rtol=1e-4)
  lora.merge_lora(enc)  # the module path agrees with the flat export
  for got, w in zip(_encode(enc, tok), want):
    np.testing.assert_allclose(got, w, atol=1e-4, rtol=1e-4)


def test_encoder_config_lora_validation_and_fingerprint(tiny_path):
  assert EncoderConfig().fingerprint() == "c2c1d601c3101175"  # unchanged without LoRA
  assert EncoderConfig(lora=LORA).fingerprint() != EncoderConfig().fingerprint()
  with pytest.raises(ValueError, match="rank required"):
    sparse_encoder.build_encoder(EncoderConfig(backbone=str(tiny_path), head="mlm", lora={"alpha": 2}))
  enc, _ = sparse_encoder.build_encoder(
    EncoderConfig(backbone=str(tiny_path), head="mlm", lora={"rank": 2, "targets": ["value"]}), weights=False
  )
  assert len(lora.lora_modules(enc)) == 2 and lora.lora_modules(enc)[0].scale == 1.0


def test_scanned_layers_adapt_and_merge():
  cfg = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    scan_layers=True,
  )
  model = llama.build(cfg, rngs=nnx.Rngs(0))
  ids, mask = _inputs()
  ids = ids % 64
  targets = lora.default_targets("llama")
  assert lora.apply_lora(model, targets=targets, rank=2, alpha=4, dropout=0.1, rngs=nnx.Rngs(1)) == 7
  q = model.layers.layer.self_attn.q_proj
  assert q.lora_a.get_value().shape == (3, 32, 2) and layers.logical_axes(q.lora_a) == ("layers", "embed", None)
  _randomize_b(model)
  adapted = np.asarray(model(ids, mask))
  trained = np.asarray(model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=0)))
  assert np.abs(trained - adapted).max() > 1e-4  # adapter dropout inside the scan (one key per layer)
  lora.merge_lora(model)
  np.testing.assert_allclose(np.asarray(model(ids, mask)), adapted, atol=2e-5)
