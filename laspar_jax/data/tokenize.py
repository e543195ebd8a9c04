"""Fast tokenization with truncation and padding to a small set of bucket lengths.

Padding every batch to the smallest bucket that holds its longest sequence
keeps the number of distinct shapes (hence jit compilations) small.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import tokenizers

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` (tokenizer.json) or a WordPiece vocab.txt."""

  def __init__(self, tok: tokenizers.Tokenizer, *, max_length: int = 256,
               buckets: Sequence[int] = DEFAULT_BUCKETS, source: str = ""):
    self._tok = tok
    self._tok.no_padding()
    self._tok.no_truncation()
    self.max_length = max_length
    self.buckets = tuple(sorted(b for b in buckets if b < max_length)) + (max_length,)
    self.source = source
    vocab = tok.get_vocab()
    self.vocab_size = tok.get_vocab_size()
    self.pad_id = vocab.get("[PAD]", vocab.get("<pad>", 0))
    specials = [tid for t, tid in vocab.items()
                if (t.startswith("[") and t.endswith("]") and t[1:-1].isupper()) or t in ("<s>", "</s>", "<pad>", "<unk>")]
    added = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    self.special_ids = np.array(sorted(set(specials) | set(added)), np.int32)

  @classmethod
  def from_dir(cls, path: str | os.PathLike, max_length: int = 256,
               buckets: Sequence[int] = DEFAULT_BUCKETS) -> "Tokenizer":
    """Loads tokenizer.json (or builds BERT WordPiece from vocab.txt) from a model folder.

    Raises:
      FileNotFoundError: the folder has neither tokenizer.json nor vocab.txt.
    """
    path = os.fspath(path)
    tj, vt = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")
    if os.path.exists(tj):
      try:
        tok = tokenizers.Tokenizer.from_file(tj)
      except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{tj}: cannot parse tokenizer: {e}") from e
      src = tj
    elif os.path.exists(vt):
      lower = True
      cfg = os.path.join(path, "tokenizer_config.json")
      if os.path.exists(cfg):
        with open(cfg) as f:
          lower = json.load(f).get("do_lower_case", True)
      tok = tokenizers.BertWordPieceTokenizer(vt, lowercase=lower)._tokenizer
      src = vt
    else:
      raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")
    return cls(tok, max_length=max_length, buckets=buckets, source=src)

  def bucket(self, n: int) -> int:
    """Smallest bucket length >= n (capped at max_length)."""
    for b in self.buckets:
      if n <= b:
        return b
    return self.buckets[-1]

  def __call__(self, texts: Sequence[str], *, max_length: int | None = None,
               prefix: str = "") -> dict[str, np.ndarray]:
    """Tokenizes a batch.

    Args:
      texts: the strings.
      max_length: truncation length (default: self.max_length), special tokens included.
      prefix: prepended to every text (e.g. "query: ").

    Returns:
      {"input_ids", "attention_mask", "token_type_ids"}: int32 [B, L] with L the
      smallest bucket that holds the longest (truncated) sequence.
    """
    max_length = max_length or self.max_length
    texts = [prefix + t for t in texts] if prefix else list(texts)
    encs = self._tok.encode_batch(texts)
    rows = []
    for e in encs:
      ids = e.ids
      if len(ids) > max_length:  # keep the final special token ([SEP]) as HF truncation does
        ids = ids[:max_length - 1] + ids[-1:]
      rows.append(ids)
    longest = max((len(r) for r in rows), default=1)
    need = min(max(longest, 1), max_length)
    length = next((b for b in self.buckets if need <= b <= max_length), max_length)
    ids_bl = np.full((len(rows), length), self.pad_id, np.int32)
    mask_bl = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      ids_bl[i, :len(r)] = r
      mask_bl[i, :len(r)] = 1
    return {"input_ids": ids_bl, "attention_mask": mask_bl,
            "token_type_ids": np.zeros_like(ids_bl)}
