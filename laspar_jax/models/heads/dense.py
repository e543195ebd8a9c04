"""Dense head (ablation): a pooled hidden state, no sparsity."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax.models.heads.pooling import l2_normalize


class DenseHead(nnx.Module):
  """Pooled hidden state, no sparsity: mean over unmasked tokens (or CLS), L2-normalized."""

  needs = ("d",)  # what `make_head` must provide
  accepts: tuple[str, ...] = ()
  uses_projection = False
  per_token = True  # one state per input token (single_token read-out)

  def __init__(self, d: int, *, pooling: str = "mean", normalize: bool = True):
    if pooling not in ("mean", "cls"):
      raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    self.d = d
    self.pooling = pooling
    self.normalize = normalize

  @property
  def output_dim(self) -> int:
    return self.d

  def __call__(
    self,
    h_btd: jax.Array,
    mask_bt: jax.Array,
    ids_bt: jax.Array | None = None,
    *,
    projection: Any = None,
    topk: int | None = None,
  ) -> jax.Array:
    """e_bd float32 [B, d]. ids_bt, projection and topk are accepted and ignored (dense)."""
    del ids_bt, projection, topk
    h = h_btd.astype(jnp.float32)
    if self.pooling == "cls":
      e = h[:, 0]
    else:
      m = mask_bt.astype(jnp.float32)
      e = jnp.einsum("bt,btd->bd", m, h) / jnp.maximum(m.sum(1, keepdims=True), 1.0)
    return l2_normalize(e) if self.normalize else e
