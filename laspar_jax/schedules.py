"""Schedules: regularizer warm-up and learning rate (pure, jnp-compatible)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def quadratic_warmup(step: int | jax.Array, *, value: float, warmup_steps: int) -> jax.Array:
  """lambda_t = value * min(1, t / T)^2 (SPLADE's regularizer warm-up).

  Args:
    step: training step t (python int or traced scalar).
    value: final weight lambda.
    warmup_steps: T; T <= 0 gives `value` from the first step.

  Returns:
    float32 scalar.
  """
  if warmup_steps <= 0:
    return jnp.asarray(value, jnp.float32)
  frac = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(warmup_steps))
  return value * jnp.square(frac)


def warmup_linear_decay(
  *, peak_value: float, warmup_steps: int, total_steps: int, init_value: float = 0.0, end_value: float = 0.0
) -> optax.Schedule:
  """Learning rate: linear warm-up init -> peak over `warmup_steps`, then linear decay to end.

  Args:
    peak_value: learning rate reached at `warmup_steps`.
    warmup_steps: length of the warm-up (0: start at peak).
    total_steps: step at which `end_value` is reached (constant afterwards).
    init_value: learning rate at step 0.
    end_value: learning rate at and after `total_steps`.

  Returns:
    An optax schedule step -> learning rate.
  """
  decay = optax.linear_schedule(peak_value, end_value, _decay_steps(warmup_steps, total_steps))
  return _after_warmup(decay, init_value=init_value, peak_value=peak_value, warmup_steps=warmup_steps)


def _decay_steps(warmup_steps: int, total_steps: int) -> int:
  if total_steps < warmup_steps:
    raise ValueError(f"total_steps={total_steps} < warmup_steps={warmup_steps}")
  return max(total_steps - warmup_steps, 1)


def _after_warmup(decay: optax.Schedule, *, init_value: float, peak_value: float, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up init -> peak over `warmup_steps`, then `decay` (counted from the warm-up's end)."""
  if warmup_steps <= 0:
    return decay
  warm = optax.linear_schedule(init_value, peak_value, warmup_steps)
  return optax.join_schedules([warm, decay], [warmup_steps])


def warmup_cosine_decay(
  *, peak_value: float, warmup_steps: int, total_steps: int, init_value: float = 0.0, end_value: float = 0.0
) -> optax.Schedule:
  """Learning rate: linear warm-up init -> peak over `warmup_steps`, then cosine decay to end.

  lr_t = end + (peak - end) * (1 + cos(pi * (t - W) / (T - W))) / 2 for W <= t <= T.

  Args:
    peak_value: learning rate reached at `warmup_steps`.
    warmup_steps: W, the length of the warm-up (0: start at peak).
    total_steps: T, the step at which `end_value` is reached (constant afterwards).
    init_value: learning rate at step 0.
    end_value: learning rate at and after `total_steps`.

  Returns:
    An optax schedule step -> learning rate.
  """
  decay = optax.cosine_decay_schedule(
    peak_value, _decay_steps(warmup_steps, total_steps), alpha=end_value / peak_value if peak_value else 0.0
  )
  return _after_warmup(decay, init_value=init_value, peak_value=peak_value, warmup_steps=warmup_steps)
