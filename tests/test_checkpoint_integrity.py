"""Checkpoint checksums: bit flips and truncations are caught, the bad step is set aside, restore falls back."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laspar_jax import checkpoint_integrity, checkpointing


def _state(v):
  return {
    "params": {"w": jnp.arange(4096.0).reshape(64, 64) * 1.37 + v, "b": jnp.arange(3.0) + v},
    "step": jnp.int32(v),
  }


def _saved(tmp_path, steps=(1, 2), **kw):
  ck = checkpointing.Checkpointer(tmp_path / "ck", every=1, keep=0, **kw)
  for s in steps:
    ck.save(s, _state(s), {"data": {"pos": s}})
  ck.close()
  return tmp_path / "ck"


def _biggest(step_dir):
  """The largest array data file (orbax OCDBT data files live under `d/` folders)."""
  return max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def _flip(path, at):
  b = bytearray(path.read_bytes())
  b[at] ^= 0x10
  path.write_bytes(bytes(b))


def _restore(d):
  ck = checkpointing.Checkpointer(d, every=1, keep=0)
  try:
    return ck.restore(jax.tree.map(jnp.zeros_like, _state(0)))
  finally:
    ck.close()


def test_checksums_written_for_every_file(tmp_path):
  d = _saved(tmp_path)
  sums = json.loads((d / "2" / "checksums.json").read_text())["files"]
  files = {str(p.relative_to(d / "2")) for p in (d / "2").rglob("*") if p.is_file()} - {"checksums.json"}
  assert set(sums) == files and "meta/metadata" in files
  assert checkpoint_integrity.verify(d / "2") is None


def test_async_saves_get_checksums_when_finalised(tmp_path):
  d = _saved(tmp_path, async_save=True)
  assert (d / "1" / "checksums.json").exists() and (d / "2" / "checksums.json").exists()


def test_bit_flips_fall_back_to_previous_and_set_aside(tmp_path, caplog):
  d = _saved(tmp_path)
  bad = _biggest(d / "2")
  for at in (100, 1000, 3000):
    _flip(bad, min(at, bad.stat().st_size - 1))
  with caplog.at_level(logging.WARNING):
    state, meta, step = _restore(d)
  assert step == 1 and meta == {"data": {"pos": 1}}
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  aside = [p.name for p in d.iterdir() if p.name.startswith("2.corrupt-")]
  assert len(aside) == 1 and not (d / "2").exists()  # kept, renamed, never deleted
  assert bad.name in caplog.text and "blake2b" in caplog.text and "checkpoint 2 is damaged" in caplog.text
  assert _restore(d)[2] == 1  # the next run restores 1 directly


def test_truncated_metadata_named_and_fallback(tmp_path, caplog):
  d = _saved(tmp_path)
  meta = d / "2" / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes()[:5])
  ck = checkpointing.Checkpointer(d, every=1, keep=0)
  with pytest.raises(checkpointing.CheckpointCorruptError, match=r"meta/metadata: 5 bytes"):
    ck.restore(jax.tree.map(jnp.zeros_like, _state(0)), step=2)
  ck.close()
  with caplog.at_level(logging.WARNING):
    assert _restore(d)[2] == 1
  assert "meta/metadata" in caplog.text


def test_unverified_step_one_clear_error(tmp_path, capfd):
  """A step without checksums (older run) with a truncated array: one error, no asyncio cascade."""
  d = _saved(tmp_path)
  for s in ("1", "2"):
    (d / s / "checksums.json").unlink()
  bad = _biggest(d / "2")
  bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
  ck = checkpointing.Checkpointer(d, every=1, keep=0)
  with pytest.raises(checkpointing.CheckpointCorruptError, match=r"cannot be restored and has no checksums"):
    ck.restore(jax.tree.map(jnp.zeros_like, _state(0)), step=2)
  assert ck.restore(jax.tree.map(jnp.zeros_like, _state(0)))[2] == 1
  ck.close()
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and err.count("Traceback") == 0, err[-3000:]


def test_truncated_metadata_without_checksums_named(tmp_path):
  d = _saved(tmp_path)
  (d / "2" / "checksums.json").unlink()
  meta = d / "2" / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes()[:5])
  problem = checkpoint_integrity.verify(d / "2")
  assert problem.startswith(str(meta)) and "not valid JSON" in problem
  assert _restore(d)[2] == 1


def _nan_flip(step_dir):
  """Turns float32 values of the biggest array file into NaN (exponent bits set), keeping its size."""
  path = _biggest(step_dir)
  b = bytearray(path.read_bytes())
  for at in range(len(b) // 2, len(b) - 4, 64):
    b[at + 3] |= 0x7F
    b[at + 2] |= 0x80
  path.write_bytes(bytes(b))


def test_step_without_checksums_verified_then_checksummed(tmp_path, caplog):
  """A run killed between orbax's commit and the checksum write: the step is checked before use and
  gets its checksums, so damage after that is caught like in any other step."""
  d = _saved(tmp_path)
  (d / "2" / "checksums.json").unlink()  # the kill window
  with caplog.at_level(logging.WARNING):
    state, _, step = _restore(d)
  assert step == 2 and "has no checksums.json" in caplog.text and "written now" in caplog.text
  np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
  assert (d / "2" / "checksums.json").exists() and checkpoint_integrity.verify(d / "2") is None
  _flip(_biggest(d / "2"), 200)  # damaged later: now caught by the checksums
  assert _restore(d)[2] == 1


def test_step_without_checksums_holding_nan_is_set_aside(tmp_path, caplog):
  d = _saved(tmp_path)
  (d / "2" / "checksums.json").unlink()
  _nan_flip(d / "2")
  ck = checkpointing.Checkpointer(d, every=1, keep=0)
  with pytest.raises(checkpointing.CheckpointCorruptError, match=r"no checksums.json and holds \d+ NaN/inf"):
    ck.restore(jax.tree.map(jnp.zeros_like, _state(0)), step=2)
  with caplog.at_level(logging.WARNING):
    assert ck.restore(jax.tree.map(jnp.zeros_like, _state(0)))[2] == 1
  assert list(ck.damaged) == [2] and "NaN/inf" in caplog.text
  ck.close()
