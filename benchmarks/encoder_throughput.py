"""Jitted forward throughput of the NNX BERT encoder vs the PyTorch reference, same process.

  python benchmarks/encoder_throughput.py                 # all-MiniLM-L6-v2, batch 32, L=128,256
  python benchmarks/encoder_throughput.py --repeats 5 --lengths 128
  python benchmarks/encoder_throughput.py --attention cpu xla  # both attention implementations

PyTorch (transformers BertModel, CPU, inference_mode, fp32 and bf16) is the
reference; it is not a dependency of laspar_jax: run this where torch +
transformers are installed (e.g. `pip install torch==2.13.0 transformers`),
otherwise only JAX numbers print. JAX runs through `laspar_jax.platform.jit`
(the tuned XLA:CPU options); `--xla_defaults` adds rows with XLA's defaults.
Inputs are real SciFact abstracts truncated/padded to the length, all tokens
real. Implementations are timed in interleaved rounds (one call each per
round, after a warm-up); each figure is the best round.
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

from laspar_jax import platform
from laspar_jax.models import hf_weights


def _texts(data_dir: str, n: int) -> list[str]:
  with open(os.path.join(data_dir, "corpus.jsonl"), encoding="utf-8") as f:
    return [(lambda d: d["title"] + " " + d["text"])(json.loads(line)) for _, line in zip(range(n), f)]


def _interleaved_best(fns: dict[str, callable], rounds: int) -> dict[str, float]:
  """Best wall time per callable over `rounds` rounds, each calling every one once.

  Interleaving exposes every implementation to the same drift of a shared
  machine (clock, neighbours), so the ratios stay fair when the level moves.
  """
  for fn in fns.values():
    fn()  # warm-up / compile
  best = {name: float("inf") for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/scifact"))
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
  ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the best of each counts")
  ap.add_argument("--xla_defaults", action="store_true", help="also time with XLA's default options")
  ap.add_argument("--attention", nargs="+", default=["auto"], help="attention implementations to time (auto, cpu, xla)")
  args = ap.parse_args()

  texts = _texts(args.data, args.batch)
  fns: dict[tuple[str, int], callable] = {}
  for (dtype_name, dtype), impl in (
    (d, a) for d in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)) for a in args.attention
  ):
    loaded = hf_weights.load(args.model, dtype=dtype, max_length=max(args.lengths), attention_impl=impl)
    graphdef, state = nnx.split(loaded.model)

    def fwd(state, ids, mask, graphdef=graphdef):
      return nnx.merge(graphdef, state)(ids, mask)

    attn = "" if args.attention == ["auto"] else f" attn={impl}"
    variants = [(attn, platform.jit(fwd, compute_dtype=dtype))]
    if args.xla_defaults:
      variants.append((f"{attn} xla-dflt", jax.jit(fwd)))
    for length in args.lengths:
      b = loaded.tokenizer(texts, max_length=length)
      ids = np.pad(b["input_ids"], ((0, 0), (0, length - b["input_ids"].shape[1])), constant_values=1012)
      ids, mask = jnp.asarray(ids), jnp.asarray(np.ones_like(ids))
      for tag, fn in variants:
        fns[(f"jax {dtype_name}{tag}", length)] = lambda fn=fn, state=state, ids=ids, mask=mask: fn(
          state, ids, mask
        ).block_until_ready()

  try:
    import copy

    import torch
    from transformers import AutoModel

    torch.set_num_threads(os.cpu_count() or 1)
    tm = AutoModel.from_pretrained(hf_weights.resolve(args.model)).eval()
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
      m = copy.deepcopy(tm).to(dtype)
      for length in args.lengths:
        ids_t = torch.full((args.batch, length), 1012, dtype=torch.long)
        ids_t[:, 0] = 101

        def run(m=m, ids_t=ids_t):
          with torch.inference_mode():
            m(input_ids=ids_t, attention_mask=torch.ones_like(ids_t))

        fns[(f"torch {dtype_name}", length)] = run
  except ImportError as e:
    print(f"(PyTorch reference unavailable: {e})")

  rows = []
  for length in args.lengths:  # one interleaved contest per length
    group = {name: fn for (name, n), fn in fns.items() if n == length}
    for name, sec in _interleaved_best(group, args.repeats).items():
      rows.append((name, length, args.batch / sec))

  ref = {(name.split()[1], length): r for name, length, r in rows if name.startswith("torch")}
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  cpus: {os.cpu_count()}  "
    f"batch {args.batch}  best of {args.repeats} interleaved rounds"
  )
  print(f"{'impl':<20}{'length':>8}{'seq/s':>10}{'vs torch fp32':>15}{'vs torch same dtype':>21}")
  for name, length, r in rows:
    fp32 = ref.get(("fp32", length))
    same = ref.get((name.split()[1], length))
    print(
      f"{name:<20}{length:>8}{r:>10.1f}{f'{r / fp32:.2f}x' if fp32 else '-':>15}"
      f"{f'{r / same:.2f}x' if same else '-':>21}"
    )


if __name__ == "__main__":
  main()
