r"""One accelerator check: the paper-size step, the SciFact recipe by phase, encoder vs PyTorch, LoRA steps.

  python benchmarks/device_check.py                    # one accelerator (see below for the GPU bundle)
  python benchmarks/device_check.py --tiny             # the same code paths at tiny sizes (CPU; the tests run it)
  python benchmarks/device_check.py --tasks scifact encoder --json /tmp/dc.json

On the lent GPU machine (../shared/gpu_bundle, from the project root):

  bash ../shared/gpu_bundle/make_bundle.sh                       # here, once
  source .bundle/on_gpu.sh && python benchmarks/device_check.py  # there

(through the session's `run` tool: carry [".bundle"], and `--json $OUT/device_check.json`
to get the rows back; where one command may not last the whole check, split it:
`--tasks paper scifact encoder`, then `--tasks lora_flan_t5_base lora_opt_1.3b lora_llama3_8b`;
a second call on a still-warm machine reads the compilation cache of the first.)

Prints one table and writes it as JSON (`--json`, default
/tmp/device_check.json). Tasks (each in its own process on an accelerator,
so that every peak is its own; in one process on CPU, where peaks are n/a):

  paper     the paper's train step (D = 2^22, batch 32 x 8, q 64 / d 256) from
            random MiniLM-L12 weights (`full_size_step`): compile, step, XLA's estimate
  scifact   `train_and_evaluate` on configs/laspar.py:scifact with phase timers
            (set up, data + teacher, compile = first step, steady steps,
            checkpoints, index, evaluation, total) and nDCG@10
  encoder   all-MiniLM-L6-v2 forward (B 256, L 128 and 256) and forward+backward
            (64 q x 64 + 64 d x 256, in-batch loss), JAX fp32 (matmul_precision
            "highest"), TF32 ("tf32") and bf16 against transformers' BertModel
            (SDPA) in the same process: fp32, TF32, bf16 (autocast for the
            backward); torch rows say "torch not installed" without it
  lora_*    one LoRA train step per family: Flan-T5-base, OPT-1.3b, Llama-3-8B
            shapes, random weights, scanned stacks (`decoder_throughput.lora_step_row`):
            compile, step, the build's peak, XLA's plan and `memory.estimate` by term

Peak device memory is `memory_stats()["peak_bytes_in_use"]` of the task's
process after the row (so within a task it can only grow); torch rows give
torch's own peak per row. `--tiny`: a random 2-layer BERT of width 32 with
MiniLM's tokenizer stands in for MiniLM (L6 and L12), the SciFact recipe
trains 6 steps at D = 2^10 and evaluates on the first 300 documents, and
every shape is small; the code paths are the same.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import decoder_throughput  # noqa: E402
import encoder_throughput  # noqa: E402
import full_size_step  # noqa: E402
from configs import laspar  # noqa: E402
from laspar_jax import checkpointing, platform, train_lib, train_step  # noqa: E402
from laspar_jax import mesh as mesh_lib  # noqa: E402
from laspar_jax.data import assemble  # noqa: E402
from laspar_jax.models import sparse_encoder  # noqa: E402

LORA_MODELS = ("flan_t5_base", "opt_1.3b", "llama3_8b")
TASKS = ("paper", "scifact", "encoder") + tuple(f"lora_{m}" for m in LORA_MODELS)


def row(task: str, name: str, value: float, unit: str, *, peak: float | None = None, note: str = "") -> dict:
  """One table row (value NaN with a note: skipped)."""
  return {"task": task, "row": name, "value": float(value), "unit": unit, "peak_GiB": peak, "note": note}


def tiny_bert() -> str:
  """A random BERT of MiniLM's vocabulary, 2 layers of width 32 (a fresh folder)."""
  path = full_size_step.backbone_dir(tiny=True)
  full_size_step.write_random_weights(path)
  return path


# --------------------------------------------------------------------------- paper


def task_paper(tiny: bool) -> list[dict]:
  c = full_size_step.paper_config(2**12 if tiny else 2**22, tiny=tiny)
  mesh = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  compiled, res, tx = full_size_step.compile_step(c, mesh)
  steps = full_size_step.run_steps(c, mesh, compiled, tx, steps=3)
  peak = steps[-1]["peak_GiB"]
  shape = f"D={c.model.latent_dim:,}, {c.optim.batch_size}x{c.optim.accum_steps}, q{c.model.query_max_len}/d{c.model.doc_max_len}"
  est = res.get("per_device_GiB", {}).get("peak_estimate", float("nan"))
  return [
    row("paper", "compile", res["compile_s"], "s", peak=peak, note=f"{res['params']:,} params"),
    row("paper", "step", float(np.median([s["seconds"] for s in steps[1:]])), "s/step", peak=peak, note=shape),
    row("paper", "loss (finite)", steps[-1]["loss"], "", peak=peak),
    row("paper", "XLA memory estimate", est, "GiB", peak=peak),
  ]


# --------------------------------------------------------------------------- scifact


def scifact_config(tiny: bool):
  c = laspar.get_config("scifact")
  if tiny:
    path = tiny_bert()
    c.model.backbone = c.data.teacher_model = path
    c.model.latent_dim = 2**10
    c.model.query_max_len, c.model.doc_max_len = 16, 32
    c.optim.batch_size = 8
    c.train.total_steps, c.train.log_every, c.train.checkpoint_every = 6, 2, 3
    c.train.dropout = False
    c.train.q_topk, c.train.d_topk = 32, 64
    c.eval.max_docs, c.eval.max_queries, c.eval.batch_size = 300, 30, 32
    c.eval.q_topk, c.eval.d_topk = 32, 64
  return c


class PhaseTimer:
  """Times the phases of `train_and_evaluate` by wrapping the functions it calls (restored on exit)."""

  def __init__(self):
    self.t: dict[str, float] = {"checkpoint": 0.0}
    self._saved: list[tuple[Any, str, Any]] = []

  def _patch(self, owner, name, wrapper) -> None:
    orig = getattr(owner, name)
    self._saved.append((owner, name, orig))
    setattr(owner, name, wrapper(orig))

  def __enter__(self) -> "PhaseTimer":
    t = self.t

    def pipeline(orig):
      def f(*a, **k):
        t["data_start"] = time.perf_counter()
        out = orig(*a, **k)
        t["data_end"] = time.perf_counter()
        return out

      return f

    def make_step(orig):
      def f(*a, **k):
        step = orig(*a, **k)

        def timed(state, batch):
          if "first_end" in t:
            return step(state, batch)
          out = step(state, batch)
          jax.block_until_ready(out)
          t["first_end"] = time.perf_counter()
          return out

        timed.lower = step.lower
        return timed

      return f

    def checkpoint(orig):
      def f(*a, **k):
        s = time.perf_counter()
        try:
          return orig(*a, **k)
        finally:
          t["checkpoint"] += time.perf_counter() - s

      return f

    def save_encoder(orig):
      def f(*a, **k):
        t.setdefault("loop_end", time.perf_counter())
        out = orig(*a, **k)
        t["saved"] = time.perf_counter()
        return out

      return f

    self._patch(assemble, "build_pipeline", pipeline)
    self._patch(train_step, "make_train_step", make_step)
    self._patch(checkpointing.Checkpointer, "save", checkpoint)
    self._patch(checkpointing.Checkpointer, "wait", checkpoint)
    self._patch(sparse_encoder, "save_encoder", save_encoder)
    return self

  def __exit__(self, *exc) -> None:
    for owner, name, orig in reversed(self._saved):
      setattr(owner, name, orig)


def task_scifact(tiny: bool) -> list[dict]:
  c = scifact_config(tiny)
  workdir = tempfile.mkdtemp(prefix="device_check_scifact_")
  with PhaseTimer() as timer:
    t0 = time.perf_counter()
    res = train_lib.train_and_evaluate(c, workdir)
    total = time.perf_counter() - t0
  t, ev = timer.t, res["eval"] or {}
  peak = full_size_step.peak_gib()
  steps = int(c.train.total_steps) - 1
  loop_s = t["loop_end"] - t["first_end"]
  return [
    row("scifact", "set-up (config, encoder, state)", t["data_start"] - t0, "s", peak=peak),
    row("scifact", "data + teacher", t["data_end"] - t["data_start"], "s", peak=peak),
    row("scifact", "compile (first step)", t["first_end"] - t["data_end"], "s", peak=peak),
    row("scifact", f"steps ({steps} after the first)", loop_s - t["checkpoint"], "s", peak=peak),
    row("scifact", "steady step", res["train"].get("seconds_per_step", float("nan")), "s/step", peak=peak),
    row("scifact", "checkpoints", t["checkpoint"], "s", peak=peak),
    row("scifact", "save encoder", t["saved"] - t["loop_end"], "s", peak=peak),
    row("scifact", "index", ev.get("index_seconds", float("nan")), "s", peak=peak),
    row(
      "scifact",
      "evaluation",
      ev.get("eval_seconds", float("nan")) - ev.get("index_seconds", 0.0),
      "s",
      peak=peak,
      note=f"{c.eval.max_queries or 'all'} queries, {c.eval.max_docs or 'all'} docs",
    ),
    row("scifact", "total", total, "s", peak=peak),
    row("scifact", "nDCG@10", ev.get("nDCG@10", float("nan")), "", peak=peak),
  ]


# --------------------------------------------------------------------------- encoder / LoRA


def task_encoder(tiny: bool) -> list[dict]:
  model = tiny_bert() if tiny else laspar.MINILM_L6
  shapes = encoder_throughput.TINY if tiny else encoder_throughput.FULL
  return [
    row("encoder", r["name"], r["value"], r["unit"], peak=r["peak_GiB"], note=r["note"])
    for r in encoder_throughput.encoder_rows(model, shapes)
  ]


def _terms(estimate: dict) -> str:
  """`memory.estimate`'s terms in GiB, largest first."""
  terms = sorted(((k, v) for k, v in estimate.items() if k != "total" and v), key=lambda kv: -kv[1])
  return ", ".join(f"{k} {v / 2**30:.2f}" for k, v in terms)


def task_lora(name: str, tiny: bool) -> list[dict]:
  r = decoder_throughput.lora_step_row(name, "tiny" if tiny else "full", steps=3)
  note = f"{r['params'] / 1e6:.1f}M params, {r['lora_params'] / 1e6:.2f}M LoRA"
  return [
    row(f"lora_{name}", "compile (first step)", r["compile_s"], "s", peak=r["peak_GiB"], note=note),
    row(f"lora_{name}", "step", r["step_s"], "s/step", peak=r["peak_GiB"]),
    row(f"lora_{name}", "loss (finite)", r["loss"], "", peak=r["peak_GiB"]),
    row(
      f"lora_{name}",
      "build peak",
      (r["build_peak_bytes"] or math.nan) / 2**30,
      "GiB",
      note="random model, before step 1",
    ),
    row(f"lora_{name}", "XLA plan", (r["planned_bytes"] or math.nan) / 2**30, "GiB", note="arguments + outputs + temp"),
    row(f"lora_{name}", "estimate", r["estimate"]["total"] / 2**30, "GiB", note=_terms(r["estimate"])),
  ]


def run_task(task: str, tiny: bool) -> list[dict]:
  """The rows of one task, in this process."""
  if task == "paper":
    return task_paper(tiny)
  if task == "scifact":
    return task_scifact(tiny)
  if task == "encoder":
    return task_encoder(tiny)
  if task.startswith("lora_"):
    return task_lora(task[len("lora_") :], tiny)
  raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def run_isolated(task: str, tiny: bool, timeout: float) -> list[dict]:
  """The rows of one task from a fresh process (its own device-memory peak)."""
  out = tempfile.mktemp(suffix=".json", prefix=f"device_check_{task}_")
  cmd = [sys.executable, __file__, "--tasks", task, "--isolate", "no", "--json", out, "--quiet"]
  proc = subprocess.run(
    cmd + (["--tiny"] if tiny else []), capture_output=True, text=True, timeout=timeout, check=False
  )
  if not os.path.exists(out):  # the child died before writing (its own failures come back as FAILED rows)
    raise RuntimeError(f"{task} exited {proc.returncode}: {' | '.join(proc.stderr.strip().splitlines()[-3:])}")
  with open(out, encoding="utf-8") as f:
    return json.load(f)["rows"]


def print_table(rows: list[dict], header: str) -> None:
  print(header)
  print(f"{'task':<18}{'row':<36}{'value':>12} {'unit':<8}{'peak GiB':>9}  note")
  for r in rows:
    v = r["value"]
    val = "-" if math.isnan(v) else (f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}")
    peak = "n/a" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f}"
    print(f"{r['task']:<18}{r['row']:<36}{val:>12} {r['unit']:<8}{peak:>9}  {r['note']}")


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="tiny shapes and models (CPU)")
  ap.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"subset of {', '.join(TASKS)}")
  ap.add_argument("--json", default="/tmp/device_check.json", help="where the rows go")
  ap.add_argument(
    "--isolate", default="auto", choices=("auto", "yes", "no"), help="a process per task (auto: not on CPU)"
  )
  ap.add_argument("--timeout", type=float, default=600, help="seconds per isolated task")
  ap.add_argument("--quiet", action="store_true", help="no table (the JSON only)")
  args = ap.parse_args()
  isolate = args.isolate == "yes" or (args.isolate == "auto" and platform.backend() != "cpu")
  rows, failed, t0 = [], [], time.perf_counter()
  for task in args.tasks:
    try:
      got = run_isolated(task, args.tiny, args.timeout) if isolate else run_task(task, args.tiny)
    except Exception as e:  # pylint: disable=broad-except  # one failed task must not hide the others
      got = [row(task, "FAILED", float("nan"), "", note=f"{type(e).__name__}: {str(e)[:300]}")]
    rows += got
    if any(r["row"] == "FAILED" for r in got):
      failed.append(task)
  dev = jax.devices()[0]
  meta = {
    "device": f"{dev.device_kind} x{jax.device_count()} ({platform.backend()})",
    "jax": jax.__version__,
    "tiny": args.tiny,
    "isolated": isolate,
    "wall_s": time.perf_counter() - t0,
    "failed": failed,
  }
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  if not args.quiet:
    print_table(
      rows,
      f"device_check: {meta['device']}, jax {meta['jax']}, {meta['wall_s']:.0f} s wall"
      + (", --tiny" if args.tiny else ""),
    )
    print(f"(JSON: {args.json})")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
