"""The short public API of the package."""

import subprocess
import sys

import numpy as np
import pytest

import laspar_jax
from laspar_jax.index import build_index


def test_search_by_path_equals_brute_force(tmp_path):
  rng = np.random.default_rng(0)
  n, dim, k = 50, 1000, 8
  idx_nk = np.stack([rng.choice(dim, k, replace=False) for _ in range(n)]).astype(np.int32)
  val_nk = rng.random((n, k)).astype(np.float32)
  ids = [f"d{i}" for i in range(n)]
  build_index([(ids, idx_nk, val_nk)], tmp_path / "ix", dim)
  q_idx = idx_nk[:3, :4]
  q_val = np.ones_like(q_idx, np.float32)
  rows, scores = laspar_jax.search(tmp_path / "ix", q_idx, q_val, k=5)
  dense = np.zeros((n, dim), np.float32)
  np.put_along_axis(dense, idx_nk, val_nk, axis=1)
  for b in range(3):
    ref = dense[:, q_idx[b]].sum(1)
    expect = np.sort(ref[ref > 0])[::-1][:5]  # documents sharing no dim are not returned
    np.testing.assert_allclose(scores[b][: len(expect)], expect, rtol=1e-5)
    assert np.isneginf(scores[b][len(expect) :]).all() and (rows[b][len(expect) :] == -1).all()
    assert rows[b][0] == int(np.argmax(ref))


def test_submodules_not_shadowed():
  import laspar_jax.encode

  assert callable(laspar_jax.encode.encode_sparse) and laspar_jax.encode_sparse is laspar_jax.encode.encode_sparse
  import laspar_jax.evaluate

  assert laspar_jax.evaluate_encoder is laspar_jax.evaluate.evaluate_encoder


def test_import_is_lazy_and_names_resolve():
  code = (
    "import sys, laspar_jax; heavy = [m for m in ('jax', 'flax', 'numba', 'laspar_jax.index') "
    "if m in sys.modules]; print(heavy)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
  from laspar_jax import distributed_index, encode, evaluate, index, models

  assert laspar_jax.build_index is distributed_index.index_collection
  assert laspar_jax.load_encoder is models.sparse_encoder.load_encoder
  assert laspar_jax.search is index.search.search and laspar_jax.Index is index.Index
  assert laspar_jax.evaluate_encoder is evaluate.evaluate_encoder
  assert set(laspar_jax.__all__) <= set(dir(laspar_jax))
  with pytest.raises(AttributeError):
    laspar_jax.not_a_name  # noqa: B018
