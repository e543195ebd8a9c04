"""Per-computation XLA compiler options (XLA:CPU library choices).

XLA:CPU (jaxlib 0.10) hands dots, reductions and elementwise ops to YNNPACK
by default. For transformer encoders that is slower than its Eigen dots: on
one core of this machine an [8192 x 384] x [384 x 1536] fp32 dot runs at
~106 GFLOP/s in Eigen and ~71 in YNNPACK, and the MiniLM forward (batch 32)
gains 1.3-1.5x in fp32 and up to 1.3x in bf16 (`benchmarks/
encoder_throughput.py --xla_defaults`). Forward+backward is unchanged, so
the train step keeps XLA's defaults.

`jit(fn)` is `jax.jit` with those options on the CPU backend and plain
`jax.jit` elsewhere. An XLA that no longer knows an option makes the first
call fall back to plain `jax.jit` with a warning, never an error.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax

# Empty list: no YNNPACK library fusions (dots and reductions go to Eigen / XLA codegen).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
  """Options for an inference computation on `backend` (None: XLA defaults)."""
  backend = backend or jax.default_backend()
  return dict(CPU_OPTIONS) if backend == "cpu" else None


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
      warnings.warn(f"XLA rejected compiler options {self.options} ({e}); using defaults",
                    RuntimeWarning, stacklevel=2)
      self._tuned = None
      return self._plain(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return (self._tuned or self._plain).lower(*args, **kwargs)


def jit(fn: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` with `compiler_options()` on CPU."""
  return _Jitted(fn, compiler_options(), jit_kwargs)
