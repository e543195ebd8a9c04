"""Fast tokenization with the tokenizer's own special tokens and truncation, padded to bucket lengths.

Special tokens come from the tokenizer's post-processor (BERT's `[CLS] X [SEP]`,
RoBERTa's `<s> X </s>`, a decoder's `<s> X`, or none), and truncation is the
`tokenizers` library's own: the text is cut so that the sequence *with* its
special tokens fits `max_length` (the template stays whole). The pad id and
the padding/truncation sides come from tokenizer_config.json (then
special_tokens_map.json, then a `[PAD]` / `<pad>` token of the vocabulary;
0 only when there is none, recorded as `pad_token = None`).

Padding every batch to the smallest bucket that holds its longest sequence
keeps the number of distinct shapes (hence jit compilations) small.

GGUF files carry their tokenizer in metadata (`Tokenizer.from_gguf`): a
byte-level BPE ("gpt2" model) is rebuilt as transformers' GGUF conversion
builds it, so the ids are the same. Chat templates (tokenizer_config.json,
chat_template.jinja or GGUF metadata) render with jinja2 as transformers
renders them (`apply_chat_template`).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

from laspar_jax import gguf_tokenizer as gguf_tokenizer_lib

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


def _token_str(value: Any) -> str | None:
  """A token from a config: a string or a serialized AddedToken ({"content": ...})."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: cannot parse ({e})") from e


gguf_tokenizer = gguf_tokenizer_lib.gguf_tokenizer
read_gguf_metadata = gguf_tokenizer_lib.read_gguf_metadata
_special = gguf_tokenizer_lib.special_token


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

  tags = {"generation"}

  def parse(self, parser: Any) -> Any:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller: Any) -> str:
    return caller()


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(
  x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(template: str) -> jinja2.Template:
  """A chat template compiled as transformers compiles it (sandboxed, trim/lstrip blocks, its helpers)."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def _chat_template(path: str, cfg: dict[str, Any]) -> str | None:
  """The chat template of a model folder: chat_template.jinja, else tokenizer_config.json's."""
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja_file):
    with open(jinja_file) as f:
      return f.read()
  t = cfg.get("chat_template")
  if isinstance(t, list):  # named templates: [{"name": ..., "template": ...}]
    t = {d.get("name"): d.get("template") for d in t}.get("default")
  return t if isinstance(t, str) else None


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` (tokenizer.json) or a WordPiece vocab.txt.

  Attributes:
    max_length: default truncation length (special tokens included).
    buckets: the padded lengths a batch may take.
    vocab_size: size of the vocabulary (added tokens included).
    pad_id / pad_token: the padding id and its token (None: no pad token, id 0).
    padding_side / truncation_side: "right" or "left".
    num_special_tokens: special tokens the post-processor adds to one sequence.
    special_ids: int32 ids of special tokens (bracketed upper-case, <s>-style, added specials).
    chat_template: the jinja2 chat template (None: the tokenizer has none).
    special_tokens: {"bos_token", "eos_token", ...: token string} the chat template may use.
  """

  def __init__(
    self,
    tok: tokenizers.Tokenizer,
    *,
    max_length: int = 256,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    source: str = "",
    pad_token: str | None = None,
    padding_side: str = "right",
    truncation_side: str = "right",
    chat_template: str | None = None,
    special_tokens: dict[str, str] | None = None,
  ):
    for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
      if side not in ("right", "left"):
        raise ValueError(f"{source or 'tokenizer'}: {name} must be 'right' or 'left', got {side!r}")
    self._tok = tok
    self._tok.no_padding()
    self._tok.no_truncation()
    self._json = tok.to_str()
    self._truncating: dict[int, tokenizers.Tokenizer] = {}
    self._lock = threading.Lock()
    self.max_length = max_length
    self.buckets = tuple(sorted(b for b in buckets if b < max_length)) + (max_length,)
    self.source = source
    self.padding_side, self.truncation_side = padding_side, truncation_side
    self.chat_template = chat_template
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    self._compiled: jinja2.Template | None = None
    processor = tok.post_processor
    self.num_special_tokens = processor.num_special_tokens_to_add(False) if processor else 0
    vocab = tok.get_vocab()
    self.vocab_size = tok.get_vocab_size()
    if pad_token is None or pad_token not in vocab:
      pad_token = next((t for t in ("[PAD]", "<pad>") if t in vocab), None)
    self.pad_token = pad_token
    self.pad_id = vocab[pad_token] if pad_token is not None else 0
    specials = [
      tid
      for t, tid in vocab.items()
      if (t.startswith("[") and t.endswith("]") and t[1:-1].isupper()) or t in ("<s>", "</s>", "<pad>", "<unk>")
    ]
    added = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    self.special_ids = np.array(sorted(set(specials) | set(added)), np.int32)

  @classmethod
  def from_dir(
    cls, path: str | os.PathLike, max_length: int = 256, buckets: Sequence[int] = DEFAULT_BUCKETS
  ) -> "Tokenizer":
    """Loads tokenizer.json (or builds BERT WordPiece from vocab.txt) from a model folder.

    tokenizer_config.json (and special_tokens_map.json) give the pad token,
    `padding_side`, `truncation_side` and, for vocab.txt, `do_lower_case`.

    Raises:
      FileNotFoundError: the folder has neither tokenizer.json nor vocab.txt.
      ValueError: an unreadable tokenizer or config file.
    """
    path = os.fspath(path)
    if path.endswith(".gguf") and os.path.isfile(path):
      return cls.from_gguf(path, max_length=max_length, buckets=buckets)
    tj, vt = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    if os.path.exists(tj):
      try:
        tok = tokenizers.Tokenizer.from_file(tj)
      except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{tj}: cannot parse tokenizer: {e}") from e
      src = tj
    elif os.path.exists(vt):
      tok = tokenizers.Tokenizer.from_str(
        tokenizers.BertWordPieceTokenizer(vt, lowercase=cfg.get("do_lower_case", True)).to_str()
      )
      src = vt
    else:
      ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf")) if os.path.isdir(path) else []
      if len(ggufs) == 1:
        return cls.from_gguf(os.path.join(path, ggufs[0]), max_length=max_length, buckets=buckets)
      raise FileNotFoundError(f"{path}: no tokenizer.json, vocab.txt or single .gguf file")
    smap = _read_json(os.path.join(path, "special_tokens_map.json"))
    specials = {
      k: _token_str(cfg.get(k)) or _token_str(smap.get(k))
      for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    }
    return cls(
      tok,
      max_length=max_length,
      buckets=buckets,
      source=src,
      pad_token=specials["pad_token"],
      padding_side=cfg.get("padding_side") or "right",
      truncation_side=cfg.get("truncation_side") or "right",
      chat_template=_chat_template(path, cfg),
      special_tokens=specials,
    )

  @classmethod
  def from_gguf(
    cls,
    path: str | os.PathLike,
    max_length: int = 256,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    *,
    metadata: dict[str, Any] | None = None,
  ) -> "Tokenizer":
    """Builds the tokenizer a GGUF file's metadata describes (see `gguf_tokenizer`).

    Args:
      path: the .gguf file.
      max_length: default truncation length.
      buckets: padded lengths.
      metadata: the file's metadata when already read (`read_gguf_metadata`).

    Raises:
      ValueError: an unreadable file or an unsupported tokenizer model.
    """
    path = os.fspath(path)
    meta = read_gguf_metadata(path) if metadata is None else metadata
    tok = gguf_tokenizer(meta, source=path)
    specials = {
      name: _special(meta, key)
      for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
      )
    }
    return cls(
      tok,
      max_length=max_length,
      buckets=buckets,
      source=path,
      pad_token=specials["pad_token"],
      chat_template=meta.get("tokenizer.chat_template"),
      special_tokens=specials,
    )

  def apply_chat_template(
    self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
  ) -> str:
    """Renders a conversation with the tokenizer's chat template, as transformers renders it.

    Args:
      messages: [{"role": ..., "content": ...}, ...].
      add_generation_prompt: end with the assistant turn's opening.
      **kwargs: further template variables (they win over the special tokens).

    Returns:
      The prompt text (tokenize it with `self(...)`; templates write their own special tokens).

    Raises:
      ValueError: the tokenizer has no chat template.
    """
    if self.chat_template is None:
      raise ValueError(f"{self.source or 'tokenizer'}: has no chat template")
    if self._compiled is None:
      self._compiled = compile_chat_template(self.chat_template)
    variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
    return self._compiled.render(
      messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
    )

  def bucket(self, n: int) -> int:
    """Smallest bucket length >= n (capped at max_length)."""
    for b in self.buckets:
      if n <= b:
        return b
    return self.buckets[-1]

  def _truncating_tokenizer(self, max_length: int) -> tokenizers.Tokenizer:
    """A copy of the tokenizer truncating at `max_length` (one per length; never mutated after)."""
    tok = self._truncating.get(max_length)
    if tok is None:
      if max_length <= self.num_special_tokens:
        raise ValueError(
          f"max_length {max_length} leaves no room for text after {self.num_special_tokens} special tokens"
        )
      with self._lock:
        tok = self._truncating.get(max_length)
        if tok is None:
          tok = tokenizers.Tokenizer.from_str(self._json)
          tok.enable_truncation(max_length, direction=self.truncation_side)
          self._truncating[max_length] = tok
    return tok

  def __call__(self, texts: Sequence[str], *, max_length: int | None = None, prefix: str = "") -> dict[str, np.ndarray]:
    """Tokenizes a batch.

    Args:
      texts: the strings.
      max_length: truncation length (default: self.max_length), special tokens included.
      prefix: prepended to every text (e.g. "query: ").

    Returns:
      {"input_ids", "attention_mask", "token_type_ids"}: int32 [B, L] with L the
      smallest bucket that holds the longest (truncated) sequence, padded with
      `pad_id` on `padding_side`.
    """
    max_length = max_length or self.max_length
    rows, _ = self.encode_rows(texts, max_length=max_length, prefix=prefix)
    return self.pad(rows, max_length=max_length)

  def encode_rows(
    self, texts: Sequence[str], *, max_length: int | None = None, prefix: str = ""
  ) -> tuple[list[list[int]], np.ndarray]:
    """Token ids per text, truncated as `__call__` truncates, and which texts were cut.

    Args:
      texts: the strings.
      max_length: truncation length (default: self.max_length), special tokens included.
      prefix: prepended to every text.

    Returns:
      (rows, cut_b): the ids per text (unpadded) and bool [B], True where the text lost tokens.
    """
    max_length = max_length or self.max_length
    texts = [prefix + t for t in texts] if prefix else list(texts)
    cap = 100 * max_length  # chars; no token spans 100: a huge text is cut before it is tokenized whole
    long_b = np.asarray([len(t) > cap for t in texts], bool)
    texts = [t if len(t) <= cap else t[:cap] if self.truncation_side == "right" else t[-cap:] for t in texts]
    encs = self._truncating_tokenizer(max_length).encode_batch(texts)
    cut_b = np.asarray([bool(e.overflowing) for e in encs], bool) | long_b
    return [e.ids for e in encs], cut_b

  def encode_with_offsets(
    self, texts: Sequence[str], *, before: str = "", after: str = "", max_length: int | None = None
  ) -> tuple[list[tuple[list[int], list[int]]], np.ndarray]:
    """Tokenizes `before + text + after` once per text, flags the text's tokens, cuts the text to fit.

    The whole string is tokenized (so tokens at the prompt/text boundary are the
    ones the model sees for the joined string); a token is a text token when its
    character span overlaps the text. The text is cut (on the right) so the row,
    prompt and special tokens included, fits `max_length`; the prompt stays whole.
    When `before` writes the BOS the tokenizer adds itself (e.g. "<s>" of a Llama
    vocabulary) the added one is dropped, so there is never a second BOS.

    Args:
      texts: the texts.
      before / after: the strings around each text (a prompt).
      max_length: tokens per row, everything included (default: self.max_length).

    Returns:
      (rows, cut_b): per text (ids, text flags) of the same length, and bool [B]
      True where the text lost tokens.

    Raises:
      ValueError: the prompt alone leaves no room for text.
    """
    max_length = max_length or self.max_length
    cap = 100 * max(max_length, 1)  # chars; a huge text is cut before it is tokenized whole
    long_b = np.asarray([len(t) > cap for t in texts], bool)
    texts = [t[:cap] for t in texts]
    encodings = self._tok.encode_batch([before + t + after for t in texts], add_special_tokens=True)
    start = len(before)
    rows, cut = [], []
    for text, enc in zip(texts, encodings):
      end = start + len(text)
      is_text = [not sp and s < end and e > start for (s, e), sp in zip(enc.offsets, enc.special_tokens_mask)]
      ids, flags = list(enc.ids), [int(t) for t in is_text]
      if len(ids) > 1 and ids[0] == ids[1] and enc.special_tokens_mask[0] and not flags[1]:
        ids, flags = ids[1:], flags[1:]  # the prompt writes the BOS the tokenizer adds: keep one
      budget = max_length - (len(ids) - sum(flags))
      if budget <= 0 and text:
        raise ValueError(
          f"{self.source or 'tokenizer'}: the prompt alone takes {len(ids) - sum(flags)} tokens of {max_length}"
        )
      n_text, keep = 0, []
      for f in flags:
        n_text += f
        keep.append(not f or n_text <= budget)
      cut.append(n_text > budget)
      rows.append(([i for i, k in zip(ids, keep) if k], [f for f, k in zip(flags, keep) if k]))
    return rows, np.asarray(cut, bool) | long_b

  def pad(
    self,
    rows: Sequence[Sequence[int]],
    *,
    max_length: int | None = None,
    flags: Sequence[Sequence[int]] | None = None,
    length: int | None = None,
  ) -> dict[str, np.ndarray]:
    """Pads token-id rows (already truncated) into a batch exactly as `__call__` does.

    Rows go on `padding_side`, the length is the smallest bucket holding the
    longest row (at most max_length).

    Args:
      rows: token ids per text, special tokens included, at most max_length each.
      max_length: the truncation length the rows were made with (default: self.max_length).
      flags: per row 0/1 per token (e.g. `encode_with_offsets`' text flags), padded alike
        into "text_mask".
      length: a fixed padded length instead of the bucket.

    Returns:
      {"input_ids", "attention_mask", "token_type_ids"} int32 [B, L] (and "text_mask" with flags).
    """
    max_length = max_length or self.max_length
    longest = max((len(r) for r in rows), default=1)
    need = min(max(longest, 1), max_length)
    length = length or next((b for b in self.buckets if need <= b <= max_length), max(max_length, need))
    ids_bl = np.full((len(rows), length), self.pad_id, np.int32)
    mask_bl = np.zeros((len(rows), length), np.int32)
    text_bl = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      span = slice(length - len(r), length) if self.padding_side == "left" else slice(0, len(r))
      ids_bl[i, span] = r
      mask_bl[i, span] = 1
      if flags is not None:
        text_bl[i, span] = flags[i]
    out = {"input_ids": ids_bl, "attention_mask": mask_bl, "token_type_ids": np.zeros_like(ids_bl)}
    if flags is not None:
      out["text_mask"] = text_bl
    return out

  def pad_rows(self, rows: Sequence[Sequence[int]], *, max_length: int | None = None) -> dict[str, np.ndarray]:
    """`pad(rows, max_length=...)` (the data pipeline's name)."""
    return self.pad(rows, max_length=max_length)

  def vocab(self) -> dict[str, int]:
    """token string -> id (added tokens included)."""
    return self._tok.get_vocab()

  def id_to_token(self, i: int) -> str | None:
    """The token string of id `i`."""
    return self._tok.id_to_token(int(i))

  def encode_plain(self, texts: Sequence[str], *, special_tokens: bool = False) -> list[list[int]]:
    """Token ids per text without truncation (with the post-processor's special tokens when asked)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=special_tokens)]

  def to_json(self) -> str:
    """The tokenizer as tokenizer.json text (what `tokenizers.Tokenizer.from_str` reads)."""
    return self._json

  def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
    """Token ids back to text, per row (special tokens skipped)."""
    return self._tok.decode_batch([list(r) for r in rows])
