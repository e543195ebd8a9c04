"""GGUF tokenizers: the byte-level BPE a GGUF file's metadata describes, built as transformers builds it."""

from __future__ import annotations

import os
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

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


def byte_alphabet() -> dict[int, str]:
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
  alphabet = byte_alphabet()
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
  bos, eos = (special_token(meta, k) for k in ("bos_token_id", "eos_token_id"))
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token")) and bos is not None
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token")) and eos is not None
  single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
  pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
  specials = {t: vocab[t] for t, on in ((bos, add_bos), (eos, add_eos)) if on}
  tok.post_processor = processors.TemplateProcessing(
    single=" ".join(single), pair=" ".join(pair), special_tokens=list(specials.items())
  )
  return tok


def special_token(meta: dict[str, Any], key: str) -> str | None:
  """The token string of a special id in GGUF metadata (tokenizer.ggml.<key>)."""
  tid, tokens = meta.get(f"tokenizer.ggml.{key}"), meta.get("tokenizer.ggml.tokens") or []
  return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None
