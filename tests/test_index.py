"""Tests for laspar_jax.index: build, format, exact and approximate search."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from laspar_jax.index import Index, IndexCorruptError, IndexFormatError, IndexWriter, build_index
from laspar_jax.index.synthetic import SyntheticCollection, SyntheticSpec


def _random_docs(rng, n, dim, k, empty_every=7):
  idx = np.stack([rng.choice(dim, k, replace=False) for _ in range(n)]).astype(np.int32)
  val = rng.random((n, k)).astype(np.float32)
  val[rng.random((n, k)) < 0.3] = 0.0
  val[::empty_every] = 0.0  # documents with no postings
  return idx, val


def _batches(idx, val, bs=50, prefix="d"):
  for i in range(0, idx.shape[0], bs):
    yield [f"{prefix}{j}" for j in range(i, min(i + bs, idx.shape[0]))], idx[i : i + bs], val[i : i + bs]


def _check_exact(ix, q_idx, q_val, k):
  rows, scores = ix.search(q_idx, q_val, k=k, threads=2)
  bf = ix.brute_force(q_idx, q_val)
  for b in range(q_idx.shape[0]):
    pos = np.sort(bf[b][bf[b] > 0])[::-1][:k]
    got = scores[b][rows[b] >= 0]
    assert got.size == pos.size  # only matching docs are returned
    np.testing.assert_allclose(got, pos, rtol=1e-5)
    np.testing.assert_allclose(bf[b, rows[b][rows[b] >= 0]], got, rtol=1e-5)
    assert np.all(rows[b][got.size :] == -1) and np.all(np.isneginf(scores[b][got.size :]))
  return rows, scores


@pytest.mark.parametrize("value_dtype,scale", [("float32", None), ("float16", None), ("uint8", None), ("uint16", 1e-4)])
def test_exact_search_equals_brute_force(tmp_path, value_dtype, scale):
  rng = np.random.default_rng(0)
  dim = 3000
  idx, val = _random_docs(rng, 1200, dim, 30)
  path = build_index(
    _batches(idx, val), tmp_path / "ix", dim, value_dtype=value_dtype, quant_scale=scale, ram_budget_bytes=60_000
  )
  ix = Index.load(path, verify="full")
  assert ix.manifest["stats"]["n_runs"] > 3  # really went through spilled runs
  assert not (path / "runs").exists()
  assert ix.n_docs == 1200 and ix.manifest["stats"]["empty_docs"] >= 1200 // 7
  q_idx = np.stack([rng.choice(dim, 40, replace=False) for _ in range(20)])
  q_val = rng.random((20, 40)).astype(np.float32)
  q_val[:, ::3] = 0.0
  _check_exact(ix, q_idx, q_val, k=10)
  _check_exact(ix, q_idx[:3], q_val[:3], k=2000)  # k > n_docs: padded with -1
  # Stored weights match the input (up to the storage precision).
  doc = 1
  got = ix.brute_force(idx[doc][val[doc] > 0][None], np.ones((1, int((val[doc] > 0).sum()))))
  tol = {"float32": 1e-6, "float16": 1e-2, "uint8": 1e-2, "uint16": 1e-3}[value_dtype]
  assert abs(got[0, doc] - val[doc].sum()) < tol * 30


def test_exact_search_huge_dim_and_dense_queries(tmp_path):
  rng = np.random.default_rng(1)
  dim = 4_194_304
  n = 3000
  idx, val = _random_docs(rng, n, dim, 20)
  # A few hot dims so that some queries take the blocked (many postings) path.
  idx[:, 0] = rng.integers(0, 4, n)
  val[:, 0] = rng.random(n) + 0.1
  val[::7] = 0.0
  path = build_index(_batches(idx, val, 500), tmp_path / "ix", dim)
  ix = Index.load(path)
  assert ix.offsets.shape == (dim + 1,)
  q_idx = np.concatenate([idx[rng.integers(0, n, 8), :10], np.tile(np.arange(4), (8, 1))], axis=1)
  q_val = rng.random(q_idx.shape).astype(np.float32) + 0.01
  rows, _ = _check_exact(ix, q_idx, q_val, k=50)
  assert 5 not in rows  # the empty doc never matches
  assert ix.lookup(rows[:1, :2]).tolist()[0][0].startswith("d")
  st = ix.stats(q_idx, q_val)
  assert st["empty_docs"] >= n // 7 and st["mean_query_length"] == 14
  assert st["flops_per_query"] > 0 and st["nonempty_dims"] <= st["n_postings"]


def test_exact_search_across_accumulator_blocks(tmp_path):
  """More docs than one accumulator block (2^18): block edges, chunk skipping, k=1000."""
  from laspar_jax.index import kernels

  rng = np.random.default_rng(2)
  n, dim = kernels._BLOCK + 40_000, 500
  idx = rng.integers(0, dim, (n, 4)).astype(np.int32)
  idx[:, 0] = rng.integers(0, 3, n)  # hot dims: every query takes the blocked path
  val = rng.random((n, 4)).astype(np.float32)
  val[rng.random((n, 4)) < 0.2] = 0.0
  path = build_index(_batches(idx, val, 50_000), tmp_path / "ix", dim)
  ix = Index.load(path)
  q_idx = np.concatenate([np.tile(np.arange(3), (4, 1)), rng.integers(3, dim, (4, 5))], axis=1)
  q_val = rng.random(q_idx.shape).astype(np.float32) + 0.01
  for k in (10, 1000):
    rows, _ = _check_exact(ix, q_idx, q_val, k=k)
    assert (rows >= kernels._BLOCK).any()  # hits beyond the first block


def test_approx_search_recall_and_exact_rescoring(tmp_path):
  col = SyntheticCollection(SyntheticSpec(n_docs=20_000, dim=5000, doc_len=40, n_queries=50, query_len=12, seed=3))
  path = build_index(col.doc_batches(5000), tmp_path / "ix", 5000, approx=True)
  ix = Index.load(path)
  q_idx, q_val = col.queries()
  rows, scores = ix.search(q_idx, q_val, k=10)
  a_rows, a_scores = ix.search(q_idx, q_val, k=10, mode="approx", budget=4000, n_cand=100, exact_below=0)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, a_rows)])
  assert recall >= 0.9
  same = a_rows == rows
  np.testing.assert_array_equal(a_scores[same], scores[same])  # re-scored exactly
  # A budget above all postings makes approx exact.
  f_rows, f_scores = ix.search(q_idx, q_val, k=10, mode="approx", budget=10**9, n_cand=10)
  np.testing.assert_array_equal(f_scores, scores)
  # Queries with few postings fall back to exact search (all of them here; half of them in the mixed case).
  e_rows, _ = ix.search(q_idx, q_val, k=10, mode="approx", budget=4000, n_cand=100, exact_below=10**12)
  np.testing.assert_array_equal(e_rows, rows)
  totals = np.array([ix.postings_per_dim()[q_idx[i][q_val[i] > 0]].sum() for i in range(q_idx.shape[0])])
  m_rows, _ = ix.search(q_idx, q_val, k=10, mode="approx", budget=4000, n_cand=100, exact_below=np.median(totals))
  low = totals < np.median(totals)
  np.testing.assert_array_equal(m_rows[low], rows[low])
  np.testing.assert_array_equal(m_rows[~low], a_rows[~low])
  with pytest.raises(ValueError, match="approx"):
    Index.load(build_index(col.doc_batches(5000, stop=10), tmp_path / "plain", 5000)).search(
      q_idx, q_val, mode="approx"
    )


def test_doc_ids_and_validation(tmp_path):
  ids = ["a", "ü-ß", "doc 3", "x" * 40]
  idx = np.array([[0, 1], [1, 2], [2, 3], [3, 0]], np.int32)
  val = np.ones((4, 2), np.float32)
  with IndexWriter(tmp_path / "ix", 4) as w:
    with pytest.raises(ValueError, match="dims must lie"):
      w.add(["z"], np.array([[9, 0]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="newline"):
      w.add(["a\nb"], idx[:1], val[:1])
    w.add(ids, idx, val)
  ix = Index.load(tmp_path / "ix")
  assert ix.doc_ids.tolist() == ids
  rows, scores = ix.search(np.array([[1]]), np.array([[2.0]]), k=3)
  assert ix.lookup(rows).tolist() == [["a", "ü-ß", ""]] and scores[0, 0] == 2.0
  with pytest.raises(FileExistsError):
    IndexWriter(tmp_path / "ix", 4)
  with IndexWriter(tmp_path / "ix", 4, overwrite=True) as w:
    w.add(["only"], idx[:1], val[:1])
  assert Index.load(tmp_path / "ix").doc_ids.tolist() == ["only"]


def test_exception_inside_writer_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError):
    with IndexWriter(tmp_path / "ix", 10) as w:
      w.add(["a"], np.array([[1]]), np.array([[1.0]]))
      raise RuntimeError("encoder died")
  assert list(tmp_path.iterdir()) == []


def test_truncated_or_tampered_files_are_detected(tmp_path):
  rng = np.random.default_rng(4)
  idx, val = _random_docs(rng, 300, 500, 10)
  path = build_index(_batches(idx, val), tmp_path / "ix", 500)
  Index.load(path, verify="full")
  weights = path / "weights.npy"
  data = bytearray(weights.read_bytes())
  data[-3] ^= 0xFF
  weights.write_bytes(bytes(data))
  Index.load(path, verify="size")  # same size: only a full check can tell
  with pytest.raises(IndexCorruptError, match="weights.npy"):
    Index.load(path, verify="full")
  with pytest.raises(IndexCorruptError, match="weights.npy"):
    Index.load(path)  # "auto" hashes small indexes
  rows = path / "rows.npy"
  with open(rows, "r+b") as f:
    f.truncate(rows.stat().st_size - 8)
  with pytest.raises(IndexCorruptError, match="rows.npy"):
    Index.load(path, verify="size")
  (path / "doc_ids.npy").unlink()
  with pytest.raises(IndexCorruptError, match="doc_ids.npy"):
    Index.load(path, verify="none")


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from laspar_jax.index import IndexWriter
    w = IndexWriter(sys.argv[1], 1000, ram_budget_bytes=20_000)
    rng = np.random.default_rng(0)
    for i in range(10_000):
      w.add([f"d{i}"] * 1, rng.integers(0, 1000, (1, 50)), rng.random((1, 50)))
      if i == 50:
        print("started", flush=True)
        time.sleep(0.2)
    w.close()
""")


def test_killed_build_never_loads(tmp_path):
  path = tmp_path / "ix"
  proc = subprocess.Popen(
    [sys.executable, "-c", _KILL_SCRIPT, str(path)],
    stdout=subprocess.PIPE,
    text=True,
    cwd=pathlib.Path(__file__).resolve().parents[1],
  )
  assert proc.stdout.readline().strip() == "started"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not path.exists()
  with pytest.raises(FileNotFoundError):
    Index.load(path)
  (tmp,) = tmp_path.glob("ix.tmp-*")
  with pytest.raises(IndexFormatError, match="manifest"):
    Index.load(tmp)
  # The next build of the same path removes the dead build's leftovers.
  build_index(iter([(["a"], np.array([[1]]), np.array([[1.0]]))]), path, 1000)
  assert not tmp.exists() and Index.load(path).n_docs == 1
