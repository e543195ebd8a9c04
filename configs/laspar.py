r"""LASPAR (LAtent SPArse Retrieval): a backbone + a latent sparse head of D dims.

Paper defaults: MiniLM-L12-H384 backbone, max length 256, D = 4,194,304,
`latent_attention` head, batch 32 x 8 accumulation steps, AdamW lr 1e-4 with
4,000 warm-up steps, lambda_q = lambda_d = 5e-3 with a quadratic warm-up over
T = 10,000 steps (FLOPS on queries and documents, equipartition on documents),
dense-teacher distillation (KL over the in-batch score matrix), query top-k 128
and document top-k 512 (in training and indexing).

Arguments (comma-separated, `configs/laspar.py:ARG`):
  variant=latent_attention|latent_sum|latent_max|mlm   the head
  reg=flops|l1          the sparsity regularizer (queries and documents)
  equipartition=True    equipartition on documents (False: off)
  D=4194304             latent dimensions (default: 2^22; 2^17 with scifact, 2^14 with runlocal)
  data=msmarco|scifact|PATH   training collection (BEIR/TSV dir or ir_datasets id;
                        default msmarco, scifact with scifact/runlocal)
  scifact               the SciFact recipe (all-MiniLM-L6-v2, D = 2^17, ~25 min on 2 CPU cores)
  runlocal              shrink everything for a laptop / CI

Commands (from the repository root; `--config.a.b=value` overrides any field):

  # Paper run (MS MARCO, needs accelerators; launch/tpu/ for pods):
  python launch/train.py --config configs/laspar.py --workdir /tmp/laspar

  # Variants:
  python launch/train.py --config configs/laspar.py:variant=latent_sum,D=131072 --workdir /tmp/laspar_sum

  # Laptop smoke run (all-MiniLM-L6-v2, D = 2^14, SciFact, 10 steps):
  python launch/train.py --config configs/laspar.py:runlocal --workdir /tmp/laspar_local

  # SciFact recipe, then index + evaluate over the full corpus (5,183 docs, 300 test queries):
  python launch/train.py --config configs/laspar.py:scifact --workdir /tmp/laspar_scifact
  python launch/train.py --config configs/laspar.py:scifact --workdir /tmp/sf3 --config.train.total_steps=3

  # Index and evaluate a trained encoder with the config's collection and top-k:
  python launch/index.py --config configs/laspar.py:scifact --encoder /tmp/laspar_scifact/encoder \
      --index /tmp/laspar_scifact_index
  python launch/evaluate.py --config configs/laspar.py:scifact --encoder /tmp/laspar_scifact/encoder \
      --index /tmp/laspar_scifact_index --run /tmp/laspar_scifact.run

Measured (2 shared CPU cores, load 4-5): the 3-step SciFact run takes 11 min
wall (data + dense-teacher cache 98 s, compile + 3 steps 80 s at 16.6 s/step,
final index + search 500 s) and scores nDCG@10 0.603 (R@100 0.890) with
128 / 512 active dims per query / document.
"""

from __future__ import annotations

import ml_collections

from configs import common

MSMARCO = "msmarco-passage"  # ir_datasets id; with data.split "train/judged": msmarco-passage/train/judged
MINILM_L6 = "sentence-transformers/all-MiniLM-L6-v2"

# The accepted config args and their defaults (0 / "" = not given: the recipe decides).
ARGS = dict(variant="latent_attention", reg="flops", equipartition=True, D=0, data="", scifact=False, runlocal=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The LASPAR training config (see the module docstring for `arg`)."""
  a = common.parse_arg(arg, **ARGS)
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- the sparse encoder (fields of sparse_encoder.EncoderConfig)
  c.model = ml_collections.ConfigDict()
  c.model.backbone = "microsoft/MiniLM-L12-H384-uncased"
  c.model.head = a.variant
  c.model.latent_dim = 2**22
  c.model.head_kwargs = ml_collections.ConfigDict()
  if a.variant == "latent_max":
    c.model.head_kwargs.tile = 4096
  c.model.towers = "shared"
  c.model.query_prefix = ""
  c.model.doc_prefix = ""
  c.model.query_max_len = 64
  c.model.doc_max_len = 256
  c.model.dtype = "float32"  # "bfloat16": bf16 compute, fp32 master weights
  c.model.remat = False
  c.model.remat_policy = "full"  # with remat: "full" (keep nothing), "dots", "dots_all" (layers.REMAT_POLICIES)
  c.model.scan_layers = False  # lax.scan over stacked layers (compile time of deep stacks; state-shaping)
  c.model.doc_head = ""  # "" = the query head; else a head name for documents (heads per side)
  c.model.doc_head_kwargs = ml_collections.ConfigDict()
  c.model.attention_impl = "auto"  # "auto" (platform.attention_impl), "xla", "cpu" or "cudnn" (CUDA GPU, bf16)
  c.model.matmul_precision = "default"  # fp32 dots: "default" (TF32 on GPUs), "tf32", "highest" (platform.py)
  # LoRA adapters on the backbone ({} = full fine-tune); e.g. {"rank": 16, "alpha": 32,
  # "dropout": 0.0, "targets": "default"}; the base then gets no update and no optimizer state.
  c.model.lora = ml_collections.ConfigDict()

  # ---- training data
  c.data = ml_collections.ConfigDict()
  c.data.collection = MSMARCO
  c.data.split = "train/judged"  # appended to an ir_datasets id; a folder's qrels split
  c.data.negatives = "none"  # "none" (in-batch only), "bm25", or a TREC run file
  c.data.n_neg = 0  # hard negatives per query in a batch
  c.data.neg_pool = 8  # negatives sampled per example (the pipeline draws n_neg per epoch)
  c.data.neg_depth = 100  # candidates considered per query
  c.data.teacher = "dense"  # "dense" (embeddings of teacher_model), "scores" (file), "none"
  c.data.teacher_model = MINILM_L6
  c.data.teacher_scores = ""  # cross-encoder score file for teacher="scores"
  c.data.teacher_cache = ""  # default: WORKDIR/teacher
  c.data.batching = "random"  # or "clustered": batches from balanced teacher clusters (teacher="dense")
  c.data.prefetch = 2

  # ---- loss (names: losses.RANKING_LOSSES, DISTILL_LOSSES, REGULARIZERS)
  c.loss = ml_collections.ConfigDict()
  c.loss.ranking = "inbatch_ce"
  c.loss.ranking_weight = 1.0
  # Student temperature (ranking and distillation): the heads L2-normalize, so scores are
  # cosines in [0, 1] and need sharpening as in dense retrieval.
  c.loss.temperature = 0.05
  c.loss.distill = "dense_kl"  # "" for none; "margin_mse"/"kl" with teacher="scores"
  c.loss.distill_weight = 1.0
  c.loss.teacher_temperature = 0.05  # cosines / 0.05
  # Named terms {name, side, weight}; each weight warmed up quadratically over reg_warmup_steps.
  c.loss.regularizers = ml_collections.ConfigDict(
    {f"q_{a.reg}": common.regularizer(a.reg, "q", 5e-3), f"d_{a.reg}": common.regularizer(a.reg, "d", 5e-3)}
  )
  if a.equipartition:
    c.loss.regularizers.d_equipartition = common.regularizer("equipartition", "d", 5e-3)
  c.loss.reg_warmup_steps = 10_000
  c.loss.flops_per_shard = False  # FLOPS per data shard (as per-GPU PyTorch code) instead of global

  c.optim = common.optim()
  c.train = common.train()
  c.eval = common.evaluation("msmarco-passage/dev/small")
  c.mesh = common.mesh(data=-1, model=1)
  c.sharding_rules = common.sharding_rules()

  if a.scifact:
    scifact(c)
  if a.runlocal:
    runlocal(c)
  if a.D:  # an explicit D wins over the recipes
    c.model.latent_dim = a.D
  if a.data:
    c.data.collection = {"msmarco": MSMARCO, "scifact": common.data_path("scifact")}.get(a.data, a.data)
    c.data.split = "train/judged" if c.data.collection == MSMARCO else "train"
  return common.with_defaults(c)


def scifact(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SciFact recipe: all-MiniLM-L6-v2 + latent_attention D = 2^17, dense-teacher KL, in-batch negatives.

  Train: the 809 SciFact train queries (920 query-positive pairs), batch 32,
  documents truncated to 192 tokens. Evaluated over the full 5,183-document
  corpus on the 300 test queries.
  """
  c.model.backbone = MINILM_L6
  c.model.latent_dim = 2**17
  c.model.query_max_len = 64
  c.model.doc_max_len = 192
  # MiniLM's mean-pooled states have RMS 0.12 (norm 2.35): std 1 makes x U_j ~ N(0, 2.35^2),
  # comparable to the bias 3, so the representation depends on the input from the start.
  c.model.head_kwargs.kernel_std = 1.0
  c.data.collection = common.data_path("scifact")
  c.data.split = "train"
  c.data.negatives = "none"
  c.data.n_neg = 0
  c.optim.batch_size = 32
  c.optim.accum_steps = 1
  c.optim.lr = 5e-5  # short fine-tune: keep the pretrained backbone close to its start
  # The fresh head needs a far larger rate: head-only training on frozen MiniLM states
  # reached nDCG@10 0.667 after 200 steps at 1e-3 (0.604 untrained).
  c.optim.head_lr_mult = 20.0
  c.optim.warmup_steps = 10
  c.optim.grad_clip = 1.0
  c.train.total_steps = 80  # 16.6-20 s/step measured on 2 shared CPU cores (load 3-5): 22-27 min
  c.train.log_every = 5
  c.train.checkpoint_every = 40
  c.train.eval_every = 0
  c.loss.reg_warmup_steps = 50
  c.eval.collection = common.data_path("scifact")
  c.eval.split = "test"
  c.eval.measures = "nDCG@10,RR@10,R@100"
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A laptop / CI-sized run: all-MiniLM-L6-v2, D = 2^14, short texts, SciFact, 10 steps."""
  c.model.backbone = MINILM_L6
  c.model.latent_dim = 2**14
  c.model.query_max_len = 32
  c.model.doc_max_len = 64
  c.model.remat = False
  c.data.collection = common.data_path("scifact")
  c.data.split = "train"
  c.data.negatives = "none"
  c.data.n_neg = 0
  c.optim.batch_size = 8
  c.optim.accum_steps = 1
  c.optim.warmup_steps = 2
  c.train.total_steps = 10
  c.train.log_every = 2
  c.train.checkpoint_every = 5
  c.train.eval_every = 0
  c.loss.reg_warmup_steps = 5
  # Even the smoke run evaluates on the full corpus and every judged query
  # (a corpus subset flatters); short documents keep it to a few minutes.
  c.eval.collection = common.data_path("scifact")
  c.eval.max_queries = 0
  c.eval.max_docs = 0
  c.mesh.data = -1
  c.mesh.model = 1
  return c
