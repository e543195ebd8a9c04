"""The one TREC run reader and writer (data/formats.py)."""

import ir_measures
import pytest

from laspar_jax.data import formats
from laspar_jax.data.formats import DataFormatError


def test_write_then_read_roundtrip(tmp_path):
  run = {"q2": {"d1": 0.5}, "q1": {"d8": 1.0, "d9": 3.0, "d7": 1.0}}
  path = formats.write_trec_run(run, tmp_path / "sub" / "x.run", tag="t")
  assert isinstance(path, str) and path.endswith("x.run")
  lines = open(path).read().splitlines()
  assert lines == ["q1 Q0 d9 1 3.000000 t", "q1 Q0 d7 2 1.000000 t", "q1 Q0 d8 3 1.000000 t", "q2 Q0 d1 1 0.500000 t"]
  back = formats.read_trec_run(path)
  assert back == run and list(back["q1"]) == ["d9", "d7", "d8"]
  assert len(list(ir_measures.read_trec_run(path))) == 4
  assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "x.run"]  # no temp left


def test_read_depth_orders_by_score_not_rank(tmp_path):
  p = tmp_path / "run.txt"
  p.write_text("q1 Q0 d9 1 1.5 t\nq1 Q0 d8 2 2.5 t\r\n\nq1 Q0 d7 3 -1 t\nq1 Q0 d6 4 1.5 t\n")
  assert list(formats.read_trec_run(p)["q1"]) == ["d8", "d9", "d6", "d7"]  # ties: file order
  assert formats.read_trec_run(p, depth=2) == {"q1": {"d8": 2.5, "d9": 1.5}}


@pytest.mark.parametrize(
  "text, msg",
  [
    ("q1 Q0 d9 1 1.5 t\nq1 Q0 d8 2\n", "run.txt:2: run line has 4 columns"),
    ("q1 Q0 d9 1 x t\n", "run.txt:1: bad score 'x'"),
    ("q1 Q0 d9 1 1 t\nq1 Q0 d9 2 0 t\n", "run.txt:2: document 'd9' listed twice"),
  ],
)
def test_read_errors_name_file_and_line(tmp_path, text, msg):
  p = tmp_path / "run.txt"
  p.write_text(text)
  with pytest.raises(DataFormatError, match=msg):
    formats.read_trec_run(p)
