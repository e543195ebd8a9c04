r"""Plots and a markdown page from one or more training runs (a sweep) and their indexes.

  # One run:
  python launch/report.py --workdir /tmp/laspar_scifact --out /tmp/laspar_scifact/report
  # Several runs, or a sweep folder whose subfolders are runs:
  python launch/report.py --workdir /tmp/laspar_local,/tmp/laspar_scifact --out /tmp/report
  python launch/report.py --workdir /tmp/sweep --out /tmp/sweep/report

Writes OUT/report.md (open it in any markdown viewer), the PNGs it embeds and
OUT/report.json (plot titles and axis labels, the trade-off points). What each
plot shows, and how FLOPS per query is obtained: `laspar_jax/report.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from laspar_jax import report  # noqa: E402

_WORKDIR = flags.DEFINE_list("workdir", None, "run directories (or sweep directories of runs)", required=True)
_OUT = flags.DEFINE_string("out", None, "output directory (default: WORKDIR/report for one run)")
_DPI = flags.DEFINE_integer("dpi", 110, "PNG resolution")


def main(argv):
  del argv
  out = _OUT.value or (os.path.join(_WORKDIR.value[0], "report") if len(_WORKDIR.value) == 1 else None)
  if out is None:
    raise app.UsageError("--out is required with several workdirs")
  summary = report.write_report(_WORKDIR.value, out, dpi=_DPI.value)
  print(f"wrote {summary['page']} and {len(summary['plots'])} plots")
  for note in summary["notes"]:
    print(f"note: {note}")


if __name__ == "__main__":
  app.run(main)
