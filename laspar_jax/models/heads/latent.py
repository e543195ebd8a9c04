"""LASPAR latent heads: h_btd -> rep_bv over a learned latent space of width D.

- `LatentAttentionHead` (LASPAR default): pool tokens with learned weights a_t,
  then s = log1p(relu(pool(h) U + b)), clamp, L2 normalize.
- `LatentSumHead`: sum_t (h_t U + b) over unmasked tokens computed as ONE
  projection of the summed hidden state (linear before the nonlinearity), then
  log1p relu, clamp, L2 normalize.
- `LatentMaxHead`: s_j = max_t log1p(relu(h_t U_j + b_j)) over unmasked tokens,
  tiled over D (and optionally L): never B x L x D (`tiled.token_pool`).

U [d, D] carries the logical axes ("embed", "sparse") and b [D] ("sparse",), so
`mesh.shard_model` puts the D axis on the mesh 'model' axis.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax.mesh import constrain
from laspar_jax.models import layers
from laspar_jax.models.heads import tiled
from laspar_jax.models.heads.pooling import l2_normalize, log_relu, masked_softmax


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal_rows(key: jax.Array, d: int, D: int, std: float) -> jax.Array:
  # One row of D at a time: peak = the [d, D] output + a few rows of temporaries
  # (jax.random.normal on the whole [d, D] peaks at about 4x the kernel).
  row = lambda i: std * jax.random.normal(jax.random.fold_in(key, i), (D,), jnp.float32)
  return jax.lax.map(row, jnp.arange(d))


def init_projection(key: jax.Array, d: int, D: int, std: float | None = None) -> jax.Array:
  """N(0, std^2) kernel [d, D] generated row by row (cheap peak memory).

  Args:
    key: PRNG key.
    d: input width.
    D: output (latent) width.
    std: standard deviation; default 1/sqrt(d).

  Returns:
    float32 [d, D].
  """
  std = 1.0 / math.sqrt(d) if std is None else float(std)
  return _normal_rows(key, d, D, std)


class _LatentHead(nnx.Module):
  """Shared U [d, D], b [D], clamp, normalization and top-k logic."""

  needs = ("d", "D", "rngs")  # what `make_head` must provide
  accepts: tuple[str, ...] = ()
  uses_projection = False
  per_token = True  # one state per input token (single_token read-out)

  def __init__(
    self,
    d: int,
    D: int,
    *,
    rngs: nnx.Rngs,
    bias_init: float = 3.0,
    clamp: float | None = 10.0,
    normalize: bool = True,
    kernel_std: float | None = None,
    dtype: Any = jnp.float32,
  ):
    self.d, self.D = d, D
    self.kernel = layers.param(init_projection(rngs.params(), d, D, kernel_std), ("embed", "sparse"))
    self.bias = layers.param(jnp.full((D,), bias_init, jnp.float32), ("sparse",))
    self.clamp = clamp
    self.normalize = normalize
    self.dtype = dtype

  @property
  def output_dim(self) -> int:
    return self.D

  # Subclasses define the activations at all D columns and at gathered columns.
  def scores(self, h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    raise NotImplementedError

  def scores_at(self, h_btd: jax.Array, mask_bt: jax.Array, idx_bk: jax.Array) -> jax.Array:
    raise NotImplementedError

  def _clamp(self, s):
    return s if self.clamp is None else jnp.minimum(s, self.clamp)

  def __call__(
    self,
    h_btd: jax.Array,
    mask_bt: jax.Array,
    ids_bt: jax.Array | None = None,
    *,
    projection: Any = None,
    topk: int | None = None,
    topk_mode: str = "gather",
  ) -> jax.Array:
    """rep_bv (float32 [B, D]).

    Args:
      h_btd: backbone hidden states [B, L, d].
      mask_bt: [B, L] attention mask.
      ids_bt: token ids (unused by latent heads).
      projection: a vocabulary projection (unused by latent heads).
      topk: keep each row's top-k activations (before normalization, which then
        runs over the kept entries only). None: keep all.
      topk_mode: "gather": choose indices on stop-gradient scores and recompute
        the kept values from gathered columns U[:, idx_bk] (the backward pass
        touches only k columns per row); "mask": mask the dense activations.
        Both give the same values and gradients.

    Returns:
      float32 [B, D].
    """
    del ids_bt, projection
    if topk is None or topk >= self.D:
      s = self._clamp(self.scores(h_btd, mask_bt))
    elif topk_mode == "mask":
      s = tiled.topk_mask(self._clamp(self.scores(h_btd, mask_bt)), topk)
    elif topk_mode == "gather":
      idx_bk = tiled.topk_indices(self._clamp(self.scores(h_btd, mask_bt)), topk)
      s_bk = self._clamp(self.scores_at(h_btd, mask_bt, idx_bk))
      s = tiled.scatter_rows(s_bk, idx_bk, self.D)
    else:
      raise ValueError(f"topk_mode must be 'gather' or 'mask', got {topk_mode!r}")
    s = constrain(s.astype(jnp.float32), ("batch", "sparse"))
    return l2_normalize(s) if self.normalize else s


class _PooledLatentHead(_LatentHead):
  """Heads that pool h first and project once: z = x_bd U + c_b b."""

  def pooled(self, h_btd: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_bd, c_b): pooled hidden state and the bias multiplier."""
    raise NotImplementedError

  def scores(self, h_btd, mask_bt):
    x_bd, c_b = self.pooled(h_btd, mask_bt)
    z = jnp.dot(x_bd.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
    z = constrain(z, ("batch", "sparse")) + c_b[:, None] * self.bias[...]
    return log_relu(z)

  def scores_at(self, h_btd, mask_bt, idx_bk):
    x_bd, c_b = self.pooled(h_btd, mask_bt)
    k_dbk = jnp.take(self.kernel[...], idx_bk, axis=1)
    z = jnp.einsum("bd,dbk->bk", x_bd.astype(self.dtype), k_dbk.astype(self.dtype), preferred_element_type=jnp.float32)
    return log_relu(z + c_b[:, None] * jnp.take(self.bias[...], idx_bk))


class LatentAttentionHead(_PooledLatentHead):
  """LASPAR head: s = normalize(clamp(log1p(relu(sum_t a_t h_t U + b)))).

  Pooling weights a_t (all start as mean pooling: zero logits):
    "position": one learned logit per position, softmax over ALL positions
      (padding included: the original LASPAR behaviour, kept as an option);
    "mask" (default): per-position logits, softmax over unmasked tokens;
    "content": logits h_t . v with a learned vector v, softmax over unmasked.

  Initialization of U: N(0, kernel_std^2) with kernel_std = 1/sqrt(d) by
  default, so x U_j ~ N(0, ||x||^2 / d): its scale is the RMS of the pooled
  hidden state's coordinates. With b = 3, s_j = log(4 + x U_j) (for x U_j > -3):
  when x U_j is much smaller than 3 every dim sits at log 4 and all documents
  look alike (dense, uninformative); when it is comparable to 3 the
  representation varies with the input and a share of the dims is already 0.
  Pass a larger kernel_std for backbones whose pooled states are small (e.g.
  MiniLM's mean-pooled states have an RMS well below 1).
  """

  def __init__(
    self,
    d: int,
    D: int,
    *,
    pooling: str = "mask",
    max_len: int = 512,
    rngs: nnx.Rngs,
    bias_init: float = 3.0,
    clamp: float | None = 10.0,
    normalize: bool = True,
    kernel_std: float | None = None,
    dtype: Any = jnp.float32,
  ):
    super().__init__(
      d, D, rngs=rngs, bias_init=bias_init, clamp=clamp, normalize=normalize, kernel_std=kernel_std, dtype=dtype
    )
    if pooling not in ("mask", "position", "content"):
      raise ValueError(f"pooling must be 'mask', 'position' or 'content', got {pooling!r}")
    self.pooling = pooling
    self.max_len = max_len
    if pooling == "content":
      self.score_vec = layers.param(jnp.zeros((d,), jnp.float32), ("embed",))
    else:
      self.pos_logits = layers.param(jnp.zeros((max_len,), jnp.float32), ("length",))

  def weights(self, h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Pooling weights a_bt (rows sum to 1, or 0 when a row has no token)."""
    L = h_btd.shape[1]
    if self.pooling == "content":
      logits = jnp.einsum("btd,d->bt", h_btd.astype(jnp.float32), self.score_vec[...])
      return masked_softmax(logits, mask_bt)
    if L > self.max_len:
      raise ValueError(f"sequence length {L} > max_len {self.max_len}")
    logits = jnp.broadcast_to(self.pos_logits[...][:L], h_btd.shape[:2])
    return masked_softmax(logits, None if self.pooling == "position" else mask_bt)

  def pooled(self, h_btd, mask_bt):
    a_bt = self.weights(h_btd, mask_bt)
    x_bd = jnp.einsum("bt,btd->bd", a_bt, h_btd.astype(jnp.float32))
    return x_bd, jnp.ones((h_btd.shape[0],), jnp.float32)


class LatentSumHead(_PooledLatentHead):
  """sum_t (h_t U + b) over unmasked tokens = (sum_t h_t) U + n_tokens * b, one projection.

  Then log1p relu, clamp, L2 normalize. Equal to projecting every token and
  summing (the original "token-level upscaling followed by addition"), without
  the [B, L, D] tensor.
  """

  def pooled(self, h_btd, mask_bt):
    m = mask_bt.astype(jnp.float32)
    return jnp.einsum("bt,btd->bd", m, h_btd.astype(jnp.float32)), jnp.sum(m, axis=1)


class LatentMaxHead(_LatentHead):
  """s_j = max over unmasked t of log1p(relu(h_t U_j + b_j)); clamp; L2 normalize.

  Computed as log1p(relu(max_t (h_t U_j + b_j))) in strided D tiles of width
  `tile`, optionally scanning L in chunks of `token_chunk`: peak memory
  O(B*D + B*L*tile), never B x L x D. tile=None is the untiled path (tests,
  small D). backward="argmax" (default) replaces the rematerialized backward by
  an argmax-based custom VJP (see `tiled.token_pool`); "remat" is plain
  autodiff with jax.checkpoint (used whenever token_chunk is set).
  """

  def __init__(
    self,
    d: int,
    D: int,
    *,
    rngs: nnx.Rngs,
    tile: int | None = 4096,
    token_chunk: int | None = None,
    backward: str = "argmax",
    bias_init: float = 3.0,
    clamp: float | None = 10.0,
    normalize: bool = True,
    kernel_std: float | None = None,
    dtype: Any = jnp.float32,
  ):
    super().__init__(
      d, D, rngs=rngs, bias_init=bias_init, clamp=clamp, normalize=normalize, kernel_std=kernel_std, dtype=dtype
    )
    self.tile = tile
    self.token_chunk = token_chunk
    self.backward = backward

  def scores(self, h_btd, mask_bt):
    return tiled.token_pool(
      h_btd,
      mask_bt,
      self.kernel[...],
      self.bias[...],
      reduce="max",
      tile=self.tile,
      token_chunk=self.token_chunk,
      backward=self.backward,
      dtype=self.dtype,
    )

  def scores_at(self, h_btd, mask_bt, idx_bk):
    return tiled.token_pool_at(h_btd, mask_bt, self.kernel[...], self.bias[...], idx_bk, reduce="max", dtype=self.dtype)
