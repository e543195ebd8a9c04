r"""The full-size LASPAR model (D = 4,194,304) builds and its train step compiles on a device mesh.

Nothing is allocated: the encoder is abstract (shapes only), the TrainState is
ShapeDtypeStructs with their shardings, and the paper's train step (batch 32
x 8 accumulated micro-batches, queries 64 / documents 256 tokens, top-k
128/512, dense-teacher KL, FLOPS + equipartition, AdamW) is lowered and
compiled for the mesh; XLA's memory analysis then gives the bytes each device
needs. `--run` also runs steps on random data from a backbone of random
weights (MiniLM-L12-H384's shapes; no download) and reports step time and
peak device memory (needs an accelerator's memory at full size).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python benchmarks/full_size_step.py --mesh 1x8 --mesh 2x4
  python benchmarks/full_size_step.py --mesh 1x1 --run   # one GPU
  python benchmarks/full_size_step.py --tiny --D 4096 --run   # the same code at tiny size (CPU)

`--tiny` shrinks the backbone (2 layers of width 32), the batch (4 x 2
accumulated, queries 16 / documents 32 tokens) and top-k, and turns dropout
off; the code path is the same.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import save_file

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))
import laspar  # noqa: E402

from laspar_jax import mesh as mesh_lib, optim, platform, train_lib, train_state, train_step  # noqa: E402
from laspar_jax.models import backbone, bert, bert_params, hf_weights, sparse_encoder  # noqa: E402

# microsoft/MiniLM-L12-H384-uncased (the paper's backbone; written here so no download is needed
# for an abstract build; its vocabulary is BERT-base uncased, as all-MiniLM-L6-v2's).
MINILM_L12 = {
  "architectures": ["BertModel"],
  "model_type": "bert",
  "hidden_size": 384,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "intermediate_size": 1536,
  "hidden_act": "gelu",
  "vocab_size": 30522,
  "max_position_embeddings": 512,
  "type_vocab_size": 2,
  "layer_norm_eps": 1e-12,
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "pad_token_id": 0,
}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MINILM_L6 = "sentence-transformers/all-MiniLM-L6-v2"  # where the tokenizer files come from


def backbone_dir(tiny: bool = False, tokenizer_from: str = MINILM_L6) -> str:
  """A BERT folder of MiniLM-L12's config (or the tiny one) and MiniLM's tokenizer, no weights.

  Args:
    tiny: the tiny widths (`TINY`).
    tokenizer_from: a folder or hub id with the BERT-base uncased tokenizer files.

  Returns:
    The folder (a fresh temporary directory).
  """
  d = pathlib.Path(tempfile.mkdtemp(prefix="minilm_l12_"))
  (d / "config.json").write_text(json.dumps({**MINILM_L12, **(TINY if tiny else {})}))
  src = pathlib.Path(hf_weights.resolve(tokenizer_from))
  for f in TOKENIZER_FILES:  # whichever the source has (the GPU bundle's MiniLM has no vocab.txt)
    if (src / f).exists():
      shutil.copy(src / f, d / f)
  return str(d)


def write_random_weights(folder: str, seed: int = 0, std: float = 0.02) -> None:
  """Writes model.safetensors of random weights (BERT names, `bert_params`) into a backbone folder."""
  cfg = bert.BertConfig.from_hf_dict(json.loads((pathlib.Path(folder) / "config.json").read_text()))
  model = hf_weights.load(folder, weights=False).model  # abstract: shapes only
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, (path, fn) in bert_params.checkpoint_names(cfg).params.items():
    var = model
    for p in path:
      var = var[p] if isinstance(p, int) else getattr(var, p)
    shape = tuple(var.get_value().shape)
    shape = shape[::-1] if fn is backbone.transpose else shape
    if "LayerNorm.weight" in name:
      tensors[name] = np.ones(shape, np.float32)
    elif name.endswith("bias"):
      tensors[name] = np.zeros(shape, np.float32)
    else:
      tensors[name] = (std * rng.standard_normal(shape)).astype(np.float32)
  save_file(tensors, str(pathlib.Path(folder) / "model.safetensors"))


def paper_config(D: int = 2**22, dtype: str = "float32", tiny: bool = False) -> ml_collections.ConfigDict:
  """The paper's LASPAR training config on a weightless MiniLM-L12 folder (tiny: small shapes)."""
  c = laspar.get_config(f"D={D}")
  c.model.backbone = backbone_dir(tiny)
  c.model.dtype = dtype
  if tiny:
    c.optim.batch_size, c.optim.accum_steps = 4, 2
    c.model.query_max_len, c.model.doc_max_len = 16, 32
    c.train.q_topk, c.train.d_topk = 16, 32
    c.train.dropout = False  # threefry dropout alone compiles for ~20 s on a small CPU
  return c


def abstract_batch(c, mesh, E=384):
  A, B, n = c.optim.accum_steps, c.optim.batch_size, c.data.n_neg
  M = B * (1 + n)
  shapes = {
    "q_input_ids": (B, c.model.query_max_len),
    "q_attention_mask": (B, c.model.query_max_len),
    "d_input_ids": (M, c.model.doc_max_len),
    "d_attention_mask": (M, c.model.doc_max_len),
    "teacher_q": (B, E),
    "teacher_d": (M, E),
  }
  out = {}
  for k, s in shapes.items():
    s = ((A,) if A > 1 else ()) + s
    dt = jnp.float32 if k.startswith("teacher") else jnp.int32
    out[k] = jax.ShapeDtypeStruct(s, dt, sharding=mesh_lib.batch_sharding(mesh, len(s), A > 1))
  return out


def random_batch(c, mesh, vocab: int = 30522, seed: int = 0) -> dict[str, jax.Array]:
  """A device batch of `abstract_batch`'s shapes: random token ids, full masks, random teacher vectors."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in abstract_batch(c, mesh).items():
    if "ids" in k:
      x = rng.integers(1, vocab - 1, v.shape).astype(v.dtype)
    elif "mask" in k:
      x = np.ones(v.shape, v.dtype)
    else:
      x = rng.standard_normal(v.shape).astype(v.dtype)
    out[k] = jax.device_put(x, v.sharding)
  return out


def peak_gib() -> float | None:
  """Peak bytes in use on the first local device, in GiB (None where the backend keeps no statistics)."""
  stats = jax.local_devices()[0].memory_stats() if hasattr(jax.local_devices()[0], "memory_stats") else None
  peak = (stats or {}).get("peak_bytes_in_use")
  return round(peak / 2**30, 2) if peak else None


def compile_step(c: ml_collections.ConfigDict, mesh) -> tuple[Any, dict[str, Any], Any]:
  """Lowers and compiles the paper's step for `mesh` from an abstract state.

  Returns:
    (compiled step, a result row: params, head shard, compile seconds, XLA's per-device memory, tx).
  """
  enc, _ = sparse_encoder.build_encoder(train_lib.encoder_config(c), weights=False)
  tx, lr = optim.make_optimizer(c.optim, c.train.total_steps, train_state.encoder_params(enc))
  g, rest, state, sh = train_state.abstract_train_state(enc, tx, mesh, rules=mesh_lib.rules_from_config(c))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step = train_step.make_train_step(g, rest, tx, lr, train_step.StepConfig.from_config(c, mesh), sh, mesh)
  step = platform.jit_boundary(step, c.model.matmul_precision)
  t0 = time.time()
  compiled = step.lower(state, abstract_batch(c, mesh)).compile()
  t_compile = time.time() - t0
  ma = compiled.memory_analysis()
  gib = lambda b: round(b / 2**30, 2)
  kernel = state.params["query_head"]["kernel"]
  res = {
    "mesh": f"data={mesh.shape['data']} x model={mesh.shape['model']}",
    "D": c.model.latent_dim,
    "params": n_params,
    "head_kernel_shard": list(kernel.sharding.shard_shape(kernel.shape)),
    "compile_s": round(t_compile, 1),
    "device": jax.devices()[0].device_kind,
  }
  if ma is not None:
    res["per_device_GiB"] = {
      "arguments": gib(ma.argument_size_in_bytes),
      "outputs": gib(ma.output_size_in_bytes),
      "aliased(donated)": gib(ma.alias_size_in_bytes),
      "temporaries": gib(ma.temp_size_in_bytes),
      "peak_estimate": gib(
        ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
      ),
    }
  return compiled, res, tx


def run_steps(c: ml_collections.ConfigDict, mesh, compiled, tx, steps: int = 3) -> list[dict[str, Any]]:
  """Runs `steps` compiled steps from random backbone weights on a random batch.

  Writes random weights into `c.model.backbone` when it has none.

  Returns:
    One row per step: seconds, loss, peak device GiB (None on CPU).
  """
  if not (pathlib.Path(c.model.backbone) / "model.safetensors").exists():
    write_random_weights(c.model.backbone)
  enc, _ = sparse_encoder.build_encoder(train_lib.encoder_config(c))
  _, _, live, _ = train_state.create_train_state(enc, tx, mesh, rules=mesh_lib.rules_from_config(c))
  del enc
  batch = random_batch(c, mesh)
  rows = []
  for i in range(steps):
    t0 = time.time()
    live, m = compiled(live, batch)
    jax.block_until_ready(m)
    rows.append({"step": i, "seconds": round(time.time() - t0, 3), "loss": float(m["loss"]), "peak_GiB": peak_gib()})
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mesh", action="append", default=None, help="DATAxMODEL, e.g. 1x8 (repeatable)")
  ap.add_argument("--D", type=int, default=2**22)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--tiny", action="store_true", help="tiny backbone and batch (a CPU check of the code path)")
  ap.add_argument("--run", action="store_true", help="also run 3 steps on random data (needs the memory)")
  args = ap.parse_args()
  c = paper_config(args.D, args.dtype, args.tiny)
  for spec in args.mesh or ["1x%d" % jax.device_count()]:
    data, model = map(int, spec.split("x"))
    mesh = mesh_lib.make_mesh(data, model, devices=jax.devices()[: data * model])
    compiled, res, tx = compile_step(c, mesh)
    print(json.dumps(res), flush=True)
    if args.run:
      for row in run_steps(c, mesh, compiled, tx):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
