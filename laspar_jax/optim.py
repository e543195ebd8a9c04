"""The optimizer: optax `multi_transform` over parameter labels.

Every parameter gets one label from its "/"-joined path (e.g.
"query_head/kernel", "query_backbone/layers/0/attention/query/kernel"):

  frozen   the path matches a regex of `config.optim.freeze`: no update and NO
           optimizer state (`optax.set_to_zero`, whose state is empty)
  head     under a `query_head` / `doc_head` node (the sparse heads) or a
           backbone's `lm_head` (the vocabulary projection that a vocabulary
           head pools: SPLADE's MLM transform and bias; a tied decoder stays
           with the word embeddings): AdamW, its update scaled by
           `optim.head_lr_mult`
  lora     a LoRA adapter (`lora_a` / `lora_b`, `models/lora.py`): AdamW
  base     everything else (the backbone): AdamW

The first rule of `LABEL_RULES` that holds names a parameter; a new label is
one more rule plus one entry of `TRANSFORMS`. When the parameters hold LoRA
adapters, the backbone is frozen: every "base" parameter, and the backbone's
`lm_head`, becomes "frozen" unless it matches a regex of
`optim.lora_trainable` (e.g. "lm_head"); the sparse heads keep training.
Gradients are clipped by their global norm before the labels split them;
weight decay applies to matrices only (ndim > 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from laspar_jax import schedules

HEAD_NODES = ("query_head", "doc_head", "lm_head")
SPARSE_HEAD_NODES = ("query_head", "doc_head")
LORA_NODES = ("lora_a", "lora_b")  # = models.lora.LORA_NAMES
DEFAULT_LABEL = "base"
# optim.schedule -> warm-up + decay to end_lr; "constant" is warm-up then lr.
DECAYS: dict[str, Callable[..., optax.Schedule]] = {
  "linear": schedules.warmup_linear_decay,
  "cosine": schedules.warmup_cosine_decay,
}
SCHEDULES = (*DECAYS, "constant")


def param_path(path: tuple[Any, ...]) -> str:
  """The "/"-joined names of a pytree key path ("query_head/kernel")."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return "/".join(names)


def _is_frozen(path: str, optim: ml_collections.ConfigDict) -> bool:
  return any(re.search(pattern, path) for pattern in (optim.get("freeze", None) or ()))


def _is_head(path: str, optim: ml_collections.ConfigDict) -> bool:
  del optim
  return any(name in HEAD_NODES for name in path.split("/"))


def _is_lora(path: str, optim: ml_collections.ConfigDict) -> bool:
  del optim
  return any(name in LORA_NODES for name in path.split("/"))


# (label, rule(path, optim) -> bool), in priority order; no rule holds: DEFAULT_LABEL.
LABEL_RULES: tuple[tuple[str, Callable[[str, ml_collections.ConfigDict], bool]], ...] = (
  ("frozen", _is_frozen),
  ("lora", _is_lora),
  ("head", _is_head),
)


def _frozen_by_lora(path: str, label: str, optim: ml_collections.ConfigDict) -> bool:
  """With LoRA on: backbone parameters (not adapters, not sparse heads) are frozen."""
  if label not in ("base", "head") or any(n in SPARSE_HEAD_NODES for n in path.split("/")):
    return False
  return not any(re.search(pattern, path) for pattern in (optim.get("lora_trainable", None) or ()))


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _adamw(optim: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=_decay_mask)


def _head(optim: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  # The fresh sparse head learns at head_lr_mult x the backbone's rate: the whole AdamW
  # update (weight decay included) is scaled, as a scale after adamw always did.
  mult = float(optim.get("head_lr_mult", 1.0))
  return optax.chain(_adamw(optim, lr), optax.scale(mult)) if mult != 1.0 else _adamw(optim, lr)


# label -> (config.optim, lr schedule) -> transformation of that label's parameters.
TRANSFORMS: dict[str, Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]] = {
  "frozen": lambda optim, lr: optax.set_to_zero(),
  "head": _head,
  "lora": _adamw,
  "base": _adamw,
}


def param_labels(params: Any, optim: ml_collections.ConfigDict) -> Any:
  """A pytree like `params` of label strings (see `LABEL_RULES`).

  Args:
    params: parameters (arrays or ShapeDtypeStructs; only the paths are read).
    optim: config.optim (`freeze`: regexes searched in the "/"-joined paths;
      `lora_trainable`: regexes of backbone parameters that train beside LoRA adapters).

  Returns:
    The labels, e.g. {"query_head": {"kernel": "head"}, ...}.
  """

  def label(path, _):
    name = param_path(path)
    return next((lab for lab, rule in LABEL_RULES if rule(name, optim)), DEFAULT_LABEL)

  labels = jax.tree_util.tree_map_with_path(label, params)
  if "lora" not in jax.tree.leaves(labels):
    return labels
  return jax.tree_util.tree_map_with_path(
    lambda path, lab: "frozen" if _frozen_by_lora(param_path(path), lab, optim) else lab, labels
  )


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Warm-up then linear ("linear") or cosine ("cosine") decay to `end_lr`, or constant ("constant")."""
  warm = min(int(optim.warmup_steps), total_steps)
  if optim.schedule in DECAYS:
    return DECAYS[optim.schedule](
      peak_value=optim.lr, warmup_steps=warm, total_steps=total_steps, end_value=optim.end_lr
    )
  if optim.schedule == "constant":
    if not warm:
      return optax.constant_schedule(optim.lr)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, max(warm, 1)), optax.constant_schedule(optim.lr)], [warm]
    )
  raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {optim.schedule!r}")


def make_optimizer(
  optim: ml_collections.ConfigDict, total_steps: int, params: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then one transformation per parameter label.

  Args:
    optim: config.optim (lr, warmup_steps, schedule, end_lr, weight_decay, b1,
      b2, eps, grad_clip, head_lr_mult, freeze).
    total_steps: optimizer steps of the run (end of the decay).
    params: the parameter pytree the optimizer will update (its paths give the
      labels; ShapeDtypeStructs will do).

  Returns:
    (transformation, learning-rate schedule).
  """
  lr = learning_rate(optim, total_steps)
  labels = param_labels(params, optim)
  used = sorted(set(jax.tree.leaves(labels)))
  unknown = [lab for lab in used if lab not in TRANSFORMS]
  if unknown:
    raise ValueError(f"no transformation for labels {unknown}; known: {sorted(TRANSFORMS)}")
  by_label = optax.multi_transform({lab: TRANSFORMS[lab](optim, lr) for lab in used}, labels)
  clip = optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity()
  return optax.chain(clip, by_label), lr


def trainable_mask(params: Any, optim: ml_collections.ConfigDict) -> Any:
  """A pytree like `params` of bools: False for frozen parameters."""
  return jax.tree.map(lambda lab: lab != "frozen", param_labels(params, optim))
