"""Zero-shot prompts: presets verbatim, token-level composition with an exact text mask, one BOS, chat templates."""

import pathlib

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from laspar_jax import prompts
from laspar_jax.models import hf_weights
from laspar_jax.tokenizer import Tokenizer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def words():
  return Tokenizer.from_dir(FIXTURES / "llama3")  # word-level "w0".."w127", no special tokens


@pytest.fixture(scope="module")
def smol_tok():
  return Tokenizer.from_gguf(hf_weights.resolve("HuggingFaceTB/SmolLM2-135M-Instruct"))


def _bos_tokenizer(**kw):
  vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(20)}}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["<s>", "</s>"])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
  return Tokenizer(tok, pad_token="</s>", **kw)


def test_presets_verbatim():
  ref = prompts.get_preset("reference")
  assert ref.query.prefix == (
    "<s>[INST] You are a powerful lexical search engine. You are tasked with generating important terms that "
    "can represents the semantic relevance of query in retrieval task. Make sure your word is in lowercase.\n"
    " Query: "
  )
  assert ref.doc.prefix == (
    "<s>[INST] You are a powerful lexical search engine. You are tasked with generating important terms that "
    "can represents the semantic relevance of passage in retrieval task. Make sure your word is in "
    "lowercase. \n Passage: "
  )
  assert ref.query.suffix == ref.doc.suffix == "" and ref.decoding == "plain"
  pr = prompts.get_preset("promptreps")
  assert pr.doc.prefix == '<s>[INST] You are an AI assistant that can understand human language. Passage: "'
  assert pr.decoding == "last_token"
  assert pr.doc.suffix.endswith(
    "Use one most important word to represent the passage in retrieval task. Make "
    'sure your word is in lowercase. [/INST]The word is: "'
  )
  assert "represent the query in retrieval task" in pr.query.suffix
  with pytest.raises(ValueError, match="unknown prompt preset"):
    prompts.get_preset("nope")


def test_text_mask_marks_exactly_the_text_tokens(words):
  preset = prompts.Preset("t", prompts.Template("w1 w2 ", " w3"), prompts.Template("w4 ", ""))
  rows, cut_b = prompts.compose(words, ["w5 w6 w7", "", "w9"], preset=preset, kind="query", max_length=8)
  assert rows[0] == ([1, 2, 5, 6, 7, 3], [0, 0, 1, 1, 1, 0])
  assert rows[1] == ([1, 2, 3], [0, 0, 0])
  assert rows[2] == ([1, 2, 9, 3], [0, 0, 1, 0])
  assert not cut_b.any()
  cut, cut_b = prompts.compose(words, ["w5 w6 w7"], preset=preset, kind="query", max_length=5)
  assert cut[0] == ([1, 2, 5, 6, 3], [0, 0, 1, 1, 0]) and cut_b.tolist() == [True]  # prompt counted, suffix kept
  doc, _ = prompts.compose(words, ["w5"], preset=preset, kind="doc", max_length=4)
  assert doc[0] == ([4, 5], [0, 1])
  b = words.pad([r[0] for r in rows], flags=[r[1] for r in rows], max_length=8)
  ids, mask, text = b["input_ids"], b["attention_mask"], b["text_mask"]
  assert ids.shape == (3, 8) and mask.sum(1).tolist() == [6, 3, 4]
  assert text.tolist()[0] == [0, 0, 1, 1, 1, 0, 0, 0] and (ids[1, 3:] == words.pad_id).all()
  left = Tokenizer.from_dir(FIXTURES / "llama3", max_length=8)
  left.padding_side = "left"
  b = left.pad([r[0] for r in rows], flags=[r[1] for r in rows])
  assert b["text_mask"].tolist()[2] == [0, 0, 0, 0, 0, 0, 1, 0] and b["attention_mask"].tolist()[1][:5] == [0] * 5
  with pytest.raises(ValueError, match="the prompt alone"):
    prompts.compose(words, ["w5"], preset=preset, kind="query", max_length=3)


def test_one_bos():
  tok = _bos_tokenizer()
  plain = prompts.Preset("p", prompts.Template("w3 "), prompts.Template("w3 "))
  with_bos = prompts.Preset("b", prompts.Template("<s> w3 "), prompts.Template("<s> w3 "))
  a = prompts.compose(tok, ["w5 w6"], preset=plain, kind="query", max_length=8)[0][0]
  b = prompts.compose(tok, ["w5 w6"], preset=with_bos, kind="query", max_length=8)[0][0]
  assert a == b == ([0, 5, 7, 8], [0, 0, 1, 1])  # w_i is id i + 2


def test_byte_level_boundary_and_reference_tokens(smol_tok):
  ref = prompts.get_preset("reference")
  text = "Cells divide by mitosis."
  ((ids, flags),), _ = prompts.compose(smol_tok, [text], preset=ref, kind="doc", max_length=250)
  assert ids == smol_tok.encode_plain([ref.doc.prefix + text])[0]  # the joined string's own tokens
  assert smol_tok.decode_batch([[i for i, f in zip(ids, flags) if f]])[0] == " Cells divide by mitosis."
  assert sum(flags) == len(smol_tok.encode_plain([" " + text])[0]) and flags[-1] == 1
  pr = prompts.get_preset("promptreps")
  ((ids, flags),), _ = prompts.compose(smol_tok, [text], preset=pr, kind="query", max_length=250)
  n_prompt = len(ids) - sum(flags)
  ((ids, flags),), cut_b = prompts.compose(smol_tok, [text], preset=pr, kind="query", max_length=n_prompt + 3)
  assert sum(flags) == 3 and len(ids) == n_prompt + 3 and cut_b.tolist() == [True]
  assert smol_tok.decode_batch([ids])[0].endswith('[/INST]The word is: "')


def test_chat_template(smol_tok, words):
  chat = prompts.get_preset("chat")
  before, after = prompts.prompt_strings(smol_tok, chat, "query")
  assert before.startswith("<|im_start|>system\n") and before.endswith("lowercase.\n Query: ")
  assert after == "<|im_end|>\n<|im_start|>assistant\n"
  ((ids, flags),), _ = prompts.compose(smol_tok, ["zinc deficiency"], preset=chat, kind="query", max_length=250)
  assert smol_tok.decode_batch([[i for i, f in zip(ids, flags) if f]])[0] == " zinc deficiency"
  start = smol_tok.vocab()["<|im_start|>"]
  assert ids[0] == start and ids.count(start) == 3
  before, after = prompts.prompt_strings(smol_tok, prompts.get_preset("promptreps_chat"), "doc")
  assert before.endswith('user\nPassage: "') and after.endswith('<|im_start|>assistant\nThe word is: "')
  # PromptReps' system message replaces the template's default one (SmolLM2's "You are a helpful AI assistant named SmolLM").
  assert before.startswith(f"<|im_start|>system\n{prompts.PROMPTREPS_SYSTEM}<|im_end|>\n") and "SmolLM" not in before
  with pytest.raises(ValueError, match="no chat template"):
    prompts.compose(words, ["w1"], preset=chat, kind="doc", max_length=4)
  templ = _bos_tokenizer(
    chat_template="{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %}"
    "{% if add_generation_prompt %} w4{% endif %}"
  )
  p = prompts.Preset("c", prompts.Template("w7 "), prompts.Template("w7 "), chat=True)
  assert prompts.compose(templ, ["w9 w10"], preset=p, kind="doc", max_length=16)[0] == [
    ([0, 3, 9, 11, 12, 4, 6], [0, 0, 0, 1, 1, 0, 0])
  ]
  np.testing.assert_array_equal(templ.pad([[1]], flags=[[1]], length=2)["text_mask"], [[1, 0]])
