"""Tests for laspar_jax.sparsify."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laspar_jax import sparsify


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "model"))


def test_topk_matches_numpy_and_threshold():
  rng = np.random.default_rng(0)
  rep_bv = rng.random((4, 1000)).astype(np.float32)
  rep_bv[1, :] = 0.0
  rep_bv[1, 7] = 0.5
  idx_bk, val_bk = sparsify.topk(jnp.asarray(rep_bv), 16, min_weight=0.2)
  idx_bk, val_bk = np.asarray(idx_bk), np.asarray(val_bk)
  assert idx_bk.dtype == np.int32 and idx_bk.shape == (4, 16)
  for b in (0, 2, 3):
    want = np.sort(rep_bv[b])[::-1][:16]
    np.testing.assert_allclose(val_bk[b], want)
    np.testing.assert_allclose(rep_bv[b, idx_bk[b]], val_bk[b])
  assert idx_bk[1, 0] == 7 and val_bk[1, 0] == 0.5
  assert np.all(val_bk[1, 1:] == 0.0)


def test_topk_approx_runs():
  rep_bv = jnp.asarray(np.random.default_rng(1).random((2, 512)), jnp.float32)
  idx_bk, val_bk = sparsify.topk(rep_bv, 8, approx=True)
  exact_idx, _ = sparsify.topk(rep_bv, 8)
  # CPU approx_max_k is exact; on TPU recall >= target.
  assert np.mean(np.isin(np.asarray(idx_bk), np.asarray(exact_idx))) >= 0.9


@pytest.mark.parametrize("batch_axis", [None, "data"])
def test_sharded_topk_equals_global(batch_axis):
  mesh = _mesh()
  rng = np.random.default_rng(2)
  d = 8 * 4096
  rep_bv = rng.random((4, d)).astype(np.float32)
  # Concentrate the largest values in one shard so per-shard k matters.
  rep_bv[:, 4096 : 4096 + 40] += 10.0
  rep = jax.device_put(jnp.asarray(rep_bv), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model")))
  idx_bk, val_bk = sparsify.sharded_topk(rep, 64, mesh, "model", batch_axis=batch_axis)
  g_idx, g_val = sparsify.topk(jnp.asarray(rep_bv), 64)
  np.testing.assert_array_equal(np.asarray(idx_bk), np.asarray(g_idx))
  np.testing.assert_array_equal(np.asarray(val_bk), np.asarray(g_val))


def test_quantize_roundtrip():
  val = np.array([0.0, 1e-6, 0.5, 1.0, 2.0], np.float32)
  q8, s8 = sparsify.quantize(val, 8)
  assert q8.dtype == np.uint8 and q8[-1] == 255 and q8[0] == 0 and q8[1] == 1
  np.testing.assert_allclose(sparsify.dequantize(q8, s8)[2:], val[2:], atol=s8)
  q16, s16 = sparsify.quantize(val, 16, scale=1e-3)
  assert q16.dtype == np.uint16 and s16 == 1e-3 and q16[3] == 1000
  with pytest.raises(ValueError):
    sparsify.quantize(val, 4)
