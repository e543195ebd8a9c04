r"""Train-loop overhead: steady-state step time of the real loop vs the bare jitted step, same batches, same process.

  python benchmarks/loop_overhead.py                     # the smoke config (configs/laspar.py:runlocal), 30 steps
  python benchmarks/loop_overhead.py --steps 60 --log_every 10 --checkpoint_every 20
  python benchmarks/loop_overhead.py --checkpoint_every 5 --sync_checkpoints   # checkpoints in every window, synchronous
  python benchmarks/loop_overhead.py --tiny              # a tiny random BERT (a quick check of the code path)

The real loop is `train_lib.train_and_evaluate` (host pipeline, device
prefetch, metrics fetched every `log_every` steps, checkpoint at the end; no
evaluation); its steady state is the median over its logged windows of
`train/seconds_per_step` (history.jsonl; the first, compiling step is
outside every window). The bare step is the same jitted step object, called
afterwards on the very batches the loop gave it (kept on the device), from
the loop's final state, blocked once per window of `log_every` steps: no
host pipeline, no transfers, no metrics. The ratio loop / bare is the
loop's overhead (must hold on CPU: <= 1.25). Checkpoints are off inside the
windows unless `--checkpoint_every` asks for them (0: only the final one).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from configs import laspar  # noqa: E402
import full_size_step  # noqa: E402

from laspar_jax import train_lib, train_step  # noqa: E402


def smoke_config(steps: int, log_every: int, checkpoint_every: int, tiny: bool = False):
  """configs/laspar.py:runlocal for `steps` steps, no evaluation (tiny: a random 2-layer BERT, D = 2^10)."""
  c = laspar.get_config("runlocal")
  c.train.total_steps, c.train.log_every, c.train.checkpoint_every = steps, log_every, checkpoint_every
  c.train.eval_every, c.train.final_eval = 0, False
  if tiny:
    path = full_size_step.backbone_dir(tiny=True)
    full_size_step.write_random_weights(path)
    c.model.backbone = c.data.teacher_model = path
    c.model.latent_dim = 2**10
    c.model.query_max_len, c.model.doc_max_len = 16, 32
    c.train.dropout = False
    c.train.q_topk, c.train.d_topk = 32, 64
  return c


class StepRecorder:
  """Wraps `train_step.make_train_step`: keeps the jitted step, every batch it was given, the last state."""

  def __init__(self):
    self.step: Any = None
    self.batches: list[dict[str, jax.Array]] = []
    self.state: Any = None
    self._orig = train_step.make_train_step

  def __enter__(self) -> "StepRecorder":
    def make(*args, **kwargs):
      jitted = self._orig(*args, **kwargs)
      self.step = jitted

      def recorded(state, batch):
        self.batches.append(batch)
        out = jitted(state, batch)
        self.state = out[0]
        return out

      recorded.lower = jitted.lower
      return recorded

    train_step.make_train_step = make
    return self

  def __exit__(self, *exc) -> None:
    train_step.make_train_step = self._orig


def bare_windows(step, state, batches, window: int) -> list[float]:
  """Seconds per step of `step` over `batches` (after the first), blocked once per `window` steps."""
  out = []
  todo = batches[1:]
  for i in range(0, len(todo) - window + 1, window):
    t = time.perf_counter()
    for b in todo[i : i + window]:
      state, _ = step(state, b)
    jax.block_until_ready(state)
    out.append((time.perf_counter() - t) / window)
  return out


def measure(c, workdir: str) -> dict[str, Any]:
  """Runs the real loop, then the bare step on the same batches; returns the figures."""
  with StepRecorder() as rec:
    t = time.perf_counter()
    train_lib.train_and_evaluate(c, workdir)
    wall = time.perf_counter() - t
  rows = [json.loads(line) for line in open(os.path.join(workdir, "history.jsonl"), encoding="utf-8")]
  loop = [r["train/seconds_per_step"] for r in rows if "train/seconds_per_step" in r]
  if len(loop) > 1 and c.train.total_steps % c.train.log_every:
    loop = loop[:-1]  # the partial last window
  bare = bare_windows(rec.step, rec.state, rec.batches, c.train.log_every)
  loop_s, bare_s = float(np.median(loop)), float(np.median(bare))
  return {
    "steps": int(c.train.total_steps),
    "log_every": int(c.train.log_every),
    "loop_s_per_step": loop_s,
    "bare_s_per_step": bare_s,
    "ratio": loop_s / bare_s,
    "loop_windows": [round(x, 4) for x in loop],
    "bare_windows": [round(x, 4) for x in bare],
    "wall_s": wall,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=31, help="optimizer steps (the first compiles)")
  ap.add_argument("--log_every", type=int, default=5)
  ap.add_argument("--checkpoint_every", type=int, default=0, help="0: only the final checkpoint")
  ap.add_argument("--sync_checkpoints", action="store_true", help="train.async_checkpoints=False (the reference)")
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
  args = ap.parse_args()
  c = smoke_config(args.steps, args.log_every, args.checkpoint_every, args.tiny)
  c.train.async_checkpoints = not args.sync_checkpoints
  res = measure(c, args.workdir or tempfile.mkdtemp(prefix="loop_overhead_"))
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  {res['steps']} steps, windows of "
    f"{res['log_every']}  batch {c.optim.batch_size}  backbone {os.path.basename(c.model.backbone)}"
  )
  print(f"real loop  {res['loop_s_per_step'] * 1e3:9.1f} ms/step  (windows {res['loop_windows']})")
  print(f"bare step  {res['bare_s_per_step'] * 1e3:9.1f} ms/step  (windows {res['bare_windows']})")
  print(f"loop / bare = {res['ratio']:.3f}  (must hold: <= 1.25)")


if __name__ == "__main__":
  main()
