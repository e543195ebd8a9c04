r"""Persistent compilation cache: the smoke run's compile time cold vs warm, two fresh processes.

  python benchmarks/compile_cache.py            # configs/laspar.py:runlocal (all-MiniLM-L6-v2), 3 steps
  python benchmarks/compile_cache.py --tiny     # a tiny random BERT (a quick check of the code path)

Each run is a subprocess of `train_lib.train_and_evaluate` (no evaluation)
with `$LASPAR_COMPILATION_CACHE` pointing at the same fresh folder: the
first fills it (cold), the second reads it (warm). The compile time is the
first train step's wall time (trace + compile + one step) minus the median
of the later steps; the teacher's embedding function goes through the same
cache and counts in the wall time. Must hold: warm <= 0.5 x cold.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The child: trains `steps` steps with the step function timed per call (blocked), prints one JSON line.
_CHILD = r"""
import json, sys, tempfile, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
import jax
import loop_overhead
from laspar_jax import platform, train_lib, train_step
t_start = time.perf_counter()
c = loop_overhead.smoke_config({steps}, 1, 0, tiny={tiny})
orig, times = train_step.make_train_step, []
def make(*a, **k):
  f = orig(*a, **k)
  def timed(s, b):
    t = time.perf_counter()
    out = f(s, b)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
    return out
  timed.lower = f.lower
  return timed
train_step.make_train_step = make
train_lib.train_and_evaluate(c, tempfile.mkdtemp(prefix="compile_cache_run_"))
print("RESULT " + json.dumps({{"cache": platform.compilation_cache_dir(), "step_times": times,
                               "wall_s": time.perf_counter() - t_start}}), flush=True)
"""


def run_once(cache_dir: str, steps: int, tiny: bool) -> dict:
  """One training subprocess with the cache at `cache_dir`; its step times and wall time."""
  code = _CHILD.format(repo=str(REPO), bench=str(REPO / "benchmarks"), steps=steps, tiny=tiny)
  env = dict(os.environ, LASPAR_COMPILATION_CACHE=cache_dir)
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"the training subprocess failed:\n{proc.stderr[-4000:]}")
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  res = json.loads(line[len("RESULT ") :])
  later = sorted(res["step_times"][1:])
  res["compile_s"] = res["step_times"][0] - (later[len(later) // 2] if later else 0.0)
  res["process_s"] = time.perf_counter() - t
  return res


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one)")
  args = ap.parse_args()
  cache = args.cache or tempfile.mkdtemp(prefix="laspar_jax_cache_")
  cold = run_once(cache, args.steps, args.tiny)
  warm = run_once(cache, args.steps, args.tiny)
  entries = sum(1 for _ in pathlib.Path(cache).rglob("*") if _.is_file())
  print(f"cache {cache} ({entries} files)  config: configs/laspar.py:runlocal{' (tiny BERT)' if args.tiny else ''}")
  print(f"{'run':<6}{'compile s':>11}{'first step s':>14}{'process s':>11}")
  for name, r in (("cold", cold), ("warm", warm)):
    print(f"{name:<6}{r['compile_s']:>11.2f}{r['step_times'][0]:>14.2f}{r['process_s']:>11.1f}")
  ratio = warm["compile_s"] / max(cold["compile_s"], 1e-9)
  print(f"warm / cold compile = {ratio:.3f}  (must hold: <= 0.5)")


if __name__ == "__main__":
  main()
