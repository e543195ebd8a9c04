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
