"""Scalar metrics of a run: TensorBoard event files (tensorboardX) and WORKDIR/history.jsonl.

The interface is clu's `MetricWriter` (`write_scalars(step, scalars)`,
`flush`, `close`), so a clu writer can take its place. clu itself is not
used: its `clu.metric_writers` package (and `clu.periodic_actions`, which
imports it) imports TensorFlow at import time (clu 0.0.12), and training needs
no TensorFlow; tensorboardX writes the same event files without it (and gs://
paths with google-cloud-storage installed).

TensorBoard tags are the scalar names with "@" spelled "_at_" ("eval/nDCG_at_10");
history rows keep the names as given ({"step": 10, "eval/nDCG@10": 0.54}) and
each row is appended to WORKDIR/history.jsonl (and flushed) as it is written,
so a killed run keeps its rows. A resumed run passes `resume_step`: rows after
that step (written by the killed run after its last checkpoint, and about to
be written again) are dropped first, so the history has no duplicates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorboardX

from laspar_jax import io_utils


class MetricWriter:
  """TensorBoard + history.jsonl writer of one run (enabled on the lead host only).

  Attributes:
    history: the rows written so far by this writer.
  """

  def __init__(self, workdir: io_utils.PathLike, *, enabled: bool = True, resume_step: int | None = None):
    """Opens WORKDIR/tb (when enabled).

    Args:
      workdir: the run's directory (local or gs://).
      enabled: False on non-lead hosts: nothing is written.
      resume_step: the step a resumed run restarts from: history rows after it are dropped.
    """
    self.workdir = io_utils.as_path(workdir)
    self.enabled = enabled
    self.history: list[dict[str, float]] = []
    self._path = self.workdir / "history.jsonl"
    if enabled and resume_step is not None:
      truncate_history(self._path, resume_step)
    self._tb = tensorboardX.SummaryWriter(str(self.workdir / "tb")) if enabled else None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes scalars (already prefixed, e.g. "train/loss") at `step`."""
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k.replace("@", "_at_"), v, step)
      self._tb.flush()
    row = {"step": step, **scalars}
    self.history.append(row)
    if self.enabled:
      append_jsonl(self._path, [row])

  def write_hparams(self, hparams: Mapping[str, object], metrics: tuple[str, ...] = ("eval/nDCG@10",)) -> None:
    """Records a run's hyperparameters in TensorBoard (HParams tab, and as text).

    Args:
      hparams: the config as a nested dict (e.g. `config_lib.to_dict(config)`); keys are
        flattened with "/" ("optim/lr"); values other than str/bool/int/float are
        written as JSON text.
      metrics: scalar tags the HParams tab shows beside them.
    """
    if self._tb is None:
      return
    flat, todo = {}, [("", hparams)]
    while todo:
      prefix, node = todo.pop()
      for k, v in node.items():
        if isinstance(v, Mapping):
          todo.append((f"{prefix}{k}/", v))
        else:
          flat[f"{prefix}{k}"] = v if isinstance(v, (str, bool, int, float)) else json.dumps(v, default=str)
    flat = dict(sorted(flat.items()))
    exp, ssi, sei = tensorboardX.summary.hparams(flat, {m.replace("@", "_at_"): 0.0 for m in metrics})
    for summary in (exp, ssi, sei):
      self._tb.file_writer.add_summary(summary)
    self._tb.add_text("hparams", "\n".join(f"    {k} = {v}" for k, v in flat.items()))
    self._tb.flush()

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Closes the event file (history rows are already on disk)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def append_jsonl(path: io_utils.PathLike, rows: list[dict[str, float]]) -> None:
  """Appends JSON rows to a file and flushes them (object stores: the file is rewritten whole)."""
  path = io_utils.as_path(path)
  text = "".join(json.dumps(row) + "\n" for row in rows)
  if io_utils.is_local(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.fspath(path), "a", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return
  old = path.read_text() if path.exists() else ""
  io_utils.write_text_atomic(path, old + text)


def truncate_history(path: io_utils.PathLike, step: int) -> int:
  """Drops rows after `step` (and a torn last line) from a history file; returns the rows dropped."""
  path = io_utils.as_path(path)
  if not path.exists():
    return 0
  keep, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:  # a line torn by a kill in the middle of a write
      dropped += 1
      continue
    if int(row.get("step", 0)) > step:
      dropped += 1
    else:
      keep.append(line + "\n")
  if dropped:
    io_utils.write_text_atomic(path, "".join(keep))
  return dropped


def mean_metrics(rows: list[Mapping[str, Any]]) -> dict[str, float]:
  """The mean of each metric over logged steps (host values, e.g. from one `jax.device_get`)."""
  return {k: float(np.mean([np.asarray(r[k]) for r in rows])) for k in rows[0]}
