"""Tokenizer: the tokenizer's own truncation and specials, pad id and sides, buckets, prefixes, errors."""

import shutil

import numpy as np
import pytest

from laspar_jax.tokenizer import Tokenizer


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


def _word_level(tmp_path, specials, processor, config=None, vocab_words=20):
  """A whitespace word-level tokenizer.json with `specials` and a post-processor, in a folder."""
  import json

  import tokenizers
  from tokenizers import models, pre_tokenizers

  vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_words)])}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=specials[-1]))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials)
  if processor is not None:
    tok.post_processor = processor(vocab)
  tok.save(str(tmp_path / "tokenizer.json"))
  if config is not None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  return Tokenizer.from_dir(tmp_path, max_length=8, buckets=(4,))


def test_roberta_template_truncates_inside_the_template(tmp_path):
  from tokenizers import processors

  tok = _word_level(
    tmp_path,
    ["<pad>", "<s>", "</s>", "<unk>"],
    lambda v: processors.RobertaProcessing(("</s>", v["</s>"]), ("<s>", v["<s>"])),
    config={"pad_token": "<pad>"},
  )
  assert tok.num_special_tokens == 2 and tok.pad_id == 0 and tok.pad_token == "<pad>"
  b = tok([" ".join(f"w{i}" for i in range(12)), "w3"])
  assert b["input_ids"].shape == (2, 8)
  assert b["input_ids"][0].tolist() == [1] + [4 + i for i in range(6)] + [2]  # <s> w0..w5 </s>
  assert b["input_ids"][1].tolist() == [1, 7, 2, 0] + [0] * 4 and b["attention_mask"][1].sum() == 3
  assert tok(["w1 w2"], max_length=4)["input_ids"][0].tolist() == [1, 5, 6, 2]
  assert tok(["w1 w2 w3 w4"], max_length=4)["input_ids"][0].tolist() == [1, 5, 6, 2]


def test_decoder_bos_only_left_padding_and_no_pad_token(tmp_path):
  """A Llama-style `<s> X` template: truncation keeps BOS and the text's start; pads on the left with 0."""
  from tokenizers import processors

  tok = _word_level(
    tmp_path,
    ["<s>", "</s>", "<unk>"],
    lambda v: processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)]),
    config={"padding_side": "left"},
  )
  assert tok.num_special_tokens == 1 and tok.pad_token is None and tok.pad_id == 0
  b = tok([" ".join(f"w{i}" for i in range(12)), "w3 w4"])
  assert b["input_ids"][0].tolist() == [0] + [3 + i for i in range(7)]  # <s> w0..w6, no </s> forced in
  assert b["input_ids"][1, -3:].tolist() == [0, 6, 7] and b["attention_mask"][1].tolist() == [0] * 5 + [1] * 3


def test_no_post_processor_and_left_truncation(tmp_path):
  tok = _word_level(tmp_path, ["[PAD]", "[UNK]"], None, config={"truncation_side": "left"})
  assert tok.num_special_tokens == 0 and tok.pad_id == 0 and tok.pad_token == "[PAD]"
  ids = tok([" ".join(f"w{i}" for i in range(12))])["input_ids"][0]
  assert ids.tolist() == [2 + i for i in range(4, 12)]  # the last 8 words


def test_bad_sides_and_tiny_max_length(tmp_path, tok):
  with pytest.raises(ValueError, match="padding_side"):
    _word_level(tmp_path, ["[PAD]", "[UNK]"], None, config={"padding_side": "middle"})
  with pytest.raises(ValueError, match="special tokens"):
    tok(["w"], max_length=2)


def test_bert_truncation_identical_to_cls_text_sep(tok):
  """The tokenizer's own truncation gives [CLS] + the first max_length - 2 word pieces + [SEP]."""
  text = "the quick brown fox jumps over the lazy dog " * 40
  full = tok([text], max_length=512)["input_ids"][0]
  n = int((full != tok.pad_id).sum())
  for max_length in (16, 100, 256):
    ids = tok([text], max_length=max_length)["input_ids"][0]
    expect = list(full[: max_length - 1]) + [full[n - 1]]
    assert ids.tolist() == expect
