"""Training losses: pure keyword-only functions of arrays (no Flax).

Every loss returns `(scalar, metrics)` with `metrics` a flat dict of scalars.

Batch layout (as `data.pipeline` yields it): B queries, M = B * (1 + n) documents,
query-major: document row b * (1 + n) is query b's positive, rows
b * (1 + n) + 1 ... b * (1 + n) + n its hard negatives. In-batch losses score
every query against all M documents of the (global) batch.

Ranking and distillation losses take the student score matrix
`scores_bm = rep_q_bv @ rep_d_mv.T` ([B, M], see `score_matrix`);
regularizers take a representation `rep_bv`. Names map to functions through
the plain dicts RANKING_LOSSES, DISTILL_LOSSES and REGULARIZERS; `loss_terms`
resolves a run's terms from names once and combines them each step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
LossOut = tuple[jax.Array, Metrics]


# ---------------------------------------------------------------------------
# Scores and layout
# ---------------------------------------------------------------------------


def score_matrix(*, rep_q_bv: jax.Array, rep_d_mv: jax.Array) -> jax.Array:
  """Student scores [B, M] = rep_q rep_d^T in float32."""
  return jnp.einsum("bv,mv->bm", rep_q_bv, rep_d_mv, preferred_element_type=jnp.float32)


def group_size(scores_bm: jax.Array) -> int:
  """1 + n (documents per query) from the shape [B, M = B * (1 + n)]."""
  B, M = scores_bm.shape
  if M % B:
    raise ValueError(f"{M} documents is not a multiple of {B} queries")
  return M // B


def positive_columns(scores_bm: jax.Array) -> jax.Array:
  """Column of each query's positive: b * (1 + n). [B] int32."""
  B = scores_bm.shape[0]
  return jnp.arange(B, dtype=jnp.int32) * group_size(scores_bm)


def group_scores(scores_bm: jax.Array) -> jax.Array:
  """Each query's own documents [B, 1 + n] (positive first) from the in-batch matrix."""
  B = scores_bm.shape[0]
  g = group_size(scores_bm)
  return scores_bm.reshape(B, B, g)[jnp.arange(B), jnp.arange(B)]


def _cross_entropy(logits_bk: jax.Array, labels_b: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits_bk.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels_b[:, None], axis=-1)[:, 0]


def _kl_rows(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """KL(softmax(teacher) || softmax(student)) per row."""
  logp_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)


# ---------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------


def inbatch_ce(*, scores_bm: jax.Array, temperature: float = 1.0) -> LossOut:
  """Softmax cross-entropy of each query over ALL M documents of the batch.

  Negatives: the query's own hard negatives plus every other query's documents.

  Args:
    scores_bm: student scores [B, M].
    temperature: logits = scores / temperature.

  Returns:
    (mean CE, {"acc": share of queries whose positive scores highest,
    "pos_score": mean positive score}).
  """
  labels = positive_columns(scores_bm)
  ce = _cross_entropy(scores_bm / temperature, labels)
  acc = jnp.mean(jnp.argmax(scores_bm, axis=-1) == labels)
  pos = jnp.take_along_axis(scores_bm, labels[:, None], axis=-1)
  return jnp.mean(ce), {"acc": acc, "pos_score": jnp.mean(pos)}


def group_ce(*, scores_bm: jax.Array, temperature: float = 1.0) -> LossOut:
  """Softmax cross-entropy of each query over its own 1 + n documents only."""
  g = group_scores(scores_bm)
  ce = _cross_entropy(g / temperature, jnp.zeros((g.shape[0],), jnp.int32))
  return jnp.mean(ce), {"acc": jnp.mean(jnp.argmax(g, axis=-1) == 0)}


def pairwise(
  *, scores_bm: jax.Array, kind: str = "hinge", margin: float = 1.0, temperature: float = 1.0, in_batch: bool = False
) -> LossOut:
  """Pairwise loss on (positive, negative) score pairs, averaged over pairs.

  hinge: relu(margin - (s+ - s-)); logistic: softplus(-(s+ - s-) / temperature).

  Args:
    scores_bm: student scores [B, M].
    kind: "hinge" or "logistic".
    margin: hinge margin.
    temperature: logistic temperature.
    in_batch: negatives are all M - 1 other documents of the batch instead of
      the query's own n hard negatives (needed when n = 0).

  Returns:
    (mean loss, {"pair_acc": share of pairs ordered correctly}).
  """
  B, M = scores_bm.shape
  pos = jnp.take_along_axis(scores_bm, positive_columns(scores_bm)[:, None], axis=-1)
  if in_batch:
    diff = pos - scores_bm
    valid = jnp.ones((B, M), bool).at[jnp.arange(B), positive_columns(scores_bm)].set(False)
  else:
    g = group_scores(scores_bm)
    if g.shape[1] < 2:
      raise ValueError("pairwise loss without hard negatives: pass in_batch=True")
    diff = g[:, :1] - g[:, 1:]
    valid = jnp.ones(diff.shape, bool)
  if kind == "hinge":
    per = jax.nn.relu(margin - diff)
  elif kind == "logistic":
    per = jax.nn.softplus(-diff / temperature)
  else:
    raise ValueError(f"kind must be 'hinge' or 'logistic', got {kind!r}")
  n = jnp.sum(valid)
  loss = jnp.sum(jnp.where(valid, per, 0.0)) / n
  acc = jnp.sum(jnp.where(valid, diff > 0, False)) / n
  return loss, {"pair_acc": acc}


RANKING_LOSSES: dict[str, Callable[..., LossOut]] = {
  "inbatch_ce": inbatch_ce,
  "group_ce": group_ce,
  "pairwise_hinge": functools.partial(pairwise, kind="hinge"),
  "pairwise_logistic": functools.partial(pairwise, kind="logistic"),
}


# ---------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------


def margin_mse(*, scores_bm: jax.Array, teacher_scores_bn: jax.Array) -> LossOut:
  """MarginMSE: mean over (query, negative) of ((s+ - s-) - (t+ - t-))^2.

  Args:
    scores_bm: student scores [B, M].
    teacher_scores_bn: cross-encoder scores of each query's own documents [B, 1 + n].
  """
  s = group_scores(scores_bm)
  t = teacher_scores_bn.astype(jnp.float32)
  sm, tm = s[:, :1] - s[:, 1:], t[:, :1] - t[:, 1:]
  return jnp.mean(jnp.square(sm - tm)), {"student_margin": jnp.mean(sm), "teacher_margin": jnp.mean(tm)}


def kl_distill(
  *, scores_bm: jax.Array, teacher_scores_bn: jax.Array, temperature: float = 1.0, teacher_temperature: float = 1.0
) -> LossOut:
  """KL(softmax(t / T_t) || softmax(s / T_s)) over each query's own 1 + n documents.

  Args:
    scores_bm: student scores [B, M].
    teacher_scores_bn: [B, 1 + n].
    temperature: student temperature T_s.
    teacher_temperature: teacher temperature T_t.
  """
  kl = _kl_rows(teacher_scores_bn / teacher_temperature, group_scores(scores_bm) / temperature)
  return jnp.mean(kl), {}


def dense_teacher_scores(*, teacher_q_be: jax.Array, teacher_d_me: jax.Array) -> jax.Array:
  """Cosine similarities [B, M] of a dense teacher's query and document embeddings."""
  q = teacher_q_be.astype(jnp.float32)
  d = teacher_d_me.astype(jnp.float32)
  q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-12)
  return q @ d.T


def dense_kl(
  *,
  scores_bm: jax.Array,
  teacher_q_be: jax.Array,
  teacher_d_me: jax.Array,
  temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> LossOut:
  """Dense-teacher KL over the whole in-batch score matrix (each row over all M docs).

  Teacher logits: cos(teacher_q_b, teacher_d_m) / T_t; student: scores / T_s.
  """
  t = dense_teacher_scores(teacher_q_be=teacher_q_be, teacher_d_me=teacher_d_me)
  kl = _kl_rows(t / teacher_temperature, scores_bm / temperature)
  t_acc = jnp.mean(jnp.argmax(t, axis=-1) == positive_columns(scores_bm))
  return jnp.mean(kl), {"teacher_acc": t_acc}


def dense_mse(*, scores_bm: jax.Array, teacher_q_be: jax.Array, teacher_d_me: jax.Array) -> LossOut:
  """Mean squared error between student scores and teacher cosines over the [B, M] matrix."""
  t = dense_teacher_scores(teacher_q_be=teacher_q_be, teacher_d_me=teacher_d_me)
  return jnp.mean(jnp.square(scores_bm - t)), {}


DISTILL_LOSSES: dict[str, Callable[..., LossOut]] = {
  "margin_mse": margin_mse,
  "kl": kl_distill,
  "dense_kl": dense_kl,
  "dense_mse": dense_mse,
}

# Teacher arrays each distillation loss reads.
DISTILL_INPUTS: dict[str, tuple[str, ...]] = {
  "margin_mse": ("teacher_scores_bn",),
  "kl": ("teacher_scores_bn",),
  "dense_kl": ("teacher_q_be", "teacher_d_me"),
  "dense_mse": ("teacher_q_be", "teacher_d_me"),
}


# ---------------------------------------------------------------------------
# Regularizers
# ---------------------------------------------------------------------------


def flops(*, rep_bv: jax.Array, num_shards: int = 1) -> LossOut:
  """FLOPS regularizer sum_j (mean_i |w_ij|)^2.

  Args:
    rep_bv: representations [B, D].
    num_shards: average the FLOPS of S equal row blocks (rows shard-major, as a
      batch sharded on 'data' is laid out) instead of the whole batch, as
      PyTorch implementations do per GPU: mean_s sum_j (mean_{i in s} |w_ij|)^2.
      S must divide B.
  """
  B, D = rep_bv.shape
  if B % num_shards:
    raise ValueError(f"num_shards={num_shards} does not divide the batch {B}")
  a = jnp.abs(rep_bv.astype(jnp.float32)).reshape(num_shards, B // num_shards, D)
  per_shard = jnp.sum(jnp.square(jnp.mean(a, axis=1)), axis=-1)
  return jnp.mean(per_shard), {}


def l1(*, rep_bv: jax.Array) -> LossOut:
  """L1 regularizer mean_i sum_j |w_ij|."""
  return jnp.mean(jnp.sum(jnp.abs(rep_bv.astype(jnp.float32)), axis=-1)), {}


def equipartition(*, rep_bv: jax.Array) -> LossOut:
  """KALE equipartition: KL(p || uniform) = log D - H(p), p_j = sum_i |w_ij| / sum_ij |w_ij|.

  p is the batch's share of activation mass per latent dimension; the penalty
  is 0 when the mass is spread evenly over all D dimensions.

  Why this formula and not the chi-square form D * sum_j p_j^2 - 1: the KL is
  bounded by log D (15.2 at D = 4M) whatever D is, and its gradient,
  dKL/dw_ij = (log p_j + H(p)) / sum(w), grows only logarithmically in the
  imbalance; the chi-square form ranges up to D - 1 and its gradient scales with
  D, so at D = 4M a batch touching ~16k dims gives a penalty of ~256 and the
  weight lambda would have to be re-tuned per D. Both depend only on the shares
  p (invariant to the overall scale of w), so neither fights the L2
  normalization. With N active dims in the batch, KL >= log(D / N): a constant
  offset that does not change the gradient. Zero-mass dims use 0 log 0 = 0
  with a safe log, so their gradient is 0 instead of NaN (a ReLU gives them no
  gradient anyway).

  Returns:
    (KL in nats, {"entropy": H(p), "effective_dims": exp(H(p))}).
  """
  a = jnp.abs(rep_bv.astype(jnp.float32))
  D = a.shape[-1]
  mass_v = jnp.sum(a, axis=0)
  p = mass_v / jnp.maximum(jnp.sum(mass_v), 1e-30)
  pos = p > 0
  ent = -jnp.sum(jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0))
  return jnp.log(float(D)) - ent, {"entropy": ent, "effective_dims": jnp.exp(ent)}


REGULARIZERS: dict[str, Callable[..., LossOut]] = {
  "flops": flops,
  "l1": l1,
  "equipartition": equipartition,
}
