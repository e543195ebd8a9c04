r"""Runs every variant of an experiment config (train -> index -> evaluate) and writes one results table.

  # Every variant of RQ2, then W/results.md and W/results.csv:
  python launch/study.py --config configs/decoder/rq2_backbones.py --workdir /tmp/rq2

  # Two variants, shrunken to the tiny fixtures (a CI-sized run):
  python launch/study.py --config configs/decoder/rq2_backbones.py:tiny --workdir /tmp/rq2_tiny \
      --variants VARIANT_A,VARIANT_B

  --config PATH[:ARG]     an experiment config (VARIANTS + get_config("variant=NAME[,ARG]")); ARG is
                          added to every variant's argument (e.g. tiny, runlocal)
  --variants a,b          the variants to run (default: all, in VARIANTS order)
  --rerun                 run the selected variants afresh even if finished (earlier folders are moved
                          to WORKDIR/superseded/)
  --override key=value    a dotted config field of every variant (repeatable), e.g. train.total_steps=2
  --noprogress            no progress bars while indexing
  --plots                 also write WORKDIR/report/ (launch/report.py's plots and page)
  --jax_distributed       multi-host (launch/distributed_flags.py): all processes train and index,
                          process 0 evaluates and writes the tables

A rerun skips the variants whose result.json is finished with the same config;
a killed variant resumes from its last checkpoint. Exits with status 1 when a
variant failed (the others still run; the error is in its result.json and
the tables) and 143 when SIGTERM stopped a training run. See laspar_jax/study.py.
"""

import ast
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from laspar_jax import study  # noqa: E402
import distributed_flags  # noqa: E402  (launch/distributed_flags.py: --jax_distributed and its flags)

_CONFIG = flags.DEFINE_string("config", None, "configs/decoder/NAME.py[:ARG]")
_WORKDIR = flags.DEFINE_string("workdir", None, "the study folder (one subfolder per variant, the tables)")
_VARIANTS = flags.DEFINE_list("variants", None, "variants to run (default: all of VARIANTS)")
_RERUN = flags.DEFINE_bool("rerun", False, "run the selected variants again even if finished")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "dotted.key=value for every variant's config")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bars while indexing")
_PLOTS = flags.DEFINE_bool("plots", False, "also write WORKDIR/report/ (plots and a page)")
flags.mark_flags_as_required(["config", "workdir"])


def _overrides(items):
  out = {}
  for item in items:
    key, eq, text = item.partition("=")
    if not eq:
      raise app.UsageError(f"--override {item!r}: expected dotted.key=value")
    try:
      out[key.strip()] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key.strip()] = text
  return out


def main(argv):
  del argv
  distributed_flags.initialize()
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  path, arg = study.split_spec(_CONFIG.value)
  results = study.run_study(
    path,
    arg,
    _WORKDIR.value,
    variants=_VARIANTS.value,
    rerun=_RERUN.value,
    overrides=_overrides(_OVERRIDE.value),
    plots=_PLOTS.value,
    progress=_PROGRESS.value,
  )
  for r in results:
    line = f"{r['variant']}: {r['status']}"
    if r.get("metrics"):
      line += "  " + "  ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items())
    print(line + (f"  ({r['error']})" if r.get("error") else ""), flush=True)
  if any(r["status"] == "preempted" for r in results):
    sys.exit(143)
  if any(r["status"] == "failed" for r in results):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
