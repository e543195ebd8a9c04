"""The README's tiny study example on the shared SciFact cut: the cut keeps every judged document of the
evaluated queries, both variants score above 0; a variant whose every measure is 0 is "suspect"."""

import json
import pathlib

import pytest

from laspar_jax import study
from laspar_jax.data import sources
from laspar_jax.data.collection import CutCorpus

REPO = pathlib.Path(__file__).resolve().parents[1]
RQ2 = REPO / "configs" / "decoder" / "rq2_backbones.py"


def test_cut_corpus_keeps_the_judged_documents(shared_data):
  coll = sources.load_collection(shared_data / "scifact", split="test")
  cut = CutCorpus(coll, 256, max_queries=16)
  ids = [d.doc_id for d in cut.docs()]
  judged = {d for q in sorted(coll.judged_queries)[:16] for d in coll.qrels[q]}
  assert len(ids) == cut.num_docs == 256 and len(set(ids)) == 256
  assert judged <= set(ids)
  order = {d.doc_id: i for i, d in enumerate(coll.docs())}
  assert [order[i] for i in ids] == sorted(order[i] for i in ids)  # corpus order
  assert CutCorpus(coll, 4, max_queries=16).num_docs == len(judged)  # never fewer than the judged ones


def test_readme_tiny_study_scores_above_zero(tmp_path):
  """python launch/study.py --config configs/decoder/rq2_backbones.py:tiny --variants flan_t5_multi_token,opt_350m"""
  res = study.run_study(RQ2, "tiny", tmp_path / "w", variants=["flan_t5_multi_token", "opt_350m"], progress=False)
  for r in res:
    assert r["status"] in ("ok", "suspect"), (r["variant"], r.get("error"))
    assert r["metrics"]["nDCG@10"] > 0 and r["metrics"]["R@100"] > 0 and r["wall_seconds"] > 0, r["metrics"]
    # The tiny random backbones read SciFact's words as unknown tokens: when every document then scores the
    # same, the runner says so instead of calling the tie-broken figures "ok".
    assert r["status"] == "ok" or "tie-breaking" in r["note"], r


def test_all_zero_measures_are_suspect_and_wall_time_spans_attempts(tmp_path, monkeypatch):
  calls = []

  def zero(config, vdir, *, progress):
    calls.append(vdir)
    return {"steps": 1, "metrics": {"nDCG@10": 0.0, "RR@10": 0.0}}

  monkeypatch.setattr(study, "_train_index_evaluate", zero)
  w = tmp_path / "w"
  (w / "opt_350m").mkdir(parents=True)
  (r,) = study.run_study(RQ2, "tiny", w, variants=["opt_350m"], progress=False)
  assert r["status"] == "suspect"
  assert "| opt_350m | suspect |" in (w / "results.md").read_text()
  # A rerun skips it like a finished variant.
  (r2,) = study.run_study(RQ2, "tiny", w, variants=["opt_350m"], progress=False)
  assert r2["status"] == "skipped" and len(calls) == 1


def test_wall_time_counts_a_killed_attempt(tmp_path):
  vdir = tmp_path / "v"
  vdir.mkdir()
  (vdir / "wall.json").write_text(json.dumps({"seconds": 5.0, "started": 1000.0}))
  f = vdir / "history.jsonl"
  f.write_text("{}\n")
  import os  # pylint: disable=import-outside-toplevel

  os.utime(f, (1030.0, 1030.0))  # the killed attempt's last write, 30 s after it started
  spent = study._wall_before(vdir, lead=True)  # pylint: disable=protected-access
  assert spent == pytest.approx(35.0)
  rec = json.loads((vdir / "wall.json").read_text())
  assert rec["seconds"] == pytest.approx(35.0) and rec["started"] > 1030.0


def test_tied_run_is_suspect(tmp_path):
  run = tmp_path / "run.trec"
  run.write_text("1 Q0 a 1 2.5 x\n1 Q0 b 2 2.5 x\n2 Q0 a 1 1.0 x\n2 Q0 c 2 1.0 x\n")
  assert "tie-breaking" in study._suspect({"metrics": {"nDCG@10": 0.3}, "run": str(run)})  # pylint: disable=protected-access
  run.write_text("1 Q0 a 1 2.5 x\n1 Q0 b 2 2.0 x\n")
  assert study._suspect({"metrics": {"nDCG@10": 0.3}, "run": str(run)}) == ""  # pylint: disable=protected-access
