"""train_step: regularizer terms from the config's named dicts, StepConfig, kernels cast once per tower."""

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from laspar_jax import loss_terms, train_state, train_step
from laspar_jax import mesh as mesh_lib
from laspar_jax.models import layers, sparse_encoder
from laspar_jax.models.encoder_config import EncoderConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import param_cast  # noqa: E402  (benchmarks/param_cast.py: the f32 -> bf16 conversion count)


def _regs(**terms):
  return ml_collections.ConfigDict({k: dict(name=n, side=s, weight=w) for k, (n, s, w) in terms.items()})


def test_regularizers_in_canonical_order():
  # A ConfigDict iterates its keys sorted; the terms are summed in REGULARIZERS order, queries first.
  regs = _regs(d_equipartition=("equipartition", "d", 5e-3), d_flops=("flops", "d", 5e-3), q_flops=("flops", "q", 5e-3))
  assert train_step.regularizers_from_config(regs) == (
    ("flops", "q", 5e-3),
    ("flops", "d", 5e-3),
    ("equipartition", "d", 5e-3),
  )
  assert train_step.regularizers_from_config(_regs(a=("l1", "d", 1), b=("flops", "q", 2))) == (
    ("flops", "q", 2.0),
    ("l1", "d", 1.0),
  )
  assert train_step.regularizers_from_config(ml_collections.ConfigDict()) == ()
  assert train_step.regularizers_from_config(None) == ()


@pytest.mark.parametrize(
  "term, msg",
  [
    (("nope", "q", 1.0), "name"),
    (("flops", "x", 1.0), "side"),
  ],
)
def test_bad_regularizer(term, msg):
  with pytest.raises(ValueError, match=msg):
    train_step.regularizers_from_config(_regs(t=term))
  with pytest.raises(ValueError, match="exactly the fields"):
    train_step.regularizers_from_config({"t": {"name": "flops", "side": "q"}})


def test_step_config_from_config():
  c = ml_collections.ConfigDict()
  c.loss = dict(
    ranking="inbatch_ce",
    ranking_weight=1.0,
    temperature=0.05,
    distill="",
    distill_weight=1.0,
    teacher_temperature=0.05,
    regularizers=_regs(q_flops=("flops", "q", 5e-3)),
    reg_warmup_steps=5,
    flops_per_shard=True,
  )
  c.optim = dict(accum_steps=2)
  c.train = dict(dropout=False, rng_impl="rbg", q_topk=64, d_topk=0)
  mesh = mesh_lib.make_mesh(2, 4)
  cfg = train_step.StepConfig.from_config(c, mesh)
  assert cfg.distill is None and cfg.regularizers == (("flops", "q", 5e-3),)
  assert cfg.flops_num_shards == 2 and cfg.accum_steps == 2 and cfg.q_topk == 64
  assert cfg.doc_reg_weights == ()  # a config without the field: today's behaviour
  hash(cfg)  # static argument of the jitted step
  c.loss.doc_reg_weights = (0.25, 0.75)
  cfg = train_step.StepConfig.from_config(c, mesh)
  assert cfg.doc_reg_weights == (0.25, 0.75)
  hash(cfg)
  assert len(jax.devices()) == 8


@pytest.mark.parametrize(
  "weights, want", [((), ()), (None, ()), ("", ()), ([0.5, 0.5], (0.5, 0.5)), ((0, 1), (0.0, 1.0))]
)
def test_doc_reg_weights_from_config(weights, want):
  assert train_step.doc_reg_weights_from_config(weights) == want


@pytest.mark.parametrize("weights", [(0.5,), (0.2, 0.3, 0.5), (-0.1, 1.0), "05", ("a", "b")])
def test_bad_doc_reg_weights(weights):
  with pytest.raises(ValueError, match="loss.doc_reg_weights"):
    train_step.doc_reg_weights_from_config(weights)


def test_doc_reg_weights_under_a_data_sharded_batch():
  """Positive / negative document regularizers on a batch sharded on 'data' equal the unsharded numbers."""
  mesh = mesh_lib.make_mesh(8, 1)
  rng = np.random.default_rng(0)
  B, G, D = 8, 3, 64
  rep_q = np.maximum(rng.normal(size=(B, D)), 0).astype(np.float32)
  rep_d = np.maximum(rng.normal(size=(B * G, D)), 0).astype(np.float32)
  regs = (("flops", "q", 0.1), ("flops", "d", 0.2))

  def f(q, d):
    return loss_terms.total_loss(
      rep_q_bv=q, rep_d_mv=d, regularizers=regs, flops_num_shards=8, doc_reg_weights=(0.25, 0.75)
    )

  spec = NamedSharding(mesh, P("data"))
  got, m = jax.jit(f)(jax.device_put(rep_q, spec), jax.device_put(rep_d, spec))
  want, mw = f(jnp.asarray(rep_q), jnp.asarray(rep_d))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  pos = rep_d[::G]
  per_shard = np.mean([(np.abs(x).mean(0) ** 2).sum() for x in np.split(pos, 8)])
  np.testing.assert_allclose(m["reg/d_flops/pos"], per_shard, rtol=1e-5)


def test_step_config_builds_the_loss_terms_once():
  """The step gets resolved LossTerms (settings picked per loss by losses.TERM_SETTINGS), no name branches."""
  cfg = train_step.StepConfig(
    ranking="pairwise_logistic",
    distill="kl",
    temperature=0.5,
    teacher_temperature=2.0,
    regularizers=(("flops", "q", 0.1), ("l1", "d", 0.2)),
    flops_num_shards=4,
  )
  assert [(t.role, t.name, t.side, dict(t.kwargs)) for t in cfg.terms] == [
    ("ranking", "pairwise_logistic", "", {}),  # its own temperature is not the CE temperature
    ("distill", "kl", "", {"temperature": 0.5, "teacher_temperature": 2.0}),
    ("reg", "flops", "q", {"num_shards": 4}),
    ("reg", "l1", "d", {}),
  ]
  assert dict(train_step.StepConfig().terms[0].kwargs) == {"temperature": 1.0}  # inbatch_ce
  with pytest.raises(ValueError, match="unknown ranking loss 'nope'"):
    train_step.StepConfig(ranking="nope")
  rng = np.random.default_rng(0)
  q, d = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(8, 8)).astype(np.float32)
  t = rng.normal(size=(4, 2)).astype(np.float32)
  got, _ = loss_terms.apply_terms(cfg.terms, rep_q_bv=q, rep_d_mv=d, teacher_scores_bn=t, reg_scale=0.5)
  want, _ = loss_terms.total_loss(
    rep_q_bv=q,
    rep_d_mv=d,
    teacher_scores_bn=t,
    ranking="pairwise_logistic",
    distill="kl",
    distill_kwargs={"temperature": 0.5, "teacher_temperature": 2.0},
    regularizers=(("flops", "q", 0.05), ("l1", "d", 0.1)),
    flops_num_shards=4,
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _llama_encoder(tmp_path, dtype: str, lora=None):
  """A tiny scanned (remat) Llama sparse encoder from the llama3 fixture, mlm head."""
  src = pathlib.Path(__file__).parent / "fixtures" / "llama3"
  dst = tmp_path / f"llama_{dtype}"
  if not dst.exists():
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**hf, "scan_layers": True}))
  cfg = EncoderConfig(
    backbone=str(dst), head="mlm", dtype=dtype, remat=True, query_max_len=8, doc_max_len=12, lora=lora or {}
  )
  return sparse_encoder.build_encoder(cfg)[0]


def _loss_and_grads(enc, cast: bool, trainable=None):
  """jit(value_and_grad(loss_fn)) with cast_params=`cast`; (loss, grads, compiled HLO text)."""
  graphdef, params, rest = nnx.split(enc, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(0)
  batch = {
    "q_input_ids": rng.integers(3, 128, (4, 8)),
    "q_attention_mask": np.ones((4, 8), np.int32),
    "d_input_ids": rng.integers(3, 128, (4, 12)),
    "d_attention_mask": np.r_[np.ones((3, 12)), [[1] * 5 + [0] * 7]].astype(np.int32),
  }
  cfg = train_step.StepConfig(cast_params=cast)

  def loss(p):
    if trainable is not None:
      p = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, trainable)
    return train_step.loss_fn(p, graphdef, rest, batch, jnp.int32(0), jax.random.key(0), cfg)[0]

  fn = jax.value_and_grad(loss)
  value, grads = jax.jit(fn)(params)
  return value, grads, jax.make_jaxpr(fn)(params).jaxpr


@pytest.mark.parametrize("lora", [False, True])
def test_params_cast_once_equal_the_per_use_casts(tmp_path, lora):
  """bf16 scanned Llama: kernels cast once per tower give bitwise the loss and fp32 grads of the per-use casts."""
  from laspar_jax import optim

  enc = _llama_encoder(tmp_path, "bfloat16", {"rank": 2, "alpha": 4} if lora else None)
  trainable = None
  if lora:
    o = ml_collections.ConfigDict(dict(freeze=(), lora_trainable=(), head_lr_mult=1.0))
    trainable = optim.trainable_mask(train_state.encoder_params(enc), o)
  once, per_use = _loss_and_grads(enc, True, trainable), _loss_and_grads(enc, False, trainable)
  assert np.isfinite(float(once[0]))
  # Bitwise: a cast commutes with slicing a layer out of the stack, and each tower's
  # cast has one use per parameter, so every bf16 gradient meets fp32 where it did before.
  np.testing.assert_array_equal(np.asarray(once[0]), np.asarray(per_use[0]))
  for (path, g1), g2 in zip(jax.tree_util.tree_flatten_with_path(once[1])[0], jax.tree.leaves(per_use[1])):
    assert g1.dtype == jnp.float32, path
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2), err_msg=jax.tree_util.keystr(path))
  kernels = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(once[1])[0] if "layers" in str(p))
  saved = param_cast.cast_elements(per_use[2]) - param_cast.cast_elements(once[2])
  assert saved >= kernels  # remat no longer re-casts the stacked kernels (per tower: >= one pass)


def test_cast_once_leaves_fp32_models_and_fp32_readers_alone(tmp_path):
  enc = _llama_encoder(tmp_path, "float32")
  assert layers.cast_once(enc) == 0
  graphdef, params, rest = nnx.split(enc, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  fp32 = [str(jax.make_jaxpr(lambda p, c=c: _merged_kernels(graphdef, p, rest, c))(params)) for c in (True, False)]
  assert fp32[0] == fp32[1]  # no cast inserted
  enc16 = _llama_encoder(tmp_path, "bfloat16")
  n = layers.cast_once(enc16)
  assert n == 7  # q, k, v, o, gate, up, down: stacked once each
  dtypes = {"/".join(map(str, p)): v.get_value().dtype for p, v in nnx.to_flat_state(nnx.state(enc16, nnx.Param))}
  cast = {k for k, d in dtypes.items() if d == jnp.bfloat16}
  assert len(cast) == 7 and all(k.startswith("query_backbone/layers/") and k.endswith("/kernel") for k in cast), cast
  assert any("norm" in k for k in dtypes) and any("lm_head" in k for k in dtypes)  # norms, embeddings, head: fp32


def _merged_kernels(graphdef, params, rest, cast):
  enc = nnx.merge(graphdef, params, rest)
  if cast:
    layers.cast_once(enc)
  return nnx.state(enc, nnx.Param)
