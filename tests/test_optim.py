"""optim.make_optimizer: labels (frozen / head / base), unchanged update math, no state for frozen parameters."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from laspar_jax import optim


def _optim(**over):
  c = ml_collections.ConfigDict(
    dict(
      lr=1e-3,
      warmup_steps=2,
      schedule="linear",
      end_lr=0.0,
      weight_decay=0.01,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip=1.0,
      head_lr_mult=20.0,
      freeze=(),
    )
  )
  c.update(over)
  return c


def _params():
  k = jax.random.split(jax.random.key(0), 6)
  return {
    "query_head": {"kernel": jax.random.normal(k[0], (4, 8)), "bias": jax.random.normal(k[1], (8,))},
    "doc_head": {"kernel": jax.random.normal(k[2], (4, 8))},
    "query_backbone": {
      "layers": {0: {"w": jax.random.normal(k[3], (4, 4)), "b": jax.random.normal(k[4], (4,))}},
      "lm_head": {"bias": jax.random.normal(k[5], (8,))},
    },
  }


def _grads(params, i):
  return jax.tree.map(lambda x: 3 * jax.random.normal(jax.random.key(i), x.shape), params)


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_labels():
  labels = optim.param_labels(_params(), _optim(freeze=("lm_head", "^doc_head/")))
  assert labels["query_head"] == {"kernel": "head", "bias": "head"}
  assert labels["doc_head"]["kernel"] == "frozen"  # freeze wins over head
  assert labels["query_backbone"]["layers"][0] == {"w": "base", "b": "base"}
  assert labels["query_backbone"]["lm_head"]["bias"] == "frozen"


def test_same_updates_as_the_single_adamw_chain():
  """The labelled optimizer gives bitwise the updates of clip -> adamw -> scale(head_lr_mult) on heads."""
  o, params = _optim(), _params()
  is_head = lambda p: jax.tree_util.tree_map_with_path(
    lambda path, _: any(getattr(k, "key", None) in optim.HEAD_NODES for k in path), p
  )
  old = optax.chain(
    optax.clip_by_global_norm(o.grad_clip),
    optax.adamw(
      optim.learning_rate(o, 10),
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    ),
    optax.masked(optax.scale(o.head_lr_mult), is_head),
  )
  new, _ = optim.make_optimizer(o, 10, params)
  p_old, p_new, s_old, s_new = params, params, old.init(params), new.init(params)
  for i in range(4):
    u, s_old = jax.jit(old.update)(_grads(params, i), s_old, p_old)
    p_old = optax.apply_updates(p_old, u)
    u, s_new = jax.jit(new.update)(_grads(params, i), s_new, p_new)
    p_new = optax.apply_updates(p_new, u)
  jax.tree.map(np.testing.assert_array_equal, p_old, p_new)


def test_head_learning_rate_multiplier():
  o = _optim(head_lr_mult=20.0, warmup_steps=1, weight_decay=0.0)
  params = {"query_head": {"kernel": jnp.ones((2, 3))}, "query_backbone": {"w": jnp.ones((2, 3))}}
  tx, _ = optim.make_optimizer(o, 10, params)
  st = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    u, st = tx.update(g, st, params)
  np.testing.assert_allclose(u["query_head"]["kernel"], 20 * u["query_backbone"]["w"], rtol=1e-6)


def test_frozen_parameters_have_no_optimizer_state():
  params = _params()
  heads = {k: params[k] for k in ("query_head", "doc_head")}
  tx, _ = optim.make_optimizer(_optim(freeze=("backbone",)), 10, params)
  st = tx.init(params)
  arrays = [x for x in jax.tree.leaves(st) if x.ndim > 0]
  scalars = [x for x in jax.tree.leaves(st) if x.ndim == 0]  # step counts
  assert sum(x.size for x in arrays) == 2 * sum(x.size for x in jax.tree.leaves(heads))  # Adam mu + nu
  assert _nbytes(st) == 2 * _nbytes(heads) + _nbytes(scalars) and len(scalars) <= 4
  full, _ = optim.make_optimizer(_optim(), 10, params)
  arrays_full = [x for x in jax.tree.leaves(full.init(params)) if x.ndim > 0]
  assert _nbytes(arrays_full) - _nbytes(arrays) == 2 * _nbytes(params["query_backbone"])
  new = params
  for i in range(2):
    u, st = jax.jit(tx.update)(_grads(params, i), st, new)
    new = optax.apply_updates(new, u)
  jax.tree.map(np.testing.assert_array_equal, new["query_backbone"], params["query_backbone"])
  for k in ("query_head", "doc_head"):
    assert not np.allclose(new[k]["kernel"], params[k]["kernel"])
  assert optim.trainable_mask(params, _optim(freeze=("backbone",)))["query_backbone"]["layers"][0]["w"] is False


def test_bad_schedule():
  with pytest.raises(ValueError, match="schedule"):
    optim.make_optimizer(_optim(schedule="cosine_restarts"), 10, _params())


def test_cosine_schedule():
  o = _optim(schedule="cosine", lr=1e-3, warmup_steps=10, end_lr=1e-4)
  _, lr = optim.make_optimizer(o, 110, _params())
  steps = np.array([0, 5, 10, 35, 60, 85, 110, 150])
  frac = np.clip((steps - 10) / 100, 0, 1)
  ref = np.where(steps < 10, 1e-3 * steps / 10, 1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * frac)))
  np.testing.assert_allclose([float(lr(t)) for t in steps], ref, rtol=1e-5, atol=1e-12)
  # Warm-up longer than the run is cut to the run (as for "linear"); updates are finite.
  tx, lr = optim.make_optimizer(_optim(schedule="cosine", warmup_steps=50), 20, _params())
  _, lr_linear = optim.make_optimizer(_optim(schedule="linear", warmup_steps=50), 20, _params())
  assert [float(lr(t)) for t in (0, 10, 20)] == [float(lr_linear(t)) for t in (0, 10, 20)]
  assert float(lr(10)) == pytest.approx(5e-4)
  state = tx.init(_params())
  upd, _ = tx.update(_grads(_params(), 0), state, _params())
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(upd))
