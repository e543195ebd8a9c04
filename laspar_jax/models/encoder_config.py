"""`EncoderConfig`: how to build a sparse encoder (every field JSON-able), and its content fingerprint.

The fingerprint is stored in index manifests: an index is searched only with the encoder it was built with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from etils import epath

from laspar_jax.models import heads as heads_lib
from laspar_jax.models.encoder_files import CONFIG_NAME


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """How to build a sparse encoder (all fields JSON-able).

  Attributes:
    backbone: HF folder or hub id of the backbone.
    head: the query head, a name of `heads.HEADS` (also the document head by default).
    latent_dim: D of latent heads (ignored by mlm/dense).
    head_kwargs: extra constructor arguments of the head (pooling, tile, ...).
    towers: "shared" (one backbone) or "separate" (query and document backbones).
    query_prefix / doc_prefix: prepended to the texts before tokenization.
    query_max_len / doc_max_len: truncation lengths.
    dtype: compute dtype, "float32" or "bfloat16" (params stay fp32).
    remat: rematerialize backbone layers in the backward pass.
    remat_policy: what a rematerialized layer keeps (`layers.REMAT_POLICIES`): "full" (nothing,
      the least memory), "dots" (matmul outputs without batch dims: the projections and MLP),
      "dots_all" (every matmul output, attention's too); read when `remat` is on.
    scan_layers: stack the backbone's layers and run them with `lax.scan` (one compiled layer:
      deep stacks compile in the time of one layer; parameters then carry a leading "layers"
      axis, so a checkpoint of one layout does not restore into the other). False keeps the
      backbone config.json's own `scan_layers` (False when absent).
    seed: head initialisation seed (the document head, when it is its own, uses seed + 1).
    doc_head: the document head ("" = the query head's name and kwargs).
    doc_head_kwargs: constructor arguments of the document head; used when
      `doc_head` or this is set (else the document side copies the query side).
    attention_impl: attention implementation of the backbone ("auto", "xla", "cpu", "cudnn"; `platform.attention_impl`).
    lora: LoRA adapters on the backbone(s) ({} = none): {"rank": 16, "alpha": 32,
      "dropout": 0.0, "targets": "default" or a list of attribute names}; the
      optimizer then freezes the rest of the backbone.
    decoding: the read-out mode, one of `decoding.MODES` ("plain", "multi_token",
      "single_token", "decoder_stack", "echo", "last_token"); in "single_token"
      non-vocabulary heads (mlp, latent) get one state per input token.
    decoding_kwargs: options of the read-out: {"drop_first": True, "mask_eos": False}
      (multi_token; the defaults are the reference's).
    bidirectional: bidirectional attention in a decoder-only backbone (OPT, Llama
      family; an error for the others).
    special_tokens: "family" (the reference's rule of the backbone's family), "dims",
      "positions" or "keep" (see the module docstring).
    matmul_precision: fp32 matmul precision of the jitted calls ("default", "tf32",
      "highest"; `platform.matmul_precision`), applied at the jit boundary.
    prompt: zero-shot prompt preset (`prompts.PRESETS`; "" = no prompt). Texts are
      composed with it by the tokenizer (`Tokenizer.encode_with_offsets`); the
      max lengths then count the prompt too, as the reference's.
    prompt_pool: "all" (pool over prompt + text positions, the reference's RQ1) or
      "text" (the text positions only).
    in_text_filter: keep only vocabulary ids occurring in the text (stop words removed;
      `prompts.InTextFilter`), the unfiltered weights when every kept one is 0.
    filter_match: "string" (a vocabulary id whose token string matches a text token's)
      or "id" (the text's own token ids, the reference's rule).
    term_cap: dims kept per text under the in-text filter (0 = every in-text term, the
      reference's; else at most this many).
    impacts: "float" (weights as computed) or "int100" (int(w * 100), as the reference
      writes zero-shot impacts).
  """

  backbone: str = "sentence-transformers/all-MiniLM-L6-v2"
  head: str = "latent_attention"
  latent_dim: int = 2**22
  head_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  towers: str = "shared"
  query_prefix: str = ""
  doc_prefix: str = ""
  query_max_len: int = 64
  doc_max_len: int = 256
  dtype: str = "float32"
  remat: bool = False
  seed: int = 0
  doc_head: str = ""
  doc_head_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  attention_impl: str = "auto"
  lora: dict[str, Any] = dataclasses.field(default_factory=dict)
  decoding: str = "plain"
  decoding_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  bidirectional: bool = False
  special_tokens: str = "family"
  matmul_precision: str = "default"
  prompt: str = ""
  prompt_pool: str = "all"
  in_text_filter: bool = False
  filter_match: str = "string"
  term_cap: int = 0
  impacts: str = "float"
  remat_policy: str = "full"
  scan_layers: bool = False

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
    """Short hash of the config (stored in index manifests).

    Fields added after the first release count only when they differ from
    their default, so existing fingerprints stay valid. It is the content, not
    the location: a backbone that is a saved encoder folder counts as the
    backbone its config names (`backbone_identity`), so a byte-identical copy
    of an encoder folder has the fingerprint of the original.
    """
    d = {k: v for k, v in self.to_dict().items() if k not in _NEW_FIELDS or v != _NEW_FIELDS[k]}
    if not self.vocab_dims():  # the special-token rule changes nothing for latent or dense heads
      d.pop("special_tokens", None)
    d["backbone"] = backbone_identity(self.backbone)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

  def vocab_dims(self) -> bool:
    """Whether the heads' dims are vocabulary ids (mlm, mlp): the special-token rule applies."""
    return any(
      "special_ids" in heads_lib.HEADS[name].accepts for name, _ in self.head_specs() if name in heads_lib.HEADS
    )

  def head_specs(self) -> tuple[tuple[str, dict[str, Any]], tuple[str, dict[str, Any]]]:
    """((query head name, kwargs), (document head name, kwargs))."""
    query = (self.head, dict(self.head_kwargs))
    if not self.doc_head and not self.doc_head_kwargs:
      return query, query
    return query, (self.doc_head or self.head, dict(self.doc_head_kwargs))


def backbone_identity(backbone: str, _depth: int = 0) -> str:
  """What a backbone is rather than where: a saved encoder folder gives the backbone its config names."""
  if _depth < 8 and backbone:
    try:
      cfg = epath.Path(backbone) / CONFIG_NAME
      if cfg.exists():
        return backbone_identity(str(json.loads(cfg.read_text())["backbone"]), _depth + 1)
    except (OSError, ValueError, KeyError, TypeError):
      pass
  return backbone


_NEW_FIELDS = {
  "doc_head": "",
  "doc_head_kwargs": {},
  "attention_impl": "auto",
  "lora": {},
  "decoding": "plain",
  "decoding_kwargs": {},
  "bidirectional": False,
  "special_tokens": "dims",  # the behaviour before the field existed: fingerprints of old configs stay
  "matmul_precision": "default",
  "prompt": "",
  "prompt_pool": "all",
  "in_text_filter": False,
  "filter_match": "string",
  "term_cap": 0,
  "impacts": "float",
  "remat_policy": "full",
  "scan_layers": False,
}
