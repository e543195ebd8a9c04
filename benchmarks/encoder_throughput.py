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
import copy
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root (configs)
from configs import common  # noqa: E402
from laspar_jax import platform  # noqa: E402
from laspar_jax.models import hf_weights  # noqa: E402


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
  ap.add_argument("--data", default=common.data_path("scifact"), help="a BEIR folder (default: $LASPAR_DATA/scifact)")
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


# --------------------------------------------------------------------------- device_check rows
# Forward and forward+backward of a BERT encoder vs transformers' BertModel (SDPA) in the same process,
# on the default device: JAX at three precisions, torch at the same three. Used by benchmarks/device_check.py.

FULL = {"batch": 256, "lengths": (128, 256), "q": (64, 64), "d": (64, 256), "rounds": 5}
TINY = {"batch": 8, "lengths": (16,), "q": (8, 16), "d": (8, 32), "rounds": 2}
# (name, JAX compute dtype, JAX matmul_precision, torch dtype name, torch allow_tf32)
PRECISIONS = (
  ("fp32", jnp.float32, "highest", "float32", False),
  ("tf32", jnp.float32, "tf32", "float32", True),
  ("bf16", jnp.bfloat16, "default", "bfloat16", False),
)
TORCH_MISSING = "torch not installed"


def _random_ids(vocab: int, b: int, length: int, seed: int) -> np.ndarray:
  ids = np.random.default_rng(seed).integers(1000, vocab, (b, length)).astype(np.int32)
  ids[:, 0] = 101
  return ids


def _inbatch_scores(h_qtd, h_dtd, mask_qt, mask_dt):
  """In-batch scores of mean-pooled, L2-normalised embeddings at temperature 0.05 (JAX)."""
  pool = lambda h, m: (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
  q, d = pool(h_qtd, mask_qt), pool(h_dtd, mask_dt)
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
  return q @ d.T / 0.05


def _jax_callables(model_path: str, shapes: dict, vocab: int) -> tuple[dict, np.ndarray]:
  """{(kind, precision, L): callable}, and the fp32 ("highest") hidden states of the first length."""
  fns: dict = {}
  h_ref = None
  (bq, lq), (bd, ld) = shapes["q"], shapes["d"]
  q_ids, d_ids = jnp.asarray(_random_ids(vocab, bq, lq, 1)), jnp.asarray(_random_ids(vocab, bd, ld, 2))
  q_mask, d_mask = jnp.ones_like(q_ids), jnp.ones_like(d_ids)
  for name, dtype, prec, _, _ in PRECISIONS:
    loaded = hf_weights.load(model_path, dtype=dtype, max_length=max(max(shapes["lengths"]), ld))
    graphdef, params, rest = nnx.split(loaded.model, nnx.Param, ...)

    def fwd(params, ids, mask, graphdef=graphdef, rest=rest):
      return nnx.merge(graphdef, params, rest)(ids, mask)

    def loss(params, q_ids, q_mask, d_ids, d_mask, graphdef=graphdef, rest=rest):
      m = nnx.merge(graphdef, params, rest)
      h_q, h_d = m(q_ids, q_mask).astype(jnp.float32), m(d_ids, d_mask).astype(jnp.float32)
      s = _inbatch_scores(h_q, h_d, q_mask.astype(jnp.float32), d_mask.astype(jnp.float32))
      return jnp.mean(jax.nn.logsumexp(s, axis=1) - jnp.diagonal(s))

    fwd_j = platform.jit(fwd, compute_dtype=dtype, matmul_precision=prec)
    step_j = platform.jit(jax.value_and_grad(loss), compute_dtype=dtype, matmul_precision=prec)
    for length in shapes["lengths"]:
      ids = jnp.asarray(_random_ids(vocab, shapes["batch"], length, 0))
      mask = jnp.ones_like(ids)
      fns[("forward", name, length)] = lambda f=fwd_j, p=params, i=ids, m=mask: f(p, i, m).block_until_ready()
      if name == "fp32" and h_ref is None:
        h_ref = np.asarray(fwd_j(params, ids, mask), np.float32)
    fns[("fwd+bwd", name, 0)] = lambda f=step_j, p=params: jax.block_until_ready(f(p, q_ids, q_mask, d_ids, d_mask))
  return fns, h_ref


def _torch_callables(model_path: str, shapes: dict, vocab: int) -> tuple[dict, Any, Any]:
  """The same callables on transformers' BertModel (SDPA), or ({}, None, None) without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import AutoModel  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}, None, None
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  base = AutoModel.from_pretrained(hf_weights.resolve(model_path), attn_implementation="sdpa").to(dev).eval()
  models = {"float32": base, "bfloat16": copy.deepcopy(base).to(torch.bfloat16)}
  t = lambda a: torch.from_numpy(a.astype(np.int64)).to(dev)
  (bq, lq), (bd, ld) = shapes["q"], shapes["d"]
  q_ids, d_ids = t(_random_ids(vocab, bq, lq, 1)), t(_random_ids(vocab, bd, ld, 2))
  fns: dict = {}
  for name, _, _, tdtype, tf32 in PRECISIONS:
    m = models[tdtype]

    def set_tf32(on=tf32):
      torch.backends.cuda.matmul.allow_tf32 = on
      torch.backends.cudnn.allow_tf32 = on

    for length in shapes["lengths"]:
      ids = t(_random_ids(vocab, shapes["batch"], length, 0))

      def fwd(m=m, ids=ids, set_tf32=set_tf32):
        set_tf32()
        with torch.inference_mode():
          m(input_ids=ids, attention_mask=torch.ones_like(ids))
        sync()

      fns[("forward", name, length)] = fwd

    def step(set_tf32=set_tf32, bf16=tdtype == "bfloat16"):
      set_tf32()
      base.zero_grad(set_to_none=True)
      with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        h_q = base(input_ids=q_ids, attention_mask=torch.ones_like(q_ids)).last_hidden_state.float()
        h_d = base(input_ids=d_ids, attention_mask=torch.ones_like(d_ids)).last_hidden_state.float()
      # the JAX loss with all-ones masks: mean pooling, L2 normalisation, temperature 0.05
      q = torch.nn.functional.normalize(h_q.mean(1), dim=-1)
      d = torch.nn.functional.normalize(h_d.mean(1), dim=-1)
      s = q @ d.T / 0.05
      torch.nn.functional.cross_entropy(s, torch.arange(s.shape[0], device=dev)).backward()
      sync()

    fns[("fwd+bwd", name, 0)] = step

  def hidden_fp32(ids_np: np.ndarray) -> np.ndarray:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
      ids = t(ids_np)
      return base(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float().cpu().numpy()

  def peak_and_reset() -> float | None:
    if dev != "cuda":
      return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak

  return fns, hidden_fp32, peak_and_reset


def _process_peak_gib() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return peak / 2**30 if peak else None


def encoder_rows(model_path: str, shapes: dict) -> list[dict]:
  """Forward (seq/s) and forward+backward (ms) rows, JAX and torch, with ratios and the fp32 parity row.

  Args:
    model_path: a BERT folder or hub id (all-MiniLM-L6-v2 on the device).
    shapes: FULL or TINY.

  Returns:
    Rows {"name", "value", "unit", "peak_GiB", "note"}; torch rows are NaN with
    note "torch not installed" where torch is missing.
  """
  vocab = json.load(open(os.path.join(hf_weights.resolve(model_path), "config.json"), encoding="utf-8"))["vocab_size"]
  j_fns, h_jax = _jax_callables(model_path, shapes, vocab)
  t_fns, t_hidden, t_peak = _torch_callables(model_path, shapes, vocab)
  rows = []
  for key in j_fns:  # one interleaved contest per (kind, precision, length): JAX then torch
    kind, name, length = key
    group = {"jax": j_fns[key], **({"torch": t_fns[key]} if key in t_fns else {})}
    if t_peak:
      t_peak()
    best = _interleaved_best(group, shapes["rounds"])
    j_peak, tp = _process_peak_gib(), (t_peak() if t_peak else None)
    label = f"{kind} {name}" + (f" L{length}" if length else "")
    if kind == "forward":
      value = lambda s: shapes["batch"] / s
      unit, ratio = "seq/s", (lambda: best["torch"] / best["jax"])
    else:
      value, unit, ratio = (lambda s: 1e3 * s), "ms/step", (lambda: best["torch"] / best["jax"])
    note = f"{ratio():.2f}x torch" if "torch" in best else TORCH_MISSING
    rows.append({"name": f"jax {label}", "value": value(best["jax"]), "unit": unit, "peak_GiB": j_peak, "note": note})
    t_val = value(best["torch"]) if "torch" in best else float("nan")
    rows.append(
      {"name": f"torch {label}", "value": t_val, "unit": unit, "peak_GiB": tp, "note": "" if t_fns else TORCH_MISSING}
    )
  if t_hidden is not None:
    ref = t_hidden(_random_ids(vocab, shapes["batch"], shapes["lengths"][0], 0))
    diff, note = float(np.abs(ref - h_jax).max()), "JAX highest vs torch fp32 (TF32 off)"
  else:
    diff, note = float("nan"), TORCH_MISSING
  rows.append({"name": "fp32 max |jax - torch|", "value": diff, "unit": "", "peak_GiB": None, "note": note})
  return rows
