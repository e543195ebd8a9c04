"""Scalar metrics of a run: TensorBoard event files (tensorboardX) and WORKDIR/history.jsonl.

The interface is clu's `MetricWriter` (`write_scalars(step, scalars)`,
`flush`, `close`), so a clu writer can take its place. clu itself is not
used: its `clu.metric_writers` package (and `clu.periodic_actions`, which
imports it) imports TensorFlow at import time (clu 0.0.12), and training needs
no TensorFlow; tensorboardX writes the same event files without it (and gs://
paths with google-cloud-storage installed).

TensorBoard tags are the scalar names with "@" spelled "_at_" ("eval/nDCG_at_10");
history rows keep the names as given ({"step": 10, "eval/nDCG@10": 0.54}) and
are appended to WORKDIR/history.jsonl on `close`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import tensorboardX

from laspar_jax import io_utils


class MetricWriter:
  """TensorBoard + history.jsonl writer of one run (enabled on the lead host only).

  Attributes:
    history: the rows written so far by this writer.
  """

  def __init__(self, workdir: io_utils.PathLike, *, enabled: bool = True):
    """Opens WORKDIR/tb (when enabled).

    Args:
      workdir: the run's directory (local or gs://).
      enabled: False on non-lead hosts: nothing is written.
    """
    self.workdir = io_utils.as_path(workdir)
    self.enabled = enabled
    self.history: list[dict[str, float]] = []
    self._tb = tensorboardX.SummaryWriter(str(self.workdir / "tb")) if enabled else None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes scalars (already prefixed, e.g. "train/loss") at `step`."""
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k.replace("@", "_at_"), v, step)
      self._tb.flush()
    self.history.append({"step": step, **scalars})

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Closes the event file and appends this writer's rows to WORKDIR/history.jsonl."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self.enabled:
      append_jsonl(self.workdir / "history.jsonl", self.history)
      self.history = []


def append_jsonl(path: io_utils.PathLike, rows: list[dict[str, float]]) -> None:
  """Appends JSON rows to a file (rewritten whole: object stores cannot append)."""
  path = io_utils.as_path(path)
  old = path.read_text() if path.exists() else ""
  io_utils.write_text_atomic(path, old + "".join(json.dumps(row) + "\n" for row in rows))
