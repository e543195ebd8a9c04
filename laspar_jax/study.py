"""The study runner: every variant of an experiment config through train -> index -> evaluate, one table.

An experiment config (`configs/decoder/*.py`) is a module with `VARIANTS`
(the names, in table order) and `get_config("variant=NAME[,ARG]")`.
`run_study(module, arg, W)` runs each variant in its own folder:

  W/<variant>/study.json     the variant's config digest (written first)
  W/<variant>/               `train_lib`'s workdir: config.json, checkpoints/, tb/, history.jsonl, encoder/
  W/<variant>/eval/<step>/   index/, run.trec, metrics.json (the layout `laspar_jax/report.py` reads)
  W/<variant>/result.json    written atomically when the variant ends ("ok", "suspect" or "failed")
  W/<variant>/wall.json      wall seconds over the variant's attempts (a resumed variant counts them all)

A variant with a non-empty `config.zeroshot.preset` or `config.train.total_steps`
0 is not trained: its encoder (`zeroshot.encoder_fields` of the section, or
`config.model`) goes through `evaluate.evaluate_config` in
W/<variant>/eval/0/.

Reruns: a variant whose result.json is "ok" with the digest of its current
config is skipped. A folder whose study.json holds another digest (the config
changed), or any folder with `rerun=True`, is moved to
W/superseded/<variant>-<old digest> and the variant starts afresh; a folder of
the same digest without an "ok" result (killed or failed) resumes, training
from its last checkpoint. A failing variant is recorded (status "failed",
the error) and the next one runs; one whose every measure is 0 is "suspect"
(finished, but nothing relevant was retrieved), not "ok".

Then W/results.md and W/results.csv: one row per variant of VARIANTS that has
a result, in VARIANTS order: each measure of `config.eval.measures`, FLOPS per
query (multiply-adds over posting lists, measured on the evaluated queries),
mean active dims per query and per document, train steps and wall seconds.

Multi-host (`jax.distributed`): every process trains and indexes its share;
process 0 alone evaluates and writes study files, so W must be on a shared
filesystem.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import sys
import time
import traceback
import types
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import tqdm

from laspar_jax import config_lib
from laspar_jax import distributed
from laspar_jax import encode
from laspar_jax import evaluate
from laspar_jax import io_utils
from laspar_jax import report
from laspar_jax import train_lib
from laspar_jax import zeroshot
from laspar_jax.models import sparse_encoder

RESULT = "result.json"
STAMP = "study.json"
SUPERSEDED = "superseded"
WALL = "wall.json"  # wall seconds of the variant's attempts so far (and the running one's start)
FINISHED = ("ok", "suspect")  # results a rerun skips ("suspect": every measure is 0)
ModuleSpec = str | os.PathLike | types.ModuleType


def _say(msg: str) -> None:
  if distributed.is_lead():
    tqdm.tqdm.write(f"[study] {msg}")


def split_spec(spec: str) -> tuple[str, str]:
  """ "configs/decoder/rq2_backbones.py:tiny" -> (path, "tiny") (as `--config` of launch/train.py)."""
  path, _, arg = str(spec).partition(":")
  return path, arg


def load_module(module_or_path: ModuleSpec) -> types.ModuleType:
  """An experiment config module from a module, a file path (`x/y.py`) or a dotted name.

  Raises:
    ValueError: the module has no `VARIANTS` or no `get_config`.
  """
  if isinstance(module_or_path, types.ModuleType):
    module = module_or_path
  else:
    name = os.fspath(module_or_path)
    if name.endswith(".py") or os.sep in name:
      path = os.path.abspath(name)
      key = "laspar_study_config_" + hashlib.sha256(path.encode()).hexdigest()[:12]
      spec = importlib.util.spec_from_file_location(key, path)
      if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load the config module {path}")
      module = importlib.util.module_from_spec(spec)
      sys.modules[key] = module  # dataclasses (and pickling) look their module up there
      spec.loader.exec_module(module)
    else:
      module = importlib.import_module(name)
  if not isinstance(getattr(module, "VARIANTS", None), (tuple, list)) or not callable(
    getattr(module, "get_config", None)
  ):
    raise ValueError(f"{module.__name__} is not an experiment config: it needs VARIANTS and get_config(arg)")
  return module


def variant_config(
  module: types.ModuleType, variant: str, arg: str = "", overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """`module.get_config("variant=NAME[,arg]")` with dotted `overrides` applied (`config_lib.update`)."""
  config = module.get_config(",".join(x for x in (f"variant={variant}", arg) if x))
  with config.unlocked():
    config_lib.update(config, dict(overrides or {}))
  return config


def config_digest(config: ml_collections.ConfigDict) -> str:
  """sha256 (16 hex) of the config's fields: equal configs, equal digests."""
  blob = json.dumps(config_lib.to_dict(config), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_json(path: io_utils.PathLike) -> dict[str, Any] | None:
  """A JSON object file, or None when missing or unreadable."""
  path = io_utils.as_path(path)
  try:
    out = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None


def is_zeroshot(config: ml_collections.ConfigDict) -> bool:
  """True when the variant is not trained: `config.zeroshot.preset` set, or `config.train.total_steps` 0."""
  zs = config.get("zeroshot")
  if zs is not None and zs.get("preset"):
    return True
  return config.get("train") is not None and config.train.get("total_steps", 1) == 0


def run_study(
  module_or_path: ModuleSpec,
  arg: str,
  workdir: io_utils.PathLike,
  *,
  variants: Sequence[str] | None = None,
  progress: bool = True,
  rerun: bool = False,
  overrides: Mapping[str, Any] | None = None,
  plots: bool = False,
) -> list[dict[str, Any]]:
  """Runs the variants of an experiment config and writes the results table (see the module docstring).

  Args:
    module_or_path: the config module, its file path or its dotted name.
    arg: the config argument added after "variant=NAME" (e.g. "tiny"; "" for none).
    workdir: W, the study folder (local or gs://).
    variants: the variants to run (default: all of VARIANTS).
    progress: progress bars while indexing.
    rerun: run every selected variant afresh, even those already finished.
    overrides: {dotted config key: value} applied to every variant's config.
    plots: also write W/report/ (`report.write_report`: curves, trade-off, postings).

  Returns:
    One dict per selected variant, in VARIANTS order: its result.json content,
    with "status" "ok" (run now), "skipped" (finished before), "failed" or
    "preempted" (SIGTERM during training: the study stopped there).

  Raises:
    ValueError: an unknown variant name (before anything runs).
  """
  module = load_module(module_or_path)
  names = tuple(module.VARIANTS)
  chosen = names if not variants else tuple(variants)
  unknown = [v for v in chosen if v not in names]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; {module.__name__} has {list(names)}")
  chosen = tuple(v for v in names if v in chosen)
  root = io_utils.as_path(workdir)
  results = []
  for v in chosen:
    res = _run_one(module, v, arg, root / v, rerun=rerun, overrides=overrides, progress=progress)
    results.append(res)
    if res["status"] == "preempted":
      break
  if distributed.is_lead():
    rows = table_rows(module, arg, root, overrides)
    write_tables(root, rows, title=f"{getattr(module, '__file__', module.__name__)} {arg}".strip())
    if plots and report.find_runs([root]):
      report.write_report([root], root / "report")
    _say(f"results: {root / 'results.md'}")
  return results


def _run_one(
  module: types.ModuleType,
  variant: str,
  arg: str,
  vdir: Any,
  *,
  rerun: bool,
  overrides: Mapping[str, Any] | None,
  progress: bool,
) -> dict[str, Any]:
  """One variant: skip, or (re)start its folder, run it and write result.json."""
  lead = distributed.is_lead()
  res: dict[str, Any] = {"variant": variant, "config_arg": arg}
  t0, spent = time.time(), None
  try:
    config = variant_config(module, variant, arg, overrides)
    res["config_digest"] = digest = config_digest(config)
    done = read_json(vdir / RESULT)
    if not rerun and done and done.get("status") in FINISHED and done.get("config_digest") == digest:
      _say(f"{variant}: finished before (config {digest}), skipped")
      return {**done, "status": "skipped"}
    _prepare(vdir, digest, rerun, lead)
    spent = _wall_before(vdir, lead)  # earlier attempts of this variant (killed or failed), then this one
    res["kind"] = "zeroshot" if is_zeroshot(config) else "trained"
    _say(f"{variant}: {res['kind']}, config {digest}, in {vdir}")
    out = (
      _zeroshot(config, vdir, progress=progress)
      if res["kind"] == "zeroshot"
      else _train_index_evaluate(config, vdir, progress=progress)
    )
    if out.get("preempted"):
      return {**res, "status": "preempted", "steps": out.get("steps")}
    res.update(out, status="ok")
    why = _suspect(res)
    if why:  # a table of zeros, or of tie-breaks, is not a result
      res.update(status="suspect", note=why)
      _say(f"{variant}: suspect: {why}")
  except Exception as e:  # pylint: disable=broad-except  (one failing variant must not stop the study)
    res.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    _say(f"{variant}: FAILED: {res['error']}")
  res["wall_seconds"] = time.time() - t0 + (spent or 0.0)
  if lead and spent is not None:
    io_utils.write_text_atomic(vdir / WALL, json.dumps({"seconds": res["wall_seconds"]}))
  res["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  if lead:
    io_utils.write_text_atomic(vdir / RESULT, json.dumps(res, indent=1, default=str))
  distributed.barrier(f"laspar_study_{variant}")
  return res


def _suspect(res: Mapping[str, Any]) -> str:
  """Why a finished variant's figures mean nothing ("" when they may): all measures 0, or no ranking at all."""
  if res.get("metrics") and not any(res["metrics"].values()):
    return "every measure is 0: no relevant document retrieved (check the collection cut and the model)"
  run = res.get("run")
  if run and io_utils.is_local(run) and os.path.exists(run):
    scores: dict[str, set[str]] = {}
    with open(run) as f:
      for line in f:
        parts = line.split()
        if len(parts) >= 5:
          scores.setdefault(parts[0], set()).add(parts[4])
    if scores and all(len(s) == 1 for s in scores.values()):
      return (
        "every retrieved document scores the same for each query: the measures come from tie-breaking, "
        "not from the model (e.g. texts the tokenizer cannot read)"
      )
  return ""


def _wall_before(vdir: Any, lead: bool) -> float:
  """Wall seconds of the variant's earlier attempts, and marks this attempt's start (W/<variant>/wall.json).

  A killed attempt counts until the last file it wrote in the folder (its
  last checkpoint or log line); what came after was lost and is redone.
  """
  rec = read_json(vdir / WALL) or {}
  spent = float(rec.get("seconds", 0.0))
  if "started" in rec and io_utils.is_local(vdir):  # an attempt that did not finish
    last = max(
      (os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(os.fspath(vdir)) for f in fs if f != WALL),
      default=rec["started"],
    )
    spent += max(0.0, last - float(rec["started"]))
  if lead:
    io_utils.write_text_atomic(vdir / WALL, json.dumps({"seconds": spent, "started": time.time()}))
  return spent


def _prepare(vdir: Any, digest: str, rerun: bool, lead: bool) -> None:
  """Moves a folder of another config (or any, with rerun) aside, then stamps the folder with `digest`."""
  if lead:
    stamp = read_json(vdir / STAMP)
    if vdir.exists() and (rerun or stamp is None or stamp.get("config_digest") != digest):
      old = (stamp or {}).get("config_digest") or "unknown"
      dest = vdir.parent / SUPERSEDED / f"{vdir.name}-{old}"
      dest.parent.mkdir(parents=True, exist_ok=True)
      if dest.exists():
        dest.rmtree()
      vdir.rename(dest)
      _say(f"{vdir.name}: earlier run (config {old}) moved to {dest}")
    vdir.mkdir(parents=True, exist_ok=True)
    io_utils.write_text_atomic(vdir / STAMP, json.dumps({"config_digest": digest}))
  distributed.barrier(f"laspar_study_prepare_{vdir.name}")


def _train_index_evaluate(config: ml_collections.ConfigDict, vdir: Any, *, progress: bool) -> dict[str, Any]:
  """train_lib in `vdir`, then the saved encoder through `evaluate.evaluate_config` (every host indexes)."""
  config = config.copy_and_resolve_references()
  config.train.final_eval = False  # evaluated below, with the efficiency report
  t0 = time.time()
  trained = train_lib.train_and_evaluate(config, vdir)
  if trained["preempted"]:
    return {"preempted": True, "steps": trained["step"]}
  distributed.barrier("laspar_study_trained")
  t_train = time.time() - t0
  encoder, tokenizer = sparse_encoder.load_encoder(os.fspath(vdir / "encoder"))
  out_dir = vdir / "eval" / str(trained["step"])
  res = {
    "steps": int(trained["step"]),
    "train_seconds": t_train,
    "encoder": os.fspath(vdir / "encoder"),
    "encoder_fingerprint": encode.encoder_fingerprint(encoder),
    "encoder_params": encode.params_digest(encoder),
    "train_metrics": trained["train"],
  }
  out = evaluate.evaluate_config(
    encoder,
    tokenizer,
    config.eval,
    out_dir,
    progress=progress and distributed.is_lead(),
    efficiency=True,
    all_hosts=True,
  )
  res.update(_measures(out))
  return res


def _zeroshot(config: ml_collections.ConfigDict, vdir: Any, *, progress: bool) -> dict[str, Any]:
  """An untrained (zero-shot) encoder of the config through `evaluate.evaluate_config` in vdir/eval/0.

  The encoder is `config.model` (`config_lib.encoder_fields`), or, for configs
  with a `zeroshot` section, `zeroshot.encoder_fields` of it.
  """
  config = config.copy_and_resolve_references()
  if config.get("zeroshot") is not None and config.zeroshot.get("preset"):
    fields, ev = zeroshot.encoder_fields(config.zeroshot)
    config.eval.update(ev)
  else:
    fields = config_lib.encoder_fields(config)
  cfg = sparse_encoder.EncoderConfig(**fields)
  encoder, tokenizer = sparse_encoder.build_encoder(cfg)
  out = evaluate.evaluate_config(
    encoder,
    tokenizer,
    config.eval,
    vdir / "eval" / "0",
    progress=progress and distributed.is_lead(),
    efficiency=True,
    all_hosts=True,
  )
  return {"steps": 0, "encoder_fingerprint": cfg.fingerprint(), **_measures(out)}


def _measures(out: Mapping[str, Any]) -> dict[str, Any]:
  """What a variant's result keeps of an `evaluate.evaluate_config` report (empty on the other hosts)."""
  if not out:
    return {}
  keep = ("flops_per_query", "active_q", "active_d", "n_queries", "index", "index_seconds", "eval_seconds")
  keep += ("docs_cut", "docs_max_length", "queries_cut", "queries_max_length")
  return {
    "metrics": {k: float(v) for k, v in out["metrics"].items()},
    **{k: out.get(k) for k in keep},
    "run": os.fspath(out["run_path"]) if out.get("run_path") else None,
    "efficiency": {k: v for k, v in (out.get("efficiency") or {}).items() if isinstance(v, (int, float))},
  }


# ----------------------------------------------------------------------------- the results table


def table_rows(
  module: types.ModuleType, arg: str, root: Any, overrides: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
  """The result.json of every variant of VARIANTS that has one, in VARIANTS order.

  A finished result whose digest is not its variant's current config's gets status "stale".
  """
  rows = []
  for v in module.VARIANTS:
    res = read_json(root / v / RESULT)
    if res is None:
      continue
    try:
      current = config_digest(variant_config(module, v, arg, overrides))
    except Exception:  # pylint: disable=broad-except  (a variant whose config no longer builds)
      current = None
    if res.get("status") in FINISHED and res.get("config_digest") != current:
      res["status"] = "stale"
    rows.append(res)
  return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  measures: dict[str, None] = {}
  for r in rows:
    measures.update(dict.fromkeys(r.get("metrics") or {}))
  return list(measures)


def _cell(v: Any, fmt: str) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "" if v is None else str(v)
  return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """(header, cells) shared by the markdown and CSV tables."""
  measures = _columns(rows)
  header = ["variant", "status", *measures, "FLOPS/query", "active dims q", "active dims d", "steps", "wall s"]
  cells = []
  for r in rows:
    m = r.get("metrics") or {}
    cells.append(
      [
        r["variant"],
        r.get("status", ""),
        *(_cell(m.get(k), ".4f") for k in measures),
        _cell(r.get("flops_per_query"), ".4g"),
        _cell(r.get("active_q"), ".1f"),
        _cell(r.get("active_d"), ".1f"),
        _cell(r.get("steps"), "d"),
        _cell(r.get("wall_seconds"), ".0f"),
      ]
    )
  return header, cells


def write_tables(root: Any, rows: Sequence[Mapping[str, Any]], *, title: str = "") -> None:
  """W/results.md (a markdown table; failures listed below it) and W/results.csv (same columns + error)."""
  header, cells = _table(rows)
  md = [
    f"# Study results{': ' + title if title else ''}",
    "",
    "| " + " | ".join(header) + " |",
    "|" + " --- |" * len(header),
  ]
  md += ["| " + " | ".join(c) + " |" for c in cells]
  md += [
    "",
    "FLOPS/query: multiply-adds of term-at-a-time scoring (the sum of the posting-list lengths of "
    "each query's dims), mean over the evaluated queries; active dims: mean nonzero dims per query / "
    "per document of the index. stale: finished with an earlier config of the variant. suspect: finished, "
    "but every measure is 0 (no relevant document retrieved: check the collection cut and the model). "
    "wall s: the whole variant, summed over its attempts (a killed one counts until its last write).",
    "",
  ]
  failed = [r for r in rows if r.get("status") == "failed"]
  if failed:
    md += ["## Failed variants", ""] + [f"- {r['variant']}: `{r.get('error', '')}`" for r in failed] + [""]
  suspect = [r for r in rows if r.get("status") == "suspect"]
  if suspect:
    md += ["## Suspect variants", ""] + [f"- {r['variant']}: {r.get('note', '')}" for r in suspect] + [""]
  io_utils.write_text_atomic(root / "results.md", "\n".join(md))
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow([*header, "config digest", "error"])
  for r, c in zip(rows, cells):
    writer.writerow([*c, r.get("config_digest", ""), r.get("error", "")])
  io_utils.write_text_atomic(root / "results.csv", buf.getvalue())
