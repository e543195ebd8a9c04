"""T5 v1.0 and Flan-T5 (v1.1): parity with transformers in all three modes, loading, errors, sharding.

The fixtures (tests/fixtures/t5_v10, tests/fixtures/t5_flan) come from
tools/make_t5_fixtures.py (tiny random configs, transformers + CPU torch).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from laspar_jax import mesh as mesh_lib
from laspar_jax.models import backbone, hf_weights, t5, t5_params

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
VARIANTS = ("t5_v10", "t5_flan")
SIDES = ("right", "left")
ATOL = 1e-4


@pytest.fixture(
  scope="module", params=[(v, impl) for v in VARIANTS for impl in ("xla", "cpu")], ids=lambda p: f"{p[0]}-{p[1]}"
)
def loaded(request):
  variant, impl = request.param
  ld = hf_weights.load(FIXTURES / variant, lm_head=True, attention_impl=impl)
  return variant, ld, np.load(FIXTURES / variant / "reference.npz")


@nnx.jit(static_argnames="mode")
def _call(model, ids, mask, dec_ids=None, dec_mask=None, mode=None):
  return model(ids, mask, decoder_input_ids_bl=dec_ids, decoder_attention_mask_bl=dec_mask, mode=mode)


@nnx.jit
def _decode_logits(model, ids, mask, dec_ids, dec_mask):
  dec = model.decode(dec_ids, dec_mask, model.encode(ids, mask), mask)
  return dec, model.vocab_projection().logits(dec)


def _close(actual, expected, rows_bt=None):
  actual = np.asarray(actual, np.float32)
  if rows_bt is not None:  # compare only these positions
    actual, expected = actual[rows_bt > 0], expected[rows_bt > 0]
  np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)


def test_family_registered_and_loaded_through_registry(loaded):
  variant, ld, _ = loaded
  assert backbone.FAMILIES["t5"] is t5.FAMILY and backbone.FAMILIES["mt5"] is t5.FAMILY
  assert isinstance(ld.model, t5.T5Model) and isinstance(ld.model, backbone.Backbone)
  assert isinstance(ld.model.vocab_projection(), backbone.VocabProjection)
  assert ld.model.hidden_size == 32 and ld.model.vocab_size == 256 and ld.model.pad_id == 0
  assert ld.tokenizer.pad_id == 0
  assert ld.config.gated == (variant == "t5_flan")
  assert ld.config.tie_word_embeddings == (variant == "t5_v10")


@pytest.mark.parametrize("side", SIDES)
def test_encoder_mode_parity(loaded, side):
  _, ld, ref = loaded
  ids, mask = ref[f"ids_{side}"], ref[f"mask_{side}"]
  assert ld.model.mode == "encoder"  # the contract's call gives encoder states by default
  _close(_call(ld.model, ids, mask), ref[f"enc_{side}"])


@pytest.mark.parametrize("side", SIDES)
def test_encoder_decoder_teacher_forcing_parity(loaded, side):
  _, ld, ref = loaded
  ids, mask = ref[f"ids_{side}"], ref[f"mask_{side}"]
  dec_ids, dec_mask = ref[f"dec_ids_{side}"], ref[f"dec_mask_{side}"]
  np.testing.assert_array_equal(np.asarray(ld.model.shift_right(ids)), dec_ids)
  np.testing.assert_array_equal(np.asarray(t5.shift_right(mask, 1)), dec_mask)
  dec, logits = _decode_logits(ld.model, ids, mask, dec_ids, dec_mask)
  _close(dec, ref[f"dec_{side}"])
  _close(logits, ref[f"logits_{side}"])
  assert logits.dtype == jnp.float32
  _close(_call(ld.model, ids, mask, dec_ids, dec_mask), ref[f"dec_{side}"])
  # "encoder_decoder" mode defaults to the shifted input and mask.
  _close(_call(ld.model, ids, mask, mode="encoder_decoder"), ref[f"dec_{side}"])


@pytest.mark.parametrize("side", SIDES)
def test_decoder_stack_alone_parity(loaded, side):
  _, ld, ref = loaded
  ids, mask = ref[f"ids_{side}"], ref[f"mask_{side}"]
  # Rows that see no key (left padding under the causal mask) are zeros here and
  # a uniform average in transformers: padding either way, not compared.
  seen_bt = np.cumsum(mask, axis=1)
  _close(_call(ld.model, ids, mask, mode="decoder"), ref[f"dec_alone_{side}"], seen_bt)


def test_lm_head_tied_or_untied(loaded):
  variant, ld, _ = loaded
  head, model = ld.model.lm_head, ld.model
  assert head.bias_v() is None
  tensors = load_file(FIXTURES / variant / "model.safetensors")
  if variant == "t5_v10":
    assert head.tied is model.shared and head.kernel is None
    np.testing.assert_array_equal(np.asarray(head.kernel_dv()), tensors["shared.weight"].T)
    h = jnp.ones((1, 1, 32))
    np.testing.assert_allclose(np.asarray(head.transform(h)), 32**-0.5, rtol=1e-6)
  else:
    assert head.tied is None
    np.testing.assert_array_equal(np.asarray(head.kernel_dv()), tensors["lm_head.weight"].T)
    assert mesh_lib.logical_axes(head.kernel) == ("embed", "vocab")


def test_shift_right_reads_ignored_labels_as_pad():
  out = t5.shift_right(np.array([[5, -100, 7], [-100, -100, 2]]), start_id=0, pad_id=0)
  np.testing.assert_array_equal(np.asarray(out), [[0, 5, 0], [0, 0, 0]])


def test_relative_position_buckets():
  enc = t5.relative_position_buckets(4, 4, bidirectional=True, num_buckets=8, max_distance=16)
  np.testing.assert_array_equal(enc[0], [0, 5, 6, 6])  # keys after the query: upper half
  np.testing.assert_array_equal(enc[:, 0], [0, 1, 2, 2])  # 2 exact buckets, then log-spaced
  dec = t5.relative_position_buckets(40, 40, bidirectional=False, num_buckets=8, max_distance=16)
  assert dec[0, 1:].max() == 0 and dec[39, 0] == 7 and dec.max() == 7


def test_config_from_hf():
  base = dict(model_type="t5", d_model=32, num_layers=2, feed_forward_proj="gated-gelu")
  # transformers 5.x writes both flags: tie and scale are read independently (a tied, unscaled Flan head).
  cfg = t5.T5Config.from_hf_dict(dict(base, tie_word_embeddings=True, scale_decoder_outputs=False))
  assert cfg.tie_word_embeddings and not cfg.scales_lm_head and cfg.act == "gelu_new" and cfg.num_decoder_layers == 2
  untied = t5.T5Config.from_hf_dict(dict(base, tie_word_embeddings=False))
  assert not untied.tie_word_embeddings and not untied.scales_lm_head
  v10 = t5.T5Config.from_hf_dict({"feed_forward_proj": "relu"})  # 4.x v1.0: no flags, tied and scaled
  assert v10.tie_word_embeddings and v10.scales_lm_head
  mt5 = t5.T5Config.from_hf_dict({"model_type": "mt5"})  # mT5 unties by default; the flag wins when written
  assert not mt5.tie_word_embeddings and mt5.gated
  assert t5.T5Config.from_hf_dict({"model_type": "mt5", "tie_word_embeddings": True}).tie_word_embeddings
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.T5Config.from_hf_dict(dict(base, feed_forward_proj="relu-gated"))
  with pytest.raises(ValueError, match="mode"):
    t5.T5Config.from_hf_dict(dict(base, mode="seq2seq"))
  enc_only = t5.T5Config.from_hf_dict(dict(base, architectures=["T5EncoderModel"]))
  assert not enc_only.has_decoder
  names = t5_params.checkpoint_names(enc_only).params
  assert not any(n.startswith("decoder.") for n in names)


def _copy(variant, tmp_path):
  dst = tmp_path / variant
  shutil.copytree(FIXTURES / variant, dst)
  return dst


def test_encoder_only_checkpoint(tmp_path):
  dst = _copy("t5_flan", tmp_path)
  tensors = load_file(dst / "model.safetensors")
  keep = {k: v for k, v in tensors.items() if k.startswith("encoder.")}  # embed_tokens alias only
  save_file(keep, dst / "model.safetensors")
  hf = json.loads((dst / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps(dict(hf, architectures=["T5EncoderModel"])))
  ld = hf_weights.load(dst, attention_impl="xla")
  assert ld.model.decoder is None
  ref = np.load(dst / "reference.npz")
  _close(ld.model(ref["ids_left"], ref["mask_left"]), ref["enc_left"])


def test_missing_tensor_names_it(tmp_path):
  dst = _copy("t5_v10", tmp_path)
  tensors = load_file(dst / "model.safetensors")
  del tensors["decoder.block.1.layer.1.EncDecAttention.k.weight"]
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(hf_weights.CheckpointError, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention\.k\.weight"):
    hf_weights.load(dst)


def test_misshaped_tensor_names_it(tmp_path):
  dst = _copy("t5_flan", tmp_path)
  tensors = load_file(dst / "model.safetensors")
  tensors["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"] = np.zeros((7, 32), np.float32)
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(hf_weights.CheckpointError, match=r"DenseReluDense\.wi_1\.weight.*shape"):
    hf_weights.load(dst)


def test_logical_axes_on_every_parameter():
  model = hf_weights.load(FIXTURES / "t5_flan", weights=False, lm_head=True).model  # abstract
  axes = {"/".join(map(str, p)): mesh_lib.logical_axes(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert all(a is not None and len(a) >= 1 for a in axes.values()), axes
  assert axes["encoder/blocks/0/self_attn/q/kernel"] == ("embed", "heads")
  assert axes["decoder/blocks/1/cross_attn/k/kernel"] == ("embed", "kv")
  assert axes["decoder/blocks/0/self_attn/o/kernel"] == ("heads", "embed")
  assert axes["encoder/blocks/0/mlp/wi_0/kernel"] == ("embed", "mlp")
  assert axes["decoder/blocks/2/mlp/wo/kernel"] == ("mlp", "embed")
  assert axes["encoder/blocks/0/self_attn/relative_attention_bias"] == (None, "heads")
  assert axes["shared/embedding"] == ("vocab", "embed")
  assert axes["lm_head/kernel"] == ("embed", "vocab")


def test_sharded_equals_reference():
  ld = hf_weights.load(FIXTURES / "t5_flan", lm_head=True, attention_impl="xla")
  ref = np.load(FIXTURES / "t5_flan" / "reference.npz")
  mesh = mesh_lib.make_mesh(data=2, model=4)
  mesh_lib.shard_model(ld.model, mesh)
  kernel = ld.model.decoder.blocks[0].mlp.wi_0.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  put = lambda x: jax.device_put(x, mesh_lib.batch_sharding(mesh))
  batch = [put(ref[f"{k}_left"]) for k in ("ids", "mask", "dec_ids", "dec_mask")]
  dec, logits = _decode_logits(ld.model, *batch)
  _close(dec, ref["dec_left"])
  _close(logits, ref["logits_left"])


def test_remat_gradient_and_dropout():
  ld = hf_weights.load(FIXTURES / "t5_v10", remat=True, attention_impl="cpu")
  ref = np.load(FIXTURES / "t5_v10" / "reference.npz")
  ids, mask, dec_ids = ref["ids_right"], ref["mask_right"], ref["dec_ids_right"]

  @nnx.jit
  def grad(model):
    loss = lambda m: jnp.mean(jnp.square(m(ids, mask, decoder_input_ids_bl=dec_ids)))
    return nnx.grad(loss)(model)

  g = grad(ld.model)["decoder"]["blocks"][0]["self_attn"]["relative_attention_bias"].get_value()
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0

  @nnx.jit
  def train_forward(model, rngs):
    return model(ids, mask, deterministic=False, rngs=rngs)

  h_train = train_forward(ld.model, nnx.Rngs(dropout=0))
  assert float(jnp.abs(h_train - ref["enc_right"]).max()) > 1e-3  # dropout was on
  with pytest.raises(ValueError, match="rngs"):
    ld.model(ids, mask, deterministic=False)
