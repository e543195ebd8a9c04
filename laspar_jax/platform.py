"""The one place that looks at the backend: compiler options and attention choice.

`attention_impl("auto")` picks the attention implementation a model is built
with: the CPU-tuned kernel ("cpu") on the CPU backend, `jax.nn.dot_product_attention`
("xla": cuDNN / flash on GPU, XLA on TPU) elsewhere. Model code receives the
resolved string and never asks for the backend itself.

Per-computation XLA compiler options (XLA:CPU library choices):

XLA:CPU (jaxlib 0.10) hands dots, reductions and elementwise ops to YNNPACK
by default. What serves a transformer encoder depends on the compute dtype:

  fp32: Eigen dots, no YNNPACK. On one core an [8192 x 384] x [384 x 1536]
        fp32 dot runs at ~106 GFLOP/s in Eigen and ~71 in YNNPACK; the
        MiniLM forward (batch 32) gains 1.3-1.5x.
  bf16: YNNPACK for individual dots only. A bf16 x bf16 -> fp32 dot
        (`preferred_element_type=float32`, as `layers.Dense` and the
        attention products write it) runs on AMX / AVX512-BF16 there: a
        [4096 x 384] x [384 x 1536] dot at 340-980 GFLOP/s on this shared
        2-core VM (AMX throughput swings with neighbours), vs ~135 for the
        upcast fp32 Eigen dot; a bf16-output dot is upcast and gains nothing.
        The MiniLM bf16 forward runs ~1.5x its fp32 speed here, 1.1-1.2x
        over XLA's defaults.

`benchmarks/encoder_throughput.py --xla_defaults` measures both against XLA's
defaults. Forward+backward is unchanged, so the train step keeps the defaults.

`jit(fn, compute_dtype=...)` is `jax.jit` with those options on the CPU
backend and plain `jax.jit` elsewhere. An XLA that no longer knows an option
makes the first call fall back to plain `jax.jit` with a warning, never an
error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cpu")

# Empty list: no YNNPACK library fusions (dots and reductions go to Eigen / XLA codegen).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# YNNPACK for individual dots only (its AMX / AVX512-BF16 kernels); the rest is XLA codegen.
CPU_BF16_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(backend: str | None = None, compute_dtype: Any = jnp.float32) -> dict[str, Any] | None:
  """Options for an inference computation in `compute_dtype` on `backend` (None: XLA defaults)."""
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return None
  return dict(CPU_BF16_OPTIONS if jnp.dtype(compute_dtype) == jnp.bfloat16 else CPU_OPTIONS)


class _Jitted:
  """jax.jit with compiler options, falling back to plain jit if XLA rejects them."""

  def __init__(self, fn: Callable, options: dict[str, Any] | None, jit_kwargs: dict[str, Any]):
    self._plain = jax.jit(fn, **jit_kwargs)
    self._tuned = jax.jit(fn, compiler_options=options, **jit_kwargs) if options else None
    self.options = options

  def __call__(self, *args, **kwargs):
    if self._tuned is None:
      return self._plain(*args, **kwargs)
    try:
      return self._tuned(*args, **kwargs)
    except jax.errors.JaxRuntimeError as e:
      if not any(name in str(e) for name in self.options):
        raise
      warnings.warn(f"XLA rejected compiler options {self.options} ({e}); using defaults", RuntimeWarning, stacklevel=2)
      self._tuned = None
      return self._plain(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return (self._tuned or self._plain).lower(*args, **kwargs)


def jit(fn: Callable, *, compute_dtype: Any = jnp.float32, **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` with `compiler_options(compute_dtype=...)` on CPU."""
  return _Jitted(fn, compiler_options(compute_dtype=compute_dtype), jit_kwargs)


def attention_impl(requested: str = "auto", backend: str | None = None) -> str:
  """Resolves an attention implementation name for `models.attention.attention`.

  Args:
    requested: "auto", "xla" or "cpu"; explicit names pass through.
    backend: the backend "auto" decides for (default: `jax.default_backend()`).

  Returns:
    "cpu" for "auto" on the CPU backend, "xla" for "auto" elsewhere, else `requested`.

  Raises:
    ValueError: an unknown name.
  """
  if requested in ATTENTION_IMPLS:
    return requested
  if requested != "auto":
    raise ValueError(f"unknown attention implementation {requested!r}; known: auto, {', '.join(ATTENTION_IMPLS)}")
  return "cpu" if (backend or jax.default_backend()) == "cpu" else "xla"
