r"""The full-size LASPAR model (D = 4,194,304) builds and its train step compiles on a device mesh.

Nothing is allocated: the encoder is abstract (shapes only), the TrainState is
ShapeDtypeStructs with their shardings, and the paper's train step (batch 32
x 8 accumulated micro-batches, queries 64 / documents 256 tokens, top-k
128/512, dense-teacher KL, FLOPS + equipartition, AdamW) is lowered and
compiled for the mesh; XLA's memory analysis then gives the bytes each device
needs. On an accelerator machine, `--run` also runs steps on random data and
reports step time and peak memory.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python benchmarks/full_size_step.py --mesh 1x8 --mesh 2x4
  python benchmarks/full_size_step.py --mesh 1x1 --run   # one GPU
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))
import laspar  # noqa: E402

from laspar_jax import mesh as mesh_lib, optim, train_lib, train_state, train_step  # noqa: E402
from laspar_jax.models import hf_weights, sparse_encoder  # noqa: E402

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


def backbone_dir() -> str:
  d = pathlib.Path(tempfile.mkdtemp(prefix="minilm_l12_"))
  (d / "config.json").write_text(json.dumps(MINILM_L12))
  src = pathlib.Path(hf_weights.resolve("sentence-transformers/all-MiniLM-L6-v2"))
  for f in ("vocab.txt", "tokenizer.json"):
    shutil.copy(src / f, d / f)
  return str(d)


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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mesh", action="append", default=None, help="DATAxMODEL, e.g. 1x8 (repeatable)")
  ap.add_argument("--D", type=int, default=2**22)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--run", action="store_true", help="also run 3 steps on random data (needs the memory)")
  args = ap.parse_args()
  c = laspar.get_config(f"D={args.D}")
  c.model.backbone = backbone_dir()
  c.model.dtype = args.dtype
  cfg = train_step.StepConfig
  for spec in args.mesh or ["1x%d" % jax.device_count()]:
    data, model = map(int, spec.split("x"))
    mesh = mesh_lib.make_mesh(data, model, devices=jax.devices()[: data * model])
    enc, _ = sparse_encoder.build_encoder(train_lib.encoder_config(c), weights=False)
    tx, lr = optim.make_optimizer(c.optim, c.train.total_steps, train_state.encoder_params(enc))
    g, rest, state, sh = train_state.abstract_train_state(enc, tx, mesh, rules=mesh_lib.rules_from_config(c))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    step = train_step.make_train_step(g, rest, tx, lr, cfg.from_config(c, mesh), sh, mesh)
    t0 = time.time()
    lowered = step.lower(state, abstract_batch(c, mesh))
    compiled = lowered.compile()
    t_compile = time.time() - t0
    ma = compiled.memory_analysis()
    gib = lambda b: b / 2**30
    kernel = state.params["query_head"]["kernel"]
    shard = kernel.sharding.shard_shape(kernel.shape)
    res = {
      "mesh": f"data={data} x model={model}",
      "D": args.D,
      "params": n_params,
      "head_kernel_shard": list(shard),
      "compile_s": round(t_compile, 1),
      "per_device_GiB": {
        "arguments": round(gib(ma.argument_size_in_bytes), 2),
        "outputs": round(gib(ma.output_size_in_bytes), 2),
        "aliased(donated)": round(gib(ma.alias_size_in_bytes), 2),
        "temporaries": round(gib(ma.temp_size_in_bytes), 2),
        "peak_estimate": round(
          gib(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes), 2
        ),
      },
      "device": jax.devices()[0].device_kind,
    }
    print(json.dumps(res), flush=True)
    if args.run:
      enc, _ = sparse_encoder.build_encoder(train_lib.encoder_config(c))
      g, rest, live, sh = train_state.create_train_state(enc, tx, mesh, rules=mesh_lib.rules_from_config(c))
      rng = np.random.default_rng(0)
      batch = {
        k: jax.device_put(
          rng.integers(1, 30000, v.shape).astype(v.dtype)
          if "ids" in k
          else (np.ones(v.shape, v.dtype) if "mask" in k else rng.standard_normal(v.shape).astype(v.dtype)),
          v.sharding,
        )
        for k, v in abstract_batch(c, mesh).items()
      }
      for i in range(3):
        t0 = time.time()
        live, m = compiled(live, batch)
        jax.block_until_ready(m)
        print(
          json.dumps(
            {
              "step": i,
              "seconds": round(time.time() - t0, 3),
              "loss": float(m["loss"]),
              "peak_GiB": round(gib(jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0)), 2)
              if hasattr(jax.devices()[0], "memory_stats") and jax.devices()[0].memory_stats()
              else None,
            }
          ),
          flush=True,
        )


if __name__ == "__main__":
  main()
