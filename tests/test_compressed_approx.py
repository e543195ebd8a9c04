"""Approximate search over a compressed index: impact-ordered heads + forward index (`index/approx.py`)."""

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from laspar_jax.index import Index, IndexCorruptError, build_index
from laspar_jax.index.approx import APPROX_FILES, head_offsets
from laspar_jax.index.synthetic import SyntheticCollection, SyntheticSpec


@pytest.fixture(scope="module")
def collection():
  return SyntheticCollection(SyntheticSpec(n_docs=6000, dim=2000, doc_len=40, n_queries=30, query_len=12, seed=3))


@pytest.fixture(scope="module")
def raw(tmp_path_factory, collection):
  path = tmp_path_factory.mktemp("approx") / "raw"
  return Index.load(build_index(collection.doc_batches(1000), path, collection.spec.dim))


def _recall(a, b, k):
  return np.mean([len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a, b)])


@pytest.mark.parametrize("value_dtype", ["uint8", "float16", "float32"])
def test_heads_and_forward_index_hold_the_postings(tmp_path, raw, value_dtype):
  head = 50
  ix = raw.compress(tmp_path / "c", value_dtype=value_dtype, approx=True, approx_head=head)
  assert ix.manifest["approx"] and ix.manifest["approx_head"] == head
  counts = np.diff(np.asarray(ix.offsets))
  hoff = head_offsets(np.load(tmp_path / "c" / "impact_counts.npy"))
  np.testing.assert_array_equal(np.diff(hoff), np.minimum(counts, head))
  w_all = ix.weights_range(0, ix.n_postings)
  rows_all = np.asarray(ix.rows_array())
  # Each head: the dim's highest impacts, descending, rows ascending among ties.
  hw = np.asarray(ix.impact_weights).astype(np.float32) if value_dtype != "uint8" else None
  for d in np.flatnonzero(counts > head)[:20].tolist() + np.flatnonzero((counts > 0) & (counts <= head))[:5].tolist():
    p0, p1 = int(ix.offsets[d]), int(ix.offsets[d + 1])
    order = np.lexsort((rows_all[p0:p1], -w_all[p0:p1]))[: min(head, p1 - p0)]
    np.testing.assert_array_equal(ix.impact_rows[hoff[d] : hoff[d + 1]], rows_all[p0:p1][order])
    if hw is not None:
      np.testing.assert_array_equal(hw[hoff[d] : hoff[d + 1]], w_all[p0:p1][order])
  # The forward index is the transpose of the postings, dims ascending per doc.
  x_nd = sp.csc_matrix((w_all, rows_all.astype(np.int64), np.asarray(ix.offsets)), shape=(ix.n_docs, ix.dim))
  fw = np.asarray(ix.fwd_weights)
  fw = fw.astype(np.float32) * np.float32(ix.quant_scale) if value_dtype == "uint8" else fw.astype(np.float32)
  f_nd = sp.csr_matrix((fw, np.asarray(ix.fwd_dims).astype(np.int64), np.asarray(ix.fwd_offsets)), shape=x_nd.shape)
  for r in range(0, ix.n_docs, 97):
    assert np.all(np.diff(np.asarray(ix.fwd_dims[ix.fwd_offsets[r] : ix.fwd_offsets[r + 1]]).astype(np.int64)) > 0)
  assert abs(x_nd - f_nd).max() == 0


def test_approx_equals_exact_when_nothing_is_cut_and_recalls_when_it_is(tmp_path, raw, collection):
  ix = raw.compress(tmp_path / "c", approx=True)
  q_idx, q_val = collection.queries()
  r_ex, s_ex = ix.search(q_idx, q_val, k=10)
  r_all, s_all = ix.search(q_idx, q_val, k=10, mode="approx", budget=10**9, n_cand=ix.n_docs, exact_below=0)
  np.testing.assert_array_equal(r_all, r_ex)
  np.testing.assert_allclose(s_all, s_ex, rtol=1e-6)
  # A dim listed twice counts twice, as in exact search.
  q_dup, v_dup = np.concatenate([q_idx, q_idx[:, :1]], axis=1), np.concatenate([q_val, q_val[:, :1]], axis=1)
  s_dup = ix.search(q_dup, v_dup, k=10, mode="approx", budget=10**9, n_cand=ix.n_docs, exact_below=0)[1]
  np.testing.assert_allclose(s_dup, ix.search(q_dup, v_dup, k=10)[1], rtol=1e-5)
  r_fb, _ = ix.search(q_idx, q_val, k=10, mode="approx", budget=10, n_cand=10, exact_below=10**12)  # all exact
  np.testing.assert_array_equal(r_fb, r_ex)
  ra, sa = ix.search(q_idx, q_val, k=10, mode="approx", budget=2000, n_cand=300, exact_below=0, threads=2)
  bf = ix.brute_force(q_idx, q_val)
  for b in range(q_idx.shape[0]):
    ok = ra[b] >= 0
    np.testing.assert_allclose(bf[b, ra[b][ok]], sa[b][ok], rtol=1e-5)  # re-scored: true scores
    assert np.all(np.diff(sa[b][ok]) <= 0)
  assert 0.9 <= _recall(r_ex, ra, 10) <= 1.0
  # A tiny budget still returns true scores, with lower recall than a larger one.
  r_small, _ = ix.search(q_idx, q_val, k=10, mode="approx", budget=20, n_cand=10, exact_below=0)
  assert _recall(r_ex, r_small, 10) <= _recall(r_ex, ra, 10)


def test_approx_allocates_nothing_per_query_of_size_n(tmp_path, raw, collection):
  ix = raw.compress(tmp_path / "c", approx=True)
  q_idx, q_val = collection.queries()
  kw = dict(k=10, mode="approx", budget=500, n_cand=50, exact_below=0)
  ix.search(q_idx, q_val, **kw)  # compiles, makes the per-thread buffers
  tracemalloc.start()
  for i in range(q_idx.shape[0]):
    ix.search(q_idx[i], q_val[i], **kw)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < ix.n_docs * 8  # an N-sized accumulator + touched list per query would add 48 kB


@pytest.mark.parametrize("name", APPROX_FILES)
def test_approx_file_corruption_is_caught_with_the_file_named(tmp_path, raw, name):
  path = tmp_path / "c"
  raw.compress(path, approx=True)
  f = path / name
  good = f.read_bytes()
  data = bytearray(good)
  data[-2] ^= 0x33
  f.write_bytes(bytes(data))
  with pytest.raises(IndexCorruptError, match=name):
    Index.load(path, verify="full")
  f.write_bytes(good[:-1])
  with pytest.raises(IndexCorruptError, match=name):
    Index.load(path, verify="size")
  f.unlink()
  with pytest.raises(IndexCorruptError, match=name):
    Index.load(path, verify="none")


def test_approx_without_structures_says_how_to_get_them(tmp_path, raw, collection):
  plain = raw.compress(tmp_path / "plain")
  q_idx, q_val = collection.queries()
  # No heads: the compressed index's block-max approximate mode, exact at theta = 1.
  r, _ = plain.search(q_idx, q_val, k=10, mode="approx", theta=1.0, exact_below=0)
  np.testing.assert_array_equal(r, plain.search(q_idx, q_val, k=10)[0])
  with pytest.raises(ValueError, match="head"):
    raw.compress(tmp_path / "bad", approx=True, approx_head=0)


def test_blocked_writer_and_merged_parts_write_the_same_structures(tmp_path, raw, collection):
  from laspar_jax.index.merge import PartWriter, merge_parts  # noqa: PLC0415

  dim, scale = collection.spec.dim, raw.compress(tmp_path / "c", approx=True).quant_scale
  kw = dict(value_dtype="uint8", quant_scale=scale, posting_format="blocked", approx=True)
  direct = Index.load(build_index(collection.doc_batches(1000), tmp_path / "direct", dim, **kw), verify="full")
  parts = []
  for p, (lo, hi) in enumerate([(0, 2500), (2500, 6000)]):
    with PartWriter(tmp_path / f"part{p}", dim, **kw) as w:
      for ids, i_bk, v_bk in collection.doc_batches(1000, lo, hi):
        w.add(ids, i_bk, v_bk)
    parts.append(tmp_path / f"part{p}")
  merged = Index.load(merge_parts(parts, tmp_path / "merged"), verify="full")
  compressed = Index.load(tmp_path / "c")
  q_idx, q_val = collection.queries()
  ref = compressed.search(q_idx, q_val, k=10, mode="approx", budget=300, n_cand=40, exact_below=0)
  for ix in (direct, merged):
    assert ix.manifest["approx"] and ix.impact_rows is not None
    for name in ("impact_rows.npy", "fwd_dims.npy", "fwd_weights.npy"):
      assert ix.manifest["files"][name]["blake2b"] == compressed.manifest["files"][name]["blake2b"]
    got = ix.search(q_idx, q_val, k=10, mode="approx", budget=300, n_cand=40, exact_below=0)
    np.testing.assert_array_equal(got[0], ref[0])


def test_large_dim_hash_table_and_its_collision_fallback(tmp_path):
  from laspar_jax.index import approx  # noqa: PLC0415

  col = SyntheticCollection(SyntheticSpec(n_docs=3000, dim=300_000, doc_len=30, n_queries=20, query_len=10, seed=5))
  assert col.spec.dim > approx.DENSE_MAX_DIM  # the hash-table path
  raw = Index.load(build_index(col.doc_batches(1000), tmp_path / "raw", col.spec.dim))
  ix = raw.compress(tmp_path / "c", value_dtype="float32", approx=True)
  q_idx, q_val = col.queries()
  # Two dims of the same hash slot in every query: that query takes the bitmap path.
  slot = lambda d: ((d * 2654435761) & 0xFFFFFFFF) >> 16  # noqa: E731
  d0 = int(q_idx[0, 0])
  twin = next(d for d in range(col.spec.dim) if d != d0 and slot(d) == slot(d0))
  q_idx = np.concatenate([q_idx, np.tile([[d0, twin]], (q_idx.shape[0], 1))], axis=1)
  q_val = np.concatenate([q_val, np.full((q_val.shape[0], 2), 0.5, np.float32)], axis=1)
  for qi, qv in ((q_idx[:, :-2], q_val[:, :-2]), (q_idx, q_val)):
    r_ex, s_ex = ix.search(qi, qv, k=10)
    r_ap, s_ap = ix.search(qi, qv, k=10, mode="approx", budget=10**9, n_cand=ix.n_docs, exact_below=0)
    np.testing.assert_allclose(s_ap, s_ex, rtol=1e-5)
    assert _recall(r_ex, r_ap, 10) == 1.0
