"""The configs a training run ran with, and what a resume may change.

WORKDIR/config.json is the config of the latest (re)start. A resume compares
the new config with it, field by field (dotted names):

  state-shaping fields   (`STATE_FIELDS`: the backbone, head, D, towers, LoRA,
                         frozen parameters, RNG implementation, ...) make the
                         saved parameters or optimizer state of another shape or
                         structure: the resume is refused with `ResumeRefusedError`
                         (one line naming each field, its old and new value)
                         before anything is written;
  any other field        (learning rate, steps, logging, evaluation, ...) is a
                         hyperparameter: the resume goes on and says which fields
                         changed; the config of each stretch is kept as
                         WORKDIR/config.<first step>.json (config.0.json for the
                         first), config.json holding the newest.

`check_state_shapes` is the backstop for fields the list does not name: the
checkpoint's array shapes against those the new config builds.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from laspar_jax import io_utils
from laspar_jax.data import sources

CONFIG_NAME = "config.json"

# Fields that shape the saved state (a prefix covers its sub-fields). Every other `model.*` field
# is state-shaping too except MODEL_FREE ones (they change computation, not parameters).
STATE_FIELDS = ("model", "optim.freeze", "optim.lora_trainable", "train.rng_impl")
MODEL_FREE = (
  "model.remat",
  "model.remat_policy",
  "model.attention_impl",
  "model.query_max_len",
  "model.doc_max_len",
  "model.query_prefix",
  "model.doc_prefix",
)


class RunRefusedError(ValueError):
  """A run refused before it wrote anything; the message is one line saying why and what to do."""


class ResumeRefusedError(RunRefusedError):
  """A resume whose config changed a field that shapes the saved state."""


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{dotted key: leaf value} of a nested dict (lists and tuples are leaves)."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def as_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as config.json holds it (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def shapes_state(key: str) -> bool:
  """True when the dotted field `key` shapes the saved parameters or optimizer state."""
  if any(key == f or key.startswith(f + ".") for f in MODEL_FREE):
    return False
  return any(key == f or key.startswith(f + ".") for f in STATE_FIELDS)


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(dotted key, old value, new value) of every field that differs, sorted.

  A field that only one side has counts when the other side has a leaf above
  it (e.g. `model.lora` {} against `model.lora.rank` 8: reported as
  `model.lora`); a field the old config lacks altogether (written before the
  field existed) is not a change.
  """
  old_j, new_j = as_json(old), as_json(new)
  a, b = flatten(old_j), flatten(new_j)
  out: dict[str, tuple[Any, Any]] = {}
  for k in sorted(set(a) | set(b)):
    if k in a and k in b:
      if a[k] != b[k]:
        out[k] = (a[k], b[k])
      continue
    other = b if k in a else a
    parts = k.split(".")
    above = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in other), None)
    if above is not None:
      out[above] = (_get(old_j, above), _get(new_j, above))
  return [(k, *v) for k, v in sorted(out.items())]


def _get(d: Mapping[str, Any], dotted: str) -> Any:
  for part in dotted.split("."):
    if not isinstance(d, Mapping) or part not in d:
      return None
    d = d[part]
  return d


def read_config(workdir: io_utils.PathLike) -> dict[str, Any] | None:
  """WORKDIR/config.json, or None when absent or unreadable."""
  path = io_utils.as_path(workdir) / CONFIG_NAME
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError, UnicodeDecodeError):
    return None


def _show(changes: list[tuple[str, Any, Any]]) -> str:
  return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)


def check_resume(
  workdir: io_utils.PathLike, config: ml_collections.ConfigDict, step: int
) -> list[tuple[str, Any, Any]]:
  """Compares `config` with the one the run in `workdir` last ran with, before resuming at `step`.

  Args:
    workdir: the run's folder (its config.json).
    config: the config of this (re)start.
    step: the checkpoint step the run resumes from.

  Returns:
    The changed hyperparameters ((key, old, new); empty when nothing changed or
    there is no earlier config.json).

  Raises:
    ResumeRefusedError: a state-shaping field changed (one line, nothing written).
  """
  old = read_config(workdir)
  if old is None:
    return []
  changes = changed_fields(old, config)
  shaping = [c for c in changes if shapes_state(c[0])]
  if shaping:
    raise ResumeRefusedError(
      f"cannot resume {io_utils.as_path(workdir)} from checkpoint {step}: {_show(shaping)} changed, and "
      f"{'this field shapes' if len(shaping) == 1 else 'these fields shape'} the saved parameters/optimizer "
      "state; run with the old value(s) or in a new workdir"
    )
  return changes


def record(workdir: io_utils.PathLike, config: ml_collections.ConfigDict, step: int, changed: bool) -> None:
  """Writes WORKDIR/config.json; when a resume at `step` changed hyperparameters, keeps each config.

  The config the run ran with up to now is kept as config.0.json (when no
  config.<step>.json exists yet) and the new one as config.<step>.json.
  """
  root = io_utils.as_path(workdir)
  text = config.to_json_best_effort(indent=2)
  if changed:
    if not any(p.name.startswith("config.") and p.name[7:-5].isdigit() for p in root.iterdir()):
      old = (root / CONFIG_NAME).read_text()
      io_utils.write_text_atomic(root / "config.0.json", old)
    io_utils.write_text_atomic(root / f"config.{step}.json", text)
  io_utils.write_text_atomic(root / CONFIG_NAME, text)


def check_state_shapes(saved: Mapping[str, Any] | None, target: Any, step: int, where: str) -> None:
  """Raises ResumeRefusedError when the checkpoint's arrays are not those `target` has.

  Args:
    saved: flat {path: (shape, dtype)} of the checkpoint (`Checkpointer.array_shapes`),
      or None when unreadable (then nothing is checked: restoring will tell).
    target: the state the new config builds (arrays or ShapeDtypeStructs).
    step: the checkpoint's step (for the message).
    where: the checkpoint folder (for the message).
  """
  if saved is None:
    return
  import jax  # pylint: disable=import-outside-toplevel  (keeps this module light for config tools)

  have = collections.Counter((tuple(s), str(d)) for s, d in saved.values())
  want = collections.Counter((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(target) if hasattr(x, "shape"))
  if have == want:
    return
  only_saved, only_new = sorted((have - want).elements()), sorted((want - have).elements())
  raise ResumeRefusedError(
    f"cannot resume from checkpoint {step} in {where}: it holds arrays of other shapes than this config builds "
    f"(checkpoint only: {only_saved[:3]}, config only: {only_new[:3]}); run with the config it was "
    "written with (config.json) or in a new workdir"
  )


def check_data(config: ml_collections.ConfigDict) -> None:
  """Stops a run before its workdir exists when a collection is neither a folder nor downloadable now.

  Raises:
    RunRefusedError: one line naming the collection (ir_datasets id) and LASPAR_DATA.
  """
  wanted = [(config.data.collection, config.data.get("split") or None)]
  if config.train.final_eval or config.train.eval_every:
    wanted.append((config.eval.collection, config.eval.get("split") or None))
  for spec, split in dict.fromkeys(wanted):
    try:
      sources.check_available(spec, split=split)
    except sources.DataUnavailableError as e:
      raise RunRefusedError(
        f"{e}; set LASPAR_DATA to a folder holding the collection (e.g. scifact/ in BEIR layout: corpus.jsonl, "
        "queries.jsonl, qrels/), or run once online"
      ) from None


def restore_message(directory: Any, damaged: Mapping[int, Any], restored: Any) -> str | None:
  """Where training starts: the resumed checkpoint, and any damaged ones set aside (None: a fresh start)."""
  aside = ", ".join(f"{s} ({p})" for s, p in sorted(damaged.items()))
  if restored is not None:
    extra = f"; damaged checkpoints set aside: {aside}" if aside else ""
    return f"resumed from checkpoint {restored[2]} ({directory}){extra}"
  if aside:
    return f"every checkpoint in {directory} is damaged (set aside: {aside}): training restarts from step 0"
  return None
