"""Checksums of checkpoint step folders: write after commit, verify before restore, move bad ones aside.

`write_checksums(step_dir)` hashes every file of a committed step folder
(blake2b-128, streamed) into `step_dir/checksums.json` (through a temporary
file and a rename). `verify(step_dir)` recomputes them and returns what is
wrong (None when intact): a missing or truncated file, changed bytes, or an
unreadable JSON file of orbax's (`meta/metadata`, `_CHECKPOINT_METADATA`, ...)
when the step has no checksum file (written by an older version, or a run
killed between orbax's commit and the checksums). `move_aside` renames a bad
step to `<step>.corrupt-<unix time>` (never deleted: a person decides).

`mark_unhashed(step_dir)` writes `<step>.unhashed` beside the step folder (orbax
ignores names that are not integers) before the step is saved, fsynced on local
disks; `clear_unhashed` removes it once the checksums are written. A step whose
marker outlived it without checksums was committed but never hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from etils import epath

from laspar_jax import io_utils

CHECKSUMS = "checksums.json"
UNHASHED = ".unhashed"  # marker suffix: `<step>.unhashed` beside the step folder
_CHUNK = 1 << 24
# orbax's small JSON files: parsed when a step has no checksum file.
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA")


class CheckpointCorruptError(RuntimeError):
  """A checkpoint step folder is damaged; the message names the file and what is wrong."""


def _files(root: epath.Path, rel: str = "") -> list[str]:
  out = []
  for child in sorted((root / rel).iterdir() if rel else root.iterdir()):
    name = f"{rel}/{child.name}" if rel else child.name
    if child.is_dir():
      out += _files(root, name)
    elif name != CHECKSUMS:
      out.append(name)
  return out


def file_digest(path: epath.Path) -> tuple[int, str]:
  """(bytes, blake2b-128 hex) of one file, streamed."""
  h, n = hashlib.blake2b(digest_size=16), 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      n += len(chunk)
  return n, h.hexdigest()


def write_checksums(step_dir: io_utils.PathLike) -> dict[str, Any]:
  """Hashes every file of a committed step folder into `step_dir/checksums.json`.

  Args:
    step_dir: the step folder (local or gs://).

  Returns:
    {relative path: {"bytes", "blake2b"}}.
  """
  root = io_utils.as_path(step_dir)
  files = {}
  for rel in _files(root):
    n, digest = file_digest(root / rel)
    files[rel] = {"bytes": n, "blake2b": digest}
  io_utils.write_text_atomic(root / CHECKSUMS, json.dumps({"version": 1, "files": files}, indent=1))
  return files


def verify(step_dir: io_utils.PathLike) -> str | None:
  """What is wrong with a step folder ("<file>: <problem>"), or None when it is intact."""
  root = io_utils.as_path(step_dir)
  path = root / CHECKSUMS
  if not path.exists():
    for rel in _JSON_FILES:  # no checksums: at least the JSON files must parse
      if (root / rel).exists():
        try:
          json.loads((root / rel).read_text())
        except (ValueError, UnicodeDecodeError) as e:
          return f"{root / rel}: not valid JSON ({e}); truncated or modified"
    return None
  try:
    files = json.loads(path.read_text())["files"]
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    return f"{path}: unreadable checksum file ({e})"
  for rel, entry in files.items():
    f = root / rel
    if not f.exists():
      return f"{f}: listed in {CHECKSUMS} but missing"
    n, digest = file_digest(f)
    if n != entry["bytes"]:
      return f"{f}: {n} bytes, {CHECKSUMS} says {entry['bytes']} (truncated or modified)"
    if digest != entry["blake2b"]:
      return f"{f}: blake2b {digest} does not match {CHECKSUMS} ({entry['blake2b']}): the bytes changed"
  return None


def has_checksums(step_dir: io_utils.PathLike) -> bool:
  """True when the step folder carries a checksum file."""
  return (io_utils.as_path(step_dir) / CHECKSUMS).exists()


def move_aside(step_dir: io_utils.PathLike, why: str = "corrupt") -> epath.Path:
  """Renames a bad step folder to `<step>.<why>-<unix time>` and returns the new path."""
  src = io_utils.as_path(step_dir)
  dst = src.parent / f"{src.name}.{why}-{int(time.time())}"
  while dst.exists():
    dst = src.parent / f"{dst.name}x"
  if io_utils.is_local(src):
    os.replace(os.fspath(src), os.fspath(dst))
  else:
    src.rename(dst)
  return dst


def unhashed_marker(step_dir: io_utils.PathLike) -> epath.Path:
  """The marker `<step>.unhashed` of a step folder (beside it, in the checkpoint root)."""
  src = io_utils.as_path(step_dir)
  return src.parent / f"{src.name}{UNHASHED}"


def mark_unhashed(step_dir: io_utils.PathLike) -> None:
  """Writes the step's marker before it is saved (fsynced with its folder on local disks)."""
  marker = unhashed_marker(step_dir)
  if not io_utils.is_local(marker):
    marker.write_text("saving; checksums not written yet\n")
    return
  fd = os.open(os.fspath(marker), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    os.write(fd, b"saving; checksums not written yet\n")
    os.fsync(fd)
  finally:
    os.close(fd)
  _fsync_dir(marker.parent)


def clear_unhashed(step_dir: io_utils.PathLike) -> None:
  """Removes the step's marker (its checksums are written, or the step is gone)."""
  marker = unhashed_marker(step_dir)
  if marker.exists():
    marker.unlink()
    if io_utils.is_local(marker):
      _fsync_dir(marker.parent)


def marked_steps(root: io_utils.PathLike) -> list[int]:
  """Steps with a marker in the checkpoint root `root`."""
  root = io_utils.as_path(root)
  names = [p.name.removesuffix(UNHASHED) for p in root.iterdir() if p.name.endswith(UNHASHED)] if root.exists() else []
  return sorted(int(n) for n in names if n.isdigit())


def _fsync_dir(path: epath.Path) -> None:
  fd = os.open(os.fspath(path), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
