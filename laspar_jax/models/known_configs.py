"""config.json of the study's hub models, so that they build abstractly (shapes only) without a download.

`KNOWN_CONFIGS[hub_id]` holds the hyper-parameters of the model's
Hugging Face config.json (the keys our families read, with Hugging Face's
names and values). `hf_weights.abstract_model(hub_id)` builds a model from
one with `nnx.eval_shape`: nothing is downloaded, read or initialised, so a
config that names facebook/opt-13b can be checked on a laptop. Real weights
still come from the hub (`hf_weights.load`).

`PARAM_COUNTS[hub_id]` is the published parameter count (backbone with its
language-model head, tied weights counted once), for order-of-magnitude checks.
"""

from __future__ import annotations

import copy
from typing import Any


def _flan_t5(d_model: int, d_ff: int, num_heads: int, num_layers: int) -> dict[str, Any]:
  return {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "vocab_size": 32128,
    "d_model": d_model,
    "d_kv": 64,
    "d_ff": d_ff,
    "num_heads": num_heads,
    "num_layers": num_layers,
    "num_decoder_layers": num_layers,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
  }


def _opt(
  hidden: int, ffn: int, heads: int, layers: int, *, proj: int | None = None, pre_norm: bool = True
) -> dict[str, Any]:
  return {
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "vocab_size": 50272,
    "hidden_size": hidden,
    "ffn_dim": ffn,
    "num_attention_heads": heads,
    "num_hidden_layers": layers,
    "word_embed_proj_dim": proj or hidden,
    "max_position_embeddings": 2048,
    "do_layer_norm_before": pre_norm,
    "_remove_final_layer_norm": False,
    "enable_bias": True,
    "activation_function": "relu",
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "layerdrop": 0.0,
    "init_std": 0.02,
    "layer_norm_elementwise_affine": True,
    "tie_word_embeddings": True,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
  }


_BERT_BASE = {
  "architectures": ["BertForMaskedLM"],
  "model_type": "bert",
  "vocab_size": 30522,
  "hidden_size": 768,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "intermediate_size": 3072,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "max_position_embeddings": 512,
  "type_vocab_size": 2,
  "initializer_range": 0.02,
  "layer_norm_eps": 1e-12,
  "pad_token_id": 0,
  "position_embedding_type": "absolute",
  "tie_word_embeddings": True,
}

_DISTILBERT_BASE = {
  "architectures": ["DistilBertForMaskedLM"],
  "model_type": "distilbert",
  "vocab_size": 30522,
  "dim": 768,
  "n_layers": 6,
  "n_heads": 12,
  "hidden_dim": 3072,
  "activation": "gelu",
  "dropout": 0.1,
  "attention_dropout": 0.1,
  "max_position_embeddings": 512,
  "initializer_range": 0.02,
  "pad_token_id": 0,
  "sinusoidal_pos_embds": False,
  "tie_weights_": True,
  "qa_dropout": 0.1,
  "seq_classif_dropout": 0.2,
}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
  "google/flan-t5-base": _flan_t5(768, 2048, 12, 12),
  "google/flan-t5-large": _flan_t5(1024, 2816, 16, 24),
  "google/flan-t5-xl": _flan_t5(2048, 5120, 32, 24),
  "google/flan-t5-xxl": _flan_t5(4096, 10240, 64, 24),
  "facebook/opt-350m": _opt(1024, 4096, 16, 24, proj=512, pre_norm=False),
  "facebook/opt-1.3b": _opt(2048, 8192, 32, 24),
  "facebook/opt-2.7b": _opt(2560, 10240, 32, 32),
  "facebook/opt-6.7b": _opt(4096, 16384, 32, 32),
  "facebook/opt-13b": _opt(5120, 20480, 40, 40),
  "bert-base-uncased": _BERT_BASE,
  "google-bert/bert-base-uncased": _BERT_BASE,
  "distilbert-base-uncased": _DISTILBERT_BASE,
  "distilbert/distilbert-base-uncased": _DISTILBERT_BASE,
}

PARAM_COUNTS: dict[str, float] = {
  "google/flan-t5-base": 248e6,
  "google/flan-t5-large": 783e6,
  "google/flan-t5-xl": 2.85e9,
  "google/flan-t5-xxl": 11.1e9,
  "facebook/opt-350m": 331e6,
  "facebook/opt-1.3b": 1.3e9,
  "facebook/opt-2.7b": 2.7e9,
  "facebook/opt-6.7b": 6.7e9,
  "facebook/opt-13b": 13e9,
  "bert-base-uncased": 110e6,
  "google-bert/bert-base-uncased": 110e6,
  "distilbert-base-uncased": 66e6,
  "distilbert/distilbert-base-uncased": 66e6,
}


def known_config(name: str) -> dict[str, Any] | None:
  """A copy of the config.json dict of a known hub id, or None."""
  cfg = KNOWN_CONFIGS.get(name)
  return None if cfg is None else copy.deepcopy(cfg)


def for_model_types(*model_types: str) -> dict[str, dict[str, Any]]:
  """The known configs whose `model_type` is one of `model_types` (a family's `known_configs`)."""
  return {hub_id: cfg for hub_id, cfg in KNOWN_CONFIGS.items() if cfg["model_type"] in model_types}
