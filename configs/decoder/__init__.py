"""The decoder LSR study (Qiao et al., 2025) as configs: one module per research question.

  rq1_zeroshot.py   RQ1: zero-shot prompting (BERT MLM, OPT-350m..13b, Flan-T5 base..XXL, SmolLM2, SPLADE-tiny)
  rq2_backbones.py  RQ2: backbones and read-out modes (DistilBERT SPLADE-max, Flan-T5 encoder / multi-token /
                    decoder stack, OPT-350m)
  rq3_heads.py      RQ3: single-token decoding, MLP heads on every mode, mixed query/document heads
  rq4_teachers.py   RQ4: larger students, the RankLLaMA teacher, OPT with LoRA

Each module has `VARIANTS` (every row, plus `controlled_<row>`: one optimizer / batch / step budget
for all backbones) and `get_config("variant=NAME[,tiny][,data=PATH]...")`; `common.py` holds the
study's shared settings. Run one row with `launch/train.py`, a whole module with `launch/study.py`:

  python launch/study.py --config configs/decoder/rq2_backbones.py --workdir /tmp/rq2
  python launch/study.py --config configs/decoder/rq2_backbones.py:tiny --workdir /tmp/rq2_tiny
"""
