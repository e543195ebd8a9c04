"""load_collection over the three shared collections, and over ir_datasets offline."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

from laspar_jax.data import sources
from laspar_jax.data.sources import doc_text, load_collection

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_scifact_counts(shared_data):
  c = load_collection(shared_data / "scifact")
  assert (c.num_docs, len(c.queries)) == (5183, 1109)
  assert len(c.qrels) == 300 and sum(map(len, c.qrels.values())) == 339  # default split: test
  assert len(c.judged_queries) == 300
  assert sum(1 for _ in c.docs()) == 5183
  assert not c.problems.counts
  train = load_collection(shared_data / "scifact", split="train")
  assert len(train.qrels) == 809 and sum(map(len, train.qrels.values())) == 919


def test_scifact_doc_lookup_matches_stream(shared_data):
  c = load_collection(shared_data / "scifact")
  docs = list(c.docs())
  for d in (docs[0], docs[1234], docs[-1]):
    assert c.doc(d.doc_id) == d
  assert docs[0].title and doc_text(docs[0]).startswith(docs[0].title + " ")
  with pytest.raises(KeyError):
    c.doc("no-such-doc")
  first = json.loads(open(shared_data / "scifact" / "corpus.jsonl").readline())
  assert docs[0] == sources.Doc(first["_id"], first["title"], first["text"])


def test_msmarco_subset_counts(shared_data):
  c = load_collection(shared_data / "msmarco-dl19-subset")
  assert (c.num_docs, len(c.queries), len(c.qrels)) == (5000, 50, 43)
  assert sum(map(len, c.qrels.values())) == 4102
  assert {g for q in c.qrels.values() for g in q.values()} <= {0, 1, 2, 3}
  d = c.doc("4380635")
  assert d.title == "" and doc_text(d).startswith("Fahrenheit Scale")


def test_cranfield_counts_and_grades(shared_data):
  c = load_collection(shared_data / "cranfield")
  assert (c.num_docs, len(c.queries), len(c.qrels)) == (1400, 225, 225)
  assert sum(map(len, c.qrels.values())) == 1837
  grades = [g for q in c.qrels.values() for g in q.values()]
  # cranqrel: 128 x grade 1, 387 x 2, 734 x 3, 363 x 4, 225 x -1  ->  rel = 5 - grade, -1 -> 0.
  assert {g: grades.count(g) for g in set(grades)} == {4: 128, 3: 387, 2: 734, 1: 363, 0: 225}
  assert c.qrels["1"]["184"] == 3 and c.qrels["1"]["486"] == 0
  # Query ids are positions: the 3rd query of cran.qry is `.I 004` (heat conduction in
  # composite slabs), and qrels query 3 names the two-layer slab papers.
  assert "heat conduction in composite slabs" in c.queries["3"]
  assert "composite slab" in c.doc("91").title
  assert "chemically reacting gas" in c.queries["4"]
  d = c.doc("1")
  assert d.title.startswith("experimental investigation") and d.text.startswith("an experimental study")
  assert c.problems.counts == {"empty_doc": 2}  # docs 471 and 995 have no text: kept
  assert c.doc("471").text == ""


def test_tsv_layout(tmp_path):
  (tmp_path / "collection.tsv").write_text("0\tthe first passage\n1\tsecond one\r\n2\tthird\n")
  (tmp_path / "queries.dev.tsv").write_text("100\twhat is first\n101\tsecond?\n")
  (tmp_path / "qrels.dev.tsv").write_text("100\t0\t0\t1\n101 0 1 1\n")
  c = load_collection(tmp_path)
  assert c.num_docs == 3 and c.doc("1").text == "second one"
  assert c.queries == {"100": "what is first", "101": "second?"}
  assert c.qrels == {"100": {"0": 1}, "101": {"1": 1}}
  assert [d.doc_id for d in c.docs()] == ["0", "1", "2"]


def test_unknown_layout_and_id(tmp_path):
  with pytest.raises(FileNotFoundError, match="unknown layout"):
    load_collection(tmp_path)
  with pytest.raises(ValueError, match="not an ir_datasets id"):
    load_collection("no-such-dataset/at-all")


_IRDS_SCRIPT = textwrap.dedent("""
    import socket, sys, json
    def _no_net(*a, **k):
      raise RuntimeError("network access attempted")
    socket.socket.connect = _no_net
    socket.create_connection = _no_net
    socket.getaddrinfo = _no_net
    from laspar_jax.data.sources import load_collection, doc_text
    c = load_collection("beir/scifact", split="test")
    docs = c.docs()
    first = next(docs)
    n = 1 + sum(1 for _ in docs)
    print(json.dumps({"docs": n, "num_docs": c.num_docs, "queries": len(c.queries),
                      "judged": len(c.qrels), "pairs": sum(map(len, c.qrels.values())),
                      "first": first.doc_id, "title": first.title,
                      "lookup": c.doc("4983") == first}))
""")


def test_ir_datasets_offline(tmp_path, shared_data):
  """beir/scifact through ir_datasets, from a pre-placed source.zip and no network.

  ir_datasets (beir.py) reads `scifact/corpus.jsonl`, `scifact/queries.jsonl` and
  `scifact/qrels/<split>.tsv` from $IR_DATASETS_HOME/beir/scifact/source.zip; it
  checks the md5 of a file only while downloading it, so a present cache is used
  as is.
  """
  home = tmp_path / "irds"
  (home / "beir" / "scifact").mkdir(parents=True)
  src = shared_data / "scifact"
  with zipfile.ZipFile(home / "beir" / "scifact" / "source.zip", "w") as z:
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/train.tsv"):
      z.write(src / rel, f"scifact/{rel}")
  env = dict(os.environ, IR_DATASETS_HOME=str(home), IR_DATASETS_TMP=str(tmp_path / "tmp"), PYTHONPATH=str(REPO))
  out = subprocess.run(
    [sys.executable, "-c", _IRDS_SCRIPT], env=env, capture_output=True, text=True, timeout=120, check=False
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got == {
    "docs": 5183,
    "num_docs": 5183,
    "queries": 300,
    "judged": 300,
    "pairs": 339,
    "first": "4983",
    "lookup": True,
    "title": "Microstructural development of human newborn cerebral white matter "
    "assessed in vivo by diffusion tensor magnetic resonance imaging.",
  }
