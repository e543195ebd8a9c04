r"""RQ4: larger students, a larger teacher (RankLLaMA), and OPT with LoRA.

Rows (the reference file and every setting of each row: configs/decoder/REFERENCE.md; shared
settings and arguments: configs/decoder/common.py):

  flan_t5_large              Flan-T5-large multi-token student, MiniLM-L-6 teacher, FLOPS 0.01/0.01,
                             batch 16 (4 per GPU x 4 GPUs), 200k steps
  opt_1.3b                   OPT-1.3b student (full fine-tune), FLOPS on documents only, 0.01, warm-up 100k,
                             batch 16 (4 x 4 GPUs), 600k steps, lr 1e-6 cosine, clip 0.3
  rankllama_distilbert       DistilBERT SPLADE-max with RankLLaMA margins, FLOPS 0.1/0.08, batch 64,
                             150k steps, lr 5e-5 (the Trainer default), clip 1.0
  rankllama_flan_t5_base     Flan-T5-base multi-token with RankLLaMA margins, FLOPS 0.01/0.01, 200k steps
  rankllama_opt_350m         OPT-350m with RankLLaMA margins, FLOPS on documents only, 0.009, warm-up
                             130k, 200k steps
  lora_opt_1.3b              OPT-1.3b / 2.7b / 6.7b with LoRA (rank 32, alpha 32, dropout 0.1 on
  lora_opt_2.7b              q/k/v/out_proj and fc1/fc2), FLOPS on documents only, 0.001, warm-up 100k;
  lora_opt_6.7b              lr 1e-6 cosine, clip 0.3, 160k steps, batch 8 / 8 / 2
  controlled_<row>           the same model under one budget for all rows

RankLLaMA (castorini/rankllama-v1-7b-lora-passage) scores of the msmarco-hard-negatives candidates are
not published: write them in the same {qid: {pid: score}} .pkl.gz format to
common.rankllama_scores_path() or pass scores=PATH. Every RankLLaMA row maps them affinely to the
MiniLM cross-encoder's scale (common.ce_scores_path()) by default (`calibration=global`), as the
reference trained on its affine-calibrated score file (dataset msmarco_triplet_distil_rankllama_affine);
`calibration=none` uses them raw, `calibration=per_query` fits one map per query.
Without `variant=` the config is flan_t5_large.

Commands:
  python launch/study.py --config configs/decoder/rq4_teachers.py --workdir /tmp/rq4
  python launch/study.py --config configs/decoder/rq4_teachers.py:tiny --workdir /tmp/rq4_tiny
  python launch/train.py --config configs/decoder/rq4_teachers.py:variant=rankllama_opt_350m,calibration=none \
      --workdir /tmp/rq4_rl_opt
  python launch/train.py --config configs/decoder/rq4_teachers.py:variant=lora_opt_6.7b \
      --config.mesh.model=4 --workdir /tmp/rq4_lora67
"""

from __future__ import annotations

import ml_collections

from configs import common as base
from configs.decoder import common

T5, OPT = "google/flan-t5-base", "facebook/opt-350m"
DISTILBERT = "distilbert/distilbert-base-uncased"
ROWS = {
  "flan_t5_large": common.Row(
    "RQ4 Flan-T5-large student",
    "google/flan-t5-large",
    decoding="multi_token",
    ref="mlm_encoder_decoder_multi_t5_large.yaml",
    steps=200_000,
    batch=16,  # 4 per GPU on 4 GPUs (bash_rq4/train_scaling_student_flan_t5_large.sh)
  ),
  "opt_1.3b": common.Row(
    "RQ4 OPT-1.3b student",
    "facebook/opt-1.3b",
    flops=(0.0, 0.01),
    ref="mlm_decoder_only_opt13.yaml",
    steps=600_000,
    batch=16,  # 4 per GPU on 4 GPUs (bash_rq4/train_scaling_student_opt1.3b.sh)
    flops_warmup=100_000,
  ),
  "rankllama_distilbert": common.Row(
    "RQ4 RankLLaMA teacher, DistilBERT",
    DISTILBERT,
    flops=(0.1, 0.08),
    teacher="rankllama",
    ref="rankllama_splade_msmarco_distilbert.yaml",
    steps=150_000,
    batch=64,
  ),
  "rankllama_flan_t5_base": common.Row(
    "RQ4 RankLLaMA teacher, Flan-T5-base",
    T5,
    decoding="multi_token",
    teacher="rankllama",
    ref="rankllama_mlm_encoder_decoder_multi_t5_base.yaml",
    steps=200_000,
  ),
  "rankllama_opt_350m": common.Row(
    "RQ4 RankLLaMA teacher, OPT-350m",
    OPT,
    flops=(0.0, 0.009),
    teacher="rankllama",
    ref="rankllama_mlm_decoder_only_opt3.5.yaml",
    steps=200_000,
    flops_warmup=130_000,
  ),
  **{
    f"lora_opt_{size}": common.Row(
      f"RQ4 OPT-{size} LoRA",
      f"facebook/opt-{size}",
      flops=(0.0, 0.001),
      lora=32,
      ref=f"mlm_decoder_only_opt{tag}_lora_0.001.yaml",
      steps=160_000,
      batch=batch,
      flops_warmup=100_000,
    )
    for size, tag, batch in (("1.3b", "13", 8), ("2.7b", "27", 8), ("6.7b", "67", 2))
  },
}
VARIANTS: tuple[str, ...] = tuple(ROWS) + tuple(f"controlled_{r}" for r in ROWS)
DEFAULT = "flan_t5_large"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one RQ4 variant (see the module docstring)."""
  a = base.parse_arg(arg, **common.ARGS)
  row, is_controlled = common.split_controlled(common.pick(__name__, VARIANTS, a.variant or DEFAULT))
  return common.trained_config(ROWS[row], a, is_controlled=is_controlled)
