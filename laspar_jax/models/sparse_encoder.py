"""The sparse encoder: backbone + sparse head (+ separate query/document towers).

One object serves training, indexing and search:
  `encoder(input_ids_bl, attention_mask_bl, kind="query"|"doc") -> rep_bv`.

`EncoderConfig` says how to build it; `build_encoder` loads the backbone's
real weights; `save_encoder`/`load_encoder` write and read a self-contained
folder (`encoder_config.json` + `params.safetensors` + tokenizer files),
written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laspar_jax.data.tokenize import Tokenizer
from laspar_jax.models import heads as heads_lib
from laspar_jax.models import hf_weights

CONFIG_NAME = "encoder_config.json"
PARAMS_NAME = "params.safetensors"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """How to build a sparse encoder (all fields JSON-able).

  Attributes:
    backbone: HF folder or hub id of the backbone.
    head: a name of `heads.HEADS`.
    latent_dim: D of latent heads (ignored by mlm/dense).
    head_kwargs: extra constructor arguments of the head (pooling, tile, ...).
    towers: "shared" (one backbone + head) or "separate" (query and doc towers).
    query_prefix / doc_prefix: prepended to the texts before tokenization.
    query_max_len / doc_max_len: truncation lengths.
    dtype: compute dtype, "float32" or "bfloat16" (params stay fp32).
    remat: rematerialize backbone layers in the backward pass.
    seed: head initialisation seed.
  """
  backbone: str = "sentence-transformers/all-MiniLM-L6-v2"
  head: str = "latent_attention"
  latent_dim: int = 2 ** 22
  head_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  towers: str = "shared"
  query_prefix: str = ""
  doc_prefix: str = ""
  query_max_len: int = 64
  doc_max_len: int = 256
  dtype: str = "float32"
  remat: bool = False
  seed: int = 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def __hash__(self) -> int:  # NNX graphdefs hash their static attributes
    return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown encoder config fields {unknown}; known: {sorted(names)}")
    return cls(**d)

  def fingerprint(self) -> str:
    """Short hash of the config (stored in index manifests)."""
    return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class Tower(nnx.Module):
  """Backbone + head."""

  def __init__(self, backbone: nnx.Module, head: nnx.Module):
    self.backbone = backbone
    self.head = head

  def __call__(self, ids_bl, mask_bl, *, deterministic=True, rngs=None, topk=None) -> jax.Array:
    h_btd = self.backbone(ids_bl, mask_bl, deterministic=deterministic, rngs=rngs)
    if topk is None:
      return self.head(h_btd, mask_bl)
    return self.head(h_btd, mask_bl, topk=topk)


class SparseEncoder(nnx.Module):
  """Query and document towers (the same object when towers are shared)."""

  def __init__(self, config: EncoderConfig, query_tower: Tower, doc_tower: Tower | None = None):
    self.config = config
    self.query_tower = query_tower
    self.doc_tower = doc_tower  # None: shared towers

  @property
  def output_dim(self) -> int:
    return heads_lib.output_dim(self.query_tower.head)

  def tower(self, kind: str) -> Tower:
    if kind == "query":
      return self.query_tower
    if kind == "doc":
      return self.doc_tower if self.doc_tower is not None else self.query_tower
    raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")

  def __call__(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array, *, kind: str = "doc",
               deterministic: bool = True, rngs: nnx.Rngs | None = None,
               topk: int | None = None) -> jax.Array:
    """rep_bv float32 [B, D] for queries (kind="query") or documents (kind="doc").

    Args:
      input_ids_bl: [B, L] token ids (prefix already applied by the tokenizer call).
      attention_mask_bl: [B, L].
      kind: "query" or "doc" (selects the tower).
      deterministic: disables dropout.
      rngs: dropout stream when training.
      topk: keep each row's top-k dims (training-time masking); None keeps all.
    """
    return self.tower(kind)(input_ids_bl, attention_mask_bl, deterministic=deterministic,
                            rngs=rngs, topk=topk)


def _make_tower(cfg: EncoderConfig, loaded: hf_weights.Loaded, seed: int) -> Tower:
  rngs = nnx.Rngs(params=seed)
  kwargs = dict(cfg.head_kwargs)
  if cfg.head == "mlm":
    kwargs.setdefault("special_ids", loaded.tokenizer.special_ids)
    kwargs.setdefault("tied_embedding", loaded.model.embeddings.word_embeddings)
  head = heads_lib.make_head(cfg.head, d=loaded.config.hidden_size, D=cfg.latent_dim,
                             vocab=loaded.config.vocab_size, rngs=rngs, **kwargs)
  if cfg.head == "mlm" and loaded.mlm_head_params:
    head.load_hf(loaded.mlm_head_params)
  return Tower(loaded.model, head)


def build_encoder(cfg: EncoderConfig, *, weights: bool = True) -> tuple[SparseEncoder, Tokenizer]:
  """Builds the encoder: real backbone weights from `cfg.backbone`, fresh head(s).

  Args:
    cfg: the encoder config.
    weights: False builds an abstract encoder (shapes only, nothing read or initialised).

  Returns:
    (encoder, tokenizer); the tokenizer truncates at max(query_max_len, doc_max_len).
  """
  if not weights:
    return nnx.eval_shape(lambda: _build(cfg, weights=False)), _tokenizer(cfg)
  return _build(cfg, weights=True), _tokenizer(cfg)


def _tokenizer(cfg: EncoderConfig) -> Tokenizer:
  return Tokenizer.from_dir(hf_weights.resolve(cfg.backbone), max_length=max(cfg.query_max_len, cfg.doc_max_len))


def _build(cfg: EncoderConfig, *, weights: bool) -> SparseEncoder:
  dtype = _DTYPES[cfg.dtype]
  if cfg.towers not in ("shared", "separate"):
    raise ValueError(f"towers must be 'shared' or 'separate', got {cfg.towers!r}")
  load = lambda: hf_weights.load(cfg.backbone, dtype=dtype, max_length=max(cfg.query_max_len, cfg.doc_max_len),
                                 remat=cfg.remat, weights=weights)
  query = _make_tower(cfg, load(), cfg.seed)
  doc = _make_tower(cfg, load(), cfg.seed + 1) if cfg.towers == "separate" else None
  return SparseEncoder(cfg, query, doc)


def _flat_params(encoder: SparseEncoder) -> dict[str, np.ndarray]:
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(encoder, nnx.Param)):
    out[".".join(map(str, path))] = np.asarray(jax.device_get(var.get_value()))
  return out


def save_encoder(encoder: SparseEncoder, tokenizer: Tokenizer, path: str | os.PathLike) -> str:
  """Writes a self-contained encoder folder atomically (tmp folder + rename).

  Returns:
    The folder path.
  """
  from safetensors.numpy import save_file
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(_flat_params(encoder), os.path.join(tmp, PARAMS_NAME))
  with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
    json.dump(encoder.config.to_dict(), f, indent=2)
  backbone_dir = hf_weights.resolve(encoder.config.backbone)
  for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
               "special_tokens_map.json"):
    src = os.path.join(backbone_dir, name)
    if os.path.exists(src):
      shutil.copy(src, os.path.join(tmp, name))
  if os.path.exists(path):
    shutil.rmtree(path)
  os.rename(tmp, path)
  return path


def load_encoder(path_or_id: str | os.PathLike, **overrides: Any) -> tuple[SparseEncoder, Tokenizer]:
  """Loads an encoder folder written by `save_encoder`, or builds a fresh one.

  Args:
    path_or_id: a saved encoder folder (has encoder_config.json), or a backbone
      folder / hub id (then a fresh head is built from `overrides`).
    **overrides: EncoderConfig fields (head, latent_dim, ...).

  Returns:
    (encoder, tokenizer).
  """
  p = os.fspath(path_or_id)
  cfg_file = os.path.join(p, CONFIG_NAME)
  if not os.path.exists(cfg_file):
    return build_encoder(EncoderConfig(**{"backbone": p, **overrides}))
  from safetensors import safe_open
  with open(cfg_file) as f:
    d = json.load(f)
  d.update(overrides)
  d["backbone"] = p  # the folder carries the backbone config and tokenizer
  cfg = EncoderConfig.from_dict(d)
  encoder, tok = build_encoder(cfg, weights=False)
  params_file = os.path.join(p, PARAMS_NAME)
  try:
    with safe_open(params_file, framework="np") as f:
      saved = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:
    raise hf_weights.CheckpointError(f"{params_file}: cannot read encoder parameters ({e})") from e
  state = nnx.state(encoder, nnx.Param)
  flat = nnx.to_flat_state(state)
  expected = {".".join(map(str, path)) for path, _ in flat}
  if expected != set(saved):
    raise hf_weights.CheckpointError(
        f"{params_file}: parameters do not match the config: missing {sorted(expected - set(saved))[:3]}, "
        f"unexpected {sorted(set(saved) - expected)[:3]}")
  for path, var in flat:
    arr = saved[".".join(map(str, path))]
    if arr.shape != tuple(var.get_value().shape):
      raise hf_weights.CheckpointError(f"{params_file}: {'.'.join(map(str, path))} has shape {arr.shape}, "
                                       f"expected {tuple(var.get_value().shape)}")
    var.set_value(jnp.asarray(arr))
  return encoder, tok
