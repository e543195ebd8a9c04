"""The train step: `loss_fn` and the jitted, donated `(state, batch) -> (state, metrics)`.

Gradient accumulation is a scan over micro-batches inside the step; the step
never syncs with the host. A non-finite loss or gradient norm leaves the
parameters and optimizer state unchanged and records the step in
`state.bad_step` (the loop reads it at log and checkpoint boundaries).
Frozen parameters (`optim.trainable_mask`) enter the loss through
`stop_gradient`: no weight gradient is computed for them.

In a bf16 model the kernels the layers would cast at every use
(`layers.cast_once`) are cast once per tower call (query, document) of each
micro-batch, not per layer and use inside the (scanned, rematerialised)
stack; the two towers cast separately so their gradients still meet in fp32.
The loss and gradients are those of the per-use casts; the float32 master
parameters, optimizer state and updates are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from laspar_jax import loss_terms, losses, schedules
from laspar_jax.models import layers
from laspar_jax.train_state import TrainState

Regularizer = tuple[str, str, float]
_SIDES = ("q", "d")


def regularizers_from_config(regs: Mapping[str, Any] | None) -> tuple[Regularizer, ...]:
  """config.loss.regularizers {key: {name, side, weight}} -> ((name, side, weight), ...).

  The terms are summed in a canonical order (the order of
  `losses.REGULARIZERS`, queries before documents), not in the config's key
  order (a ConfigDict iterates its keys sorted).

  Args:
    regs: named terms, e.g. {"q_flops": {"name": "flops", "side": "q", "weight": 5e-3}}.

  Returns:
    (name, side, weight) triples.

  Raises:
    ValueError: an unknown name, side or field, or a missing field.
  """
  out = []
  for key, term in (regs or {}).items():
    term = dict(term)
    if set(term) != {"name", "side", "weight"}:
      raise ValueError(f"loss.regularizers.{key} = {term}: expected exactly the fields name, side, weight")
    if term["name"] not in losses.REGULARIZERS:
      raise ValueError(f"loss.regularizers.{key}.name = {term['name']!r}; known: {sorted(losses.REGULARIZERS)}")
    if term["side"] not in _SIDES:
      raise ValueError(f"loss.regularizers.{key}.side = {term['side']!r}: expected 'q' or 'd'")
    out.append((str(term["name"]), str(term["side"]), float(term["weight"])))
  order = list(losses.REGULARIZERS)
  return tuple(sorted(out, key=lambda r: (order.index(r[0]), _SIDES.index(r[1]))))


def doc_reg_weights_from_config(weights: Any) -> tuple[float, ...]:
  """config.loss.doc_reg_weights -> () or (pos, neg) floats.

  Args:
    weights: () / None / "" (the document regularizers over all documents), or
      two weights >= 0 of the positive and the hard-negative documents.

  Raises:
    ValueError: not empty and not two non-negative numbers.
  """
  if not weights:
    return ()
  try:
    out = () if isinstance(weights, str) else tuple(float(w) for w in weights)
  except (TypeError, ValueError):
    out = ()
  if len(out) != 2 or min(out) < 0:
    raise ValueError(f"loss.doc_reg_weights={weights!r}: expected () or (pos, neg) weights >= 0")
  return out


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable)."""

  ranking: str | None = "inbatch_ce"
  ranking_weight: float = 1.0
  temperature: float = 1.0
  distill: str | None = None
  distill_weight: float = 1.0
  teacher_temperature: float = 1.0
  regularizers: tuple[Regularizer, ...] = ()
  reg_warmup_steps: int = 0
  flops_num_shards: int = 1
  doc_reg_weights: tuple[float, ...] = ()  # () or (pos, neg): see loss_terms.total_loss
  accum_steps: int = 1
  dropout: bool = False
  rng_impl: str = "threefry2x32"
  q_topk: int = 0
  d_topk: int = 0
  terms: tuple[loss_terms.LossTerm, ...] | None = None  # built from the fields above when None
  cast_params: bool = True  # bf16 layers' kernels cast once per tower call (False: at every use)

  def __post_init__(self):
    if self.terms is None:  # the loss terms, resolved from names once (the step only applies them)
      terms = loss_terms.terms_from_settings(
        ranking=self.ranking,
        ranking_weight=self.ranking_weight,
        distill=self.distill,
        distill_weight=self.distill_weight,
        regularizers=self.regularizers,
        settings={
          "temperature": self.temperature,
          "teacher_temperature": self.teacher_temperature,
          "num_shards": self.flops_num_shards,
        },
      )
      object.__setattr__(self, "terms", terms)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, mesh: Mesh) -> "StepConfig":
    """The step settings of a training config (loss, optim.accum_steps, train)."""
    loss, train = config.loss, config.train
    return cls(
      ranking=loss.ranking or None,
      ranking_weight=float(loss.ranking_weight),
      temperature=float(loss.temperature),
      distill=loss.distill or None,
      distill_weight=float(loss.distill_weight),
      teacher_temperature=float(loss.teacher_temperature),
      regularizers=regularizers_from_config(loss.regularizers),
      reg_warmup_steps=int(loss.reg_warmup_steps),
      flops_num_shards=mesh.shape["data"] if loss.flops_per_shard else 1,
      doc_reg_weights=doc_reg_weights_from_config(loss.get("doc_reg_weights", ())),
      accum_steps=int(config.optim.accum_steps),
      dropout=bool(train.dropout),
      rng_impl=str(train.rng_impl),
      q_topk=int(train.q_topk),
      d_topk=int(train.d_topk),
    )


def loss_fn(
  params: Any,
  graphdef: nnx.GraphDef,
  rest: Any,
  batch: Mapping[str, jax.Array],
  step: jax.Array,
  key: jax.Array,
  cfg: StepConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and metrics of one micro-batch (pure; differentiated w.r.t. params).

  Args:
    params: the encoder's parameters (pure dict).
    graphdef, rest: the rest of the encoder (`nnx.split`).
    batch: q_input_ids, q_attention_mask, d_input_ids, d_attention_mask
      (+ teacher_scores | teacher_q, teacher_d).
    step: the optimizer step (regularizer warm-up).
    key: dropout key.
    cfg: the static step settings; `cfg.terms` are the loss terms (built from the
      config once), applied here with the regularizers' warm-up.

  Returns:
    (loss, metrics) as `loss_terms.apply_terms`.
  """

  def tower() -> nnx.Module:  # one merge (and one cast) per tower: each cast has one use per parameter
    encoder = nnx.merge(graphdef, params, rest)
    if cfg.cast_params:
      layers.cast_once(encoder)
    return encoder

  kq, kd = jax.random.split(key)
  rep_q_bv = tower()(
    batch["q_input_ids"],
    batch["q_attention_mask"],
    kind="query",
    deterministic=not cfg.dropout,
    rngs=nnx.Rngs(dropout=kq) if cfg.dropout else None,
    topk=cfg.q_topk or None,
  )
  rep_d_mv = tower()(
    batch["d_input_ids"],
    batch["d_attention_mask"],
    kind="doc",
    deterministic=not cfg.dropout,
    rngs=nnx.Rngs(dropout=kd) if cfg.dropout else None,
    topk=cfg.d_topk or None,
  )
  return loss_terms.apply_terms(
    cfg.terms,
    rep_q_bv=rep_q_bv,
    rep_d_mv=rep_d_mv,
    teacher_scores_bn=batch.get("teacher_scores"),
    teacher_q_be=batch.get("teacher_q"),
    teacher_d_me=batch.get("teacher_d"),
    reg_scale=schedules.quadratic_warmup(step, value=1.0, warmup_steps=cfg.reg_warmup_steps),
    doc_reg_weights=cfg.doc_reg_weights or None,
  )


def make_train_step(
  graphdef: nnx.GraphDef,
  rest: Any,
  tx: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
  cfg: StepConfig,
  shardings: TrainState,
  mesh: Mesh,
  *,
  trainable: Any = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted, donated train step `(state, batch) -> (state, metrics)`.

  With cfg.accum_steps = A > 1 every batch array has a leading micro-batch
  axis [A, ...]; gradients are averaged over a scan of the A micro-batches
  (each with its own in-batch negatives) before one optimizer update.

  Args:
    graphdef, rest: from `create_train_state`.
    tx, lr_schedule: from `optim.make_optimizer`.
    cfg: the static step settings.
    shardings: TrainState of NamedShardings (in and out).
    mesh: the mesh (metrics come back replicated on it).
    trainable: pytree of bools like the params (`optim.trainable_mask`); False
      leaves get no gradient (None: every parameter trains).

  Returns:
    The jitted step; the batch keeps the shardings it was put with (`mesh.put_batch`).
  """

  def objective(params, batch, step, key):
    if trainable is not None:
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    return loss_fn(params, graphdef, rest, batch, step, key, cfg)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def step_fn(state: TrainState, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=cfg.rng_impl), state.step)
    if cfg.accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch, state.step, key)
    else:

      def body(acc, xs):
        mb, i = xs
        (_, m), g = grad_fn(state.params, mb, state.step, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, acc, g), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, ms = jax.lax.scan(body, zeros, (batch, jnp.arange(cfg.accum_steps)))
      grads = jax.tree.map(lambda g: g / cfg.accum_steps, grads)
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), ms)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = dict(
      metrics,
      grad_norm=grad_norm,
      lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
      param_norm=optax.tree.norm(state.params),
    )
    new = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step),
    )
    return new, metrics

  return jax.jit(
    step_fn, in_shardings=(shardings, None), out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,)
  )
