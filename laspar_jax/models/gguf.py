"""Reads GGUF files (llama.cpp's format) as a Hugging Face config dict and HF-named float32 tensors.

Through the `gguf` package (pure Python + numpy): quantized tensors are
dequantized to float32 (`SUPPORTED_TYPES`), llama.cpp's rotary row permutation
of the query and key projections is undone, and GGUF tensor names
(`blk.N.attn_q.weight`, ...) become the Hugging Face names of the
architecture's model_type (`model.layers.N.self_attn.q_proj.weight`, ...;
the architectures read are the families' `gguf_architectures`), so
a family's ordinary safetensors name map loads them. The tokenizer lives in
the same file's metadata (`laspar_jax.tokenizer.Tokenizer.from_gguf`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np

from laspar_jax.models import backbone

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0})


class GGUFError(ValueError):
  """A GGUF file we cannot read (hf_weights re-raises it as CheckpointError)."""


# "<arch>." metadata key -> config.json key.
_CONFIG_KEYS = {
  "context_length": "max_position_embeddings",
  "block_count": "num_hidden_layers",
  "feed_forward_length": "intermediate_size",
  "embedding_length": "hidden_size",
  "rope.freq_base": "rope_theta",
  "attention.head_count": "num_attention_heads",
  "attention.head_count_kv": "num_key_value_heads",
  "attention.layer_norm_rms_epsilon": "rms_norm_eps",
  "vocab_size": "vocab_size",
}

_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def field_value(field: Any) -> Any:
  """The Python value of a GGUFReader field (str, int, float, bool or list)."""
  return field.contents()


def metadata(reader: gguf.GGUFReader, *, skip_large: bool = False) -> dict[str, Any]:
  """All metadata fields of a GGUF file as Python values.

  Args:
    reader: an open `gguf.GGUFReader`.
    skip_large: leave out the tokenizer's token/merge/score arrays.
  """
  large = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
  return {k: field_value(f) for k, f in reader.fields.items() if not (skip_large and k in large)}


def open_reader(path: str) -> gguf.GGUFReader:
  """Opens a GGUF file (memory-mapped).

  Raises:
    GGUFError: not a readable GGUF file.
  """
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError / struct errors on bad or truncated files
    raise GGUFError(f"{path}: cannot read GGUF file ({e})") from e


def hf_config(reader: gguf.GGUFReader, path: str = "") -> dict[str, Any]:
  """A config.json-style dict from the GGUF metadata.

  Raises:
    GGUFError: an architecture we do not map, or missing hyperparameters.
  """
  arch = field_value(reader.fields["general.architecture"]) if "general.architecture" in reader.fields else None
  found = backbone.gguf_architecture(arch) if isinstance(arch, str) else None
  if found is None:
    known = sorted(a for f in backbone.families().values() for a in f.gguf_architectures)
    raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; known: {known}")
  model_type, _ = found
  cfg: dict[str, Any] = {"model_type": model_type, "architectures": [f"{model_type.capitalize()}ForCausalLM"]}
  for key, hf_key in _CONFIG_KEYS.items():
    f = reader.fields.get(f"{arch}.{key}")
    if f is not None:
      cfg[hf_key] = field_value(f)
  for key, hf_key in _TOKEN_IDS.items():
    f = reader.fields.get(f"tokenizer.ggml.{key}")
    if f is not None:
      cfg[hf_key] = int(field_value(f))
  if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in reader.fields:
    cfg["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
  cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
  missing = [
    k
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    if cfg.get(k) is None
  ]
  if missing:
    raise GGUFError(f"{path}: GGUF metadata lacks {missing} for architecture {arch!r}")
  head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
  rope_dim = reader.fields.get(f"{arch}.rope.dimension_count")
  if rope_dim is not None and field_value(rope_dim) != head_dim:
    cfg["head_dim"] = int(field_value(rope_dim))
  names = {t.name for t in reader.tensors}
  cfg["tie_word_embeddings"] = "output.weight" not in names
  cfg["torch_dtype"] = "float32"
  return cfg


def hf_name(name: str) -> str | None:
  """The Hugging Face name of a GGUF tensor (None: not a name we know)."""
  base, dot, kind = name.rpartition(".")
  if base in _GLOBAL_NAMES and kind == "weight":
    return f"{_GLOBAL_NAMES[base]}.weight"
  m = _BLOCK.match(name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
  return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes convert_hf_to_gguf's rotary permutation of q/k rows ([out, ...] with out = n_head * head_dim).

  llama.cpp stores each head's rows as interleaved (even, odd) pairs; Hugging
  Face stores the two rotary halves one after the other.
  """
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor: Any, path: str = "") -> np.ndarray:
  """A GGUF tensor as float32 numpy in Hugging Face layout ([out, in] for matrices).

  Raises:
    GGUFError: a quantization type outside SUPPORTED_TYPES (names the tensor and file).
  """
  qtype = Q(tensor.tensor_type)
  if qtype not in SUPPORTED_TYPES:
    raise GGUFError(
      f"{path}: tensor {tensor.name!r} has GGUF type {qtype.name}, which is not supported "
      f"(supported: {sorted(t.name for t in SUPPORTED_TYPES)})"
    )
  shape = tuple(int(d) for d in reversed(tensor.shape))  # GGML lists dims fastest first
  try:
    arr = gguf.quants.dequantize(tensor.data, qtype)
  except Exception as e:
    raise GGUFError(f"{path}: cannot dequantize tensor {tensor.name!r} ({qtype.name}): {e}") from e
  return np.asarray(arr, np.float32).reshape(shape)


def iter_tensors(reader: gguf.GGUFReader, path: str, cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, float32 array) for each tensor, one at a time.

  Args:
    reader: the open file.
    path: its path (named in errors).
    cfg: `hf_config(reader)`, for the head counts of the q/k un-permutation.

  Raises:
    GGUFError: an unknown tensor name or an unsupported quantization type.
  """
  arch = field_value(reader.fields["general.architecture"])
  _, permuted = backbone.gguf_architecture(arch)
  n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  for t in reader.tensors:
    name = hf_name(t.name)
    if name is None:
      raise GGUFError(f"{path}: unexpected GGUF tensor {t.name!r} for architecture {arch!r}")
    arr = dequantize(t, path)
    if permuted and ".self_attn.q_proj." in name:
      arr = unpermute(arr, n_head)
    elif permuted and ".self_attn.k_proj." in name:
      arr = unpermute(arr, n_kv)
    yield name, arr


def find_file(path: str) -> str | None:
  """The .gguf file `path` names: itself, or the single .gguf of a folder (None: none there).

  Raises:
    GGUFError: a folder with several .gguf files.
  """
  if os.path.isfile(path):
    return path if path.endswith(".gguf") else None
  if not os.path.isdir(path):
    return None
  found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
  if len(found) > 1:
    raise GGUFError(f"{path}: holds several .gguf files {found}; pass the one to load")
  return os.path.join(path, found[0]) if found else None


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a whole GGUF file.

  Args:
    path: a .gguf file (or a folder holding exactly one).

  Returns:
    (config.json-style dict, {HF tensor name: float32 array}).
  """
  p = os.fspath(path)
  file = find_file(p)
  if file is None:
    raise GGUFError(f"{p}: no .gguf file")
  reader = open_reader(file)
  cfg = hf_config(reader, file)
  return cfg, dict(iter_tensors(reader, file, cfg))
