r"""RQ3: single-token decoding, MLP heads on every read-out mode, mixed query/document heads.

Rows (Flan-T5-base unless named; batch 16, 600k steps unless named; the reference file and every
setting of each row: configs/decoder/REFERENCE.md; shared settings and arguments: configs/decoder/common.py):

  single_token            one decoder step from the start token, vocabulary head, FLOPS 0.01/0.01
  mlp_encoder             MLP term weighting (relu(Linear(h_t)) at each input token's id; queries sum
                          repeated ids, documents max) on the encoder states; no FLOPS (as every
                          reference MLP experiment)
  mlp_multi_token         MLP head on the multi-token decoder states (one weight per input token)
  mlp_single_token        MLP head with single-token decoding: each input token gets its own weight from
                          its encoder state plus the one decoder state (the reference gives every token
                          the same weight)
  mlp_decoder_stack       MLP head on the decoder stack alone
  mlp_opt_350m            MLP head on OPT-350m (causal); lr 1e-6 cosine, clip 0.3
  mlp_distilbert          ours (no reference experiment): MLP head on DistilBERT, no FLOPS, the
                          DistilBERT SPLADE-max optimizer (lr 1e-6, clip 0.3, 150k steps)
  mixed_vocab_q_mlp_d     vocabulary query head (FLOPS 0.1) + MLP document head (none), multi-token,
                          two separate Flan-T5-base towers
  mixed_mlp_q_vocab_d     MLP query head (none) + vocabulary document head (FLOPS 0.08), two towers
  opt_350m_bidirectional  ours: OPT-350m without the causal mask, vocabulary head (opt_350m's settings)
  opt_350m_echo           ours: OPT-350m reading the text twice, pooling the second copy (Echo embeddings)
  controlled_<row>        the same model under one budget for all rows

Arguments: common.ARGS plus towers=shared|separate (e.g. the mixed rows on one shared backbone).
Without `variant=` the config is single_token.

Commands:
  python launch/study.py --config configs/decoder/rq3_heads.py --workdir /tmp/rq3
  python launch/study.py --config configs/decoder/rq3_heads.py:tiny --workdir /tmp/rq3_tiny
  python launch/train.py --config configs/decoder/rq3_heads.py:variant=mixed_vocab_q_mlp_d,towers=shared \
      --workdir /tmp/rq3_mixed_shared
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common as base
from configs.decoder import common

T5, OPT, DISTILBERT = "google/flan-t5-base", "facebook/opt-350m", "distilbert/distilbert-base-uncased"
NO_FLOPS = (0.0, 0.0)  # the reference's MLP experiments set no regularizer
OPT_KW = {"flops_warmup": 100_000}
ROWS = {
  "single_token": common.Row(
    "RQ3 single-token decoding", T5, decoding="single_token", ref="mlm_encoder_decoder_single_t5_base_0.01.yaml"
  ),
  "mlp_encoder": common.Row(
    "RQ3 MLP head, encoder-only", T5, head="mlp", flops=NO_FLOPS, ref="mlp_encoder_only_t5_base.yaml"
  ),
  "mlp_multi_token": common.Row(
    "RQ3 MLP head, multi-token",
    T5,
    decoding="multi_token",
    head="mlp",
    flops=NO_FLOPS,
    ref="mlp_encoder_decoder_multi_t5_base.yaml",
  ),
  "mlp_single_token": common.Row(
    "RQ3 MLP head, single-token",
    T5,
    decoding="single_token",
    head="mlp",
    flops=NO_FLOPS,
    ref="mlp_encoder_decoder_single_t5_base.yaml",
  ),
  "mlp_decoder_stack": common.Row(
    "RQ3 MLP head, decoder stack",
    T5,
    decoding="decoder_stack",
    head="mlp",
    flops=NO_FLOPS,
    ref="mlp_decoder_only_t5_base.yaml",
  ),
  "mlp_opt_350m": common.Row(
    "RQ3 MLP head, OPT-350m", OPT, head="mlp", flops=NO_FLOPS, ref="mlp_decoder_only_opt3.5.yaml", **OPT_KW
  ),
  "mlp_distilbert": common.Row(
    "ours: MLP head, DistilBERT (no reference experiment)",
    DISTILBERT,
    head="mlp",
    flops=NO_FLOPS,
    steps=150_000,
    lr=1e-6,
    clip=0.3,
  ),
  "mixed_vocab_q_mlp_d": common.Row(
    "RQ3 mixed: vocabulary query, MLP document",
    T5,
    decoding="multi_token",
    head="mlm",
    doc_head="mlp",
    flops=(0.1, 0.0),
    towers="separate",
    ref="qmlm_dmlp_encoder_decoder_multi_t5_base_0.1_0.0.yaml",
  ),
  "mixed_mlp_q_vocab_d": common.Row(
    "RQ3 mixed: MLP query, vocabulary document",
    T5,
    decoding="multi_token",
    head="mlp",
    doc_head="mlm",
    flops=(0.0, 0.08),
    towers="separate",
    ref="qmlp_dmlm_encoder_decoder_multi_t5_base_0.0_0.08.yaml",
  ),
  "opt_350m_bidirectional": common.Row(
    "ours: OPT-350m bidirectional", OPT, bidirectional=True, flops=(0.0, 0.1), steps=160_000, **OPT_KW
  ),
  "opt_350m_echo": common.Row("ours: OPT-350m echo", OPT, decoding="echo", flops=(0.0, 0.1), steps=160_000, **OPT_KW),
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
