"""attention: every implementation (and both offsets of the CPU kernel) equals a float64 reference.

"cudnn" runs here as its own pre/post-processing around jax's XLA kernel
(`cudnn_attention(implementation="xla")`, or a spy in place of the kernel call);
the cuDNN kernel itself needs a CUDA GPU (benchmarks/device_check.py).

Covers padding masks, general [B, T, S] masks, additive biases, causal masks,
custom scales, grouped-query heads, rows that see no key, and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laspar_jax.models.attention import attention, cpu_attention, cudnn_attention

IMPLS = ["xla", "cpu"]


def _reference(q, k, v, mask=None, *, bias=None, causal=False, scale=None):
  """Plain softmax attention in float64 numpy ([B, T, H, D] layout); rows seeing no key -> 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  logits = np.einsum("bthd,bshd->bhts", q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  keep = np.ones((b, 1, t, s), bool)
  if mask is not None:
    mask = np.asarray(mask) > 0
    keep &= mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
  if causal:
    keep &= np.tril(np.ones((t, s), bool))
  logits = np.where(keep, logits, -np.inf)
  row_max = logits.max(-1, keepdims=True)
  p = np.where(keep, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhts,bshd->bthd", p, v)


def _inputs(scale, seed=0, b=3, t=7, h=2, d=8, kv=None):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, h, d)).astype(np.float32) * scale
  k, v = (rng.standard_normal((b, t, kv or h, d)).astype(np.float32) for _ in range(2))
  k *= scale
  mask = np.ones((b, t), np.int32)
  mask[1, 4:] = 0  # padding keys
  mask[2, 1:] = 0  # a single real token
  return q, k, v, mask


def _keep(mask):
  return (jnp.asarray(mask) > 0)[:, None, None, :]


@pytest.mark.parametrize("offset", ["max", "bound"])
@pytest.mark.parametrize("scale", [1.0, 20.0])  # 20: the bound is > 117 above the max -> fallback
def test_cpu_kernel_matches_reference(offset, scale):
  q, k, v, mask = _inputs(scale)
  out = jax.jit(lambda q, k, v, m: cpu_attention(q, k, v, _keep(m), offset=offset))(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_bound_fallback_really_needed():
  """At scale 20, exponentials offset by the bound underflow: without the fallback, NaN/0."""
  q, k, v, mask = _inputs(20.0)
  d = q.shape[-1]
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  bound = (
    np.linalg.norm(q, axis=-1).transpose(0, 2, 1)[..., None]
    / np.sqrt(d)
    * np.linalg.norm(k, axis=-1).max(1)[:, :, None, None]
  )
  assert (bound - logits.max(-1, keepdims=True)).max() > 117


def test_bound_tight_and_huge_logits_do_not_overflow():
  """Keys parallel to queries make the bound tight; logits of ~1e4 still give finite output."""
  q, _, v, mask = _inputs(1.0)
  q = q * 60.0
  out = cpu_attention(q, q, v * 1e4, _keep(mask), offset="bound")
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), _reference(q, q, v * 1e4, mask), rtol=1e-4)


def _plain(mask, bias=None, causal=False):
  """Reference attention in jax (for gradients)."""

  def fn(q, k, v):
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
      logits = logits + bias
    keep = _keep(mask)
    if causal:
      keep = keep & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    logits = jnp.where(keep, logits, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), v)

  return fn


def _grads(fn, q, k, v, w):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("offset", ["max", "bound"])
@pytest.mark.parametrize("scale", [1.0, 4.0, 20.0])  # bound gap ~4.5, ~72 (row sums ~e^-12), fallback
def test_cpu_kernel_gradients_match(offset, scale):
  """At scale 20 padded keys' logits exceed the visible max by > 88: exp of them must not reach the gradient."""
  q, k, v, mask = _inputs(scale, seed=1)
  w = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
  w[1, 4:] = 0.0  # padded queries do not reach the loss
  ours = _grads(lambda q, k, v: cpu_attention(q, k, v, _keep(mask), offset=offset), q, k, v, w)
  ref = _grads(_plain(mask), q, k, v, w)
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5 * scale**2)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_and_no_mask(impl):
  q, k, v, _ = _inputs(1.0)
  out = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), impl=impl)
  assert out.dtype == jnp.bfloat16
  ref = _reference(q, k, v)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_unknown_offset_impl_and_heads():
  q, k, v, mask = _inputs(1.0)
  with pytest.raises(ValueError, match="offset"):
    cpu_attention(q, k, v, _keep(mask), offset="min")
  with pytest.raises(ValueError, match="bound"):
    cpu_attention(q, k, v, _keep(mask), bias_bhts=jnp.zeros((1, 1, 7, 7)), offset="bound")
  with pytest.raises(ValueError, match="impl"):
    attention(q, k, v, impl="flash")
  q3, k3, v3, _ = _inputs(1.0, h=3, kv=2)
  with pytest.raises(ValueError, match="multiple"):
    attention(q3, k3, v3)


def _bias(b, h, t, s, seed=3):
  """A T5-like relative bucket bias [1, H, T, S] plus a per-example ALiBi-like slope [B, H, 1, 1]."""
  rng = np.random.default_rng(seed)
  rel = np.arange(s)[None, :] - np.arange(t)[:, None]
  table = rng.standard_normal((h, 2 * max(t, s))).astype(np.float32) * 3.0
  t5 = table[:, rel + max(t, s)][None]
  slopes = rng.uniform(0.1, 2.0, (b, h, 1, 1)).astype(np.float32)
  return t5 - slopes * np.abs(rel)[None, None].astype(np.float32)


CASES = {
  "mask": dict(),
  "bias": dict(bias=True),
  "causal": dict(causal=True),
  "bias_causal_scale": dict(bias=True, causal=True, scale=0.7),
  "gqa": dict(kv=1),
  "gqa_bias_causal": dict(kv=2, h=4, bias=True, causal=True),
  "mask_bts": dict(mask_bts=True),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(impl, case):
  c = CASES[case]
  h = c.get("h", 2)
  q, k, v, mask = _inputs(1.5, seed=4, h=h, kv=c.get("kv"))
  b, t = mask.shape
  if c.get("mask_bts"):
    mask = np.random.default_rng(5).integers(0, 2, (b, t, t)).astype(np.int32)
    mask[:, :, 0] = 1
  bias = _bias(b, h, t, t) if c.get("bias") else None
  kwargs = dict(causal=c.get("causal", False), scale=c.get("scale"))
  out = jax.jit(lambda q, k, v, m, bias: attention(q, k, v, mask_bs=m, bias_bhts=bias, impl=impl, **kwargs))(
    q, k, v, mask, bias
  )
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask, bias=bias, **kwargs), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_without_visible_keys_are_zero(impl):
  """All-padding sequences, and left padding under a causal mask: finite zeros, finite gradients."""
  q, k, v, mask = _inputs(1.0)
  mask[0] = 0  # a sequence of padding only
  mask[1] = [0, 0, 1, 1, 1, 1, 1]  # left padding: causal rows 0 and 1 see nothing
  bias = _bias(3, 2, 7, 7)
  for kwargs in (dict(), dict(causal=True), dict(causal=True, bias_bhts=bias)):
    out = np.asarray(attention(q, k, v, mask_bs=mask, impl=impl, **kwargs))
    assert np.isfinite(out).all()
    ref = _reference(q, k, v, mask, causal=kwargs.get("causal", False), bias=kwargs.get("bias_bhts"))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    assert (out[0] == 0).all() and (out[1, :2] == 0).all() == kwargs.get("causal", False)
    grads = _grads(lambda q, k, v: attention(q, k, v, mask_bs=mask, impl=impl, **kwargs), q, k, v, np.ones_like(q))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_with_bias_and_causal(impl):
  q, k, v, mask = _inputs(2.0, seed=6)
  bias = jnp.asarray(_bias(3, 2, 7, 7))
  w = np.random.default_rng(7).standard_normal(q.shape).astype(np.float32)
  w[1, 4:] = 0.0
  w[2, 1:] = 0.0
  fn = lambda q, k, v: attention(q, k, v, mask_bs=mask, bias_bhts=bias, causal=True, impl=impl)
  for a, r in zip(_grads(fn, q, k, v, w), _grads(_plain(mask, bias, causal=True), q, k, v, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_cpu_impl_equals_kernel_with_bound_offset():
  """Without bias the "cpu" impl is exactly the tuned kernel (bound offset): same numbers as before."""
  q, k, v, mask = _inputs(1.0)
  a = attention(q, k, v, mask_bs=mask, impl="cpu")
  b = cpu_attention(q, k, v, _keep(mask), offset="bound")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("case", sorted(CASES))
def test_cudnn_processing_matches_reference(case):
  """The "cudnn" path's padding to even lengths (T = S = 7 here), mask and bias shaping, zeroed rows, gradients."""
  c = CASES[case]
  h = c.get("h", 2)
  q, k, v, mask = _inputs(1.5, seed=4, h=h, kv=c.get("kv"))
  mask[0] = 0  # a row that sees nothing
  b, t = mask.shape
  if c.get("mask_bts"):
    mask = np.random.default_rng(5).integers(0, 2, (b, t, t)).astype(np.int32)
    mask[:, :, 0] = 1
  bias = _bias(b, h, t, t) if c.get("bias") else None
  kwargs = dict(bias_bhts=bias, causal=c.get("causal", False), scale=c.get("scale"))
  fn = lambda q, k, v: cudnn_attention(q, k, v, mask_bs=mask, implementation="xla", **kwargs)
  ref = _reference(q, k, v, mask, bias=bias, causal=kwargs["causal"], scale=kwargs["scale"])
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v)), ref, rtol=2e-5, atol=2e-5)
  w = np.random.default_rng(7).standard_normal(q.shape).astype(np.float32)
  plain = lambda q, k, v: attention(q, k, v, mask_bs=mask, impl="xla", **kwargs)
  for a, r in zip(_grads(fn, q, k, v, w), _grads(plain, q, k, v, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_cudnn_kernel_call_takes_what_cudnn_accepts(monkeypatch):
  """impl="cudnn" hands the kernel one dtype, a [B, 1, T, S] mask, a bias in that dtype spanning T and S, even T, S."""
  calls = []
  real = jax.nn.dot_product_attention

  def spy(q, k, v, bias=None, mask=None, **kw):
    calls.append(dict(q=q, k=k, v=v, bias=bias, mask=mask, **kw))
    return real(q, k, v, bias, mask, **dict(kw, implementation="xla"))

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  q, k, v, mask = _inputs(1.0, h=4, kv=2)
  bias = _bias(3, 4, 7, 7)[:1]  # [1, H, T, S]
  q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  out = attention(q16.astype(jnp.float32), k16, v16, mask_bs=mask, bias_bhts=bias, causal=True, impl="cudnn")
  (call,) = calls
  assert call["implementation"] == "cudnn" and call["is_causal"]
  assert {call[n].dtype for n in ("q", "k", "v", "bias")} == {jnp.dtype(jnp.bfloat16)}
  assert call["q"].shape == (3, 8, 4, 8) and call["k"].shape == (3, 8, 2, 8)
  assert call["mask"].shape == (3, 1, 8, 8) and call["mask"].dtype == bool and not call["mask"][:, :, :, 7].any()
  assert call["bias"].shape == (1, 4, 8, 8)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  ref = _reference(q16.astype(jnp.float32), k16, v16, mask, bias=bias, causal=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)
  calls.clear()
  attention(q16[:, :6], k16[:, :6], v16[:, :6], impl="cudnn")  # no mask, no bias: nothing padded or added
  assert calls[0]["q"].shape[1] == 6 and calls[0]["mask"] is None and calls[0]["bias"] is None


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the kernel may run")
def test_cudnn_kernel_needs_a_cuda_gpu():
  q, k, v, mask = _inputs(1.0)
  with pytest.raises(RuntimeError, match="cuDNN"):
    attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask_bs=mask, impl="cudnn")
