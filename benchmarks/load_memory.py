"""Peak host memory of loading a ~1 GB sharded safetensors checkpoint, tensor by tensor vs read-all-then-build.

Writes a random Llama-shaped checkpoint (fp32, 4 shards + index) to a temporary
folder, then loads it in fresh subprocesses:
  streamed: `hf_weights.load(folder)` (each tensor read, converted and placed, then freed);
  naive:    every tensor read into a dict first, then the model built from it.
and prints each peak RSS (ru_maxrss) above the interpreter's baseline, over the
checkpoint size.

  python benchmarks/load_memory.py [--layers 12] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import tokenizers
from safetensors.numpy import save_file

CHILD = r"""
import os, resource, sys, json
import numpy as np
import jax
from laspar_jax.models import hf_weights
from safetensors.numpy import load_file
folder, mode = sys.argv[1], sys.argv[2]
jax.numpy.zeros(1).block_until_ready()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "streamed":
  loaded = hf_weights.load(folder, weights=True)
else:
  files = sorted(set(json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"].values()))
  everything = {}
  for f in files:
    everything.update((k, (os.path.join(folder, f), k, v)) for k, v in load_file(os.path.join(folder, f)).items())
  loaded = hf_weights.load(folder, weights=False)
  model = loaded.model
  hf_cfg, family = hf_weights.read_config(folder)
  cfg = family.config_from_hf(hf_cfg)
  hf_weights.load_tensors(model, folder, family.checkpoint_names(cfg), model_type="llama",
                          tensors=list(everything.values()))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kib": base, "peak_kib": peak}))
"""


def write_checkpoint(folder: str, layers: int, hidden: int, inter: int, vocab: int, shards: int = 4) -> int:
  """Writes config.json, tokenizer-less Llama checkpoint shards and the index; returns tensor bytes."""
  rng = np.random.default_rng(0)
  heads = hidden // 64
  cfg = {
    "model_type": "llama",
    "hidden_size": hidden,
    "intermediate_size": inter,
    "num_hidden_layers": layers,
    "num_attention_heads": heads,
    "num_key_value_heads": heads,
    "vocab_size": vocab,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
  }
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update(
      {
        p + "input_layernorm.weight": (hidden,),
        p + "post_attention_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (hidden, hidden),
        p + "self_attn.k_proj.weight": (hidden, hidden),
        p + "self_attn.v_proj.weight": (hidden, hidden),
        p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "mlp.gate_proj.weight": (inter, hidden),
        p + "mlp.up_proj.weight": (inter, hidden),
        p + "mlp.down_proj.weight": (hidden, inter),
      }
    )
  names = list(shapes)
  weight_map, total = {}, 0
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: rng.standard_normal(shapes[n], np.float32) * 0.02 for n in names[s::shards]}
    total += sum(a.nbytes for a in part.values())
    save_file(part, os.path.join(folder, fname))
    weight_map.update(dict.fromkeys(part, fname))
    del part
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  # hf_weights.load also reads a tokenizer: a byte-level BPE with no merges is enough here.
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={chr(i + 256): i for i in range(256)}, merges=[]))
  tok.save(os.path.join(folder, "tokenizer.json"))
  return total


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--inter", type=int, default=4096)
  ap.add_argument("--vocab", type=int, default=32000)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory(prefix="load_memory_") as folder:
    size = write_checkpoint(folder, args.layers, args.hidden, args.inter, args.vocab)
    print(f"checkpoint: {size / 2**30:.2f} GiB fp32 in 4 shards ({args.layers} layers, d={args.hidden})")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    rows = {}
    for mode in ("streamed", "naive"):
      out = (
        subprocess.run([sys.executable, "-c", CHILD, folder, mode], env=env, check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
      )
      r = json.loads(out)
      extra = (r["peak_kib"] - r["base_kib"]) * 1024
      rows[mode] = extra
      print(
        f"{mode:9s} peak RSS above baseline: {extra / 2**30:.2f} GiB = {extra / size:.2f} x checkpoint "
        f"(total peak {r['peak_kib'] / 2**20:.2f} GiB)"
      )
    print(f"streamed / naive: {rows['streamed'] / rows['naive']:.2f}")


if __name__ == "__main__":
  main()
