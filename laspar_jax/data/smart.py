"""SMART collections (Cranfield, CISI, CACM, MED, ...): records, fields, query ids and qrels layouts.

A record starts with a `.I <id>` line; each field starts with a marker line
whose first two characters are `.X` (X an upper-case letter) and whose rest
is blank (trailing spaces and tabs are accepted: `.T `, `.W  `); the field's
text is the following lines up to the next marker. A marker repeated inside a
record appends to that field. Fields and where they go:

| field | meaning                                   | goes to                        |
|-------|-------------------------------------------|--------------------------------|
| `.T`  | title                                     | `Doc.title`                    |
| `.W`  | abstract / text (the query text in .qry)  | `Doc.text`                     |
| `.K`  | keywords                                  | appended to `Doc.text` only    |
|       |                                           |   with `keywords=True`         |
| `.A`  | authors, `.B` source, `.C` categories,    | dropped                        |
|       | `.N` entry date, any other letter         |                                |
| `.X`  | citation cross-references (numeric rows)  | dropped, never text            |

Cranfield-only rules (`cranfield=True`, chosen by the loader when the
document file is named `cran*`): the `.W` abstract repeats the title at its
start, which is removed; and query ids are the 1-based positions of the
queries in the query file (cranqrel numbers them that way, while the `.I`
numbers of cran.qry are 001, 002, 004, 008, ...). Other collections use the
`.I` number (leading zeros dropped) as the query id.

Qrels layouts (`QRELS_LAYOUTS`), detected from the content by
`detect_qrels_layout` or forced by the caller:

  trec       `qid iter docid rel`            (4 columns)
  smart      `qid docid 0 0.000000`          (4 columns; every listed pair is relevant: rel 1)
  cranfield  `qid docid grade`               (3 columns, Cranfield grades, see formats.cranfield_relevance)
  plain      `qid docid rel`                 (3 columns, BEIR TSV; a header line is skipped)

For 4 columns the layout is the one whose document column holds more
distinct ids of the corpus; 3 columns are `cranfield` in a SMART directory and
`plain` elsewhere.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator

from laspar_jax.data.formats import Doc, Problems, Span, iter_lines

QRELS_LAYOUTS = ("trec", "smart", "cranfield", "plain")
_DETECT_LINES = 2000


def marker(text: str) -> tuple[str, str] | None:
  """(letter, id) when `text` is a field marker line, else None.

  `.X` followed by nothing but blanks is the marker of field X (id ""); a
  `.I` line carries the record id after a blank (`.I 12`); a `.I` line with
  no id or several words gives id None (a malformed header).
  """
  if len(text) < 2 or text[0] != "." or not ("A" <= text[1] <= "Z"):
    return None
  if len(text) > 2 and not text[2].isspace():
    return None
  rest = text[2:].split()
  if text[1] == "I":
    return "I", rest[0] if len(rest) == 1 else None
  return (text[1], "") if not rest else None


def _join(fields: dict[str, list[str]]) -> dict[str, str]:
  return {k: " ".join(" ".join(v).split()) for k, v in fields.items()}


def iter_records(path: str | os.PathLike, problems: Problems | None) -> Iterator[tuple[Span, dict[str, str]]]:
  """Yields (span, fields) per `.I` record; fields maps field letters ("T", "W", ...) to text."""
  cur_id, start, first_line, end = None, 0, 0, 0
  fields: dict[str, list[str]] = {}
  field = None
  for lineno, s, e, text in iter_lines(path, problems):
    m = marker(text)
    if m is not None and m[0] == "I":
      if cur_id is not None:
        yield Span(cur_id, start, end, first_line), _join(fields)
      cur_id = m[1]
      if cur_id is None:
        if problems is not None:
          problems.report(path, lineno, "malformed", f"bad record header {text!r}")
        cur_id = ""  # keeps the span; the caller drops records with an empty id
      start, first_line, fields, field = s, lineno, {}, None
    elif m is not None:
      field = m[0]
      fields.setdefault(field, [])
    elif cur_id is None:
      if problems is not None:
        problems.report(path, lineno, "malformed", "text before the first .I record")
    elif field is None:
      if problems is not None:
        problems.report(path, lineno, "malformed", "text outside a field")
    else:
      fields[field].append(text)
    end = e
  if cur_id is not None:
    yield Span(cur_id, start, end, first_line), _join(fields)


def make_doc(record_id: str, fields: dict[str, str], *, keywords: bool = False, cranfield: bool = False) -> Doc:
  """SMART fields -> Doc (see the module docstring for which fields become text).

  Args:
    record_id: the `.I` id.
    fields: field letter -> text.
    keywords: append `.K` keywords to the text.
    cranfield: strip the title repeated at the start of `.W`.

  Returns:
    The Doc.
  """
  title, text = fields.get("T", ""), fields.get("W", "")
  if cranfield and title and text.startswith(title):
    text = text[len(title) :].strip()
  if keywords and fields.get("K"):
    text = f"{text} {fields['K']}" if text else fields["K"]
  return Doc(record_id, title, text)


def doc_parser(*, keywords: bool = False, cranfield: bool = False) -> Callable[[str, str], Doc]:
  """A function re-parsing one record's raw text (random access) into a Doc."""

  def parse(raw: str, record_id: str) -> Doc:
    fields: dict[str, list[str]] = {}
    field = None
    for line in raw.splitlines():
      line = line.rstrip("\r")
      if not line.strip():
        continue
      m = marker(line)
      if m is not None:
        field = None if m[0] == "I" else m[0]
        if field is not None:
          fields.setdefault(field, [])
      elif field is not None:
        fields[field].append(line)
    return make_doc(record_id, _join(fields), keywords=keywords, cranfield=cranfield)

  return parse


def canonical_id(x: str) -> str:
  """A numeric id without leading zeros ("007" -> "7"); other ids unchanged."""
  return str(int(x)) if x.isdigit() else x


def read_queries(path: str | os.PathLike, problems: Problems, *, cranfield: bool) -> dict[str, str]:
  """{qid: text} of a SMART query file (ids: positions for Cranfield, else `.I` numbers)."""
  queries = {}
  for n, (span, fields) in enumerate(iter_records(path, problems), 1):
    qid = str(n) if cranfield else canonical_id(span.record_id)
    text = fields.get("W", "") or fields.get("T", "")
    if not qid:
      continue
    if not text:
      problems.report(path, span.line, "empty_query", f"query {qid} (.I {span.record_id}) has no text")
      continue
    if qid in queries:
      problems.report(path, span.line, "duplicate_id", f"duplicate query id {qid!r}")
      continue
    queries[qid] = text
  return queries


def detect_qrels_layout(
  path: str | os.PathLike, has_doc: Callable[[str], bool], *, three_columns: str = "plain"
) -> str:
  """The layout of a qrels file, from its first lines (see the module docstring).

  Args:
    path: the qrels file.
    has_doc: whether a document id exists in the corpus.
    three_columns: the layout of a 3-column file ("cranfield" or "plain").

  Returns:
    One of QRELS_LAYOUTS.
  """
  rows = [t.split() for _, _, _, t in itertools.islice(iter_lines(path, None), _DETECT_LINES)]
  ncols = max((len(r) for r in rows), key=lambda n: sum(len(r) == n for r in rows), default=3)
  if ncols != 4:
    return three_columns
  hits = [len({r[c] for r in rows if len(r) == 4 and has_doc(r[c])}) for c in (1, 2)]
  return "smart" if hits[0] > hits[1] else "trec"


def doc_lookup(has_doc: Callable[[str], bool]) -> Callable[[str], str]:
  """Maps a qrels doc id to the corpus's spelling ("0014" -> "14" when only that exists)."""

  def canon(did: str) -> str:
    if has_doc(did):
      return did
    c = canonical_id(did)
    return c if has_doc(c) else did

  return canon


def iter_smart_qrels(
  rows: Iterable[tuple[int, str, str, int]], canon_doc: Callable[[str], str]
) -> Iterator[tuple[int, str, str, int]]:
  """Qrels rows with SMART id spellings made canonical (query ids without leading zeros)."""
  for lineno, qid, did, rel in rows:
    yield lineno, canonical_id(qid), canon_doc(did), rel
