"""A run killed with SIGKILL (or stopped by SIGTERM) resumes to the same parameters as an uninterrupted run."""
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
  over = {
      "model.backbone": tiny, "model.latent_dim": 512, "model.query_max_len": 16, "model.doc_max_len": 32,
      "data.collection": shared_data / "scifact", "data.teacher": "none", "loss.distill": "",
      "optim.batch_size": 8, "optim.warmup_steps": 2, "train.total_steps": TOTAL,
      "train.checkpoint_every": 2, "train.keep_checkpoints": 0, "train.log_every": 2,
      "train.final_eval": False, "train.dropout": False, "train.q_topk": 64, "train.d_topk": 128,
  }
  return [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "laspar.py:runlocal"),
          "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in over.items()]


def _env(cache):
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return env


def _steps(workdir):
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


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
