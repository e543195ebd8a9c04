"""Softmax attention with padding masks, additive biases, causal masks and grouped-query heads.

`attention(q, k, v, ..., impl=...)` has three implementations with one meaning:

  "xla": `jax.nn.dot_product_attention` (its XLA implementation on every
         backend). The default; grouped-query heads are native there.
  "cpu": a kernel tuned for XLA:CPU (`cpu_attention`): heads-major layout,
         keys as [B, H, D, S], the weights' sum taken by the value product (a
         column of ones), normalisation after the value product, and an
         overflow offset that needs no reduction over [B, H, T, S] when there
         is no additive bias.
  "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's
         fused (flash) kernel on CUDA GPUs, bf16 / fp16 only (`cudnn_attention`;
         `platform.attention_impl` checks what it can take when a model is built).

The choice is a string fixed when a model is built (`platform.attention_impl`
resolves "auto"); nothing here looks at the backend.

Conventions shared by both:
  - Logits are `scale * q.k + bias` in float32 (scale defaults to 1/sqrt(D)).
  - A key is visible to a query when the mask allows it (mask_bs: 1 for real
    keys; or a [B, T, S] mask) and, when `causal`, when s <= t.
  - A query row that sees no key at all (e.g. a sequence of padding only, or a
    left-padded position under a causal mask) outputs zeros. Padded query rows
    that see real keys attend normally (their outputs are finite; masks
    downstream drop them).
  - The output has the dtype of v.
  - "cudnn" adds the bias in v's dtype (bf16: about 3 significant digits);
    the others add it in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cpu", "cudnn")

_BOUND_SLACK = 60.0  # e^60 ~ 1.1e26: headroom below the fp32 / bf16 max (3.4e38)
_MIN_SUM = 1e-25  # smallest row sum of exponentials "bound" accepts (else: "max")


def attention(
  q_bthd: jax.Array,
  k_bshd: jax.Array,
  v_bshd: jax.Array,
  *,
  mask_bs: jax.Array | None = None,
  bias_bhts: jax.Array | None = None,
  causal: bool = False,
  scale: float | None = None,
  impl: str = "xla",
) -> jax.Array:
  """Multi-head (or grouped-query) softmax attention.

  Args:
    q_bthd: queries [B, T, H, D].
    k_bshd: keys [B, S, K, D] with K dividing H (K < H: grouped-query heads;
      query head h uses key/value head h // (H / K)).
    v_bshd: values [B, S, K, D].
    mask_bs: key mask [B, S] (nonzero = visible), or a general [B, T, S] mask.
    bias_bhts: additive logit bias broadcastable to [B, H, T, S] (relative
      position biases, ALiBi); finite values.
    causal: query t sees keys s <= t only (T == S, aligned at the start).
    scale: logit scale (default 1/sqrt(D)).
    impl: "xla", "cpu" or "cudnn" (see the module docstring).

  Returns:
    [B, T, H, D] in the dtype of v.
  """
  h, kv = q_bthd.shape[2], k_bshd.shape[2]
  if h % kv:
    raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
  if impl == "xla":
    return _xla_attention(q_bthd, k_bshd, v_bshd, mask_bs, bias_bhts, causal, scale)
  if impl == "cudnn":
    return cudnn_attention(q_bthd, k_bshd, v_bshd, mask_bs=mask_bs, bias_bhts=bias_bhts, causal=causal, scale=scale)
  if impl == "cpu":
    if kv != h:
      k_bshd, v_bshd = (jnp.repeat(x, h // kv, axis=2) for x in (k_bshd, v_bshd))
    keep = _keep_b1ts(mask_bs, causal, q_bthd.shape[1], k_bshd.shape[1])
    return cpu_attention(
      q_bthd, k_bshd, v_bshd, keep, bias_bhts=bias_bhts, scale=scale, offset="bound" if bias_bhts is None else "max"
    )
  raise ValueError(f"unknown attention impl {impl!r}; known: {IMPLS}")


def _keep_b1ts(mask_bs: jax.Array | None, causal: bool, t: int, s: int) -> jax.Array | None:
  """Boolean visibility broadcastable to [B, 1, T, S] (None: everything visible)."""
  keep = None
  if mask_bs is not None:
    keep = (mask_bs > 0)[:, None, None, :] if mask_bs.ndim == 2 else (mask_bs > 0)[:, None]
  if causal:
    tril_11ts = jnp.tril(jnp.ones((t, s), bool))[None, None]
    keep = tril_11ts if keep is None else keep & tril_11ts
  return keep


def _xla_attention(q_bthd, k_bshd, v_bshd, mask_bs, bias_bhts, causal, scale) -> jax.Array:
  dtype = v_bshd.dtype
  q_bthd, k_bshd = q_bthd.astype(dtype), k_bshd.astype(dtype)
  if mask_bs is None:
    mask = None
  else:
    mask = (mask_bs > 0)[:, None, None, :] if mask_bs.ndim == 2 else (mask_bs > 0)[:, None]
  bias = None if bias_bhts is None else jnp.asarray(bias_bhts, jnp.float32)
  if bias is not None and bias.ndim < 4:
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  out_bthd = jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, bias, mask, scale=scale, is_causal=causal)
  if mask is None:
    return out_bthd  # every row sees at least key 0 (causal) or all keys
  # Rows with no visible key: jax gives the mean of all values; the convention is zeros.
  seen_bt = _keep_b1ts(mask_bs, causal, q_bthd.shape[1], k_bshd.shape[1]).any(-1)[:, 0]
  return jnp.where(seen_bt[:, :, None, None], out_bthd, 0).astype(dtype)


def cudnn_attention(
  q_bthd: jax.Array,
  k_bshd: jax.Array,
  v_bshd: jax.Array,
  *,
  mask_bs: jax.Array | None = None,
  bias_bhts: jax.Array | None = None,
  causal: bool = False,
  scale: float | None = None,
  implementation: str | None = "cudnn",
) -> jax.Array:
  """cuDNN's fused attention under this module's conventions (arguments as `attention`).

  What the kernel takes (read in jax 0.10.2's `jax/_src/cudnn/fused_attention_stablehlo.py`,
  `check_layout` / `check_is_flash_attention`, and `jax/_src/nn/functions.py`):
    - q, k, v of one dtype, bf16 or fp16 (fp8 aside); the output has q's dtype.
    - head dim a multiple of 8, <= 128 (<= 256 from compute capability 9.0, Hopper).
    - grouped-query heads natively (K divides H).
    - a boolean mask becomes an additive bias in q's dtype (-2^41 where hidden),
      and a bias must span the query and key lengths: [B or 1, H or 1, T, S].
    - with a bias, training needs even T and S.
    - causal: the kernel's own causal mask (non-causal blocks skipped).
  So here: q, k go to v's dtype, the bias to v's dtype and [., ., T, S], the mask
  to [B, 1, T, S]; with a mask or bias an odd T or S is padded by one (padded keys
  hidden, padded query rows dropped); rows that see no key are set to 0 after.

  Args:
    implementation: passed to `jax.nn.dot_product_attention`; "cudnn" (the
      kernel), or "xla" / None to run this same pre- and post-processing on
      any backend (the tests do).

  Returns:
    [B, T, H, D] in the dtype of v.
  """
  dtype = v_bshd.dtype
  q_bthd, k_bshd = q_bthd.astype(dtype), k_bshd.astype(dtype)
  b, t, _, _ = q_bthd.shape
  s = k_bshd.shape[1]
  keep = None if mask_bs is None else jnp.broadcast_to(_keep_b1ts(mask_bs, False, t, s), (b, 1, t, s))
  bias = None
  if bias_bhts is not None:
    bias = jnp.asarray(bias_bhts, dtype)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (t, s))
  pad_t, pad_s = (t % 2, s % 2) if (keep is not None or bias is not None) else (0, 0)
  if pad_t or pad_s:
    q_bthd = jnp.pad(q_bthd, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    k_bshd, v_bshd = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k_bshd, v_bshd))
    keep = jnp.ones((1, 1, t, s), bool) if keep is None else keep
    keep = jnp.pad(keep, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))  # padded keys and query rows: hidden
    if bias is not None:
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))
  out_bthd = jax.nn.dot_product_attention(
    q_bthd, k_bshd, v_bshd, bias, keep, scale=scale, is_causal=causal, implementation=implementation
  )[:, :t]
  if mask_bs is None:
    return out_bthd.astype(dtype)  # every row sees at least key 0 (causal) or all keys
  seen_bt = _keep_b1ts(mask_bs, causal, t, s).any(-1)[:, 0]
  return jnp.where(seen_bt[:, :, None, None], out_bthd, 0).astype(dtype)


def cpu_attention(
  q_bthd: jax.Array,
  k_bshd: jax.Array,
  v_bshd: jax.Array,
  keep_b1ts: jax.Array | None,
  *,
  bias_bhts: jax.Array | None = None,
  scale: float | None = None,
  offset: str = "bound",
) -> jax.Array:
  """Softmax attention tuned for XLA:CPU; invisible keys (keep False) get no weight.

  Works in the heads-major layout [B, H, T, D] (about 2x faster on XLA:CPU
  than contracting in [B, T, H, D]) and normalizes after the value product
  (divides [B, H, T, D], not [B, H, T, S]). The value product also sums the
  weights (a column of ones appended to v: no extra pass).

  `offset` is what is subtracted from the logits before `exp` (softmax is
  invariant to it; it only guards overflow):
    "max":   the row max over visible keys, as usual (one reduction over
             [B, H, T, S]). Correct for any additive bias.
    "bound": the Cauchy-Schwarz bound |q_t| * max_s |k_s| >= every logit of the
             row, minus `_BOUND_SLACK` (60), from [B, H, T] and [B, H, S] norms
             only: no reduction over the largest tensor. Valid only for logits
             = q.k (no bias). Exponentials stay <= e^60 (sums of 10^4 keys
             times values of 10^8 still fit fp32 and bf16); if a row's bound is
             so loose that its sum falls below 1e-25 (a logit gap over ~117),
             the whole call falls back to "max" under `lax.cond`. Above 1e-25,
             the terms flushed to zero (< 1.2e-38 each, 8192 keys) change the
             sum by < 1e-9 relative.
  Logits and exponentials are fp32.

  Args:
    q_bthd, k_bshd, v_bshd: [B, T, H, D], [B, S, H, D], [B, S, H, D] (equal heads).
    keep_b1ts: visibility broadcastable to [B, 1, T, S] (None: all visible).
    bias_bhts: additive logit bias (needs offset "max").
    scale: logit scale (default 1/sqrt(D)).
    offset: "bound" or "max".

  Returns:
    [B, T, H, D] in the dtype of v; rows that see no key are 0.
  """
  d = q_bthd.shape[-1]
  q_bhtd, v_bhsd = (x.transpose(0, 2, 1, 3) for x in (q_bthd, v_bshd))
  # Keys go [B, H, D, S] so both products contract a row-major right operand:
  # the form XLA:CPU's YNNPACK dots accept (they reject a transposed one).
  k_bhds = k_bshd.transpose(0, 2, 3, 1)
  scale = 1.0 / float(d) ** 0.5 if scale is None else scale
  q_bhtd = q_bhtd * jnp.asarray(scale, q_bhtd.dtype)
  logits_bhts = jnp.einsum("bhtd,bhds->bhts", q_bhtd, k_bhds, preferred_element_type=jnp.float32)
  if bias_bhts is not None:
    if offset == "bound":
      raise ValueError("the 'bound' offset assumes logits = q.k; use 'max' with a bias")
    logits_bhts = logits_bhts + jnp.asarray(bias_bhts, jnp.float32)
  v_bhsd = jnp.concatenate([v_bhsd, jnp.ones(v_bhsd.shape[:-1] + (1,), v_bhsd.dtype)], -1)

  def attend(offset_bht1, masked_bhts=None):
    """[B, H, T, D + 1]: weighted values, then the weights' sum."""
    if masked_bhts is None:  # offset >= every logit: exp cannot overflow, mask after
      e_bhts = jnp.exp(logits_bhts - jax.lax.stop_gradient(offset_bht1))
      if keep_b1ts is not None:
        e_bhts = jnp.where(keep_b1ts, e_bhts, 0.0)
    else:  # invisible logits are -inf: exp gives 0 (and a zero gradient) whatever the offset
      e_bhts = jnp.exp(masked_bhts - jax.lax.stop_gradient(offset_bht1))
    return jnp.einsum("bhts,bhsd->bhtd", e_bhts.astype(v_bhsd.dtype), v_bhsd, preferred_element_type=jnp.float32)

  def row_max():
    if keep_b1ts is None:
      return attend(logits_bhts.max(-1, keepdims=True))
    masked_bhts = jnp.where(keep_b1ts, logits_bhts, -jnp.inf)
    # A row with no visible key has max -inf: any finite offset (its sum is 0 anyway).
    return attend(jnp.maximum(masked_bhts.max(-1, keepdims=True), jnp.finfo(jnp.float32).min), masked_bhts)

  if offset == "max":
    o_bhtd = row_max()
  elif offset == "bound":
    q32_bhtd, k32_bhds = q_bhtd.astype(jnp.float32), k_bhds.astype(jnp.float32)
    k_norm_bh11 = jnp.sqrt(jnp.max(jnp.sum(k32_bhds * k32_bhds, -2), -1))[..., None, None]
    bound_bht1 = jnp.sqrt(jnp.sum(q32_bhtd * q32_bhtd, -1, keepdims=True)) * k_norm_bh11
    o_bhtd = attend(bound_bht1 - _BOUND_SLACK)
    if keep_b1ts is None:
      ok = jnp.all(o_bhtd[..., -1] >= _MIN_SUM)
    else:  # rows that see no key sum to 0 with any offset
      ok = jnp.all((o_bhtd[..., -1] >= _MIN_SUM) | ~jnp.any(keep_b1ts, -1))
    o_bhtd = jax.lax.cond(ok, lambda: o_bhtd, row_max)
  else:
    raise ValueError(f"offset must be 'max' or 'bound', got {offset!r}")
  # Divide by the sum s through a constant 1/s (no gradient): d(o/s)/ds is
  # -o/s^2, and s^2 leaves the fp32 range for s up to S * e^60 or down to
  # 1e-25; (o r) / (s r) has the same value and keeps every factor in range.
  sum_bht1 = jnp.maximum(o_bhtd[..., -1:], 1e-30)
  r_bht1 = jax.lax.stop_gradient(1.0 / sum_bht1)
  out_bhtd = (o_bhtd[..., :-1] * r_bht1) / (sum_bht1 * r_bht1)
  return out_bhtd.astype(v_bshd.dtype).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=16)
def cudnn_problem(dtype_name: str, head_dim: int, heads: int = 4, kv_heads: int = 2) -> str | None:
  """Compiles a tiny forward + backward of `cudnn_attention` (grouped-query heads, a padding mask, causal and
  not); the error, or None.

  A build-time probe for `attention_impl="auto"`: the selection rules come from
  reading JAX's source, and a GPU, driver or cuDNN that disagrees should cost a
  warning and the XLA path, not a failed run. Cached per argument set.
  """
  dtype = jnp.dtype(dtype_name)
  q = jnp.zeros((2, 8, heads, head_dim), dtype)
  kv = jnp.zeros((2, 8, kv_heads, head_dim), dtype)
  mask = jnp.ones((2, 8), jnp.int32).at[1, 5:].set(0)

  def loss(q, k, v, causal):
    return cudnn_attention(q, k, v, mask_bs=mask, causal=causal).astype(jnp.float32).sum()

  try:
    for causal in (False, True):
      jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3).lower(q, kv, kv, causal).compile()
  except Exception as e:  # noqa: BLE001 - any failure means "do not pick cuDNN"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None
