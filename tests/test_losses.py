"""Losses and regularizers against plain numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laspar_jax import loss_terms, losses

B, N, D, E = 4, 2, 64, 8
G = 1 + N
M = B * G


def _data(seed=0):
  rng = np.random.default_rng(seed)
  rep_q = np.maximum(rng.normal(size=(B, D)), 0).astype(np.float32)
  rep_d = np.maximum(rng.normal(size=(M, D)), 0).astype(np.float32)
  teacher = rng.normal(size=(B, G)).astype(np.float32)
  tq = rng.normal(size=(B, E)).astype(np.float32)
  td = rng.normal(size=(M, E)).astype(np.float32)
  return rep_q, rep_d, teacher, tq, td


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(t, s):
  lt, ls = _np_log_softmax(t), _np_log_softmax(s)
  return (np.exp(lt) * (lt - ls)).sum(-1)


def _np_own(scores):
  return np.stack([scores[b, b * G : (b + 1) * G] for b in range(B)])


def _np_cos(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return a @ b.T


def test_layout_helpers():
  s = np.arange(B * M, dtype=np.float32).reshape(B, M)
  np.testing.assert_array_equal(losses.group_scores(jnp.asarray(s)), _np_own(s))
  np.testing.assert_array_equal(losses.positive_columns(jnp.asarray(s)), np.arange(B) * G)
  with pytest.raises(ValueError):
    losses.group_size(jnp.zeros((3, 7)))


def test_ranking_losses():
  rep_q, rep_d, *_ = _data()
  s = rep_q @ rep_d.T
  sj = losses.score_matrix(rep_q_bv=jnp.asarray(rep_q), rep_d_mv=jnp.asarray(rep_d))
  np.testing.assert_allclose(sj, s, rtol=1e-5)
  tau = 0.5
  lab = np.arange(B) * G
  ref = -_np_log_softmax(s / tau)[np.arange(B), lab].mean()
  val, m = losses.inbatch_ce(scores_bm=sj, temperature=tau)
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  np.testing.assert_allclose(m["acc"], (s.argmax(1) == lab).mean())
  own = _np_own(s)
  ref = -_np_log_softmax(own / tau)[:, 0].mean()
  np.testing.assert_allclose(losses.group_ce(scores_bm=sj, temperature=tau)[0], ref, rtol=1e-5)
  diff = own[:, :1] - own[:, 1:]
  np.testing.assert_allclose(
    losses.RANKING_LOSSES["pairwise_hinge"](scores_bm=sj, margin=2.0)[0], np.maximum(2.0 - diff, 0).mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
    losses.RANKING_LOSSES["pairwise_logistic"](scores_bm=sj, temperature=tau)[0],
    np.log1p(np.exp(-diff / tau)).mean(),
    rtol=1e-5,
  )
  pos = s[np.arange(B), lab][:, None]
  keep = np.ones_like(s, bool)
  keep[np.arange(B), lab] = False
  ref = np.maximum(1.0 - (pos - s), 0)[keep].mean()
  val, m = losses.pairwise(scores_bm=sj, kind="hinge", in_batch=True)
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  np.testing.assert_allclose(m["pair_acc"], ((pos - s) > 0)[keep].mean(), rtol=1e-6)


def test_distillation_losses():
  rep_q, rep_d, teacher, tq, td = _data(1)
  s = rep_q @ rep_d.T
  sj = jnp.asarray(s)
  own = _np_own(s)
  ref = np.mean(((own[:, :1] - own[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])) ** 2)
  np.testing.assert_allclose(losses.margin_mse(scores_bm=sj, teacher_scores_bn=jnp.asarray(teacher))[0], ref, rtol=1e-5)
  ref = _np_kl(teacher / 2.0, own / 0.5).mean()
  val, _ = losses.kl_distill(
    scores_bm=sj, teacher_scores_bn=jnp.asarray(teacher), temperature=0.5, teacher_temperature=2.0
  )
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  cos = _np_cos(tq, td)
  np.testing.assert_allclose(
    losses.dense_teacher_scores(teacher_q_be=jnp.asarray(tq), teacher_d_me=jnp.asarray(td)), cos, atol=1e-6
  )
  ref = _np_kl(cos / 0.05, s / 0.1).mean()
  val, _ = losses.dense_kl(
    scores_bm=sj, teacher_q_be=jnp.asarray(tq), teacher_d_me=jnp.asarray(td), temperature=0.1, teacher_temperature=0.05
  )
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  np.testing.assert_allclose(
    losses.dense_mse(scores_bm=sj, teacher_q_be=jnp.asarray(tq), teacher_d_me=jnp.asarray(td))[0],
    np.mean((s - cos) ** 2),
    rtol=1e-5,
  )
  # KL is zero when the student reproduces the teacher.
  assert (
    float(losses.kl_distill(scores_bm=jnp.asarray(np.tile(teacher, (1, B))), teacher_scores_bn=jnp.asarray(teacher))[0])
    < 1e-6
  )


def test_regularizers():
  rng = np.random.default_rng(2)
  w = (np.maximum(rng.normal(size=(8, D)), 0) * rng.uniform(0.1, 3, size=(1, D))).astype(np.float32)
  w[:, :5] = 0  # unused dims
  wj = jnp.asarray(w)
  np.testing.assert_allclose(losses.flops(rep_bv=wj)[0], (np.abs(w).mean(0) ** 2).sum(), rtol=1e-5)
  per = [(np.abs(w[i * 2 : (i + 1) * 2]).mean(0) ** 2).sum() for i in range(4)]
  np.testing.assert_allclose(losses.flops(rep_bv=wj, num_shards=4)[0], np.mean(per), rtol=1e-5)
  assert not np.isclose(np.mean(per), (np.abs(w).mean(0) ** 2).sum())
  np.testing.assert_allclose(losses.l1(rep_bv=-wj)[0], np.abs(w).sum(1).mean(), rtol=1e-5)
  p = w.sum(0) / w.sum()
  ent = -(p[p > 0] * np.log(p[p > 0])).sum()
  val, m = losses.equipartition(rep_bv=wj)
  np.testing.assert_allclose(val, np.log(D) - ent, rtol=1e-5)
  np.testing.assert_allclose(m["effective_dims"], np.exp(ent), rtol=1e-5)
  # Uniform mass: zero penalty; gradient finite with zero-mass dims.
  assert abs(float(losses.equipartition(rep_bv=jnp.ones((3, D)))[0])) < 1e-5
  g = jax.grad(lambda x: losses.equipartition(rep_bv=jax.nn.relu(x))[0])(wj - 0.5)
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
  with pytest.raises(ValueError):
    losses.flops(rep_bv=wj, num_shards=3)


def test_total_loss_combines_terms():
  rep_q, rep_d, teacher, tq, td = _data(3)
  rep_q[:, :10] = 0
  kw = dict(
    rep_q_bv=jnp.asarray(rep_q),
    rep_d_mv=jnp.asarray(rep_d),
    teacher_q_be=jnp.asarray(tq),
    teacher_d_me=jnp.asarray(td),
    teacher_scores_bn=jnp.asarray(teacher),
  )
  regs = (("flops", "q", 0.3), ("flops", "d", 0.2), ("equipartition", "d", 0.1))

  @jax.jit
  def f(kw):
    return loss_terms.total_loss(
      **kw,
      ranking="inbatch_ce",
      ranking_weight=0.5,
      ranking_kwargs={"temperature": 0.5},
      distill="dense_kl",
      distill_weight=2.0,
      distill_kwargs={"temperature": 0.5},
      regularizers=regs,
      flops_num_shards=2,
    )

  loss, m = f(kw)
  s = jnp.asarray(rep_q @ rep_d.T)
  expect = (
    0.5 * losses.inbatch_ce(scores_bm=s, temperature=0.5)[0]
    + 2.0
    * losses.dense_kl(scores_bm=s, teacher_q_be=kw["teacher_q_be"], teacher_d_me=kw["teacher_d_me"], temperature=0.5)[0]
    + 0.3 * losses.flops(rep_bv=kw["rep_q_bv"], num_shards=2)[0]
    + 0.2 * losses.flops(rep_bv=kw["rep_d_mv"], num_shards=2)[0]
    + 0.1 * losses.equipartition(rep_bv=kw["rep_d_mv"])[0]
  )
  np.testing.assert_allclose(loss, expect, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], loss)
  for key in (
    "ranking/inbatch_ce",
    "ranking/inbatch_ce/acc",
    "distill/dense_kl",
    "reg/q_flops",
    "reg/d_flops",
    "reg/d_equipartition",
    "reg/d_equipartition/effective_dims",
    "reg/q_flops_weight",
  ):
    assert key in m, key
  np.testing.assert_allclose(m["active_q"], (rep_q != 0).sum(1).mean())
  np.testing.assert_allclose(m["active_d"], (rep_d != 0).sum(1).mean())
  ref = ((rep_q != 0).mean(0) * (rep_d != 0).mean(0)).sum()
  np.testing.assert_allclose(m["flops_est"], ref, rtol=1e-5)
  with pytest.raises(ValueError, match="needs"):
    loss_terms.total_loss(rep_q_bv=kw["rep_q_bv"], rep_d_mv=kw["rep_d_mv"], distill="margin_mse")
  with pytest.raises(ValueError, match="unknown"):
    loss_terms.total_loss(rep_q_bv=kw["rep_q_bv"], rep_d_mv=kw["rep_d_mv"], ranking="nope")


def _np_flops(w):
  return (np.abs(w).mean(0) ** 2).sum()


def test_doc_reg_weights_positive_and_negative_documents():
  rep_q, rep_d, *_ = _data(4)
  pos, neg = rep_d[::G], np.delete(rep_d, np.arange(B) * G, axis=0)
  sp, sn = loss_terms.split_groups(jnp.asarray(rep_d), B)
  np.testing.assert_array_equal(sp, pos)
  np.testing.assert_array_equal(sn, neg)
  regs = (("flops", "q", 0.3), ("flops", "d", 0.2), ("l1", "d", 0.1))
  kw = dict(rep_q_bv=jnp.asarray(rep_q), rep_d_mv=jnp.asarray(rep_d), ranking=None, regularizers=regs)
  loss, m = jax.jit(
    lambda q, d: loss_terms.total_loss(
      rep_q_bv=q, rep_d_mv=d, ranking=None, regularizers=regs, doc_reg_weights=(0.25, 0.75)
    )
  )(rep_q, rep_d)
  d_flops = 0.25 * _np_flops(pos) + 0.75 * _np_flops(neg)
  d_l1 = 0.25 * np.abs(pos).sum(1).mean() + 0.75 * np.abs(neg).sum(1).mean()
  np.testing.assert_allclose(loss, 0.3 * _np_flops(rep_q) + 0.2 * d_flops + 0.1 * d_l1, rtol=1e-5)
  np.testing.assert_allclose(m["reg/d_flops"], d_flops, rtol=1e-5)
  np.testing.assert_allclose(m["reg/d_flops/pos"], _np_flops(pos), rtol=1e-5)
  np.testing.assert_allclose(m["reg/d_flops/neg"], _np_flops(neg), rtol=1e-5)
  # Per-shard FLOPS: each part keeps the shard-major order of the rows (2 shards = 2 query halves).
  loss2, _ = loss_terms.total_loss(**kw, doc_reg_weights=(0.5, 0.5), flops_num_shards=2)
  half = lambda w: np.mean([_np_flops(x) for x in np.split(w, 2)])
  ref = (
    0.3 * half(rep_q)
    + 0.2 * (0.5 * half(pos) + 0.5 * half(neg))
    + 0.1 * (0.5 * np.abs(pos).sum(1).mean() + 0.5 * np.abs(neg).sum(1).mean())
  )
  np.testing.assert_allclose(loss2, ref, rtol=1e-5)
  # () and None: today's behaviour, the regularizer over all M documents.
  for off in ((), None):
    loss0, m0 = loss_terms.total_loss(**kw, doc_reg_weights=off)
    np.testing.assert_allclose(m0["reg/d_flops"], _np_flops(rep_d), rtol=1e-5)
    assert "reg/d_flops/pos" not in m0
  np.testing.assert_allclose(loss0, loss_terms.total_loss(**kw)[0])
  # No hard negatives (in-batch only): a clear error.
  with pytest.raises(ValueError, match="hard negatives"):
    loss_terms.total_loss(**dict(kw, rep_d_mv=jnp.asarray(rep_d[:B])), doc_reg_weights=(0.5, 0.5))
  with pytest.raises(ValueError, match="pos, neg"):
    loss_terms.total_loss(**kw, doc_reg_weights=(0.5,))
