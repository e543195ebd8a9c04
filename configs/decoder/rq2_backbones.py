r"""RQ2: which backbone and read-out mode make the best learned sparse retriever?

Rows (MarginMSE on MiniLM-L-6 cross-encoder margins, FLOPS, "Query "/"Passage " prefixes, 250 tokens;
the reference file and every setting of each row: configs/decoder/REFERENCE.md; shared settings and
arguments: configs/decoder/common.py):

  distilbert_splade_max   DistilBERT SPLADE-max (the encoder baseline), FLOPS q/d 0.1/0.08, lr 1e-6,
                          clip 0.3, batch 16, 150k steps
  flan_t5_encoder         Flan-T5-base encoder only, the LM head on encoder states, FLOPS 0.1/0.08,
                          batch 32, 600k steps
  flan_t5_multi_token     Flan-T5-base encoder-decoder, multi-token decoding (teacher-forced on
                          shift_right(x), every decoder position pooled), FLOPS 0.01/0.01 (the study's best),
                          batch 16, 600k steps
  flan_t5_decoder_stack   Flan-T5-base decoder stack alone (no cross-attention), FLOPS 0.01/0.01 (the
                          reference YAML's), batch 16, 600k steps
  opt_350m                OPT-350m decoder-only (causal, BOS not pooled), FLOPS on documents only, 0.1,
                          warm-up 100k; lr 1e-6 cosine, clip 0.3, batch 16, 160k steps
  controlled_<row>        the same model under one budget for all rows (AdamW 1e-5, batch 32, 30k steps)

Without `variant=` the config is flan_t5_multi_token. Extra arguments: common.ARGS
(tiny, data=, scifact, scores=, eval=, reg_weights=, calibration=, drop_first=, mask_eos).

Commands:
  python launch/study.py --config configs/decoder/rq2_backbones.py --workdir /tmp/rq2
  python launch/study.py --config configs/decoder/rq2_backbones.py:tiny --workdir /tmp/rq2_tiny
  python launch/train.py --config configs/decoder/rq2_backbones.py:variant=flan_t5_multi_token \
      --workdir /tmp/rq2_mt
  python launch/train.py --config configs/decoder/rq2_backbones.py:variant=opt_350m,scifact \
      --workdir /tmp/rq2_opt_scifact
  # the reference's multi-token read-out vs. keeping the start step and masking </s> (SciFact):
  python launch/train.py \
      --config configs/decoder/rq2_backbones.py:variant=flan_t5_multi_token,scifact,drop_first=False,mask_eos \
      --workdir /tmp/rq2_mt_keep
"""

from __future__ import annotations

import ml_collections

from configs import common as base
from configs.decoder import common

T5, OPT = "google/flan-t5-base", "facebook/opt-350m"
DISTILBERT = "distilbert/distilbert-base-uncased"
ROWS = {
  "distilbert_splade_max": common.Row(
    "RQ2 DistilBERT SPLADE-max",
    DISTILBERT,
    flops=(0.1, 0.08),
    ref="mlm_encoder_only_distll_splade_max.yaml",
    steps=150_000,
    lr=1e-6,
    clip=0.3,
  ),
  "flan_t5_encoder": common.Row(
    "RQ2 Flan-T5-base encoder-only", T5, flops=(0.1, 0.08), ref="mlm_encoder_only_t5_base_0.1_0.08.yaml", batch=32
  ),
  "flan_t5_multi_token": common.Row(
    "RQ2 Flan-T5-base encoder-decoder, multi-token",
    T5,
    decoding="multi_token",
    ref="mlm_encoder_decoder_multi_t5_base_0.01.yaml",
  ),
  "flan_t5_decoder_stack": common.Row(
    "RQ2 Flan-T5-base decoder stack alone", T5, decoding="decoder_stack", ref="mlm_decoder_only_t5_base_0.01.yaml"
  ),
  "opt_350m": common.Row(
    "RQ2 OPT-350m decoder-only",
    OPT,
    flops=(0.0, 0.1),
    ref="mlm_decoder_only_opt3.5_0.1.yaml",
    steps=160_000,
    flops_warmup=100_000,
  ),
}
VARIANTS: tuple[str, ...] = tuple(ROWS) + tuple(f"controlled_{r}" for r in ROWS)
DEFAULT = "flan_t5_multi_token"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one RQ2 variant (see the module docstring)."""
  a = base.parse_arg(arg, **common.ARGS)
  row, is_controlled = common.split_controlled(common.pick(__name__, VARIANTS, a.variant or DEFAULT))
  return common.trained_config(ROWS[row], a, is_controlled=is_controlled)
