"""OPT backbone: fp32 parity with transformers (pre-LN and the opt-350m post-LN layout), loader errors."""

import dataclasses
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from laspar_jax import mesh as mesh_lib
from laspar_jax.models import hf_weights, opt, opt_params

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@nnx.jit
def _forward(model, ids, mask):
  h = model(ids, mask)
  return h, model.lm_head.logits(h)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("name", ["opt_pre", "opt_post"])
def test_parity_with_transformers(name, impl):
  ld = hf_weights.load(FIXTURES / name, lm_head=True, attention_impl=impl)
  ref = np.load(FIXTURES / name / "reference.npz")
  for side in ("right", "left"):
    real = ref[f"mask_{side}"].astype(bool)
    assert real[:, 0].all() != (side == "left")
    h, logits = _forward(ld.model, jnp.asarray(ref[f"ids_{side}"]), jnp.asarray(ref[f"mask_{side}"]))
    np.testing.assert_allclose(np.asarray(h)[real], ref[f"hidden_{side}"][real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[real], ref[f"logits_{side}"][real], atol=1e-4, rtol=0)


def test_post_ln_layout_and_tied_head():
  ld = hf_weights.load(FIXTURES / "opt_post", lm_head=True)
  m, cfg = ld.model, ld.config
  assert not cfg.do_layer_norm_before and cfg.word_embed_proj_dim == 16 and cfg.hidden_size == 32
  assert m.final_layer_norm is None and m.project_in is not None and m.project_out is not None
  assert m.hidden_size == 16 and m.vocab_projection().tied is m.embed_tokens
  assert m.vocab_projection().kernel_dv().shape == (16, 128) and m.vocab_projection().bias_v() is None
  pre = hf_weights.load(FIXTURES / "opt_pre").model
  assert pre.project_in is None and pre.final_layer_norm is not None


def test_every_parameter_has_logical_axes():
  model = hf_weights.load(FIXTURES / "opt_post", lm_head=True, weights=False).model
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      axes = mesh_lib.logical_axes(var)
      assert axes is not None and len(axes) == var.get_value().ndim, path
  assert mesh_lib.logical_axes(model.layers[0].self_attn.q_proj.kernel) == ("embed", "heads")
  assert mesh_lib.logical_axes(model.layers[0].fc2.kernel) == ("mlp", "embed")


def test_remat_and_bidirectional():
  ld = hf_weights.load(FIXTURES / "opt_pre", lm_head=True)
  ref = np.load(FIXTURES / "opt_pre" / "reference.npz")
  ids, mask = jnp.asarray(ref["ids_right"]), jnp.asarray(ref["mask_right"])
  h, _ = _forward(ld.model, ids, mask)
  names = opt_params.checkpoint_names(ld.config)
  for cfg, remat in ((ld.config, True), (dataclasses.replace(ld.config, bidirectional=True), False)):
    other = nnx.eval_shape(lambda: opt.build(cfg, rngs=nnx.Rngs(0), remat=remat))
    hf_weights.load_tensors(other, str(FIXTURES / "opt_pre"), names)
    h2 = other(ids, mask)
    if remat:
      np.testing.assert_allclose(np.asarray(h2), np.asarray(h), atol=1e-5)  # eager vs jit
    else:  # earlier tokens now see later ones
      assert np.abs(np.asarray(h2[0, :-1] - h[0, :-1])).max() > 1e-3
      later = ids.at[0, -1].set((ids[0, -1] + 1) % 128)
      assert np.abs(np.asarray(other(later, mask)[0, 0] - h2[0, 0])).max() > 1e-4
      np.testing.assert_allclose(np.asarray(ld.model(later, mask)[0, :-1]), np.asarray(h[0, :-1]), atol=1e-5)


def test_wrong_shape_names_the_tensor(tmp_path):
  src = FIXTURES / "opt_pre"
  dst = tmp_path / "bad"
  shutil.copytree(src, dst)
  tensors = load_file(str(src / "model.safetensors"))
  name = "model.decoder.layers.1.fc1.weight"
  tensors[name] = tensors[name][:-1]
  save_file(tensors, str(dst / "model.safetensors"))
  with pytest.raises(hf_weights.CheckpointError, match=r"layers\.1\.fc1\.weight"):
    hf_weights.load(dst)
