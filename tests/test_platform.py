"""platform: compiler options by backend and dtype (results do not change), attention implementation choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laspar_jax import platform


def test_options_by_backend():
  assert platform.compiler_options("cpu") == platform.CPU_OPTIONS
  assert platform.compiler_options() == platform.CPU_OPTIONS  # tests run on CPU
  assert platform.compiler_options("gpu") is None
  assert platform.compiler_options("tpu") is None
  assert platform.compiler_options("cpu", jnp.bfloat16) == platform.CPU_BF16_OPTIONS
  assert platform.compiler_options("cpu", "bfloat16") == platform.CPU_BF16_OPTIONS
  assert platform.compiler_options("cpu", "float32") == platform.CPU_OPTIONS
  assert platform.compiler_options("gpu", jnp.bfloat16) is None


def _mlp(w1, w2, x):
  return jnp.sum(jax.nn.gelu(x @ w1) @ w2, -1)


def test_tuned_jit_equals_plain_jit():
  rng = np.random.default_rng(0)
  w1, w2, x = (rng.standard_normal(s).astype(np.float32) for s in [(64, 256), (256, 64), (96, 64)])
  tuned = platform.jit(_mlp)
  assert tuned.options == platform.CPU_OPTIONS
  np.testing.assert_allclose(np.asarray(tuned(w1, w2, x)), np.asarray(jax.jit(_mlp)(w1, w2, x)), rtol=1e-5, atol=1e-4)
  # The option reached XLA: the compiled module has no YNNPACK fusion left.
  hlo_tuned = tuned.lower(w1, w2, x).compile().as_text()
  assert "__ynn_fusion" not in hlo_tuned


def test_rejected_option_falls_back_with_warning(monkeypatch):
  monkeypatch.setattr(platform, "CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "bogus"})
  fn = platform.jit(lambda x: x * 2.0)
  with pytest.warns(RuntimeWarning, match="rejected"):
    out = fn(jnp.ones(3))
  np.testing.assert_array_equal(np.asarray(out), 2.0)
  np.testing.assert_array_equal(np.asarray(fn(jnp.ones(3))), 2.0)  # plain jit from now on


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")
def test_bf16_dense_stays_bf16_in_a_library_dot():
  """The bf16 Dense product reaches YNNPACK with bf16 operands (not upcast to an fp32 dot)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from laspar_jax.models.layers import Dense  # pylint: disable=g-import-not-at-top

  layer = Dense(64, 96, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((128, 64)), jnp.bfloat16)
  fn = platform.jit(lambda x: layer(x), compute_dtype=jnp.bfloat16)
  hlo = fn.lower(x).compile().as_text()
  assert "__ynn_fusion" in hlo
  assert "f32[128,64]" not in hlo  # x is never upcast for an fp32 dot...
  fp32_opts = platform.jit(lambda x: layer(x)).lower(x).compile().as_text()
  assert "f32[128,64]" in fp32_opts  # ...as it is with the fp32 (Eigen) options
  ref = np.asarray(x, np.float32) @ np.asarray(layer.kernel[...].astype(jnp.bfloat16), np.float32)
  np.testing.assert_allclose(np.asarray(fn(x), np.float32), ref, rtol=2e-2, atol=2e-2)


def test_attention_impl_choice():
  assert platform.attention_impl() == "cpu"  # tests run on CPU
  assert platform.attention_impl("auto", backend="gpu") == "xla"
  assert platform.attention_impl("auto", backend="tpu") == "xla"
  assert platform.attention_impl("xla") == "xla" and platform.attention_impl("cpu", backend="gpu") == "cpu"
  with pytest.raises(ValueError, match="flash"):
    platform.attention_impl("flash")


BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16


@pytest.mark.parametrize(
  "backend, dtype, head_dim, bias, cc, expected",
  [
    ("cpu", BF16, 64, False, None, "cpu"),
    ("tpu", BF16, 64, False, None, "xla"),
    ("gpu", BF16, 64, False, (9, 0), "cudnn"),
    ("gpu", F16, 32, False, (8, 0), "cudnn"),
    ("gpu", BF16, 128, False, None, "cudnn"),  # capability unknown: the pre-Hopper limits
    ("gpu", F32, 64, False, (9, 0), "xla"),  # fp32: cuDNN takes bf16 / fp16 only
    ("gpu", BF16, 64, True, (9, 0), "xla"),  # a logit bias (T5)
    ("gpu", BF16, 60, False, (9, 0), "xla"),  # not a multiple of 8
    ("gpu", BF16, 256, False, (9, 0), "cudnn"),
    ("gpu", BF16, 256, False, (8, 0), "xla"),  # > 128 before Hopper
    ("gpu", BF16, 264, False, (9, 0), "xla"),
    ("gpu", BF16, 64, False, (7, 5), "xla"),  # before Ampere
    ("gpu", BF16, 64, False, (0, 0), "xla"),  # a GPU that is not CUDA
    ("gpu", BF16, None, False, (9, 0), "xla"),  # head dim unknown
    ("gpu", None, 64, False, (9, 0), "xla"),  # dtype unknown
  ],
)
def test_attention_auto_selection(backend, dtype, head_dim, bias, cc, expected):
  kw = dict(dtype=dtype, head_dim=head_dim, has_bias=bias, compute_capability=cc)
  assert platform.attention_impl("auto", backend, **kw) == expected


def test_explicit_cudnn_checked_at_build_time():
  ok = dict(dtype=BF16, head_dim=64)
  assert platform.attention_impl("cudnn", "gpu", **ok, has_bias=True) == "cudnn"  # allowed when asked for
  for backend, kw, reason in [
    ("gpu", dict(ok, dtype=F32), "bfloat16 or float16"),
    ("gpu", dict(ok, head_dim=72 + 4), "multiple of 8"),
    ("gpu", dict(ok, compute_capability=(7, 0)), "compute capability"),
    ("cpu", ok, "CUDA"),
    (None, ok, "CUDA"),  # the tests' backend is the CPU
  ]:
    with pytest.raises(ValueError, match=f"model.attention_impl='cudnn'.*{reason}"):
      platform.attention_impl("cudnn", backend, **kw)


def test_models_pass_what_the_choice_needs():
  from laspar_jax.models import backbone

  cases = {"bert-base-uncased": (64, False), "facebook/opt-1.3b": (64, False), "google/flan-t5-base": (64, True)}
  for hub_id, expected in cases.items():
    hf = backbone.known_config(hub_id)
    fam = backbone.family_for_type(hf["model_type"])
    assert fam.attention_shape(fam.config_from_hf(hf)) == expected
  assert all(f.attention_shape is not None for f in backbone.families().values())


def test_default_backend_only_in_platform():
  """Backend choices live at the boundary: no other module asks for the backend."""
  import pathlib

  root = pathlib.Path(platform.__file__).parent
  users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "default_backend(" in p.read_text())
  assert users == ["platform.py"]


def _dot_precisions(fn, *args) -> list[str]:
  return [line for line in fn.lower(*args).as_text().splitlines() if "dot_general" in line]


def test_matmul_precision_at_the_jit_boundary():
  a = jnp.ones((8, 8), jnp.float32)
  mm = lambda x, y: x @ y
  assert all("DEFAULT" in line for line in _dot_precisions(platform.jit(mm), a, a))
  assert all("HIGHEST" in line for line in _dot_precisions(platform.jit(mm, matmul_precision="highest"), a, a))
  assert all("HIGH," in line for line in _dot_precisions(platform.jit(mm, matmul_precision="tf32"), a, a))
  step = platform.jit_boundary(jax.jit(mm), "highest")
  assert all("HIGHEST" in line for line in _dot_precisions(step, a, a))
  np.testing.assert_allclose(np.asarray(step(a, a)), 8.0)
  plain = jax.jit(mm)
  assert platform.jit_boundary(plain) is plain  # "default": nothing wrapped
  with pytest.raises(ValueError, match="matmul_precision 'fp8'"):
    platform.jit(mm, matmul_precision="fp8")


def test_matmul_precision_is_a_checked_config_field():
  from configs import laspar  # pylint: disable=g-import-not-at-top
  from laspar_jax import config_check  # pylint: disable=g-import-not-at-top

  c = laspar.get_config("runlocal")
  assert c.model.matmul_precision == "default"
  c.model.matmul_precision = "tf16"
  with pytest.raises(ValueError, match="model.matmul_precision"):
    config_check.check_config(c)


def test_compilation_cache_setting(monkeypatch, tmp_path):
  monkeypatch.delenv(platform.CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert platform.compilation_cache_dir() == str(tmp_path / "xdg" / "laspar_jax" / "jax_cache")  # on by default
  monkeypatch.setenv(platform.CACHE_ENV, "off")
  assert platform.compilation_cache_dir() is None
  assert platform.init_compilation_cache() is None  # tests run with it off (conftest)
  monkeypatch.setenv(platform.CACHE_ENV, str(tmp_path / "mine"))
  assert platform.compilation_cache_dir() == str(tmp_path / "mine")
  assert platform.compilation_cache_dir("OFF") is None and platform.compilation_cache_dir("0") is None


def test_compilation_cache_writes_entries(tmp_path):
  """Turned on, a compiled computation lands in the folder; a folder the user set in JAX wins."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top

  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    assert old[0] is None
    assert platform.init_compilation_cache(str(tmp_path / "cache")) == str(tmp_path / "cache")
    assert platform.init_compilation_cache(str(tmp_path / "other")) == str(tmp_path / "cache")  # already set: kept
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()
    assert any((tmp_path / "cache").iterdir())
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


def test_encode_batch_size_defaults_per_backend():
  assert platform.encode_batch_size(0, "cpu") == 64
  assert platform.encode_batch_size(0, "gpu") == platform.encode_batch_size(0, "tpu") == 256
  assert platform.encode_batch_size(48, "gpu") == 48
  assert platform.encode_batch_size(0) == 64  # the tests run on CPU


def test_auto_cudnn_falls_back_to_xla_when_the_probe_fails(monkeypatch):
  """ "auto" picking cuDNN compiles a tiny forward + backward first; a device that rejects it gets XLA and a warning."""
  import functools

  from laspar_jax.models import attention, backbone, hf_weights

  hf = backbone.known_config("facebook/opt-1.3b")
  fam = backbone.family_for_type(hf["model_type"])
  cfg = fam.config_from_hf(hf)
  real = platform.attention_impl
  monkeypatch.setattr(platform, "attention_impl", lambda req, **kw: real(req, "gpu", compute_capability=(9, 0), **kw))
  attention.cudnn_problem.cache_clear()
  with pytest.warns(UserWarning, match="cuDNN attention failed a build-time probe"):
    assert hf_weights.attention_impl_for(fam, cfg, "auto", jnp.bfloat16) == "xla"  # no cuDNN on the CPU
  assert hf_weights.attention_impl_for(fam, cfg, "auto", jnp.float32) == "xla"  # not a cuDNN dtype: no probe
  # A device that compiles the probe keeps cuDNN (the kernel replaced by XLA's to stand in for one).
  monkeypatch.setattr(attention, "cudnn_attention", functools.partial(attention.cudnn_attention, implementation="xla"))
  attention.cudnn_problem.cache_clear()
  assert hf_weights.attention_impl_for(fam, cfg, "auto", jnp.bfloat16) == "cudnn"
  attention.cudnn_problem.cache_clear()
