"""A run killed with SIGKILL (or stopped by SIGTERM) resumes to the same parameters as an uninterrupted run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 8


def _cmd(tiny, shared_data, workdir):
  return tiny_bert.train_command(tiny, shared_data, workdir, TOTAL)


def _env(cache):
  env = dict(os.environ)
  env.update(
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  return env


def _steps(workdir):
  """Steps committed and hashed (checkpoints are asynchronous: a step without checksums is never used)."""
  d = workdir / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "checksums.json").exists())


def _run_until(cmd, env, workdir, step, sig, timeout=300):
  """Starts a run and sends `sig` once checkpoint `step` is complete; returns the exit code."""
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  t0 = time.time()
  while step not in _steps(workdir):
    if proc.poll() is not None or time.time() - t0 > timeout:
      out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
      proc.kill()
      pytest.fail(f"run ended (rc={proc.returncode}) before checkpoint {step}:\n{out[-3000:]}")
    time.sleep(0.02)
  proc.send_signal(sig)
  out = proc.communicate(timeout=timeout)[0].decode(errors="replace")
  return proc.returncode, out


def _params(workdir):
  return load_file(str(workdir / "encoder" / "params.safetensors"))


def test_kill_and_resume_equals_uninterrupted(tmp_path, minilm_path, shared_data):
  tiny = tiny_bert.write_tiny_bert(tmp_path / "tiny", minilm_path)
  env = _env(tmp_path / "jax_cache")  # the three runs compile the same step: compile once
  full, killed = tmp_path / "full", tmp_path / "killed"

  r = subprocess.run(_cmd(tiny, shared_data, full), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert _steps(full) == [2, 4, 6, 8]

  rc, out = _run_until(_cmd(tiny, shared_data, killed), env, killed, 2, signal.SIGKILL)
  assert rc == -signal.SIGKILL, out[-3000:]
  done = _steps(killed)
  assert done and max(done) < TOTAL and not (killed / "encoder").exists(), done

  rc, out = _run_until(_cmd(tiny, shared_data, killed), env, killed, max(done) + 2, signal.SIGTERM)
  assert rc == 143, out[-3000:]  # SIGTERM: a checkpoint is saved at the current step, then exit 143
  assert "SIGTERM: saved checkpoint" in out and f"resumed from checkpoint {max(done)}" in out, out[-3000:]
  after_term = _steps(killed)
  assert max(after_term) <= TOTAL

  r = subprocess.run(_cmd(tiny, shared_data, killed), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert f"resumed from checkpoint {max(after_term)}" in r.stdout
  a, b = _params(full), _params(killed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# A wrapper around launch/train.py that SIGKILLs itself at a chosen point: "write:<step>" while orbax
# writes checkpoint <step> (its files are in the temporary folder, not yet renamed into place),
# "hash:<step>" once orbax committed <step> and before its checksums are written (training goes on
# meanwhile: saves are asynchronous), or "saved:<step>" right after <step>'s checksums are written.
_KILLER = r"""
import os, runpy, signal, sys
where, step = os.environ["KILL_AT"].split(":")
from laspar_jax import checkpoint_integrity
from orbax.checkpoint._src.path import atomicity
if where == "write":
  orig_finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize(self, *a, **k):
    if os.path.basename(str(self._final_path)) == step:
      os.kill(os.getpid(), signal.SIGKILL)
    return await orig_finalize(self, *a, **k)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
else:
  orig_write = checkpoint_integrity.write_checksums
  def write_checksums(step_dir):
    hit = os.path.basename(str(step_dir)) == step
    if hit and where == "hash":
      os.kill(os.getpid(), signal.SIGKILL)
    out = orig_write(step_dir)
    if hit:
      os.kill(os.getpid(), signal.SIGKILL)
    return out
  checkpoint_integrity.write_checksums = write_checksums
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python launch/train.py` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _killed_at(cmd, env, where):
  r = subprocess.run(
    [sys.executable, "-c", _KILLER] + cmd[1:],
    env=dict(env, KILL_AT=where),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
  return r


def _array_file(step_dir):
  return max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def test_kill_points_and_corrupt_checkpoints_resume_equals_uninterrupted(tmp_path, minilm_path, shared_data):
  tiny = tiny_bert.write_tiny_bert(tmp_path / "tiny", minilm_path)
  env = _env(tmp_path / "jax_cache")
  full, run = tmp_path / "full", tmp_path / "run"
  r = subprocess.run(_cmd(tiny, shared_data, full), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  cmd = _cmd(tiny, shared_data, run)

  # 1. kill -9 during the first step (the data is ready, no checkpoint yet).
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if "[train] data:" in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=300)
  assert proc.returncode == -signal.SIGKILL and _steps(run) == []
  # 2. kill -9 while checkpoint 4 is being written: 2 stays the latest.
  _killed_at(cmd, env, "write:4")
  assert _steps(run) == [2]
  # 3. kill -9 once 4 is committed, before its checksums: 4 is there but never used.
  _killed_at(cmd, env, "hash:4")
  ckpts = run / "checkpoints"
  assert _steps(run) == [2] and (ckpts / "4").is_dir() and (ckpts / "4.unhashed").exists()
  # 4. the rerun sets 4 aside and resumes from 2; kill -9 just after 6 and its checksums, then flip bits in 6.
  r = _killed_at(cmd, env, "saved:6")
  assert "checkpoint 4 is unverified" in r.stderr and "4.unhashed" in r.stderr, r.stderr[-3000:]
  assert "resumed from checkpoint 2" in r.stdout
  assert _steps(run) == [2, 4, 6] and len([p for p in ckpts.iterdir() if ".unverified-" in p.name]) == 1
  data = _array_file(run / "checkpoints" / "6")
  b = bytearray(data.read_bytes())
  for at in (17, len(b) // 2, len(b) - 5):
    b[at] ^= 0x04
  data.write_bytes(bytes(b))
  # 5. the rerun sets 6 aside, resumes from 4; kill it after the new 6, then truncate 6's metadata.
  r = _killed_at(cmd, env, "saved:6")
  assert "checkpoint 6 is damaged" in r.stderr and data.name in r.stderr, r.stderr[-3000:]
  assert "resumed from checkpoint 4" in r.stdout
  meta = run / "checkpoints" / "6" / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes()[:4])
  # 6. the last rerun falls back to 4 again and finishes.
  r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "resumed from checkpoint 4" in r.stdout and "meta/metadata" in r.stderr, r.stderr[-3000:]
  assert len([p for p in (run / "checkpoints").iterdir() if ".corrupt-" in p.name]) == 2
  a, b = _params(full), _params(run)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
  steps = [r_["step"] for r_ in rows if "train/loss" in r_]
  assert steps == sorted(set(steps)) and steps[-1] == TOTAL  # kept across kills, no duplicates
