"""train_step: regularizer terms from the config's named dicts, StepConfig."""
import jax
import ml_collections
import pytest

from laspar_jax import mesh as mesh_lib
from laspar_jax import train_step


def _regs(**terms):
  return ml_collections.ConfigDict({k: dict(name=n, side=s, weight=w) for k, (n, s, w) in terms.items()})


def test_regularizers_in_canonical_order():
  # A ConfigDict iterates its keys sorted; the terms are summed in REGULARIZERS order, queries first.
  regs = _regs(d_equipartition=("equipartition", "d", 5e-3), d_flops=("flops", "d", 5e-3),
               q_flops=("flops", "q", 5e-3))
  assert train_step.regularizers_from_config(regs) == (
      ("flops", "q", 5e-3), ("flops", "d", 5e-3), ("equipartition", "d", 5e-3))
  assert train_step.regularizers_from_config(_regs(a=("l1", "d", 1), b=("flops", "q", 2))) == (
      ("flops", "q", 2.0), ("l1", "d", 1.0))
  assert train_step.regularizers_from_config(ml_collections.ConfigDict()) == ()
  assert train_step.regularizers_from_config(None) == ()


@pytest.mark.parametrize("term, msg", [
    (("nope", "q", 1.0), "name"), (("flops", "x", 1.0), "side"),
])
def test_bad_regularizer(term, msg):
  with pytest.raises(ValueError, match=msg):
    train_step.regularizers_from_config(_regs(t=term))
  with pytest.raises(ValueError, match="exactly the fields"):
    train_step.regularizers_from_config({"t": {"name": "flops", "side": "q"}})


def test_step_config_from_config():
  c = ml_collections.ConfigDict()
  c.loss = dict(ranking="inbatch_ce", ranking_weight=1.0, temperature=0.05, distill="", distill_weight=1.0,
                teacher_temperature=0.05, regularizers=_regs(q_flops=("flops", "q", 5e-3)),
                reg_warmup_steps=5, flops_per_shard=True)
  c.optim = dict(accum_steps=2)
  c.train = dict(dropout=False, rng_impl="rbg", q_topk=64, d_topk=0)
  mesh = mesh_lib.make_mesh(2, 4)
  cfg = train_step.StepConfig.from_config(c, mesh)
  assert cfg.distill is None and cfg.regularizers == (("flops", "q", 5e-3),)
  assert cfg.flops_num_shards == 2 and cfg.accum_steps == 2 and cfg.q_topk == 64
  hash(cfg)  # static argument of the jitted step
  assert len(jax.devices()) == 8
