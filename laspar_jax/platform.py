"""The one place that looks at the backend: compiler options, attention choice, precision, compilation cache.

`attention_impl("auto", dtype=, head_dim=, has_bias=)` picks the attention
implementation a model is built with: the CPU-tuned kernel ("cpu") on the CPU
backend; on a CUDA GPU cuDNN's fused kernel ("cudnn") where the dtype (bf16 /
fp16), head dim and compute capability allow and there is no logit bias, else
`jax.nn.dot_product_attention`'s XLA form ("xla", also on TPUs). Model code
receives the resolved string and never asks for the backend itself.

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

Matmul precision (`EncoderConfig.matmul_precision`, config `model.matmul_precision`):
"default" leaves JAX's default (on GPUs fp32 dots run as TF32, on TPUs as
one bf16 pass), "tf32" asks for TF32 (GPU; 3 bf16 passes on TPU), "highest"
for full fp32 products. It is applied around the jitted call
(`jit(..., matmul_precision=)`, `jit_boundary`), never in model code;
dots with bf16 operands are not affected.

Persistent compilation cache: `init_compilation_cache()` (called by `jit` and
`jit_boundary`) points JAX's persistent cache at `$LASPAR_COMPILATION_CACHE`,
default `~/.cache/laspar_jax/jax_cache` (`$XDG_CACHE_HOME` honoured); "off"
turns it off, and a `jax_compilation_cache_dir` the user set is left alone.
The tests turn it off (conftest).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cpu", "cudnn")
CUDNN_MIN_CAPABILITY = (8, 0)  # Ampere: the oldest GPU cuDNN's fused flash attention serves

# Empty list: no YNNPACK library fusions (dots and reductions go to Eigen / XLA codegen).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# YNNPACK for individual dots only (its AMX / AVX512-BF16 kernels); the rest is XLA codegen.
CPU_BF16_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}

# model.matmul_precision -> jax.default_matmul_precision value (None: JAX's default, no context).
MATMUL_PRECISIONS = {"default": None, "tf32": "tensorfloat32", "highest": "highest"}

CACHE_ENV = "LASPAR_COMPILATION_CACHE"
CACHE_OFF = ("0", "off", "false", "no", "none")
# Computations that compile faster than this are not written to the cache (JAX's default is 1 s).
CACHE_MIN_COMPILE_SECS = 0.5


def backend() -> str:
  """The default JAX backend ("cpu", "gpu", "tpu"): the one place the code asks."""
  return jax.default_backend()


# Texts per encoder call when the caller leaves it to the platform (batch_size 0): the CPU is fastest
# with small batches that stay in cache; accelerators want large ones (one compile per length bucket).
ENCODE_BATCH_SIZE = {"cpu": 64}
ENCODE_BATCH_SIZE_ACCELERATOR = 256


def encode_batch_size(requested: int = 0, backend_name: str | None = None) -> int:
  """`requested` if > 0, else the backend's default texts per encoder call (64 on CPU, 256 on GPU / TPU)."""
  if requested > 0:
    return int(requested)
  return ENCODE_BATCH_SIZE.get(backend_name or backend(), ENCODE_BATCH_SIZE_ACCELERATOR)


def compiler_options(backend: str | None = None, compute_dtype: Any = jnp.float32) -> dict[str, Any] | None:
  """Options for an inference computation in `compute_dtype` on `backend` (None: XLA defaults)."""
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return None
  return dict(CPU_BF16_OPTIONS if jnp.dtype(compute_dtype) == jnp.bfloat16 else CPU_OPTIONS)


def matmul_precision(name: str = "default") -> contextlib.AbstractContextManager:
  """The context in which a jitted call traces with `name`'s matmul precision.

  Args:
    name: "default", "tf32" or "highest" (see the module docstring).

  Returns:
    `jax.default_matmul_precision(...)`, or a null context for "default".

  Raises:
    ValueError: an unknown name.
  """
  if name not in MATMUL_PRECISIONS:
    raise ValueError(f"unknown matmul_precision {name!r}; known: {', '.join(MATMUL_PRECISIONS)}")
  value = MATMUL_PRECISIONS[name]
  return contextlib.nullcontext() if value is None else jax.default_matmul_precision(value)


class _Precise:
  """A jitted callable traced (called and lowered) under one matmul precision."""

  def __init__(self, jitted: Callable, precision: str):
    matmul_precision(precision)  # validates the name now
    self._jitted, self.precision = jitted, precision

  def __call__(self, *args, **kwargs):
    with matmul_precision(self.precision):
      return self._jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with matmul_precision(self.precision):
      return self._jitted.lower(*args, **kwargs)


def jit_boundary(jitted: Callable, matmul_precision: str = "default") -> Callable:
  """A `jax.jit` result at the platform boundary: compilation cache on, called and lowered at `matmul_precision`.

  Args:
    jitted: a jitted function (e.g. the train step).
    matmul_precision: "default", "tf32" or "highest".

  Returns:
    `jitted` itself for "default", else a wrapper with the same `__call__` and `lower`.
  """
  init_compilation_cache()
  wrapped = _Precise(jitted, matmul_precision)  # validates the name
  return jitted if matmul_precision == "default" else wrapped


class _Jitted:
  """jax.jit with compiler options, falling back to plain jit if XLA rejects them."""

  def __init__(self, fn: Callable, options: dict[str, Any] | None, jit_kwargs: dict[str, Any], precision: str):
    init_compilation_cache()
    self._plain = jax.jit(fn, **jit_kwargs)
    self._tuned = jax.jit(fn, compiler_options=options, **jit_kwargs) if options else None
    self.options, self.precision = options, precision
    matmul_precision(precision)  # validates the name now

  def __call__(self, *args, **kwargs):
    with matmul_precision(self.precision):
      if self._tuned is None:
        return self._plain(*args, **kwargs)
      try:
        return self._tuned(*args, **kwargs)
      except jax.errors.JaxRuntimeError as e:
        if not any(name in str(e) for name in self.options):
          raise
        warnings.warn(
          f"XLA rejected compiler options {self.options} ({e}); using defaults", RuntimeWarning, stacklevel=2
        )
        self._tuned = None
        return self._plain(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with matmul_precision(self.precision):
      return (self._tuned or self._plain).lower(*args, **kwargs)


def jit(fn: Callable, *, compute_dtype: Any = jnp.float32, matmul_precision: str = "default", **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` with `compiler_options(compute_dtype=...)` on CPU, traced under `matmul_precision`."""
  return _Jitted(fn, compiler_options(compute_dtype=compute_dtype), jit_kwargs, matmul_precision)


def compilation_cache_dir(setting: str | None = None) -> str | None:
  """The persistent compilation cache folder, or None when the cache is off.

  Args:
    setting: a folder, "" (the default folder) or an off word ("off", "0",
      "false", "no", "none"); None reads `$LASPAR_COMPILATION_CACHE`.

  Returns:
    An absolute folder, or None.
  """
  setting = os.environ.get(CACHE_ENV, "") if setting is None else setting
  if setting.strip().lower() in CACHE_OFF:
    return None
  if setting:
    return os.path.abspath(os.path.expanduser(setting))
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "laspar_jax", "jax_cache")


def init_compilation_cache(setting: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache (see `compilation_cache_dir`); idempotent.

  A cache folder already set in JAX's config (`JAX_COMPILATION_CACHE_DIR`, or
  the user's `jax.config.update`) wins over ours.

  Args:
    setting: as `compilation_cache_dir` (None: the environment).

  Returns:
    The folder in use, or None when off.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = compilation_cache_dir(setting)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    warnings.warn(f"compilation cache {path} unusable ({e}); compiling without it", RuntimeWarning, stacklevel=2)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
  return path


def cuda_capability() -> tuple[int, int] | None:
  """The first GPU's CUDA compute capability, e.g. (9, 0); None when there is no CUDA GPU."""
  try:
    device = jax.devices("gpu")[0]
    if "cuda" not in device.client.platform_version.lower():
      return None
    major, minor = str(device.compute_capability).split(".")[:2]
    return int(major), int(minor)
  except (RuntimeError, ValueError, AttributeError, IndexError):
    return None


def cudnn_attention_problem(
  backend: str, dtype: Any = None, head_dim: int | None = None, compute_capability: tuple[int, int] | None = None
) -> str | None:
  """Why cuDNN's fused attention cannot serve a model, or None when it can (unknown fields pass).

  The rules (`models.attention.cudnn_attention` cites their source): a CUDA GPU of
  compute capability >= 8.0 (`CUDNN_MIN_CAPABILITY`), a bf16 / fp16 compute dtype,
  a head dim that is a multiple of 8 and <= 128 (<= 256 from capability 9.0).
  `compute_capability` (0, 0) means a GPU that is not CUDA.
  """
  if backend != "gpu":
    return f"cuDNN runs on CUDA GPUs; the backend is {backend!r}"
  if compute_capability == (0, 0):
    return "the GPU is not a CUDA GPU (no cuDNN)"
  if compute_capability is not None and compute_capability < CUDNN_MIN_CAPABILITY:
    return f"cuDNN fused attention needs compute capability >= 8.0, the GPU has {compute_capability}"
  if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cuDNN fused attention needs a bfloat16 or float16 compute dtype (model.dtype), got {jnp.dtype(dtype)}"
  h_max = 256 if compute_capability is not None and compute_capability >= (9, 0) else 128
  if head_dim is not None and (head_dim % 8 or head_dim > h_max):
    return f"cuDNN fused attention needs a head dim that is a multiple of 8 and <= {h_max}, the model has {head_dim}"
  return None


def attention_impl(
  requested: str = "auto",
  backend: str | None = None,
  *,
  dtype: Any = None,
  head_dim: int | None = None,
  has_bias: bool = False,
  compute_capability: tuple[int, int] | None = None,
) -> str:
  """Resolves an attention implementation name for `models.attention.attention` when a model is built.

  "auto": "cpu" on the CPU backend; on a GPU "cudnn" when `cudnn_attention_problem`
  finds none, the dtype and head dim are known and there is no additive bias (T5's
  relative bias would enter cuDNN in bf16 and be materialised [B, H, T, S] with its
  gradient), else "xla"; "xla" on TPUs and elsewhere.

  Args:
    requested: "auto", "xla", "cpu" or "cudnn"; explicit names pass through ("cudnn" is checked).
    backend: the backend deciding (default: the JAX backend, whose GPU is then asked for its
      compute capability).
    dtype: the attention's compute dtype (the model's), None when unknown.
    head_dim: per-head dimension, None when unknown.
    has_bias: the model adds a bias to the logits (T5's relative position bias).
    compute_capability: the CUDA GPU's, e.g. (9, 0); None: unknown (or asked, see `backend`).

  Returns:
    The implementation name.

  Raises:
    ValueError: an unknown name, or "cudnn" where cuDNN cannot serve (names `model.attention_impl`).
  """
  if requested != "auto" and requested not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {requested!r}; known: auto, {', '.join(ATTENTION_IMPLS)}")
  if requested in ("xla", "cpu"):
    return requested
  if backend is None:
    backend = jax.default_backend()
    if backend == "gpu" and compute_capability is None:
      compute_capability = cuda_capability() or (0, 0)
  if requested == "cudnn":
    problem = cudnn_attention_problem(backend, dtype, head_dim, compute_capability)
    if problem:
      raise ValueError(f"model.attention_impl='cudnn' cannot serve this model: {problem}")
    return "cudnn"
  if backend == "cpu":
    return "cpu"
  if backend != "gpu" or dtype is None or head_dim is None or has_bias:
    return "xla"
  return "xla" if cudnn_attention_problem(backend, dtype, head_dim, compute_capability) else "cudnn"
