"""The MLP term-weighting head (no expansion): one weight per input token, placed at its id.

w_t = relu(h_t k + c) for each unmasked input token t (k [d, 1], c [1]: a
Linear d -> 1), scattered into the vocabulary at the token's id ids_bt[t];
repeated ids are pooled by "sum" (queries, as the reference) or "max"
(documents). Only the input's own ids can be non-zero (term weighting, no
expansion). The scatter writes into a [B, V] zeros array (`.at[b, ids].add` /
`.at[b, ids].max`): never B x L x V. Masked positions and `special_ids`
contribute nothing. On a shared backbone the query and document MLP heads
share one Linear (`sparse_encoder`), as the reference's single encoder; each
side keeps its pooling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laspar_jax.mesh import constrain
from laspar_jax.models import layers
from laspar_jax.models.heads import tiled


class MLPHead(nnx.Module):
  """rep_bv[b, ids_bt[b, t]] = pool_t relu(Linear(h_bt)) over unmasked, non-special tokens.

  Args (constructor):
    d: backbone width.
    vocab: V (output width).
    rngs: nnx.Rngs for the Linear's kernel.
    special_ids: token ids that get no weight (their dims stay 0).
    pooling: "sum" (queries) or "max" (documents) over repeated ids.
    kernel_std: std of the N(0, std^2) kernel init; default 1/sqrt(d) (as the
      latent heads), so h_t k has the scale of h_t's coordinates.
    bias_init: initial bias c.
    dtype: compute dtype of the projection (accumulated in float32).

  Parameters: `linear.kernel` [d, 1] (logical axes ("embed", None)) and
  `linear.bias` [1], float32.
  """

  needs = ("d", "vocab", "rngs")  # what `make_head` must provide
  accepts = ("special_ids",)  # provided by `make_head` when given (kwargs override)
  uses_projection = False
  per_token = True  # weights each pooled token at its id

  def __init__(
    self,
    d: int,
    *,
    vocab: int,
    rngs: nnx.Rngs,
    special_ids: Sequence[int] = (),
    pooling: str = "sum",
    kernel_std: float | None = None,
    bias_init: float = 0.0,
    dtype: Any = jnp.float32,
  ):
    if pooling not in ("sum", "max"):
      raise ValueError(f"pooling must be 'sum' or 'max', got {pooling!r}")
    self.d, self.vocab = d, vocab
    self.pooling = pooling
    self.special_ids = tuple(int(i) for i in np.asarray(special_ids).reshape(-1))
    std = 1.0 / math.sqrt(d) if kernel_std is None else float(kernel_std)
    self.linear = layers.Dense(d, 1, axes=("embed", None), std=std, rngs=rngs)
    self.linear.bias[...] = jnp.full((1,), bias_init, jnp.float32)
    self.dtype = dtype

  @property
  def output_dim(self) -> int:
    return self.vocab

  def token_weights(self, h_btd: jax.Array, mask_bt: jax.Array, ids_bt: jax.Array) -> jax.Array:
    """w_bt float32 [B, L]: relu(Linear(h_t)), 0 at masked positions and special ids."""
    z_bt = (
      jnp.dot(
        h_btd.astype(self.dtype), self.linear.kernel[...][:, 0].astype(self.dtype), preferred_element_type=jnp.float32
      )
      + self.linear.bias[...][0]
    )
    keep_bt = mask_bt.astype(bool)
    if self.special_ids:
      keep_bt = keep_bt & ~jnp.isin(ids_bt, jnp.asarray(self.special_ids, ids_bt.dtype))
    return jnp.where(keep_bt, jax.nn.relu(z_bt), 0.0)

  def __call__(
    self,
    h_btd: jax.Array,
    mask_bt: jax.Array,
    ids_bt: jax.Array | None = None,
    *,
    projection: Any = None,
    topk: int | None = None,
  ) -> jax.Array:
    """rep_bv float32 [B, V].

    Args:
      h_btd: hidden states [B, L, d] (one per input token).
      mask_bt: [B, L], nonzero for tokens to weight.
      ids_bt: int [B, L] token ids, where each weight is placed (required).
      projection: a vocabulary projection (unused: no expansion).
      topk: keep each row's top-k entries (training-time masking); None keeps all.

    Returns:
      float32 [B, V]; zero outside the row's (non-special, unmasked) ids.
    """
    del projection
    if ids_bt is None:
      raise ValueError("MLPHead needs ids_bt (the token ids its weights are placed at)")
    if ids_bt.shape != mask_bt.shape or h_btd.shape[:2] != mask_bt.shape:
      raise ValueError(f"h {h_btd.shape[:2]}, mask {mask_bt.shape} and ids {ids_bt.shape} must share [B, L]")
    w_bt = self.token_weights(h_btd, mask_bt, ids_bt)
    B = w_bt.shape[0]
    b_bt = jnp.broadcast_to(jnp.arange(B)[:, None], ids_bt.shape)
    # Weights are >= 0 and every zero is a no-op for both add and max into zeros.
    at = jnp.zeros((B, self.vocab), jnp.float32).at[b_bt, ids_bt]
    rep = at.add(w_bt, mode="drop") if self.pooling == "sum" else at.max(w_bt, mode="drop")
    rep = constrain(rep, ("batch", "sparse"))
    return tiled.topk_mask(rep, topk) if topk else rep
