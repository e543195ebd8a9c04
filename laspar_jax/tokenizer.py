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
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers

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
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, max_length: int = 256,
               buckets: Sequence[int] = DEFAULT_BUCKETS, source: str = "",
               pad_token: str | None = None, padding_side: str = "right",
               truncation_side: str = "right"):
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
    processor = tok.post_processor
    self.num_special_tokens = processor.num_special_tokens_to_add(False) if processor else 0
    vocab = tok.get_vocab()
    self.vocab_size = tok.get_vocab_size()
    if pad_token is None or pad_token not in vocab:
      pad_token = next((t for t in ("[PAD]", "<pad>") if t in vocab), None)
    self.pad_token = pad_token
    self.pad_id = vocab[pad_token] if pad_token is not None else 0
    specials = [tid for t, tid in vocab.items()
                if (t.startswith("[") and t.endswith("]") and t[1:-1].isupper()) or t in ("<s>", "</s>", "<pad>", "<unk>")]
    added = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    self.special_ids = np.array(sorted(set(specials) | set(added)), np.int32)

  @classmethod
  def from_dir(cls, path: str | os.PathLike, max_length: int = 256,
               buckets: Sequence[int] = DEFAULT_BUCKETS) -> "Tokenizer":
    """Loads tokenizer.json (or builds BERT WordPiece from vocab.txt) from a model folder.

    tokenizer_config.json (and special_tokens_map.json) give the pad token,
    `padding_side`, `truncation_side` and, for vocab.txt, `do_lower_case`.

    Raises:
      FileNotFoundError: the folder has neither tokenizer.json nor vocab.txt.
      ValueError: an unreadable tokenizer or config file.
    """
    path = os.fspath(path)
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
      raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")
    pad = _token_str(cfg.get("pad_token"))
    if pad is None:
      pad = _token_str(_read_json(os.path.join(path, "special_tokens_map.json")).get("pad_token"))
    return cls(tok, max_length=max_length, buckets=buckets, source=src, pad_token=pad,
               padding_side=cfg.get("padding_side") or "right",
               truncation_side=cfg.get("truncation_side") or "right")

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
        raise ValueError(f"max_length {max_length} leaves no room for text after "
                         f"{self.num_special_tokens} special tokens")
      with self._lock:
        tok = self._truncating.get(max_length)
        if tok is None:
          tok = tokenizers.Tokenizer.from_str(self._json)
          tok.enable_truncation(max_length, direction=self.truncation_side)
          self._truncating[max_length] = tok
    return tok

  def __call__(self, texts: Sequence[str], *, max_length: int | None = None,
               prefix: str = "") -> dict[str, np.ndarray]:
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
    rows = [e.ids for e in self._truncating_tokenizer(max_length).encode_batch(texts)]
    longest = max((len(r) for r in rows), default=1)
    need = min(max(longest, 1), max_length)
    length = next((b for b in self.buckets if need <= b <= max_length), max_length)
    ids_bl = np.full((len(rows), length), self.pad_id, np.int32)
    mask_bl = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      span = slice(length - len(r), length) if self.padding_side == "left" else slice(0, len(r))
      ids_bl[i, span] = r
      mask_bl[i, span] = 1
    return {"input_ids": ids_bl, "attention_mask": mask_bl,
            "token_type_ids": np.zeros_like(ids_bl)}
