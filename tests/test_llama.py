"""Llama family (Llama 3 GQA + llama3 RoPE, Qwen2 biases, Mistral window): parity, scan, loader errors."""

import dataclasses
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from laspar_jax import mesh as mesh_lib
from laspar_jax.models import hf_weights, layers, llama

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
NAMES = ["llama3", "qwen2", "mistral"]


@nnx.jit
def _forward(model, ids, mask):
  h = model(ids, mask)
  return h, model.lm_head.logits(h)


def _load_as(name: str, **changes) -> nnx.Module:
  """The fixture's weights in a model built from its config with `changes`."""
  path = FIXTURES / name
  cfg = dataclasses.replace(hf_weights.load(path, weights=False).config, **changes)
  model = nnx.eval_shape(lambda: llama.build(cfg, rngs=nnx.Rngs(0)))
  hf_weights.load_tensors(model, str(path), llama.llama_params.checkpoint_names(cfg))
  return model


def _batch(name: str, side: str = "right"):
  ref = np.load(FIXTURES / name / "reference.npz")
  return jnp.asarray(ref[f"ids_{side}"]), jnp.asarray(ref[f"mask_{side}"])


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("name", NAMES)
def test_parity_with_transformers(name, impl):
  ld = hf_weights.load(FIXTURES / name, lm_head=True, attention_impl=impl)
  ref = np.load(FIXTURES / name / "reference.npz")
  for side in ("right", "left"):
    real = ref[f"mask_{side}"].astype(bool)
    np.testing.assert_array_equal(ref[f"pos_{side}"], np.maximum(np.cumsum(real, 1) - 1, 0))
    h, logits = _forward(ld.model, jnp.asarray(ref[f"ids_{side}"]), jnp.asarray(ref[f"mask_{side}"]))
    np.testing.assert_allclose(np.asarray(h)[real], ref[f"hidden_{side}"][real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[real], ref[f"logits_{side}"][real], atol=1e-4, rtol=0)


def test_configs_read_from_hf():
  cfgs = {n: hf_weights.load(FIXTURES / n, weights=False).config for n in NAMES}
  assert dict(cfgs["llama3"].rope_scaling)["rope_type"] == "llama3"
  assert cfgs["llama3"].num_key_value_heads == 2 and not cfgs["llama3"].tie_word_embeddings
  assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].attention_bias and cfgs["qwen2"].tie_word_embeddings
  assert cfgs["mistral"].head_dim == 8 and cfgs["mistral"].layer_windows == (4, 4)
  qwen = hf_weights.load(FIXTURES / "qwen2", lm_head=True).model
  assert qwen.layers[0].self_attn.q_proj.bias is not None and qwen.layers[0].self_attn.o_proj.bias is None
  assert qwen.vocab_projection().tied is qwen.embed_tokens


def test_llama3_rope_scaling_changes_frequencies():
  llama31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  }
  plain, scaled = layers.rope_inv_freq(128, 500000.0), layers.rope_inv_freq(128, 500000.0, llama31)
  assert scaled[0] == plain[0]  # high frequency: unchanged
  np.testing.assert_allclose(scaled[-1], plain[-1] / 8, rtol=1e-6)  # low frequency: divided
  medium = (scaled < plain) & (scaled > plain / 8 * (1 + 1e-6))
  assert medium.any()  # smoothed in between


def test_scan_layers_equals_unscanned():
  ids, mask = _batch("llama3", "left")
  plain = _load_as("llama3")
  scanned = _load_as("llama3", scan_layers=True)
  assert isinstance(scanned.layers, layers.Stacked)
  q = scanned.layers.layer.self_attn.q_proj.kernel
  assert q.get_value().shape == (2, 64, 64) and mesh_lib.logical_axes(q) == ("layers", "embed", "heads")
  np.testing.assert_array_equal(
    np.asarray(q.get_value()[1]), np.asarray(plain.layers[1].self_attn.q_proj.kernel.get_value())
  )
  h = nnx.jit(lambda m, i, k: m(i, k))(plain, ids, mask)
  np.testing.assert_allclose(
    np.asarray(nnx.jit(lambda m, i, k: m(i, k))(scanned, ids, mask)), np.asarray(h), atol=1e-5, rtol=0
  )
  remat = _load_as("llama3", scan_layers=True)
  remat.remat = True
  loss = lambda m: jnp.sum(m(ids, mask) ** 2)
  g_plain = nnx.grad(loss)(plain).layers[1].mlp.down_proj.kernel.get_value()
  g_scan = nnx.grad(loss)(remat).layers.layer.mlp.down_proj.kernel.get_value()[1]
  np.testing.assert_allclose(np.asarray(g_scan), np.asarray(g_plain), atol=1e-4, rtol=1e-4)
  # fresh initialisation draws the same numbers stacked or not
  cfg = hf_weights.load(FIXTURES / "llama3", weights=False).config
  a = llama.build(cfg, rngs=nnx.Rngs(3))
  b = llama.build(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(
    np.asarray(b.layers.layer.mlp.up_proj.kernel.get_value()[1]), np.asarray(a.layers[1].mlp.up_proj.kernel.get_value())
  )


def test_scanned_load_stacks_rows_and_names_a_missing_one(tmp_path):
  """The name map gives (stacked path, row); the loader stacks rows in a local buffer (no views, no globals)."""
  cfg = dataclasses.replace(hf_weights.load(FIXTURES / "llama3", weights=False).config, scan_layers=True)
  names = llama.llama_params.checkpoint_names(cfg)
  assert names.params["layers.1.self_attn.q_proj.weight"][0] == ("layers", "layer", "self_attn", "q_proj", "kernel")
  assert names.params["layers.1.self_attn.q_proj.weight"][2] == 1
  assert not hasattr(layers, "_PENDING") and not hasattr(layers.Stacked, "__getitem__")
  tensors = load_file(FIXTURES / "llama3" / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  model = nnx.eval_shape(lambda: llama.build(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(hf_weights.CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight"):
    hf_weights.load_tensors(model, "x", names, tensors=(("x", k, v) for k, v in tensors.items()))


def test_bidirectional_sees_the_future():
  ids, mask = _batch("qwen2")
  causal, bidir = _load_as("qwen2"), _load_as("qwen2", bidirectional=True)
  later = ids.at[0, -1].set((ids[0, -1] + 1) % 128)
  h_c, h_b = causal(ids, mask), bidir(ids, mask)
  assert np.abs(np.asarray(h_b[0, :-1] - h_c[0, :-1])).max() > 1e-3
  assert np.abs(np.asarray(bidir(later, mask)[0, 0] - h_b[0, 0])).max() > 1e-4
  np.testing.assert_allclose(np.asarray(causal(later, mask)[0, :-1]), np.asarray(h_c[0, :-1]), atol=1e-5)


def test_every_parameter_has_logical_axes():
  model = hf_weights.load(FIXTURES / "llama3", lm_head=True, weights=False).model
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      axes = mesh_lib.logical_axes(var)
      assert axes is not None and len(axes) == var.get_value().ndim, path
  attn = model.layers[0].self_attn
  assert mesh_lib.logical_axes(attn.k_proj.kernel) == ("embed", "kv")
  assert mesh_lib.logical_axes(model.lm_head.kernel) == ("embed", "vocab")
  assert model.lm_head.kernel.get_value().shape == (64, 128)


def test_wrong_shape_names_the_tensor(tmp_path):
  src, dst = FIXTURES / "mistral", tmp_path / "bad"
  shutil.copytree(src, dst)
  tensors = load_file(str(src / "model.safetensors"))
  name = "model.layers.0.self_attn.k_proj.weight"
  tensors[name] = np.concatenate([tensors[name], tensors[name]])
  save_file(tensors, str(dst / "model.safetensors"))
  with pytest.raises(hf_weights.CheckpointError, match=r"layers\.0\.self_attn\.k_proj\.weight"):
    hf_weights.load(dst)
