"""SMART collections beyond Cranfield: marker variants, extra fields, qrels layouts, Cranfield-only rules."""

import pytest

from laspar_jax.data import smart
from laspar_jax.data.sources import DataFormatError, load_collection

# CISI-like records: markers with trailing blanks, .A/.B/.K/.X fields, an abstract that
# starts like the title (only Cranfield strips that).
DOCS = (
  ".I 1\n.T \nsparse retrieval\n.A  \nSmith, J.\n.W\t\nsparse retrieval with learned weights\n"
  "works well .\n.K \nindexing; retrieval\n.X  \n1\t5\t1\n2\t5\t1\n"
  ".I 2\n.T\ndense retrieval\n.A\nDoe, A.\n.B\nJ. Doc. 3, 1970\n.W \nneural encoders embed texts .\n"
  ".X\n2\t6\t2\n"
  ".I 3\n.T  \nquery expansion\n.W  \nterms are added to queries .\n.C\ncategory line\n"
)
QUERIES = ".I 1 \n.W  \nhow do learned sparse models index ?\n.I 2\n.W\nwhat embeds texts ?\n.I 5\n.W\nexpansion\n"


def _write(d, qrels, docs=DOCS, names=("CISI.ALL", "CISI.QRY", "CISI.REL")):
  d.mkdir(exist_ok=True)
  (d / names[0]).write_text(docs)
  (d / names[1]).write_text(QUERIES)
  (d / names[2]).write_text(qrels)
  return d


def test_marker_lines():
  assert smart.marker(".T") == ("T", "") and smart.marker(".W  \t") == ("W", "")
  assert smart.marker(".I 12 ") == ("I", "12") and smart.marker(".I") == ("I", None)
  assert smart.marker(".Title") is None and smart.marker(".T x") is None and smart.marker(".5") is None


def test_trailing_blank_markers_and_fields(tmp_path):
  c = load_collection(_write(tmp_path / "c", "1 1 0 0.000000\n"))
  d1, d2, d3 = c.doc("1"), c.doc("2"), c.doc("3")
  assert d1.title == "sparse retrieval"  # not lost, no author glued on
  # Not Cranfield: the title repeated at the start of the abstract stays.
  assert d1.text == "sparse retrieval with learned weights works well ."
  assert d2 == ("2", "dense retrieval", "neural encoders embed texts .")
  assert d3.text == "terms are added to queries ."
  for d in (d1, d2, d3):  # no author, source, keyword, category or cross-reference leaks
    for leak in ("Smith", "Doe", "J. Doc", "indexing", "category", "\t", " 5 1"):
      assert leak not in d.title + " " + d.text, (d, leak)
  assert list(c.docs()) == [d1, d2, d3]  # streamed == random access
  kw = load_collection(tmp_path / "c", keywords=True)
  assert kw.doc("1").text.endswith("works well . indexing; retrieval") and kw.doc("2") == d2
  assert list(kw.docs())[0] == kw.doc("1")


def test_query_ids_are_record_numbers_outside_cranfield(tmp_path):
  c = load_collection(_write(tmp_path / "c", "1 1 0 0.000000\n5 3 0 0.000000\n"))
  assert set(c.queries) == {"1", "2", "5"} and c.queries["5"] == "expansion"
  assert c.qrels == {"1": {"1": 1}, "5": {"3": 1}}


@pytest.mark.parametrize(
  "qrels,layout",
  [
    ("1 1 0 0.000000\n1 2 0 0.000000\n2 2 0 0.000000\n", "smart"),
    ("1 0 1 1\n1 0 2 1\n2 0 2 1\n", "trec"),
    ("1 1 1\n1 2 2\n2 2 1\n", "cranfield"),
  ],
)
def test_qrels_layouts_detected(tmp_path, qrels, layout):
  d = _write(tmp_path / "c", qrels)
  assert smart.detect_qrels_layout(d / "CISI.REL", {"1", "2", "3"}.__contains__, three_columns="cranfield") == layout
  c = load_collection(d)
  assert set(c.judged_queries) == {"1", "2"} and set(c.qrels["1"]) == {"1", "2"}
  assert not c.problems.counts


def test_smart_layout_zero_padded_ids(tmp_path):
  c = load_collection(_write(tmp_path / "c", "01 0001 0 0\n02 2 0 0\n"))
  assert c.qrels == {"1": {"1": 1}, "2": {"2": 1}}


def test_forced_layout_and_errors_name_file_and_layout(tmp_path):
  d = _write(tmp_path / "c", "9 1 0 0.000000\n")  # a file that judges no known query
  with pytest.raises(DataFormatError, match=r"CISI.REL: no judged queries .*'smart' qrels layout"):
    load_collection(d)
  _write(d, "1 1 0 0.000000\n2 2 0 0.000000\n")
  with pytest.raises(DataFormatError, match=r"CISI.REL: no judged queries .*'trec' qrels layout"):
    load_collection(d, qrels_layout="trec")
  # A file losing many of its lines to unknown ids is an error, not warnings.
  _write(d, "".join(f"1 {i} 0 0.000000\n" for i in (1, 2, 3, 7, 8, 9)))
  with pytest.raises(DataFormatError, match=r"CISI.REL: 3 of 6 qrels lines name unknown .*'smart'"):
    load_collection(d)


def test_cranfield_rules_only_for_cranfield(tmp_path):
  d = _write(tmp_path / "cran", "1 1 2\n2 2 1\n", names=("cran.all.1400", "cran.qry", "cranqrel"))
  c = load_collection(d)
  assert c.doc("1").text == "with learned weights works well ."  # repeated title stripped
  assert set(c.queries) == {"1", "2", "3"} and c.queries["3"] == "expansion"  # positions
  assert c.qrels == {"1": {"1": 3}, "2": {"2": 4}}


def test_shared_cranfield_unchanged(shared_data):
  c = load_collection(shared_data / "cranfield")
  assert (c.num_docs, len(c.queries), len(c.qrels), sum(map(len, c.qrels.values()))) == (1400, 225, 225, 1837)
  assert c.doc("1").text.startswith("an experimental study") and "brenckman" not in c.doc("1").text
  assert c.queries["3"].startswith("what problems of heat conduction in composite slabs")
  assert dict(c.problems.counts) == {"empty_doc": 2}
