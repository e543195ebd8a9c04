"""Training: TrainState, the jitted train step, and `train_and_evaluate`.

`train_and_evaluate(config, workdir)` is the only place where the model, the
optimizer and the device mesh meet:

  data (sources -> training examples -> dense-teacher cache -> TrainPipeline)
  encoder (sparse_encoder.build_encoder, parameters placed by logical axes)
  optimizer (AdamW, warm-up + decay, clipping) and TrainState on the mesh
  loop: one jitted, donated step per optimizer step (gradient accumulation is
        a scan over micro-batches inside it), metrics to tqdm + TensorBoard,
        orbax checkpoints (state + data position), periodic evaluation
  end: the final encoder saved to WORKDIR/encoder (sparse_encoder.save_encoder),
       evaluated over the full corpus through the index.

The step never syncs with the host. A non-finite loss or gradient norm leaves
the parameters unchanged and records the step in `state.bad_step`; the host
reads it at every log and checkpoint boundary and stops with
`NonFiniteLossError` without saving, so the last checkpoint stays good.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from laspar_jax import checkpointing
from laspar_jax import config_lib
from laspar_jax import losses
from laspar_jax import mesh as mesh_lib
from laspar_jax import schedules
from laspar_jax.models import sparse_encoder

_LOG = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """The loss or the gradient became NaN/inf; the run stopped."""


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  """Everything a step changes (a pytree; checkpointed whole).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the encoder's nnx.Param values as a pure nested dict.
    opt_state: the optax state.
    rng: uint32 [2] raw key data; the step's key is fold_in(rng, step).
    bad_step: int32 scalar, the first step whose loss or gradient was not
      finite, -1 while none was.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  bad_step: jax.Array

  def to_tree(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_tree(cls, tree: Mapping[str, Any]) -> "TrainState":
    return cls(**tree)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warm-up then linear decay (or constant), global-norm clipping.

  Weight decay applies to matrices only (not to biases, norms, or position logits).

  Args:
    optim: config.optim (lr, warmup_steps, schedule, end_lr, weight_decay, b1, b2, eps, grad_clip,
      head_lr_mult).
    total_steps: optimizer steps of the run (end of the decay).

  Returns:
    (transformation, learning-rate schedule).
  """
  warm = min(int(optim.warmup_steps), total_steps)
  if optim.schedule == "linear":
    lr = schedules.warmup_linear_decay(peak_value=optim.lr, warmup_steps=warm,
                                       total_steps=total_steps, end_value=optim.end_lr)
  elif optim.schedule == "constant":
    lr = optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(warm, 1)),
                               optax.constant_schedule(optim.lr)], [warm]) if warm else (
                                   optax.constant_schedule(optim.lr))
  else:
    raise ValueError(f"optim.schedule must be 'linear' or 'constant', got {optim.schedule!r}")
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  head_mult = float(optim.get("head_lr_mult", 1.0))
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
      optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                  mask=decay_mask),
      # The freshly initialised sparse head learns at head_lr_mult x the backbone's rate.
      optax.masked(optax.scale(head_mult), head_mask) if head_mult != 1.0 else optax.identity())
  return tx, lr


def head_mask(params: Any) -> Any:
  """True for parameters under a `head` node (the sparse heads), False for the backbone."""
  def is_head(path, _):
    return any(getattr(k, "key", getattr(k, "name", None)) == "head" for k in path)
  return jax.tree_util.tree_map_with_path(is_head, params)


def state_shardings(encoder: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES) -> TrainState:
  """A TrainState of NamedShardings: params by logical axes, Adam moments like their params."""
  sh_all = mesh_lib.state_shardings(encoder, mesh, rules)
  sh_params = nnx.to_pure_dict(nnx.split_state(sh_all, nnx.Param, ...)[0])
  replicated = NamedSharding(mesh, P())
  abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct((), jnp.float32), sh_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  sh_opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, sh_params,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated, params=sh_params, opt_state=sh_opt, rng=replicated,
                    bad_step=replicated)


def create_train_state(encoder: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, *,
                       seed: int = 0, rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES,
                       rng_impl: str = "threefry2x32"
                       ) -> tuple[nnx.GraphDef, Any, TrainState, TrainState]:
  """Places the encoder on the mesh and builds the initial TrainState.

  Args:
    encoder: the (concrete) sparse encoder; its parameters are moved in place.
    tx: the optimizer.
    mesh: the ('data', 'model') mesh.
    seed: RNG seed (dropout).
    rules: logical axis rules.
    rng_impl: PRNG implementation of the dropout key ("threefry2x32": the
      same bits whatever the sharding; "rbg"/"unsafe_rbg": much faster to
      compile and run on CPU, bits depend on the sharding).

  Returns:
    (graphdef, rest, state, shardings): `rest` holds the encoder's non-Param
    variables (constant during training); `shardings` is a TrainState of
    NamedShardings.
  """
  shardings = state_shardings(encoder, tx, mesh, rules)
  mesh_lib.shard_model(encoder, mesh, rules)
  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  rep = NamedSharding(mesh, P())
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                     opt_state=opt_state,
                     rng=jax.device_put(jax.random.key_data(jax.random.key(seed, impl=rng_impl)), rep),
                     bad_step=jax.device_put(jnp.full((), -1, jnp.int32), rep))
  return graphdef, rest, state, shardings


def abstract_train_state(encoder: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, *,
                         rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES, rng_impl: str = "threefry2x32"
                         ) -> tuple[nnx.GraphDef, Any, TrainState, TrainState]:
  """Like `create_train_state` with ShapeDtypeStruct leaves (nothing allocated).

  For an abstract encoder (`build_encoder(cfg, weights=False)`): lowering and
  compiling the step against it shows that a model builds and fits a mesh
  (`.lower(...).compile().memory_analysis()`) without the memory to run it.
  """
  shardings = state_shardings(encoder, tx, mesh, rules)
  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params = jax.tree.map(sds, params, shardings.params)
  opt_state = jax.tree.map(sds, jax.eval_shape(tx.init, params), shardings.opt_state)
  key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=rng_impl)))
  state = TrainState(step=sds(jax.ShapeDtypeStruct((), jnp.int32), shardings.step), params=params,
                     opt_state=opt_state, rng=sds(key, shardings.rng),
                     bad_step=sds(jax.ShapeDtypeStruct((), jnp.int32), shardings.bad_step))
  return graphdef, rest, state, shardings


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable)."""
  ranking: str | None = "inbatch_ce"
  ranking_weight: float = 1.0
  temperature: float = 1.0
  distill: str | None = None
  distill_weight: float = 1.0
  teacher_temperature: float = 1.0
  regularizers: tuple[tuple[str, str, float], ...] = ()
  reg_warmup_steps: int = 0
  flops_num_shards: int = 1
  accum_steps: int = 1
  dropout: bool = False
  rng_impl: str = "threefry2x32"
  q_topk: int = 0
  d_topk: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, mesh: Mesh) -> "StepConfig":
    loss, train = config.loss, config.train
    return cls(ranking=loss.ranking or None, ranking_weight=float(loss.ranking_weight),
               temperature=float(loss.temperature), distill=loss.distill or None,
               distill_weight=float(loss.distill_weight),
               teacher_temperature=float(loss.teacher_temperature),
               regularizers=parse_regularizers(loss.regularizers),
               reg_warmup_steps=int(loss.reg_warmup_steps),
               flops_num_shards=mesh.shape["data"] if loss.flops_per_shard else 1,
               accum_steps=int(config.optim.accum_steps), dropout=bool(train.dropout),
               rng_impl=str(train.rng_impl),
               q_topk=int(train.q_topk), d_topk=int(train.d_topk))


def parse_regularizers(spec: str | Sequence[tuple[str, str, float]]) -> tuple[tuple[str, str, float], ...]:
  """"flops:q:5e-3,flops:d:5e-3,equipartition:d:5e-3" -> ((name, side, lambda), ...)."""
  if not isinstance(spec, str):
    return tuple((str(n), str(s), float(w)) for n, s, w in spec)
  out = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    parts = item.split(":")
    if len(parts) != 3 or parts[0] not in losses.REGULARIZERS or parts[1] not in ("q", "d"):
      raise ValueError(f"bad regularizer {item!r}: expected name:side:lambda with name in "
                       f"{sorted(losses.REGULARIZERS)} and side q or d")
    out.append((parts[0], parts[1], float(parts[2])))
  return tuple(out)


def loss_fn(params: Any, graphdef: nnx.GraphDef, rest: Any, batch: Mapping[str, jax.Array],
            step: jax.Array, key: jax.Array, cfg: StepConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and metrics of one micro-batch (pure; differentiated w.r.t. params)."""
  encoder = nnx.merge(graphdef, params, rest)
  kq, kd = jax.random.split(key)
  rep_q_bv = encoder(batch["q_input_ids"], batch["q_attention_mask"], kind="query",
                     deterministic=not cfg.dropout, rngs=nnx.Rngs(dropout=kq) if cfg.dropout else None,
                     topk=cfg.q_topk or None)
  rep_d_mv = encoder(batch["d_input_ids"], batch["d_attention_mask"], kind="doc",
                     deterministic=not cfg.dropout, rngs=nnx.Rngs(dropout=kd) if cfg.dropout else None,
                     topk=cfg.d_topk or None)
  regs = tuple((name, side, schedules.quadratic_warmup(step, value=lam, warmup_steps=cfg.reg_warmup_steps))
               for name, side, lam in cfg.regularizers)
  distill_kwargs = None
  if cfg.distill in ("kl", "dense_kl"):
    distill_kwargs = {"temperature": cfg.temperature, "teacher_temperature": cfg.teacher_temperature}
  return losses.total_loss(
      rep_q_bv=rep_q_bv, rep_d_mv=rep_d_mv, teacher_scores_bn=batch.get("teacher_scores"),
      teacher_q_be=batch.get("teacher_q"), teacher_d_me=batch.get("teacher_d"),
      ranking=cfg.ranking, ranking_weight=cfg.ranking_weight,
      ranking_kwargs={"temperature": cfg.temperature} if cfg.ranking in ("inbatch_ce", "group_ce") else None,
      distill=cfg.distill, distill_weight=cfg.distill_weight, regularizers=regs,
      distill_kwargs=distill_kwargs, flops_num_shards=cfg.flops_num_shards)


def make_train_step(graphdef: nnx.GraphDef, rest: Any, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, cfg: StepConfig, shardings: TrainState, mesh: Mesh
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted, donated train step `(state, batch) -> (state, metrics)`.

  With cfg.accum_steps = A > 1 every batch array has a leading micro-batch
  axis [A, ...]; gradients are averaged over a scan of the A micro-batches
  (each with its own in-batch negatives) before one optimizer update.

  Args:
    graphdef, rest: from `create_train_state`.
    tx, lr_schedule: from `make_optimizer`.
    cfg: the static step settings.
    shardings: TrainState of NamedShardings (in and out).
    mesh: the mesh (metrics come back replicated on it).

  Returns:
    The jitted step; the batch keeps the shardings it was put with (`put_batch`).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state: TrainState, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=cfg.rng_impl), state.step)
    if cfg.accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, graphdef, rest, batch, state.step, key, cfg)
    else:
      def body(acc, xs):
        mb, i = xs
        (_, m), g = grad_fn(state.params, graphdef, rest, mb, state.step, jax.random.fold_in(key, i), cfg)
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
    metrics = dict(metrics, grad_norm=grad_norm, lr=jnp.asarray(lr_schedule(state.step), jnp.float32),
                   param_norm=optax.tree.norm(state.params))
    new = state.replace(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step))
    return new, metrics

  return jax.jit(step_fn, in_shardings=(shardings, None),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


def batch_sharding(mesh: Mesh, ndim: int, accum: bool) -> NamedSharding:
  """Rows on 'data' (after the micro-batch axis when accumulating)."""
  lead = (None,) if accum else ()
  rest = ndim - len(lead) - 1
  return NamedSharding(mesh, P(*lead, "data", *([None] * rest)))


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, accum: bool) -> dict[str, jax.Array]:
  """Global jax.Arrays from this host's numpy rows, sharded on 'data'."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, accum), v)
  return out


# ----------------------------------------------------------------------------- data


def _encoder_config(config: ml_collections.ConfigDict) -> sparse_encoder.EncoderConfig:
  m = config_lib.to_dict(config.model)
  return sparse_encoder.EncoderConfig.from_dict({**m, "seed": int(config.seed)})


def build_pipeline(config: ml_collections.ConfigDict, tokenizer, workdir: str, *,
                   progress: bool = True):
  """Training collection -> examples (+ negatives, teacher) -> TrainPipeline.

  Returns:
    (pipeline, info dict).
  """
  from laspar_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  from laspar_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from laspar_jax.data import sources, training  # pylint: disable=g-import-not-at-top
  d = config.data
  coll = sources.load_collection(d.collection, split=d.split or None)
  candidates, scores = None, None
  if d.negatives == "bm25":
    docs = list(coll.docs())
    candidates = training.bm25_candidates([x.doc_id for x in docs], [sources.doc_text(x) for x in docs],
                                          {q: coll.queries[q] for q in coll.qrels if q in coll.queries},
                                          depth=d.neg_depth)
  elif d.negatives not in ("none", ""):
    candidates = training.read_run(d.negatives, depth=d.neg_depth)
  if d.teacher == "scores":
    scores = training.read_teacher_scores(d.teacher_scores)
  pool = d.neg_pool if candidates is not None else 0
  examples = training.build_examples(coll.qrels, candidates, n_neg=max(pool, d.n_neg) if pool else 0,
                                     seed=config.seed, teacher_scores=scores, queries=coll.queries)
  teacher = None
  if d.teacher == "dense":
    cache = d.teacher_cache or os.path.join(workdir, "teacher")
    teacher = teacher_lib.teacher_embeddings(cache, d.teacher_model, coll, examples,
                                             q_len=config.model.query_max_len,
                                             d_len=config.model.doc_max_len, progress=progress)
  elif d.teacher not in ("none", "", "scores"):
    raise ValueError(f"data.teacher must be 'dense', 'scores' or 'none', got {d.teacher!r}")
  pipe = pipeline_lib.TrainPipeline(
      examples, coll, tokenizer, batch_size=config.optim.batch_size, n_neg=d.n_neg,
      q_len=config.model.query_max_len, d_len=config.model.doc_max_len, seed=config.seed,
      teacher=teacher, prefetch=d.prefetch, query_prefix=config.model.query_prefix,
      doc_prefix=config.model.doc_prefix)
  info = {"examples": len(examples), "steps_per_epoch": pipe.steps_per_epoch, "collection": coll.name}
  return pipe, info


def _micro_batches(pipe, accum: int) -> Iterator[dict[str, np.ndarray]]:
  """One optimizer step's input: a batch, or `accum` batches stacked on a new axis 0."""
  while True:
    if accum == 1:
      yield next(pipe)
    else:
      bs = [next(pipe) for _ in range(accum)]
      yield {k: np.stack([b[k] for b in bs]) for k in bs[0]}


# ----------------------------------------------------------------------------- evaluation


class _Head:
  """The first `n` documents of a collection (runlocal evaluation)."""

  def __init__(self, coll, n: int):
    self._coll, self.num_docs, self.name = coll, min(n, coll.num_docs), f"{coll.name}[:{n}]"

  def docs(self):
    import itertools  # pylint: disable=g-import-not-at-top
    return itertools.islice(self._coll.docs(), self.num_docs)


def evaluate(encoder, tokenizer, ev: ml_collections.ConfigDict, out_dir: str, *,
             progress: bool = True) -> dict[str, float]:
  """Indexes the evaluation corpus, searches its judged queries, computes the measures.

  Args:
    encoder, tokenizer: the sparse encoder.
    ev: config.eval (collection, split, q_topk, d_topk, batch_size, measures,
      max_queries, max_docs, search_threads).
    out_dir: where the index and the run file go.
    progress: tqdm bars.

  Returns:
    {measure: value} plus mean active dims per query/document and timings.
  """
  import ir_measures  # pylint: disable=g-import-not-at-top
  from laspar_jax import encode as encode_lib  # pylint: disable=g-import-not-at-top
  from laspar_jax import index as index_lib  # pylint: disable=g-import-not-at-top
  from laspar_jax.data import sources  # pylint: disable=g-import-not-at-top
  coll = sources.load_collection(ev.collection, split=ev.split or None)
  docs = _Head(coll, ev.max_docs) if ev.max_docs else coll
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  path = index_lib.build_index_from_encoder(
      encoder, tokenizer, docs, os.path.join(out_dir, "index"), k_doc=ev.d_topk,
      batch_size=ev.batch_size, dim=encoder.output_dim, progress=progress, overwrite=True)
  t_index = time.time() - t0
  index = index_lib.Index.load(path)
  qrels = {q: r for q, r in coll.qrels.items() if q in coll.queries}
  qids = sorted(qrels)[:ev.max_queries or None]
  texts = [coll.queries[q] for q in qids]
  q_idx, q_val = [], []
  for i_bk, v_bk in encode_lib.encode_sparse(encoder, tokenizer, texts, kind="query", k=ev.q_topk,
                                             batch_size=ev.batch_size):
    q_idx.append(i_bk)
    q_val.append(v_bk)
  q_idx, q_val = np.concatenate(q_idx), np.concatenate(q_val)
  rows, scores = index.search(q_idx, q_val, k=min(1000, index.n_docs),
                              threads=ev.search_threads or None)
  ids = index.lookup(rows)
  run = {q: {str(d): float(s) for d, s, r in zip(ids[i], scores[i], rows[i]) if r >= 0}
         for i, q in enumerate(qids)}
  measures = [ir_measures.parse_measure(m) for m in ev.measures.split(",")]
  res = {str(k): float(v) for k, v in ir_measures.calc_aggregate(
      measures, {q: qrels[q] for q in qids}, run).items()}
  res["active_q"] = float(np.mean(np.sum(q_val > 0, axis=1)))
  res["active_d"] = float(index.n_postings / max(index.n_docs, 1))
  res["index_seconds"] = t_index
  res["eval_seconds"] = time.time() - t0
  with open(os.path.join(out_dir, "run.trec"), "w") as f:
    for q, docs_ in run.items():
      for r, (d, s) in enumerate(sorted(docs_.items(), key=lambda x: -x[1])):
        f.write(f"{q} Q0 {d} {r + 1} {s:.6f} laspar\n")
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(res, f, indent=1)
  return res


# ----------------------------------------------------------------------------- the loop


class _Logger:
  """Averages step metrics on the host every N steps; tqdm + TensorBoard."""

  def __init__(self, workdir: str, start: int, total: int, enabled: bool):
    import tqdm  # pylint: disable=g-import-not-at-top
    self.enabled = enabled
    self.bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled,
                         dynamic_ncols=True)
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.history: list[dict[str, float]] = []

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(f"{prefix}/{k}".replace("@", "_at_"), v, step)
      self.tb.flush()
    self.history.append({"step": step, **{f"{prefix}/{k}": v for k, v in scalars.items()}})

  def close(self) -> None:
    self.bar.close()
    if self.tb is not None:
      self.tb.close()


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for settings that cannot work together (before anything is built)."""
  distill, teacher = config.loss.distill or None, config.data.teacher
  need = losses.DISTILL_INPUTS.get(distill, ()) if distill else ()
  if distill and distill not in losses.DISTILL_LOSSES:
    raise ValueError(f"loss.distill={distill!r}; known: {sorted(losses.DISTILL_LOSSES)}")
  if "teacher_q_be" in need and teacher != "dense":
    raise ValueError(f"loss.distill={distill!r} needs data.teacher='dense' (got {teacher!r})")
  if "teacher_scores_bn" in need and teacher != "scores":
    raise ValueError(f"loss.distill={distill!r} needs data.teacher='scores' with data.teacher_scores")
  if distill in ("margin_mse",) and config.data.n_neg < 1:
    raise ValueError("loss.distill='margin_mse' needs hard negatives (data.n_neg >= 1)")
  if config.data.n_neg > 0 and config.data.negatives in ("none", ""):
    raise ValueError("data.n_neg > 0 needs data.negatives ('bm25' or a run file)")
  parse_regularizers(config.loss.regularizers)
  if config.train.total_steps < 1:
    raise ValueError("train.total_steps must be >= 1")


def _say(lead: bool, msg: str) -> None:
  """A progress line on the lead host (stdout, visible beside the tqdm bar)."""
  if lead:
    import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.tqdm.write(f"[train] {msg}")


def _check_finite(state: TrainState, last_ckpt: int | None) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    raise NonFiniteLossError(
        f"the loss or gradient became non-finite at step {bad}: training stopped (the update of "
        f"that step was not applied). The last good checkpoint is step {last_ckpt}; lower the "
        f"learning rate or check the data before resuming.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains the sparse encoder described by `config` in `workdir`, resuming if checkpoints exist.

  Writes WORKDIR/config.json, checkpoints/ (orbax), tb/ (TensorBoard),
  encoder/ (the final sparse encoder, `sparse_encoder.load_encoder`-able) and
  eval/<step>/ (index, run, metrics.json).

  Args:
    config: a config from configs/*.py.
    workdir: output directory.

  Returns:
    {"step", "train": last logged metrics, "eval": final evaluation or None,
     "preempted": bool, "encoder": path or None}.

  Raises:
    NonFiniteLossError: a non-finite loss/gradient (the last good checkpoint is kept).
  """
  t_start = time.time()
  check_config(config)
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  total = int(config.train.total_steps)
  accum = int(config.optim.accum_steps)
  mesh = mesh_lib.make_mesh(data=config.mesh.data, model=config.mesh.model)

  enc_cfg = _encoder_config(config)
  encoder, tokenizer = sparse_encoder.build_encoder(enc_cfg)
  tx, lr_schedule = make_optimizer(config.optim, total)
  graphdef, rest, state, shardings = create_train_state(encoder, tx, mesh, seed=config.seed,
                                                        rng_impl=config.train.rng_impl)
  del encoder
  step_cfg = StepConfig.from_config(config, mesh)
  train_step = make_train_step(graphdef, rest, tx, lr_schedule, step_cfg, shardings, mesh)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    every=config.train.checkpoint_every,
                                    keep=config.train.keep_checkpoints)
  start = 0
  data_state = None
  if ckpt.latest_step() is not None:
    tree, meta, start = ckpt.restore(state.to_tree())
    state = TrainState.from_tree(tree)
    data_state = meta["data"]
    _say(lead, f"resumed from checkpoint {start} ({ckpt.directory})")
  last_ckpt = ckpt.latest_step()

  result: dict[str, Any] = {"step": start, "train": {}, "eval": None, "preempted": False, "encoder": None}
  pipe = None
  stop = {"sigterm": False}
  old_handler = None
  logger = _Logger(workdir, start, total, lead)
  try:
    if start < total:
      pipe, info = build_pipeline(config, tokenizer, workdir, progress=lead)
      if data_state is not None:
        pipe.set_state(data_state)
      _say(lead, f"data: {info} ({time.time() - t_start:.0f}s since start)")
      try:
        old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
      except ValueError:  # not the main thread
        old_handler = None
      batches = _micro_batches(pipe, accum)
      pending: list[dict[str, jax.Array]] = []
      t_last, n_last = time.time(), 0
      examples_per_step = config.optim.batch_size * accum
      for step in range(start, total):
        batch = put_batch(next(batches), mesh, accum > 1)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        done = step + 1
        logger.bar.update(1)
        if done == start + 1:  # the first step compiled: time from here
          jax.block_until_ready(metrics["loss"])
          t_last, n_last, pending = time.time(), done, []
        if done % config.train.log_every == 0 or done == total:
          _check_finite(state, last_ckpt)
          if pending:
            avg = {k: float(np.mean(v)) for k, v in jax.tree.map(
                lambda *x: np.stack(x), *jax.device_get(pending)).items()}
            dt = time.time() - t_last
            avg["examples_per_second"] = examples_per_step * (done - n_last) / max(dt, 1e-9)
            avg["seconds_per_step"] = dt / max(done - n_last, 1)
            logger.write(done, avg)
            logger.bar.set_postfix(loss=f"{avg['loss']:.4f}", q=f"{avg['active_q']:.0f}",
                                   d=f"{avg['active_d']:.0f}", ex_s=f"{avg['examples_per_second']:.1f}")
            result["train"] = avg
            pending, t_last, n_last = [], time.time(), done
        if ckpt.should_save(done) or done == total or stop["sigterm"]:
          _check_finite(state, last_ckpt)
          ckpt.save(done, state.to_tree(), {"data": pipe.get_state(), "step": done})
          last_ckpt = done
        result["step"] = done
        if stop["sigterm"]:
          ckpt.wait()
          _say(lead, f"SIGTERM: saved checkpoint {done}, stopping")
          result["preempted"] = True
          return result
        if (config.train.eval_every and done % config.train.eval_every == 0 and done < total):
          res = _evaluate_state(graphdef, rest, state, tokenizer, config, workdir, done, lead)
          logger.write(done, res, prefix="eval")
      ckpt.wait()
      if old_handler is not None:  # training is over: SIGTERM stops the process again
        signal.signal(signal.SIGTERM, old_handler)
        old_handler = None

    result["encoder"] = _save_final(graphdef, rest, state, tokenizer, workdir, lead)
    if config.train.final_eval:
      result["eval"] = _evaluate_state(graphdef, rest, state, tokenizer, config, workdir, total, lead)
      logger.write(total, result["eval"], prefix="eval")
    return result
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
    if pipe is not None:
      pipe.close()
    logger.close()
    ckpt.close()
    if lead:
      with open(os.path.join(workdir, "history.jsonl"), "a") as f:
        for row in logger.history:
          f.write(json.dumps(row) + "\n")


def _encoder_from_state(graphdef, rest, state: TrainState) -> sparse_encoder.SparseEncoder:
  """The encoder with the state's parameters (gathered to every host when multi-host)."""
  params = state.params
  if jax.process_count() > 1:  # parameters span hosts: every host must take part
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = jax.tree.map(jnp.asarray, multihost_utils.process_allgather(params, tiled=True))
  return nnx.merge(graphdef, params, rest)


def _save_final(graphdef, rest, state: TrainState, tokenizer, workdir: str, lead: bool) -> str | None:
  encoder = _encoder_from_state(graphdef, rest, state)
  if not lead:
    return None
  path = sparse_encoder.save_encoder(encoder, tokenizer,
                                     os.path.join(workdir, "encoder"))
  _say(lead, f"saved the encoder to {path}")
  return path


def _evaluate_state(graphdef, rest, state: TrainState, tokenizer, config, workdir: str, step: int,
                    lead: bool) -> dict[str, float]:
  encoder = _encoder_from_state(graphdef, rest, state)
  if not lead:
    return {}
  res = evaluate(encoder, tokenizer, config.eval, os.path.join(workdir, "eval", str(step)), progress=True)
  _say(lead, f"eval at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
  return res
