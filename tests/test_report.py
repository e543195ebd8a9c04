"""laspar_jax.report / launch/report.py: two small runs -> the markdown page and every plot."""

import json
import os
import subprocess
import sys

import numpy as np
from matplotlib import image as mpimg

from laspar_jax import metric_writers
from laspar_jax import report
from laspar_jax.index import build_index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_run(path, *, seed, dim=512, n_docs=300, steps=(2, 4, 6)):
  """A workdir as training leaves it: history.jsonl, eval/<step>/metrics.json and eval/<step>/index."""
  rng = np.random.default_rng(seed)
  rows = []
  for s in steps:
    w = 5e-3 * min(1.0, s / 4) ** 2
    rows.append(
      {
        "step": s,
        "train/loss": 2.0 / s,
        "train/ranking/inbatch_ce": 1.0 / s,
        "train/ranking/inbatch_ce/acc": 0.5,
        "train/distill/dense_kl": 0.5 / s,
        "train/reg/q_flops": 0.1 * s,
        "train/reg/q_flops_weight": w,
        "train/reg/d_flops": 0.2 * s,
        "train/reg/d_flops_weight": w,
        "train/active_q": 16.0,
        "train/active_d": 32.0,
        "train/flops_est": 3.0 + s,
        "train/lr": 1e-4,
      }
    )
  for s in steps[1:]:
    ndcg = 0.3 + 0.05 * s + 0.01 * seed
    rows.append({"step": s, "eval/nDCG@10": ndcg, "eval/RR@10": ndcg - 0.05})
    out = path / "eval" / str(s)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(
      json.dumps({"nDCG@10": ndcg, "RR@10": ndcg - 0.05, "active_q": 16.0, "active_d": 32.0})
    )
    # Zipf-like dims so the posting-list lengths spread over decades.
    idx = np.minimum(rng.zipf(1.3, size=(n_docs, 32)) - 1, dim - 1).astype(np.int32)
    val = rng.random((n_docs, 32), dtype=np.float32)
    build_index([([f"d{i}" for i in range(n_docs)], idx, val)], out / "index", dim)
  path.mkdir(exist_ok=True)
  (path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_launch_report_two_runs(tmp_path):
  a = _make_run(tmp_path / "sweep" / "run_a", seed=0)
  b = _make_run(tmp_path / "sweep" / "run_b", seed=1)
  out = tmp_path / "report"
  res = subprocess.run(
    [sys.executable, os.path.join(REPO, "launch", "report.py"), f"--workdir={a},{b}", f"--out={out}"],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads((out / "report.json").read_text())
  plots = summary["plots"]
  assert set(plots) == {"curves_run_a.png", "curves_run_b.png", "tradeoff.png", "postings.png", "active_dims.png"}
  page = (out / "report.md").read_text()
  for name, labels in plots.items():
    img = mpimg.imread(out / name)  # decodes the PNG
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert f"]({name})" in page
    assert labels["title"] and labels["axes"]
    for ax in labels["axes"]:
      assert ax["title"] and ax["xlabel"] and ax["ylabel"], (name, ax)
  assert "run_a" in page and "run_b" in page and "nDCG@10" in page
  # Both evaluations of both runs are on the trade-off plot, with a positive FLOPS estimate.
  pts = summary["tradeoff"]
  assert sorted((p["run"], p["step"]) for p in pts) == [("run_a", 4), ("run_a", 6), ("run_b", 4), ("run_b", 6)]
  assert all(p["flops"] > 0 and p["source"] == "estimated" for p in pts)
  # The same two runs found from the sweep folder.
  assert [r.name for r in report.find_runs([tmp_path / "sweep"])] == ["run_a", "run_b"]


def test_curve_groups_and_flops():
  rows = [
    {
      "step": 1,
      "train/loss": 1.0,
      "train/reg/q_flops": 0.1,
      "train/reg/q_flops_weight": 1e-4,
      "train/ranking/inbatch_ce/acc": 0.5,
      "train/active_q": 8.0,
      "train/flops_est": 2.0,
      "eval/nDCG@10": 0.5,
      "eval/active_q": 8.0,
    }
  ]
  g = report.curve_groups(rows)
  assert g["loss terms"] == ["train/loss", "train/reg/q_flops"]
  assert g["regularizer weights"] == ["train/reg/q_flops_weight"]
  assert g["active dims"] == ["train/active_q"] and g["evaluation"] == ["eval/nDCG@10"]
  # Lengths 1 and 3: a query dim meets (1 + 9) / 4 = 2.5 postings on average; 4 dims -> 10.
  assert report.flops_per_query({"active_q": 4.0}, np.array([1, 3, 0])) == (10.0, "estimated")
  assert report.flops_per_query({"flops_per_query": 7.0}, None) == (7.0, "measured")
  assert report.flops_per_query({"active_q": 4.0}, None) == (None, "")


def test_write_hparams_tensorboard(tmp_path):
  """MetricWriter.write_hparams (TensorBoard's HParams tab + text); lives here beside the report tests."""
  w = metric_writers.MetricWriter(tmp_path)
  w.write_hparams(
    {"optim": {"lr": 1e-4, "freeze": ()}, "model": {"head": "latent_attention", "remat": False}, "seed": 0}
  )
  w.close()
  (event,) = (tmp_path / "tb").glob("events.out.tfevents.*")
  data = event.read_bytes()
  assert b"_hparams_/experiment" in data and b"optim/lr" in data and b"model/head" in data
  assert b"eval/nDCG_at_10" in data
