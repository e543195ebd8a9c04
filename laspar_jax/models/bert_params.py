"""BERT / DistilBERT checkpoint names -> `bert.BertModel` parameter paths.

Canonical names are BERT's without the "bert." / "distilbert." / "model."
prefix, with LayerNorm gamma/beta read as weight/bias and DistilBERT's
vocabulary head (vocab_transform, vocab_layer_norm, vocab_projector.bias) read
as BERT's `cls.predictions.*`. PyTorch Linear weights [out, in] are transposed
to our [in, out] kernels. Scanned models (`scan_layers`): layer i's tensor is
row i of the stacked parameter under `layers.layer` (as `llama_params`).
"""

from __future__ import annotations

import re
from typing import Any

from laspar_jax.models import backbone

_T, _I = backbone.transpose, backbone.identity

_LAYER_NAMES = {
  "bert": (
    "encoder.layer",
    {
      "attention.self.query": "query",
      "attention.self.key": "key",
      "attention.self.value": "value",
      "attention.output.dense": "attn_out",
      "attention.output.LayerNorm": "attn_norm",
      "intermediate.dense": "mlp_in",
      "output.dense": "mlp_out",
      "output.LayerNorm": "mlp_norm",
    },
  ),
  "distilbert": (
    "transformer.layer",
    {
      "attention.q_lin": "query",
      "attention.k_lin": "key",
      "attention.v_lin": "value",
      "attention.out_lin": "attn_out",
      "sa_layer_norm": "attn_norm",
      "ffn.lin1": "mlp_in",
      "ffn.lin2": "mlp_out",
      "output_layer_norm": "mlp_norm",
    },
  ),
}

_DISTIL_VOCAB = {
  "vocab_transform.weight": "cls.predictions.transform.dense.weight",
  "vocab_transform.bias": "cls.predictions.transform.dense.bias",
  "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
  "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
  "vocab_projector.bias": "cls.predictions.bias",
}

_ALWAYS_IGNORED = r"pooler\.|embeddings\.position_ids$|cls\.seq_relationship\.|vocab_projector\.weight$"


def canonical(name: str) -> str:
  """A raw checkpoint tensor name in the canonical BERT spelling."""
  for pre in ("bert.", "distilbert.", "model."):
    if name.startswith(pre):
      name = name[len(pre) :]
  name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
  return _DISTIL_VOCAB.get(name, name)


def checkpoint_names(cfg: Any, *, lm_head: bool = False) -> backbone.CheckpointNames:
  """The name map of a `bert.BertConfig`.

  Args:
    cfg: the model config (model_type, num_hidden_layers, type_vocab_size,
      tie_word_embeddings are read).
    lm_head: map `cls.predictions.*` onto the `lm_head` submodule (else they are ignored).

  Returns:
    The CheckpointNames; the lm_head tensors are optional as a group: a BERT
    checkpoint without an MLM head (e.g. all-MiniLM-L6-v2) gets a fresh
    transform and bias over the tied decoder (the SPLADE configs train it;
    documented there), while a partial head is an error. An untied decoder
    (`tie_word_embeddings` false) must come from the checkpoint.
  """
  m = {
    "embeddings.word_embeddings.weight": (("embeddings", "word_embeddings", "embedding"), _I),
    "embeddings.position_embeddings.weight": (("embeddings", "position_embeddings", "embedding"), _I),
    "embeddings.LayerNorm.weight": (("embeddings", "layer_norm", "scale"), _I),
    "embeddings.LayerNorm.bias": (("embeddings", "layer_norm", "bias"), _I),
  }
  if cfg.type_vocab_size:
    m["embeddings.token_type_embeddings.weight"] = (("embeddings", "token_type_embeddings", "embedding"), _I)
  prefix, sub = _LAYER_NAMES["distilbert" if cfg.model_type == "distilbert" else "bert"]
  scan = getattr(cfg, "scan_layers", False)
  layer = lambda i, *rest, fn: (("layers", "layer", *rest), fn, i) if scan else (("layers", i, *rest), fn)
  for i in range(cfg.num_hidden_layers):
    for hf, ours in sub.items():
      is_norm = ours.endswith("norm")
      m[f"{prefix}.{i}.{hf}.weight"] = layer(i, ours, "scale" if is_norm else "kernel", fn=_I if is_norm else _T)
      m[f"{prefix}.{i}.{hf}.bias"] = layer(i, ours, "bias", fn=_I)
  ignored = _ALWAYS_IGNORED
  if lm_head:
    m.update(
      {
        "cls.predictions.transform.dense.weight": (("lm_head", "dense", "kernel"), _T),
        "cls.predictions.transform.dense.bias": (("lm_head", "dense", "bias"), _I),
        "cls.predictions.transform.LayerNorm.weight": (("lm_head", "layer_norm", "scale"), _I),
        "cls.predictions.transform.LayerNorm.bias": (("lm_head", "layer_norm", "bias"), _I),
        "cls.predictions.bias": (("lm_head", "bias"), _I),
        "cls.predictions.decoder.bias": (("lm_head", "bias"), _I),  # alias, used when the above is absent
      }
    )
    if cfg.tie_word_embeddings:  # the decoder is the word embedding table
      ignored += r"|cls\.predictions\.decoder\.weight$"
    else:
      m["cls.predictions.decoder.weight"] = (("lm_head", "decoder"), _T)
  else:
    ignored += r"|cls\.predictions\."
  return backbone.CheckpointNames(
    params=m,
    canonical=canonical,
    ignored=re.compile(f"^({ignored})"),
    optional=("lm_head",) if cfg.tie_word_embeddings else (),
  )
