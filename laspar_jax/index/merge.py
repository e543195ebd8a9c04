"""Multi-host index builds: each host writes a part (its spilled runs), one host merges them.

Host p of P encodes a contiguous block of the corpus (its rows come after
those of hosts 0..p-1) and writes, with `PartWriter`, a part directory: its
spill runs (sorted by dim, local rows), their per-dim counts, its doc ids,
doc lengths and forward index, and `part.json`. No index is written there.
After a barrier, one host calls `merge_parts(part_dirs, path)`: the parts'
runs enter one `IndexWriter` merge, in part order, with row offsets
(`spill.Run.row_offset`), so rows stay ascending within each dim and the
result is, file for file, the index one writer fed the same documents in the
same order builds. The parts' runs are consumed (truncated) by the merge.

The part directories must be visible to the merging host (a shared
filesystem: NFS, a gcsfuse mount, or one machine).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from laspar_jax.index import format as fmt
from laspar_jax.index import spill
from laspar_jax.index.build import IndexWriter

PART_MANIFEST = "part.json"
_COPY_ROWS = 1 << 22


def part_dir(parts_root: str | os.PathLike, index: int) -> pathlib.Path:
  """The directory of host `index`'s part under `parts_root`."""
  return pathlib.Path(parts_root) / f"part-{index:05d}"


class PartWriter(IndexWriter):
  """An `IndexWriter` whose `close` leaves its spilled runs as a part for `merge_parts`.

  Same arguments as `IndexWriter`, with `path` the part directory (replaced
  if it exists: a part of an earlier, killed attempt is rebuilt).
  """

  def __init__(self, path: str | os.PathLike, dim: int, **kwargs: Any):
    kwargs["overwrite"] = True
    super().__init__(path, dim, **kwargs)

  def _finish(self) -> pathlib.Path:
    self._ids_file.close()
    self._spill()
    runs = []
    for i, r in enumerate(self._runs):
      np.save(self.tmp / "runs" / f"run{i:05d}.counts.npy", r.counts)
      runs.append({"name": r.rows_path.stem, "n": r.n})
    lengths = np.concatenate(self._doc_lengths) if self._doc_lengths else np.zeros(0, np.int32)
    np.save(self.tmp / "doc_lengths.npy", lengths)
    if self.impact_order:
      self._fwd_dims.close()
      self._fwd_vals.close()
    part = {
      "dim": self.dim,
      "value_dtype": self.value_dtype,
      "quant_scale": self.quant_scale,
      "approx": self.approx,
      "posting_format": self.posting_format,
      "run_dtype": self._run_dtype.str,
      "n_docs": self.n_docs,
      "n_postings": self.n_postings,
      "val_max": self._val_max,
      "max_id_len": self._max_id_len,
      "runs": runs,
      "encoder_hash": self.encoder_hash,
      "metadata": self.metadata,
    }
    (self.tmp / PART_MANIFEST).write_text(json.dumps(part, indent=1))
    fmt.fsync_dir(self.tmp)
    self._closed = True
    if self.path.exists():
      shutil.rmtree(self.path)
    os.rename(self.tmp, self.path)
    fmt.fsync_dir(self.path.parent)
    return self.path


def read_part(path: str | os.PathLike) -> dict[str, Any]:
  """The `part.json` of a finished part (FileNotFoundError naming it when the part is missing)."""
  f = pathlib.Path(path) / PART_MANIFEST
  if not f.exists():
    raise FileNotFoundError(f"{f}: no finished index part (did every host finish encoding?)")
  return json.loads(f.read_text())


class _MergeWriter(IndexWriter):
  """An `IndexWriter` fed whole parts instead of batches."""

  def add_part(self, path: pathlib.Path, part: dict[str, Any]) -> None:
    """Appends a part's documents (rows n_docs ..) and its runs to this build."""
    if np.dtype(part["run_dtype"]) != self._run_dtype:
      raise ValueError(f"{path}: runs of dtype {part['run_dtype']}, this build uses {self._run_dtype}")
    if self.n_docs + part["n_docs"] > np.iinfo(np.uint32).max:
      raise ValueError("more than 2**32-1 documents")
    with open(path / "runs" / "doc_ids.txt", "rb") as f:
      shutil.copyfileobj(f, self._ids_file)
    for r in part["runs"]:
      counts = np.load(path / "runs" / f"{r['name']}.counts.npy")
      self._runs.append(
        spill.Run(
          path / "runs" / f"{r['name']}.rows",
          path / "runs" / f"{r['name']}.vals",
          counts,
          int(r["n"]),
          row_offset=self.n_docs,
        )
      )
    self._doc_lengths.append(np.load(path / "doc_lengths.npy"))
    if self.impact_order:
      for name, w in (("fwd_dims.npy", self._fwd_dims), ("fwd_weights.npy", self._fwd_vals)):
        arr = np.load(path / name, mmap_mode="r")
        for s in range(0, arr.shape[0], _COPY_ROWS):
          w.write(np.asarray(arr[s : s + _COPY_ROWS]))
    self.n_docs += int(part["n_docs"])
    self.n_postings += int(part["n_postings"])
    self._val_max = max(self._val_max, float(part["val_max"]))
    self._max_id_len = max(self._max_id_len, int(part["max_id_len"]))


def merge_parts(
  part_dirs: Sequence[str | os.PathLike],
  path: str | os.PathLike,
  *,
  ram_budget_bytes: int = 2 << 30,
  overwrite: bool = False,
  metadata: dict[str, Any] | None = None,
  remove_parts: bool = True,
) -> pathlib.Path:
  """Merges finished parts, in the given order, into the index at `path`.

  Args:
    part_dirs: the parts (from `PartWriter`), in corpus order.
    path: the index directory to create (atomically, as `IndexWriter`).
    ram_budget_bytes: memory target of the merge.
    overwrite: replace an existing index.
    metadata: manifest metadata (default: the first part's).
    remove_parts: delete the part directories after the merge.

  Returns:
    The index path.
  """
  dirs = [pathlib.Path(p) for p in part_dirs]
  if not dirs:
    raise ValueError("no parts to merge")
  parts = [read_part(p) for p in dirs]
  first = parts[0]
  for d, p in zip(dirs, parts):
    for key in ("dim", "value_dtype", "quant_scale", "approx", "encoder_hash", "posting_format"):
      if p.get(key) != first.get(key):
        raise ValueError(f"{d}: {key}={p[key]!r} differs from {dirs[0]}'s {first[key]!r}")
  with _MergeWriter(
    path,
    first["dim"],
    value_dtype=first["value_dtype"],
    quant_scale=first["quant_scale"],
    ram_budget_bytes=ram_budget_bytes,
    encoder_hash=first["encoder_hash"],
    approx=first["approx"],
    posting_format=first.get("posting_format", "raw"),
    overwrite=overwrite,
    metadata=first["metadata"] if metadata is None else metadata,
  ) as w:
    for d, p in zip(dirs, parts):
      w.add_part(d, p)
  if remove_parts:
    for d in dirs:
      shutil.rmtree(d, ignore_errors=True)
  return w.path
