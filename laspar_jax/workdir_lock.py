"""An exclusive lock on a run's workdir: one training per workdir at a time.

`workdir_lock(workdir)` holds WORKDIR/.lock for the duration of a run. On a
local filesystem the lock is an `fcntl.flock` on that file, which the kernel
releases when the holder dies (kill -9 included), so the lock of a dead run is
taken over without any clean-up; the file records the holder's pid, host and
start time, which a refused run reports. On object stores (gs://), where no
such lock exists, the file itself is the lock (best effort): a holder on this
host whose pid is gone is taken over, a holder on another host must be
removed by hand when that run is known to be dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from laspar_jax import io_utils

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _me() -> dict[str, object]:
  return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _refuse(path: str, holder: str) -> WorkdirLockedError:
  try:
    info = json.loads(holder)
    who = f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"
  except (ValueError, AttributeError):
    who = "another process"
  return WorkdirLockedError(
    f"{os.path.dirname(path)} is in use by {who}: another run holds {path}. "
    "Use another --workdir, or wait for that run to end"
  )


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
      raise _refuse(path, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # the file stays (removing it would race with a waiting opener)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


@contextlib.contextmanager
def _remote_lock(path: str) -> Iterator[None]:
  p = io_utils.as_path(path)
  if p.exists():
    text = p.read_text()
    try:
      info = json.loads(text)
    except ValueError:
      info = {}
    stale = info.get("host") == socket.gethostname() and not io_utils.pid_alive(int(info.get("pid", 0)))
    if not stale:
      raise _refuse(path, text)
  p.write_text(json.dumps(_me()))
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      p.unlink()


@contextlib.contextmanager
def workdir_lock(workdir: io_utils.PathLike, *, enabled: bool = True) -> Iterator[None]:
  """Holds the exclusive lock of `workdir` (created if needed) inside the block.

  Args:
    workdir: the run's directory (local or gs://).
    enabled: False on non-lead hosts of a multi-host run (the lead holds it).

  Raises:
    WorkdirLockedError: another live run holds it (the message names its pid and host).
  """
  if not enabled:
    yield
    return
  io_utils.as_path(workdir).mkdir(parents=True, exist_ok=True)
  path = os.fspath(io_utils.as_path(workdir) / LOCK_NAME)
  with _local_lock(path) if io_utils.is_local(path) else _remote_lock(path):
    yield
