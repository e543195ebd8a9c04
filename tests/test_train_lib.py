"""Train step (sharded == unsharded, accumulation), non-finite stop, end-to-end train + eval."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import laspar  # noqa: E402
import tiny_bert  # noqa: E402

from laspar_jax import checkpointing, mesh as mesh_lib, optim, schedules, train_lib  # noqa: E402
from laspar_jax import train_state, train_step  # noqa: E402
from laspar_jax.data import assemble  # noqa: E402
from laspar_jax.models import sparse_encoder  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)


def tiny_config(tiny_path, shared_data, **over):
  """configs/laspar.py:runlocal on the tiny BERT: D=512, 8 queries per batch, short sequences."""
  c = laspar.get_config("runlocal")
  c.model.backbone = str(tiny_path)
  c.model.latent_dim = 512
  c.model.query_max_len = 16
  c.model.doc_max_len = 32
  c.model.head_kwargs.kernel_std = 1.0
  c.data.collection = str(shared_data / "scifact")
  c.data.teacher_model = str(tiny_path)
  c.data.prefetch = 0
  c.data.teacher = "none"
  c.loss.distill = ""
  c.train.dropout = False  # threefry dropout takes ~40 s to compile on a busy 2-core CPU
  c.optim.batch_size = 8
  c.optim.warmup_steps = 1
  c.train.q_topk = 64
  c.train.d_topk = 128
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.final_eval = False
  c.eval.collection = str(shared_data / "scifact")
  c.eval.split = "test"
  c.eval.max_docs = 64
  c.eval.max_queries = 16
  c.eval.batch_size = 16
  for k, v in over.items():
    c.update_from_flattened_dict({k: v})
  return c


def _batch(rng, B, n, Lq, Ld, E=8, accum=0):
  lead = (accum,) if accum else ()
  M = B * (1 + n)

  def ids(rows, L):
    x = rng.integers(1000, 5000, lead + (rows, L)).astype(np.int32)
    m = np.ones(lead + (rows, L), np.int32)
    m[..., L // 2 :] = rng.integers(0, 2, lead + (rows, L - L // 2))
    return x * m, m

  qi, qm = ids(B, Lq)
  di, dm = ids(M, Ld)
  tq = rng.standard_normal(lead + (B, E)).astype(np.float32)
  td = rng.standard_normal(lead + (M, E)).astype(np.float32)
  return {
    "q_input_ids": qi,
    "q_attention_mask": qm,
    "d_input_ids": di,
    "d_attention_mask": dm,
    "teacher_q": tq,
    "teacher_d": td,
  }


def _run_steps(config, mesh, batches):
  enc, _ = sparse_encoder.build_encoder(train_lib.encoder_config(config))
  params = train_state.encoder_params(enc)
  tx, lr = optim.make_optimizer(config.optim, config.train.total_steps, params)
  graphdef, rest, state, sh = train_state.create_train_state(
    enc, tx, mesh, seed=config.seed, rules=mesh_lib.rules_from_config(config)
  )
  trainable = optim.trainable_mask(params, config.optim)
  step = train_step.make_train_step(
    graphdef,
    rest,
    tx,
    lr,
    train_step.StepConfig.from_config(config, mesh),
    sh,
    mesh,
    trainable=None if all(jax.tree.leaves(trainable)) else trainable,
  )
  metrics = []
  for b in batches:
    state, m = step(state, mesh_lib.put_batch(b, mesh, config.optim.accum_steps > 1))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics, state


def _regularizers(*terms):
  return ml_collections.ConfigDict(
    {f"{side}_{name}": {"name": name, "side": side, "weight": w} for name, side, w in terms}
  )


def test_sharded_step_equals_unsharded(tiny_path, shared_data):
  """2 steps x 2 accumulated micro-batches: mesh data=2 x model=4 equals one device."""
  c = tiny_config(
    tiny_path,
    shared_data,
    **{"optim.accum_steps": 2, "data.n_neg": 1, "loss.reg_warmup_steps": 4, "loss.distill": "dense_kl"},
  )
  c.loss.regularizers = _regularizers(("flops", "q", 1e-2), ("l1", "d", 1e-3), ("equipartition", "d", 1e-2))
  rng = np.random.default_rng(0)
  batches = [_batch(rng, 8, 1, 16, 32, accum=2) for _ in range(2)]
  s1, m1, _ = _run_steps(c, mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1]), batches)
  s8, m8, live = _run_steps(c, mesh_lib.make_mesh(2, 4), batches)
  # The D-sized head is really sharded on 'model', the batch on 'data'.
  kernel = live.params["query_head"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert int(s8.step) == 2 and int(s8.bad_step) == -1
  for a, b in zip(m1, m8):
    for k in (
      "loss",
      "grad_norm",
      "active_q",
      "active_d",
      "distill/dense_kl",
      "reg/q_flops",
      "reg/d_l1",
      "reg/d_equipartition",
      "flops_est",
    ):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)
  # Attention key biases have an exactly-zero true gradient (softmax is shift-invariant), so
  # Adam turns float rounding noise (which differs with the reduction order) into updates of
  # either sign: they are the only parameters not compared.
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s1.params)[0], jax.tree.leaves(s8.params)):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" not in name:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
  # Every loss term is reported; regularizer weights follow the quadratic warm-up; top-k holds.
  for k in (
    "loss",
    "ranking/inbatch_ce",
    "distill/dense_kl",
    "reg/q_flops",
    "reg/d_l1",
    "reg/d_equipartition",
    "reg/q_flops_weight",
    "active_q",
    "active_d",
    "flops_est",
    "grad_norm",
    "lr",
    "param_norm",
  ):
    assert k in m1[1], k
  assert m1[0]["reg/q_flops_weight"] == 0.0
  np.testing.assert_allclose(m1[1]["reg/q_flops_weight"], 1e-2 * (1 / 4) ** 2, rtol=1e-6)
  assert 0 < m1[1]["active_q"] <= 64 and 0 < m1[1]["active_d"] <= 128
  # and the parameters moved
  enc, _ = sparse_encoder.build_encoder(train_lib.encoder_config(c))
  init = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
  assert not np.allclose(init["query_head"]["kernel"], s1.params["query_head"]["kernel"])


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_path, shared_data, tmp_path, monkeypatch):
  c = tiny_config(tiny_path, shared_data, **{"train.total_steps": 8, "train.log_every": 8})
  real = schedules.quadratic_warmup
  # The regularizer weight (a traced function of the step) turns NaN from step 3 on.
  monkeypatch.setattr(schedules, "quadratic_warmup", lambda step, **kw: jnp.where(step >= 3, jnp.nan, real(step, **kw)))
  with pytest.raises(train_lib.NonFiniteLossError, match="non-finite at step 3.*checkpoint is step 2"):
    train_lib.train_and_evaluate(c, tmp_path)
  ck = checkpointing.Checkpointer(tmp_path / "checkpoints", every=2)
  assert ck.all_steps() == [2]
  ck.close()
  assert not (tmp_path / "encoder").exists()


def test_train_and_evaluate_end_to_end(tiny_path, shared_data, tmp_path):
  c = tiny_config(
    tiny_path,
    shared_data,
    **{"train.total_steps": 2, "train.final_eval": True, "data.teacher": "dense", "loss.distill": "dense_kl"},
  )
  res = train_lib.train_and_evaluate(c, tmp_path)
  assert res["step"] == 2 and not res["preempted"]
  assert {"nDCG@10", "RR@10", "active_q", "active_d"} <= set(res["eval"])
  assert 0 < res["eval"]["active_q"] <= c.eval.q_topk
  for k in ("loss", "examples_per_second", "grad_norm"):
    assert np.isfinite(res["train"][k])
  enc, tok = sparse_encoder.load_encoder(res["encoder"])
  assert enc.output_dim == 512
  assert (tmp_path / "tb").is_dir() and (tmp_path / "teacher" / "docs").is_dir()
  assert (tmp_path / "config.json").is_file() and (tmp_path / "eval" / "2" / "run.trec").is_file()
  rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 2] and "train/loss" in rows[0]
  assert rows[1]["eval/nDCG@10"] == res["eval"]["nDCG@10"]
  assert json.loads((tmp_path / "eval" / "2" / "metrics.json").read_text()) == res["eval"]


def test_bf16_compute_keeps_fp32_params_and_mlm_head_trains(tiny_path, shared_data):
  """SPLADE's tied MLM head in bfloat16 compute: parameters (master weights) stay float32."""
  c = tiny_config(
    tiny_path, shared_data, **{"model.dtype": "bfloat16", "model.head": "mlm", "train.q_topk": 0, "train.d_topk": 0}
  )
  c.model.head_kwargs = {"pooling": "max"}
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  s, ms, _ = _run_steps(c, mesh, [_batch(np.random.default_rng(2), 8, 0, 16, 32) for _ in range(2)])
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(s.params))
  assert np.isfinite(ms[1]["loss"]) and ms[1]["grad_norm"] > 0
  assert "decoder" not in s.params["query_backbone"]["lm_head"]  # tied to the word embeddings
  assert ms[1]["active_d"] > 0


def test_frozen_backbone_gets_no_update_and_no_optimizer_moments(tiny_path, shared_data):
  """optim.freeze: frozen parameters stay bitwise, and only the trainable head carries Adam moments."""
  c = tiny_config(tiny_path, shared_data)
  c.optim.freeze = ("backbone",)
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  init = train_state.encoder_params(sparse_encoder.build_encoder(train_lib.encoder_config(c))[0])
  s, ms, _ = _run_steps(c, mesh, [_batch(np.random.default_rng(3), 8, 0, 16, 32) for _ in range(2)])
  nbytes = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
  moments = [x for x in jax.tree.leaves(s.opt_state) if x.ndim > 0]
  assert nbytes(moments) == 2 * nbytes(jax.tree.leaves(init["query_head"]))  # mu + nu of the head only
  assert nbytes(jax.tree.leaves(s.opt_state)) - nbytes(moments) <= 16  # a few step counts
  jax.tree.map(np.testing.assert_array_equal, s.params["query_backbone"], init["query_backbone"])
  assert not np.allclose(s.params["query_head"]["kernel"], init["query_head"]["kernel"])
  assert np.isfinite(ms[1]["loss"]) and ms[1]["grad_norm"] > 0


def test_clustered_batching_draws_batches_from_teacher_clusters(tiny_path, shared_data, tmp_path):
  c = tiny_config(tiny_path, shared_data, **{"data.teacher": "dense"})
  c.data.batching = "clustered"
  tok = sparse_encoder.build_encoder(train_lib.encoder_config(c))[1]
  pipe, info = assemble.build_pipeline(c, tok, tmp_path, progress=False)
  try:
    assert info["batching"] == "clustered" and pipe.groups is not None
    assert info["steps_per_epoch"] == len(pipe.groups) >= info["examples"] // 8 - 1
    batch = next(assemble.micro_batches(pipe, 1))
    idx = sorted(pipe.example_indices(0, 0).tolist())
    assert any(idx == g.tolist() for g in pipe.groups) and batch["teacher_q"].shape == (8, 32)
  finally:
    pipe.close()
  c.data.teacher = "none"
  with pytest.raises(ValueError, match="clustered"):
    assemble.build_pipeline(c, tok, tmp_path, progress=False)
