"""Readers for the on-disk formats of retrieval collections, with one rule per anomaly.

Formats: JSON lines (BEIR corpus/queries), TSV (MS MARCO collection/queries),
qrels (BEIR TSV with or without header, TREC 4-column, SMART 4-column,
Cranfield 3-column with grades; SMART records and the choice of the qrels
layout are in `laspar_jax.data.smart`), and
TREC run files (`read_trec_run`, `write_trec_run`: the one reader and writer).

Every anomaly is either handled by the rule below (strict=False, the default;
the anomaly is counted in `Problems.counts` and the first few are logged) or,
with strict=True, raised as `DataFormatError(path, line, msg)`:

| anomaly                                  | rule when not strict                          |
|------------------------------------------|-----------------------------------------------|
| CRLF line ends, blank lines, BEIR header | accepted silently (format features, not bad)  |
| non-UTF-8 bytes (`bad_utf8`)             | decoded with U+FFFD replacement, record kept  |
| malformed JSON / wrong TSV column count / | record skipped                               |
|   missing id or text, truncated line      |   (`malformed`)                              |
| duplicate doc or query id (`duplicate_id`)| first occurrence kept, later ones skipped    |
| empty document (no title, no text)        | kept, also when strict (`empty_doc`; real     |
|                                           |   collections have them: Cranfield 471, 995) |
| empty query text (`empty_query`)          | query dropped, with its qrels                |
| qrels line malformed / non-integer grade  | line skipped (`malformed`)                   |
| duplicate qrels pair (`duplicate_qrel`)   | first grade kept                             |
| qrels naming an unknown query or document | pair dropped (`unknown_query`/`unknown_doc`) |
| qrels file giving no judged query, or     | always an error (`DataFormatError` naming the |
|   losing > 5% (and >= 3) lines to unknown |   file and the qrels layout it assumed)       |
|   ids                                     |                                               |

A truncated last line of a JSON file is malformed JSON and follows that rule; a
truncated TSV line that still has the right columns cannot be told from a short
text and is read as it is.

Cranfield grades (cranqrel: 1 = complete answer .. 4 = minimum interest, 5 = no
interest, -1 = judged not relevant) become ir-measures relevance as
`rel = 5 - grade` for 1..4 (so 1 -> 4 best, 4 -> 1) and 0 for 5 and -1.
Cranfield query ids are positions (see `laspar_jax.data.smart`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import NamedTuple

from laspar_jax import io_utils

_LOG = logging.getLogger(__name__)
_MAX_LOGGED = 5


class DataFormatError(ValueError):
  """A collection file breaks its format; names the file and the 1-based line."""

  def __init__(self, path: str | os.PathLike, line: int | None, msg: str):
    self.path = os.fspath(path)
    self.line = line
    self.msg = msg
    where = f"{self.path}:{line}" if line else self.path
    super().__init__(f"{where}: {msg}")


class Problems:
  """Collects anomalies found while reading; raises on the first one when strict."""

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: list[str] = []

  def report(self, path: str | os.PathLike, line: int | None, kind: str, msg: str, *, fatal: bool = True) -> None:
    """Records one anomaly of `kind`; raises DataFormatError when strict and `fatal`."""
    if self.strict and fatal:
      raise DataFormatError(path, line, f"{msg} [{kind}]")
    self.counts[kind] += 1
    if self.counts[kind] <= _MAX_LOGGED:
      text = f"{os.fspath(path)}:{line}: {msg} [{kind}]"
      self.examples.append(text)
      _LOG.warning("%s", text)


class Doc(NamedTuple):
  """One document of a corpus."""

  doc_id: str
  title: str
  text: str


class Span(NamedTuple):
  """Where one record lies in its file (bytes [start, end)), and its first line."""

  record_id: str
  start: int
  end: int
  line: int


def _decode(raw: bytes, path, lineno: int, problems: Problems | None) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if problems is not None:
      problems.report(path, lineno, "bad_utf8", f"invalid UTF-8 at byte {e.start}")
    return raw.decode("utf-8", errors="replace")


def iter_lines(path, problems: Problems | None) -> Iterator[tuple[int, int, int, str]]:
  """Yields (lineno, start, end, text) for each non-blank line, line end stripped."""
  with open(path, "rb") as f:
    pos = 0
    for lineno, raw in enumerate(f, 1):
      start, pos = pos, pos + len(raw)
      body = raw.rstrip(b"\r\n")
      if not body.strip():
        continue
      yield lineno, start, pos, _decode(body, path, lineno, problems)


def read_span(path, start: int, end: int) -> str:
  """The text of bytes [start, end) of a file (invalid UTF-8 replaced)."""
  with open(path, "rb") as f:
    f.seek(start)
    return f.read(end - start).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- JSON lines


def _json_id(obj: dict) -> str | None:
  for key in ("_id", "doc_id", "id", "query_id"):
    v = obj.get(key)
    if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
      return str(v)
  return None


def parse_jsonl_doc(line: str) -> Doc | str:
  """A BEIR corpus line -> Doc, or an error message."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    return f"malformed JSON ({e.msg} at column {e.colno})"
  if not isinstance(obj, dict):
    return "JSON line is not an object"
  doc_id = _json_id(obj)
  if doc_id is None:
    return "no _id"
  text, title = obj.get("text"), obj.get("title") or ""
  if not isinstance(text, str) or not isinstance(title, str):
    return "text/title missing or not a string"
  return Doc(doc_id, title.strip(), text.strip())


def parse_jsonl_query(line: str) -> tuple[str, str] | str:
  """A BEIR queries line -> (qid, text), or an error message."""
  doc = parse_jsonl_doc(line)
  return doc if isinstance(doc, str) else (doc.doc_id, doc.text)


# ----------------------------------------------------------------------------- TSV


def parse_tsv_doc(line: str) -> Doc | str:
  """`id<TAB>text` or `id<TAB>title<TAB>text` -> Doc, or an error message."""
  cols = line.split("\t")
  if len(cols) == 2:
    return Doc(cols[0].strip(), "", cols[1].strip()) if cols[0].strip() else "empty id"
  if len(cols) == 3:
    return Doc(cols[0].strip(), cols[1].strip(), cols[2].strip()) if cols[0].strip() else "empty id"
  return f"expected 2 or 3 tab-separated columns, got {len(cols)}"


def parse_tsv_query(line: str) -> tuple[str, str] | str:
  cols = line.split("\t")
  if len(cols) != 2 or not cols[0].strip():
    return f"expected `qid<TAB>text`, got {len(cols)} columns"
  return cols[0].strip(), cols[1].strip()


# ----------------------------------------------------------------------------- qrels


def cranfield_relevance(grade: int) -> int | None:
  """Cranfield grade (1 best .. 4, 5 or -1 = not relevant) -> relevance (4 best .. 0)."""
  if 1 <= grade <= 4:
    return 5 - grade
  if grade in (5, -1):
    return 0
  return None


def iter_qrels(path, problems: Problems, *, kind: str = "auto") -> Iterator[tuple[int, str, str, int]]:
  """Yields (lineno, qid, doc_id, relevance) from a qrels file.

  Args:
    path: the file.
    problems: anomaly collector (malformed lines).
    kind: the layout (see `laspar_jax.data.smart`): "trec" (`qid iter docid
      rel`), "smart" (`qid docid 0 0.000000`, every pair relevant: rel 1),
      "cranfield" (`qid docid grade`, mapped by `cranfield_relevance`),
      "plain" (`qid docid rel`), or "auto" (4 columns = trec, 3 = plain).

  Yields:
    (line number, query id, document id, integer relevance).
  """
  if kind not in ("auto", "trec", "smart", "cranfield", "plain"):
    raise ValueError(f"qrels layout {kind!r}; known: auto, trec, smart, cranfield, plain")
  want = {"trec": 4, "smart": 4, "cranfield": 3, "plain": 3}.get(kind)
  first = True
  for lineno, _, _, text in iter_lines(path, problems):
    cols = text.split()
    if first:
      first = False
      if len(cols) == 3 and cols[2].lower() in ("score", "relevance", "rel", "grade"):
        continue  # BEIR header `query-id corpus-id score`
    if want is not None and len(cols) != want:
      problems.report(path, lineno, "malformed", f"qrels line has {len(cols)} columns, the {kind} layout has {want}")
      continue
    if kind == "smart":
      yield lineno, cols[0], cols[1], 1
      continue
    if len(cols) == 4:
      qid, _, did, g = cols
    elif len(cols) == 3:
      qid, did, g = cols
    else:
      problems.report(path, lineno, "malformed", f"qrels line has {len(cols)} columns")
      continue
    try:
      rel = int(float(g)) if kind != "cranfield" else cranfield_relevance(int(g))
      if kind != "cranfield" and float(g) != rel:
        raise ValueError(g)
    except ValueError:
      rel = None
    if rel is None:
      problems.report(path, lineno, "malformed", f"bad relevance {g!r}")
      continue
    yield lineno, qid, did, rel


# ----------------------------------------------------------------------------- TREC runs


def read_trec_run(path: io_utils.PathLike, *, depth: int | None = None) -> dict[str, dict[str, float]]:
  """Reads a TREC run file (`qid Q0 docid rank score tag`) into {qid: {docid: score}}.

  The rank column is ignored: documents are ordered by score (ties keep their
  file order), and each query's dict iterates best first.

  Args:
    path: the run file (local or gs://).
    depth: keep only the top `depth` documents per query (None: all).

  Returns:
    {qid: {docid: score}}, best first per query.

  Raises:
    DataFormatError: a non-blank line without 6 columns, a non-numeric score,
      or a document listed twice for one query.
  """
  scored: dict[str, dict[str, tuple[float, int]]] = {}
  with io_utils.as_path(path).open("rb") as f:
    for lineno, raw in enumerate(f, 1):
      cols = raw.decode("utf-8", errors="replace").split()
      if not cols:
        continue
      if len(cols) != 6:
        raise DataFormatError(
          path, lineno, f"run line has {len(cols)} columns, expected 6 (qid Q0 docid rank score tag)"
        )
      try:
        score = float(cols[4])
      except ValueError:
        raise DataFormatError(path, lineno, f"bad score {cols[4]!r}") from None
      docs = scored.setdefault(cols[0], {})
      if cols[2] in docs:
        raise DataFormatError(path, lineno, f"document {cols[2]!r} listed twice for query {cols[0]!r}")
      docs[cols[2]] = (score, lineno)
  out = {}
  for qid, docs in scored.items():
    ranked = sorted(docs.items(), key=lambda x: (-x[1][0], x[1][1]))[:depth]
    out[qid] = {d: s for d, (s, _) in ranked}
  return out


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: io_utils.PathLike, tag: str = "laspar") -> str:
  """Writes a TREC run file atomically (a temporary sibling, then a rename).

  Queries in sorted order; per query, documents by score descending (ties by
  doc id), ranks from 1: `qid Q0 docid rank score tag` with 6-decimal scores.

  Args:
    run: {qid: {docid: score}}.
    path: the file to write (local or gs://); parent directories are created.
    tag: the run tag (last column).

  Returns:
    The path written, as a string.
  """
  final = io_utils.as_path(path)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
  with tmp.open("w") as f:
    for qid in sorted(run):
      ranked = sorted(run[qid].items(), key=lambda x: (-x[1], x[0]))
      f.writelines(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n" for rank, (doc, score) in enumerate(ranked, 1))
  if io_utils.is_local(final):
    os.replace(os.fspath(tmp), os.fspath(final))
  else:
    tmp.rename(final)
  return os.fspath(final)
