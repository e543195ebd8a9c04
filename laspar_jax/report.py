"""Plots and a markdown report page from training runs (one workdir or a sweep) and their indexes.

What a run directory provides (all optional but history.jsonl):
  WORKDIR/history.jsonl            rows {"step", "train/loss", "train/reg/q_flops_weight", ...}
  WORKDIR/eval/<step>/metrics.json {"nDCG@10", "RR@10", ..., "active_q", "active_d"}
  WORKDIR/eval/<step>/index/       the index that evaluation built and searched

The plots (PNG, matplotlib's object API: no pyplot, no global backend change):
  curves_<run>.png  training curves: loss terms, regularizer weights, active
                    dims, FLOPS estimate, evaluation measures, learning rate.
  tradeoff.png      effectiveness (nDCG@10, else RR@10) against FLOPS per query,
                    one point per evaluation of each run.
  postings.png      posting-list length distribution of each run's last index (log-log).
  active_dims.png   active dims per document (from the index) and per query.

FLOPS per query is the number of multiply-adds of term-at-a-time scoring: the
sum, over the query's nonzero dims, of their posting-list lengths. Evaluation
does not store the query representations, so unless metrics.json holds a
measured "flops_per_query" (as `evaluate.efficiency_report` computes) it is
estimated from the index and the mean query length: query dims are taken to
fall on dims as the documents' postings do, so a query dim meets on average
E[len] = sum_j len_j^2 / sum_j len_j postings, and FLOPS ~ active_q * E[len].
The page says which of the two each point is.

Besides the PNGs, `write_report` writes OUT/report.md (embedding them) and
OUT/report.json: per plot its file, title and each panel's axis labels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from laspar_jax.index import Index

LOSS_SKIP = ("_weight", "/acc", "/pos_score", "/teacher_acc", "/effective_dims", "/entropy")


@dataclasses.dataclass
class RunData:
  """What a report needs from one run directory."""

  name: str
  path: pathlib.Path
  history: list[dict[str, float]]
  evals: dict[int, dict[str, float]]  # step -> metrics.json
  indexes: dict[int, pathlib.Path]  # step -> the index that evaluation built

  @property
  def index_path(self) -> pathlib.Path | None:
    """The last evaluation's index."""
    return self.indexes[max(self.indexes)] if self.indexes else None


def read_history(path: str | os.PathLike) -> list[dict[str, float]]:
  """Rows of a history.jsonl (torn lines skipped; missing file: [])."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


def load_run(workdir: str | os.PathLike, name: str | None = None) -> RunData:
  """Reads a run directory (history, evaluation metrics, last index)."""
  path = pathlib.Path(workdir)
  evals, indexes = {}, {}
  eval_dirs = sorted((d for d in (path / "eval").glob("*") if d.name.isdigit()), key=lambda d: int(d.name))
  for d in eval_dirs:
    if (d / "metrics.json").exists():
      evals[int(d.name)] = json.loads((d / "metrics.json").read_text())
    if (d / "index" / "manifest.json").exists():
      indexes[int(d.name)] = d / "index"
  return RunData(name or path.name, path, read_history(path / "history.jsonl"), evals, indexes)


def find_runs(workdirs: Sequence[str | os.PathLike]) -> list[RunData]:
  """Runs of the given workdirs; a directory without history.jsonl is a sweep: its subdirs with one."""
  runs = []
  for w in workdirs:
    w = pathlib.Path(w)
    if (w / "history.jsonl").exists():
      runs.append(load_run(w))
    else:
      runs += [load_run(d) for d in sorted(w.iterdir()) if (d / "history.jsonl").exists()]
  names = [r.name for r in runs]
  for r in runs:  # the same leaf name in two sweeps: use the parent too
    if names.count(r.name) > 1:
      r.name = f"{r.path.parent.name}/{r.name}"
  return runs


def series(history: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one scalar over the rows that have it."""
  pts = [(row["step"], row[key]) for row in history if key in row and row[key] is not None]
  return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def _keys(history: Sequence[Mapping[str, float]]) -> list[str]:
  seen: dict[str, None] = {}
  for row in history:
    seen.update(dict.fromkeys(k for k in row if k != "step"))
  return list(seen)


def curve_groups(history: Sequence[Mapping[str, float]]) -> dict[str, list[str]]:
  """Panel title -> history keys: loss terms, regularizer weights, active dims, FLOPS, eval, lr."""
  keys = _keys(history)
  loss = [
    k
    for k in keys
    if k == "train/loss"
    or (k.count("/") == 2 and k.split("/")[1] in ("ranking", "distill", "reg") and not k.endswith(LOSS_SKIP))
  ]
  return {
    "loss terms": loss,
    "regularizer weights": [k for k in keys if k.startswith("train/reg/") and k.endswith("_weight")],
    "active dims": [k for k in keys if k in ("train/active_q", "train/active_d")],
    "FLOPS estimate (batch)": [k for k in keys if k == "train/flops_est"],
    "evaluation": [k for k in keys if k.startswith("eval/") and "@" in k],
    "learning rate": [k for k in keys if k == "train/lr"],
  }


_YLABELS = {
  "loss terms": "loss",
  "regularizer weights": "weight",
  "active dims": "nonzero dims",
  "FLOPS estimate (batch)": "sum_j P(q_j>0) P(d_j>0)",
  "evaluation": "measure",
  "learning rate": "learning rate",
}


def plot_curves(run: RunData) -> Figure:
  """Training curves of one run: one panel per `curve_groups` entry (an empty group says so)."""
  groups = curve_groups(run.history)
  fig = Figure(figsize=(15, 8.5), layout="constrained")
  axes = fig.subplots(2, 3).ravel()
  for ax, (title, keys) in zip(axes, groups.items()):
    for i, k in enumerate(keys):  # line styles tell apart curves that coincide (equal reg weights)
      x, y = series(run.history, k)
      ax.plot(
        x, y, ls=("-", "--", ":", "-.")[i % 4], marker="o" if len(x) < 3 else None, ms=3, label=k.split("/", 1)[1]
      )
    if title == "loss terms" and keys and all(np.nanmin(series(run.history, k)[1]) > 0 for k in keys):
      ax.set_yscale("log")
    if keys:
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(_YLABELS[title])
    ax.grid(alpha=0.3)
  fig.suptitle(f"training curves: {run.name}")
  return fig


def index_lengths(index_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
  """(posting-list length per dim, postings per document, n_docs) of an index."""
  index = Index.load(index_path, verify="none")
  return index.postings_per_dim(), np.asarray(index.doc_lengths), index.n_docs


def flops_per_query(metrics: Mapping[str, float], lengths_d: np.ndarray | None) -> tuple[float | None, str]:
  """FLOPS per query of an evaluation and how it was obtained ("measured", "estimated", "").

  Args:
    metrics: the evaluation's metrics.json ("flops_per_query" when measured; "active_q").
    lengths_d: posting-list lengths per dim of the evaluation's index (None: not available).

  Returns:
    (value or None, source): see the module docstring for the estimate.
  """
  if metrics.get("flops_per_query") is not None:
    return float(metrics["flops_per_query"]), "measured"
  if lengths_d is None or not metrics.get("active_q") or lengths_d.sum() == 0:
    return None, ""
  lengths = lengths_d.astype(np.float64)
  return float(metrics["active_q"] * (lengths**2).sum() / lengths.sum()), "estimated"


def tradeoff_points(runs: Sequence[RunData], measure: str) -> list[dict[str, Any]]:
  """One point per evaluation: {run, step, measure value, flops, source}.

  An evaluation counts when metrics.json has a measured "flops_per_query" or
  its index is on disk (for the estimate).
  """
  pts = []
  for r in runs:
    for step, m in sorted(r.evals.items()):
      if measure not in m:
        continue
      ppd = Index.load(r.indexes[step], verify="none").postings_per_dim() if step in r.indexes else None
      flops, source = flops_per_query(m, ppd)
      if flops is not None:
        pts.append({"run": r.name, "step": step, measure: float(m[measure]), "flops": flops, "source": source})
  return pts


def pick_measure(runs: Sequence[RunData]) -> str:
  """nDCG@10 if any run's evaluation has it, else RR@10 (else the first measure found)."""
  have = {k for r in runs for m in r.evals.values() for k in m}
  for m in ("nDCG@10", "RR@10"):
    if m in have:
      return m
  return next((k for k in sorted(have) if "@" in k), "nDCG@10")


def plot_tradeoff(points: Sequence[Mapping[str, Any]], measure: str) -> Figure:
  """Effectiveness against FLOPS per query (log x); the last evaluation of each run is labelled."""
  fig = Figure(figsize=(7, 5), layout="constrained")
  ax = fig.subplots()
  for run in dict.fromkeys(p["run"] for p in points):
    pts = [p for p in points if p["run"] == run]
    x, y = [p["flops"] for p in pts], [p[measure] for p in pts]
    ax.plot(x, y, marker="o", label=run)
    est = "" if pts[-1]["source"] == "measured" else " (est.)"
    ax.annotate(f"{run} @{pts[-1]['step']}{est}", (x[-1], y[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
  if points:
    ax.set_xscale("log")
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, "no evaluation with an index", ha="center", va="center", transform=ax.transAxes)
  ax.set_xlabel("FLOPS per query (multiply-adds over posting lists)")
  ax.set_ylabel(measure)
  ax.set_title(f"effectiveness vs efficiency: {measure} against FLOPS per query")
  ax.grid(alpha=0.3, which="both")
  return fig


def plot_postings(lengths: Mapping[str, np.ndarray]) -> Figure:
  """Posting-list length distribution (number of dims per length, log-spaced bins, log-log)."""
  fig = Figure(figsize=(7, 5), layout="constrained")
  ax = fig.subplots()
  for name, ppd in lengths.items():
    ppd = ppd[ppd > 0]
    if not ppd.size:
      continue
    edges = np.unique(np.geomspace(1, ppd.max() + 1, 40).astype(np.int64))
    counts, edges = np.histogram(ppd, bins=edges)
    keep = counts > 0
    centers = np.sqrt(edges[:-1] * np.maximum(edges[1:] - 1, edges[:-1]))
    ax.plot(centers[keep], counts[keep] / np.diff(edges)[keep], marker=".", label=f"{name} ({ppd.size:,} dims)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("posting-list length (documents per dim)")
  ax.set_ylabel("dims per unit length")
  ax.set_title("posting-list length distribution")
  if lengths:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  return fig


def plot_active_dims(
  doc_lengths: Mapping[str, np.ndarray],
  query_lengths: Mapping[str, np.ndarray],
  mean_query: Mapping[str, float] | None = None,
) -> Figure:
  """Histograms of active dims per document and per query.

  Args:
    doc_lengths: run name -> nonzero dims of each document.
    query_lengths: run name -> nonzero dims of each query (may be empty).
    mean_query: run name -> mean active dims per query, drawn as a line when
      the per-query lengths are not known (evaluation keeps only the mean).

  Returns:
    The figure (two panels).
  """
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  ax_d, ax_q = fig.subplots(1, 2)
  for ax, data, side, plural in (
    (ax_d, doc_lengths, "document", "documents"),
    (ax_q, query_lengths, "query", "queries"),
  ):
    for name, n in data.items():
      values = np.unique(n)
      if values.size <= 3:  # e.g. every document at its top-k cap: bars, not an invisible one-bin outline
        ax.bar(
          values, [int((n == v).sum()) for v in values], width=max(1.0, 0.02 * float(values.max() or 1)), alpha=0.6
        )
        ax.plot([], [], color="C0", label=f"{name} (all at {', '.join(map(str, values))})")
      else:
        ax.hist(n, bins=min(50, values.size), histtype="step", label=name)
    ax.set_xlabel(f"active dims per {side}")
    ax.set_ylabel(plural)
    ax.set_title(f"active dims per {side}")
    ax.grid(alpha=0.3)
  for i, (name, m) in enumerate((mean_query or {}).items()):
    if name not in query_lengths:
      ax_q.axvline(m, color=f"C{i}", ls="--", label=f"{name}: mean {m:g} (per-query lengths not stored)")
  for ax in (ax_d, ax_q):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle("active dims per document and per query")
  return fig


def figure_labels(fig: Figure) -> dict[str, Any]:
  """The figure's title and each panel's title and axis labels (for report.json and tests)."""
  title = fig.get_suptitle()  # "" when the figure has none (matplotlib >= 3.8)
  return {
    "title": title or (fig.axes[0].get_title() if fig.axes else ""),
    "axes": [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel()} for ax in fig.axes],
  }


def _fmt(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(
  workdirs: Sequence[str | os.PathLike],
  out_dir: str | os.PathLike,
  *,
  query_lengths: Mapping[str, np.ndarray] | None = None,
  dpi: int = 110,
) -> dict[str, Any]:
  """Writes every plot (PNG), OUT/report.md embedding them and OUT/report.json.

  Args:
    workdirs: run directories, or sweep directories whose subdirs are runs.
    out_dir: where the report goes (created).
    query_lengths: run name -> active dims of each query, when known (e.g.
      from a notebook that encoded the queries); else the evaluation's mean is drawn.
    dpi: PNG resolution.

  Returns:
    {"page": path of report.md, "plots": {file name: figure_labels(...)}, "notes": [...]}.
  """
  runs = find_runs(workdirs)
  if not runs:
    raise FileNotFoundError(f"no run (a directory with history.jsonl) in {list(map(str, workdirs))}")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  figs: dict[str, Figure] = {}
  notes: list[str] = []
  for r in runs:
    figs[f"curves_{r.name.replace('/', '_')}.png"] = plot_curves(r)
  idx = {r.name: index_lengths(r.index_path) for r in runs if r.index_path is not None}
  for r in runs:
    if r.index_path is None:
      notes.append(f"{r.name}: no index under {r.path}/eval/*/index: no postings or document dims plotted.")
  lengths = {name: v[0] for name, v in idx.items()}
  measure = pick_measure(runs)
  points = tradeoff_points(runs, measure)
  figs["tradeoff.png"] = plot_tradeoff(points, measure)
  figs["postings.png"] = plot_postings(lengths)
  last_q = {
    r.name: float(r.evals[max(r.evals)]["active_q"]) for r in runs if r.evals and "active_q" in r.evals[max(r.evals)]
  }
  figs["active_dims.png"] = plot_active_dims({n: v[1] for n, v in idx.items()}, dict(query_lengths or {}), last_q)
  for r in runs:  # the index keeps each document's top k_doc dims: say when that hides the distribution
    if r.name in idx and idx[r.name][1].size:
      k_doc = (Index.load(r.index_path, verify="none").manifest.get("metadata") or {}).get("k_doc")
      at_cap = float(np.mean(idx[r.name][1] == k_doc)) if k_doc else 0.0
      if at_cap >= 0.5:
        notes.append(
          f"{r.name}: {at_cap:.0%} of documents have exactly k_doc = {k_doc} dims: the index keeps each "
          "document's top k_doc dims only, so the distribution before that cap is not stored (index with a "
          "larger k_doc to see it)."
        )
  if not query_lengths:
    notes.append(
      "Query representations are not stored by evaluation: the query panel shows each run's "
      "mean active dims (metrics.json active_q) as a dashed line."
    )
  plots = {}
  for name, fig in figs.items():
    fig.savefig(out / name, dpi=dpi)
    plots[name] = figure_labels(fig)
  page = _page(runs, idx, points, measure, plots, notes)
  (out / "report.md").write_text(page)
  summary = {"page": str(out / "report.md"), "plots": plots, "notes": notes, "measure": measure, "tradeoff": points}
  (out / "report.json").write_text(json.dumps(summary, indent=1))
  return summary


def _page(
  runs: Sequence[RunData],
  idx: Mapping[str, tuple[np.ndarray, np.ndarray, int]],
  points: Sequence[Mapping[str, Any]],
  measure: str,
  plots: Mapping[str, Any],
  notes: Sequence[str],
) -> str:
  """The markdown page: a table of runs, then the plots."""
  cols = [measure, "RR@10", "R@100", "active_q", "active_d"]
  lines = [
    "# laspar_jax report",
    "",
    "| run | workdir | last step | eval step | " + " | ".join(cols) + " | FLOPS/query | docs | postings |",
    "|" + " --- |" * (len(cols) + 7),
  ]
  flops = {p["run"]: p for p in points}
  for r in runs:
    last_step = max((int(row["step"]) for row in r.history), default=0)
    step = max(r.evals) if r.evals else None
    m = r.evals.get(step, {}) if step is not None else {}
    p = flops.get(r.name)
    f = f"{p['flops']:.4g}{'' if p['source'] == 'measured' else ' (est.)'}" if p else ""
    docs = f"{idx[r.name][2]:,}" if r.name in idx else ""
    post = f"{int(idx[r.name][0].sum()):,}" if r.name in idx else ""
    lines.append(
      f"| {r.name} | `{r.path}` | {last_step} | {step if step is not None else ''} | "
      + " | ".join(_fmt(m.get(c, "")) for c in cols)
      + f" | {f} | {docs} | {post} |"
    )
  lines += [
    "",
    "FLOPS per query: multiply-adds of term-at-a-time scoring (sum of the posting-list "
    "lengths of the query's dims), as evaluation measured it (metrics.json flops_per_query). (est.) marks "
    "older evaluations without it: active_q x sum_j len_j^2 / sum_j len_j from the index, which assumes "
    "query dims fall where documents' postings do; real queries differ (24 % low on the SciFact recipe), "
    "so re-evaluate for the measured figure (see `laspar_jax/report.py`).",
    "",
  ]
  for name, lab in plots.items():
    lines += [f"## {lab['title']}", "", f"![{lab['title']}]({name})", ""]
  if notes:
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)
