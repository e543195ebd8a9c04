"""launch/study.py + laspar_jax/study.py: variants through train -> index -> evaluate -> one table; reruns skip."""

import csv
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from configs.decoder import common as decoder_common
from laspar_jax import study

REPO = pathlib.Path(__file__).resolve().parents[1]
RQ2 = REPO / "configs" / "decoder" / "rq2_backbones.py"
FIXTURES = REPO / "tests" / "fixtures"

# An experiment config as configs/decoder/*.py (contract D): VARIANTS + get_config("variant=NAME[,tiny]").
CONFIG_MODULE = textwrap.dedent("""
    from configs import common, laspar

    VARIANTS = ("t5_multi_token", "opt_causal", "broken")
    COLLECTION = {collection!r}
    FIXTURES = {fixtures!r}


    def get_config(arg=None):
      a = common.parse_arg(arg, variant="t5_multi_token", tiny=False, steps=2)
      if a.variant == "broken":
        raise ValueError("this variant does not build")
      c = laspar.get_config("runlocal")
      c.model.backbone = FIXTURES + ("/t5_flan" if a.variant.startswith("t5") else "/opt_pre")
      c.model.head = "mlm"
      c.model.head_kwargs = {{"pooling": "max"}}
      c.model.decoding = "multi_token" if a.variant.startswith("t5") else "plain"
      c.model.query_max_len = 12
      c.model.doc_max_len = 16
      c.data.collection = COLLECTION
      c.data.teacher = "none"
      c.data.prefetch = 0
      c.loss.distill = ""
      c.loss.regularizers = {{"q_flops": common.regularizer("flops", "q", 1e-3),
                             "d_flops": common.regularizer("flops", "d", 1e-3)}}
      c.loss.reg_warmup_steps = 2
      c.optim.batch_size = 8
      c.optim.warmup_steps = 1
      c.train.total_steps = a.steps
      c.train.dropout = False
      c.train.q_topk = 0
      c.train.d_topk = 0
      c.train.log_every = 1
      c.train.checkpoint_every = 2
      c.eval.collection = COLLECTION
      c.eval.split = "test"
      c.eval.measures = "nDCG@10,RR@10,R@100"
      c.eval.batch_size = 8
      c.eval.search_threads = 1
      return c
    """)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(folder, a test-local experiment config module over the tiny collection in folder/tiny_beir)."""
  root = tmp_path_factory.mktemp("study")
  coll = decoder_common.write_tiny_collection(root / "tiny_beir")
  module = root / "tiny_study.py"
  module.write_text(CONFIG_MODULE.format(collection=str(coll), fixtures=str(FIXTURES)))
  return root, module


def _launch(*args, cwd, env=None):
  """launch/study.py in a subprocess."""
  return subprocess.run(
    [sys.executable, str(REPO / "launch" / "study.py"), *map(str, args)],
    capture_output=True,
    text=True,
    cwd=cwd,
    timeout=600,
    env=env,
  )


def test_rq2_two_variants_end_to_end_then_rerun_skips(setup):
  """configs/decoder/rq2_backbones.py:tiny through launch/study.py: tiny random Flan-T5 and OPT."""
  root, _ = setup
  coll = root / "tiny_beir"
  w = root / "rq2"
  # One CPU device: the tiny models compile in half the time of the 8-device mesh of the other tests.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  out = _launch(
    "--config",
    f"{RQ2}:tiny,data={coll}",
    "--workdir",
    w,
    "--variants",
    "opt_350m,flan_t5_multi_token",
    "--noprogress",
    cwd=root,
    env=env,
  )  # from outside the repository
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  lines = [x for x in out.stdout.splitlines() if re.match(r"\w+: (ok|skipped|failed)", x)]
  assert [x.split(":")[0] for x in lines] == ["flan_t5_multi_token", "opt_350m"]  # VARIANTS order
  for v in ("flan_t5_multi_token", "opt_350m"):
    r = json.loads((w / v / "result.json").read_text())
    assert r["status"] == "ok" and r["kind"] == "trained" and r["steps"] == 3
    assert set(r["metrics"]) == {"nDCG@10", "RR@10", "R@100"}
    assert all(math.isfinite(x) for x in r["metrics"].values())
    assert r["flops_per_query"] > 0 and 0 < r["active_q"] <= 16 and 0 < r["active_d"] <= 32
    assert r["encoder_fingerprint"] and r["wall_seconds"] > 0
    assert (w / v / "encoder" / "encoder_config.json").is_file()
    assert (w / v / "eval" / "3" / "run.trec").is_file() and (w / v / "eval" / "3" / "metrics.json").is_file()
  enc = json.loads((w / "flan_t5_multi_token" / "encoder" / "encoder_config.json").read_text())
  assert enc["decoding"] == "multi_token"
  rows = list(csv.DictReader((w / "results.csv").open()))
  assert [(r["variant"], r["status"], r["steps"]) for r in rows] == [
    ("flan_t5_multi_token", "ok", "3"),
    ("opt_350m", "ok", "3"),
  ]
  for r in rows:
    for k in ("nDCG@10", "RR@10", "R@100", "FLOPS/query", "active dims q", "active dims d", "wall s"):
      assert math.isfinite(float(r[k])), (k, r)
  md = (w / "results.md").read_text()
  assert "| variant | status | nDCG@10 | RR@10 | R@100 | FLOPS/query | active dims q | active dims d |" in md
  assert "| flan_t5_multi_token | ok |" in md and "| opt_350m | ok |" in md

  # A rerun skips both: result.json untouched, nothing trained.
  mtimes = {v: (w / v / "result.json").stat().st_mtime_ns for v in ("flan_t5_multi_token", "opt_350m")}
  res = study.run_study(RQ2, f"tiny,data={coll}", w, variants=["flan_t5_multi_token", "opt_350m"], progress=False)
  assert [(r["variant"], r["status"]) for r in res] == [("flan_t5_multi_token", "skipped"), ("opt_350m", "skipped")]
  assert {v: (w / v / "result.json").stat().st_mtime_ns for v in mtimes} == mtimes


def test_zeroshot_variant_is_evaluated_without_training(setup):
  """An rq1 variant (config.zeroshot.preset set) goes through evaluate.evaluate_config untrained: no train/."""
  root, _ = setup
  w = root / "rq1"
  rq1 = REPO / "configs" / "decoder" / "rq1_zeroshot.py"
  (r,) = study.run_study(rq1, f"tiny,data={root / 'tiny_beir'}", w, variants=["opt_350m"], progress=False)
  assert r["status"] == "ok" and r["kind"] == "zeroshot" and r["steps"] == 0, r.get("traceback")
  assert set(r["metrics"]) == {"nDCG@10", "RR@10", "R@100"} and all(map(math.isfinite, r["metrics"].values()))
  assert r["flops_per_query"] > 0 and r["active_q"] > 0 and r["active_d"] > 0
  assert (w / "opt_350m" / "eval" / "0" / "run.trec").is_file() and not (w / "opt_350m" / "checkpoints").exists()
  assert json.loads((w / "opt_350m" / "eval" / "0" / "metrics.json").read_text())["flops_per_query"] > 0
  assert [x["variant"] for x in csv.DictReader((w / "results.csv").open())] == ["opt_350m"]


def test_a_failing_variant_is_recorded_and_the_exit_status_is_1(setup):
  root, module = setup
  w = root / "w_broken"
  out = _launch("--config", f"{module}:tiny", "--workdir", w, "--variants", "broken", cwd=root)
  assert out.returncode == 1 and "broken: failed" in out.stdout and "does not build" in out.stdout
  bad = json.loads((w / "broken" / "result.json").read_text())
  assert bad["status"] == "failed" and "this variant does not build" in bad["error"] and bad["traceback"]
  rows = list(csv.DictReader((w / "results.csv").open()))
  assert [(r["variant"], r["status"]) for r in rows] == [("broken", "failed")]
  assert "this variant does not build" in rows[0]["error"]
  assert "## Failed variants" in (w / "results.md").read_text()


def test_skip_resume_and_supersede_rules(setup, tmp_path, monkeypatch):
  """Which folders count as finished: same digest + ok; a changed config or --rerun starts afresh."""
  _, module = setup
  calls = []

  def fake(config, vdir, *, progress):
    calls.append(vdir.name)
    (vdir / "marker").write_text("x")
    return {
      "steps": int(config.train.total_steps),
      "metrics": {"nDCG@10": 0.5},
      "flops_per_query": 3.0,
      "active_q": 2.0,
      "active_d": 4.0,
    }

  monkeypatch.setattr(study, "_train_index_evaluate", fake)
  w = tmp_path / "w"
  run = lambda **kw: {
    r["variant"]: r["status"]
    for r in study.run_study(
      module, kw.pop("arg", "tiny"), w, variants=["t5_multi_token", "opt_causal"], progress=False, **kw
    )
  }
  assert run() == {"t5_multi_token": "ok", "opt_causal": "ok"} and calls == ["t5_multi_token", "opt_causal"]
  assert run() == {"t5_multi_token": "skipped", "opt_causal": "skipped"} and len(calls) == 2
  # A half-written folder (no result.json) of the same config resumes in place.
  (w / "opt_causal" / "result.json").unlink()
  assert run()["opt_causal"] == "ok" and calls[-1] == "opt_causal" and len(calls) == 3
  assert not (w / "superseded").exists()
  # A changed config reruns (the old folder moved aside); the table marks nothing stale then.
  assert run(overrides={"train.total_steps": 3}) == {"t5_multi_token": "ok", "opt_causal": "ok"}
  assert len(calls) == 5 and len(list((w / "superseded").iterdir())) == 2
  rows = list(csv.DictReader((w / "results.csv").open()))
  assert [(r["status"], r["steps"]) for r in rows] == [("ok", "3"), ("ok", "3")]
  # The table of the configs without the override: finished with another config = stale.
  study.write_tables(w, study.table_rows(study.load_module(module), "tiny", w))
  assert [r["status"] for r in csv.DictReader((w / "results.csv").open())] == ["stale", "stale"]
  assert run(rerun=True, overrides={"train.total_steps": 3}) == {"t5_multi_token": "ok", "opt_causal": "ok"}
  assert len(calls) == 7
  with pytest.raises(ValueError, match="unknown variants"):
    study.run_study(module, "tiny", w, variants=["nope"])
