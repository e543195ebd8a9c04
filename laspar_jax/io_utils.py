"""File IO helpers: atomic directories and `etils.epath` paths (local or gs://).

A directory written with `atomic_directory(path)` appears under its final
name only when everything in it was written: the content goes to a sibling
`<name>.tmp-<pid>` that is renamed into place on success and removed on
failure, so a half-written encoder, cache or evaluation output is never read
as valid. On object stores (gs://), where a directory rename is a copy, the
temporary directory is copied and then removed (still never visible under the
final name before it is complete).

Temporary siblings left by killed processes (`<name>.tmp-<pid>`,
`<name>.old-<pid>` whose pid is no longer alive on this host) are removed by
the next `atomic_directory` of the same name, and `remove_stale_tmp(folder)`
clears every such entry of a folder. On commit, local files and folders get
the permissions of the umask (0644/0755 under the usual 022), whatever mode
the writer used (some writers create 0600 temporary files).

A full disk while writing raises `DiskFullError` (an OSError, errno ENOSPC)
naming the path and saying "no space left on device" (`disk_space_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator

from etils import epath

from laspar_jax.index.format import pid_alive  # the one liveness check (index/ is pure: it cannot import us)

PathLike = str | os.PathLike | epath.Path


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile/save on a full disk


class DiskFullError(OSError):
  """No space left where a file was being written; the message names the path."""


def _is_no_space(e: BaseException) -> bool:
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  text = str(e)
  return bool(_SHORT_WRITE.search(text)) or "no space left on device" in text.lower()


@contextlib.contextmanager
def disk_space_errors(path: PathLike, what: str = "") -> Iterator[None]:
  """Turns a full-disk error inside the block into a `DiskFullError` naming `path` and "no space left".

  A full disk shows up as OSError ENOSPC/EDQUOT, as numpy's "N requested and M
  written" short write (no errno), or as a library's error quoting the OS
  message; every other exception passes through unchanged.

  Args:
    path: what was being written (file or folder), named in the message.
    what: a few words on what it is ("the index", "checkpoint 40", ...).
  """
  try:
    yield
  except DiskFullError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless it is a full disk)
    if not _is_no_space(e):
      raise
    about = f" while writing {what}" if what else ""
    raise DiskFullError(
      errno.ENOSPC,
      f"{os.fspath(path)}: no space left on device{about} ({type(e).__name__}: {str(e)[:300]}); "
      "free some space there or write elsewhere",
    ) from e


def as_path(path: PathLike) -> epath.Path:
  """An `epath.Path` for a local path or a gs:// URI."""
  return epath.Path(path)


def is_local(path: PathLike) -> bool:
  """True for local filesystem paths (not gs://, s3://, ...)."""
  return "://" not in os.fspath(path)


def absolute_path(path: PathLike) -> epath.Path:
  """`path` as an epath.Path, made absolute when local (gs:// paths are already absolute)."""
  p = as_path(path)
  return as_path(os.path.abspath(os.fspath(p))) if is_local(p) else p


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
  remove_stale_tmp(final.parent, final.name)
  tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  try:
    with disk_space_errors(final):
      yield tmp
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    raise
  if is_local(tmp):
    _umask_permissions(os.fspath(tmp))
  old = final.parent / f"{final.name}.old-{os.getpid()}"
  if final.exists():
    final.rename(old)
  if is_local(final):
    os.replace(os.fspath(tmp), os.fspath(final))
  else:
    with disk_space_errors(final):
      tmp.copy(final) if tmp.is_file() else _copy_tree(tmp, final)
    tmp.rmtree()
  if old.exists():
    old.rmtree()


def _umask_permissions(root: str) -> None:
  """Gives a local tree the default modes of the umask (files 0666 & ~umask, folders 0777 & ~umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(root, 0o777 & ~umask)
  for folder, dirs, files in os.walk(root):
    for d in dirs:
      os.chmod(os.path.join(folder, d), 0o777 & ~umask)
    for f in files:
      path = os.path.join(folder, f)
      if not os.path.islink(path):
        os.chmod(path, (0o777 if os.access(path, os.X_OK) else 0o666) & ~umask)


_TMP_RE = re.compile(r"^(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def remove_stale_tmp(folder: PathLike, name: str | None = None) -> list[str]:
  """Removes `<name>.tmp-<pid>` / `<name>.old-<pid>` entries of `folder` whose process is dead.

  Args:
    folder: the folder to clean (local only; object stores are left alone).
    name: only entries of this final name (None: every name).

  Returns:
    The removed paths.
  """
  folder = os.fspath(folder)
  if not is_local(folder) or not os.path.isdir(folder):
    return []
  removed = []
  for entry in os.listdir(folder):
    m = _TMP_RE.match(entry)
    if m is None or (name is not None and m["name"] != name):
      continue
    pid = int(m["pid"])
    if pid == os.getpid() or pid_alive(pid):
      continue
    path = os.path.join(folder, entry)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(path)
    removed.append(path)
  return removed


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
  try:
    with disk_space_errors(final):
      tmp.write_text(text)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise
  tmp.rename(final) if not is_local(final) else os.replace(os.fspath(tmp), os.fspath(final))
