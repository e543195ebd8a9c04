"""Tokenizer: truncation, bucketed padding, prefixes, vocab.txt fallback, errors."""
import shutil

import numpy as np
import pytest

from laspar_jax.data.tokenize import Tokenizer


@pytest.fixture(scope="module")
def tok(minilm_path):
  return Tokenizer.from_dir(minilm_path, max_length=256)


def test_pads_to_smallest_bucket(tok):
  b = tok(["short text", "a slightly longer text with more words in it " * 3])
  n_real = b["attention_mask"].sum(1)
  assert b["input_ids"].shape[1] == 32 and n_real.max() <= 32 < n_real.max() + 32
  assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_id).all()
  assert b["input_ids"].dtype == np.int32 and b["token_type_ids"].sum() == 0


def test_truncates_keeping_sep(tok):
  b = tok(["word " * 1000])
  assert b["input_ids"].shape == (1, 256) and b["attention_mask"].sum() == 256
  assert b["input_ids"][0, 0] == 101 and b["input_ids"][0, -1] == 102  # [CLS] ... [SEP]
  b = tok(["word " * 1000], max_length=100)
  assert b["input_ids"].shape == (1, 100) and b["input_ids"][0, -1] == 102


def test_bounded_number_of_shapes(tok):
  rng = np.random.default_rng(0)
  shapes = {tok(["w " * int(n)])["input_ids"].shape[1] for n in rng.integers(1, 600, 200)}
  assert shapes <= set(tok.buckets) and len(shapes) <= 6


def test_prefix_and_specials(tok):
  plain, pref = tok(["cells"]), tok(["cells"], prefix="query: ")
  assert pref["attention_mask"].sum() > plain["attention_mask"].sum()
  assert {0, 100, 101, 102, 103} <= set(tok.special_ids.tolist())


def test_vocab_txt_fallback(minilm_path, tmp_path, tok):
  shutil.copy(minilm_path / "vocab.txt", tmp_path / "vocab.txt")
  t2 = Tokenizer.from_dir(tmp_path, max_length=256)
  texts = ["The protein binds to DNA.", "Scurvy is caused by vitamin C deficiency"]
  np.testing.assert_array_equal(t2(texts)["input_ids"], tok(texts)["input_ids"])


def test_missing_tokenizer_names_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    Tokenizer.from_dir(tmp_path)
