r"""RQ3: single-token decoding, MLP heads on every read-out mode, mixed query/document heads.

Rows (Flan-T5-base unless named; study settings and arguments in configs/decoder/common.py):

  single_token            one decoder step from the start token, vocabulary head, FLOPS 0.01/0.01
  mlp_encoder             MLP term weighting (relu(Linear(h_t)) at each input token's id; queries sum
                          repeated ids, documents max) on the encoder states, FLOPS 0.1/0.08
  mlp_multi_token         MLP head on the multi-token decoder states (one weight per input token)
  mlp_single_token        MLP head with single-token decoding: each input token gets its own weight from
                          its encoder state plus the one decoder state (the reference gives every token
                          the same weight)
  mlp_decoder_stack       MLP head on the decoder stack alone
  mlp_opt_350m            MLP head on OPT-350m (causal), FLOPS on documents only, 0.1
  mlp_distilbert          MLP head on DistilBERT, FLOPS 0.1/0.08
  mixed_vocab_q_mlp_d     vocabulary query head + MLP document head (multi-token), shared backbone
  mixed_mlp_q_vocab_d     MLP query head + vocabulary document head (multi-token), shared backbone
  opt_350m_bidirectional  ours: OPT-350m without the causal mask, vocabulary head
  opt_350m_echo           ours: OPT-350m reading the text twice, pooling the second copy (Echo embeddings)
  controlled_<row>        the same model under one budget for all rows

Arguments: common.ARGS plus towers=shared|separate (the mixed rows on separate backbones).
Without `variant=` the config is single_token.

Commands:
  python launch/study.py --config configs/decoder/rq3_heads.py --workdir /tmp/rq3
  python launch/study.py --config configs/decoder/rq3_heads.py:tiny --workdir /tmp/rq3_tiny
  python launch/train.py --config configs/decoder/rq3_heads.py:variant=mixed_vocab_q_mlp_d,towers=separate \
      --workdir /tmp/rq3_mixed_sep
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common as base
from configs.decoder import common

T5, OPT, DISTILBERT = "google/flan-t5-base", "facebook/opt-350m", "distilbert/distilbert-base-uncased"
ROWS = {
  "single_token": common.Row("RQ3 single-token decoding", T5, decoding="single_token"),
  "mlp_encoder": common.Row("RQ3 MLP head, encoder-only", T5, head="mlp", flops=(0.1, 0.08)),
  "mlp_multi_token": common.Row("RQ3 MLP head, multi-token", T5, decoding="multi_token", head="mlp"),
  "mlp_single_token": common.Row("RQ3 MLP head, single-token", T5, decoding="single_token", head="mlp"),
  "mlp_decoder_stack": common.Row("RQ3 MLP head, decoder stack", T5, decoding="decoder_stack", head="mlp"),
  "mlp_opt_350m": common.Row("RQ3 MLP head, OPT-350m", OPT, head="mlp", flops=(0.0, 0.1)),
  "mlp_distilbert": common.Row("RQ3 MLP head, DistilBERT", DISTILBERT, head="mlp", flops=(0.1, 0.08)),
  "mixed_vocab_q_mlp_d": common.Row(
    "RQ3 mixed: vocabulary query, MLP document", T5, decoding="multi_token", head="mlm", doc_head="mlp"
  ),
  "mixed_mlp_q_vocab_d": common.Row(
    "RQ3 mixed: MLP query, vocabulary document", T5, decoding="multi_token", head="mlp", doc_head="mlm"
  ),
  "opt_350m_bidirectional": common.Row("ours: OPT-350m bidirectional", OPT, bidirectional=True, flops=(0.0, 0.1)),
  "opt_350m_echo": common.Row("ours: OPT-350m echo", OPT, decoding="echo", flops=(0.0, 0.1)),
}
VARIANTS: tuple[str, ...] = tuple(ROWS) + tuple(f"controlled_{r}" for r in ROWS)
DEFAULT = "single_token"
ARGS = dict(common.ARGS, towers="")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one RQ3 variant (see the module docstring)."""
  a = base.parse_arg(arg, **ARGS)
  row, is_controlled = common.split_controlled(common.pick(__name__, VARIANTS, a.variant or DEFAULT))
  spec = ROWS[row]
  if a.towers:
    if a.towers not in ("shared", "separate"):
      raise ValueError(f"towers must be 'shared' or 'separate', got {a.towers!r}")
    spec = dataclasses.replace(spec, towers=a.towers)
  return common.trained_config(spec, a, is_controlled=is_controlled)
