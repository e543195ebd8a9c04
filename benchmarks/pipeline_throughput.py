"""Input pipeline rate vs the train step's consumption rate, same CPU, same process.

  python benchmarks/pipeline_throughput.py                       # B=32, q_len=32, d_len=256
  python benchmarks/pipeline_throughput.py --batches 100 --steps 3 --q_len 256

1. Pipeline: TrainPipeline over SciFact train (real queries and abstracts,
   looked up by id from corpus.jsonl, tokenized with the MiniLM tokenizer,
   padded to fixed lengths), B queries + B documents (n_neg=0) per batch,
   prefetch off: host batches per second on one thread (+ the tokenizer's own
   Rust threads).
2. Train step: jitted forward+backward (value_and_grad of an in-batch softmax
   loss on mean-pooled embeddings) of the real all-MiniLM-L6-v2 on the same
   batch shapes; steps per second after compilation.
3. Together: the step consumes batches from the prefetching pipeline; reports
   the time the step loop waited on the pipeline.

Prints the ratio pipeline rate / step rate (must be >= 5).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from laspar_jax.data import training
from laspar_jax.data.pipeline import TrainPipeline
from laspar_jax.data.sources import load_collection
from laspar_jax.models import hf_weights
from laspar_jax.models.heads import pooling


def _make_step(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, batch):
    m = nnx.merge(graphdef, params, rest)
    e_q = pooling.mean_pool(m(batch["q_input_ids"], batch["q_attention_mask"]), batch["q_attention_mask"])
    e_d = pooling.mean_pool(m(batch["d_input_ids"], batch["d_attention_mask"]), batch["d_attention_mask"])
    s_qd = pooling.l2_normalize(e_q) @ pooling.l2_normalize(e_d).T * 20.0
    return optax.softmax_cross_entropy_with_integer_labels(s_qd, jnp.arange(s_qd.shape[0])).mean()

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  return lambda batch: grad_fn(params, rest, batch)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  here = os.path.dirname(os.path.abspath(__file__))
  ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "scifact"))
  ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--q_len", type=int, default=32)
  ap.add_argument("--d_len", type=int, default=256)
  ap.add_argument("--batches", type=int, default=60, help="pipeline batches timed")
  ap.add_argument("--steps", type=int, default=3, help="train steps timed")
  args = ap.parse_args()

  loaded = hf_weights.load(args.model, max_length=max(args.q_len, args.d_len))
  coll = load_collection(args.data, split="train")
  examples = training.build_examples(coll.qrels, None, n_neg=0)
  mk = lambda prefetch: TrainPipeline(
    examples,
    coll,
    loaded.tokenizer,
    batch_size=args.batch_size,
    n_neg=0,
    q_len=args.q_len,
    d_len=args.d_len,
    seed=0,
    prefetch=prefetch,
  )
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform} x{len(jax.devices())}, "
    f"{os.cpu_count()} cpus; {len(examples)} SciFact train examples; batch {args.batch_size} queries "
    f"(len {args.q_len}) + {args.batch_size} docs (len {args.d_len})"
  )

  pipe = mk(0)
  first = next(pipe)
  real = first["d_attention_mask"].sum(1)
  print(f"doc tokens per row: mean {real.mean():.0f}, {np.mean(real == args.d_len):.0%} rows full length")
  t = time.perf_counter()
  for _ in range(args.batches):
    next(pipe)
  pipe_rate = args.batches / (time.perf_counter() - t)
  print(f"pipeline: {pipe_rate:.1f} batches/s ({1000 / pipe_rate:.1f} ms/batch) over {args.batches} batches")

  step = _make_step(loaded.model)
  t = time.perf_counter()
  jax.block_until_ready(step(first))
  print(f"train step compile + first run: {time.perf_counter() - t:.1f} s")
  t = time.perf_counter()
  for _ in range(args.steps):
    jax.block_until_ready(step(first))
  step_s = (time.perf_counter() - t) / args.steps
  print(
    f"train step (fwd+bwd, fp32): {step_s:.2f} s/step = {1 / step_s:.3f} batches/s "
    f"({2 * args.batch_size / step_s:.1f} seq/s)"
  )
  print(f"RATIO pipeline/step = {pipe_rate * step_s:.0f}x (need >= 5x)")

  pipe = mk(2)
  next(pipe)  # start the prefetch thread
  waited, t = 0.0, time.perf_counter()
  for _ in range(args.steps):
    w = time.perf_counter()
    batch = next(pipe)
    waited += time.perf_counter() - w
    jax.block_until_ready(step(batch))
  total = time.perf_counter() - t
  pipe.close()
  print(
    f"together (prefetch=2): {total / args.steps:.2f} s/step, waited on input {waited:.3f} s "
    f"in {args.steps} steps ({100 * waited / total:.2f}%)"
  )


if __name__ == "__main__":
  main()
