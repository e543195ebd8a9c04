"""OPT checkpoint names -> `opt.OPTModel` parameter paths.

Canonical names drop the "model." / "decoder." prefixes (OPTForCausalLM,
OPTModel and OPTDecoder checkpoints): `embed_tokens.weight`,
`embed_positions.weight`, `project_in/out.weight`, `final_layer_norm.*`,
`layers.{i}.{self_attn.{q,k,v,out}_proj, fc1, fc2, self_attn_layer_norm,
final_layer_norm}.*`. The LM head is tied to `embed_tokens`, so a stored
`lm_head.weight` is ignored. PyTorch Linear weights [out, in] are transposed
to our [in, out] kernels. Scanned models (`scan_layers`): layer i's tensor is
row i of the stacked parameter under `layers.layer` (as `llama_params`).
"""

from __future__ import annotations

import re
from typing import Any

from laspar_jax.models import backbone

_T, _I = backbone.transpose, backbone.identity

_LAYER = {
  "self_attn.q_proj": ("self_attn", "q_proj"),
  "self_attn.k_proj": ("self_attn", "k_proj"),
  "self_attn.v_proj": ("self_attn", "v_proj"),
  "self_attn.out_proj": ("self_attn", "out_proj"),
  "fc1": ("fc1",),
  "fc2": ("fc2",),
}
_NORMS = ("self_attn_layer_norm", "final_layer_norm")


def canonical(name: str) -> str:
  """Strips the "model." / "decoder." prefixes (OPTForCausalLM, OPTModel, OPTDecoder checkpoints)."""
  for pre in ("model.", "decoder."):
    if name.startswith(pre):
      name = name[len(pre) :]
  return name


def checkpoint_names(cfg: Any, *, lm_head: bool = False) -> backbone.CheckpointNames:
  """HF OPT tensor names (canonical: without "model.decoder.") -> OPTModel parameter paths.

  The LM head is tied, so `lm_head.weight` (when stored) is ignored.
  """
  del lm_head  # tied: nothing of its own to load
  m = {
    "embed_tokens.weight": (("embed_tokens", "embedding"), _I),
    "embed_positions.weight": (("embed_positions", "embedding"), _I),
  }
  if cfg.word_embed_proj_dim != cfg.hidden_size:
    m["project_in.weight"] = (("project_in", "kernel"), _T)
    m["project_out.weight"] = (("project_out", "kernel"), _T)
  if cfg.do_layer_norm_before and not cfg.remove_final_layer_norm:
    m["final_layer_norm.weight"] = (("final_layer_norm", "scale"), _I)
    m["final_layer_norm.bias"] = (("final_layer_norm", "bias"), _I)
  scan = getattr(cfg, "scan_layers", False)
  layer = lambda i, *rest, fn: (("layers", "layer", *rest), fn, i) if scan else (("layers", i, *rest), fn)
  for i in range(cfg.num_hidden_layers):
    for hf, ours in _LAYER.items():
      m[f"layers.{i}.{hf}.weight"] = layer(i, *ours, "kernel", fn=_T)
      if cfg.enable_bias:
        m[f"layers.{i}.{hf}.bias"] = layer(i, *ours, "bias", fn=_I)
    for norm in _NORMS:
      m[f"layers.{i}.{norm}.weight"] = layer(i, norm, "scale", fn=_I)
      m[f"layers.{i}.{norm}.bias"] = layer(i, norm, "bias", fn=_I)
  return backbone.CheckpointNames(params=m, canonical=canonical, ignored=re.compile(r"^(lm_head\.weight$)"))
