"""The zero-shot presets' strings equal the reference files' byte for byte.

The expected strings are copied as data from the reference repositories (each source file named
beside its string); a preset that drifts from them fails here.
"""

import pytest

from laspar_jax import prompts

# JingfenQiao/Decoder4LSR, lsr/inference_zeroshot.py (`prompt` for cfg.type == "query" / otherwise).
DECODER4LSR_QUERY = (
  "<s>[INST] You are a powerful lexical search engine. You are tasked with generating important terms that can "
  "represents the semantic relevance of query in retrieval task. Make sure your word is in lowercase.\n Query: "
)
DECODER4LSR_PASSAGE = (
  "<s>[INST] You are a powerful lexical search engine. You are tasked with generating important terms that can "
  "represents the semantic relevance of passage in retrieval task. Make sure your word is in lowercase. \n Passage: "
)
# ielab/PromptReps, prompts/mistralai/Mistral-7B-Instruct-v0.2/{query,passage}_{prefix,suffix}.txt (read with
# .strip() by arguments.py; the files have no surrounding whitespace).
PROMPTREPS_QUERY_PREFIX = '<s>[INST] You are an AI assistant that can understand human language. Query: "'
PROMPTREPS_QUERY_SUFFIX = (
  '". Use one most important word to represent the query in retrieval task. Make sure your word is in lowercase. '
  '[/INST]The word is: "'
)
PROMPTREPS_PASSAGE_PREFIX = '<s>[INST] You are an AI assistant that can understand human language. Passage: "'
PROMPTREPS_PASSAGE_SUFFIX = (
  '". Use one most important word to represent the passage in retrieval task. Make sure your word is in lowercase. '
  '[/INST]The word is: "'
)


@pytest.mark.parametrize(
  "preset,kind,prefix,suffix",
  [
    ("reference", "query", DECODER4LSR_QUERY, ""),
    ("reference", "doc", DECODER4LSR_PASSAGE, ""),
    ("promptreps", "query", PROMPTREPS_QUERY_PREFIX, PROMPTREPS_QUERY_SUFFIX),
    ("promptreps", "doc", PROMPTREPS_PASSAGE_PREFIX, PROMPTREPS_PASSAGE_SUFFIX),
  ],
)
def test_preset_strings_are_the_reference_files(preset, kind, prefix, suffix):
  t = prompts.get_preset(preset).template(kind)
  assert t.prefix.encode() == prefix.encode()
  assert t.suffix.encode() == suffix.encode()
  assert t.reply == ""
  assert prompts.prompt_strings(None, prompts.get_preset(preset), kind) == (prefix, suffix)


def test_reference_constants():
  assert prompts.REFERENCE_QUERY_PREFIX == DECODER4LSR_QUERY
  assert prompts.REFERENCE_DOC_PREFIX == DECODER4LSR_PASSAGE
  # The chat presets carry the same instructions (without the [INST] framing, which the template adds).
  chat = prompts.get_preset("chat")
  assert DECODER4LSR_QUERY.endswith(chat.query.prefix) and DECODER4LSR_PASSAGE.endswith(chat.doc.prefix)
  pr_chat = prompts.get_preset("promptreps_chat")
  assert PROMPTREPS_QUERY_SUFFIX.startswith(pr_chat.query.suffix) and pr_chat.query.reply == 'The word is: "'
  assert PROMPTREPS_PASSAGE_SUFFIX.startswith(pr_chat.doc.suffix)
