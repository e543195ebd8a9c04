"""The sparse encoder: backbone(s) + a query head + a document head.

One object serves training, indexing and search:
  `encoder(input_ids_bl, attention_mask_bl, kind="query"|"doc") -> rep_bv`.

Heads are chosen per side, independently of whether the backbone is shared:
`EncoderConfig.head` (queries) and `doc_head` ("" = the same head);
`towers="separate"` gives each side its own backbone; any pair of heads works
on either (e.g. a vocabulary query head with an "mlp" document head, or the
reverse). Parameters of the sparse heads live under `query_head` /
`doc_head`; a vocabulary projection lives in its backbone as `lm_head` (under
`query_backbone` on a shared backbone) and is handed to the vocabulary head at
each call, so no head holds a module of the backbone.

`EncoderConfig.decoding` picks the read-out (`decoding.MODES`: "plain",
T5's "multi_token" / "single_token" / "decoder_stack", decoder-only "echo" /
"last_token"; the family lists the ones it allows); `bidirectional` drops the
causal mask of OPT / Llama-family backbones. Decoder-only backbones never pool
their BOS position in the "plain", "echo" and "last_token" modes.

Special tokens (`EncoderConfig.special_tokens`, for vocabulary-dim heads):
"family" (default) is the reference's rule of the backbone's family
(`backbone.Family.special_tokens`: T5 keeps them, BERT/OPT/Llama skip special
positions); "dims" (ours before; how older saved encoders load) zeroes the
special ids' dims. Two "mlp" heads on a shared backbone share one Linear, as
the reference's single encoder (saved once, under `doc_head`, NNX's first path);
`doc_head_kwargs={"separate_linear": True}` gives documents their own (ours before).

`EncoderConfig` says how to build it; `build_encoder` loads the backbone's
real weights (then wraps its projections in LoRA adapters when
`EncoderConfig.lora` is set, see `lora.py`); `save_encoder`/`load_encoder`
write and read a self-contained folder (`encoder_config.json` +
`params.safetensors` + tokenizer files), written to a temporary name and
renamed when complete (local or gs://). `save_encoder(..., merge_lora=True)`
folds the adapters in and writes a plain encoder (`lora` {}).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx

from laspar_jax import io_utils
from laspar_jax.models import backbone as backbone_lib
from laspar_jax.models import decoding as decoding_lib
from laspar_jax.models import encoder_config
from laspar_jax.models import heads as heads_lib
from laspar_jax.models import hf_weights, layers
from laspar_jax.models import lora as lora_lib
from laspar_jax.models.encoder_files import (
  BACKBONE_FILES,
  CONFIG_NAME,
  PARAMS_NAME,
  legacy_names,
  legacy_read_out,
  local_folder,
  read_params,
)
from laspar_jax.tokenizer import Tokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


EncoderConfig = encoder_config.EncoderConfig  # re-exported: the name callers know
backbone_identity = encoder_config.backbone_identity


_DECODING_KEYS = {"drop_first", "mask_eos", "shift", "token_ids"}
SPECIAL_TOKENS = ("family", "dims", "positions", "keep")
_BOS_MODES = ("plain", "echo", "last_token")  # decoder-only read-outs that leave BOS out


class SparseEncoder(nnx.Module):
  """Backbone(s) and heads; `doc_backbone` / `doc_head` None means shared with the query side.

  `skip_ids`: token ids whose positions are never pooled (decoder-only backbones: BOS).
  """

  def __init__(
    self,
    config: EncoderConfig,
    query_backbone: nnx.Module,
    query_head: nnx.Module,
    *,
    doc_backbone: nnx.Module | None = None,
    doc_head: nnx.Module | None = None,
    skip_ids: tuple[int, ...] = (),
  ):
    self.config = config
    self.query_backbone = query_backbone
    self.doc_backbone = doc_backbone
    self.query_head = query_head
    self.doc_head = doc_head
    self.skip_ids = tuple(int(i) for i in skip_ids)

  @property
  def output_dim(self) -> int:
    return heads_lib.output_dim(self.query_head)

  def backbone(self, kind: str) -> nnx.Module:
    """The backbone of one side ("query" or "doc")."""
    if kind == "query":
      return self.query_backbone
    if kind == "doc":
      return self.doc_backbone if self.doc_backbone is not None else self.query_backbone
    raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")

  def head(self, kind: str) -> nnx.Module:
    """The head of one side ("query" or "doc")."""
    if kind == "query":
      return self.query_head
    if kind == "doc":
      return self.doc_head if self.doc_head is not None else self.query_head
    raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")

  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    kind: str = "doc",
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
    topk: int | None = None,
    text_mask_bl: jax.Array | None = None,
  ) -> jax.Array:
    """rep_bv float32 [B, D] for queries (kind="query") or documents (kind="doc").

    Args:
      input_ids_bl: [B, L] token ids (prefix already applied by the tokenizer call).
      attention_mask_bl: [B, L].
      kind: "query" or "doc" (selects backbone and head).
      deterministic: disables dropout.
      rngs: dropout stream when training.
      topk: keep each row's top-k dims (training-time masking); None keeps all.
      text_mask_bl: [B, L] text flags of prompted inputs (`config.prompt`); pooled
        positions are limited to the text when `config.prompt_pool` is "text".

    Returns:
      float32 [B, D].
    """
    backbone, head = self.backbone(kind), self.head(kind)
    # LoRA adapters' dropout draws from `rngs` inside the backbone (training only)
    h_btd, mask_bt, ids_bt = decoding_lib.read(
      backbone,
      input_ids_bl,
      attention_mask_bl,
      mode=self.config.decoding,
      skip_ids=self.skip_ids,
      per_token=head.per_token,
      text_mask_bt=text_mask_bl if self.config.prompt_pool == "text" else None,
      deterministic=deterministic,
      rngs=rngs,
      **self.config.decoding_kwargs,
    )
    return head(h_btd, mask_bt, ids_bt, projection=getattr(backbone, "lm_head", None), topk=topk)


def build_encoder(cfg: EncoderConfig, *, weights: bool = True) -> tuple[SparseEncoder, Tokenizer]:
  """Builds the encoder: real backbone weights from `cfg.backbone`, fresh head(s).

  Args:
    cfg: the encoder config.
    weights: False builds an abstract encoder (shapes only, nothing read or initialised).

  Returns:
    (encoder, tokenizer); the tokenizer truncates at max(query_max_len, doc_max_len).
  """
  tokenizers: list[Tokenizer] = []  # the one the backbone's loader builds (never a second one)

  def build() -> SparseEncoder:
    return _build(cfg, weights=weights, tokenizers=tokenizers)

  encoder = build() if weights else nnx.eval_shape(build)
  return encoder, tokenizers[0]


def _make_head(
  spec: tuple[str, dict[str, Any]], loaded: hf_weights.Loaded, cfg: EncoderConfig, seed: int
) -> nnx.Module:
  name, kwargs = spec[0], dict(spec[1])
  kwargs.pop("separate_linear", None)  # read by _build
  backbone = loaded.model
  if heads_lib.uses_vocab(name):
    backbone.vocab_projection()  # raises when the backbone has no vocabulary head
  # SparseEncoder hands every head the backbone's projection at each call (the head holds none).
  dims = special_rule(cfg, loaded) == "dims"
  special_ids = kwargs.pop("special_ids", loaded.tokenizer.special_ids if dims else ())  # head_kwargs win
  return heads_lib.make_head(
    name,
    d=backbone.hidden_size,
    D=cfg.latent_dim,
    vocab=backbone.vocab_size,
    rngs=nnx.Rngs(params=seed),
    special_ids=special_ids,
    **kwargs,
  )


def special_rule(cfg: EncoderConfig, loaded: hf_weights.Loaded) -> str:
  """The special-token rule in force: "dims", "positions" or "keep" (cfg.special_tokens, or the family's)."""
  if cfg.special_tokens not in SPECIAL_TOKENS:
    raise ValueError(f"EncoderConfig.special_tokens must be one of {SPECIAL_TOKENS}, got {cfg.special_tokens!r}")
  if not cfg.vocab_dims():
    return "keep"  # latent and dense heads: every position pooled, no vocabulary dims
  if cfg.special_tokens != "family":
    return cfg.special_tokens
  return backbone_lib.family_of(loaded.model).special_tokens


def _build(cfg: EncoderConfig, *, weights: bool, tokenizers: list[Tokenizer] | None = None) -> SparseEncoder:
  if cfg.towers not in ("shared", "separate"):
    raise ValueError(f"towers must be 'shared' or 'separate', got {cfg.towers!r}")
  if cfg.remat_policy not in layers.REMAT_POLICIES:
    raise ValueError(f"EncoderConfig.remat_policy must be one of {layers.REMAT_POLICIES}, got {cfg.remat_policy!r}")
  remat = layers.remat_setting(cfg.remat, cfg.remat_policy)
  q_spec, d_spec = cfg.head_specs()
  q_vocab, d_vocab = heads_lib.uses_vocab(q_spec[0]), heads_lib.uses_vocab(d_spec[0])

  def load(lm_head: bool, seed: int) -> hf_weights.Loaded:
    # A fresh lm_head draws from the seed of the side whose vocabulary head uses it.
    return hf_weights.load(
      cfg.backbone,
      dtype=_DTYPES[cfg.dtype],
      max_length=max(cfg.query_max_len, cfg.doc_max_len),
      remat=remat,
      scan_layers=cfg.scan_layers,
      weights=weights,
      lm_head=lm_head,
      attention_impl=cfg.attention_impl,
      rngs=nnx.Rngs(params=seed) if lm_head else None,
    )

  separate = cfg.towers == "separate"
  if separate:
    query, doc = load(q_vocab, cfg.seed), load(d_vocab, cfg.seed + 1)
  else:
    query = doc = load(q_vocab or d_vocab, cfg.seed if q_vocab else cfg.seed + 1)
  if tokenizers is not None:
    tokenizers.append(query.tokenizer)
  skip_ids = _read_out(cfg, query, *((doc,) if separate else ()))
  if cfg.lora:  # adapters draw from seed + 2 (query / shared backbone) and seed + 3 (document)
    lora_lib.apply_lora_config(query.model, cfg.lora, seed=cfg.seed + 2)
    if separate:
      lora_lib.apply_lora_config(doc.model, cfg.lora, seed=cfg.seed + 3)
  query_head = _make_head(q_spec, query, cfg, cfg.seed)
  doc_head = None if not separate and d_spec == q_spec else _make_head(d_spec, doc, cfg, cfg.seed + 1)
  if (
    doc_head is not None
    and not separate
    and q_spec[0] == d_spec[0] == "mlp"
    and not d_spec[1].get("separate_linear", False)
  ):
    doc_head.linear = query_head.linear  # one Linear serves both sides, as the reference's shared encoder
  if doc_head is not None and heads_lib.output_dim(doc_head) != heads_lib.output_dim(query_head):
    raise ValueError(
      f"the query head {q_spec[0]!r} gives {heads_lib.output_dim(query_head)} dims and the document "
      f"head {d_spec[0]!r} {heads_lib.output_dim(doc_head)}: scores need the same width"
    )
  return SparseEncoder(
    cfg, query.model, query_head, doc_backbone=doc.model if separate else None, doc_head=doc_head, skip_ids=skip_ids
  )


def _read_out(cfg: EncoderConfig, *loaded: hf_weights.Loaded) -> tuple[int, ...]:
  """Checks cfg.decoding against the backbone(s), sets `bidirectional`; returns the skip ids (BOS)."""
  unknown = sorted(set(cfg.decoding_kwargs) - _DECODING_KEYS)
  if unknown:
    raise ValueError(f"EncoderConfig.decoding_kwargs {unknown}: known keys {sorted(_DECODING_KEYS)}")
  if cfg.decoding_kwargs.get("token_ids", "target") not in decoding_lib.TOKEN_IDS:
    raise ValueError(f"EncoderConfig.decoding_kwargs token_ids must be one of {decoding_lib.TOKEN_IDS}")
  skip: set[int] = set()
  for ld in loaded:
    decoding_lib.check_mode(ld.model, cfg.decoding)
    if cfg.bidirectional:
      backbone_lib.set_bidirectional(ld.model, True)
    if backbone_lib.family_of(ld.model).decoder_only and cfg.decoding in _BOS_MODES:
      bos = ld.hf_config.get("bos_token_id")
      skip.update(int(i) for i in (bos if isinstance(bos, (list, tuple)) else [bos]) if i is not None)
    if special_rule(cfg, ld) == "positions":
      skip.update(int(i) for i in ld.tokenizer.special_ids)
  return tuple(sorted(skip))


def _flat_params(encoder: SparseEncoder) -> dict[str, np.ndarray]:
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(encoder, nnx.Param)):
    out[".".join(map(str, path))] = np.asarray(jax.device_get(var.get_value()))
  return out


def save_encoder(
  encoder: SparseEncoder, tokenizer: Tokenizer, path: str | os.PathLike, *, merge_lora: bool = False
) -> str:
  """Writes a self-contained encoder folder atomically (tmp folder + rename; local or gs://).

  Args:
    encoder: the encoder.
    tokenizer: its tokenizer (the backbone's tokenizer files are copied).
    path: the folder to write (replaced if it exists).
    merge_lora: fold LoRA adapters into the base kernels and write a plain
      encoder (its config has `lora` {}); the encoder itself is not changed.

  Returns:
    The folder path.
  """
  del tokenizer  # its files are the backbone's, copied below
  params, config = _flat_params(encoder), encoder.config
  if merge_lora and config.lora:
    params = {
      k: np.asarray(v) for k, v in lora_lib.merged_flat_params(params, lora_lib.scales_by_path(encoder)).items()
    }
    config = dataclasses.replace(config, lora={})
  with io_utils.atomic_directory(path) as tmp:
    (tmp / PARAMS_NAME).write_bytes(safetensors.numpy.save(params))
    saved = {**config.to_dict(), "backbone": backbone_identity(config.backbone)}  # not this machine's path
    (tmp / CONFIG_NAME).write_text(json.dumps(saved, indent=2))
    backbone_dir = epath.Path(hf_weights.resolve(encoder.config.backbone))
    for name in BACKBONE_FILES:
      if (backbone_dir / name).exists():
        (backbone_dir / name).copy(tmp / name)
  return os.fspath(path)


def load_encoder(path_or_id: str | os.PathLike, **overrides: Any) -> tuple[SparseEncoder, Tokenizer]:
  """Loads an encoder folder written by `save_encoder`, or builds a fresh one.

  Args:
    path_or_id: a saved encoder folder (has encoder_config.json; local or gs://), or a
      backbone folder / hub id (then a fresh head is built from `overrides`).
    **overrides: EncoderConfig fields (head, latent_dim, ...).

  Returns:
    (encoder, tokenizer).

  Raises:
    CheckpointError: unreadable parameters, or parameters that do not match the config
      (names the file and the tensor).
  """
  p = os.fspath(path_or_id)
  folder = epath.Path(p)
  if not (folder / CONFIG_NAME).exists():
    return build_encoder(EncoderConfig(**{"backbone": p, **overrides}))
  d = legacy_read_out(json.loads((folder / CONFIG_NAME).read_text()))
  d.update(overrides)
  # The folder carries the backbone config and tokenizer.
  d["backbone"] = p if io_utils.is_local(p) else local_folder(folder)
  cfg = EncoderConfig.from_dict(d)
  params_file = folder / PARAMS_NAME
  saved = legacy_names(read_params(params_file), heads_lib.uses_vocab(cfg.head))
  encoder, tok = build_encoder(cfg, weights=False)
  flat = nnx.to_flat_state(nnx.state(encoder, nnx.Param))
  expected = {".".join(map(str, path)) for path, _ in flat}
  if expected != set(saved):
    raise hf_weights.CheckpointError(
      f"{params_file}: parameters do not match the config: missing {sorted(expected - set(saved))[:3]}, "
      f"unexpected {sorted(set(saved) - expected)[:3]}"
    )
  for path, var in flat:
    name = ".".join(map(str, path))
    arr = saved[name]
    if arr.shape != tuple(var.get_value().shape):
      raise hf_weights.CheckpointError(
        f"{params_file}: {name} has shape {arr.shape}, expected {tuple(var.get_value().shape)}"
      )
    var.set_value(jnp.asarray(arr))
  return encoder, tok
