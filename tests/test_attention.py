"""dot_product_attention: both offsets equal a numpy softmax reference, with masks and grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laspar_jax.models.layers import dot_product_attention


def _reference(q, k, v, mask):
  """Plain softmax attention in float64 numpy ([B, T, H, D] layout)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def _inputs(scale, seed=0, b=3, t=7, h=2, d=8):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
  q *= scale
  k *= scale
  mask = np.ones((b, t), np.int32)
  mask[1, 4:] = 0  # padding keys
  mask[2, 1:] = 0  # a single real token
  return q, k, v, mask


@pytest.mark.parametrize("offset", ["max", "bound"])
@pytest.mark.parametrize("scale", [1.0, 20.0])  # 20: the bound is > 117 above the max -> fallback
@pytest.mark.parametrize("backend", ["cpu", "gpu"])  # weight sum in the value product, or reduced
def test_matches_reference(offset, scale, backend, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  q, k, v, mask = _inputs(scale)
  out = jax.jit(lambda *a: dot_product_attention(*a, offset=offset))(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_bound_fallback_really_needed():
  """At scale 20, exponentials offset by the bound underflow: without the fallback, NaN/0."""
  q, k, v, mask = _inputs(20.0)
  d = q.shape[-1]
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  bound = (np.linalg.norm(q, axis=-1).transpose(0, 2, 1)[..., None] / np.sqrt(d)
           * np.linalg.norm(k, axis=-1).max(1)[:, :, None, None])
  assert (bound - logits.max(-1, keepdims=True)).max() > 117


def test_bound_tight_and_huge_logits_do_not_overflow():
  """Keys parallel to queries make the bound tight; logits of ~1e4 still give finite output."""
  q, _, v, mask = _inputs(1.0)
  q = q * 60.0
  out = dot_product_attention(q, q, v * 1e4, mask, offset="bound")
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), _reference(q, q, v * 1e4, mask), rtol=1e-4)


@pytest.mark.parametrize("offset", ["max", "bound"])
@pytest.mark.parametrize("scale", [1.0, 4.0])  # bound gap ~4.5 and ~72 (row sums ~e^-12)
def test_gradients_match(offset, scale):
  q, k, v, mask = _inputs(scale, seed=1)
  w = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
  w[1, 4:] = 0.0  # padded queries do not reach the loss

  def loss(q, k, v, fn):
    return jnp.sum(fn(q, k, v) * w)

  ours = jax.grad(loss, argnums=(0, 1, 2))(
      q, k, v, lambda q, k, v: dot_product_attention(q, k, v, mask, offset=offset))

  def plain(q, k, v):
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(mask[:, None, None, :] > 0, logits, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), v)

  ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, plain)
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5 * scale ** 2)


def test_bf16_and_no_mask():
  q, k, v, _ = _inputs(1.0)
  out = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), None)
  assert out.dtype == jnp.bfloat16
  ref = _reference(q, k, v, np.ones(q.shape[:2], np.int32))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_unknown_offset():
  q, k, v, mask = _inputs(1.0)
  with pytest.raises(ValueError, match="offset"):
    dot_product_attention(q, k, v, mask, offset="min")
