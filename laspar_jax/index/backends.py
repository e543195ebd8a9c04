"""Optional external engines behind the same `search` call, and exports.

    pisa = PisaBackend.build(batches, "/tmp/pisa")       # pip install pyterrier-pisa
    rows_bk, scores_bk = pisa.search(q_idx_bk, q_val_bk, k=10)
    seismic = SeismicBackend.build(batches)              # pip install pyseismic-lsr
    export_anserini(batches, "out/anserini")             # JsonVectorCollection

Every backend takes the same (doc_ids, idx_bk, val_bk) batches as
`IndexWriter` and returns doc *rows* (position in the batch stream) like
`Index.search`, so results compare directly with exact search. The engines
are imported lazily (extras "engines" in setup.py).

Limits seen here: Seismic's `SeismicIndex` takes at most 65,536 distinct
components (`SeismicIndexLV` beyond, which is much heavier); PISA handles 4M
dims; PISA scores integer impacts (weights x scale, rounded), so its top-k
can differ from exact search on near ties.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from laspar_jax.index.search import queries_to_csr

Batch = tuple[Sequence[str], Any, Any]


def _rows_of(batches: Iterable[Batch]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Flattens batches into (row, dims, weights) with weights > 0."""
  row = 0
  for _, idx_bk, val_bk in batches:
    idx_bk = np.asarray(idx_bk)
    val_bk = np.asarray(val_bk, np.float32)
    for b in range(idx_bk.shape[0]):
      m = val_bk[b] > 0
      yield row, idx_bk[b][m], val_bk[b][m]
      row += 1


def _results_to_arrays(results: list[list[tuple[int, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
  rows = np.full((len(results), k), -1, np.int64)
  scores = np.full((len(results), k), -np.inf, np.float32)
  for i, res in enumerate(results):
    res = sorted(res, key=lambda x: (-x[1], x[0]))[:k]
    for j, (r, s) in enumerate(res):
      rows[i, j] = r
      scores[i, j] = s
  return rows, scores


class PisaBackend:
  """PISA (via pyterrier-pisa) over integer impacts = round(weight * scale)."""

  def __init__(self, path: str | os.PathLike, scale: float = 100.0):
    from pyterrier_pisa import PisaIndex  # pylint: disable=g-import-not-at-top  (optional engine)

    self.path = pathlib.Path(path)
    self.scale = scale
    self.index = PisaIndex(str(self.path), stemmer="none", threads=1)

  @classmethod
  def build(
    cls, batches: Iterable[Batch], path: str | os.PathLike, *, scale: float = 100.0, overwrite: bool = True
  ) -> "PisaBackend":
    """Indexes the batches (docno = row number) into `path`."""
    from pyterrier_pisa import PisaIndex  # pylint: disable=g-import-not-at-top  (optional engine)

    path = pathlib.Path(path)
    if path.exists() and overwrite:
      shutil.rmtree(path)
    index = PisaIndex(str(path), stemmer="none", threads=1)

    def docs():
      for row, dims, vals in _rows_of(batches):
        yield {"docno": str(row), "toks": {str(int(d)): float(v) for d, v in zip(dims, vals)}}

    index.toks_indexer(scale=scale).index(docs())
    return cls(path, scale)

  def search(
    self, q_idx_bk: Any, q_val_bk: Any, k: int = 1000, *, query_algorithm: str = "maxscore", threads: int = 1
  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and scores (scores in the engine's integer scale / scale**2)."""
    import pandas as pd  # pylint: disable=g-import-not-at-top  (optional: with pyterrier-pisa)

    retr = self.index.quantized(num_results=k, query_algorithm=query_algorithm, threads=threads, toks_scale=self.scale)
    q_ptr, q_dims, q_w = queries_to_csr(q_idx_bk, q_val_bk, 1 << 62)
    frame = pd.DataFrame(
      [
        {
          "qid": str(i),
          "query_toks": {
            str(int(d)): float(w) for d, w in zip(q_dims[q_ptr[i] : q_ptr[i + 1]], q_w[q_ptr[i] : q_ptr[i + 1]])
          },
        }
        for i in range(q_ptr.size - 1)
      ]
    )
    res = retr(frame)
    out: list[list[tuple[int, float]]] = [[] for _ in range(q_ptr.size - 1)]
    norm = self.scale * self.scale
    for qid, docno, score in zip(res["qid"], res["docno"], res["score"]):
      out[int(qid)].append((int(docno), float(score) / norm))
    return _results_to_arrays(out, k)


class SeismicBackend:
  """Seismic (pyseismic-lsr), approximate; components are the dims as strings."""

  def __init__(self, index: Any):
    self.index = index

  @classmethod
  def build(
    cls,
    batches: Iterable[Batch],
    *,
    n_postings: int = 3500,
    centroid_fraction: float = 0.1,
    summary_energy: float = 0.4,
    num_threads: int = 1,
    large_vocab: bool = False,
  ) -> "SeismicBackend":
    """Builds an in-memory Seismic index (`large_vocab`: SeismicIndexLV for D > 65,536)."""
    import seismic  # pylint: disable=g-import-not-at-top  (optional engine)

    stype = seismic.get_seismic_string()
    dataset = seismic.SeismicDatasetLV() if large_vocab else seismic.SeismicDataset()
    for row, dims, vals in _rows_of(batches):
      if dims.size:
        dataset.add_document(str(row), dims.astype(str).astype(stype), vals.astype(np.float32))
    cls_ = seismic.SeismicIndexLV if large_vocab else seismic.SeismicIndex
    index = cls_.build_from_dataset(
      dataset,
      n_postings=n_postings,
      centroid_fraction=centroid_fraction,
      summary_energy=summary_energy,
      num_threads=num_threads,
    )
    return cls(index)

  def search(
    self,
    q_idx_bk: Any,
    q_val_bk: Any,
    k: int = 1000,
    *,
    query_cut: int = 20,
    heap_factor: float = 0.7,
    threads: int = 1,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and scores (approximate)."""
    import seismic  # pylint: disable=g-import-not-at-top  (optional engine)

    stype = seismic.get_seismic_string()
    q_ptr, q_dims, q_w = queries_to_csr(q_idx_bk, q_val_bk, 1 << 62)
    n = q_ptr.size - 1
    comps = [q_dims[q_ptr[i] : q_ptr[i + 1]].astype(str).astype(stype) for i in range(n)]
    vals = [q_w[q_ptr[i] : q_ptr[i + 1]].astype(np.float32) for i in range(n)]
    res = self.index.batch_search(
      np.array([str(i) for i in range(n)], dtype=stype),
      comps,
      vals,
      k=k,
      query_cut=query_cut,
      heap_factor=heap_factor,
      num_threads=threads,
    )
    # Results carry their query id; they are not necessarily in input order.
    out: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for r in res:
      for qid, score, doc in r:
        out[int(qid)].append((int(doc), float(score)))
    return _results_to_arrays(out, k)


def export_anserini(
  batches: Iterable[Batch],
  out_dir: str | os.PathLike,
  *,
  scale: float = 100.0,
  docs_per_file: int = 1_000_000,
  compress: bool = True,
) -> list[pathlib.Path]:
  """Writes Anserini's JsonVectorCollection: {"id", "contents": "", "vector": {dim: int}}.

  Index it with, e.g., `IndexCollection -collection JsonVectorCollection
  -input out_dir -index idx -impact -pretokenized`.

  Args:
    batches: (doc_ids, idx_bk, val_bk) batches.
    out_dir: directory for part-NNNNN.jsonl(.gz) files.
    scale: impacts are round(weight * scale) (at least 1).
    docs_per_file: documents per file.
    compress: gzip the files.

  Returns:
    The files written.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  files: list[pathlib.Path] = []
  f = None
  n = 0
  for doc_ids, idx_bk, val_bk in batches:
    idx_bk = np.asarray(idx_bk)
    val_bk = np.asarray(val_bk, np.float32)
    for b, doc_id in enumerate(doc_ids):
      if f is None or n % docs_per_file == 0:
        if f is not None:
          f.close()
        name = out_dir / f"part-{len(files):05d}.jsonl{'.gz' if compress else ''}"
        f = gzip.open(name, "wt") if compress else open(name, "w")
        files.append(name)
      m = val_bk[b] > 0
      imp = np.maximum(np.rint(val_bk[b][m] * scale), 1).astype(np.int64)
      vec = {str(int(d)): int(v) for d, v in zip(idx_bk[b][m], imp)}
      f.write(json.dumps({"id": str(doc_id), "contents": "", "vector": vec}) + "\n")
      n += 1
  if f is not None:
    f.close()
  return files


def write_anserini_queries(
  qids: Sequence[str], q_idx_bk: Any, q_val_bk: Any, path: str | os.PathLike, *, scale: float = 100.0
) -> None:
  """Writes queries as JSONL {"id", "vector": {dim: int}} (Anserini JsonVectorCollection)."""
  q_ptr, q_dims, q_w = queries_to_csr(q_idx_bk, q_val_bk, 1 << 62)
  with open(path, "w") as f:
    for i, qid in enumerate(qids):
      sl = slice(q_ptr[i], q_ptr[i + 1])
      imp = np.maximum(np.rint(q_w[sl] * scale), 1).astype(np.int64)
      f.write(json.dumps({"id": str(qid), "vector": {str(int(d)): int(v) for d, v in zip(q_dims[sl], imp)}}) + "\n")
