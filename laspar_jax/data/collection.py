"""The `Collection` interface: a streamed corpus, its queries and qrels."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator

from laspar_jax.data.formats import Doc, Problems


def doc_text(doc: Doc) -> str:
  """Title + " " + text (title omitted when empty)."""
  return f"{doc.title} {doc.text}" if doc.title else doc.text


class Collection(abc.ABC):
  """A corpus (streamed), queries and qrels."""

  name: str
  queries: dict[str, str]
  qrels: dict[str, dict[str, int]]
  problems: Problems

  @abc.abstractmethod
  def docs(self) -> Iterator[Doc]:
    """Streams the documents in corpus order."""

  @abc.abstractmethod
  def doc(self, doc_id: str) -> Doc:
    """One document by id. Raises KeyError for an unknown id."""

  @property
  @abc.abstractmethod
  def num_docs(self) -> int:
    """Number of documents."""

  def docs_text(self, doc_ids: Iterable[str]) -> list[str]:
    """doc_text() of each id."""
    return [doc_text(self.doc(d)) for d in doc_ids]

  @property
  def judged_queries(self) -> dict[str, str]:
    """The queries that have qrels."""
    return {q: t for q, t in self.queries.items() if q in self.qrels}

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}({self.name!r}, docs={self.num_docs}, queries={len(self.queries)}, "
      f"judged={len(self.qrels)}, qrels={sum(map(len, self.qrels.values()))})"
    )


class CutCorpus:
  """A cut corpus for quick evaluation that keeps every judged document of the evaluated queries.

  The evaluated queries are the first `max_queries` judged ones by id (as
  `evaluate.evaluate_encoder` picks them; 0: all). Streamed in corpus order:
  each document judged for one of them, plus the first other documents, `n`
  in all (more when the judged ones alone are more). Without the judged
  documents a cut corpus can hold no relevant document at all, and every
  measure reads 0.
  """

  def __init__(self, collection: Collection, n: int, max_queries: int = 0):
    qids = sorted(collection.judged_queries)[: max_queries or None]
    self._coll = collection
    self._keep = {d for q in qids for d in collection.qrels[q]}
    self.num_docs = min(max(int(n), len(self._keep)), collection.num_docs)
    self.name = f"{collection.name}[{self.num_docs} docs: judged + first]"

  def docs(self) -> Iterator[Doc]:
    extra = self.num_docs - len(self._keep)  # room for documents nobody judged
    for doc in self._coll.docs():
      if doc.doc_id in self._keep:
        yield doc
      elif extra > 0:
        extra -= 1
        yield doc
