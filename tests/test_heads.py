"""Sparse heads against plain numpy references; tiling, top-k, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from laspar_jax import mesh as mesh_lib
from laspar_jax.models import bert, heads, layers

B, L, DM, D = 3, 9, 16, 256


def _inputs(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  h = (scale * rng.normal(size=(B, L, DM))).astype(np.float32)
  m = np.ones((B, L), np.int32)
  m[1, 5:] = 0
  m[2, 2:] = 0
  return h, m


def _np_finish(z, clamp=10.0, normalize=True):
  s = np.minimum(np.log1p(np.maximum(z, 0.0)), clamp)
  if normalize:
    s = s / np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
  return s


def _np_softmax(x, mask=None):
  x = np.where(mask.astype(bool), x, -np.inf) if mask is not None else x
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _set_random(head, seed=5):
  """Non-trivial pooling parameters (init is all zeros = mean pooling)."""
  rng = np.random.default_rng(seed)
  if hasattr(head, "pos_logits"):
    head.pos_logits[...] = jnp.asarray(rng.normal(size=head.pos_logits[...].shape), jnp.float32)
  if hasattr(head, "score_vec"):
    head.score_vec[...] = jnp.asarray(rng.normal(size=head.score_vec[...].shape), jnp.float32)
  head.bias[...] = jnp.asarray(rng.normal(size=head.bias[...].shape), jnp.float32)


@pytest.mark.parametrize("pooling", ["mask", "position", "content"])
def test_latent_attention_matches_numpy(pooling):
  h, m = _inputs()
  head = heads.LatentAttentionHead(DM, D, pooling=pooling, max_len=16, rngs=nnx.Rngs(0))
  # At init every pooling is a mean (over unmasked tokens, or over all for "position").
  x0 = head.pooled(jnp.asarray(h), jnp.asarray(m))[0]
  w = m if pooling != "position" else np.ones_like(m)
  np.testing.assert_allclose(x0, (w[..., None] * h).sum(1) / w.sum(1, keepdims=True), atol=1e-5)
  _set_random(head)
  U, b = np.asarray(head.kernel[...]), np.asarray(head.bias[...])
  if pooling == "content":
    a = _np_softmax(h @ np.asarray(head.score_vec[...]), m)
  else:
    logits = np.broadcast_to(np.asarray(head.pos_logits[...])[:L], (B, L))
    a = _np_softmax(logits, None if pooling == "position" else m)
  ref = _np_finish(np.einsum("bt,btd->bd", a, h) @ U + b)
  out = head(jnp.asarray(h), jnp.asarray(m))
  assert out.dtype == jnp.float32 and out.shape == (B, D)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  if pooling == "position":  # padding leaks in: differs from the mask-aware form
    assert not np.allclose(out[2], _np_finish((_np_softmax(logits, m)[..., None] * h).sum(1) @ U + b)[2], atol=1e-3)


def test_latent_sum_matches_per_token_projection():
  h, m = _inputs()
  head = heads.LatentSumHead(DM, D, rngs=nnx.Rngs(1))
  _set_random(head)
  U, b = np.asarray(head.kernel[...]), np.asarray(head.bias[...])
  z_btv = h @ U + b  # the per-token form the head avoids
  ref = _np_finish((m[..., None] * z_btv).sum(1))
  np.testing.assert_allclose(head(jnp.asarray(h), jnp.asarray(m)), ref, atol=2e-5)


@pytest.mark.parametrize("tile,token_chunk", [(None, None), (32, None), (64, 4), (48, 2)])
def test_latent_max_matches_numpy(tile, token_chunk):
  h, m = _inputs(scale=2.0)
  head = heads.LatentMaxHead(DM, D, tile=tile, token_chunk=token_chunk, rngs=nnx.Rngs(2), clamp=1.5)
  _set_random(head)
  U, b = np.asarray(head.kernel[...]), np.asarray(head.bias[...])
  act = np.log1p(np.maximum(h @ U + b, 0.0))
  s = np.minimum(np.where(m[..., None].astype(bool), act, 0.0).max(1), 1.5)
  ref = s / np.linalg.norm(s, axis=-1, keepdims=True)
  out = head(jnp.asarray(h), jnp.asarray(m))
  np.testing.assert_allclose(out, ref, atol=2e-5)
  assert (act.max(1) > 1.5).any()  # the clamp is exercised


@pytest.mark.parametrize("tile,token_chunk,backward", [(32, 4, "remat"), (48, None, "argmax")])
def test_latent_max_tiled_grads_equal_untiled(tile, token_chunk, backward):
  h, m = _inputs(scale=2.0)
  m[0] = 0  # a row without tokens
  tiled = heads.LatentMaxHead(DM, D, tile=tile, token_chunk=token_chunk, backward=backward, rngs=nnx.Rngs(3))
  untiled = heads.LatentMaxHead(DM, D, tile=None, rngs=nnx.Rngs(3))
  w = jnp.asarray(np.random.default_rng(0).normal(size=(B, D)), jnp.float32)

  @nnx.jit
  def grads(head, h):
    return nnx.grad(lambda head, h: jnp.sum(head(h, jnp.asarray(m)) * w), argnums=(0, 1))(head, h)

  g1, g2 = grads(tiled, jnp.asarray(h)), grads(untiled, jnp.asarray(h))
  np.testing.assert_allclose(tiled(jnp.asarray(h), jnp.asarray(m)), untiled(jnp.asarray(h), jnp.asarray(m)), atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert float(jnp.abs(g1[0]["kernel"][...]).sum()) > 0
  assert float(jnp.abs(g1[1][1:]).sum()) > 0 and float(jnp.abs(g1[1][0]).sum()) == 0


def test_token_pool_sum_and_padding_of_tiles():
  rng = np.random.default_rng(4)
  h, m = _inputs()
  V = 50  # not a multiple of the tile: padded columns must not leak
  k = rng.normal(size=(DM, V)).astype(np.float32)
  b = rng.normal(size=(V,)).astype(np.float32)
  act = np.log1p(np.maximum(h @ k + b, 0.0)) * m[..., None]
  for reduce, ref in (("sum", act.sum(1)), ("max", act.max(1))):
    for tile in (None, 16, 7):
      out = heads.token_pool(
        jnp.asarray(h), jnp.asarray(m), jnp.asarray(k), jnp.asarray(b), reduce=reduce, tile=tile, token_chunk=4
      )
      np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=f"{reduce} tile={tile}")


@pytest.mark.parametrize("cls", [heads.LatentAttentionHead, heads.LatentSumHead, heads.LatentMaxHead])
def test_topk_gather_equals_mask(cls):
  h, m = _inputs(scale=2.0)
  kw = {"tile": 64} if cls is heads.LatentMaxHead else {}
  head = cls(DM, D, rngs=nnx.Rngs(6), **kw)
  _set_random(head)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32)
  k = 10

  def loss(head, h, mode):
    return jnp.sum(head(h, jnp.asarray(m), topk=k, topk_mode=mode) * w)

  outs = {
    mode: nnx.jit(lambda hd, x, mode=mode: hd(x, jnp.asarray(m), topk=k, topk_mode=mode))(head, jnp.asarray(h))
    for mode in ("gather", "mask")
  }
  np.testing.assert_allclose(outs["gather"], outs["mask"], atol=1e-6)
  assert ((np.asarray(outs["gather"]) > 0).sum(1) == k).all()
  np.testing.assert_allclose(np.linalg.norm(outs["gather"], axis=1), 1.0, atol=1e-5)
  grads = {
    mode: nnx.jit(nnx.grad(loss, argnums=(0, 1)), static_argnums=2)(head, jnp.asarray(h), mode)
    for mode in ("gather", "mask")
  }
  for a, b in zip(jax.tree.leaves(grads["gather"]), jax.tree.leaves(grads["mask"])):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Only the kept columns of U get gradient.
  gk = np.abs(np.asarray(grads["gather"][0]["kernel"][...])).sum(0)
  assert 0 < (gk > 0).sum() <= B * k


def test_topk_mask():
  x = jnp.asarray([[0.1, 0.5, 0.3, 0.0], [2.0, 1.0, 3.0, 0.5]])
  np.testing.assert_allclose(heads.topk_mask(x, 2), [[0, 0.5, 0.3, 0], [2.0, 0, 3.0, 0]])
  g = jax.grad(lambda x: heads.topk_mask(x, 1).sum())(x)
  np.testing.assert_allclose(g, [[0, 1, 0, 0], [0, 0, 1, 0]])


def _projection(V, *, tied=None, seed=0):
  """BERT's MLM head (the backbone's vocabulary projection) at width DM."""
  cfg = bert.BertConfig(vocab_size=V, hidden_size=DM, num_attention_heads=2)
  return bert.BertLMHead(cfg, rngs=nnx.Rngs(params=seed), tied=tied)


def _set_projection(proj, t):
  proj.dense.kernel.set_value(jnp.asarray(t["transform.dense.weight"].T))
  proj.dense.bias.set_value(jnp.asarray(t["transform.dense.bias"]))
  proj.layer_norm.scale.set_value(jnp.asarray(t["transform.LayerNorm.weight"]))
  proj.layer_norm.bias.set_value(jnp.asarray(t["transform.LayerNorm.bias"]))
  proj.bias.set_value(jnp.asarray(t["bias"]))


def _np_transform(h, t):
  from scipy.special import erf

  y = h @ t["transform.dense.weight"].T + t["transform.dense.bias"]
  y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
  y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-12)
  return y * t["transform.LayerNorm.weight"] + t["transform.LayerNorm.bias"]


def _mlm_tensors(rng, V):
  return {
    "transform.dense.weight": rng.normal(size=(DM, DM)).astype(np.float32) * 0.3,
    "transform.dense.bias": rng.normal(size=(DM,)).astype(np.float32),
    "transform.LayerNorm.weight": rng.normal(size=(DM,)).astype(np.float32),
    "transform.LayerNorm.bias": rng.normal(size=(DM,)).astype(np.float32),
    "bias": rng.normal(size=(V,)).astype(np.float32),
  }


def test_vocab_head_matches_numpy_tied():
  rng = np.random.default_rng(7)
  V = 70
  h, m = _inputs()
  emb = layers.Embed(V, DM, rngs=nnx.Rngs(0))
  emb.embedding.set_value(jnp.asarray(rng.normal(size=(V, DM)), jnp.float32))
  special = np.array([0, 3, 69])
  proj = _projection(V, tied=emb, seed=8)
  head = heads.VocabHead(proj, vocab=V, special_ids=special, tile=16)
  t = _mlm_tensors(rng, V)
  _set_projection(proj, t)
  y = _np_transform(h, t)
  act = np.log1p(np.maximum(y @ np.asarray(emb.embedding[...]).T + t["bias"], 0)) * m[..., None]
  for pooling, ref in (("max", act.max(1)), ("sum", act.sum(1))):
    head.pooling = pooling
    ref = ref.copy()
    ref[:, special] = 0
    out = head(jnp.asarray(h), jnp.asarray(m))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert (np.asarray(out)[:, special] == 0).all() and (np.asarray(out) > 0).any()
  # Tied: gradients reach the shared embedding through split/merge + jit.
  container = nnx.List([head, nnx.Dict(emb=emb)])
  gdef, state = nnx.split(container)
  assert len(jax.tree.leaves(state)) == 6  # the shared embedding is stored once

  @jax.jit
  def grad_fn(state):
    def loss(state):
      hd = nnx.merge(gdef, state)[0]
      return hd(jnp.asarray(h), jnp.asarray(m)).sum()

    return jax.grad(loss)(state)

  g = grad_fn(state)
  g_emb = [x for x in jax.tree.leaves(g) if x.shape == (V, DM)]
  assert len(g_emb) == 1 and float(jnp.abs(g_emb[0]).sum()) > 0


def test_vocab_head_own_decoder():
  rng = np.random.default_rng(9)
  V = 40
  h, m = _inputs()
  proj = _projection(V)  # untied: the projection's own decoder
  head = heads.VocabHead(proj, vocab=V, tile=None)
  dec = rng.normal(size=(V, DM)).astype(np.float32)
  t = {
    "transform.dense.weight": np.eye(DM, dtype=np.float32),
    "transform.dense.bias": np.zeros(DM, np.float32),
    "transform.LayerNorm.weight": np.ones(DM, np.float32),
    "transform.LayerNorm.bias": np.zeros(DM, np.float32),
    "bias": np.zeros(V, np.float32),
  }
  _set_projection(proj, t)
  proj.decoder.set_value(jnp.asarray(dec.T))
  np.testing.assert_array_equal(head.projection.kernel_dv(), dec.T)
  ref = (np.log1p(np.maximum(_np_transform(h, t) @ dec.T, 0)) * m[..., None]).max(1)
  np.testing.assert_allclose(head(jnp.asarray(h), jnp.asarray(m)), ref, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="vocab"):
    heads.VocabHead(proj, vocab=V + 1)(jnp.asarray(h), jnp.asarray(m))


def test_init_projection_scale_and_determinism():
  k = jax.random.key(0)
  U = heads.init_projection(k, 64, 4096)
  assert U.shape == (64, 4096) and U.dtype == jnp.float32
  assert abs(float(U.std()) - 1 / 8) < 0.005 and abs(float(U.mean())) < 0.005
  np.testing.assert_array_equal(U, heads.init_projection(k, 64, 4096))
  assert not np.allclose(U[0], U[1])


def test_make_head_and_partition_specs():
  h, m = _inputs()
  for name in heads.HEADS:
    head = heads.make_head(name, d=DM, D=D, vocab=64, rngs=nnx.Rngs(0), projection=_projection(64))
    out = head(jnp.asarray(h), jnp.asarray(m), jnp.zeros((B, L), jnp.int32))
    assert out.shape == (B, heads.output_dim(head)) and out.dtype == jnp.float32
    assert heads.output_dim(head) == {"mlm": 64, "mlp": 64, "dense": DM}.get(name, D)
    assert heads.uses_vocab(name) == (name == "mlm")
  head = heads.make_head("latent_attention", d=DM, D=D, rngs=nnx.Rngs(0))
  spec = nnx.get_partition_spec(nnx.state(head))
  assert tuple(spec["kernel"].get_value()) == ("embed", "sparse")
  assert tuple(spec["bias"].get_value()) == ("sparse",)
  with pytest.raises(ValueError):
    heads.make_head("nope", d=DM, D=D, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs D"):
    heads.make_head("latent_max", d=DM, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs vocab"):
    heads.make_head("mlm", d=DM)
  bare = heads.make_head("mlm", d=DM, vocab=64)  # the projection comes with each call
  h, m = jnp.ones((1, 2, DM)), jnp.ones((1, 2))
  with pytest.raises(ValueError, match="pass projection="):
    bare(h, m)
  np.testing.assert_array_equal(
    bare(h, m, projection=_projection(64)), heads.VocabHead(_projection(64), vocab=64)(h, m)
  )
  assert not bare.per_token and heads.make_head("mlp", d=DM, vocab=64, rngs=nnx.Rngs(0)).per_token
  head = heads.make_head("mlm", vocab=64, projection=_projection(64), special_ids=[1, 2])
  assert head.special_ids == (1, 2)
  head = heads.make_head("mlm", vocab=64, projection=_projection(64), **{"pooling": "sum"})
  assert head.special_ids == () and head.pooling == "sum"


@pytest.mark.parametrize("name", ["latent_attention", "latent_max"])
def test_sharded_head_equals_unsharded(name):
  h, m = _inputs(scale=2.0)
  kw = {"tile": 64} if name == "latent_max" else {}
  head = heads.make_head(name, d=DM, D=D, rngs=nnx.Rngs(0), **kw)
  _set_random(head)
  ref = head(jnp.asarray(h), jnp.asarray(m), topk=12)
  mesh = mesh_lib.make_mesh(data=2, model=4)
  mesh_lib.shard_model(head, mesh)
  assert head.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
  gdef, state = nnx.split(head)

  @jax.jit
  def f(state, h, m):
    return nnx.merge(gdef, state)(h, m, topk=12)

  with jax.set_mesh(mesh):
    out = f(state, jnp.asarray(h), jnp.asarray(m))
  np.testing.assert_allclose(out, ref, atol=1e-5)
