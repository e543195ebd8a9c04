"""launch/index.py and launch/evaluate.py: absl flags, --config defaults, explicit flags win."""

import json
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax.index import Index  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, minilm_path):
  root = tmp_path_factory.mktemp("launch")
  bert = tiny_bert.write_tiny_bert(root / "bert", minilm_path)
  coll = root / "beir"
  (coll / "qrels").mkdir(parents=True)
  docs = [
    "cells divide by mitosis",
    "the river bank floods",
    "vitamin d and bone density",
    "zinc in the diet",
    "proteins fold into shapes",
    "a document about nothing",
  ]
  (coll / "corpus.jsonl").write_text(
    "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(docs))
  )
  (coll / "queries.jsonl").write_text(
    "".join(
      json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(["how do cells divide", "bone density"])
    )
  )
  (coll / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td2\t1\n")
  return root, bert, coll


def _run(script, *args, cwd):
  return subprocess.run(
    [sys.executable, str(REPO / "launch" / script), *map(str, args)],
    capture_output=True,
    text=True,
    cwd=cwd,
    check=True,
    timeout=600,
  )


def test_index_then_evaluate_from_a_config(tiny_setup):
  root, bert, coll = tiny_setup
  cfg = [
    f"--config={REPO / 'configs' / 'laspar.py'}:runlocal,D=512",
    f"--config.model.backbone={bert}",
    f"--config.eval.collection={coll}",
    "--config.eval.split=test",
    "--config.eval.d_topk=16",
  ]
  _run("index.py", *cfg, "--index", root / "ix", "--batch_size", 4, cwd=root)  # run outside the repository
  ix = Index.load(root / "ix")
  assert ix.n_docs == 6 and ix.dim == 512 and ix.manifest["metadata"]["k_doc"] == 16
  assert int(ix.doc_lengths.max()) <= 16
  out = _run(
    "evaluate.py",
    *cfg,
    "--index",
    root / "ix",
    "--run",
    root / "r.run",
    "--json",
    root / "m.json",
    "--measures",
    "RR@10,R@100",
    "--k_query",
    8,
    cwd=root,
  )
  report = json.loads((root / "m.json").read_text())
  assert set(report["metrics"]) == {"RR@10", "R@100"} and report["n_queries"] == 2
  assert report["metrics"]["R@100"] > 0 and (root / "r.run").exists()
  assert "effectiveness" in out.stdout


def test_flags_only_and_usage_errors(tiny_setup):
  root, bert, coll = tiny_setup
  _run(
    "index.py",
    "--encoder",
    bert,
    "--head",
    "latent_sum",
    "--latent_dim",
    256,
    "--collection",
    coll,
    "--index",
    root / "ix2",
    "--k_doc",
    8,
    cwd=root,
  )
  assert Index.load(root / "ix2").dim == 256
  bad = subprocess.run(
    [sys.executable, str(REPO / "launch" / "index.py"), "--index", root / "ix3"],
    capture_output=True,
    text=True,
    cwd=root,
  )
  assert bad.returncode != 0 and "give --encoder or --config" in bad.stderr
