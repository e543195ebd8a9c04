"""File IO helpers: atomic directories and `etils.epath` paths (local or gs://).

A directory written with `atomic_directory(path)` appears under its final
name only when everything in it was written: the content goes to a sibling
`<name>.tmp-<pid>` that is renamed into place on success and removed on
failure, so a half-written encoder, cache or evaluation output is never read
as valid. On object stores (gs://), where a directory rename is a copy, the
temporary directory is copied and then removed (still never visible under the
final name before it is complete).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike | epath.Path


def as_path(path: PathLike) -> epath.Path:
  """An `epath.Path` for a local path or a gs:// URI."""
  return epath.Path(path)


def is_local(path: PathLike) -> bool:
  """True for local filesystem paths (not gs://, s3://, ...)."""
  return "://" not in os.fspath(path)


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool = True) -> Iterator[epath.Path]:
  """Yields a temporary sibling directory that replaces `path` when the block succeeds.

  Args:
    path: the final directory.
    overwrite: replace an existing directory (else FileExistsError).

  Yields:
    The temporary directory to write into.
  """
  final = as_path(path)
  if final.exists() and not overwrite:
    raise FileExistsError(f"{final} exists (pass overwrite=True to replace it)")
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  try:
    yield tmp
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    raise
  old = final.parent / f"{final.name}.old-{os.getpid()}"
  if final.exists():
    final.rename(old)
  if is_local(final):
    os.replace(os.fspath(tmp), os.fspath(final))
  else:
    tmp.copy(final) if tmp.is_file() else _copy_tree(tmp, final)
    tmp.rmtree()
  if old.exists():
    old.rmtree()


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      _copy_tree(child, dst / child.name)
    else:
      child.copy(dst / child.name)


def write_text_atomic(path: PathLike, text: str) -> None:
  """Writes a text file through a temporary sibling and a rename."""
  final = as_path(path)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  tmp.rename(final) if not is_local(final) else os.replace(os.fspath(tmp), os.fspath(final))
