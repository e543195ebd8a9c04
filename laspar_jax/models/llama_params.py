"""Llama / Qwen2 / Mistral checkpoint names -> `llama.LlamaModel` parameter paths.

Canonical names are the `*ForCausalLM` ones without the "model." prefix
(`layers.{i}.self_attn.q_proj.weight`, `embed_tokens.weight`, `norm.weight`)
and `lm_head.weight`. PyTorch Linear weights [out, in] are transposed to our
[in, out] kernels. Scanned models (`scan_layers`) hold each parameter once,
stacked over layers (`layers.Stacked`, under `layers.layer`): layer i's tensor
is row i of it, and the loader stacks the rows.
"""

from __future__ import annotations

import re
from typing import Any

from laspar_jax.models import backbone

_T, _I = backbone.transpose, backbone.identity

_LINEARS = (
  "self_attn.q_proj",
  "self_attn.k_proj",
  "self_attn.v_proj",
  "self_attn.o_proj",
  "mlp.gate_proj",
  "mlp.up_proj",
  "mlp.down_proj",
)
_NORMS = ("input_layernorm", "post_attention_layernorm")
_IGNORED = r"^(rotary_emb\.|layers\.\d+\.self_attn\.rotary_emb\.)"


def canonical(name: str) -> str:
  """Strips a leading "model." (LlamaForCausalLM) from a raw tensor name."""
  return name[len("model.") :] if name.startswith("model.") else name


def _has_bias(cfg: Any, linear: str) -> bool:
  if linear.startswith("mlp."):
    return cfg.mlp_bias
  if linear.endswith("o_proj"):
    return cfg.attention_bias
  return cfg.attention_bias or cfg.qkv_bias


def checkpoint_names(cfg: Any, *, lm_head: bool = False) -> backbone.CheckpointNames:
  """The name map of a `llama.LlamaConfig`.

  Args:
    cfg: the model config.
    lm_head: map `lm_head.weight` onto the head's kernel (untied configs; a tied
      head has nothing of its own and `lm_head.weight` is then ignored).

  Returns:
    The CheckpointNames; an untied head's `lm_head.weight` is required.
  """
  m = {"embed_tokens.weight": (("embed_tokens", "embedding"), _I), "norm.weight": (("norm", "scale"), _I)}

  def layer(i: int, *rest: str, fn: backbone.Transform) -> tuple:
    return (("layers", "layer", *rest), fn, i) if cfg.scan_layers else (("layers", i, *rest), fn)

  for i in range(cfg.num_hidden_layers):
    for lin in _LINEARS:
      m[f"layers.{i}.{lin}.weight"] = layer(i, *lin.split("."), "kernel", fn=_T)
      if _has_bias(cfg, lin):
        m[f"layers.{i}.{lin}.bias"] = layer(i, *lin.split("."), "bias", fn=_I)
    for norm in _NORMS:
      m[f"layers.{i}.{norm}.weight"] = layer(i, norm, "scale", fn=_I)
  ignored = _IGNORED
  if lm_head and not cfg.tie_word_embeddings:
    m["lm_head.weight"] = (("lm_head", "kernel"), _T)
  else:
    ignored += r"|^lm_head\.weight$"
  return backbone.CheckpointNames(params=m, canonical=canonical, ignored=re.compile(ignored))
