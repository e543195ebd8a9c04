"""Collections from ir_datasets ids (`msmarco-passage/dev/small`, `beir/scifact/test`, ...).

ir_datasets downloads into $IR_DATASETS_HOME (default ~/.ir_datasets) on first
use and reads that cache offline afterwards. Anomalies (duplicate or empty
queries, qrels naming unknown queries, duplicate pairs) follow the rules of
`laspar_jax.data.formats`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import ir_datasets

from laspar_jax.data.collection import Collection
from laspar_jax.data.formats import Doc, Problems


class IrDatasetsCollection(Collection):
  """An ir_datasets dataset; documents streamed from ir_datasets, looked up in its docstore."""

  def __init__(self, dataset_id: str, problems: Problems):
    self.name, self.problems = dataset_id, problems
    self._ds = ir_datasets.load(dataset_id)
    self._store = None
    self.queries = {}
    if self._ds.has_queries():
      where = f"ir_datasets:{dataset_id}/queries"
      for i, q in enumerate(self._ds.queries_iter(), 1):
        text = (getattr(q, "text", None) or q.default_text() or "").strip()
        if q.query_id in self.queries:
          problems.report(where, i, "duplicate_id", f"duplicate query id {q.query_id!r}")
          continue
        if not text:
          problems.report(where, i, "empty_query", f"query {q.query_id!r} has no text")
          continue
        self.queries[q.query_id] = text
    self.qrels = {}
    if self._ds.has_qrels():
      where = f"ir_datasets:{dataset_id}/qrels"
      for i, qr in enumerate(self._ds.qrels_iter(), 1):
        if qr.query_id not in self.queries:
          problems.report(where, i, "unknown_query", f"qrels name unknown query {qr.query_id!r}")
          continue
        per_q = self.qrels.setdefault(qr.query_id, {})
        if qr.doc_id in per_q:
          problems.report(where, i, "duplicate_qrel", f"duplicate qrels pair ({qr.query_id}, {qr.doc_id})")
          continue
        per_q[qr.doc_id] = int(qr.relevance)

  @staticmethod
  def _to_doc(d) -> Doc:
    title = getattr(d, "title", "") or ""
    text = getattr(d, "text", None)
    if text is None:
      text = d.default_text()
    return Doc(d.doc_id, title.strip(), text.strip())

  def docs(self) -> Iterator[Doc]:
    return (self._to_doc(d) for d in self._ds.docs_iter())

  def doc(self, doc_id: str) -> Doc:
    if self._store is None:
      self._store = self._ds.docs_store()
    return self._to_doc(self._store.get(doc_id))

  @property
  def num_docs(self) -> int:
    n = self._ds.docs_count()
    if n is None:  # some stores count only once built
      n = sum(1 for _ in self._ds.docs_iter())
    return n


class DataUnavailableError(FileNotFoundError):
  """A collection that is neither a local folder nor downloadable now; the message is one line."""


def _fetch(ds) -> None:
  """Reads the first record of each part (ir_datasets downloads what is not cached yet)."""
  for has, it in (("has_docs", "docs_iter"), ("has_queries", "queries_iter"), ("has_qrels", "qrels_iter")):
    if getattr(ds, has)():
      next(iter(getattr(ds, it)()), None)


@contextlib.contextmanager
def _no_logging() -> Iterator[None]:
  logging.disable(logging.WARNING)
  try:
    yield
  finally:
    logging.disable(logging.NOTSET)


def ensure_downloaded(dataset_id: str) -> None:
  """Makes sure an ir_datasets dataset is in the local cache, downloading it when online.

  Args:
    dataset_id: a registered ir_datasets id (e.g. `beir/scifact/train`).

  Raises:
    DataUnavailableError: the download failed (e.g. offline); one line naming the id.
  """
  try:  # ir_datasets' own log lines and bars are held back: a failure is then one line
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), _no_logging():
      _fetch(ir_datasets.load(dataset_id))
  except Exception as e:  # pylint: disable=broad-except  (network, HTTP, file errors: all mean "not available")
    first = (str(e).splitlines() or [""])[0][:200]
    raise DataUnavailableError(
      f"the ir_datasets id {dataset_id!r} is not in the local cache ($IR_DATASETS_HOME, default ~/.ir_datasets) "
      f"and downloading it failed (offline?): {type(e).__name__}: {first}"
    ) from None


def irds_id(spec: str, split: str | None) -> str:
  """`spec/split` (or `spec`) checked against the ir_datasets registry; no split picks `spec/test` when `spec`
  alone has no qrels (as a BEIR folder picks qrels/test.tsv)."""
  full = f"{spec}/{split}" if split else spec
  if not split and f"{spec}/test" in ir_datasets.registry and full in ir_datasets.registry:
    if not ir_datasets.load(full).has_qrels():  # e.g. beir/scifact: no qrels without a split; as BEIR folders
      full = f"{spec}/test"
  if full not in ir_datasets.registry:
    raise ValueError(f"{spec!r}: not a path, and {full!r} is not an ir_datasets id")
  return full
