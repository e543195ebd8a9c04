"""Up-front validation of a training config: sizes, ranges, names and combinations.

`check_config(config)` runs before a run writes anything (config.json,
checkpoints); every error names the field and its value, e.g.
`config.model.latent_dim=-5: must be >= 0`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from laspar_jax import losses
from laspar_jax import optim
from laspar_jax import platform
from laspar_jax import run_config
from laspar_jax import train_step
from laspar_jax.data import training
from laspar_jax.models import heads, layers

_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(run_config.RunRefusedError):
  """A config value out of range, of the wrong kind, or settings that cannot work together."""


# (field, test, what it must be); a field missing from the config is skipped.
_Rule = tuple[str, Callable[[Any], bool], str]
_RULES: tuple[_Rule, ...] = (
  ("model.latent_dim", lambda v: v >= 0, ">= 0 (latent heads need >= 1)"),
  ("model.query_max_len", lambda v: v >= 1, ">= 1"),
  ("model.doc_max_len", lambda v: v >= 1, ">= 1"),
  ("model.head", lambda v: v in heads.HEADS, f"one of {sorted(heads.HEADS)}"),
  ("model.doc_head", lambda v: not v or v in heads.HEADS, f"empty or one of {sorted(heads.HEADS)}"),
  ("model.dtype", lambda v: v in _DTYPES, f"one of {list(_DTYPES)}"),
  ("model.towers", lambda v: v in ("shared", "separate"), "'shared' or 'separate'"),
  ("model.remat_policy", lambda v: v in layers.REMAT_POLICIES, f"one of {list(layers.REMAT_POLICIES)}"),
  ("model.matmul_precision", lambda v: v in platform.MATMUL_PRECISIONS, f"one of {list(platform.MATMUL_PRECISIONS)}"),
  ("optim.batch_size", lambda v: v >= 1, ">= 1"),
  ("optim.accum_steps", lambda v: v >= 1, ">= 1"),
  ("optim.lr", lambda v: v > 0, "> 0"),
  ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
  ("optim.schedule", lambda v: v in optim.SCHEDULES, f"one of {list(optim.SCHEDULES)}"),
  ("optim.end_lr", lambda v: v >= 0, ">= 0"),
  ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
  ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.eps", lambda v: v > 0, "> 0"),
  ("optim.grad_clip", lambda v: v >= 0, ">= 0 (0: off)"),
  ("optim.head_lr_mult", lambda v: v > 0, "> 0"),
  ("train.total_steps", lambda v: v >= 1, ">= 1"),
  ("train.log_every", lambda v: v >= 1, ">= 1"),
  ("train.checkpoint_every", lambda v: v >= 0, ">= 0 (0: only at the end)"),
  ("train.keep_checkpoints", lambda v: v >= 0, ">= 0 (0: keep all)"),
  ("train.eval_every", lambda v: v >= 0, ">= 0 (0: only at the end)"),
  ("train.q_topk", lambda v: v >= 0, ">= 0 (0: off)"),
  ("train.d_topk", lambda v: v >= 0, ">= 0 (0: off)"),
  ("train.rng_impl", lambda v: v in ("threefry2x32", "rbg", "unsafe_rbg"), "'threefry2x32', 'rbg' or 'unsafe_rbg'"),
  ("data.n_neg", lambda v: v >= 0, ">= 0"),
  ("data.neg_depth", lambda v: v >= 1, ">= 1"),
  ("data.teacher", lambda v: v in ("none", "dense", "scores", ""), "'none', 'dense' or 'scores'"),
  ("data.teacher_calibration", lambda v: v in training.CALIBRATIONS, f"one of {list(training.CALIBRATIONS)}"),
  ("eval.q_topk", lambda v: v >= 1, ">= 1"),
  ("eval.d_topk", lambda v: v >= 1, ">= 1"),
  ("eval.batch_size", lambda v: v >= 0, ">= 0 (0: the platform's default)"),
  ("eval.max_queries", lambda v: v >= 0, ">= 0 (0: all)"),
  ("eval.max_docs", lambda v: v >= 0, ">= 0 (0: all)"),
  ("eval.search_threads", lambda v: v >= 0, ">= 0 (0: all cores)"),
  ("seed", lambda v: v >= 0, ">= 0"),
  ("data.neg_pool", lambda v: v >= 1, ">= 1"),
  ("data.prefetch", lambda v: v >= 0, ">= 0 (0: off)"),
  ("loss.ranking_weight", lambda v: v >= 0, ">= 0"),
  ("loss.temperature", lambda v: v > 0, "> 0"),
  ("loss.distill_weight", lambda v: v >= 0, ">= 0"),
  ("loss.teacher_temperature", lambda v: v > 0, "> 0"),
  ("loss.reg_warmup_steps", lambda v: v >= 0, ">= 0 (0: no warm-up)"),
  ("loss.regularizers.*.weight", lambda v: v >= 0, ">= 0 (a regularizer rewards density when negative)"),
  ("loss.doc_reg_weights", lambda v: all(w >= 0 for w in v), "empty or (positives, negatives) weights >= 0"),
  ("mesh.data", lambda v: v == -1 or v >= 1, ">= 1, or -1 (the remaining devices)"),
  ("mesh.model", lambda v: v == -1 or v >= 1, ">= 1, or -1 (the remaining devices)"),
  ("model.lora.rank", lambda v: v >= 1, ">= 1"),
  ("model.lora.alpha", lambda v: v > 0, "> 0"),
  ("model.lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("model.head_kwargs.kernel_std", lambda v: v > 0, "> 0"),
  ("model.doc_head_kwargs.kernel_std", lambda v: v > 0, "> 0"),
  ("zeroshot.batch_size", lambda v: v >= 1, ">= 1"),
  ("zeroshot.query_max_len", lambda v: v >= 1, ">= 1"),
  ("zeroshot.doc_max_len", lambda v: v >= 1, ">= 1"),
  ("zeroshot.topk", lambda v: v >= 0, ">= 0 (0: every dim)"),
)


def _values(config: ml_collections.ConfigDict, dotted: str) -> list[tuple[str, Any]]:
  """(dotted name, value) of the fields `dotted` names; a `*` part matches every key at that level."""
  found: list[tuple[str, Any]] = [("", config)]
  for part in dotted.split("."):
    nxt = []
    for name, node in found:
      if not hasattr(node, "keys"):
        continue
      for key in node.keys() if part == "*" else [part] if part in node else []:
        nxt.append((f"{name}.{key}" if name else str(key), node[key]))
    found = nxt
  return found


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value is out of range or of the wrong kind."""
  for pattern, ok, what in _RULES:
    for dotted, value in _values(config, pattern):
      _check_one(dotted, value, ok, what)


def _check_one(dotted: str, value: Any, ok: Callable[[Any], bool], what: str) -> None:
  if value is not None:
    try:
      good = bool(ok(value))
    except TypeError:
      good = False
    if isinstance(value, bool) and what.startswith((">", "in [")):  # True is not a number
      good = False
    if not good:
      raise ConfigError(f"config.{dotted}={value!r}: must be {what}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a bad value or settings that cannot work together (before anything is built).

  Args:
    config: a training config (configs/*.py).
  """
  check_ranges(config)
  latent = [h for h in (config.model.head, config.model.get("doc_head", "")) if h.startswith("latent")]
  if latent and config.model.latent_dim < 1:
    raise ConfigError(f"config.model.latent_dim={config.model.latent_dim!r}: the {latent[0]!r} head needs >= 1")
  distill, teacher = config.loss.distill or None, config.data.teacher
  need = losses.DISTILL_INPUTS.get(distill, ()) if distill else ()
  if distill and distill not in losses.DISTILL_LOSSES:
    raise ConfigError(f"loss.distill={distill!r}; known: {sorted(losses.DISTILL_LOSSES)}")
  if "teacher_q_be" in need and teacher != "dense":
    raise ConfigError(f"loss.distill={distill!r} needs data.teacher='dense' (got {teacher!r})")
  if "teacher_scores_bn" in need and teacher != "scores":
    raise ConfigError(f"loss.distill={distill!r} needs data.teacher='scores' with data.teacher_scores")
  if distill in ("margin_mse",) and config.data.n_neg < 1:
    raise ConfigError("loss.distill='margin_mse' needs hard negatives (data.n_neg >= 1)")
  if config.data.n_neg > 0 and config.data.negatives in ("none", ""):
    raise ConfigError("data.n_neg > 0 needs data.negatives ('bm25', 'scores' or a run file)")
  _check_teacher_scores(config.data)
  train_step.regularizers_from_config(config.loss.regularizers)
  if train_step.doc_reg_weights_from_config(config.loss.get("doc_reg_weights", ())) and config.data.n_neg < 1:
    raise ConfigError(
      f"loss.doc_reg_weights={tuple(config.loss.doc_reg_weights)!r} weighs positive and hard-"
      "negative documents: it needs data.n_neg >= 1 (in-batch only: set loss.doc_reg_weights=())"
    )


def _check_teacher_scores(data: ml_collections.ConfigDict) -> None:
  """Score-file settings: a file for teacher='scores', and what negatives='scores' and calibration need."""
  calibration = data.get("teacher_calibration", "none") or "none"
  if data.teacher == "scores" and not data.get("teacher_scores", ""):
    raise ConfigError("data.teacher='scores' needs data.teacher_scores (a {qid: {pid: score}} file)")
  if data.negatives == "scores" and data.teacher != "scores":
    raise ConfigError(f"data.negatives='scores' needs data.teacher='scores' (got {data.teacher!r})")
  if calibration != "none":
    if data.teacher != "scores":
      raise ConfigError(f"data.teacher_calibration={calibration!r} needs data.teacher='scores' (got {data.teacher!r})")
    if not data.get("teacher_calibration_reference", ""):
      raise ConfigError(
        f"data.teacher_calibration={calibration!r} needs data.teacher_calibration_reference "
        "(the score file whose scale to match)"
      )
