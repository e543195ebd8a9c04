"""Pooling and normalization helpers shared by the heads (and the dense teacher).

All of them compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # pre-activation for masked tokens / padded columns (relu -> 0)


def mean_pool(h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Mean of the unmasked token states (sentence-transformers pooling).

  Args:
    h_btd: hidden states [B, T, d].
    mask_bt: [B, T], nonzero for real tokens.

  Returns:
    float32 [B, d]; rows without tokens are 0.
  """
  m_bt1 = mask_bt[..., None].astype(jnp.float32)
  return (h_btd.astype(jnp.float32) * m_bt1).sum(1) / jnp.maximum(m_bt1.sum(1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (as torch.nn.functional.normalize).

  Args:
    x: [..., D].
    eps: lower bound of the norm.

  Returns:
    x scaled to unit L2 norm per row (rows of zeros stay zero).
  """
  n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(n, eps)


def log_relu(z: jax.Array) -> jax.Array:
  """log1p(relu(z)), the sparse heads' saturation."""
  return jnp.log1p(jax.nn.relu(z))


def masked_softmax(logits_bt: jax.Array, mask_bt: jax.Array | None) -> jax.Array:
  """Softmax over t restricted to mask_bt != 0 (all positions when mask is None).

  Args:
    logits_bt: [B, T] logits (any float dtype; computed in float32).
    mask_bt: [B, T] or None.

  Returns:
    float32 [B, T] weights; a row with no unmasked token gets all zeros.
  """
  logits_bt = logits_bt.astype(jnp.float32)
  if mask_bt is None:
    return jax.nn.softmax(logits_bt, axis=-1)
  m = mask_bt.astype(bool)
  z = jnp.where(m, logits_bt, NEG)
  z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  e = jnp.where(m, jnp.exp(z), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
