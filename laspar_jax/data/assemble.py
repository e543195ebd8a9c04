"""Training data from a config: collection -> examples (+ negatives, teacher) -> TrainPipeline.

`build_pipeline(config, tokenizer, workdir)` reads `config.data` (collection,
negatives, teacher, batching), `config.model` (lengths, prefixes),
`config.optim.batch_size` and `config.seed`. `micro_batches` stacks
`optim.accum_steps` batches per optimizer step.

Batching (`data.batching`): "random" (default) shuffles examples every epoch;
"clustered" draws batches from balanced clusters of the dense teacher's query
embeddings (`teacher.balanced_clusters`: harder in-batch negatives), and needs
`data.teacher = "dense"`.

Teacher scores (`data.teacher = "scores"`): `data.teacher_scores` names a
`{qid: {pid: score}}` file (`training.read_teacher_scores`), optionally
calibrated onto a reference teacher's scale (`data.teacher_calibration` =
"none" | "global" | "per_query", `data.teacher_calibration_reference`: see
`training.calibrate_scores`). `data.negatives = "scores"` draws the hard
negatives from each query's scored documents, all of them (`data.neg_depth`
does not apply; relevant documents never), for MarginMSE on a community score
file (`loss.distill = "margin_mse"`, `data.n_neg >= 1`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from laspar_jax import io_utils
from laspar_jax import teacher as teacher_lib
from laspar_jax.data import pipeline as pipeline_lib
from laspar_jax.data import sources
from laspar_jax.data import training

BATCHING = ("random", "clustered")


def teacher_cache_dir(data: ml_collections.ConfigDict, workdir: io_utils.PathLike) -> str:
  """Where the dense-teacher embeddings are cached: data.teacher_cache, else WORKDIR/teacher.

  The cache is memory-mapped, so it must be local: for a remote (gs://) workdir
  without data.teacher_cache it goes to a local temporary directory named by
  the workdir.
  """
  if data.teacher_cache:
    return os.fspath(data.teacher_cache)
  if io_utils.is_local(workdir):
    return os.path.join(os.fspath(workdir), "teacher")
  tag = hashlib.sha256(os.fspath(workdir).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "laspar_teacher", tag)


def _existing(path: str, field: str) -> str:
  if not path:
    raise ValueError(f"{field} is empty: give the path of a {{qid: {{pid: score}}}} score file")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{field}={path!r}: no such file")
  return path


def teacher_scores(data: ml_collections.ConfigDict) -> dict[str, dict[str, float]]:
  """The teacher scores of `data.teacher_scores`, calibrated as `data.teacher_calibration` asks.

  Raises:
    ValueError / FileNotFoundError: an empty or missing score file (naming the field).
  """
  path = _existing(data.teacher_scores, "data.teacher_scores")
  scores = training.read_teacher_scores(path)
  mode = data.get("teacher_calibration", "none") or "none"
  if mode == "none":
    return scores
  ref_path = _existing(data.get("teacher_calibration_reference", ""), "data.teacher_calibration_reference")
  return training.calibrate_scores(
    scores,
    training.read_teacher_scores(ref_path),
    mode,
    src_name=f"data.teacher_scores={path!r}",
    ref_name=f"data.teacher_calibration_reference={ref_path!r}",
  )


def build_pipeline(
  config: ml_collections.ConfigDict, tokenizer: Any, workdir: io_utils.PathLike, *, progress: bool = True
) -> tuple[pipeline_lib.TrainPipeline, dict[str, Any]]:
  """The training pipeline of a config.

  Args:
    config: a training config (data, model, optim.batch_size, seed).
    tokenizer: the encoder's tokenizer.
    workdir: the run's directory (default place of the teacher cache).
    progress: tqdm bars while building the teacher cache.

  Returns:
    (pipeline, info dict: examples, steps_per_epoch, collection).
  """
  d = config.data
  batching = d.get("batching", "random") or "random"
  if batching not in BATCHING:
    raise ValueError(f"data.batching must be one of {BATCHING}, got {batching!r}")
  if batching == "clustered" and d.teacher != "dense":
    raise ValueError("data.batching='clustered' needs data.teacher='dense' (it clusters teacher embeddings)")
  coll = sources.load_collection(d.collection, split=d.split or None, strict=bool(d.get("strict", False)))
  candidates, scores = None, None
  if d.teacher == "scores":
    scores = teacher_scores(d)
  if d.negatives == "bm25":
    docs = list(coll.docs())
    candidates = training.bm25_candidates(
      [x.doc_id for x in docs],
      [sources.doc_text(x) for x in docs],
      {q: coll.queries[q] for q in coll.qrels if q in coll.queries},
      depth=d.neg_depth,
    )
  elif d.negatives == "scores":
    if scores is None:
      raise ValueError("data.negatives='scores' needs data.teacher='scores' (negatives from the scored documents)")
    candidates = training.scored_candidates(scores)
  elif d.negatives not in ("none", ""):
    candidates = training.read_run(d.negatives, depth=d.neg_depth)
  pool = d.neg_pool if candidates is not None else 0
  examples = training.build_examples(
    coll.qrels,
    candidates,
    n_neg=max(pool, d.n_neg) if pool else 0,
    seed=config.seed,
    teacher_scores=scores,
    queries=coll.queries,
  )
  teacher = None
  if d.teacher == "dense":
    teacher = teacher_lib.teacher_embeddings(
      teacher_cache_dir(d, workdir),
      d.teacher_model,
      coll,
      examples,
      q_len=config.model.query_max_len,
      d_len=config.model.doc_max_len,
      progress=progress,
    )
  elif d.teacher not in ("none", "", "scores"):
    raise ValueError(f"data.teacher must be 'dense', 'scores' or 'none', got {d.teacher!r}")
  groups = None
  if batching == "clustered":
    emb = teacher.queries.lookup([e.qid for e in examples])
    groups = teacher_lib.balanced_clusters(emb, config.optim.batch_size, seed=config.seed)
  pipe = pipeline_lib.TrainPipeline(
    examples,
    coll,
    tokenizer,
    batch_size=config.optim.batch_size,
    n_neg=d.n_neg,
    q_len=config.model.query_max_len,
    d_len=config.model.doc_max_len,
    seed=config.seed,
    teacher=teacher,
    groups=groups,
    prefetch=d.prefetch,
    query_prefix=config.model.query_prefix,
    doc_prefix=config.model.doc_prefix,
  )
  info = {"examples": len(examples), "steps_per_epoch": pipe.steps_per_epoch, "collection": coll.name}
  if batching != "random":
    info["batching"] = batching
  return pipe, info


def micro_batches(pipe: Iterator[dict[str, np.ndarray]], accum: int) -> Iterator[dict[str, np.ndarray]]:
  """One optimizer step's input: a batch, or `accum` batches stacked on a new axis 0."""
  while True:
    if accum == 1:
      yield next(pipe)
    else:
      bs = [next(pipe) for _ in range(accum)]
      yield {k: np.stack([b[k] for b in bs]) for k in bs[0]}
