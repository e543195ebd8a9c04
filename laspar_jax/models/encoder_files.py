"""The files of a saved encoder folder, and reading folders written by older versions.

An encoder folder holds `encoder_config.json` (the `EncoderConfig`),
`params.safetensors` (parameters by their "."-joined NNX path) and the
backbone's config and tokenizer files (`sparse_encoder.save_encoder` writes
it, `sparse_encoder.load_encoder` reads it). Older layouts stay loadable:
`legacy_names` renames the tower layout's parameters, `legacy_read_out` keeps
the read-out behaviour of configs written before `special_tokens` existed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import safetensors.numpy
from etils import epath
from safetensors import safe_open

from laspar_jax import io_utils
from laspar_jax.models import hf_weights

CONFIG_NAME = "encoder_config.json"
PARAMS_NAME = "params.safetensors"
BACKBONE_FILES = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def local_folder(folder: epath.Path) -> str:
  """A local copy of a remote encoder folder's small files (config and tokenizer)."""
  local = epath.Path(tempfile.mkdtemp(prefix="laspar_encoder_"))
  for name in (CONFIG_NAME,) + BACKBONE_FILES:
    if (folder / name).exists():
      (folder / name).copy(local / name)
  return os.fspath(local)


def read_params(params_file: epath.Path) -> dict[str, np.ndarray]:
  try:
    if io_utils.is_local(params_file):
      with safe_open(os.fspath(params_file), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
    return safetensors.numpy.load(params_file.read_bytes())
  except Exception as e:
    raise hf_weights.CheckpointError(f"{params_file}: cannot read encoder parameters ({e})") from e


def legacy_names(saved: dict[str, np.ndarray], vocab_head: bool) -> dict[str, np.ndarray]:
  """Renames parameters saved in the tower layout ({query,doc}_tower.{backbone,head}.*)."""
  if not any(k.startswith(("query_tower.", "doc_tower.")) for k in saved):
    return saved
  head = "backbone.lm_head" if vocab_head else "head"  # the MLM head moved
  out = {}
  for name, arr in saved.items():
    side, _, rest = name.partition("_tower.")
    part, _, tail = rest.partition(".")
    out[f"{side}_{head if part == 'head' else part}.{tail}"] = arr
  return out


def legacy_read_out(d: dict[str, Any]) -> dict[str, Any]:
  """An encoder_config.json written before the reference read-outs: keep its behaviour.

  Such configs have no `special_tokens` (they zeroed special dims: "dims"); their
  decoder_stack fed x unshifted, their multi_token mlp weights sat at the
  decoder inputs and two mlp heads on a shared backbone had a Linear each.
  """
  if "special_tokens" in d:
    return d
  d = dict(d, special_tokens="dims")
  kw = dict(d.get("decoding_kwargs") or {})
  if d.get("decoding") == "decoder_stack":
    kw.setdefault("shift", False)
  if d.get("decoding") == "multi_token" and "mlp" in (d.get("head"), d.get("doc_head")):
    kw.setdefault("token_ids", "decoder_input")
  d["decoding_kwargs"] = kw
  two_mlp = d.get("head") == "mlp" and d.get("doc_head") in ("", None, "mlp") and d.get("doc_head_kwargs")
  if two_mlp and d.get("towers", "shared") == "shared":
    d["doc_head_kwargs"] = {**d["doc_head_kwargs"], "separate_linear": True}
  return d
