r"""RQ4: larger students, a larger teacher (RankLLaMA), and OPT with LoRA.

Rows (study settings and arguments in configs/decoder/common.py):

  flan_t5_large              Flan-T5-large multi-token student, MiniLM-L-6 teacher, FLOPS 0.01/0.01
  opt_1.3b                   OPT-1.3b student (full fine-tune), FLOPS on documents only, 0.01
  rankllama_distilbert       DistilBERT SPLADE-max with RankLLaMA margins, FLOPS 0.1/0.08
  rankllama_flan_t5_base     Flan-T5-base multi-token with RankLLaMA margins, FLOPS 0.01/0.01
  rankllama_opt_350m         OPT-350m with RankLLaMA margins, FLOPS on documents only, 0.009
  lora_opt_1.3b              OPT-1.3b with LoRA (rank 16, alpha 32, dropout 0.05) on q/k/v/out_proj
  lora_opt_2.7b              and fc1/fc2 (every projection of OPT's blocks, not Llama's names),
  lora_opt_6.7b              FLOPS on documents only, 0.001; lr 1e-4 (ours), cosine, clip 0.3
  controlled_<row>           the same model under one budget for all rows

RankLLaMA (castorini/rankllama-v1-7b-lora-passage) scores of the msmarco-hard-negatives candidates are
not published: write them in the same {qid: {pid: score}} .pkl.gz format to
common.rankllama_scores_path() or pass scores=PATH. `calibration=global|per_query` maps them affinely
to the MiniLM cross-encoder's scale (common.ce_scores_path()); the reference uses them raw (none).
Without `variant=` the config is flan_t5_large.

Commands:
  python launch/study.py --config configs/decoder/rq4_teachers.py --workdir /tmp/rq4
  python launch/study.py --config configs/decoder/rq4_teachers.py:tiny --workdir /tmp/rq4_tiny
  python launch/train.py --config configs/decoder/rq4_teachers.py:variant=rankllama_opt_350m,calibration=global \
      --workdir /tmp/rq4_rl_opt
  python launch/train.py --config configs/decoder/rq4_teachers.py:variant=lora_opt_6.7b \
      --config.mesh.model=4 --workdir /tmp/rq4_lora67
"""

from __future__ import annotations

import ml_collections

from configs import common as base
from configs.decoder import common

ROWS = {
  "flan_t5_large": common.Row("RQ4 Flan-T5-large student", "google/flan-t5-large", decoding="multi_token"),
  "opt_1.3b": common.Row("RQ4 OPT-1.3b student", "facebook/opt-1.3b", flops=(0.0, 0.01)),
  "rankllama_distilbert": common.Row(
    "RQ4 RankLLaMA teacher, DistilBERT", "distilbert/distilbert-base-uncased", flops=(0.1, 0.08), teacher="rankllama"
  ),
  "rankllama_flan_t5_base": common.Row(
    "RQ4 RankLLaMA teacher, Flan-T5-base", "google/flan-t5-base", decoding="multi_token", teacher="rankllama"
  ),
  "rankllama_opt_350m": common.Row(
    "RQ4 RankLLaMA teacher, OPT-350m", "facebook/opt-350m", flops=(0.0, 0.009), teacher="rankllama"
  ),
  "lora_opt_1.3b": common.Row("RQ4 OPT-1.3b LoRA", "facebook/opt-1.3b", flops=(0.0, 0.001), lora=16),
  "lora_opt_2.7b": common.Row("RQ4 OPT-2.7b LoRA", "facebook/opt-2.7b", flops=(0.0, 0.001), lora=16),
  "lora_opt_6.7b": common.Row("RQ4 OPT-6.7b LoRA", "facebook/opt-6.7b", flops=(0.0, 0.001), lora=16),
}
VARIANTS: tuple[str, ...] = tuple(ROWS) + tuple(f"controlled_{r}" for r in ROWS)
DEFAULT = "flan_t5_large"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one RQ4 variant (see the module docstring)."""
  a = base.parse_arg(arg, **common.ARGS)
  row, is_controlled = common.split_controlled(common.pick(__name__, VARIANTS, a.variant or DEFAULT))
  return common.trained_config(ROWS[row], a, is_controlled=is_controlled)
