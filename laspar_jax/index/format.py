"""On-disk format of the inverted index: a directory of .npy arrays plus manifest.json.

Layout of `<index>/` (format version 1; version 2 replaces rows/weights with
the compressed block files of `compress.py`)::

  manifest.json      format, version, D, n_docs, n_postings, value dtype, quant
                     scale, encoder hash, per-file byte size + blake2b, stats
  offsets.npy        int64 [D + 1]: postings of dim j are [offsets[j], offsets[j+1])
  rows.npy           uint32 [P]: doc row of each posting, ascending within a dim
  weights.npy        float32 | float16 | uint8 | uint16 [P] (integer = impact * scale)
  doc_ids.npy        bytes 'S<w>' [N]: utf-8 doc id of each row
  doc_lengths.npy    int32 [N]: postings per doc
  impact_rows.npy    optional, uint32 [P]: rows of each dim sorted by weight desc
  impact_weights.npy optional, weights in the same order
  fwd_offsets.npy    optional, int64 [N + 1]: forward (doc-major) index ...
  fwd_dims.npy       optional, int32 [P]: ... dims of each doc
  fwd_weights.npy    optional, weights in the same order

The directory is written as `<index>.tmp-<pid>` and renamed when complete, so
a path that exists and holds a manifest is a complete index. On load every
file's size is checked against the manifest (cheap); `verify="full"` also
recomputes the blake2b checksums (of each file's data after the .npy header;
the header itself is checked against the manifest's dtype and shape).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np

FORMAT_NAME = "laspar-inverted-index"
FORMAT_VERSION = 1
# Version 2: compressed ("blocked") postings, see compress.py; doc files as in version 1.
FORMAT_VERSION_BLOCKED = 2
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_BLOCKED)
MANIFEST = "manifest.json"
VALUE_DTYPES = ("float32", "float16", "uint8", "uint16")
_HASH_CHUNK = 1 << 24
# verify="auto" hashes everything when the index is at most this big.
AUTO_FULL_VERIFY_BYTES = 1 << 30


class IndexFormatError(ValueError):
  """The directory is not a complete index of a supported format."""


class IndexCorruptError(IndexFormatError):
  """A file of the index is missing, truncated or was modified."""


def _new_hash():
  return hashlib.blake2b(digest_size=16)


def data_offset(f) -> int:
  """Byte offset of the array data in an open .npy file (after the header)."""
  f.seek(0)
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    np.lib.format.read_array_header_1_0(f)
  else:
    np.lib.format.read_array_header_2_0(f)
  return f.tell()


def file_checksum(path: str | os.PathLike) -> str:
  """Streaming blake2b-128 (hex) of the data bytes of a .npy file (after its header).

  The header is checked separately (dtype and shape against the manifest),
  which lets a writer fix the length in the header after streaming the data.
  """
  h = _new_hash()
  with open(path, "rb") as f:
    try:
      f.seek(data_offset(f))
    except ValueError as e:
      raise IndexCorruptError(f"{path}: bad .npy header ({e})") from e
    while chunk := f.read(_HASH_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _npy_header(dtype: np.dtype, length: int, size: int | None = None) -> bytes:
  """A version 1.0 .npy header, space-padded to `size` bytes (or to 64-alignment)."""
  d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (int(length),)}
  body = repr(d).encode("latin1")
  base = len(np.lib.format.MAGIC_PREFIX) + 2 + 2
  if size is None:
    size = -(-(base + len(body) + 1) // 64) * 64
  pad = size - base - len(body) - 1
  if pad < 0:
    raise ValueError("header does not fit")
  hlen = size - base
  return np.lib.format.MAGIC_PREFIX + b"\x01\x00" + hlen.to_bytes(2, "little") + body + b" " * pad + b"\n"


class NpyStreamWriter:
  """Writes a 1-D .npy file chunk by chunk, hashing the data as it goes.

  With `length=None` the length is fixed at `close()` (the header is written
  with room for any length and rewritten in place).
  """

  def __init__(self, path: str | os.PathLike, dtype: Any, length: int | None):
    self.path = pathlib.Path(path)
    self.dtype = np.dtype(dtype)
    self.length = None if length is None else int(length)
    self._written = 0
    self._hash = _new_hash()
    self._f = open(self.path, "wb")
    self._header_size = len(_npy_header(self.dtype, 10**18))
    self._f.write(_npy_header(self.dtype, self.length if self.length is not None else 0, self._header_size))

  def write(self, arr: np.ndarray) -> None:
    """Appends `arr` (cast to the file dtype)."""
    arr = np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1)
    if self.length is not None and self._written + arr.size > self.length:
      raise ValueError(f"{self.path.name}: writing past declared length {self.length}")
    data = memoryview(arr).cast("B")
    self._f.write(data)
    self._hash.update(data)
    self._written += arr.size

  @property
  def written(self) -> int:
    return self._written

  def close(self) -> dict[str, Any]:
    """Fixes the header, fsyncs and returns the manifest entry of the file."""
    if self.length is None:
      self.length = self._written
      self._f.seek(0)
      self._f.write(_npy_header(self.dtype, self.length, self._header_size))
    if self._written != self.length:
      raise ValueError(f"{self.path.name}: wrote {self._written} of {self.length} items")
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()
    return {
      "bytes": self.path.stat().st_size,
      "blake2b": self._hash.hexdigest(),
      "dtype": self.dtype.str,
      "shape": [self.length],
    }


def write_array(path: str | os.PathLike, arr: np.ndarray) -> dict[str, Any]:
  """Writes a whole 1-D array as .npy and returns its manifest entry."""
  arr = np.asarray(arr).reshape(-1)
  w = NpyStreamWriter(path, arr.dtype, arr.size)
  w.write(arr)
  return w.close()


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
  """Writes manifest.json (fsynced) into `directory`."""
  path = pathlib.Path(directory) / MANIFEST
  with open(path, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads and sanity-checks manifest.json of an index directory."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"no index directory at {directory}")
  path = directory / MANIFEST
  if not path.is_file():
    raise IndexFormatError(
      f"{path}: missing; {directory} is not a complete index (an interrupted build never gets a manifest)"
    )
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise IndexCorruptError(f"{path}: not valid JSON ({e})") from e
  if manifest.get("format") != FORMAT_NAME:
    raise IndexFormatError(f"{path}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
  if manifest.get("format_version") not in FORMAT_VERSIONS:
    raise IndexFormatError(
      f"{path}: format_version {manifest.get('format_version')} is not supported (this code reads {FORMAT_VERSIONS})"
    )
  if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("dim"), int):
    raise IndexCorruptError(f"{path}: 'files' or 'dim' missing or of the wrong type")
  return manifest


def verify_files(directory: str | os.PathLike, manifest: dict[str, Any], verify: str = "auto") -> None:
  """Checks every file listed in the manifest.

  Args:
    directory: index directory.
    manifest: its parsed manifest.
    verify: "none", "size" (byte sizes, cheap), "full" (sizes and blake2b of
      every byte) or "auto" ("full" up to 1 GiB of files, else "size").

  Raises:
    IndexCorruptError naming the first bad file.
  """
  if verify not in ("none", "size", "full", "auto"):
    raise ValueError(f"verify must be none|size|full|auto, got {verify!r}")
  if verify == "none":
    return
  directory = pathlib.Path(directory)
  files = manifest["files"]
  if verify == "auto":
    total = sum(int(e["bytes"]) for e in files.values())
    verify = "full" if total <= AUTO_FULL_VERIFY_BYTES else "size"
  for name, entry in files.items():
    path = directory / name
    if not path.is_file():
      raise IndexCorruptError(f"{path}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != int(entry["bytes"]):
      raise IndexCorruptError(f"{path}: size {size} bytes, manifest says {entry['bytes']} (truncated or modified)")
    if verify == "full":
      digest = file_checksum(path)
      if digest != entry["blake2b"]:
        raise IndexCorruptError(
          f"{path}: blake2b {digest} does not match the manifest ({entry['blake2b']}); the file was modified"
        )


def load_array(directory: str | os.PathLike, name: str, entry: dict[str, Any]) -> np.ndarray:
  """Memory-maps one array and checks its dtype and shape against the manifest."""
  path = pathlib.Path(directory) / name
  try:
    mmap = "r" if entry["shape"] and int(entry["shape"][0]) > 0 else None
    arr = np.load(path, mmap_mode=mmap, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise IndexCorruptError(f"{path}: cannot be read as .npy ({e})") from e
  if arr.dtype.str != entry["dtype"] or list(arr.shape) != list(entry["shape"]):
    raise IndexCorruptError(
      f"{path}: dtype/shape {arr.dtype.str}{list(arr.shape)} does not "
      f"match the manifest {entry['dtype']}{entry['shape']}"
    )
  return arr


def pid_alive(pid: int) -> bool:
  """True when a process `pid` exists on this host (or cannot be signalled: another user's)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_tmp_dirs(path: str | os.PathLike) -> list[pathlib.Path]:
  """Removes `<path>.tmp-<pid>` left by builds whose process is dead."""
  path = pathlib.Path(path)
  removed = []
  for cand in path.parent.glob(path.name + ".tmp-*"):
    try:
      pid = int(cand.name.rsplit("-", 1)[1])
    except ValueError:
      continue
    if pid != os.getpid() and not pid_alive(pid):
      shutil.rmtree(cand, ignore_errors=True)
      removed.append(cand)
  return removed


def commit_dir(tmp: pathlib.Path, path: pathlib.Path, overwrite: bool) -> None:
  """Renames a complete `tmp` directory to `path` (replacing an old one only if `overwrite`)."""
  old = None
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"{path} appeared during the build")
    old = path.parent / f"{path.name}.old-{os.getpid()}"
    os.rename(path, old)
  os.rename(tmp, path)
  fsync_dir(path.parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: pathlib.Path) -> None:
  """Flushes a directory entry to disk (after renames into it)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
