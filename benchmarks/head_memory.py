"""Peak memory and step time of the latent_max head, tiled vs untiled.

Forward + backward (grads of U, b and h) of `LatentMaxHead` on random hidden
states. For each configuration the script prints XLA's compiled memory analysis
(temp = scratch the step allocates besides its inputs/outputs) next to
B*L*D*4 bytes, the size of the [B, L, D] float32 tensor the untiled form
materializes, and the process's peak RSS (each configuration runs in its own
subprocess).

  python benchmarks/head_memory.py            # default set (< 5 min on 2 cores)
  python benchmarks/head_memory.py --one 8,128,65536,4096,remat  # one config: B,L,D,tile,backward

Reference run (shared 2-core AVX2 CPU, 24 GiB; wall 4 min; other jobs were
running, so step times are noisy):

  latent_max forward+backward, d=384, jax 0.10.2, cpu x1
    B    L        D  tile    bwd | B*L*D*4 GiB temp GiB args GiB  out GiB   U GiB peakRSS GiB |  step s compile s
    8  128    65536  None      - |       0.250    1.250    0.095    0.095   0.094       1.930 |  11.099      1.22
    8  128    65536  4096  remat |       0.250    0.074    0.095    0.095   0.094       0.632 |   8.375      1.27
    8  128    65536  4096 argmax |       0.250    0.074    0.095    0.095   0.094       0.607 |   6.289      3.19
    8  128  1048576  4096 argmax |       4.000    0.156    1.505    1.505   1.500       3.580 | 133.078      23.2

temp is XLA's scratch for the step (arguments/outputs are U, b, h and their
gradients). Untiled temp = 5 x B*L*D*4 (z, its mask and the activations kept
for the backward pass); tiled temp is O(B*L*tile + B*D) and does not grow with
B*L*D: at D = 2^20 it is 0.156 GiB against the 4 GiB of one [B, L, D] tensor.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laspar_jax.models import heads

D_MODEL = 384
CONFIGS = (  # B, L, D, tile (None = untiled), backward
  (8, 128, 2**16, None, "remat"),
  (8, 128, 2**16, 4096, "remat"),
  (8, 128, 2**16, 4096, "argmax"),
  (8, 128, 2**20, 4096, "argmax"),
)


def run_one(B: int, L: int, D: int, tile: int | None, backward: str, steps: int) -> dict:
  head = heads.LatentMaxHead(D_MODEL, D, tile=tile, backward=backward, rngs=nnx.Rngs(0))
  gdef, state = nnx.split(head)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(B, L, D_MODEL)), jnp.float32)
  m = jnp.asarray(np.arange(L)[None, :] < rng.integers(L // 2, L + 1, size=(B, 1)), jnp.int32)
  w = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)

  def loss(state, h):
    return jnp.sum(nnx.merge(gdef, state)(h, m) * w)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  t0 = time.perf_counter()
  compiled = step.lower(state, h).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, h))
    times.append(time.perf_counter() - t0)
  return {
    "B": B,
    "L": L,
    "D": D,
    "tile": tile,
    "backward": backward if tile else "-",
    "temp_bytes": int(ma.temp_size_in_bytes),
    "argument_bytes": int(ma.argument_size_in_bytes),
    "output_bytes": int(ma.output_size_in_bytes),
    "BLD_f32_bytes": B * L * D * 4,
    "U_bytes": D_MODEL * D * 4,
    "compile_s": round(compile_s, 2),
    "step_s": round(min(times), 3),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def _gib(x: int) -> str:
  return f"{x / 2**30:7.3f}"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--one", help="B,L,D,tile,backward (tile 'none' = untiled): run one config, print JSON")
  ap.add_argument("--steps", type=int, default=0, help="timed steps (default: 1 at D>=2^20, else 3)")
  args = ap.parse_args()
  if args.one:
    B, L, D, tile, backward = args.one.split(",")
    B, L, D = int(B), int(L), int(D)
    steps = args.steps or (1 if D >= 2**20 else 2)
    print(json.dumps(run_one(B, L, D, None if tile == "none" else int(tile), backward, steps)))
    return
  rows = []
  for B, L, D, tile, backward in CONFIGS:
    cmd = [sys.executable, __file__, "--one", f"{B},{L},{D},{tile or 'none'},{backward}"]
    if args.steps:
      cmd += ["--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"done B={B} L={L} D={D} tile={tile} {backward}: step {r['step_s']} s", file=sys.stderr)
  print(
    f"latent_max forward+backward, d={D_MODEL}, jax {jax.__version__}, "
    f"{jax.devices()[0].platform} x{len(jax.devices())}"
  )
  print(
    f"{'B':>3} {'L':>4} {'D':>8} {'tile':>5} {'bwd':>6} | {'B*L*D*4 GiB':>11} {'temp GiB':>8} "
    f"{'args GiB':>8} {'out GiB':>8} {'U GiB':>7} {'peakRSS GiB':>11} | {'step s':>7} {'compile s':>9}"
  )
  for r in rows:
    print(
      f"{r['B']:>3} {r['L']:>4} {r['D']:>8} {str(r['tile']):>5} {r['backward']:>6} | {_gib(r['BLD_f32_bytes']):>11} "
      f"{_gib(r['temp_bytes']):>8} {_gib(r['argument_bytes']):>8} {_gib(r['output_bytes']):>8} "
      f"{_gib(r['U_bytes']):>7} {_gib(r['peak_rss_bytes']):>11} | {r['step_s']:>7} {r['compile_s']:>9}"
    )
  for r in rows:
    if r["tile"] is not None:
      assert r["temp_bytes"] < r["BLD_f32_bytes"], "tiled head materialized B x L x D"


if __name__ == "__main__":
  main()
