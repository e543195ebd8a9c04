"""Asynchronous checkpoints: `save` returns before the write, no step is used before its checksums exist."""

import errno
import logging
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laspar_jax import checkpoint_integrity, checkpointing, io_utils


def _state(v):
  return {
    "params": {"w": jnp.arange(4096.0).reshape(64, 64) * 1.37 + v, "b": jnp.arange(3.0) + v},
    "step": jnp.int32(v),
  }


def _target():
  return jax.tree.map(jnp.zeros_like, _state(0))


@pytest.fixture
def held_hashing(monkeypatch):
  """Holds the hashing thread after orbax's commit and before the checksum write (the kill window)."""
  reached, release = threading.Event(), threading.Event()
  orig = checkpoint_integrity.write_checksums

  def write_checksums(step_dir):
    reached.set()
    assert release.wait(60)
    return orig(step_dir)

  monkeypatch.setattr(checkpoint_integrity, "write_checksums", write_checksums)
  yield reached, release
  release.set()


def test_save_returns_before_commit_then_hashes(tmp_path, held_hashing):
  """The marker exists until the checksums do; the saved arrays may be deleted (donated) once `save` returns."""
  reached, release = held_hashing
  d = tmp_path / "ck"
  ck = checkpointing.Checkpointer(d, every=1, keep=0, async_save=True)
  st = _state(3)
  ref = jax.tree.map(np.asarray, st)
  ck.save(3, st, {"data": {"pos": 3}})
  assert (d / "3.unhashed").exists()
  jax.tree.map(lambda x: x.delete(), st)  # what donation does to the training state
  assert reached.wait(60)  # orbax committed 3; its checksums are held
  assert (d / "3").is_dir() and not (d / "3" / "checksums.json").exists() and (d / "3.unhashed").exists()
  release.set()
  ck.wait()
  assert (d / "3" / "checksums.json").exists() and not (d / "3.unhashed").exists()
  assert checkpoint_integrity.verify(d / "3") is None
  got, meta, step = ck.restore(_target())
  ck.close()
  assert step == 3 and meta == {"data": {"pos": 3}}
  jax.tree.map(np.testing.assert_array_equal, got, ref)


def test_killed_before_hashing_is_set_aside(tmp_path, held_hashing, caplog):
  """A copy of the folder taken in the kill window (step 2 committed, not hashed): 2 is set aside, 1 restored."""
  reached, release = held_hashing
  d, killed = tmp_path / "ck", tmp_path / "killed"
  ck = checkpointing.Checkpointer(d, every=1, keep=0, async_save=True)
  release.set()
  ck.save(1, _state(1), {"data": {"pos": 1}})
  ck.wait()
  reached.clear()
  release.clear()
  ck.save(2, _state(2), {"data": {"pos": 2}})
  assert reached.wait(60)
  shutil.copytree(d, killed)  # what a kill -9 now leaves on disk
  release.set()
  ck.close()
  assert sorted(p.name for p in killed.iterdir()) == ["1", "2", "2.unhashed"]

  ck = checkpointing.Checkpointer(killed, every=1, keep=0)
  with pytest.raises(checkpointing.CheckpointCorruptError, match="never hashed"):
    ck.restore(_target(), step=2)
  with caplog.at_level(logging.WARNING):
    got = ck.restore_latest(_target())
  ck.close()
  assert got is not None and got[2] == 1 and got[1] == {"data": {"pos": 1}}
  np.testing.assert_array_equal(got[0]["params"]["w"], _state(1)["params"]["w"])
  aside = [p.name for p in killed.iterdir() if p.name.startswith("2.unverified-")]
  assert len(aside) == 1 and not (killed / "2").exists() and not (killed / "2.unhashed").exists()
  assert "checkpoint 2 is unverified" in caplog.text and str(killed / "2.unhashed") in caplog.text
  assert aside[0] in caplog.text
  assert list(ck.damaged) == [2]


def test_stale_markers(tmp_path):
  """A marker without its folder (killed before orbax's commit) is removed; one beside checksums (killed
  between the checksum write and the marker's removal) is dropped and the step used."""
  d = tmp_path / "ck"
  ck = checkpointing.Checkpointer(d, every=1, keep=0, async_save=True)
  for s in (1, 2):
    ck.save(s, _state(s), {"data": {"pos": s}})
  ck.close()
  (d / "2.unhashed").write_text("")
  (d / "3.unhashed").write_text("")
  ck = checkpointing.Checkpointer(d, every=1, keep=0)
  assert ck.restore(_target())[2] == 2
  ck.close()
  assert sorted(p.name for p in d.iterdir()) == ["1", "2"]


def test_legacy_step_without_marker_still_verified(tmp_path):
  d = tmp_path / "ck"
  ck = checkpointing.Checkpointer(d, every=1, keep=0, async_save=True)
  ck.save(1, _state(1), {"data": {"pos": 1}})
  ck.close()
  (d / "1" / "checksums.json").unlink()  # an older version's step: no checksums, no marker
  ck = checkpointing.Checkpointer(d, every=1, keep=0)
  assert ck.restore(_target())[2] == 1
  ck.close()
  assert (d / "1" / "checksums.json").exists()


def test_hashing_error_raised_by_the_next_call(tmp_path, monkeypatch):
  def full(step_dir):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoint_integrity, "write_checksums", full)
  d = tmp_path / "ck"
  ck = checkpointing.Checkpointer(d, every=1, keep=0, async_save=True)
  ck.save(1, _state(1), {"data": {"pos": 1}})
  with pytest.raises(io_utils.DiskFullError, match="checkpoint 1"):
    ck.wait()
  ck.wait()  # raised once
  ck.close()
  assert (d / "1.unhashed").exists()  # the step stays unverified: never used


def test_speed_benchmark_runs(tmp_path):
  """benchmarks/checkpoint_speed.py on a 2 MB state (the path only; its figures are for people)."""
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  import checkpoint_speed

  out = checkpoint_speed.main(["--mb", "2", "--repeats", "1", "--dir", str(tmp_path)])
  assert out["state_mb"] == pytest.approx(2.0, rel=0.1)
  assert out["sync_save_s"] > 0 and 0 < out["async_save_s"] <= out["async_until_hashed_s"]
