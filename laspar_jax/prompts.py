"""Zero-shot prompts: presets and their composition with texts at the token level, with a text mask.

A preset wraps each query / passage in a prompt: `prefix + text + suffix`
(plain presets), or the same instruction as a user message rendered by the
tokenizer's own chat template (chat presets, `reply` appended after the
assistant turn's opening). Presets:

  reference   Decoder4LSR's RQ1 prompts, verbatim (`REFERENCE_QUERY_PREFIX`,
              `REFERENCE_DOC_PREFIX`; no suffix).
  promptreps  PromptReps (ielab/PromptReps prompts/mistralai/Mistral-7B-Instruct-v0.2/*.txt):
              `<s>[INST] You are an AI assistant that can understand human
              language. Passage: "` + text + `". Use one most
              important word to represent the passage in retrieval task. Make
              sure your word is in lowercase. [/INST]The word is: "`; read off
              at the last token.
  chat        the reference instruction as a user message through the chat template.
  promptreps_chat  the PromptReps instruction through the chat template, its system
              message ("You are an AI assistant that can understand human
              language.") first, the assistant reply opened with
              `The word is: "`; last token.
  none        the text alone (with the tokenizer's own special tokens, e.g. BERT's
              [CLS] X [SEP]), as an MLM such as SPLADE reads it.

Composition (`compose`) tokenizes the whole prompted string once (so the
tokens at the prompt/text boundary are those the model sees for the joined
string, e.g. "Query: cells" -> ":", "Ġcells") and uses the character offsets
to tell prompt from text: a token is a text token when its span overlaps the
text's characters. The text is then cut so the row fits `max_length` tokens, the
suffix kept whole. Special tokens the tokenizer adds itself (its
post-processor's BOS, [CLS] / [SEP]) are kept; when the prompt already starts
with that BOS (e.g. "<s>" in a Llama / Mistral vocabulary) the added one is
dropped, so there is never a second BOS. A "<s>" that is not a token of the
vocabulary (e.g. SmolLM2's) is ordinary text, as the reference's Hugging Face
tokenizer treats it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

REFERENCE_INSTRUCTION = (
  "You are a powerful lexical search engine. You are tasked with generating important terms "
  "that can represents the semantic relevance of {kind} in retrieval task. Make sure your "
  "word is in lowercase."
)
REFERENCE_QUERY_PREFIX = (
  "<s>[INST] You are a powerful lexical search engine. You are tasked with generating "
  "important terms that can represents the semantic relevance of query in retrieval task. "
  "Make sure your word is in lowercase.\n Query: "
)
REFERENCE_DOC_PREFIX = (
  "<s>[INST] You are a powerful lexical search engine. You are tasked with generating "
  "important terms that can represents the semantic relevance of passage in retrieval task. "
  "Make sure your word is in lowercase. \n Passage: "
)
PROMPTREPS_INSTRUCTION = (
  "Use one most important word to represent the {kind} in retrieval task. Make sure your word is in lowercase."
)
PROMPTREPS_REPLY = 'The word is: "'
PROMPTREPS_SYSTEM = "You are an AI assistant that can understand human language."
_MARK = "\ue000laspar-text\ue000"  # private-use marker locating the text in a rendered chat template
KINDS = ("query", "doc")


@dataclasses.dataclass(frozen=True)
class Template:
  """One side's prompt: prefix + text + suffix (chat: the user message; then the reply's opening)."""

  prefix: str = ""
  suffix: str = ""
  reply: str = ""


@dataclasses.dataclass(frozen=True)
class Preset:
  """A zero-shot prompt preset.

  Attributes:
    name: its name.
    query / doc: the two sides' templates.
    chat: render the user message through the tokenizer's chat template.
    decoding: the default read-off ("plain": pool over positions; "last_token").
      Which positions are pooled is `EncoderConfig.prompt_pool`.
    system: chat presets: a system message before the user message ("" = none,
      the template's own default applies).
  """

  name: str
  query: Template
  doc: Template
  chat: bool = False
  decoding: str = "plain"
  system: str = ""

  def template(self, kind: str) -> Template:
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return self.query if kind == "query" else self.doc


def _promptreps(label: str, kind: str, bos: str = f"<s>[INST] {PROMPTREPS_SYSTEM} ") -> Template:
  return Template(
    prefix=f'{bos}{label}: "', suffix=f'". {PROMPTREPS_INSTRUCTION.format(kind=kind)} [/INST]' + PROMPTREPS_REPLY
  )


PRESETS: dict[str, Preset] = {
  "reference": Preset("reference", Template(REFERENCE_QUERY_PREFIX), Template(REFERENCE_DOC_PREFIX)),
  "promptreps": Preset(
    "promptreps", _promptreps("Query", "query"), _promptreps("Passage", "passage"), decoding="last_token"
  ),
  "chat": Preset(
    "chat",
    Template(REFERENCE_INSTRUCTION.format(kind="query") + "\n Query: "),
    Template(REFERENCE_INSTRUCTION.format(kind="passage") + " \n Passage: "),
    chat=True,
  ),
  "promptreps_chat": Preset(
    "promptreps_chat",
    Template('Query: "', f'". {PROMPTREPS_INSTRUCTION.format(kind="query")}', PROMPTREPS_REPLY),
    Template('Passage: "', f'". {PROMPTREPS_INSTRUCTION.format(kind="passage")}', PROMPTREPS_REPLY),
    chat=True,
    decoding="last_token",
    system=PROMPTREPS_SYSTEM,
  ),
  "none": Preset("none", Template(), Template()),
}


def get_preset(name: str) -> Preset:
  """The preset called `name`.

  Raises:
    ValueError: an unknown name (lists the known ones).
  """
  if name not in PRESETS:
    raise ValueError(f"unknown prompt preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]


def prompt_strings(tokenizer: Any, preset: Preset, kind: str) -> tuple[str, str]:
  """(before, after): the strings around the text, chat template rendered.

  Raises:
    ValueError: a chat preset on a tokenizer without a chat template.
  """
  t = preset.template(kind)
  if not preset.chat:
    return t.prefix, t.suffix
  system = [{"role": "system", "content": preset.system}] if preset.system else []
  rendered = tokenizer.apply_chat_template(
    system + [{"role": "user", "content": t.prefix + _MARK + t.suffix}], add_generation_prompt=True
  )
  before, found, after = rendered.partition(_MARK)
  if not found:
    raise ValueError(f"{getattr(tokenizer, 'source', 'tokenizer')}: the chat template drops the user message")
  return before, after + t.reply


def compose(
  tokenizer: Any, texts: Sequence[str], *, preset: Preset, kind: str, max_length: int
) -> tuple[list[tuple[list[int], list[int]]], np.ndarray]:
  """Tokenizes prompted texts: per text (ids, text flags), unpadded (see the module docstring).

  Args:
    tokenizer: a `laspar_jax.tokenizer.Tokenizer`.
    texts: the queries or passages.
    preset: the prompt preset.
    kind: "query" or "doc".
    max_length: tokens per row, prompt and special tokens included (the text is cut to fit).

  Returns:
    (rows, cut_b): per text the token ids (prompt, text and the tokenizer's
    special tokens) and flags (1 at the text's tokens, 0 elsewhere), same
    length; bool [B] True where the text was cut.
  """
  before, after = prompt_strings(tokenizer, preset, kind)
  return tokenizer.encode_with_offsets(texts, before=before, after=after, max_length=max_length)
