"""A thin wrapper around orbax's CheckpointManager for training runs.

A checkpoint at step s holds the train state (a pytree of arrays: parameters,
optimizer state, step, RNG, ...) and a small JSON item (the data iterator
position and anything else JSON-able). orbax writes each step to a temporary
directory and renames it when complete, so a run killed at any moment leaves
only whole checkpoints; the last `keep` are kept.

Asynchronous saves (`async_save=True`, what training uses): `save` returns
once the arrays are copied to host memory (the state may then be donated or
changed), orbax writes and commits the step in its background thread, and a
thread of ours waits for that commit and hashes the step at once. The next
`save`, `wait`, `restore` and `close` first join that thread (orbax's manager
is driven from one thread at a time) and raise its error, if any.

Integrity (`checkpoint_integrity`): once orbax has committed a step, every
file of it is hashed into `<step>/checksums.json`. Restoring the latest step
verifies it first; a damaged step (changed bytes, a truncated or missing
file, unreadable JSON metadata) is renamed to `<step>.corrupt-<time>`, a
warning names the file and the problem, and the next older step is tried.
Restoring an explicit step raises `CheckpointCorruptError` instead.

No step is used before its checksums exist: before every save a marker
`<root>/<step>.unhashed` is written (fsynced), and removed only after the
step's `checksums.json` is. A step with a marker and no checksums was
committed but never hashed (a run killed in that window, which asynchronous
saves widen): it is set aside as `<step>.unverified-<time>` like a damaged
one (a warning names it; an explicit restore raises). A marker without its
step (killed before orbax's commit) is removed.

A step with neither checksums nor marker (written by an older version) is
verified another way before use: its JSON metadata must parse, orbax must
restore it, and every floating-point array must be finite; then a warning
says so and its checksums are written, so later damage to it is caught like
any other.

Restoring takes an abstract target (jax.ShapeDtypeStruct leaves with
shardings), so arrays come back directly on their devices. The directory may
be local (made absolute) or gs:// (orbax writes object stores itself).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from laspar_jax import io_utils
from laspar_jax.checkpoint_integrity import CheckpointCorruptError
from laspar_jax import checkpoint_integrity as integrity

_LOG = logging.getLogger(__name__)
__all__ = ["Checkpointer", "CheckpointCorruptError", "abstract_like"]


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

  def __init__(self, directory: io_utils.PathLike, *, every: int, keep: int = 3, async_save: bool = False):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: root directory (local or gs://).
      every: save interval in steps (`should_save`); <= 0 saves only when forced.
      keep: checkpoints kept (older ones are deleted); <= 0 keeps all.
      async_save: write in a background thread (the arrays are copied to host
        before `save` returns), then hash the step in another as soon as it is committed.
    """
    directory = os.fspath(directory)
    self.directory = os.path.abspath(directory) if io_utils.is_local(directory) else directory
    self.every = every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep if keep > 0 else None, create=True, enable_async_checkpointing=async_save
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options)
    self._async = async_save
    self._hasher: threading.Thread | None = None  # waits for orbax's commit of the last step, then hashes it
    self._hash_error: tuple[int, BaseException] | None = None
    self.damaged: dict[int, str] = {}  # steps `restore` found damaged and moved aside: step -> problem

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
    self._finalize()  # the previous step is hashed (or its error raised) before this one starts
    if step in self._mgr.all_steps():
      return
    with io_utils.disk_space_errors(self.step_dir(step), f"checkpoint {step}"):
      if jax.process_index() == 0:
        integrity.mark_unhashed(self.step_dir(step))
      self._mgr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
      )
    self._hasher = threading.Thread(target=self._hash_when_committed, args=(step,), name=f"checksums-{step}")
    self._hasher.start()
    if not self._async:
      self._finalize()

  def step_dir(self, step: int) -> Any:
    """The folder of checkpoint `step`."""
    return io_utils.as_path(self.directory) / str(step)

  def _hash_when_committed(self, step: int) -> None:
    """(The hashing thread.) Waits for orbax to commit `step`, writes its checksums, then removes its marker."""
    try:
      self._mgr.wait_until_finished()
      if jax.process_index() == 0:
        if self.step_dir(step).exists():
          integrity.write_checksums(self.step_dir(step))
        integrity.clear_unhashed(self.step_dir(step))
    except BaseException as e:  # noqa: BLE001  (raised by `_finalize` in the caller's thread)
      self._hash_error = (step, e)

  def _finalize(self) -> None:
    """Joins the hashing thread of the last save and raises its error (a full disk as `DiskFullError`)."""
    if self._hasher is not None:
      self._hasher.join()
      self._hasher = None
    if self._hash_error is not None:
      (step, e), self._hash_error = self._hash_error, None
      with io_utils.disk_space_errors(self.step_dir(step), f"checkpoint {step} or its checksums"):
        raise e

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """Restores a checkpoint into the structure and shardings of `target`.

    Args:
      target: the state pytree (arrays or ShapeDtypeStructs with shardings).
      step: which step (default: the latest).

    Returns:
      (state, meta, step).

    Raises:
      FileNotFoundError: no (intact) checkpoint.
      CheckpointCorruptError: the explicitly asked `step` is damaged.
    """
    self._finalize()
    self._clear_stale_markers()
    if step is not None:
      problem = self._problem(step)
      if problem:
        raise CheckpointCorruptError(f"checkpoint {step} is damaged: {problem}")
      return self._restore(target, step)
    for step in sorted(self._mgr.all_steps(), reverse=True):
      problem = self._problem(step)
      if not problem:
        try:
          return self._restore(target, step)
        except CheckpointCorruptError as e:
          problem = str(e)
      self._set_aside(step, problem)
    raise FileNotFoundError(f"no intact checkpoint in {self.directory}")

  def _problem(self, step: int) -> str | None:
    """What is wrong with `step` (None: intact or legacy): never hashed (marker, no checksums), or damaged."""
    folder = self.step_dir(step)
    if integrity.unhashed_marker(folder).exists():
      if not integrity.has_checksums(folder):
        return (
          f"{folder}: committed but never hashed ({integrity.unhashed_marker(folder)} is there and "
          f"{integrity.CHECKSUMS} is not: the run stopped before its checksums were written); unverified"
        )
      if jax.process_index() == 0:  # killed after the (atomic) checksum write: the marker is stale
        integrity.clear_unhashed(folder)
    return integrity.verify(folder)

  def _clear_stale_markers(self) -> None:
    """Removes markers whose step folder is gone (a run killed before orbax committed the step)."""
    if jax.process_index() == 0:
      for step in integrity.marked_steps(self.directory):
        if not self.step_dir(step).exists():
          integrity.clear_unhashed(self.step_dir(step))

  def array_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """{path: (global shape, dtype)} of checkpoint `step`'s state, from orbax's metadata (None: unreadable)."""
    try:
      with _quiet_asyncio(), ocp.StandardCheckpointer() as reader:
        tree = reader.metadata(os.fspath(self.step_dir(step) / "state")).item_metadata.tree
      flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
      return {jax.tree_util.keystr(p): (tuple(m.shape), str(m.dtype)) for p, m in flat if hasattr(m, "shape")}
    except Exception:  # pylint: disable=broad-except  (damaged metadata: restoring reports it)
      return None

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any], int] | None:
    """`restore(target)` of the newest intact checkpoint, or None when there is none."""
    if not self._mgr.all_steps():
      return None
    try:
      return self.restore(target)
    except FileNotFoundError:
      return None

  def _restore(self, target: Any, step: int) -> tuple[Any, dict[str, Any], int]:
    checked = integrity.has_checksums(self.step_dir(step))
    if not checked and jax.process_index() == 0:
      _LOG.warning(
        "checkpoint %d has no %s (written by an older version, or a run killed between orbax's commit "
        "and the checksum write): verifying it by restoring it and checking every array is finite",
        step,
        integrity.CHECKSUMS,
      )
    try:
      with _quiet_asyncio():
        out = self._mgr.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()),
        )
    except Exception as e:  # pylint: disable=broad-except
      if checked:  # the bytes are the ones written: a real error (e.g. another model), not damage
        raise
      raise CheckpointCorruptError(
        f"{self.step_dir(step)}: cannot be restored and has no "
        f"{integrity.CHECKSUMS}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
      ) from None
    if not checked:
      bad = _count_nonfinite(out.state)
      if bad:
        raise CheckpointCorruptError(
          f"{self.step_dir(step)}: has no {integrity.CHECKSUMS} and holds {bad} NaN/inf values: damaged"
        )
      if jax.process_index() == 0:
        integrity.write_checksums(self.step_dir(step))
        _LOG.warning("checkpoint %d restored and every array finite; its %s written now", step, integrity.CHECKSUMS)
    return out.state, dict(out.meta), step

  def _set_aside(self, step: int, problem: str) -> None:
    """Logs why `step` is bad and renames it aside (lead host), so the next older step is used."""
    self.damaged[step] = problem
    if jax.process_index() == 0:
      unhashed = integrity.unhashed_marker(self.step_dir(step)).exists()
      dst = integrity.move_aside(self.step_dir(step), "unverified" if unhashed else "corrupt")
      integrity.clear_unhashed(self.step_dir(step))  # the folder's new name says it
      _LOG.warning(
        "checkpoint %d is %s (%s); moved it to %s and falling back to an older checkpoint",
        step,
        "unverified" if unhashed else "damaged",
        problem,
        dst,
      )
    self._mgr.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk (with their checksums)."""
    self._finalize()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    try:
      self._finalize()
    finally:
      self._mgr.close()


def _count_nonfinite(tree: Any) -> int:
  """NaN/inf values over every floating-point leaf (one jitted reduction: the same answer on every host)."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return 0
  count = jax.jit(lambda xs: sum(jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in xs))(leaves)
  return int(jax.device_get(count))


@contextlib.contextmanager
def _quiet_asyncio() -> Iterator[None]:
  """Silences asyncio's log while restoring: when one read fails, orbax's event loop closes with the
  other reads pending and asyncio logs a traceback for each ("Event loop is closed"); the one
  error raised is what matters."""
  log = logging.getLogger("asyncio")
  level = log.level
  log.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    log.setLevel(level)
