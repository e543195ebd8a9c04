"""The vocabulary (SPLADE / MLM / LM) head over a backbone's vocabulary projection.

w_bv = pool_t log1p(relu(transform(h_t) W + c)) over unmasked tokens, pool =
max or sum, with W [d, V] and c [V] the backbone's vocabulary projection
(`backbone.vocab_projection()`: BERT's `cls.predictions`, tied or not to the
word embeddings; identity transform for plain LM heads). The projection is
passed to each call (`head(h, mask, ids, projection=backbone.lm_head)`), as
`SparseEncoder` does for every head: the head then holds no module of the
backbone, so any head may sit on either side of a shared backbone, and the
parameters live once, in the backbone, under `lm_head` (gradients reach them
and the tied embeddings). A standalone head may hold one instead
(`VocabHead(projection, vocab=...)`). The vocabulary is processed in strided
tiles (`tiled.token_pool`): never B x L x V. Dims of `special_ids` are zeroed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laspar_jax.models.backbone import VocabProjection
from laspar_jax.models.heads import tiled


class VocabHead(nnx.Module):
  """SPLADE head on a vocabulary projection: rep_bv = pool_t log1p(relu(logit_tv)).

  The projection is any module with `transform(h_btd) -> t_btd` (float32),
  `kernel_dv() -> [d, V]` and `bias_v() -> [V] | None` (`backbone.VocabProjection`).

  Args (constructor):
    projection: a projection held by reference (standalone use), or None: given
      to each call (`projection=`), as `SparseEncoder` does.
    vocab: V.
    special_ids: token ids whose dims are zeroed.
    pooling: "max" or "sum" over unmasked tokens.
    tile, token_chunk, backward, dtype: see `tiled.token_pool`.
  """

  needs = ("vocab",)  # what `make_head` must provide
  accepts = ("special_ids",)  # provided by `make_head` when given (kwargs override)
  uses_projection = True  # pools the backbone's vocabulary logits
  per_token = False  # reads pooled states' logits; the pooled ids do not matter

  def __init__(
    self,
    projection: VocabProjection | None = None,
    *,
    vocab: int,
    special_ids: Sequence[int] = (),
    pooling: str = "max",
    tile: int | None = 8192,
    token_chunk: int | None = None,
    backward: str = "argmax",
    dtype: Any = jnp.float32,
  ):
    if pooling not in ("max", "sum"):
      raise ValueError(f"pooling must be 'max' or 'sum', got {pooling!r}")
    self.projection = projection
    self.vocab = vocab
    self.pooling = pooling
    self.special_ids = tuple(int(i) for i in np.asarray(special_ids).reshape(-1))
    self.tile = tile
    self.token_chunk = token_chunk
    self.backward = backward
    self.dtype = dtype

  @property
  def output_dim(self) -> int:
    return self.vocab

  def __call__(
    self,
    h_btd: jax.Array,
    mask_bt: jax.Array,
    ids_bt: jax.Array | None = None,
    *,
    projection: VocabProjection | None = None,
    topk: int | None = None,
  ) -> jax.Array:
    """rep_bv float32 [B, V].

    Args:
      h_btd: backbone hidden states [B, L, d].
      mask_bt: [B, L] attention mask.
      ids_bt: token ids (unused).
      topk: keep each row's top-k entries (training-time masking); None keeps all.
      projection: the vocabulary projection (default: the one held).

    Returns:
      float32 [B, V]; special ids are 0.
    """
    del ids_bt
    projection = self.projection if projection is None else projection
    if projection is None:
      raise ValueError("this VocabHead holds no projection: pass projection= (the backbone's lm_head)")
    t_btd = projection.transform(h_btd)
    w_dv = projection.kernel_dv()
    if w_dv.shape[1] != self.vocab:
      raise ValueError(f"the vocabulary projection has {w_dv.shape[1]} columns, the head expects vocab={self.vocab}")
    b_v = projection.bias_v()
    if b_v is None:
      b_v = jnp.zeros((self.vocab,), jnp.float32)
    rep = tiled.token_pool(
      t_btd,
      mask_bt,
      w_dv,
      b_v,
      reduce=self.pooling,
      tile=self.tile,
      token_chunk=self.token_chunk,
      backward=self.backward,
      dtype=self.dtype,
    )
    if self.special_ids:
      keep = jnp.ones((self.vocab,), jnp.float32).at[jnp.array(self.special_ids)].set(0.0)
      rep = rep * keep
    return tiled.topk_mask(rep, topk) if topk else rep
