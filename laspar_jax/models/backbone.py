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
`lm_head` and `checkpoint_names` (HF tensor name -> our parameter path),
the last living beside the model (e.g. `bert.py`). A family module calls
`register(Family(...))` at import; `hf_weights.load` dispatches on
config.json's `model_type` through `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
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
    params: canonical HF name -> (our parameter path, transform). Several names
      may target one path (aliases): the first listed that the checkpoint holds wins.
    canonical: raw tensor name -> canonical name (strips prefixes, renames aliases).
    ignored: canonical names matching it are skipped (pooler, position ids, ...).
    optional: first elements of parameter paths (e.g. "lm_head") whose tensors
      may be absent all together (the fresh initialisation is kept); if some are
      present, all are required. Only a family whose fresh head is by design
      (BERT's MLM transform over tied embeddings) lists one: decoder LM heads
      are tied or loaded, never drawn.
  """

  params: Mapping[str, tuple[tuple[str | int, ...], Transform]]
  canonical: Callable[[str], str]
  ignored: re.Pattern
  optional: tuple[str, ...] = ()


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
    checkpoint_names: (config, *, lm_head: bool) -> CheckpointNames.
  """

  name: str
  model_types: tuple[str, ...]
  config_from_hf: Callable[[dict[str, Any]], Any]
  build: Callable[..., nnx.Module]
  lm_head: Callable[..., nnx.Module]
  checkpoint_names: Callable[..., CheckpointNames]


FAMILIES: dict[str, Family] = {}


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
