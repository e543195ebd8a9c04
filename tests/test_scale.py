"""7B/8B Llama-sized backbones shard over 8 CPU devices: abstract shapes only (`nnx.eval_shape`), nothing materialised.

Every parameter carries logical axis names; the per-device parameter bytes
are the sharded share (1/4 or 1/8) plus what the rules replicate (norms, and
the k/v projections while "kv" maps to no mesh axis); LoRA's optimizer state
is a sliver of the model.
"""

import math

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from laspar_jax import mesh as mesh_lib
from laspar_jax import optim
from laspar_jax.models import backbone, layers, lora
from laspar_jax.models import llama  # noqa: F401  (registers the "llama" family)

LLAMA2_7B = dict(
  model_type="llama",
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=11008,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=32,
  rms_norm_eps=1e-5,
)
LLAMA3_8B = dict(
  model_type="llama",
  vocab_size=128256,
  hidden_size=4096,
  intermediate_size=14336,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=8,
  rope_theta=500000.0,
  rope_scaling={
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  },
)
KV_SHARDED = tuple((k, "model" if k == "kv" else v) for k, v in mesh_lib.DEFAULT_RULES)


def _abstract(hf: dict, *, scan: bool = False, lora_rank: int = 0) -> nnx.Module:
  family = backbone.FAMILIES[hf["model_type"]]
  cfg = family.config_from_hf({**hf, "scan_layers": scan})

  def build():
    model = family.build(cfg, rngs=nnx.Rngs(0))
    model.lm_head = family.lm_head(model, cfg, rngs=nnx.Rngs(1))
    if lora_rank:
      lora.apply_lora(
        model, targets=lora.default_targets("llama"), rank=lora_rank, alpha=2 * lora_rank, rngs=nnx.Rngs(2)
      )
    return model

  return nnx.eval_shape(build)


def _expected_params(hf: dict) -> int:
  d, f, v, n = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
  kv = d * hf["num_key_value_heads"] // hf["num_attention_heads"]
  per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
  return 2 * v * d + n * per_layer + d


def _bytes(model: nnx.Module, mesh, rules):
  """(total, per device, replicated) parameter bytes under `rules`."""
  shardings = mesh_lib.state_shardings(model, mesh, rules)
  total = per_device = replicated = 0
  for (path, var), (_, sh) in zip(
    nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.split_state(shardings, nnx.Param, ...)[0])
  ):
    value = var.get_value()
    assert isinstance(value, jax.ShapeDtypeStruct), path  # nothing materialised
    axes = layers.logical_axes(var)
    assert axes is not None and len(axes) == value.ndim, (path, axes)
    nbytes = math.prod(value.shape) * value.dtype.itemsize
    shard = math.prod(sh.get_value().shard_shape(value.shape)) * value.dtype.itemsize
    total, per_device = total + nbytes, per_device + shard
    if shard == nbytes:
      replicated += nbytes
  return total, per_device, replicated


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
def test_llama2_7b_shards_over_the_model_axis(mesh_shape):
  mesh = mesh_lib.make_mesh(*mesh_shape)
  model = _abstract(LLAMA2_7B)
  n_params = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert n_params == _expected_params(LLAMA2_7B) and 6.5e9 < n_params < 7e9
  k = mesh_shape[1]
  total, per_device, replicated = _bytes(model, mesh, KV_SHARDED)
  norms = (2 * LLAMA2_7B["num_hidden_layers"] + 1) * LLAMA2_7B["hidden_size"] * 4
  assert replicated == norms  # with "kv" -> model everything but the norms is split k ways
  assert per_device == (total - replicated) // k + replicated
  assert per_device <= total / k + norms
  total, per_device_default, replicated = _bytes(model, mesh, mesh_lib.DEFAULT_RULES)
  kv_bytes = 2 * LLAMA2_7B["num_hidden_layers"] * 4096 * 4096 * 4  # default rules replicate k/v projections
  assert replicated == norms + kv_bytes
  assert per_device_default == (total - replicated) // k + replicated


def test_llama3_8b_scanned_and_lora():
  mesh = mesh_lib.make_mesh(2, 4)
  plain = _bytes(_abstract(LLAMA3_8B), mesh, mesh_lib.DEFAULT_RULES)
  scanned_model = _abstract(LLAMA3_8B, scan=True)
  q = scanned_model.layers.layer.self_attn.q_proj.kernel
  assert q.get_value().shape == (32, 4096, 4096) and layers.logical_axes(q)[0] == "layers"
  scanned = _bytes(scanned_model, mesh, mesh_lib.DEFAULT_RULES)
  assert scanned == plain  # stacking changes no byte count
  total, per_device, replicated = plain
  assert 7.5e9 * 4 < total < 8.1e9 * 4
  assert replicated < 0.04 * total and per_device <= total / 4 + replicated

  model = _abstract(LLAMA3_8B, scan=True, lora_rank=16)
  adapted = lora.lora_modules(model)
  assert len(adapted) == 7 and adapted[0].lora_a.get_value().shape[0] == 32  # stacked over the layers
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  o = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      warmup_steps=0,
      schedule="constant",
      end_lr=0.0,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip=1.0,
      head_lr_mult=1.0,
      freeze=(),
    )
  )
  labels = jax.tree.leaves(optim.param_labels(params, o))
  assert set(labels) == {"lora", "frozen"}
  tx, _ = optim.make_optimizer(o, 100, params)
  opt_state = jax.eval_shape(tx.init, params)
  opt_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
  n_lora = lora.lora_param_count(model)
  assert n_lora == 32 * 16 * (2 * 4096 * 2 + 2 * (4096 + 1024) + 3 * (4096 + 14336))
  assert opt_bytes < 2 * n_lora * 4 + 64 and opt_bytes < 0.02 * total
  # Adapters shard like their base: lora_b of q_proj splits its output ("heads") over the model axis.
  spec = mesh_lib.state_shardings(model, mesh)["layers"]["layer"]["self_attn"]["q_proj"]["lora_b"].get_value().spec
  assert tuple(spec) == (None, None, "model")
  assert np.isclose(_bytes(model, mesh, mesh_lib.DEFAULT_RULES)[0] - total, n_lora * 4)
