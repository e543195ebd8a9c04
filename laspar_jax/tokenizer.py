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

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

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


# tokenizer.ggml.pre -> the split regex of that vocabulary (as transformers' GGUF conversion).
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {
  **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of a GGUF file as Python values (arrays as lists).

  Raises:
    ValueError: not a readable GGUF file.
  """
  try:
    reader = gguf.GGUFReader(os.fspath(path))
  except Exception as e:  # gguf raises ValueError / struct errors on bad files
    raise ValueError(f"{path}: cannot read GGUF file ({e})") from e
  return {k: f.contents() for k, f in reader.fields.items()}


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table (bytes_to_unicode)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  extra = [b for b in range(256) if b not in keep]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def gguf_tokenizer(meta: dict[str, Any], source: str = "") -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` from GGUF metadata (byte-level BPE, tokenizer.ggml.model "gpt2").

  Built as transformers builds it from a GGUF file: BPE over the tokens and
  merges, byte-level pre-tokenizer (with the split regex of
  `tokenizer.ggml.pre` where transformers knows one) and decoder, control
  tokens added as special tokens, user-defined ones as added tokens, BOS/EOS
  added when `tokenizer.ggml.add_bos_token` / `add_eos_token` say so.

  Raises:
    ValueError: another tokenizer model (e.g. sentencepiece "llama"), or no tokens.
  """
  kind = meta.get("tokenizer.ggml.model")
  tokens = meta.get("tokenizer.ggml.tokens")
  if kind != "gpt2" or not tokens:
    raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
  alphabet = _byte_alphabet()
  spelled = set(alphabet.values())
  vocab = {
    (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
  }
  merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
  tok = tokenizers.Tokenizer(
    models.BPE(
      vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    )
  )
  split = _GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre"))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  tok.decoder = decoders.ByteLevel()
  types = meta.get("tokenizer.ggml.token_type") or ()
  tok.add_special_tokens(
    [
      AddedToken(t, normalized=False, special=True)
      for t, k in zip(tokens, types)
      if k == _CONTROL and set(t) <= spelled
    ]
  )
  tok.add_tokens(
    [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
  )
  bos, eos = (_special(meta, k) for k in ("bos_token_id", "eos_token_id"))
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token")) and bos is not None
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token")) and eos is not None
  single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
  pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
  specials = {t: vocab[t] for t, on in ((bos, add_bos), (eos, add_eos)) if on}
  tok.post_processor = processors.TemplateProcessing(
    single=" ".join(single), pair=" ".join(pair), special_tokens=list(specials.items())
  )
  return tok


def _special(meta: dict[str, Any], key: str) -> str | None:
  """The token string of a special id in GGUF metadata (tokenizer.ggml.<key>)."""
  tid, tokens = meta.get(f"tokenizer.ggml.{key}"), meta.get("tokenizer.ggml.tokens") or []
  return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None


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
      tok = tokenizers.BertWordPieceTokenizer(vt, lowercase=cfg.get("do_lower_case", True))._tokenizer
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
    texts = [prefix + t for t in texts] if prefix else list(texts)
    cap = 100 * max_length  # chars; no token spans 100: a huge text is cut before it is tokenized whole
    texts = [t if len(t) <= cap else t[:cap] if self.truncation_side == "right" else t[-cap:] for t in texts]
    rows = [e.ids for e in self._truncating_tokenizer(max_length).encode_batch(texts)]
    return self.pad_rows(rows, max_length=max_length)

  def pad_rows(self, rows: Sequence[Sequence[int]], *, max_length: int | None = None) -> dict[str, np.ndarray]:
    """Pads token-id rows (already truncated) into a batch exactly as `__call__` does.

    Args:
      rows: token ids per text, special tokens included, at most max_length each.
      max_length: the truncation length the rows were made with (default: self.max_length).

    Returns:
      {"input_ids", "attention_mask", "token_type_ids"} as `__call__`.
    """
    max_length = max_length or self.max_length
    longest = max((len(r) for r in rows), default=1)
    need = min(max(longest, 1), max_length)
    length = next((b for b in self.buckets if need <= b <= max_length), max_length)
    ids_bl = np.full((len(rows), length), self.pad_id, np.int32)
    mask_bl = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      span = slice(length - len(r), length) if self.padding_side == "left" else slice(0, len(r))
      ids_bl[i, span] = r
      mask_bl[i, span] = 1
    return {"input_ids": ids_bl, "attention_mask": mask_bl, "token_type_ids": np.zeros_like(ids_bl)}
