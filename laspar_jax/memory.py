"""An analytic estimate of a train step's peak device memory, per term, for every backbone family.

`estimate(hf, shape, ...)` adds up what a jitted, donated train step
(`train_step.make_train_step`: query and document forward passes, in-batch
loss, backward, optimizer update) keeps alive at its peak, the start of the
backward pass:

  params       every parameter in its stored dtype (float32 here: the
               families store float32 and cast to the compute dtype per use)
  grads        float32 gradients of the trainable parameters (frozen ones
               enter through `stop_gradient`: no weight gradient at all)
  optimizer    AdamW: 2 float32 moments per trainable parameter (frozen: none)
  saved        activations kept for the backward pass, both sides, every layer
  layer        the working set of one layer's backward (its recomputation
               under remat, the attention-score gradient, MLP gradients)
  casts        compute-dtype copies of float32 weights (bf16 compute): all of
               them unscanned (XLA keeps the forward's casts for the
               backward), two layers' worth when scanned
  head         the tiled vocabulary head: per tile B x L x tile logits (and
               the argmax one-hot of its backward) for the longer side, the
               per-tile max / argmax of both sides, rep [B, V] and its gradient

Assumptions (an estimate, not a simulation of XLA): tensors saved per layer
and token are counted by hand from each family's layer (`_saved_per_layer`);
fusions may drop some (e.g. an activation recomputed from its input) and
the scheduler may overlap others. The attention scores [B, H, L, S] are
materialized (fp32 logits + probabilities) on the XLA path; a fused kernel
(`attention="fused"`, e.g. cuDNN) keeps none. Remat policies are those of
`layers.REMAT_POLICIES`: "full" keeps each layer's input only; "dots" the
projection outputs (LoRA's two dots included) that the backward needs;
"dots_all" also the attention einsums (never more than no remat keeps). A
scanned stack saves the same residuals as a loop (stacked by the scan); what
scanning changes here is the weight casts. Measured on XLA:CPU (jax 0.10.2):
per-layer remat of an unrolled stack does not lower XLA's plan (same bytes
with and without it); under `lax.scan` it does, as estimated.
`xla_planned_bytes(compiled)` reads what XLA planned for a compiled step, for
comparison. Not counted: the process's other buffers (a model being built, the
previous batch), allocator fragmentation, collective buffers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

REMAT_POLICIES = ("full", "dots", "dots_all")  # = layers.REMAT_POLICIES (what a rematerialized layer keeps)
TERMS = ("params", "grads", "optimizer", "saved", "layer", "casts", "head")
F32 = 4


@dataclasses.dataclass(frozen=True)
class Shape:
  """The batch of one step: B queries of Lq tokens and B documents of Ld tokens (in-batch negatives)."""

  batch: int
  q_len: int
  d_len: int

  def sides(self) -> tuple[tuple[int, int], ...]:
    return ((self.batch, self.q_len), (self.batch, self.d_len))


@dataclasses.dataclass(frozen=True)
class Dims:
  """The sizes of a backbone that activations depend on (from its config.json dict)."""

  family: str
  d: int
  ffn: int
  layers: int  # encoder (or decoder-only) layers
  heads: int
  kv_heads: int
  head_dim: int
  vocab: int
  gated: bool  # a gated MLP (3 matrices)
  decoder_layers: int = 0  # T5 "encoder_decoder": decoder layers with cross-attention


def dims_from_hf(hf: dict[str, Any]) -> Dims:
  """The `Dims` of a Hugging Face config.json dict (families bert, opt, llama, t5).

  Raises:
    ValueError: a model_type outside those families.
  """
  from laspar_jax.models import hf_weights  # registers the families

  family = hf_weights.family_of(hf, "memory.dims_from_hf")
  cfg = family.config_from_hf(hf)
  if family.name == "t5":
    dec = cfg.num_decoder_layers if cfg.mode == "encoder_decoder" else 0
    layers = cfg.num_decoder_layers if cfg.mode == "decoder" else cfg.num_layers
    h = cfg.num_heads
    return Dims("t5", cfg.d_model, cfg.d_ff, layers, h, h, cfg.d_kv, cfg.vocab_size, cfg.gated, dec)
  if family.name == "llama":
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    f, n, h = cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads
    return Dims("llama", cfg.hidden_size, f, n, h, kv, cfg.head_dim, cfg.vocab_size, True)
  if family.name in ("opt", "bert"):
    d, h = cfg.hidden_size, cfg.num_attention_heads
    f = cfg.ffn_dim if family.name == "opt" else cfg.intermediate_size
    return Dims(family.name, d, f, cfg.num_hidden_layers, h, h, d // h, cfg.vocab_size, False)
  raise ValueError(f"no memory model for family {family.name!r}; known: bert, opt, llama, t5")


def _policy(remat: bool | str, remat_policy: str | None) -> str | None:
  """None (no remat) or a REMAT_POLICIES name, from a model's `remat` (bool or name) and a config's policy."""
  if not remat:
    return None
  name = remat if isinstance(remat, str) else (remat_policy or "full")
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; known: {', '.join(REMAT_POLICIES)}")
  return name


def _layer_widths(dm: Dims, cross: bool) -> dict[str, int]:
  """Per-token widths (elements) of one layer: "full" (what autodiff keeps), "proj" (projection outputs),
  "n_proj" (adapted projections), "inner" (attention output); `cross`: a T5 decoder layer."""
  d, f, inner, kv = dm.d, dm.ffn, dm.heads * dm.head_dim, dm.kv_heads * dm.head_dim
  up = (2 if dm.gated else 1) * f
  # layer input, attention norm, q k v (rotated for llama), attention output, residual sum, MLP norm,
  # the MLP's up projection(s), its activation and the gated product
  full = 4 * d + 2 * inner + 2 * kv + up + f + (f if dm.gated else 0)
  proj = inner + 2 * kv + d + up + d  # q k v o, up (gate), down
  n_proj = 7 if dm.gated else 6
  if cross:  # cross-attention: its input, norm, q, the encoder states' k v, its output; q k v o
    full += 2 * d + 2 * inner + 2 * kv
    proj += inner + 2 * kv + d
    n_proj += 4
  return {"full": full, "proj": proj, "n_proj": n_proj, "inner": inner}


def _saved_per_layer(
  dm: Dims, b: int, length: int, c: int, rank: int, policy: str | None, attention: str, cross: bool = False
) -> tuple[float, float]:
  """(bytes saved for the backward, bytes of the full per-layer set) of one layer on a [b, length] side."""
  n = b * length
  w = _layer_widths(dm, cross)
  scores = b * dm.heads * length * length * (1 + cross)  # [B, H, L, S] (+ cross-attention, S = L)
  score_bytes = 0 if attention == "fused" else scores * (F32 + c)  # fp32 logits + probabilities
  lora = n * w["n_proj"] * rank * c  # x A of every adapter (the input of its second dot)
  full = n * w["full"] * c + score_bytes + lora
  if policy is None:
    return full, full
  keep = n * dm.d * c  # the layer input
  if policy in ("dots", "dots_all"):  # base and LoRA outputs of the projections the backward needs (not the last)
    keep += n * 2 * (w["proj"] - dm.d) * c + lora
  if policy == "dots_all":
    keep += (0 if attention == "fused" else scores * F32) + n * w["inner"] * c  # attention einsums
  return min(keep, full), full  # only what the backward needs is ever saved


def estimate(
  hf: dict[str, Any],
  shape: Shape,
  *,
  n_params: int,
  n_trainable: int,
  param_bytes: int = F32,
  dtype: str = "float32",
  remat: bool | str = False,
  remat_policy: str | None = None,
  scan: bool = False,
  lora_rank: int = 16,
  optimizer: str = "adamw",
  attention: str = "xla",
  head_tile: int | None = 8192,
  devices: int = 1,
) -> dict[str, float]:
  """Peak device memory of one train step, in bytes per term (`TERMS`) and "total".

  Args:
    hf: the backbone's config.json dict (`dims_from_hf`).
    shape: the batch.
    n_params: all parameters (`count_params`); n_trainable: those the optimizer trains.
    param_bytes: bytes per stored parameter.
    dtype: compute dtype ("float32" or "bfloat16").
    remat: False, True or a `REMAT_POLICIES` name; remat_policy: the policy when remat is True.
    scan: scanned layers (weight casts of two layers only).
    lora_rank: adapter rank (0: no adapters).
    optimizer: "adamw" (2 moments) or "sgd" (none).
    attention: "xla" (scores materialized) or "fused" (none kept).
    head_tile: the vocabulary head's tile width (None: untiled, [B, L, V]).
    devices: data-parallel devices; each holds every parameter and moment and 1/devices of the batch.

  Returns:
    Bytes per device.
  """
  dm = dims_from_hf(hf)
  shape = Shape(-(-shape.batch // devices), shape.q_len, shape.d_len)
  c = 2 if dtype in ("bfloat16", "bf16", "float16") else F32
  policy = _policy(remat, remat_policy)
  saved, layer = 0.0, 0.0
  for b, length in shape.sides():
    keep, full = _saved_per_layer(dm, b, length, c, lora_rank, policy, attention)
    saved += dm.layers * keep
    work = full if policy else 0.0
    if dm.decoder_layers:
      keep_x, full_x = _saved_per_layer(dm, b, length, c, lora_rank, policy, attention, cross=True)
      saved += dm.decoder_layers * keep_x
      work = full_x if policy else 0.0
    grads = b * dm.heads * length * length * F32 * (attention != "fused") + 2 * b * length * dm.ffn * c
    layer = max(layer, work + grads)
  n_layers = dm.layers + dm.decoder_layers
  tile = dm.vocab if head_tile is None else min(head_tile, dm.vocab)
  b, length = max(shape.sides(), key=lambda s: s[0] * s[1])
  head = 2 * b * length * tile * F32  # one tile's logits and its backward's one-hot / gradient
  head += sum(bb * dm.vocab * (2 * F32 + 3 * F32) + bb * ll * dm.d * F32 for bb, ll in shape.sides())
  casts = 0.0
  if c < param_bytes:
    layer_params = max(n_params - 2 * dm.vocab * dm.d, 0) / max(n_layers, 1)
    casts = (2 if scan else n_layers) * layer_params * c
  moments = {"adamw": 2, "adam": 2, "sgd": 0}[optimizer]
  out = {
    "params": float(n_params * param_bytes),
    "grads": float(n_trainable * F32),
    "optimizer": float(moments * n_trainable * F32),
    "saved": saved,
    "layer": layer,
    "casts": casts,
    "head": float(head),
  }
  out["total"] = sum(out.values())
  return out


def count_params(hf: dict[str, Any], lora_rank: int = 16) -> tuple[int, int]:
  """(all parameters, LoRA parameters) of the family's model + LM head + adapters on the default targets.

  Built abstractly (`nnx.eval_shape`): no memory is allocated, so full-size models are counted for free.
  """
  from flax import nnx

  from laspar_jax.models import hf_weights, lora

  family = hf_weights.family_of(hf, "memory.count_params")
  cfg = family.config_from_hf(hf)

  def build():
    model = family.build(cfg, rngs=nnx.Rngs(0))
    model.lm_head = family.lm_head(model, cfg, rngs=nnx.Rngs(1))
    if lora_rank:
      lora.apply_lora(model, targets=lora.default_targets(family.name), rank=lora_rank, alpha=1.0, rngs=nnx.Rngs(2))
    return model

  state = nnx.state(nnx.eval_shape(build), nnx.Param)
  sizes = jax.tree_util.tree_flatten_with_path(state)[0]
  total = sum(int(x.size) for _, x in sizes)
  n_lora = sum(int(x.size) for path, x in sizes if any(str(getattr(k, "key", "")) in lora.LORA_NAMES for k in path))
  return total, n_lora


def xla_planned_bytes(compiled: Any) -> dict[str, int] | None:
  """What XLA planned for a compiled computation: argument, output, alias, temp and their peak (bytes).

  peak = argument + output - alias + temp (donated outputs reuse their inputs); None when the backend
  gives no memory analysis.
  """
  try:
    ma = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError, AttributeError):
    return None
  if ma is None:
    return None
  out = {
    "argument": int(ma.argument_size_in_bytes),
    "output": int(ma.output_size_in_bytes),
    "alias": int(ma.alias_size_in_bytes),
    "temp": int(ma.temp_size_in_bytes),
  }
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def format_breakdown(est: dict[str, float], unit: float = 2**30) -> str:
  """'params 1.0 + grads 0.0 + ... = total 3.2' in `unit` (GiB by default)."""
  parts = " + ".join(f"{k} {est[k] / unit:.2f}" for k in TERMS if est.get(k))
  return f"{parts} = {est['total'] / unit:.2f}"
