"""Corpora, queries and qrels through one API: `load_collection(spec, split=..., strict=...)`.

`spec` is either an existing path, whose layout is detected:
  - BEIR directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (header
    optional, CRLF accepted);
  - MS MARCO-style TSV directory: collection.tsv (`pid<TAB>text` or
    `pid<TAB>title<TAB>text`), queries.<split>.tsv (or queries.tsv), qrels in
    TREC format (`qid 0 pid rel`) as qrels.<split>.tsv|.txt or qrels/<split>.tsv;
  - SMART directory (Cranfield, CISI, CACM, ...): a `*.all*` document file
    with `.I/.T/.W/...` records, a `*.qry` query file and a `*qrel*`/`*.rel`
    qrels file (Cranfield grades, TREC or SMART 4 columns; fields, layouts and
    the Cranfield-only rules are in `laspar_jax.data.smart`);
or an ir_datasets id (`msmarco-passage/train/judged`, `msmarco-passage/dev/small`,
`msmarco-passage/trec-dl-2019/judged`, `beir/scifact/test`, ...; `split` is
appended as `<spec>/<split>` when given). ir_datasets downloads into
$IR_DATASETS_HOME (default ~/.ir_datasets) on first use and reads that cache
offline afterwards.

Local corpora are never read into memory whole: loading scans the file once and
keeps an index of byte offsets (numpy arrays: sorted ids as bytes, offsets),
which serves `docs()` (streamed in file order) and `doc(doc_id)` (random
access, as the training pipeline needs for positives and negatives).

`queries` holds every query the source lists; `judged_queries` those with
qrels (e.g. SciFact: 1,109 queries, 300 judged on test; ir_datasets ids such as
`beir/scifact/test` already list only their judged queries). Without `split` a
BEIR/TSV directory uses `test` if present, else its only qrels file.

The handling of bad input (malformed lines, CRLF, non-UTF-8 bytes, empty texts,
duplicate ids, qrels naming unknown documents or queries) is the table in
`laspar_jax.data.formats`; with strict=True every anomaly raises
`DataFormatError` naming the file and line.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from laspar_jax.data import formats
from laspar_jax.data import smart
from laspar_jax.data.collection import Collection, doc_text
from laspar_jax.data.formats import DataFormatError, Doc, Problems
from laspar_jax.data.ir_datasets_source import DataUnavailableError, IrDatasetsCollection, irds_id
from laspar_jax.data import ir_datasets_source

__all__ = [
  "Collection",
  "DataFormatError",
  "DataUnavailableError",
  "Doc",
  "IrDatasetsCollection",
  "check_available",
  "doc_text",
  "load_collection",
]


# ----------------------------------------------------------------------------- local files


class _DocIndex:
  """Byte-offset index over the records of one corpus file."""

  def __init__(self, path: str, spans: Iterable[formats.Span], problems: Problems, parse: Callable[[str, str], Doc]):
    self.path, self._parse, self._fd = path, parse, None
    ids, starts, ends, lines = [], [], [], []
    for s in spans:
      ids.append(s.record_id.encode("utf-8"))
      starts.append(s.start)
      ends.append(s.end)
      lines.append(s.line)
    width = max((len(i) for i in ids), default=1)
    ids_s = np.array(ids, dtype=f"S{max(width, 1)}")
    lines_n = np.array(lines, np.int64)
    order = np.argsort(ids_s, kind="stable")
    sorted_ids = ids_s[order]
    dup = np.zeros(len(ids), bool)
    if len(ids) > 1:
      dup[order[1:][sorted_ids[1:] == sorted_ids[:-1]]] = True  # stable: first occurrence kept
      for i in np.flatnonzero(dup):
        first = order[np.searchsorted(sorted_ids, ids_s[i], side="left")]
        problems.report(
          path,
          int(lines_n[i]),
          "duplicate_id",
          f"duplicate doc id {ids[i].decode()!r} (first at line {lines_n[first]})",
        )
    keep = ~dup
    self.starts = np.array(starts, np.int64)[keep]
    self.ends = np.array(ends, np.int64)[keep]
    self._ids_s = ids_s[keep]  # file order
    self._order = np.argsort(self._ids_s, kind="stable")
    self._sorted = self._ids_s[self._order]

  def __len__(self) -> int:
    return len(self.starts)

  def row(self, doc_id: str) -> int:
    key = doc_id.encode("utf-8")
    i = int(np.searchsorted(self._sorted, key))
    if i >= len(self._sorted) or self._sorted[i] != key:
      raise KeyError(doc_id)
    return int(self._order[i])

  def __contains__(self, doc_id: str) -> bool:
    try:
      self.row(doc_id)
      return True
    except KeyError:
      return False

  def ids(self) -> Iterator[str]:
    return (b.decode("utf-8") for b in self._ids_s)

  def get(self, doc_id: str) -> Doc:
    r = self.row(doc_id)
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    s, e = int(self.starts[r]), int(self.ends[r])
    raw = os.pread(self._fd, e - s, s)  # no shared file position: safe from several threads
    return self._parse(raw.decode("utf-8", errors="replace"), doc_id)

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)

  def iter_docs(self) -> Iterator[Doc]:
    with open(self.path, "rb") as f:
      for r in range(len(self.starts)):
        s, e = int(self.starts[r]), int(self.ends[r])
        if f.tell() != s:
          f.seek(s)
        raw = f.read(e - s).decode("utf-8", errors="replace")
        yield self._parse(raw, self._ids_s[r].decode("utf-8"))


def _scan_lines(path: str, problems: Problems, parse: Callable[[str], Any]) -> Iterator[formats.Span]:
  for lineno, start, end, text in formats.iter_lines(path, problems):
    doc = parse(text)
    if isinstance(doc, str):
      problems.report(path, lineno, "malformed", doc)
      continue
    if not doc.title and not doc.text:
      problems.report(path, lineno, "empty_doc", f"document {doc.doc_id!r} has no text", fatal=False)
    yield formats.Span(doc.doc_id, start, end, lineno)


def _scan_smart(path: str, problems: Problems, **doc_kw: bool) -> Iterator[formats.Span]:
  for span, fields in smart.iter_records(path, problems):
    if not span.record_id:
      continue
    doc = smart.make_doc(span.record_id, fields, **doc_kw)
    if not doc.title and not doc.text:
      problems.report(path, span.line, "empty_doc", f"document {doc.doc_id!r} has no text", fatal=False)
    yield span


def _line_parser(parse: Callable[[str], Any]) -> Callable[[str, str], Doc]:
  def parse_doc(raw: str, doc_id: str) -> Doc:
    doc = parse(raw.rstrip("\r\n"))
    assert not isinstance(doc, str), (doc_id, doc)
    return doc

  return parse_doc


def _read_queries_lines(path: str, problems: Problems, parse) -> dict[str, str]:
  queries, first_line = {}, {}
  for lineno, _, _, text in formats.iter_lines(path, problems):
    q = parse(text)
    if isinstance(q, str):
      problems.report(path, lineno, "malformed", q)
      continue
    qid, qtext = q
    if qid in first_line:
      problems.report(path, lineno, "duplicate_id", f"duplicate query id {qid!r} (first at line {first_line[qid]})")
      continue
    first_line[qid] = lineno
    if not qtext:
      problems.report(path, lineno, "empty_query", f"query {qid!r} has no text")
      continue
    queries[qid] = qtext
  return queries


# A qrels file losing more than this share of its lines (and at least _MAX_LOST_LINES) to
# unknown ids was most likely read with the wrong layout: an error, not warnings.
_MAX_LOST_SHARE = 0.05
_MAX_LOST_LINES = 3


def _read_qrels(
  path: str,
  problems: Problems,
  queries: dict[str, str],
  has_doc: Callable[[str], bool],
  layout: str = "auto",
  *,
  three_columns: str = "plain",
  smart_ids: bool = False,
) -> dict[str, dict[str, int]]:
  """Reads a qrels file; `layout` "auto" is detected (`smart.detect_qrels_layout`)."""
  if layout == "auto":
    layout = smart.detect_qrels_layout(path, has_doc, three_columns=three_columns)
  if layout not in smart.QRELS_LAYOUTS:
    raise ValueError(f"qrels layout {layout!r}; known: auto, {', '.join(smart.QRELS_LAYOUTS)}")
  rows = formats.iter_qrels(path, problems, kind=layout)
  if smart_ids:
    rows = smart.iter_smart_qrels(rows, smart.doc_lookup(has_doc))
  qrels: dict[str, dict[str, int]] = {}
  n_lines = n_lost = 0
  for lineno, qid, did, rel in rows:
    n_lines += 1
    if qid not in queries:
      n_lost += 1
      problems.report(path, lineno, "unknown_query", f"qrels name unknown query {qid!r}")
      continue
    if not has_doc(did):
      n_lost += 1
      problems.report(path, lineno, "unknown_doc", f"qrels name unknown document {did!r}")
      continue
    per_q = qrels.setdefault(qid, {})
    if did in per_q:
      problems.report(path, lineno, "duplicate_qrel", f"duplicate qrels pair ({qid}, {did})")
      continue
    per_q[did] = rel
  how = f"read with the {layout!r} qrels layout (force another with qrels_layout=)"
  if n_lost > _MAX_LOST_SHARE * n_lines and n_lost >= _MAX_LOST_LINES:
    raise DataFormatError(path, None, f"{n_lost} of {n_lines} qrels lines name unknown queries or documents; {how}")
  if not any(q in queries for q in qrels):
    raise DataFormatError(path, None, f"no judged queries ({n_lines} qrels lines, {n_lost} with unknown ids); {how}")
  return qrels


class LocalCollection(Collection):
  """A collection read from local files, with a byte-offset document index."""

  def __init__(
    self, name: str, index: _DocIndex, queries: dict[str, str], qrels: dict[str, dict[str, int]], problems: Problems
  ):
    self.name, self._index, self.queries, self.qrels, self.problems = name, index, queries, qrels, problems

  def docs(self) -> Iterator[Doc]:
    return self._index.iter_docs()

  def doc(self, doc_id: str) -> Doc:
    return self._index.get(doc_id)

  def doc_ids(self) -> Iterator[str]:
    """Document ids in corpus order."""
    return self._index.ids()

  def has_doc(self, doc_id: str) -> bool:
    return doc_id in self._index

  @property
  def num_docs(self) -> int:
    return len(self._index)


def _pick_qrels(candidates: dict[str, str], split: str | None, where: str) -> str | None:
  """Chooses the qrels file of `split` among {split_name: path}."""
  if split is not None:
    if split not in candidates:
      raise FileNotFoundError(f"{where}: no qrels for split {split!r} (have {sorted(candidates)})")
    return candidates[split]
  if not candidates:
    return None
  if "test" in candidates:
    return candidates["test"]
  if len(candidates) == 1:
    return next(iter(candidates.values()))
  raise ValueError(f"{where}: several qrels splits {sorted(candidates)}; pass split=")


def _load_beir_dir(path: str, split: str | None, problems: Problems, layout: str) -> LocalCollection:
  corpus = os.path.join(path, "corpus.jsonl")
  index = _DocIndex(
    corpus, _scan_lines(corpus, problems, formats.parse_jsonl_doc), problems, _line_parser(formats.parse_jsonl_doc)
  )
  queries = _read_queries_lines(os.path.join(path, "queries.jsonl"), problems, formats.parse_jsonl_query)
  cands = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(path, "qrels", "*.tsv"))}
  qpath = _pick_qrels(cands, split, path)
  qrels = _read_qrels(qpath, problems, queries, index.__contains__, layout) if qpath else {}
  return LocalCollection(path, index, queries, qrels, problems)


def _load_tsv_dir(path: str, split: str | None, problems: Problems, layout: str) -> LocalCollection:
  corpus = os.path.join(path, "collection.tsv")
  index = _DocIndex(
    corpus, _scan_lines(corpus, problems, formats.parse_tsv_doc), problems, _line_parser(formats.parse_tsv_doc)
  )
  qfiles = {
    os.path.basename(p)[len("queries.") : -len(".tsv")]: p for p in glob.glob(os.path.join(path, "queries.*.tsv"))
  }
  if os.path.exists(os.path.join(path, "queries.tsv")):
    qfiles[""] = os.path.join(path, "queries.tsv")
  if split is None:
    split = "test" if "test" in qfiles else (next(iter(qfiles)) if len(qfiles) == 1 else None)
    if split is None:
      raise ValueError(f"{path}: query files for splits {sorted(qfiles)}; pass split=")
  if split not in qfiles:
    raise FileNotFoundError(f"{path}: no queries.{split}.tsv (have {sorted(qfiles)})")
  queries = _read_queries_lines(qfiles[split], problems, formats.parse_tsv_query)
  suffix = f".{split}" if split else ""
  qrels = {}
  for cand in (f"qrels{suffix}.tsv", f"qrels{suffix}.txt", os.path.join("qrels", f"{split or 'test'}.tsv")):
    if os.path.exists(os.path.join(path, cand)):
      qrels = _read_qrels(os.path.join(path, cand), problems, queries, index.__contains__, layout)
      break
  return LocalCollection(path, index, queries, qrels, problems)


def _find_smart_files(path: str) -> tuple[str, str | None, str | None] | None:
  files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
  low = {f: f.lower() for f in files}
  docs = [f for f in files if ".all" in low[f] or low[f].endswith("all")]
  qry = [f for f in files if low[f].endswith(".qry") or low[f].endswith("qry")]
  rel = [f for f in files if ("qrel" in low[f] or low[f].endswith(".rel")) and not low[f].endswith(".readme")]
  if len(docs) != 1:
    return None
  with open(os.path.join(path, docs[0]), "rb") as f:
    if not f.readline().startswith(b".I"):
      return None
  j = lambda fs: os.path.join(path, fs[0]) if len(fs) == 1 else None
  return os.path.join(path, docs[0]), j(qry), j(rel)


def _load_smart_dir(path: str, files, problems: Problems, layout: str, keywords: bool) -> LocalCollection:
  docs_path, qry_path, rel_path = files
  cranfield = os.path.basename(docs_path).lower().startswith("cran")  # Cranfield-only rules (see smart)
  doc_kw = {"keywords": keywords, "cranfield": cranfield}
  index = _DocIndex(docs_path, _scan_smart(docs_path, problems, **doc_kw), problems, smart.doc_parser(**doc_kw))
  queries = smart.read_queries(qry_path, problems, cranfield=cranfield) if qry_path else {}
  qrels = {}
  if rel_path:
    qrels = _read_qrels(
      rel_path, problems, queries, index.__contains__, layout, three_columns="cranfield", smart_ids=not cranfield
    )
  return LocalCollection(path, index, queries, qrels, problems)


# ----------------------------------------------------------------------------- entry point


def load_collection(
  spec: str | os.PathLike,
  *,
  split: str | None = None,
  strict: bool = False,
  qrels_layout: str = "auto",
  keywords: bool = False,
) -> Collection:
  """Loads a collection named by a path (layout detected) or an ir_datasets id.

  Args:
    spec: directory (BEIR, MS MARCO TSV or SMART layout) or ir_datasets id.
    split: qrels split (BEIR `qrels/<split>.tsv`, TSV `queries.<split>.tsv`,
      ir_datasets `<spec>/<split>`); None picks `test` or the only one.
    strict: raise DataFormatError on any anomaly instead of applying the
      documented rule (see laspar_jax.data.formats).
    qrels_layout: "auto" (detected from the content) or one of
      `smart.QRELS_LAYOUTS` ("trec", "smart", "cranfield", "plain") to force it.
    keywords: SMART collections: append the `.K` keywords to the document text.

  Returns:
    A Collection.

  Raises:
    DataFormatError: strict and the files break their format; or (always) a
      qrels file that yields no judged query or loses more than a small share
      of its lines to unknown ids.
    FileNotFoundError / ValueError: unknown layout, id or split.
  """
  problems = Problems(strict)
  spec = os.fspath(spec)
  if os.path.isdir(spec):
    if os.path.exists(os.path.join(spec, "corpus.jsonl")):
      return _load_beir_dir(spec, split, problems, qrels_layout)
    if os.path.exists(os.path.join(spec, "collection.tsv")):
      return _load_tsv_dir(spec, split, problems, qrels_layout)
    smart_files = _find_smart_files(spec)
    if smart_files is not None:
      return _load_smart_dir(spec, smart_files, problems, qrels_layout, keywords)
    raise FileNotFoundError(
      f"{spec}: unknown layout (expected corpus.jsonl [BEIR], collection.tsv [MS MARCO] "
      f"or a SMART *.all file starting with .I)"
    )
  if os.path.exists(spec):
    raise FileNotFoundError(f"{spec}: expected a directory")
  return IrDatasetsCollection(irds_id(spec, split), problems)


def check_available(spec: str | os.PathLike, *, split: str | None = None) -> None:
  """Checks, before a run writes anything, that `load_collection(spec, split=split)` can read its data.

  A local folder must exist; an ir_datasets id is downloaded now when it is
  not cached yet (`ir_datasets_source.ensure_downloaded`).

  Args:
    spec: what `load_collection` takes.
    split: its split.

  Raises:
    DataUnavailableError: a missing folder, or an ir_datasets id that cannot be downloaded.
    ValueError: neither a path nor an ir_datasets id.
  """
  spec = os.fspath(spec)
  if os.path.exists(spec):
    return
  try:
    full = irds_id(spec, split)
  except ValueError:
    if os.path.isabs(spec) or spec.startswith((".", "~")):
      raise DataUnavailableError(f"{spec}: no such folder") from None
    raise
  ir_datasets_source.ensure_downloaded(full)
