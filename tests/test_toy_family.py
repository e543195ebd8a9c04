"""A new family is one model class, one name map and its registration: nothing else changes.

The toy family below (a few lines) is registered in the test only; read-out,
LoRA targeting, loading from a safetensors folder written here, and a whole
sparse encoder then work through the registry (`backbone.Family`), without
touching a library file.
"""

import dataclasses
import json
import pathlib
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from laspar_jax.models import backbone, decoding, hf_weights, layers, lora, sparse_encoder

TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "llama3"
V, D = 128, 8


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  vocab_size: int = V
  hidden_size: int = D
  pad_token_id: int = 0
  bidirectional: bool = False


class ToyModel(backbone.ConfigBacked, nnx.Module):
  def __init__(self, cfg, *, rngs, dtype=jnp.float32, remat=False, attention_impl="xla"):
    self.config, self.dtype, self.causal = cfg, dtype, not cfg.bidirectional
    self.embed = layers.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.proj = layers.Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", "mlp"), rngs=rngs)
    self.lm_head = nnx.data(None)

  @property
  def hidden_size(self):
    return self.config.hidden_size

  def __call__(self, ids, mask, *, deterministic=True, rngs=None):
    return jnp.tanh(self.proj(self.embed(ids))) * mask[..., None]


def toy_names(cfg, *, lm_head=False):
  t, i = backbone.transpose, backbone.identity
  params = {"embed.weight": (("embed", "embedding"), i), "proj.weight": (("proj", "kernel"), t)}
  params["proj.bias"] = (("proj", "bias"), i)
  return backbone.CheckpointNames(params=params, canonical=lambda n: n, ignored=re.compile(r"^$"))


TOY = backbone.Family(
  name="toy",
  model_types=("toy",),
  config_from_hf=lambda d: ToyConfig(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"]),
  build=lambda cfg, **kw: ToyModel(cfg, **kw),
  lm_head=lambda model, cfg, *, rngs: layers.LMHead(cfg.hidden_size, cfg.vocab_size, tied=model.embed, rngs=rngs),
  checkpoint_names=toy_names,
  model_class=ToyModel,
  decoder_only=True,
  modes=("plain", "last_token"),
  lora_targets=("proj",),
)


@pytest.fixture
def toy_folder(tmp_path, monkeypatch):
  monkeypatch.setattr(backbone, "FAMILIES", dict(backbone.families()))  # registered for this test only
  backbone.register(TOY)
  folder = tmp_path / "toy"
  shutil.copytree(TOKENIZER, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.npz", "config.json"))
  rng = np.random.default_rng(0)
  tensors = {
    "embed.weight": rng.normal(size=(V, D)).astype(np.float32),
    "proj.weight": rng.normal(size=(D, D)).astype(np.float32),
    "proj.bias": rng.normal(size=(D,)).astype(np.float32),
  }
  save_file(tensors, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": V, "hidden_size": D}))
  return folder, tensors


def test_toy_family_through_the_registry(toy_folder):
  folder, tensors = toy_folder
  # loading: config.json's model_type finds the family, its name map places the tensors
  ld = hf_weights.load(folder, lm_head=True)
  assert isinstance(ld.model, ToyModel) and backbone.family_of(ld.model) is TOY
  np.testing.assert_array_equal(np.asarray(ld.model.proj.kernel[...]), tensors["proj.weight"].T)
  np.testing.assert_array_equal(np.asarray(ld.model.vocab_projection().kernel_dv()), tensors["embed.weight"].T)
  # read-out: the modes the family lists, and nothing else
  ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], np.int32)
  mask = (ids != 0).astype(np.int32)
  h, pool, pids = decoding.read(ld.model, ids, mask, mode="last_token")
  np.testing.assert_array_equal(np.asarray(pids)[:, 0], [7, 9])
  with pytest.raises(ValueError, match=r"multi_token.*'toy'"):
    decoding.read(ld.model, ids, mask, mode="multi_token")
  assert decoding.is_decoder_only(ld.model)
  backbone.set_bidirectional(ld.model, True)
  assert ld.model.config.bidirectional and not ld.model.causal
  # LoRA: the family's default targets
  assert lora.default_targets("toy") == ("proj",)
  assert lora.apply_lora_config(ld.model, {"rank": 2}, seed=0) == 1
  assert isinstance(ld.model.proj, lora.LoRADense)
  # a whole sparse encoder, saved and loaded
  cfg = sparse_encoder.EncoderConfig(backbone=str(folder), head="mlm", decoding="last_token", lora={"rank": 2})
  enc, tok = sparse_encoder.build_encoder(cfg)
  rep = np.asarray(enc(ids, mask))
  assert rep.shape == (2, V) and (rep > 0).any()
  enc2, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, folder.parent / "enc"))
  np.testing.assert_array_equal(np.asarray(enc2(ids, mask)), rep)


def test_unknown_model_type_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt9"}))
  with pytest.raises(hf_weights.CheckpointError, match="gpt9"):
    hf_weights.load(tmp_path)
