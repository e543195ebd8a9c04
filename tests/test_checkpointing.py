"""Checkpointer: sharded save/restore roundtrip with metadata, keep-last-K, intervals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from laspar_jax import checkpointing, mesh as mesh_lib


def _state(mesh):
  w = jax.device_put(
    jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16), mesh_lib.logical_to_sharding(mesh, (None, "sparse"))
  )
  params = {"layers": {0: {"w": w}}, "b": jnp.ones((3,))}
  tx = optax.adamw(1e-3)
  return {"params": params, "opt": tx.init(params), "step": jnp.int32(7), "rng": jax.random.key_data(jax.random.key(3))}


def test_roundtrip_keeps_values_shardings_and_meta(tmp_path):
  mesh = mesh_lib.make_mesh(2, 4)
  st = _state(mesh)
  ck = checkpointing.Checkpointer(tmp_path / "ck", every=2, keep=2)
  assert ck.latest_step() is None and ck.should_save(4) and not ck.should_save(3)
  for step in (2, 4, 6):
    ck.save(step, st, {"data": {"epoch": 1, "step": step}})
  assert ck.all_steps() == [4, 6]  # keeps the last 2
  target = jax.tree.map(jnp.zeros_like, st)
  got, meta, step = ck.restore(target)
  assert step == 6 and meta == {"data": {"epoch": 1, "step": 6}}
  jax.tree.map(np.testing.assert_array_equal, got, st)
  w = got["params"]["layers"][0]["w"]
  assert w.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  got4, meta4, _ = ck.restore(target, step=4)
  assert meta4["data"]["step"] == 4
  ck.close()
  with pytest.raises(FileNotFoundError):
    checkpointing.Checkpointer(tmp_path / "empty", every=1).restore(target)
