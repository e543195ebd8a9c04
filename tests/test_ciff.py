"""CIFF export/import: round trips, a file written by ciff-toolkit, damaged files, the launcher."""

import gzip
import subprocess
import sys

import numpy as np
import pytest
from ciff_toolkit import ciff_pb2
from ciff_toolkit.read import CiffReader
from ciff_toolkit.write import CiffWriter

from laspar_jax.index import Index, IndexCorruptError, build_index


def _collection(rng, n=400, dim=300, k=20):
  idx = np.stack([rng.choice(dim, k, replace=False) for _ in range(n)]).astype(np.int32)
  val = (rng.random((n, k)) * 3).astype(np.float32)
  val[rng.random((n, k)) < 0.3] = 0.0
  val[::9] = 0.0  # docs without postings travel too
  return idx, val


def _batches(idx, val, bs=100):
  for i in range(0, idx.shape[0], bs):
    yield [f"doc-{j}" for j in range(i, min(i + bs, idx.shape[0]))], idx[i : i + bs], val[i : i + bs]


def _queries(rng, dim, nq=10):
  q_idx = np.stack([rng.choice(dim, 12, replace=False) for _ in range(nq)])
  return q_idx, rng.random(q_idx.shape).astype(np.float32)


@pytest.mark.parametrize("posting_format", ["blocked", "raw"])
def test_round_trip_gives_identical_results(tmp_path, posting_format):
  rng = np.random.default_rng(0)
  idx, val = _collection(rng)
  ix = Index.load(
    build_index(_batches(idx, val), tmp_path / "ix", 300, value_dtype="uint8", posting_format=posting_format)
  )
  ciff = ix.to_ciff(tmp_path / "x.ciff.gz")
  with gzip.open(ciff, "rb") as f:
    assert f.read(2)  # really gzipped
  back = Index.from_ciff(ciff, tmp_path / "back", value_dtype="uint8", posting_format=posting_format)
  assert back.quant_scale == ix.quant_scale and back.n_docs == ix.n_docs and back.n_postings == ix.n_postings
  np.testing.assert_array_equal(back.doc_ids, ix.doc_ids)
  np.testing.assert_array_equal(np.asarray(back.doc_lengths), np.asarray(ix.doc_lengths))
  np.testing.assert_array_equal(back.stored_range(0, back.n_postings), ix.stored_range(0, ix.n_postings))
  q_idx, q_val = _queries(rng, 300)
  for mode in ("exact",) + (("approx",) if posting_format == "blocked" else ()):
    r0, s0 = ix.search(q_idx, q_val, k=20, mode=mode)
    r1, s1 = back.search(q_idx, q_val, k=20, mode=mode)
    np.testing.assert_array_equal(r1, r0)
    np.testing.assert_array_equal(s1, s0)


def test_float_index_exports_scaled_integers(tmp_path):
  rng = np.random.default_rng(1)
  idx, val = _collection(rng)
  ix = Index.load(build_index(_batches(idx, val), tmp_path / "ix", 300))
  ix.to_ciff(tmp_path / "x.ciff", scale=100.0)
  with CiffReader(tmp_path / "x.ciff") as r:  # another tool reads our file
    header = r.read_header()
    lists = list(r.read_postings_lists())
    docs = list(r.read_documents())
  assert header.num_docs == 400 and header.num_postings_lists == len(lists) == int((ix.postings_per_dim() > 0).sum())
  assert [d.collection_docid for d in docs] == list(ix.doc_ids)
  pl = lists[0]
  d = int(pl.term)
  rows = np.cumsum([p.docid for p in pl.postings])
  np.testing.assert_array_equal(rows, ix.rows_array(d, d + 1))
  w = ix.weights_range(int(ix.offsets[d]), int(ix.offsets[d + 1]))
  np.testing.assert_array_equal([p.tf for p in pl.postings], np.maximum(np.rint(w * 100), 1))
  back = Index.from_ciff(tmp_path / "x.ciff", tmp_path / "back")
  assert back.quant_scale is None and back.value_dtype == np.float32
  q_idx, q_val = _queries(rng, 300)
  np.testing.assert_allclose(back.brute_force(q_idx, q_val), ix.brute_force(q_idx, q_val), atol=0.006 * 12)


def test_reads_a_file_written_by_ciff_toolkit(tmp_path):
  # Word terms (not dims), in lexicographic order, as Anserini writes them.
  postings = {"apple": [(0, 3), (2, 7)], "banana": [(1, 1)], "cherry": [(0, 5), (1, 2), (3, 9)]}
  header = ciff_pb2.Header(
    version=1, num_postings_lists=3, num_docs=4, total_postings_lists=3, total_docs=4, description="toolkit"
  )

  def lists():
    for term, ps in postings.items():
      pl = ciff_pb2.PostingsList(term=term, df=len(ps), cf=sum(t for _, t in ps))
      prev = 0
      for doc, tf in ps:
        pl.postings.add(docid=doc - prev, tf=tf)
        prev = doc
      yield pl

  docs = [ciff_pb2.DocRecord(docid=i, collection_docid=f"D{i}", doclength=1) for i in range(4)]
  with CiffWriter(tmp_path / "t.ciff") as w:
    w.write_header(header)
    w.write_postings_lists(lists())
    w.write_documents(docs)
  ix = Index.from_ciff(tmp_path / "t.ciff", tmp_path / "ix", posting_format="blocked", value_dtype="uint8")
  assert ix.dim == 3 and ix.n_docs == 4 and ix.manifest["metadata"]["ciff_terms"] == ["apple", "banana", "cherry"]
  rows, scores = ix.search(np.array([[0, 2]]), np.array([[1.0, 1.0]]), k=4)  # apple + cherry
  # D0 = 3 + 5, D3 = 9, D2 = 7, D1 = 2 (tf units: the toolkit's file carries no scale).
  assert list(ix.lookup(rows[0])) == ["D3", "D0", "D2", "D1"]
  np.testing.assert_allclose(scores[0], [9.0, 8.0, 7.0, 2.0], rtol=1e-6)


def test_damaged_ciff_is_named(tmp_path):
  rng = np.random.default_rng(2)
  idx, val = _collection(rng)
  ix = Index.load(build_index(_batches(idx, val), tmp_path / "ix", 300, value_dtype="uint8"))
  path = ix.to_ciff(tmp_path / "x.ciff")
  data = path.read_bytes()
  (tmp_path / "trunc.ciff").write_bytes(data[: len(data) // 2])
  with pytest.raises(IndexCorruptError, match="trunc.ciff"):
    Index.from_ciff(tmp_path / "trunc.ciff", tmp_path / "a")
  (tmp_path / "extra.ciff").write_bytes(data + b"\x01\x00")
  with pytest.raises(IndexCorruptError, match="extra.ciff"):
    Index.from_ciff(tmp_path / "extra.ciff", tmp_path / "b")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_launcher_round_trip(tmp_path):
  rng = np.random.default_rng(3)
  idx, val = _collection(rng)
  build_index(_batches(idx, val), tmp_path / "ix", 300)
  run = lambda *a: subprocess.run([sys.executable, "launch/export_index.py", *a], check=True, capture_output=True)  # noqa: E731
  run("--index", str(tmp_path / "ix"), "--compress", str(tmp_path / "c"))
  run("--index", str(tmp_path / "c"), "--to_ciff", str(tmp_path / "c.ciff"))
  run("--from_ciff", str(tmp_path / "c.ciff"), "--index", str(tmp_path / "back"))
  c, back = Index.load(tmp_path / "c"), Index.load(tmp_path / "back")
  assert c.blocked and back.blocked and c.value_dtype == np.uint8
  q_idx, q_val = _queries(rng, 300)
  np.testing.assert_array_equal(back.search(q_idx, q_val, k=10)[0], c.search(q_idx, q_val, k=10)[0])
