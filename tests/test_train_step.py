"""train_step: regularizer terms from the config's named dicts, StepConfig."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from laspar_jax import loss_terms, train_step
from laspar_jax import mesh as mesh_lib


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
