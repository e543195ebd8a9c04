"""Tests of the compressed (format version 2, "blocked") index: codec, search, pruning, corruption."""

import json

import numpy as np
import pytest

from laspar_jax.index import Index, IndexCorruptError, IndexFormatError, IndexWriter, build_index
from laspar_jax.index import codec
from laspar_jax.index import format as fmt
from laspar_jax.index.compress import compress_index


def _docs(rng, n, dim, k, empty_every=7):
  idx = np.stack([rng.choice(np.arange(3, dim), k, replace=False) for _ in range(n)]).astype(np.int32)
  idx[:, 0] = rng.integers(0, 3, n)  # hot dims: long lists, many blocks, some consecutive rows (gap 0)
  val = rng.random((n, k)).astype(np.float32)
  val[rng.random((n, k)) < 0.3] = 0.0
  val[:, 0] = rng.random(n) + 0.05
  val[::empty_every] = 0.0
  return idx, val


def _batches(idx, val, bs=500):
  for i in range(0, idx.shape[0], bs):
    yield [f"d{j}" for j in range(i, min(i + bs, idx.shape[0]))], idx[i : i + bs], val[i : i + bs]


def _queries(rng, dim, nq=12, k=25):
  q_idx = np.stack([rng.choice(dim, k, replace=False) for _ in range(nq)])
  q_idx[:, 0] = rng.integers(0, 3, nq)
  q_val = rng.random(q_idx.shape).astype(np.float32)
  q_val[:, ::4] = 0.0
  return q_idx, q_val


def _check_exact(ix, q_idx, q_val, k, **kw):
  rows, scores = ix.search(q_idx, q_val, k=k, threads=2, **kw)
  bf = ix.brute_force(q_idx, q_val)
  for b in range(q_idx.shape[0]):
    pos = np.sort(bf[b][bf[b] > 0])[::-1][:k]
    got = scores[b][rows[b] >= 0]
    assert got.size == pos.size
    np.testing.assert_allclose(got, pos, rtol=1e-5)
    np.testing.assert_allclose(bf[b, rows[b][rows[b] >= 0]], got, rtol=1e-5)
    assert np.all(rows[b][got.size :] == -1)
  return rows, scores


def test_codec_round_trip_every_width():
  rng = np.random.default_rng(0)
  lists = [np.sort(rng.choice(1 << w, min(300, 1 << w), replace=False)) for w in range(1, 32, 3)]
  lists += [np.arange(5, 400), np.array([0]), np.array([2**32 - 2])]  # width 0, single posting, max row
  offsets = np.zeros(len(lists) + 1, np.int64)
  np.cumsum([x.size for x in lists], out=offsets[1:])
  rows = np.concatenate(lists).astype(np.uint32)
  vals = rng.integers(1, 255, rows.size).astype(np.uint8)
  nb = int(sum(-(-x.size // codec.BLOCK) for x in lists))
  words = np.zeros(rows.size + 2, np.uint32)
  words[0] = 0b101  # bits a previous chunk left in the first word
  last, width, vmax = np.empty(nb, np.uint32), np.empty(nb, np.uint8), np.empty(nb, np.uint8)
  n_bits, got_nb = codec.encode_lists(offsets, rows, vals, 0, len(lists), words, 3, last, width, vmax)
  assert got_nb == nb and width.max() == 32 and width.min() == 0 and words[0] & 7 == 0b101
  blk_ptr, blk_bit, dim_max = codec.derive(offsets, last, width, vmax)
  assert blk_bit[-1] + 3 == n_bits and blk_ptr[-1] == nb
  out = np.empty(rows.size, np.uint32)
  codec.decode_all(offsets, words, blk_ptr, blk_bit + 3, width, 0, len(lists), out)
  np.testing.assert_array_equal(out, rows)
  for d in range(len(lists)):
    assert dim_max[d] == vals[offsets[d] : offsets[d + 1]].max()


@pytest.mark.parametrize("value_dtype,scale", [("uint8", None), ("float16", None), ("float32", None), ("uint16", 1e-4)])
def test_blocked_exact_equals_brute_force(tmp_path, value_dtype, scale):
  rng = np.random.default_rng(1)
  dim, n = 2000, 12_000  # three accumulator windows
  idx, val = _docs(rng, n, dim, 30)
  path = build_index(
    _batches(idx, val), tmp_path / "ix", dim, value_dtype=value_dtype, quant_scale=scale, posting_format="blocked"
  )
  ix = Index.load(path, verify="full")
  assert ix.manifest["format_version"] == 2 and ix.blocked and ix.rows is None
  assert not (path / "rows.npy").exists() and not (path / "weights.npy").exists()
  q_idx, q_val = _queries(rng, dim)
  _check_exact(ix, q_idx, q_val, k=10)
  _check_exact(ix, q_idx[:2], q_val[:2], k=n + 5)  # k > n_docs: padded
  # Stored weights as written, up to the storage precision.
  doc = 1
  got = ix.brute_force(idx[doc][val[doc] > 0][None], np.ones((1, int((val[doc] > 0).sum()))))
  tol = {"float32": 1e-6, "float16": 1e-2, "uint8": 1e-2, "uint16": 1e-3}[value_dtype]
  assert abs(got[0, doc] - val[doc].sum()) < tol * 30


def test_compress_index_matches_raw_and_is_smaller(tmp_path):
  rng = np.random.default_rng(2)
  dim, n = 3000, 6000
  idx, val = _docs(rng, n, dim, 40)
  raw = Index.load(build_index(_batches(idx, val), tmp_path / "raw", dim))
  q_idx, q_val = _queries(rng, dim)
  r_raw, s_raw = raw.search(q_idx, q_val, k=20)
  f32 = raw.compress(tmp_path / "f32", value_dtype="float32")
  r32, s32 = f32.search(q_idx, q_val, k=20)
  np.testing.assert_array_equal(r32, r_raw)
  np.testing.assert_allclose(s32, s_raw, rtol=1e-5)
  u8 = raw.compress(tmp_path / "u8")
  assert u8.value_dtype == np.uint8 and u8.quant_scale == pytest.approx(float(val.max()) / 255)
  _check_exact(u8, q_idx, q_val, k=20)
  assert u8.size_bytes() * 2.5 < raw.size_bytes()
  # Quantization keeps most of the float ranking.
  r8, _ = u8.search(q_idx, q_val, k=20)
  assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(r8, r_raw)]) > 0.8
  with pytest.raises(FileExistsError):
    compress_index(raw, tmp_path / "u8")
  again = Index.load(compress_index(u8, tmp_path / "u8b", value_dtype="uint8"))  # from version 2
  np.testing.assert_array_equal(again.search(q_idx, q_val, k=20)[0], r8)


def test_blocked_approx_pruning(tmp_path):
  rng = np.random.default_rng(3)
  dim, n = 1000, 20_000
  idx, val = _docs(rng, n, dim, 30)
  ix = Index.load(build_index(_batches(idx, val), tmp_path / "ix", dim, value_dtype="uint8", posting_format="blocked"))
  q_idx, q_val = _queries(rng, dim)
  r_ex, _ = ix.search(q_idx, q_val, k=10)
  r1, _ = ix.search(q_idx, q_val, k=10, mode="approx", theta=1.0)
  np.testing.assert_array_equal(r1, r_ex)
  rb, _ = ix.search(q_idx, q_val, k=10, mode="approx", theta=3.0, exact_below=10**12)  # few postings: exact
  np.testing.assert_array_equal(rb, r_ex)
  ra, sa = ix.search(q_idx, q_val, k=10, mode="approx", theta=1.3, exact_below=0)
  bf = ix.brute_force(q_idx, q_val)
  for b in range(q_idx.shape[0]):
    ok = ra[b] >= 0
    np.testing.assert_allclose(bf[b, ra[b][ok]], sa[b][ok], rtol=1e-5)  # returned scores are true scores
    assert np.all(np.diff(sa[b][ok]) <= 0)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ra, r_ex)])
  assert 0.3 < recall <= 1.0


def test_writer_options_validated(tmp_path):
  with pytest.raises(ValueError, match="posting_format"):
    IndexWriter(tmp_path / "a", 10, posting_format="zip")
  # An empty collection and docs without postings build and search.
  path = build_index(
    iter([(["a", "b"], np.zeros((2, 3), int), np.zeros((2, 3)))]), tmp_path / "c", 10, posting_format="blocked"
  )
  rows, _ = Index.load(path).search(np.array([[1, 2]]), np.array([[1.0, 1.0]]), k=3)
  assert np.all(rows == -1)


def _rehash(path, name):
  """Updates the manifest entry of `name` (a consistent-looking but wrong file)."""
  m = json.loads((path / fmt.MANIFEST).read_text())
  m["files"][name]["blake2b"] = fmt.file_checksum(path / name)
  (path / fmt.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(
  "name", ["dim_counts.npy", "blk_words.npy", "blk_last.npy", "blk_width.npy", "blk_max.npy", "impacts.npy"]
)
def test_blocked_corruption_is_caught_with_the_file_named(tmp_path, name):
  rng = np.random.default_rng(4)
  idx, val = _docs(rng, 600, 500, 10)
  path = build_index(_batches(idx, val), tmp_path / "ix", 500, value_dtype="uint8", posting_format="blocked")
  Index.load(path, verify="full")
  f = path / name
  good = f.read_bytes()
  data = bytearray(good)
  data[-3] ^= 0x5A  # bit flips
  f.write_bytes(bytes(data))
  try:
    Index.load(path, verify="size")  # same size: only a full check can tell (or the block directory)
  except IndexCorruptError as e:
    assert name in str(e)
  with pytest.raises(IndexCorruptError, match=name):
    Index.load(path)  # "auto" hashes small indexes
  f.write_bytes(good[:-1])  # truncation
  with pytest.raises(IndexCorruptError, match=name):
    Index.load(path, verify="size")
  # Header change (dtype), same size: the header check names the file.
  hdr = good[:128].replace(b"'descr': '", b"'descr': 'X", 1)[:128]
  f.write_bytes(hdr + good[128:])
  with pytest.raises(IndexCorruptError, match=name):
    Index.load(path, verify="none")
  f.write_bytes(good)
  Index.load(path, verify="full")
  f.unlink()
  with pytest.raises(IndexCorruptError, match=name):
    Index.load(path, verify="none")


def test_blocked_inconsistent_directory_and_manifest(tmp_path):
  rng = np.random.default_rng(5)
  idx, val = _docs(rng, 600, 500, 10)
  path = build_index(_batches(idx, val), tmp_path / "ix", 500, value_dtype="uint8", posting_format="blocked")
  # A width changed consistently with its checksum: the block directory no longer adds up.
  widths = np.load(path / "blk_width.npy")
  with open(path / "blk_width.npy", "rb") as f:
    off = fmt.data_offset(f)
  data = bytearray((path / "blk_width.npy").read_bytes())
  data[off + int(np.argmax(widths))] = 32
  (path / "blk_width.npy").write_bytes(bytes(data))
  _rehash(path, "blk_width.npy")
  with pytest.raises(IndexCorruptError, match="blk_words.npy"):
    Index.load(path, verify="full")
  m = json.loads((path / fmt.MANIFEST).read_text())
  m["format_version"] = 3
  (path / fmt.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(IndexFormatError, match="format_version"):
    Index.load(path)
  del m["files"]
  m["format_version"] = 2
  (path / fmt.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(IndexCorruptError, match="manifest.json"):
    Index.load(path)


def test_parts_merge_into_a_blocked_index(tmp_path):
  from laspar_jax.index.merge import PartWriter, merge_parts  # noqa: PLC0415

  rng = np.random.default_rng(6)
  dim = 400
  idx, val = _docs(rng, 900, dim, 15)
  parts = []
  for p, (lo, hi) in enumerate([(0, 500), (500, 900)]):
    with PartWriter(tmp_path / f"part{p}", dim, value_dtype="uint8", quant_scale=0.01, posting_format="blocked") as w:
      for ids, i_bk, v_bk in _batches(idx[lo:hi], val[lo:hi], 100):
        w.add([f"p{p}-{x}" for x in ids], i_bk, v_bk)
    parts.append(tmp_path / f"part{p}")
  merged = Index.load(merge_parts(parts, tmp_path / "merged"), verify="full")
  single = Index.load(
    build_index(
      _batches(idx, val), tmp_path / "single", dim, value_dtype="uint8", quant_scale=0.01, posting_format="blocked"
    )
  )
  assert merged.blocked and merged.n_postings == single.n_postings
  q_idx, q_val = _queries(rng, dim)
  np.testing.assert_array_equal(merged.search(q_idx, q_val, k=10)[0], single.search(q_idx, q_val, k=10)[0])
