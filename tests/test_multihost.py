"""Multi-process JAX on one machine: two processes (4 CPU devices each, one mesh of 8) against one process.

(a) `launch/train.py --jax_distributed`: disjoint data shares, collective orbax
    checkpoints, process 0 killed with SIGKILL after a checkpoint (the other
    stops by itself), both restarted: the final parameters equal, bit for bit,
    those of one 8-device process trained for the same steps with the same
    collectives (gloo).
(b) `launch/index.py --jax_distributed`: each process encodes its share into
    its own part, process 0 merges: the index equals, array for array, the
    one a single process builds.
Plus fast in-process checks of `distributed.share` and `index.merge`.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax import distributed  # noqa: E402
from laspar_jax.index import IndexWriter  # noqa: E402
from laspar_jax.index import format as fmt  # noqa: E402
from laspar_jax.index import merge  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 4
N_DOCS = 1200  # documents of SciFact indexed (first ones, corpus order)


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cache, devices):
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  return env


def _dist(port, n, i):
  return [
    "--jax_distributed",
    f"--coordinator_address=127.0.0.1:{port}",
    f"--num_processes={n}",
    f"--process_id={i}",
    "--heartbeat_timeout_seconds=30",  # a loaded machine delays heartbeats; a killed peer is still noticed
  ]


def _train_cmd(tiny, shared_data, workdir):
  return tiny_bert.train_command(tiny, shared_data, workdir, TOTAL)


def _start(cmd, env, log):
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)


STALL = 900  # seconds without any new output from the processes before a wait gives up (a busy machine is slow)
GLOO_INIT = "Gloo context initialization failed"  # gloo's fixed 30 s rendezvous: the peers started far apart


def _size(logs):
  return sum(pathlib.Path(log).stat().st_size for log in logs if pathlib.Path(log).exists())


def _wait(procs, logs, until=None):
  """Waits for `procs` to end (or `until()` to hold), keyed on progress: it gives up only when the logs
  have not grown for STALL seconds, never on a fixed deadline shorter than a slow step."""
  last, t_last = _size(logs), time.time()
  while not (until() if until else all(p.poll() is not None for p in procs)):
    if until and any(p.poll() is not None for p in procs):
      return None
    size = _size(logs)
    if size != last:
      last, t_last = size, time.time()
    elif time.time() - t_last > STALL:
      for q in procs:
        q.kill()
      pytest.fail(f"no progress for {STALL} s:\n" + _tail(*logs))
    time.sleep(0.05)
  return [p.returncode for p in procs]


def _run_pair(cmd_of, env, logs, retries=2):
  """Starts the processes of one multi-process run and waits; a run that failed in gloo's 30 s
  rendezvous (processes far apart on a loaded machine) is started again (it resumes)."""
  for attempt in range(retries + 1):
    port = _port()
    procs = [_start(cmd_of(port, i), env, logs[i]) for i in range(len(logs))]
    rcs = _wait(procs, logs)
    if rcs == [0] * len(logs) or attempt == retries or not any(GLOO_INIT in pathlib.Path(x).read_text() for x in logs):
      return rcs
  return rcs


def _tail(*logs):
  return "\n=====\n".join(pathlib.Path(log).read_text()[-2500:] for log in logs)


def _checkpointed(workdir, step):
  return (workdir / "checkpoints" / str(step) / "checksums.json").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm_path, shared_data):
  """(a) runs the trainings; returns (tmp, reference workdir, two-process workdir, logs)."""
  tmp = tmp_path_factory.mktemp("multihost")
  tiny = tiny_bert.write_tiny_bert(tmp / "tiny", minilm_path)
  one, two = tmp / "one", tmp / "two"
  env4 = _env(tmp / "cache", 4)
  # The reference: one process, 8 devices, the same CPU collectives (gloo through jax.distributed).
  ref = _start(_train_cmd(tiny, shared_data, one) + _dist(_port(), 1, 0), _env(tmp / "cache", 8), tmp / "one.log")
  port = _port()
  logs = [tmp / f"two{i}.log" for i in range(2)]
  procs = [_start(_train_cmd(tiny, shared_data, two) + _dist(port, 2, i), env4, logs[i]) for i in range(2)]
  if _wait(procs, logs, until=lambda: _checkpointed(two, 2)) is None:
    for p in procs + [ref]:
      p.kill()
    pytest.fail("the two-process run ended before checkpoint 2:\n" + _tail(*logs))
  procs[0].send_signal(signal.SIGKILL)  # process 0: the coordinator and the only writer of logs
  rcs = _wait(procs, logs)  # process 1 must stop by itself
  killed = {
    "rcs": rcs,
    "steps": sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()),
    "encoder": (two / "encoder").exists(),
  }
  rcs = _run_pair(lambda port, i: _train_cmd(tiny, shared_data, two) + _dist(port, 2, i), env4, logs)
  assert rcs == [0, 0], _tail(*logs)
  assert _wait([ref], [tmp / "one.log"]) == [0], _tail(tmp / "one.log")
  return tmp, one, two, logs, killed


def test_two_processes_train_kill_resume_equals_one_process(trained):
  tmp, one, two, logs, killed = trained
  assert killed["rcs"][0] == -signal.SIGKILL and killed["rcs"][1] != 0, killed
  assert 2 in killed["steps"] and TOTAL not in killed["steps"] and not killed["encoder"], killed
  out0, out1 = (pathlib.Path(log).read_text() for log in logs)
  assert "resumed from checkpoint 2" in out0, out0[-3000:]
  assert "[train]" not in out1, out1[-3000:]  # only process 0 reports
  assert f"step {TOTAL}" in out0 and f"step {TOTAL}" in out1
  # Only process 0 writes logs: one history line per logged step, the encoder once.
  steps = [json.loads(line)["step"] for line in (two / "history.jsonl").read_text().splitlines()]
  assert steps == [2, 4], steps
  a, b = load_file(str(one / "encoder" / "params.safetensors")), load_file(str(two / "encoder" / "params.safetensors"))
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _small_scifact(shared_data, dst):
  dst.mkdir()
  src = shared_data / "scifact"
  with open(src / "corpus.jsonl") as f:
    lines = [next(f) for _ in range(N_DOCS)]
  (dst / "corpus.jsonl").write_text("".join(lines))
  os.symlink(src / "queries.jsonl", dst / "queries.jsonl")  # no qrels: they name documents left out
  return dst


def test_two_processes_index_equals_one_process(trained, shared_data):
  tmp = trained[0]
  coll = _small_scifact(shared_data, tmp / "scifact_small")

  def cmd(index):
    return [
      sys.executable,
      str(REPO / "launch" / "index.py"),
      "--encoder",
      str(trained[1] / "encoder"),
      "--collection",
      str(coll),
      "--index",
      str(index),
      "--k_doc",
      "64",
      "--batch_size",
      "8",
    ]

  port = _port()
  logs = [tmp / "ix_one.log", tmp / "ix_two0.log", tmp / "ix_two1.log"]
  procs = [_start(cmd(tmp / "ix_one"), _env(tmp / "cache", 4), logs[0])]
  procs += [_start(cmd(tmp / "ix_two") + _dist(port, 2, i), _env(tmp / "cache", 4), logs[1 + i]) for i in range(2)]
  assert _wait(procs, logs) == [0, 0, 0], _tail(*logs)
  assert "index written" in logs[1].read_text() and "index written" not in logs[2].read_text()
  assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("ix_two")) == [
    "ix_two",
    "ix_two0.log",
    "ix_two1.log",
  ]
  a, b = fmt.read_manifest(tmp / "ix_one"), fmt.read_manifest(tmp / "ix_two")
  assert a["n_docs"] == b["n_docs"] == N_DOCS and b["metadata"]["hosts"] == 2
  for key in ("dim", "n_postings", "value_dtype", "quant_scale", "encoder_hash", "approx"):
    assert a[key] == b[key], key
  assert a["metadata"]["encoder_params"] == b["metadata"]["encoder_params"]
  assert sorted(a["files"]) == sorted(b["files"])
  for name in a["files"]:  # doc ids, doc lengths, offsets, every posting's row and weight
    np.testing.assert_array_equal(np.load(tmp / "ix_one" / name), np.load(tmp / "ix_two" / name), err_msg=name)
    assert a["files"][name] == b["files"][name], name


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("n,count,align", [(0, 2, 1), (5, 3, 1), (1200, 2, 128), (100, 4, 128), (1000, 3, 7)])
def test_share_covers_in_order(n, count, align):
  blocks = [distributed.share(n, i, count, align) for i in range(count)]
  assert blocks[0][0] == 0 and blocks[-1][1] == n
  for (lo, hi), (lo2, _) in zip(blocks, blocks[1:]):
    assert lo <= hi == lo2
  for lo, hi in blocks[:-1]:
    assert hi % align == 0 or hi == n


@pytest.mark.parametrize("value_dtype,approx", [("float32", False), ("float16", True), ("uint8", False)])
def test_merged_parts_equal_one_writer(tmp_path, value_dtype, approx):
  rng = np.random.default_rng(0)
  dim, k = 300, 12
  batches = []
  for b in range(9):
    n = int(rng.integers(1, 20))
    idx = np.stack([rng.choice(dim, k, replace=False) for _ in range(n)]).astype(np.int32)
    val = rng.random((n, k)).astype(np.float32) * (rng.random((n, k)) > 0.2)
    batches.append(([f"d{b}-{i}" for i in range(n)], idx, val))
  kw = dict(
    value_dtype=value_dtype,
    approx=approx,
    quant_scale=0.01 if approx and value_dtype == "uint8" else None,
    ram_budget_bytes=3000,
    encoder_hash="h",
  )  # a tiny budget: several runs per part
  with IndexWriter(tmp_path / "one", dim, **kw) as w:
    for batch in batches:
      w.add(*batch)
  parts = []
  for p, (lo, hi) in enumerate([(0, 3), (3, 3), (3, 9)]):  # part 1 holds no document
    parts.append(merge.part_dir(tmp_path / "parts", p))
    with merge.PartWriter(parts[-1], dim, **kw) as w:
      for batch in batches[lo:hi]:
        w.add(*batch)
  merge.merge_parts(parts, tmp_path / "merged", ram_budget_bytes=3000)
  a, b = fmt.read_manifest(tmp_path / "one"), fmt.read_manifest(tmp_path / "merged")
  assert a["n_docs"] == b["n_docs"] and a["quant_scale"] == b["quant_scale"]
  assert a["files"] == b["files"]  # sizes and blake2b of every array
  assert not any(p.exists() for p in parts)
