"""The combined training loss: terms resolved from names once, applied each step (pure, no Flax).

`make_terms` / `terms_from_settings` turn loss names, weights and settings into
`LossTerm`s (names checked once; which shared setting each loss takes is the
table TERM_SETTINGS); `apply_terms` sums the weighted terms for one batch with
the regularizers' warm-up scale; `total_loss` does both. The loss functions
and their name tables live in `losses.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from laspar_jax.losses import (
  DISTILL_INPUTS,
  DISTILL_LOSSES,
  RANKING_LOSSES,
  REGULARIZERS,
  LossOut,
  Metrics,
  score_matrix,
)


def sparsity_metrics(*, rep_q_bv: jax.Array, rep_d_mv: jax.Array) -> Metrics:
  """Mean active (nonzero) dims per query and document, and expected FLOPS.

  flops_est = sum_j P(q_j != 0) P(d_j != 0), the probabilities estimated over
  the batch: the expected number of dims a query and a document share, i.e.
  the expected multiply-adds per (query, document) pair of an inverted index.
  """
  nq = (rep_q_bv != 0).astype(jnp.float32)
  nd = (rep_d_mv != 0).astype(jnp.float32)
  return {
    "active_q": jnp.mean(jnp.sum(nq, axis=-1)),
    "active_d": jnp.mean(jnp.sum(nd, axis=-1)),
    "flops_est": jnp.sum(jnp.mean(nq, axis=0) * jnp.mean(nd, axis=0)),
  }


def _add(metrics: Metrics, prefix: str, sub: Mapping[str, jax.Array]) -> None:
  for k, v in sub.items():
    metrics[f"{prefix}/{k}"] = v


def split_groups(rep_mv: jax.Array, num_queries: int) -> tuple[jax.Array, jax.Array]:
  """(positives [B, D], hard negatives [B * n, D]) of query-major documents [M = B * (1 + n), D].

  Both parts keep the query order (a batch sharded shard-major stays so). Raises
  ValueError when M is not a multiple of B = num_queries or n = 0.
  """
  M, D = rep_mv.shape
  if M % num_queries:
    raise ValueError(f"{M} documents is not a multiple of {num_queries} queries")
  g = M // num_queries
  if g < 2:
    raise ValueError("positive/negative document weights need hard negatives (data.n_neg >= 1)")
  r = rep_mv.reshape(num_queries, g, D)
  return r[:, 0], r[:, 1:].reshape(num_queries * (g - 1), D)


def _doc_regularizer(
  name: str, rep_d_mv: jax.Array, num_queries: int, kw: Mapping[str, Any], doc_reg_weights: Sequence[float] | None
) -> tuple[jax.Array, Metrics]:
  """A document regularizer over all documents, or pos * reg(positives) + neg * reg(negatives)."""
  if not doc_reg_weights:
    return REGULARIZERS[name](rep_bv=rep_d_mv, **kw)
  w_pos, w_neg = doc_reg_weights
  pos_mv, neg_mv = split_groups(rep_d_mv, num_queries)
  r_pos, m_pos = REGULARIZERS[name](rep_bv=pos_mv, **kw)
  r_neg, m_neg = REGULARIZERS[name](rep_bv=neg_mv, **kw)
  metrics = {"pos": r_pos, "neg": r_neg}
  metrics.update({f"pos_{k}": v for k, v in m_pos.items()})
  metrics.update({f"neg_{k}": v for k, v in m_neg.items()})
  return w_pos * r_pos + w_neg * r_neg, metrics


@dataclasses.dataclass(frozen=True)
class LossTerm:
  """One weighted term of the training loss, resolved from names once (not per step).

  Attributes:
    role: "ranking", "distill" or "reg".
    name: a key of RANKING_LOSSES, DISTILL_LOSSES or REGULARIZERS.
    weight: its weight (regularizers: the final weight, scaled by the warm-up each step).
    side: "q" or "d" (regularizers only).
    kwargs: extra keyword arguments of the loss function, as sorted (key, value) pairs.
  """

  role: str
  name: str
  weight: float | jax.Array
  side: str = ""
  kwargs: tuple[tuple[str, Any], ...] = ()


_TABLES = {"ranking": RANKING_LOSSES, "distill": DISTILL_LOSSES, "reg": REGULARIZERS}
_KINDS = {"ranking": "ranking loss", "distill": "distillation loss", "reg": "regularizer"}

# Which shared settings (config.loss.temperature, ...) each loss takes: a table, not branches in the step.
TERM_SETTINGS: dict[str, tuple[str, ...]] = {
  "inbatch_ce": ("temperature",),
  "group_ce": ("temperature",),
  "kl": ("temperature", "teacher_temperature"),
  "dense_kl": ("temperature", "teacher_temperature"),
  "flops": ("num_shards",),
}


def make_terms(
  *,
  ranking: str | None = "inbatch_ce",
  ranking_weight: float | jax.Array = 1.0,
  ranking_kwargs: Mapping[str, Any] | None = None,
  distill: str | None = None,
  distill_weight: float | jax.Array = 1.0,
  distill_kwargs: Mapping[str, Any] | None = None,
  regularizers: Sequence[tuple[str, str, float | jax.Array]] = (),
  flops_num_shards: int = 1,
) -> tuple[LossTerm, ...]:
  """The loss terms of a step (names checked here, once), for `apply_terms`.

  Args:
    ranking: a key of RANKING_LOSSES, or None.
    ranking_weight: its weight.
    ranking_kwargs: extra arguments (temperature, margin, in_batch, ...).
    distill: a key of DISTILL_LOSSES, or None.
    distill_weight: its weight.
    distill_kwargs: extra arguments (temperature, teacher_temperature).
    regularizers: (name, side, weight) triples, name a key of REGULARIZERS,
      side "q" or "d", weight already scheduled for this step (may be traced),
      e.g. (("flops", "q", lam_q_t), ("flops", "d", lam_d_t)).
    flops_num_shards: `num_shards` for the FLOPS regularizer.

  Raises:
    ValueError: an unknown loss name or regularizer side.
  """
  terms = []
  if ranking:
    terms.append(_term("ranking", ranking, ranking_weight, "", ranking_kwargs))
  if distill:
    terms.append(_term("distill", distill, distill_weight, "", distill_kwargs))
  for name, side, weight in regularizers:
    if side not in ("q", "d"):
      raise ValueError(f"regularizer side must be 'q' or 'd', got {side!r}")
    terms.append(_term("reg", name, weight, side, {"num_shards": flops_num_shards} if name == "flops" else None))
  return tuple(terms)


def terms_from_settings(
  *,
  ranking: str | None,
  ranking_weight: float,
  distill: str | None,
  distill_weight: float,
  regularizers: Sequence[tuple[str, str, float]],
  settings: Mapping[str, Any],
) -> tuple[LossTerm, ...]:
  """Loss terms with each loss given the shared settings it takes (TERM_SETTINGS).

  Args:
    ranking, ranking_weight, distill, distill_weight, regularizers: as `make_terms`.
    settings: shared values, e.g. {"temperature": 1.0, "teacher_temperature": 1.0, "num_shards": 1}.
  """
  pick = lambda name: {k: settings[k] for k in TERM_SETTINGS.get(name or "", ()) if k in settings}
  terms = make_terms(
    ranking=ranking,
    ranking_weight=ranking_weight,
    ranking_kwargs=pick(ranking),
    distill=distill,
    distill_weight=distill_weight,
    distill_kwargs=pick(distill),
  )
  regs = []
  for name, side, weight in regularizers:
    if side not in ("q", "d"):
      raise ValueError(f"regularizer side must be 'q' or 'd', got {side!r}")
    regs.append(_term("reg", name, weight, side, pick(name)))
  return terms + tuple(regs)


def _term(role: str, name: str, weight: Any, side: str, kwargs: Mapping[str, Any] | None) -> LossTerm:
  if name not in _TABLES[role]:
    raise ValueError(f"unknown {_KINDS[role]} {name!r}; known: {sorted(_TABLES[role])}")
  return LossTerm(role, name, weight, side, tuple(sorted((kwargs or {}).items())))


def apply_terms(
  terms: Sequence[LossTerm],
  *,
  rep_q_bv: jax.Array,
  rep_d_mv: jax.Array,
  teacher_scores_bn: jax.Array | None = None,
  teacher_q_be: jax.Array | None = None,
  teacher_d_me: jax.Array | None = None,
  reg_scale: float | jax.Array = 1.0,
  doc_reg_weights: Sequence[float] | None = None,
) -> LossOut:
  """sum_t weight_t * term_t (regularizer weights times `reg_scale`); metrics as `total_loss`.

  Raises:
    ValueError: a distillation term without its teacher arrays, or bad doc_reg_weights.
  """
  if doc_reg_weights and len(doc_reg_weights) != 2:
    raise ValueError(f"doc_reg_weights must be () or (pos, neg), got {doc_reg_weights!r}")
  metrics: Metrics = {}
  loss = jnp.zeros((), jnp.float32)
  if any(t.role != "reg" for t in terms):
    scores_bm = score_matrix(rep_q_bv=rep_q_bv, rep_d_mv=rep_d_mv)
  given = {"teacher_scores_bn": teacher_scores_bn, "teacher_q_be": teacher_q_be, "teacher_d_me": teacher_d_me}
  for t in terms:
    kw = dict(t.kwargs)
    if t.role == "ranking":
      r, m = RANKING_LOSSES[t.name](scores_bm=scores_bm, **kw)
      key, weight = f"ranking/{t.name}", t.weight
    elif t.role == "distill":
      inputs = {k: given[k] for k in DISTILL_INPUTS[t.name]}
      missing = [k for k, v in inputs.items() if v is None]
      if missing:
        raise ValueError(f"distillation loss {t.name!r} needs {missing}")
      r, m = DISTILL_LOSSES[t.name](scores_bm=scores_bm, **inputs, **kw)
      key, weight = f"distill/{t.name}", t.weight
    else:
      if t.side == "q":
        r, m = REGULARIZERS[t.name](rep_bv=rep_q_bv, **kw)
      else:
        r, m = _doc_regularizer(t.name, rep_d_mv, rep_q_bv.shape[0], kw, doc_reg_weights)
      key, weight = f"reg/{t.side}_{t.name}", t.weight * reg_scale
      metrics[f"{key}_weight"] = jnp.asarray(weight, jnp.float32)
    loss = loss + weight * r
    metrics[key] = r
    _add(metrics, key, m)
  metrics.update(sparsity_metrics(rep_q_bv=rep_q_bv, rep_d_mv=rep_d_mv))
  metrics["loss"] = loss
  return loss, metrics


def total_loss(
  *,
  rep_q_bv: jax.Array,
  rep_d_mv: jax.Array,
  teacher_scores_bn: jax.Array | None = None,
  teacher_q_be: jax.Array | None = None,
  teacher_d_me: jax.Array | None = None,
  doc_reg_weights: Sequence[float] | None = None,
  **term_kwargs: Any,
) -> LossOut:
  """ranking_weight * ranking + distill_weight * distill + sum_r weight_r * reg_r.

  `apply_terms(make_terms(**term_kwargs), ...)` in one call (tests, notebooks).

  Args:
    rep_q_bv: query representations [B, D].
    rep_d_mv: document representations [M = B * (1 + n), D] (query-major).
    teacher_scores_bn: cross-encoder scores [B, 1 + n] (margin_mse, kl).
    teacher_q_be: dense-teacher query embeddings [B, E] (dense_kl, dense_mse).
    teacher_d_me: dense-teacher document embeddings [M, E].
    doc_reg_weights: None or () (every document regularizer over all M
      documents), or (pos, neg): each document regularizer is
      pos * reg(positives [B, D]) + neg * reg(hard negatives [B * n, D])
      (needs n >= 1; e.g. (0.5, 0.5), or the reference's (0.25, 0.75)).
    **term_kwargs: `make_terms`'s arguments (ranking, distill, regularizers and
      their weights and kwargs, flops_num_shards).

  Returns:
    (loss, metrics): metrics hold "loss", every term unweighted
    ("ranking/<name>", "distill/<name>", "reg/<side>_<name>"), the regularizer
    weights ("reg/<side>_<name>_weight"), the terms' own metrics (with
    doc_reg_weights: "reg/d_<name>/pos" and "/neg", the unweighted parts), and
    active_q, active_d, flops_est.
  """
  terms = make_terms(**term_kwargs)
  return apply_terms(
    terms,
    rep_q_bv=rep_q_bv,
    rep_d_mv=rep_d_mv,
    teacher_scores_bn=teacher_scores_bn,
    teacher_q_be=teacher_q_be,
    teacher_d_me=teacher_d_me,
    doc_reg_weights=doc_reg_weights,
  )
