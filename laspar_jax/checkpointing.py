"""A thin wrapper around orbax's CheckpointManager for training runs.

A checkpoint at step s holds the train state (a pytree of arrays: parameters,
optimizer state, step, RNG, ...) and a small JSON item (the data iterator
position and anything else JSON-able). orbax writes each step to a temporary
directory and renames it when complete, so a run killed at any moment leaves
only whole checkpoints; the last `keep` are kept.

Restoring takes an abstract target (jax.ShapeDtypeStruct leaves with
shardings), so arrays come back directly on their devices. The directory may
be local (made absolute) or gs:// (orbax writes object stores itself).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from laspar_jax import io_utils


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStruct leaves (with the arrays' shardings) for a restore target."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return ocp.utils.to_shape_dtype_struct(x)
  return jax.tree.map(one, tree)


class Checkpointer:
  """Saves every `every` steps (and when asked), keeps the last `keep`, restores the latest.

  Attributes:
    directory: the checkpoint root (one sub-directory per step).
  """

  def __init__(self, directory: io_utils.PathLike, *, every: int, keep: int = 3,
               async_save: bool = False):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: root directory (local or gs://).
      every: save interval in steps (`should_save`); <= 0 saves only when forced.
      keep: checkpoints kept (older ones are deleted); <= 0 keeps all.
      async_save: write in a background thread (the arrays are copied to host
        before `save` returns).
    """
    directory = os.fspath(directory)
    self.directory = os.path.abspath(directory) if io_utils.is_local(directory) else directory
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None, create=True,
        enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, ascending."""
    return sorted(self._mgr.all_steps())

  def should_save(self, step: int) -> bool:
    """True when `step` is a multiple of the save interval."""
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes checkpoint `step` (overwrites nothing: an existing step is skipped).

    Args:
      step: the training step the state has reached.
      state: pytree of jax arrays.
      meta: JSON-able dict (data iterator position, ...).
    """
    if step in self._mgr.all_steps():
      return
    self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """Restores a checkpoint into the structure and shardings of `target`.

    Args:
      target: the state pytree (arrays or ShapeDtypeStructs with shardings).
      step: which step (default: the latest).

    Returns:
      (state, meta, step).

    Raises:
      FileNotFoundError: no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta), step

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._mgr.wait_until_finished()
    self._mgr.close()
