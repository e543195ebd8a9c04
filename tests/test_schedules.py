"""Regularizer warm-up and learning-rate schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laspar_jax import schedules


def test_quadratic_warmup():
  f = lambda t: float(schedules.quadratic_warmup(t, value=5e-3, warmup_steps=100))
  np.testing.assert_allclose([f(0), f(10), f(50), f(100), f(1000)], [0.0, 5e-5, 1.25e-3, 5e-3, 5e-3], rtol=1e-6)
  assert float(schedules.quadratic_warmup(0, value=2.0, warmup_steps=0)) == 2.0
  # jit-compatible with a traced step
  g = jax.jit(lambda t: schedules.quadratic_warmup(t, value=1.0, warmup_steps=4))
  np.testing.assert_allclose(jax.vmap(g)(jnp.arange(6)), [0, 1 / 16, 1 / 4, 9 / 16, 1, 1])


def test_warmup_linear_decay():
  s = schedules.warmup_linear_decay(peak_value=1e-4, warmup_steps=10, total_steps=110)
  got = [float(s(t)) for t in (0, 5, 10, 60, 110, 200)]
  np.testing.assert_allclose(got, [0.0, 5e-5, 1e-4, 5e-5, 0.0, 0.0], atol=1e-12)
  assert float(jax.jit(s)(jnp.int32(5))) == got[1]
  s0 = schedules.warmup_linear_decay(peak_value=1.0, warmup_steps=0, total_steps=4, end_value=0.5)
  np.testing.assert_allclose([float(s0(t)) for t in (0, 2, 4)], [1.0, 0.75, 0.5])


def test_warmup_cosine_decay():
  s = schedules.warmup_cosine_decay(peak_value=1e-4, warmup_steps=10, total_steps=110, end_value=1e-5)
  got = [float(s(t)) for t in (0, 5, 10, 35, 60, 110, 200)]
  mid = 1e-5 + 9e-5 * 0.5 * (1 + np.cos(np.pi / 4))
  np.testing.assert_allclose(got, [0.0, 5e-5, 1e-4, mid, 5.5e-5, 1e-5, 1e-5], rtol=1e-5)
  assert float(jax.jit(s)(jnp.int32(35))) == pytest.approx(mid, rel=1e-5)
  s0 = schedules.warmup_cosine_decay(peak_value=1.0, warmup_steps=0, total_steps=4)
  np.testing.assert_allclose([float(s0(t)) for t in (0, 2, 4)], [1.0, 0.5, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="total_steps"):
    schedules.warmup_cosine_decay(peak_value=1.0, warmup_steps=5, total_steps=4)
