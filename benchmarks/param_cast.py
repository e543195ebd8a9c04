"""Kernels cast once per tower vs at every use: the train step of a bf16, scanned, rematerialised Llama.

  python benchmarks/param_cast.py                  # tiny: d 256, 4 layers, batch 8 x (16 + 32 tokens)
  python benchmarks/param_cast.py --lora --layers 8 --rounds 20

Builds a random-weight Llama sparse encoder (mlm head) with `scan_layers` and
remat in bf16, and the jitted train step twice: `StepConfig(cast_params=True)`
(`layers.cast_once`) and `cast_params=False` (each Dense casts its kernel at
each use). Prints, per path, the f32 -> bf16 elements the program converts
(jaxpr, a scan body counted once per layer), the steady-state step time (best
of interleaved rounds), and their ratios; checks the two steps give the same
loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from laspar_jax import mesh as mesh_lib  # noqa: E402
from laspar_jax import optim, train_state, train_step  # noqa: E402
from laspar_jax.models import heads, hf_weights, lora, sparse_encoder  # noqa: E402


def cast_elements(jaxpr, times: int = 1) -> int:
  """Elements converted f32 -> bf16 by a jaxpr, a scan body counted once per iteration."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "convert_element_type":
      a, b = eqn.invars[0].aval, eqn.outvars[0].aval
      n += times * a.size * (a.dtype == jnp.float32 and b.dtype == jnp.bfloat16)
    inner = times * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else times
    for v in eqn.params.values():
      for sub in v if isinstance(v, tuple) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          n += cast_elements(sub, inner)
  return n


def encoder(d: int, n_layers: int, use_lora: bool) -> sparse_encoder.SparseEncoder:
  hf = {
    "model_type": "llama",
    "hidden_size": d,
    "intermediate_size": 4 * d,
    "num_attention_heads": d // 64,
    "num_key_value_heads": max(d // 128, 1),
    "num_hidden_layers": n_layers,
    "vocab_size": 512,
    "scan_layers": True,
    "tie_word_embeddings": False,
  }
  family = hf_weights.family_of(hf, "random:llama")
  cfg = family.config_from_hf(hf)
  impl = hf_weights.attention_impl_for(family, cfg, "auto", jnp.bfloat16)
  model = family.build(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, remat=True, attention_impl=impl)
  model.lm_head = family.lm_head(model, cfg, rngs=nnx.Rngs(1))
  spec = {"rank": 8, "alpha": 16} if use_lora else {}
  if use_lora:
    lora.apply_lora(model, targets=lora.default_targets("llama"), rank=8, alpha=16, rngs=nnx.Rngs(2))
  head = heads.make_head("mlm", d=d, vocab=512, projection=model.vocab_projection(), special_ids=())
  enc_cfg = sparse_encoder.EncoderConfig(backbone="random:llama", head="mlm", lora=spec, dtype="bfloat16", remat=True)
  return sparse_encoder.SparseEncoder(enc_cfg, model, head)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--lora", action="store_true")
  args = p.parse_args(argv)
  enc = encoder(args.d, args.layers, args.lora)
  params = train_state.encoder_params(enc)
  o = ml_collections.ConfigDict(
    dict(lr=1e-4, warmup_steps=0, schedule="constant", end_lr=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)
  )
  o.update(grad_clip=1.0, head_lr_mult=1.0, freeze=(), lora_trainable=())
  tx, lr = optim.make_optimizer(o, 100, params)
  trainable = optim.trainable_mask(params, o)
  mesh = mesh_lib.make_mesh(data=1, model=1)
  graphdef, rest, state, shardings = train_state.create_train_state(enc, tx, mesh)
  rng = np.random.default_rng(0)
  b = args.batch
  batch = mesh_lib.put_batch(
    {
      "q_input_ids": rng.integers(3, 512, (b, 16)),
      "q_attention_mask": np.ones((b, 16), np.int32),
      "d_input_ids": rng.integers(3, 512, (b, 32)),
      "d_attention_mask": np.ones((b, 32), np.int32),
    },
    mesh,
  )
  rows = {}
  for cast in (True, False):
    cfg = train_step.StepConfig(cast_params=cast)
    grad_jaxpr = jax.make_jaxpr(
      jax.grad(lambda p, cfg=cfg: train_step.loss_fn(p, graphdef, rest, batch, jnp.int32(0), jax.random.key(0), cfg)[0])
    )
    step = train_step.make_train_step(graphdef, rest, tx, lr, cfg, shardings, mesh, trainable=trainable)
    compiled = step.lower(state, batch).compile()
    rows[cast] = {"cast_elements": cast_elements(grad_jaxpr(params).jaxpr), "step": compiled, "times": []}
  states = {c: jax.tree.map(jnp.copy, state) for c in rows}
  losses = {}
  for r in range(args.rounds + 1):
    for cast, row in rows.items():
      t = time.perf_counter()
      states[cast], metrics = row["step"](states[cast], batch)
      loss = float(metrics["loss"])
      if r:
        row["times"].append(time.perf_counter() - t)
      losses.setdefault(cast, loss)
  out = {}
  for cast, row in rows.items():
    name = "cast_once" if cast else "per_use"
    out[name] = {"cast_elements": row["cast_elements"], "step_ms": 1e3 * min(row["times"])}
    print(f"{name:9s}  f32->bf16 elements {row['cast_elements']:>12,d}  step {out[name]['step_ms']:8.2f} ms")
  out["elements_ratio"] = out["cast_once"]["cast_elements"] / out["per_use"]["cast_elements"]
  out["step_ratio"] = out["cast_once"]["step_ms"] / out["per_use"]["step_ms"]
  out["same_first_loss"] = losses[True] == losses[False]
  print(f"once / per use: elements {out['elements_ratio']:.3f}, step time {out['step_ratio']:.3f}; ", end="")
  print(f"same first loss: {out['same_first_loss']}")
  return out


if __name__ == "__main__":
  main()
