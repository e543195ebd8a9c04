"""Builds the decoder parity fixtures (OPT pre-/post-LN, Llama 3, Qwen2, Mistral) with transformers.

Each fixture is a tiny random `*ForCausalLM` (fixed seed, weights redrawn with
a larger spread than the default init so every tensor matters), saved under
tests/fixtures/<name>/ as config.json + model.safetensors + a tiny WordLevel
tokenizer.json (so `hf_weights.load` can read the folder) + reference.npz:

  ids_{right,left} [B, T] int32, mask_{right,left} [B, T] int32,
  pos_{right,left} [B, T] int32 (the position_ids given to transformers: OPT
    derives them from the mask itself; Llama-family gets max(cumsum(mask) - 1, 0)),
  hidden_{right,left} [B, T, d] float32 (last hidden states, after the final norm),
  logits_{right,left} [B, T, V] float32.

Run (needs torch CPU + transformers, never a package dependency):

  TORCH_VENV/bin/python tools/make_decoder_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil

import numpy as np
import torch
import transformers

VOCAB = 128
LENGTHS = (10, 7, 4)  # real tokens per row; T = max


def _configs() -> dict[str, transformers.PretrainedConfig]:
  common = dict(vocab_size=VOCAB, max_position_embeddings=64)
  opt = dict(
    common,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=64,
    dropout=0.0,
    attention_dropout=0.0,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
    activation_function="relu",
    enable_bias=True,
  )
  llama = dict(
    common,
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    attention_dropout=0.0,
  )
  return {
    "opt_pre": transformers.OPTConfig(**opt, hidden_size=32, word_embed_proj_dim=32, do_layer_norm_before=True),
    # opt-350m layout: post-LN, word embeddings in a smaller space with project_in/out.
    "opt_post": transformers.OPTConfig(**opt, hidden_size=32, word_embed_proj_dim=16, do_layer_norm_before=False),
    "llama3": transformers.LlamaConfig(
      **llama,
      num_key_value_heads=2,
      tie_word_embeddings=False,
      rope_theta=500000.0,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
    "qwen2": transformers.Qwen2Config(**llama, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    # head_dim given (8 * 4 heads != 64) and a sliding window shorter than the sequence.
    "mistral": transformers.MistralConfig(
      **llama, num_key_value_heads=1, head_dim=8, sliding_window=4, tie_word_embeddings=False, rope_theta=10000.0
    ),
  }


def _redraw(model: torch.nn.Module, seed: int) -> None:
  """Every weight N(0, 0.15^2); norm weights 1 + N(0, 0.1^2) (so scale mapping errors show)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.15 * noise)


def _batch(pad_id: int, side: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  t = max(LENGTHS)
  ids = np.full((len(LENGTHS), t), pad_id, np.int32)
  mask = np.zeros((len(LENGTHS), t), np.int32)
  for i, n in enumerate(LENGTHS):
    sl = slice(0, n) if side == "right" else slice(t - n, t)
    ids[i, sl] = rng.integers(3, VOCAB, n)
    mask[i, sl] = 1
  return ids, mask


def _tokenizer_json() -> dict:
  vocab = {f"w{i}": i for i in range(VOCAB)}
  return {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [],
    "normalizer": None,
    "pre_tokenizer": {"type": "WhitespaceSplit"},
    "post_processor": None,
    "decoder": None,
    "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
  }


def make(name: str, cfg: transformers.PretrainedConfig, out: pathlib.Path, seed: int) -> None:
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  model.eval()
  _redraw(model, seed)
  if cfg.tie_word_embeddings:
    model.tie_weights()
  d = out / name
  if d.exists():
    shutil.rmtree(d)
  model.save_pretrained(d)
  for extra in ("generation_config.json",):
    if (d / extra).exists():
      os.remove(d / extra)
  (d / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
  (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": f"w{cfg.pad_token_id}"}))
  ref = {}
  for side in ("right", "left"):
    ids, mask = _batch(cfg.pad_token_id, side, seed + 1)
    if cfg.model_type == "opt":
      pos = np.cumsum(mask, 1) * mask - 1  # what OPT computes itself (before its offset 2)
      kw = {}
    else:
      pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
      kw = {"position_ids": torch.from_numpy(pos.astype(np.int64))}
    with torch.no_grad():
      res = model(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        output_hidden_states=True,
        **kw,
      )
    if cfg.model_type == "opt":
      hidden = model.model.decoder(
        input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64))
      ).last_hidden_state
    else:
      hidden = model.model(
        input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)), **kw
      ).last_hidden_state
    ref.update(
      {
        f"ids_{side}": ids,
        f"mask_{side}": mask,
        f"pos_{side}": pos.astype(np.int32),
        f"hidden_{side}": hidden.detach().numpy().astype(np.float32),
        f"logits_{side}": res.logits.detach().numpy().astype(np.float32),
      }
    )
  np.savez_compressed(d / "reference.npz", **ref)
  size = sum(f.stat().st_size for f in d.iterdir())
  print(f"{name}: {size / 1024:.0f} KiB, tensors {sorted(model.state_dict())[:3]} ...")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
  args = ap.parse_args()
  torch.set_num_threads(1)
  for i, (name, cfg) in enumerate(_configs().items()):
    make(name, cfg, pathlib.Path(args.out), seed=1000 + i)


if __name__ == "__main__":
  main()
