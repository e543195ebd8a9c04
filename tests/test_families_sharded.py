"""A sharded train step for every backbone family on a (data=2, model=4) mesh of 8 CPU devices.

The real machinery (`build_encoder`, `optim.make_optimizer`,
`train_state.create_train_state`, `train_step.make_train_step`) on tiny
configs: full fine-tuning with a latent head, and LoRA with the vocabulary
head. With LoRA the base weights stay bitwise unchanged and only the adapters
and the sparse heads hold optimizer state.
"""

import pathlib
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax import mesh as mesh_lib  # noqa: E402
from laspar_jax import optim, train_state, train_step  # noqa: E402
from laspar_jax.models import layers, llama, lora, opt, sparse_encoder, t5  # noqa: E402,F401  (register families)
from laspar_jax.models.sparse_encoder import EncoderConfig  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# (tiny checkpoint, LoRA?): every family both ways, every fixture once ("bert" is written by tiny_bert).
CASES = (
  ("bert", False),
  ("bert", True),
  ("t5_flan", False),
  ("t5_v10", True),
  ("opt_post", False),
  ("opt_pre", True),
  ("mistral", False),
  ("llama3", True),
  ("qwen2", True),
)
# Tiny models: compile fast rather than well (compilation is most of this file's time).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": "default"}
TEXTS = [
  "what causes cells to divide",
  "proteins fold in water",
  "the capital of france",
  "a much longer text about the immune system and its cells",
  "dna repair",
  "viral load",
  "paris is the capital",
  "mitochondria make energy",
]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path)


def _optim():
  return ml_collections.ConfigDict(
    dict(
      lr=1e-3,
      warmup_steps=0,
      schedule="constant",
      end_lr=0.0,
      weight_decay=0.01,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip=1.0,
      head_lr_mult=10.0,
      freeze=(),
      lora_trainable=(),
    )
  )


def _flat(tree):
  return {optim.param_path(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nbytes(leaves):
  return sum(x.size * x.dtype.itemsize for x in leaves)


@pytest.mark.parametrize("case,use_lora", CASES, ids=[f"{c}-{'lora' if u else 'full'}" for c, u in CASES])
def test_sharded_train_step(case, use_lora, bert_path):
  path = bert_path if case == "bert" else FIXTURES / case
  vocab_head = use_lora and case != "bert"  # BERT's 30k vocabulary would dominate the compile time
  cfg = EncoderConfig(
    backbone=str(path),
    head="mlm" if vocab_head else "latent_attention",
    latent_dim=512,
    head_kwargs={} if vocab_head else {"kernel_std": 1.0},
    lora=LORA if use_lora else {},
    query_max_len=8,
    doc_max_len=12,
  )
  enc, tok = sparse_encoder.build_encoder(cfg)
  assert bool(lora.lora_modules(enc)) == use_lora
  for path, var in nnx.to_flat_state(nnx.state(enc, nnx.Param)):  # every parameter has logical axes
    axes = layers.logical_axes(var)
    assert axes is not None and len(axes) == var.get_value().ndim, path
  params = train_state.encoder_params(enc)
  o = _optim()
  tx, lr = optim.make_optimizer(o, 10, params)
  trainable = optim.trainable_mask(params, o)
  labels = {
    optim.param_path(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(optim.param_labels(params, o))[0]
  }
  before = _flat(params)
  mesh = mesh_lib.make_mesh(data=2, model=4)
  graphdef, rest, state, shardings = train_state.create_train_state(enc, tx, mesh, rng_impl="rbg")
  specs = [s.spec for s in jax.tree.leaves(shardings.params)]
  assert any("model" in tuple(s) for s in specs)  # really sharded over the model axis
  step = train_step.make_train_step(
    graphdef,
    rest,
    tx,
    lr,
    train_step.StepConfig(dropout=use_lora, rng_impl="rbg"),
    shardings,
    mesh,
    trainable=None if all(jax.tree.leaves(trainable)) else trainable,
  )
  q, d = tok(TEXTS[:4], max_length=8), tok(TEXTS[4:], max_length=12)
  batch = mesh_lib.put_batch(
    {
      "q_input_ids": q["input_ids"],
      "q_attention_mask": q["attention_mask"],
      "d_input_ids": d["input_ids"],
      "d_attention_mask": d["attention_mask"],
    },
    mesh,
  )
  opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  step = step.lower(state, batch).compile(compiler_options=FAST_COMPILE)
  for _ in range(2):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and int(state.bad_step) == -1
  after = _flat(state.params)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  if not use_lora:
    assert set(labels.values()) <= {"base", "head"}
    assert len(changed) > 0.8 * len(before), sorted(set(before) - changed)[:5]
    assert _nbytes(opt_leaves) == 2 * _nbytes(before.values())
    return
  frozen = {k for k, lab in labels.items() if lab == "frozen"}
  trained = set(before) - frozen
  assert {labels[k] for k in trained} <= {"lora", "head"} and any(k.endswith("lora_b") for k in trained)
  for k in frozen:  # the base: bitwise unchanged
    assert before[k].tobytes() == after[k].tobytes(), k
  assert any(k.endswith("lora_b") for k in changed) and changed <= trained
  # Adam's two moments for the adapters (and sparse-head parameters) only, nothing for the base.
  assert sum(x.size for x in opt_leaves) == 2 * sum(before[k].size for k in trained)
  assert _nbytes(opt_leaves) == 2 * _nbytes(before[k] for k in trained)
  assert _nbytes(opt_leaves) < 0.5 * _nbytes(before[k] for k in frozen)
