"""CIFF (Common Index File Format) export and import.

CIFF (github.com/osirrc/ciff) is how Anserini/Lucene, PISA, Terrier and JASS
exchange inverted indexes: a stream of varint-length-prefixed protobuf
messages, one `Header`, `num_postings_lists` `PostingsList`s (docids
gap-encoded, `tf` an integer) and `num_docs` `DocRecord`s. The messages are
built with the `protobuf` runtime from the CIFF schema below (in a private
descriptor pool, so they coexist with `ciff-toolkit`'s classes).

Impacts travel as integer `tf`: a quantized index exports its codes (its
scale goes into the header's description as `quant_scale=<s>`); a float index
exports round(w * scale) (`scale`, default 100 as Anserini writes learned
weights). Terms are the dims as decimal strings; importing maps decimal terms
back to dims, and any other term to a dim in file order (kept in terms.npy).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
from typing import Any, BinaryIO, Iterator

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from laspar_jax.index import format as fmt

_FIELDS = {
  "Header": [
    ("version", 1, "INT32"),
    ("num_postings_lists", 2, "INT32"),
    ("num_docs", 3, "INT32"),
    ("total_postings_lists", 4, "INT32"),
    ("total_docs", 5, "INT32"),
    ("total_terms_in_collection", 6, "INT64"),
    ("average_doclength", 7, "DOUBLE"),
    ("description", 8, "STRING"),
  ],
  "Posting": [("docid", 1, "INT32"), ("tf", 2, "INT32")],
  "PostingsList": [("term", 1, "STRING"), ("df", 2, "INT64"), ("cf", 3, "INT64"), ("postings", 4, "Posting")],
  "DocRecord": [("docid", 1, "INT32"), ("collection_docid", 2, "STRING"), ("doclength", 3, "INT32")],
}


def _messages() -> dict[str, Any]:
  """Message classes of ciff.proto (package io.osirrc.ciff, proto3)."""
  fdp = descriptor_pb2.FileDescriptorProto(name="laspar_ciff.proto", package="io.osirrc.ciff", syntax="proto3")
  f = descriptor_pb2.FieldDescriptorProto
  for name, fields in _FIELDS.items():
    m = fdp.message_type.add(name=name)
    for fname, number, ftype in fields:
      if ftype == "Posting":
        m.field.add(
          name=fname, number=number, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED, type_name=".io.osirrc.ciff.Posting"
        )
      else:
        m.field.add(name=fname, number=number, type=getattr(f, "TYPE_" + ftype), label=f.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  fd = pool.Add(fdp)
  fd = pool.FindFileByName("laspar_ciff.proto")
  return {name: message_factory.GetMessageClass(fd.message_types_by_name[name]) for name in _FIELDS}


_MSG = _messages()
Header, Posting, PostingsList, DocRecord = (_MSG[n] for n in ("Header", "Posting", "PostingsList", "DocRecord"))


def _open(path: pathlib.Path, mode: str, gz: bool | None = None) -> BinaryIO:
  """Opens `path`, through gzip when `gz` (default: the name ends in .gz)."""
  gz = path.suffix == ".gz" if gz is None else gz
  return gzip.open(path, mode) if gz else open(path, mode)


def varint_bytes(n: int) -> bytes:
  """`n` >= 0 as a protobuf base-128 varint (the length prefix of each CIFF message)."""
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
  """(value, position after it) of the varint at `data[pos]`; IndexError when the data ends inside it."""
  value, shift = 0, 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, pos
    shift += 7
    if shift >= 64:
      raise ValueError(f"varint longer than 64 bits at byte {pos}")


def _write(f: BinaryIO, msg: Any) -> None:
  data = msg.SerializeToString()
  f.write(varint_bytes(len(data)))
  f.write(data)


class _Reader:
  """Reads length-prefixed messages, naming the file and message on damage."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    try:
      with _open(path, "rb") as f:
        self.data = f.read()
    except (OSError, EOFError) as e:  # gzip's BadGzipFile is an OSError
      raise fmt.IndexCorruptError(f"{path}: cannot be read ({e})") from e
    self.pos = 0
    self.count = 0

  def read(self, cls: Any, what: str) -> Any:
    try:
      size, self.pos = decode_varint(self.data, self.pos)
    except (IndexError, ValueError) as e:
      raise fmt.IndexCorruptError(f"{self.path}: truncated before {what} (byte {self.pos})") from e
    end = self.pos + size
    if end > len(self.data):
      raise fmt.IndexCorruptError(f"{self.path}: {what} at byte {self.pos} runs past the end (truncated)")
    msg = cls()
    try:
      msg.ParseFromString(self.data[self.pos : end])
    except Exception as e:  # protobuf's DecodeError
      raise fmt.IndexCorruptError(f"{self.path}: {what} at byte {self.pos} is not a valid message ({e})") from e
    self.pos = end
    return msg


def export_ciff(index: Any, path: str | os.PathLike, *, scale: float = 100.0, description: str = "") -> pathlib.Path:
  """Writes `index` (an open `Index`) as a CIFF file (gzip when the name ends in .gz).

  Args:
    index: the index.
    path: output file, written as `<path>.tmp-<pid>` and renamed when complete.
    scale: float indexes: tf = round(weight * scale) (at least 1). Quantized indexes export their codes.
    description: text for the header (the quant_scale is appended).

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
  quantized = index.value_dtype.kind == "u"
  tf_scale = float(index.quant_scale) if quantized else 1.0 / scale
  offsets = np.asarray(index.offsets)
  counts = np.diff(offsets)
  nonempty = np.flatnonzero(counts)
  lengths = np.asarray(index.doc_lengths)
  desc = (description + " " if description else "") + f"laspar_jax index; quant_scale={tf_scale!r}"
  try:
    with _open(tmp, "wb", gz=path.suffix == ".gz") as f:
      _write(
        f,
        Header(
          version=1,
          num_postings_lists=int(nonempty.size),
          num_docs=index.n_docs,
          total_postings_lists=int(nonempty.size),
          total_docs=index.n_docs,
          total_terms_in_collection=int(index.n_postings),
          average_doclength=float(lengths.mean()) if lengths.size else 0.0,
          description=desc,
        ),
      )
      for d in nonempty:
        d = int(d)
        rows = np.asarray(index.rows_array(d, d + 1)).astype(np.int64)
        if quantized:
          tf = index.stored_range(int(offsets[d]), int(offsets[d + 1])).astype(np.int64)
        else:
          tf = np.maximum(np.rint(index.weights_range(int(offsets[d]), int(offsets[d + 1])) * scale), 1).astype(
            np.int64
          )
        gaps = np.diff(rows, prepend=0)
        pl = PostingsList(term=str(d), df=int(rows.size), cf=int(tf.sum()))
        pl.postings.extend([Posting(docid=int(g), tf=int(t)) for g, t in zip(gaps, tf)])
        _write(f, pl)
      for r, (doc_id, n) in enumerate(zip(index.doc_ids, lengths)):
        _write(f, DocRecord(docid=r, collection_docid=str(doc_id), doclength=int(n)))
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def read_ciff(path: str | os.PathLike) -> tuple[Any, Iterator[tuple[str, np.ndarray, np.ndarray]], Any]:
  """Parses a CIFF file.

  Returns:
    (header, postings lists as (term, docids int64, tf int64) in file order, a
    callable returning the DocRecords as (docids, collection docids, lengths)).
  """
  path = pathlib.Path(path)
  reader = _Reader(path)
  header = reader.read(Header, "the header")
  if header.num_postings_lists < 0 or header.num_docs < 0:
    raise fmt.IndexCorruptError(f"{path}: header counts are negative ({header})")

  lists = []
  for i in range(header.num_postings_lists):
    pl = reader.read(PostingsList, f"postings list {i}")
    docids = np.cumsum(np.fromiter((p.docid for p in pl.postings), np.int64, len(pl.postings)))
    tf = np.fromiter((p.tf for p in pl.postings), np.int64, len(pl.postings))
    if pl.df != docids.size or (docids.size and (docids[0] < 0 or np.any(np.diff(docids) <= 0))):
      raise fmt.IndexCorruptError(f"{path}: postings list {i} (term {pl.term!r}) has bad df or docids")
    lists.append((pl.term, docids, tf))
  docs = [reader.read(DocRecord, f"doc record {i}") for i in range(header.num_docs)]
  if reader.pos != len(reader.data):
    raise fmt.IndexCorruptError(f"{path}: {len(reader.data) - reader.pos} bytes after the last doc record")
  return header, lists, docs


def import_ciff(
  path: str | os.PathLike,
  out: str | os.PathLike,
  *,
  dim: int | None = None,
  quant_scale: float | None = None,
  **writer_kwargs: Any,
) -> pathlib.Path:
  """Builds an index from a CIFF file.

  Args:
    path: the CIFF file (.gz read as gzip).
    out: the index directory to write.
    dim: D; default max decimal term + 1 (or the number of terms when some are not decimal).
    quant_scale: weight per tf unit; default the `quant_scale=` of the header's
      description (our own exports), else 1.
    **writer_kwargs: passed to `IndexWriter` (value_dtype, posting_format, ...).
      A uint8/uint16 value_dtype keeps the tf values as codes when they fit.

  Returns:
    The index path.
  """
  from laspar_jax.index.build import IndexWriter  # pylint: disable=g-import-not-at-top  (cycle)

  header, lists, docs = read_ciff(path)
  if quant_scale is None:
    m = re.search(r"quant_scale=([0-9.eE+-]+)", header.description)
    quant_scale = float(m.group(1)) if m else 1.0
  terms = [t for t, _, _ in lists]
  numeric = all(t.isdigit() for t in terms)
  dims = np.array([int(t) for t in terms] if numeric else range(len(terms)), np.int64)
  dim = int(dim if dim is not None else (dims.max() + 1 if dims.size else 1))
  n = header.num_docs
  # Doc-major postings (IndexWriter takes documents).
  all_docs = np.concatenate([x[1] for x in lists]) if lists else np.zeros(0, np.int64)
  if all_docs.size and all_docs.max() >= n:
    raise fmt.IndexCorruptError(f"{path}: a docid {int(all_docs.max())} is >= num_docs {n}")
  all_dims = np.repeat(dims, [x[1].size for x in lists])
  all_w = np.concatenate([x[2] for x in lists]).astype(np.float64) * quant_scale if lists else np.zeros(0)
  order = np.lexsort((all_dims, all_docs))
  all_docs, all_dims, all_w = all_docs[order], all_dims[order], all_w[order]
  per_doc = np.bincount(all_docs, minlength=n)
  k = max(int(per_doc.max()) if n else 1, 1)
  ids = [d.collection_docid for d in docs]
  if writer_kwargs.get("value_dtype", "float32").startswith("uint"):
    writer_kwargs.setdefault("quant_scale", quant_scale)
  metadata = dict(writer_kwargs.pop("metadata", {}) or {}, ciff_source=str(path), ciff_description=header.description)
  if not numeric:
    metadata["ciff_terms"] = terms
  start = np.zeros(n + 1, np.int64)
  np.cumsum(per_doc, out=start[1:])
  with IndexWriter(out, dim, metadata=metadata, **writer_kwargs) as w:
    for b0 in range(0, n, 4096):
      b1 = min(b0 + 4096, n)
      idx_bk = np.zeros((b1 - b0, k), np.int64)
      val_bk = np.zeros((b1 - b0, k), np.float32)
      for r in range(b0, b1):
        s, e = start[r], start[r + 1]
        idx_bk[r - b0, : e - s] = all_dims[s:e]
        val_bk[r - b0, : e - s] = all_w[s:e]
      w.add(ids[b0:b1], idx_bk, val_bk)
  return pathlib.Path(out)
