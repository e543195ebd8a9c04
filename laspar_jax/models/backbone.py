"""The backbone contract and the registry of model families (keyed by Hugging Face `model_type`).

A *backbone* is an `nnx.Module` that turns token ids into hidden states:

  backbone(input_ids_bl, attention_mask_bl, *, deterministic=True, rngs=None) -> h_btd

in its compute dtype (`backbone.dtype`), with properties `hidden_size`,
`vocab_size` and `pad_id`, and `vocab_projection()`, its vocabulary head
(`VocabProjection`: BERT's MLM head, a decoder's LM head), kept as the
attribute `lm_head` when the backbone was built with one
(`hf_weights.load(..., lm_head=True)`). A tied projection holds a reference to
the word embedding variable itself, so NNX keeps one shared parameter and
gradients reach the embeddings.

A *family* says how to build one kind of backbone and read its Hugging Face
checkpoints: `config_from_hf` (config.json -> the model's config), `build`,
`lm_head` and `checkpoint_names` (HF tensor name -> our parameter path, in
the family's `*_params.py` beside the model), and everything the rest of the
library asks about a family: whether it is decoder-only, the read-out modes
it allows (`decoding.MODES`), its default LoRA targets, the GGUF
architectures it reads, its known hub configs and its special-token rule.
A new family is one model file, one name-map file and its `register(Family(...))`
call; `BUILTIN` names the modules imported on the first registry lookup
(`family_for_type`, `family_of`, `families`), so no caller imports a family
module for its side effect.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]


@runtime_checkable
class VocabProjection(Protocol):
  """Maps hidden states to vocabulary logits: transform(h) @ kernel_dv() + bias_v()."""

  def transform(self, h_btd: jax.Array) -> jax.Array:
    """[B, T, d] -> [B, T, d] float32 (BERT: dense, exact gelu, LayerNorm; LM heads: identity)."""

  def kernel_dv(self) -> jax.Array:
    """[d, V] (tied: the word embedding table transposed)."""

  def bias_v(self) -> jax.Array | None:
    """[V] or None."""


@runtime_checkable
class Backbone(Protocol):
  """What sparse heads and encoders may rely on (see the module docstring)."""

  dtype: Any

  @property
  def hidden_size(self) -> int: ...

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array: ...

  def vocab_projection(self) -> VocabProjection:
    """The vocabulary head; ValueError when the backbone was built without one."""


class ConfigBacked:
  """Mixin for family models: the contract's `vocab_size`, `pad_id` and `vocab_projection`
  read from `self.config` (HF field names) and the optional `self.lm_head`."""

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def pad_id(self) -> int:
    return self.config.pad_token_id

  def vocab_projection(self):
    """The vocabulary (MLM / LM) head; ValueError when the model was built without one."""
    if self.lm_head is None:
      raise ValueError(
        f"this {type(self).__name__} has no vocabulary head; load it with hf_weights.load(..., lm_head=True)"
      )
    return self.lm_head


def transpose(a: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> our kernel [in, out]."""
  return a.T


def identity(a: np.ndarray) -> np.ndarray:
  """Tensors stored as we keep them (embeddings, norms, biases)."""
  return a


@dataclasses.dataclass(frozen=True)
class CheckpointNames:
  """How a family's checkpoint tensors map onto its parameters.

  Attributes:
    params: canonical HF name -> (our parameter path, transform) or, for a
      parameter stacked over layers (a leading "layers" axis, `layers.Stacked`),
      (path, transform, row): the loader stacks the rows. Several names may
      target one path (aliases): the first listed that the checkpoint holds wins.
    canonical: raw tensor name -> canonical name (strips prefixes, renames aliases).
    ignored: canonical names matching it are skipped (pooler, position ids, ...).
    optional: first elements of parameter paths (e.g. "lm_head") whose tensors
      may be absent all together (the fresh initialisation is kept); if some are
      present, all are required. Only a family whose fresh head is by design
      (BERT's MLM transform over tied embeddings) lists one: decoder LM heads
      are tied or loaded, never drawn.
  """

  params: Mapping[str, tuple]
  canonical: Callable[[str], str]
  ignored: re.Pattern
  optional: tuple[str, ...] = ()


SPECIAL_RULES = ("keep", "positions")


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  Attributes:
    name: short name ("bert").
    model_types: config.json `model_type` values it serves.
    config_from_hf: config.json dict -> the model's config (raises ValueError on bad values).
    build: (config, *, rngs, dtype, remat, attention_impl) -> backbone without `lm_head`.
    lm_head: (backbone, config, *, rngs) -> its VocabProjection, freshly initialised
      (tied to the backbone's embeddings when the config ties them).
    checkpoint_names: (config, *, lm_head: bool) -> CheckpointNames (the family's name-map module).
    model_class: the class `build` returns (`family_of(model)` looks it up).
    decoder_only: a causal LM (its read-outs skip BOS; `set_bidirectional` applies).
    modes: the read-out modes of `decoding.MODES` it allows ("plain" always).
    lora_targets: default LoRA target attribute names (every attention and MLP projection).
    gguf_architectures: GGUF `general.architecture` -> (model_type, whether llama.cpp
      permuted the q/k rows).
    known_configs: hub id -> config.json dict of models that build abstractly without a download.
    special_tokens: the reference's rule for special tokens in sparse read-outs: "keep"
      (T5: special ids are ordinary dims) or "positions" (BERT, OPT, Llama: special
      positions are not pooled).
    attention_shape: config -> (head dim, whether a bias is added to the logits): what
      `platform.attention_impl` weighs to pick cuDNN's fused attention (None: unknown).
  """

  name: str
  model_types: tuple[str, ...]
  config_from_hf: Callable[[dict[str, Any]], Any]
  build: Callable[..., nnx.Module]
  lm_head: Callable[..., nnx.Module]
  checkpoint_names: Callable[..., CheckpointNames]
  model_class: type | None = None
  decoder_only: bool = False
  modes: tuple[str, ...] = ("plain",)
  lora_targets: tuple[str, ...] = ()
  gguf_architectures: Mapping[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)
  known_configs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  special_tokens: str = "positions"
  attention_shape: Callable[[Any], tuple[int, bool]] | None = None

  def __post_init__(self):
    if self.special_tokens not in SPECIAL_RULES:
      raise ValueError(f"family {self.name!r}: special_tokens must be one of {SPECIAL_RULES}")
    if "plain" not in self.modes:
      raise ValueError(f"family {self.name!r}: modes must include 'plain'")


FAMILIES: dict[str, Family] = {}  # model_type -> Family
BUILTIN = ("bert", "t5", "opt", "llama")  # modules under laspar_jax.models that register a family


def register(family: Family) -> Family:
  """Adds `family` to FAMILIES under each of its model types.

  Raises:
    ValueError: a model type is already served by another family.
  """
  for model_type in family.model_types:
    other = FAMILIES.get(model_type)
    if other is not None and other.name != family.name:
      raise ValueError(f"model_type {model_type!r} is already served by family {other.name!r}")
    FAMILIES[model_type] = family
  return family


def families() -> dict[str, Family]:
  """FAMILIES (model_type -> Family) with the built-in families registered."""
  for module in BUILTIN:
    importlib.import_module(f"laspar_jax.models.{module}")
  return FAMILIES


def family_for_type(model_type: str) -> Family:
  """The family serving a config.json `model_type`; KeyError (listing the known ones) if none."""
  fams = families()
  if model_type not in fams:
    raise KeyError(f"model_type {model_type!r} is not supported; known: {sorted(fams)}")
  return fams[model_type]


def family_named(name: str) -> Family:
  """The family called `name` ("bert", "t5", ...) or serving the model_type `name`; KeyError if none."""
  fams = families()
  for fam in fams.values():
    if fam.name == name:
      return fam
  if name in fams:
    return fams[name]
  raise KeyError(f"no model family {name!r}; known: {sorted({f.name for f in fams.values()})}")


def family_of(model: Any) -> Family:
  """The family of a backbone instance (by its registered `model_class`); KeyError if none."""
  for fam in families().values():
    if fam.model_class is not None and isinstance(model, fam.model_class):
      return fam
  raise KeyError(f"{type(model).__name__} is not the model class of a registered family")


def known_config(hub_id: str) -> dict[str, Any] | None:
  """A copy of the config.json dict a family knows for `hub_id`, or None."""
  for fam in families().values():
    if hub_id in fam.known_configs:
      return copy.deepcopy(dict(fam.known_configs[hub_id]))
  return None


def gguf_architecture(arch: str) -> tuple[str, bool] | None:
  """(model_type, q/k rows permuted) of a GGUF `general.architecture`, or None."""
  for fam in families().values():
    if arch in fam.gguf_architectures:
      return fam.gguf_architectures[arch]
  return None


def set_bidirectional(model: nnx.Module, on: bool) -> None:
  """Makes a decoder-only backbone's self-attention bidirectional (True) or causal (False), in place.

  As building it with `config.bidirectional = on` (the config is replaced too):
  every submodule with a `causal` attribute gets `causal = not on`.

  Raises:
    ValueError: the backbone's family is not decoder-only.
  """
  fam = family_of(model)
  if not fam.decoder_only:
    raise ValueError(f"bidirectional attention is an option of decoder-only backbones, not the {fam.name!r} family")
  model.config = dataclasses.replace(model.config, bidirectional=bool(on))
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(node, "causal"):
      node.causal = not on
