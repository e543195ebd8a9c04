r"""Checkpoint save: how long the train loop waits, asynchronous vs synchronous, for a state of a given size.

  python benchmarks/checkpoint_speed.py               # ~200 MB of float32 arrays, 3 saves each way
  python benchmarks/checkpoint_speed.py --mb 20 --repeats 2

`Checkpointer.save` with `async_save=False` returns once the step is written,
committed and hashed; with `async_save=True` it returns once the arrays are
on the host (orbax writes and commits in its thread, ours hashes after).
Printed per mode: the median seconds `save` blocks, and for async also the
median seconds until `wait` returns (save + background write + hash); the
ratio async / sync blocking time is what the loop gains (below 1: it waits
less). Each save goes to a fresh step of one folder under --dir (a temporary
one by default), with the same state (arrays sharded over the devices).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from laspar_jax import checkpointing  # noqa: E402


def make_state(mb: float) -> dict[str, jax.Array]:
  """A parameter-like pytree of float32 arrays totalling about `mb` megabytes, sharded over all devices."""
  n = len(jax.devices())
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  rows = max(n, int(mb * 2**20 / 4 / 1024) // 4 // n * n)  # 4 arrays of (rows, 1024)
  key = jax.random.key(0)
  return {
    f"w{i}": jax.device_put(jax.random.normal(jax.random.fold_in(key, i), (rows, 1024), jnp.float32), sharding)
    for i in range(4)
  }


def measure(root: Path, state: dict[str, jax.Array], *, async_save: bool, repeats: int) -> dict[str, float]:
  """Median seconds `save` blocks (and, async, until `wait` returns) over `repeats` saves."""
  ck = checkpointing.Checkpointer(root / ("async" if async_save else "sync"), every=1, keep=2, async_save=async_save)
  blocked, total = [], []
  try:
    for step in range(1, repeats + 1):
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      ck.save(step, state, {"step": step})
      blocked.append(time.perf_counter() - t0)
      ck.wait()
      total.append(time.perf_counter() - t0)
  finally:
    ck.close()
  return {"save_blocks_s": statistics.median(blocked), "until_hashed_s": statistics.median(total)}


def main(argv: list[str] | None = None) -> dict[str, float]:
  """Runs both modes and prints one line each and the ratio; returns the figures."""
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mb", type=float, default=200.0, help="state size in megabytes")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dir", default="", help="where to write (default: a temporary folder)")
  args = ap.parse_args(argv)
  state = make_state(args.mb)
  size_mb = sum(x.nbytes for x in state.values()) / 2**20
  with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
    sync = measure(Path(tmp), state, async_save=False, repeats=args.repeats)
    asy = measure(Path(tmp), state, async_save=True, repeats=args.repeats)
  out = {
    "state_mb": round(size_mb, 1),
    "devices": len(jax.devices()),
    "platform": jax.devices()[0].platform,
    "sync_save_s": sync["save_blocks_s"],
    "async_save_s": asy["save_blocks_s"],
    "async_until_hashed_s": asy["until_hashed_s"],
    "async_over_sync": asy["save_blocks_s"] / sync["save_blocks_s"],
  }
  print(f"state {out['state_mb']} MB on {out['devices']} {out['platform']} devices, median of {args.repeats}")
  print(f"  sync  save blocks {out['sync_save_s']:.3f} s (written, committed, hashed)")
  print(
    f"  async save blocks {out['async_save_s']:.3f} s; written and hashed after {out['async_until_hashed_s']:.3f} s"
  )
  print(f"  async / sync blocking time: {out['async_over_sync']:.3f}")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
