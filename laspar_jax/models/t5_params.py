"""T5 / mT5 checkpoint names -> `t5.T5Model` parameter paths.

Hugging Face names (T5ForConditionalGeneration, T5Model, T5EncoderModel):
`shared.weight` (with `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight`
as aliases), `{encoder,decoder}.block.{i}.layer.{j}.*` where layer 0 is
self-attention (`SelfAttention.{q,k,v,o}`, block 0 also
`relative_attention_bias`), decoder layer 1 cross-attention (`EncDecAttention`),
the last layer the FFN (`DenseReluDense.{wi | wi_0, wi_1, wo}`), each with its
`layer_norm`; `{encoder,decoder}.final_layer_norm.weight`; `lm_head.weight`
(untied v1.1 heads only; a tied v1.0 head is the shared table). PyTorch
Linear weights [out, in] are transposed to our [in, out] kernels. Scanned
models (`scan_layers`): block i's tensor is row i of the stacked parameter
under `{stack}.blocks.layer`, and block 0's position bias table is the
stack's own `{stack}.relative_attention_bias`.
"""

from __future__ import annotations

import re
from typing import Any

from laspar_jax.models import backbone

_T, _I = backbone.transpose, backbone.identity

# Always skipped: old checkpoints carry an unused cross-attention bias table.
_ALWAYS_IGNORED = r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"


def canonical(name: str) -> str:
  """A raw checkpoint tensor name in the canonical spelling (prefixes "transformer." / "model." dropped)."""
  for pre in ("transformer.", "model."):
    if name.startswith(pre):
      return name[len(pre) :]
  return name


def _stack(m: dict, cfg: Any, stack: str, num_layers: int) -> None:
  is_decoder = stack == "decoder"
  ffn_index = 2 if is_decoder else 1
  mlp = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
  attention = (("0.SelfAttention", "self_attn"), ("1.EncDecAttention", "cross_attn"))[: 1 + is_decoder]
  scan = getattr(cfg, "scan_layers", False)

  def at(i: int, *rest: str, fn: backbone.Transform) -> tuple:
    return ((stack, "blocks", "layer", *rest), fn, i) if scan else ((stack, "blocks", i, *rest), fn)

  for i in range(num_layers):
    hf = f"{stack}.block.{i}.layer"
    for sub, ours in attention:
      for proj in ("q", "k", "v", "o"):
        m[f"{hf}.{sub}.{proj}.weight"] = at(i, ours, proj, "kernel", fn=_T)
      m[f"{hf}.{sub[0]}.layer_norm.weight"] = at(i, f"{ours}_norm", "scale", fn=_I)
    for proj in mlp:
      m[f"{hf}.{ffn_index}.DenseReluDense.{proj}.weight"] = at(i, "mlp", proj, "kernel", fn=_T)
    m[f"{hf}.{ffn_index}.layer_norm.weight"] = at(i, "mlp_norm", "scale", fn=_I)
  table = (stack, "relative_attention_bias") if scan else (stack, "blocks", 0, "self_attn", "relative_attention_bias")
  m[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (table, _I)
  m[f"{stack}.final_layer_norm.weight"] = ((stack, "final_layer_norm", "scale"), _I)


def checkpoint_names(cfg: Any, *, lm_head: bool = False) -> backbone.CheckpointNames:
  """The name map of a `t5.T5Config`.

  Args:
    cfg: the model config (num_layers, num_decoder_layers, feed_forward_proj,
      has_decoder and tie_word_embeddings are read).
    lm_head: map `lm_head.weight` onto the untied head (else it is ignored; a
      tied head has no tensor of its own).

  Returns:
    The CheckpointNames; an untied head's `lm_head.weight` is required (a
    checkpoint without it is an error naming the tensor, never a random head).
  """
  m: dict = {
    "shared.weight": (("shared", "embedding"), _I),
    "encoder.embed_tokens.weight": (("shared", "embedding"), _I),
  }  # aliases, used when
  _stack(m, cfg, "encoder", cfg.num_layers)  # shared.weight is absent
  ignored = _ALWAYS_IGNORED
  if cfg.has_decoder:
    m["decoder.embed_tokens.weight"] = (("shared", "embedding"), _I)
    _stack(m, cfg, "decoder", cfg.num_decoder_layers)
  if lm_head and not cfg.tie_word_embeddings:
    m["lm_head.weight"] = (("lm_head", "kernel"), _T)
  else:
    ignored += r"|lm_head\.weight$"
  return backbone.CheckpointNames(params=m, canonical=canonical, ignored=re.compile(f"^({ignored})"))
