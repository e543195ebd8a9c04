"""Zero-shot (RQ1) logic of a prompted `SparseEncoder`: settings, the in-text filter, impacts.

A zero-shot encoder is an ordinary `SparseEncoder` (untrained vocabulary head,
"mlm") whose `EncoderConfig` sets the zero-shot fields; it is saved, indexed
and evaluated by the same functions as a trained one (`encode`,
`distributed_index`, `evaluate.evaluate_config`). Defaults follow the
reference (JingfenQiao/Decoder4LSR, lsr/inference_zeroshot.py):

- `prompt`: a preset of `prompts.PRESETS`; the tokenizer composes it with the
  text (`Tokenizer.encode_with_offsets`) and the max lengths count the prompt,
  as the reference truncates the prompted string (250 tokens).
- `prompt_pool`: "all" pools over prompt + text positions (the reference runs
  the model's own pooling over the whole prompted input); "text" pools the
  text's positions only (ours before).
- `in_text_filter`: only vocabulary ids occurring in the text after English
  stop-word removal keep their weight (words: lowercased `\\w+` runs of the
  whole text, `data.stopwords.english()` removed, joined by spaces and
  tokenized). `filter_match`: "string" (default) keeps an id when its token
  string, without the word-start marker (Ġ, ▁, ##) and lowercased, equals that
  of a token of the filtered text; "id" keeps the filtered text's own ids (the
  reference's rule). When every kept weight of a text is 0 the unfiltered
  weights are used, capped at the usual top-k (the reference's fallback).
- `term_cap`: 0 keeps every in-text term (the reference), else at most that many.
- `impacts`: "int100" writes int(w * 100) as the reference writes impacts;
  "float" keeps the weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laspar_jax import prompts
from laspar_jax.data import stopwords

PROMPT_POOLS = ("all", "text")
FILTER_MATCHES = ("string", "id")
IMPACTS = ("float", "int100")
_WORD = re.compile(r"\w+")
_MARKERS = ("Ġ", "▁", "##")


def check_config(cfg: Any) -> None:
  """Raises ValueError naming the `EncoderConfig` field whose zero-shot setting is unknown."""
  if cfg.prompt:
    prompts.get_preset(cfg.prompt)
  for name, known in (("prompt_pool", PROMPT_POOLS), ("filter_match", FILTER_MATCHES), ("impacts", IMPACTS)):
    if getattr(cfg, name) not in known:
      raise ValueError(f"EncoderConfig.{name} must be one of {known}, got {getattr(cfg, name)!r}")
  if cfg.term_cap < 0:
    raise ValueError(f"EncoderConfig.term_cap must be >= 0 (0: every in-text term), got {cfg.term_cap}")


def is_zeroshot(cfg: Any) -> bool:
  """Whether an `EncoderConfig` sets any zero-shot behaviour (prompt, filter, impacts)."""
  return bool(cfg.prompt) or bool(cfg.in_text_filter) or cfg.impacts != "float"


def encoder_fields(z: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A study config's `zeroshot` section (old ZeroShotConfig fields) -> (EncoderConfig fields, eval fields).

  The preset's read-out ("last_token" for PromptReps) is the decoding unless
  `decoding` is given; `pool` becomes `prompt_pool`; `topk` / `query_topk`
  become the eval section's d_topk / q_topk.
  """
  z = dict(z.to_dict() if hasattr(z, "to_dict") else z)
  preset = prompts.get_preset(z.pop("preset", "none") or "none")
  known = {"backbone", "decoding", "pool", "query_max_len", "doc_max_len", "in_text_filter", "filter_match"}
  known |= {"topk", "query_topk", "dtype", "batch_size", "decoding_kwargs", "term_cap", "impacts", "prompt_pool"}
  known |= {"special_tokens", "length_multiple", "pooling"}
  if unknown := sorted(set(z) - known):
    raise ValueError(f"unknown zero-shot config fields {unknown}; known: {sorted(known)}")
  pooling = z.pop("pooling", "max")
  fields = dict(
    backbone=z["backbone"],
    head="mlm",
    head_kwargs={} if pooling == "max" else {"pooling": pooling},
    prompt="" if preset.name == "none" else preset.name,
    decoding=z.get("decoding") or preset.decoding,
    decoding_kwargs=dict(z.get("decoding_kwargs") or {}),
    prompt_pool=z.get("prompt_pool") or z.get("pool") or "all",
  )
  for name in ("query_max_len", "doc_max_len", "in_text_filter", "filter_match", "dtype", "term_cap", "impacts"):
    if name in z:
      fields[name] = z[name]
  if "special_tokens" in z:
    fields["special_tokens"] = z["special_tokens"]
  ev = {k: v for k, v in (("d_topk", z.get("topk")), ("batch_size", z.get("batch_size"))) if v}
  if z.get("query_topk") or z.get("topk"):
    ev["q_topk"] = z.get("query_topk") or z.get("topk")
  return fields, ev


def _norm(token: str) -> str:
  """A token string without its word-start marker (Ġ, ▁, ##), lowercased."""
  return next((token[len(m) :] for m in _MARKERS if token.startswith(m)), token).lower()


class InTextFilter:
  """Vocabulary ids occurring in a text after stop-word removal (see the module docstring)."""

  def __init__(self, tokenizer: Any, vocab: int, *, match: str = "string", stop: frozenset[str] | None = None):
    if match not in FILTER_MATCHES:
      raise ValueError(f"filter_match must be one of {FILTER_MATCHES}, got {match!r}")
    self.tokenizer = tokenizer
    self.match = match
    self.stop = stopwords.english() if stop is None else stop
    self.vocab = vocab
    special = set(np.asarray(tokenizer.special_ids).tolist())
    groups: dict[str, list[int]] = {}
    for tok, i in tokenizer.vocab().items():
      if i < vocab and i not in special:
        groups.setdefault(_norm(tok), []).append(i)
    self.groups = {k: np.asarray(sorted(v), np.int32) for k, v in groups.items()}
    self.special = special

  def words(self, text: str) -> list[str]:
    """Lowercased words of `text` without stop words."""
    return [w for w in _WORD.findall(text.lower()) if w not in self.stop]

  def allowed_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Per text, the int32 vocabulary ids kept by the filter."""
    joined = [" ".join(self.words(t)) for t in texts]
    out = []
    for j, row in zip(joined, self.tokenizer.encode_plain(joined)):
      ids = {i for i in row if i not in self.special and i < self.vocab} if j else set()
      if self.match == "id":
        out.append(np.asarray(sorted(ids), np.int32))
        continue
      keys = {_norm(self.tokenizer.id_to_token(i) or "") for i in ids}
      parts = [self.groups[k] for k in keys if k in self.groups]
      out.append(np.unique(np.concatenate(parts)) if parts else np.zeros((0,), np.int32))
    return out

  def allowed_mask(self, texts: Sequence[str], batch: int) -> np.ndarray:
    """bool [batch, V]: the kept ids of each text (rows past len(texts) all False)."""
    out = np.zeros((batch, self.vocab), bool)
    for j, ids in enumerate(self.allowed_ids(texts)):
      out[j, ids] = True
    return out


def width(n_allowed: int, k: int, term_cap: int) -> int:
  """Dims a filtered batch keeps per row: every in-text term (term_cap 0) or the cap, at least k; powers of 2."""
  need = max(k, term_cap or n_allowed, 1)
  return 1 << (need - 1).bit_length()


def filter_and_scale(rep_bv: jax.Array, allowed_bv: jax.Array | None, impacts: str) -> tuple[jax.Array, jax.Array]:
  """In-text filter with the reference's fallback, then impacts (jit-able).

  Args:
    rep_bv: [B, V] weights.
    allowed_bv: bool [B, V] ids kept by the filter (None: no filter).
    impacts: "float" or "int100" (int(w * 100); the fallback then tests the integer weights).

  Returns:
    (rep_bv, fell_back_b): the weights and bool [B], True where every kept weight was 0.
  """
  scale = (lambda x: jnp.floor(x * 100.0)) if impacts == "int100" else (lambda x: x)
  if allowed_bv is None:
    return scale(rep_bv), jnp.zeros(rep_bv.shape[:1], bool)
  kept_bv = scale(jnp.where(allowed_bv, rep_bv, 0.0))
  fell_back = ~jnp.any(kept_bv > 0, axis=1)
  return jnp.where(fell_back[:, None], scale(rep_bv), kept_bv), fell_back


def cap_rows(val_bk: np.ndarray, fell_back_b: np.ndarray, k: int, term_cap: int) -> np.ndarray:
  """Zeroes, per sorted row, the weights past k (fallback rows) or past term_cap (filtered rows, when set)."""
  val_bk = np.array(val_bk)
  val_bk[fell_back_b, k:] = 0.0
  if term_cap:
    val_bk[~fell_back_b, term_cap:] = 0.0
  return val_bk
