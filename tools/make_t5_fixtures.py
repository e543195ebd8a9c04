"""Writes the T5 parity fixtures: tiny random T5 v1.0 and Flan-T5 (v1.1) with transformers' outputs.

Run with the tools environment (transformers + CPU torch; never a package dependency):

  TORCH_VENV/bin/python tools/make_t5_fixtures.py [--out tests/fixtures]

Each fixture folder (`t5_v10/`, `t5_flan/`) holds config.json,
model.safetensors, a tiny WordLevel tokenizer.json (+ tokenizer_config.json)
and reference.npz with, for right- and left-padded batches (suffix `_right`,
`_left`): `ids`, `mask`, `enc` (encoder states), `dec_ids` = shift_right(ids),
`dec_mask` = the mask shifted right with a visible start token, `dec`
(decoder states, teacher forcing), `logits` (LM logits) and `dec_alone`
(the decoder stack alone on ids/mask: no encoder states, no cross-attention).

v1.0: feed_forward_proj "relu", tied head (saved by `save_pretrained`).
Flan-T5: "gated-gelu", an untied head drawn apart from the shared table, one
more decoder layer than encoder layers, and every tensor name written
(`encoder/decoder.embed_tokens.weight` aliases included) as older checkpoints do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib

import numpy as np
import tokenizers
import torch
import transformers
from safetensors.torch import save_file

SEED = 0
VOCAB = 256
LENGTHS = (20, 14, 9, 3)

COMMON = dict(
  vocab_size=VOCAB,
  d_model=32,
  d_kv=8,
  d_ff=64,
  num_layers=2,
  num_heads=4,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=16,
  dropout_rate=0.1,
  layer_norm_epsilon=1e-6,
  pad_token_id=0,
  eos_token_id=1,
  decoder_start_token_id=0,
)
VARIANTS = {
  "t5_v10": dict(feed_forward_proj="relu", tie_word_embeddings=True),
  "t5_flan": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
}


def shift_right(x: np.ndarray, start: int) -> np.ndarray:
  return np.concatenate([np.full((x.shape[0], 1), start, x.dtype), x[:, :-1]], axis=1)


def batches(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Right- and left-padded batches of the same token sequences."""
  seqs = [rng.integers(3, VOCAB, n) for n in LENGTHS]
  seqs = [np.concatenate([s[:-1], [1]]) for s in seqs]  # ends with </s>
  width = max(LENGTHS)
  out = {}
  for side in ("right", "left"):
    ids, mask = np.zeros((len(seqs), width), np.int64), np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
      sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
      ids[i, sl], mask[i, sl] = s, 1
    out[side] = (ids, mask)
  return out


def write_tokenizer(folder: pathlib.Path) -> None:
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(
    json.dumps({"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "padding_side": "right"})
  )


def check_buckets() -> None:
  """Our host-side float32 buckets (as in laspar_jax.models.t5) equal transformers' on long ranges."""
  f = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  rel = np.arange(-3000, 3000)
  for bidirectional in (True, False):
    for nb, md in ((32, 128), (8, 16), (32, 64)):
      ref = f(torch.tensor(rel), bidirectional=bidirectional, num_buckets=nb, max_distance=md).numpy()
      r, b, n = rel.copy(), np.zeros_like(rel), nb
      if bidirectional:
        n //= 2
        b += (r > 0) * n
        r = np.abs(r)
      else:
        r = -np.minimum(r, 0)
      me = n // 2
      with np.errstate(divide="ignore"):
        ratio = np.log(r.astype(np.float32) / np.float32(me))
      ratio = ratio / np.float32(math.log(md / me)) * np.float32(n - me)
      large = np.minimum(me + np.where(r < me, 0, ratio).astype(np.int64), n - 1)
      ours = b + np.where(r < me, r, large)
      bad = np.flatnonzero(ours != ref)
      assert not bad.size, (bidirectional, nb, md, rel[bad][:10], ours[bad][:10], ref[bad][:10])


@torch.no_grad()
def make(name: str, out: pathlib.Path) -> None:
  torch.manual_seed(SEED)
  cfg = transformers.T5Config(**COMMON, **VARIANTS[name])
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  model.config._attn_implementation = "eager"
  tied = VARIANTS[name]["tie_word_embeddings"]
  folder = out / name
  folder.mkdir(parents=True, exist_ok=True)
  if tied:
    model.save_pretrained(folder, safe_serialization=True)
    for extra in ("generation_config.json",):
      (folder / extra).unlink(missing_ok=True)
  else:
    # An untied head of its own (transformers >= 5 ties T5 heads at init).
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, cfg.d_model) * cfg.d_model**-0.5)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    hf.update(tie_word_embeddings=False, architectures=["T5ForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(hf, indent=1))
  with open(folder / "config.json") as fh:
    assert json.load(fh).get("tie_word_embeddings", True) == tied
  write_tokenizer(folder)

  ref = {}
  for side, (ids, mask) in batches(np.random.default_rng(SEED)).items():
    dec_ids, dec_mask = shift_right(ids, cfg.decoder_start_token_id), shift_right(mask, 1)
    t = lambda a: torch.tensor(a)
    enc = model.encoder(input_ids=t(ids), attention_mask=t(mask)).last_hidden_state
    dec = model.decoder(
      input_ids=t(dec_ids),
      attention_mask=t(dec_mask),
      encoder_hidden_states=enc,
      encoder_attention_mask=t(mask),
      use_cache=False,
    ).last_hidden_state
    logits = model(
      input_ids=t(ids),
      attention_mask=t(mask),
      decoder_input_ids=t(dec_ids),
      decoder_attention_mask=t(dec_mask),
      use_cache=False,
    ).logits
    expect = (dec * cfg.d_model**-0.5 if tied else dec) @ model.lm_head.weight.T
    assert torch.allclose(logits, expect, atol=1e-5), "logits are not the head applied to dec"
    alone = model.decoder(input_ids=t(ids), attention_mask=t(mask), use_cache=False).last_hidden_state
    for key, val in dict(
      ids=ids, mask=mask, dec_ids=dec_ids, dec_mask=dec_mask, enc=enc, dec=dec, logits=logits, dec_alone=alone
    ).items():
      val = val.numpy() if isinstance(val, torch.Tensor) else val
      assert np.isfinite(val).all(), (name, side, key)
      ref[f"{key}_{side}"] = val.astype(np.float32 if val.dtype.kind == "f" else np.int32)
  np.savez_compressed(folder / "reference.npz", **ref)
  size = sum(p.stat().st_size for p in folder.iterdir())
  assert size < 1 << 20, f"{folder} is {size} bytes"
  print(f"{folder}: {size} bytes; transformers {transformers.__version__}, torch {torch.__version__}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
  args = parser.parse_args()
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  check_buckets()
  for name in VARIANTS:
    make(name, pathlib.Path(args.out))


if __name__ == "__main__":
  main()
