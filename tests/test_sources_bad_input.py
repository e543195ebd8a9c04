"""Corrupted copies of each format: the documented rule when lenient, DataFormatError when strict."""

import shutil

import pytest

from laspar_jax.data import formats
from laspar_jax.data.sources import DataFormatError, load_collection


def _lines(path):
  return path.read_bytes().split(b"\n")


def _beir_copy(shared_data, tmp_path, n_docs=50):
  """A small BEIR dir: the first n_docs SciFact docs, its queries, the test qrels on them."""
  src = shared_data / "scifact"
  dst = tmp_path / "beir"
  (dst / "qrels").mkdir(parents=True)
  docs = _lines(src / "corpus.jsonl")[:n_docs]
  (dst / "corpus.jsonl").write_bytes(b"\n".join(docs) + b"\n")
  shutil.copy(src / "queries.jsonl", dst / "queries.jsonl")
  ids = {l.split(b'"')[3] for l in docs}
  qrels = [l for l in _lines(src / "qrels" / "test.tsv")[1:] if l.split(b"\t")[1:2] and l.split(b"\t")[1] in ids]
  (dst / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\r\n" + b"\n".join(qrels) + b"\n")
  return dst


def test_beir_clean_copy_loads(shared_data, tmp_path):
  d = _beir_copy(shared_data, tmp_path)
  c = load_collection(d, strict=True)
  assert c.num_docs == 50 and not c.problems.counts and c.qrels


def _corrupt(path, lineno, new: bytes):
  lines = _lines(path)
  lines[lineno - 1] = new
  path.write_bytes(b"\n".join(lines))


def test_beir_bad_json(shared_data, tmp_path):
  d = _beir_copy(shared_data, tmp_path)
  _corrupt(d / "corpus.jsonl", 3, b'{"_id": "x", "title": "t", "text": ')
  with pytest.raises(DataFormatError, match=r"corpus.jsonl:3: malformed JSON") as e:
    load_collection(d, strict=True)
  assert e.value.line == 3 and e.value.path.endswith("corpus.jsonl")
  c = load_collection(d)
  assert c.num_docs == 49 and c.problems.counts["malformed"] == 1


def test_beir_truncated_last_line(shared_data, tmp_path):
  d = _beir_copy(shared_data, tmp_path)
  data = (d / "corpus.jsonl").read_bytes().rstrip(b"\n")
  (d / "corpus.jsonl").write_bytes(data[:-40])  # cut inside the last record
  with pytest.raises(DataFormatError, match=r"corpus.jsonl:50:"):
    load_collection(d, strict=True)
  c = load_collection(d)
  assert c.num_docs == 49 and [x.doc_id for x in c.docs()][-1] == c.doc(list(c.doc_ids())[-1]).doc_id


def test_beir_bad_utf8(shared_data, tmp_path):
  d = _beir_copy(shared_data, tmp_path)
  lines = _lines(d / "corpus.jsonl")
  doc_id = lines[4].split(b'"')[3].decode()
  lines[4] = lines[4].replace(b'"text": "', b'"text": "\xff\xfe bad ', 1)
  (d / "corpus.jsonl").write_bytes(b"\n".join(lines))
  with pytest.raises(DataFormatError, match=r"corpus.jsonl:5: invalid UTF-8"):
    load_collection(d, strict=True)
  c = load_collection(d)
  assert c.num_docs == 50 and c.problems.counts["bad_utf8"] == 1
  assert c.doc(doc_id).text.startswith("\ufffd\ufffd bad ")
  assert [x for x in c.docs() if x.doc_id == doc_id][0].text.startswith("\ufffd\ufffd bad ")


def test_beir_duplicate_id_and_empty_query(shared_data, tmp_path):
  d = _beir_copy(shared_data, tmp_path)
  lines = _lines(d / "corpus.jsonl")
  first_id = lines[0].split(b'"')[3]
  lines[9] = b'{"_id": "' + first_id + b'", "title": "dup", "text": "a duplicate"}'
  (d / "corpus.jsonl").write_bytes(b"\n".join(lines))
  with pytest.raises(DataFormatError, match=r"corpus.jsonl:10: duplicate doc id .*first at line 1"):
    load_collection(d, strict=True)
  c = load_collection(d)
  assert c.num_docs == 49 and c.doc(first_id.decode()).title != "dup"  # first occurrence kept
  assert c.problems.counts["duplicate_id"] == 1

  d = _beir_copy(shared_data, tmp_path / "fresh")
  q = _lines(d / "queries.jsonl")
  q[0] = b'{"_id": "1", "text": "  "}'
  (d / "queries.jsonl").write_bytes(b"\n".join(q))
  with pytest.raises(DataFormatError, match=r"queries.jsonl:1: query '1' has no text"):
    load_collection(d, strict=True)
  assert "1" not in load_collection(d).queries


def test_beir_qrels_unknown_and_malformed(shared_data, tmp_path):
  d = _beir_copy(shared_data, tmp_path)
  qrels = d / "qrels" / "test.tsv"
  good = qrels.read_bytes()
  qrels.write_bytes(good + b"1\tno-such-doc\t1\r\n")
  with pytest.raises(DataFormatError, match=r"test.tsv:\d+: qrels name unknown document"):
    load_collection(d, strict=True)
  assert load_collection(d).problems.counts["unknown_doc"] == 1
  qrels.write_bytes(good + b"no-such-query\t" + _lines(d / "corpus.jsonl")[0].split(b'"')[3] + b"\t1\n")
  assert load_collection(d).problems.counts["unknown_query"] == 1
  qrels.write_bytes(good + b"1\t2\n3\t4\tx\n")
  c = load_collection(d)
  assert c.problems.counts["malformed"] == 2 and c.qrels


def test_tsv_corruptions(tmp_path):
  (tmp_path / "collection.tsv").write_bytes(
    b"0\tfirst\r\n1\tsecond \xc3\x28 bytes\n2 no tab here\n0\tdup of first\n3\t\n4\tlast trunc"
  )
  (tmp_path / "queries.tsv").write_bytes(b"10\tq ten\n11 missing tab\n10\tagain\n")
  (tmp_path / "qrels.txt").write_bytes(b"10 0 0 1\n10 0 99 1\n")
  with pytest.raises(DataFormatError, match=r"collection.tsv:2: invalid UTF-8"):
    load_collection(tmp_path, strict=True)
  c = load_collection(tmp_path)
  assert [d.doc_id for d in c.docs()] == ["0", "1", "3", "4"]
  assert c.doc("0").text == "first" and "\ufffd" in c.doc("1").text and c.doc("3").text == ""
  assert c.queries == {"10": "q ten"} and c.qrels == {"10": {"0": 1}}
  assert dict(c.problems.counts) == {"bad_utf8": 1, "malformed": 2, "duplicate_id": 2, "empty_doc": 1, "unknown_doc": 1}


def test_smart_corruptions(shared_data, tmp_path):
  src = shared_data / "cranfield"
  d = tmp_path / "smart"
  d.mkdir()
  docs = src.joinpath("cran.all.1400").read_bytes()
  cut = docs.index(b".I 21\n")
  head = docs[:cut]
  # bad UTF-8 in doc 3, and doc 5 again as a duplicate record at the end, then a truncated record.
  head = head.replace(b"inviscid rotational flow region", b"inviscid \xe9 flow region", 1)
  head += b".I 5\n.T\nduplicate\n.W\nduplicate text\n.I 22\n.T\ntrunc"
  (d / "cran.all.1400").write_bytes(head)
  (d / "cran.qry").write_bytes(src.joinpath("cran.qry").read_bytes())
  (d / "cranqrel").write_bytes(b"1 2 1\n1 3 -1\n1 999 2\n2 4 x\n")
  with pytest.raises(DataFormatError, match=r"cran.all.1400:\d+: invalid UTF-8"):
    load_collection(d, strict=True)
  c = load_collection(d)
  assert c.num_docs == 21 and c.doc("5").title != "duplicate" and c.doc("22").title == "trunc"
  assert "inviscid \ufffd flow region" in c.doc("2").text
  assert c.qrels == {"1": {"2": 4, "3": 0}}
  assert c.problems.counts["duplicate_id"] == 1 and c.problems.counts["unknown_doc"] == 1
  assert c.problems.counts["malformed"] == 1  # grade "x"
  (d / "cranqrel").write_bytes(b"1 2 1\n1 3 7\n")
  with pytest.raises(DataFormatError, match=r"cranqrel:2: bad relevance '7'"):
    list(formats.iter_qrels(d / "cranqrel", formats.Problems(strict=True), kind="cranfield"))
