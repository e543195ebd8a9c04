"""MLP term-weighting head against a plain numpy reference: sum/max pooling, masks, grads, top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from laspar_jax import mesh as mesh_lib
from laspar_jax.models import heads

B, L, DM, V = 3, 8, 16, 40
SPECIAL = (0, 1)  # e.g. [PAD]/[CLS]


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, L, DM)).astype(np.float32)
  ids = np.array(
    [
      [1, 5, 7, 5, 9, 5, 2, 0],  # 5 three times, special 1 at the start
      [1, 3, 3, 12, 39, 0, 0, 0],  # repeated 3, padding after position 4
      [1, 6, 0, 0, 0, 0, 0, 0],
    ],
    np.int32,
  )
  m = (ids != 0).astype(np.int32)
  m[0, 7] = 1  # an unmasked special id (0) must still give nothing
  return h, m, ids


def _head(pooling, seed=0, special_ids=SPECIAL):
  head = heads.MLPHead(DM, vocab=V, rngs=nnx.Rngs(seed), special_ids=special_ids, pooling=pooling)
  head.linear.bias[...] = jnp.asarray([0.3], jnp.float32)  # some tokens positive, some zero
  return head


def _np_ref(h, m, ids, k, c, pooling, special=SPECIAL):
  w = np.maximum(h @ k[:, 0] + c[0], 0.0)
  w = np.where(m.astype(bool) & ~np.isin(ids, special), w, 0.0)
  rep = np.zeros((B, V), np.float64)
  for b in range(B):
    for t in range(L):
      j = ids[b, t]
      rep[b, j] = rep[b, j] + w[b, t] if pooling == "sum" else max(rep[b, j], w[b, t])
  return rep


@pytest.mark.parametrize("pooling", ["sum", "max"])
def test_mlp_head_matches_numpy(pooling):
  h, m, ids = _inputs()
  head = _head(pooling)
  k, c = np.asarray(head.linear.kernel[...]), np.asarray(head.linear.bias[...])
  assert k.shape == (DM, 1) and c.shape == (1,) and k.dtype == np.float32
  out = head(jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids))
  assert out.shape == (B, V) and out.dtype == jnp.float32
  ref = _np_ref(h, m, ids, k, c, pooling)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Only the rows' own, unmasked, non-special ids can be non-zero (no expansion).
  for b in range(B):
    allowed = set(ids[b][m[b].astype(bool)]) - set(SPECIAL)
    assert set(np.flatnonzero(np.asarray(out[b]))) <= allowed
  assert np.all(np.asarray(out)[:, list(SPECIAL)] == 0)
  assert (ref > 0).sum() >= 4  # the reference is not trivially zero
  # Repeated id 5 in row 0: sum vs max of its three weights.
  w5 = np.maximum(h[0, [1, 3, 5]] @ k[:, 0] + c[0], 0.0)
  np.testing.assert_allclose(out[0, 5], w5.sum() if pooling == "sum" else w5.max(), atol=1e-5)


def test_special_ids_and_masking():
  h, m, ids = _inputs()
  head = _head("sum", special_ids=())
  head.linear.bias[...] = jnp.asarray([100.0], jnp.float32)  # every weight positive
  out = np.asarray(head(jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids)))
  assert out[0, 1] > 0 and out[0, 0] > 0  # without special ids they get weight
  assert out[1, 0] == 0  # row 1's padding (id 0, masked) gives nothing
  k = np.asarray(head.linear.kernel[...])
  np.testing.assert_allclose(out, _np_ref(h, m, ids, k, np.array([100.0]), "sum", ()), rtol=1e-5)
  head = _head("sum", special_ids=[0, 1, 5])
  head.linear.bias[...] = jnp.asarray([100.0], jnp.float32)
  out = np.asarray(head(jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids)))
  assert np.all(out[:, [0, 1, 5]] == 0) and out[0, 7] > 0


@pytest.mark.parametrize("pooling", ["sum", "max"])
def test_mlp_head_gradients(pooling):
  h, m, ids = _inputs(1)
  head = _head(pooling)
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.normal(size=(B, V)), jnp.float32)
  gdef, params = nnx.split(head, nnx.Param)

  def loss(params, h):
    return jnp.sum(nnx.merge(gdef, params)(h, jnp.asarray(m), jnp.asarray(ids)) * g)

  gp, gh = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(h))

  # A dense jnp reference through the one-hot [B, L, V] form (fine at this V).
  def dense_loss(k, c, h):
    w = jax.nn.relu(h @ k[:, 0] + c[0])
    w = jnp.where(jnp.asarray(m.astype(bool) & ~np.isin(ids, SPECIAL)), w, 0.0)
    oh = jax.nn.one_hot(ids, V)
    rep = jnp.sum(oh * w[..., None], axis=1) if pooling == "sum" else jnp.max(oh * w[..., None], axis=1)
    return jnp.sum(rep * g)

  k0, c0 = head.linear.kernel[...], head.linear.bias[...]
  rk, rc, rh = jax.grad(dense_loss, argnums=(0, 1, 2))(k0, c0, jnp.asarray(h))
  np.testing.assert_allclose(gp["linear"]["kernel"][...], rk, atol=1e-5)
  np.testing.assert_allclose(gp["linear"]["bias"][...], rc, atol=1e-5)
  np.testing.assert_allclose(gh, rh, atol=1e-5)
  assert float(jnp.abs(gp["linear"]["kernel"][...]).sum()) > 0

  # And a finite difference on the bias (float64 numpy reference).
  eps = 1e-3
  c = float(c0[0])
  fd = (
    np.sum(_np_ref(h, m, ids, np.asarray(k0, np.float64), np.array([c + eps]), pooling) * np.asarray(g))
    - np.sum(_np_ref(h, m, ids, np.asarray(k0, np.float64), np.array([c - eps]), pooling) * np.asarray(g))
  ) / (2 * eps)
  np.testing.assert_allclose(gp["linear"]["bias"][...][0], fd, rtol=1e-3, atol=1e-3)


def test_mlp_head_topk():
  h, m, ids = _inputs()
  head = _head("sum")
  full = np.asarray(head(jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids)))
  out = np.asarray(head(jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids), topk=1))
  for b in range(B):
    assert (out[b] > 0).sum() <= 1
    if full[b].max() > 0:
      assert out[b].max() == full[b].max() and out[b].argmax() == full[b].argmax()
  np.testing.assert_array_equal(head(jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids), topk=V), full)


def test_make_head_mlp():
  h, m, ids = _inputs()
  head = heads.make_head("mlp", d=DM, vocab=V, rngs=nnx.Rngs(0), special_ids=[0, 1])
  assert isinstance(head, heads.MLPHead) and heads.HEADS["mlp"] is heads.MLPHead
  assert heads.output_dim(head) == V and head.output_dim == V
  assert head.special_ids == (0, 1) and head.pooling == "sum"
  assert not heads.uses_vocab("mlp")
  head = heads.make_head("mlp", d=DM, vocab=V, rngs=nnx.Rngs(0), pooling="max")
  assert head.pooling == "max" and head.special_ids == ()
  assert head(jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids)).shape == (B, V)
  with pytest.raises(ValueError, match="needs vocab"):
    heads.make_head("mlp", d=DM, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pooling"):
    heads.MLPHead(DM, vocab=V, rngs=nnx.Rngs(0), pooling="mean")
  with pytest.raises(ValueError, match="ids_bt"):
    head(jnp.asarray(h), jnp.asarray(m))
  spec = nnx.get_partition_spec(nnx.state(head))
  assert tuple(spec["linear"]["kernel"].get_value()) == ("embed", None)


def test_mlp_head_under_mesh_jit():
  h, m, ids = _inputs()
  head = _head("max")
  ref = head(jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids), topk=3)
  mesh = mesh_lib.make_mesh(data=2, model=4)
  mesh_lib.shard_model(head, mesh)
  gdef, state = nnx.split(head)

  @jax.jit
  def f(state, h, m, ids):
    return nnx.merge(gdef, state)(h, m, ids, topk=3)

  with jax.set_mesh(mesh):
    out = f(state, jnp.asarray(h), jnp.asarray(m), jnp.asarray(ids))
  np.testing.assert_allclose(out, ref, atol=1e-6)
