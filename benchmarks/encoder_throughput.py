"""Jitted forward throughput of the NNX BERT encoder vs the PyTorch reference, same process.

  python benchmarks/encoder_throughput.py                 # all-MiniLM-L6-v2, batch 32, L=128,256
  python benchmarks/encoder_throughput.py --repeats 5 --lengths 128

PyTorch (transformers BertModel, CPU, inference_mode) is the reference; it is not a
dependency of laspar_jax: run this where torch + transformers are installed
(e.g. `pip install torch==2.13.0 transformers`), otherwise only JAX numbers print.
Inputs are real SciFact abstracts truncated/padded to the length, all tokens real.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from laspar_jax.models import hf_weights


def _texts(data_dir: str, n: int) -> list[str]:
  with open(os.path.join(data_dir, "corpus.jsonl"), encoding="utf-8") as f:
    return [(lambda d: d["title"] + " " + d["text"])(json.loads(line)) for _, line in zip(range(n), f)]


def _time(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  t = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t) / repeats


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/scifact"))
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  texts = _texts(args.data, args.batch)
  rows = []
  for dtype_name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
    loaded = hf_weights.load(args.model, dtype=dtype, max_length=max(args.lengths))
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def fwd(state, ids, mask):
      return nnx.merge(graphdef, state)(ids, mask)

    for length in args.lengths:
      b = loaded.tokenizer(texts, max_length=length)
      ids = np.pad(b["input_ids"], ((0, 0), (0, length - b["input_ids"].shape[1])), constant_values=1012)
      mask = np.ones_like(ids)
      ids, mask = jnp.asarray(ids), jnp.asarray(mask)
      sec = _time(lambda: fwd(state, ids, mask).block_until_ready(), args.repeats)
      rows.append((f"jax {dtype_name}", length, args.batch / sec))

  try:
    import torch
    from transformers import AutoModel
    torch.set_num_threads(os.cpu_count() or 1)
    tm = AutoModel.from_pretrained(hf_weights.resolve(args.model)).eval()
    for length in args.lengths:
      ids_t = torch.full((args.batch, length), 1012, dtype=torch.long)
      ids_t[:, 0] = 101
      with torch.inference_mode():
        sec = _time(lambda: tm(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)), args.repeats)
      rows.append(("torch fp32", length, args.batch / sec))
  except ImportError as e:
    print(f"(PyTorch reference unavailable: {e})")

  ref = {length: r for name, length, r in rows if name == "torch fp32"}
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  cpus: {os.cpu_count()}  batch {args.batch}")
  print(f"{'impl':<12}{'length':>8}{'seq/s':>10}{'vs torch':>10}")
  for name, length, r in rows:
    ratio = f"{r / ref[length]:.2f}x" if length in ref else "-"
    print(f"{name:<12}{length:>8}{r:>10.1f}{ratio:>10}")


if __name__ == "__main__":
  main()
