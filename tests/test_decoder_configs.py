"""configs/decoder: every variant builds its model (abstractly at full size) and one batch + forward (tiny form).

- Full size: each study backbone is built abstractly from its embedded config.json
  (`known_configs`, no download) and its parameter count checked against the published one;
  each trained variant's whole encoder (heads, read-out, LoRA) is built abstractly at the real
  width and vocabulary on a one-layer copy of that config.
- Tiny: each variant's `tiny` form builds its encoder on the family's tiny fixture, assembles one
  batch from a tiny collection with the config's pipeline (prefixes, lengths, negatives) and runs
  the config's loss (forward) on it; zero-shot rows build their `EncoderConfig`
  (`zeroshot.encoder_fields`) and encode a batch of queries and passages (`encode.encode_sparse`).
Encoders and batches are shared between variants with the same tiny encoder config.
"""

import dataclasses
import functools
import importlib
import json
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.decoder import common as dcommon
from laspar_jax import config_check, encode, train_lib, train_step, zeroshot
from laspar_jax import mesh as mesh_lib
from laspar_jax.data import assemble, sources
from laspar_jax.models import gguf as gguf_lib
from laspar_jax.models import hf_weights, known_configs, sparse_encoder

MODULES = {
  name: importlib.import_module(f"configs.decoder.{name}")
  for name in ("rq1_zeroshot", "rq2_backbones", "rq3_heads", "rq4_teachers")
}
TRAINED = [(m, v) for m in MODULES if m != "rq1_zeroshot" for v in MODULES[m].VARIANTS]
ZEROSHOT = [("rq1_zeroshot", v) for v in MODULES["rq1_zeroshot"].VARIANTS]
_LAYER_KEYS = ("num_layers", "num_decoder_layers", "num_hidden_layers", "n_layers")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _ids(pairs):
  return [f"{m}:{v}" for m, v in pairs]


def _config(module: str, arg: str) -> ml_collections.ConfigDict:
  return MODULES[module].get_config(arg)


def _n_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@functools.lru_cache(maxsize=None)
def _full_size_params(backbone: str) -> int:
  """Parameters of the backbone with its LM head, built abstractly (embedded config or local package)."""
  if backbone in known_configs.KNOWN_CONFIGS:
    return _n_params(hf_weights.abstract_model(backbone, lm_head=True))
  path = hf_weights.resolve(backbone)  # an installed package: its config.json or GGUF metadata
  if path.endswith(".gguf"):
    hf_cfg = gguf_lib.hf_config(gguf_lib.open_reader(path), path)
  else:
    hf_cfg, _ = hf_weights.read_config(path)
  return _n_params(hf_weights.abstract_model(hf_cfg, lm_head=True))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
  return dcommon.write_tiny_collection(tmp_path_factory.mktemp("decoder_configs") / "tiny")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("stand_ins")


# ----------------------------------------------------------------------------- the variant lists


@pytest.mark.parametrize("module", sorted(MODULES))
def test_variants_and_errors(module):
  mod = MODULES[module]
  rows = tuple(mod.ROWS)
  assert mod.VARIANTS == rows + tuple(f"controlled_{r}" for r in rows)
  assert len(set(mod.VARIANTS)) == len(mod.VARIANTS)
  mod.get_config(None)  # the default row
  with pytest.raises(ValueError, match="unknown variant 'nope'.*" + mod.VARIANTS[-1]):
    mod.get_config("variant=nope")
  with pytest.raises(ValueError, match="unknown config arg"):
    mod.get_config(f"variant={rows[0]},bogus=1")


def test_study_rows_present():
  """The rows the issue lists exist, with the study's settings."""
  rq1, rq2, rq3, rq4 = (MODULES[m] for m in sorted(MODULES))
  for s in ("350m", "1.3b", "2.7b", "6.7b", "13b"):
    assert rq1.get_config(f"variant=opt_{s}").zeroshot.backbone == f"facebook/opt-{s}"
  for s in ("base", "large", "xl", "xxl"):
    z = rq1.get_config(f"variant=flan_t5_{s}").zeroshot
    assert z.backbone == f"google/flan-t5-{s}" and z.decoding == "multi_token"
  bert = rq1.get_config("variant=bert_base").zeroshot
  assert (bert.preset, bert.prompt_pool, bert.in_text_filter, bert.term_cap, bert.impacts) == (
    "reference",
    "all",
    True,
    0,
    "int100",
  )
  assert (bert.query_max_len, bert.doc_max_len, bert.query_topk, bert.topk) == (250, 250, 1000, 128)
  assert rq1.get_config("variant=smollm2_promptreps").zeroshot.preset == "promptreps"
  assert rq1.get_config("variant=splade_tiny").zeroshot.preset == "none"
  mt = rq2.get_config("variant=flan_t5_multi_token")
  assert mt.model.decoding == "multi_token" and dict(mt.model.decoding_kwargs) == {
    "drop_first": True,
    "mask_eos": False,
  }
  assert (mt.optim.lr, mt.optim.warmup_steps, mt.optim.schedule, mt.optim.batch_size) == (5e-5, 6000, "linear", 16)
  assert {k: r.weight for k, r in mt.loss.regularizers.items()} == {"q_flops": 0.01, "d_flops": 0.01}
  assert mt.loss.reg_warmup_steps == 50_000 and tuple(mt.loss.doc_reg_weights) == (0.5, 0.5)
  assert (mt.model.query_prefix, mt.model.doc_prefix, mt.model.doc_max_len) == ("Query ", "Passage ", 250)
  assert mt.data.teacher == "scores" and mt.loss.distill == "margin_mse"
  assert mt.data.teacher_scores.endswith("cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz")
  ref = rq2.get_config("variant=flan_t5_multi_token,reg_weights=reference,drop_first=False,mask_eos")
  assert tuple(ref.loss.doc_reg_weights) == (0.25, 0.75)
  assert dict(ref.model.decoding_kwargs) == {"drop_first": False, "mask_eos": True}
  opt = rq2.get_config("variant=opt_350m")
  assert (opt.optim.lr, opt.optim.schedule, opt.optim.grad_clip) == (1e-6, "cosine", 0.3)
  assert {k: r.weight for k, r in opt.loss.regularizers.items()} == {"d_flops": 0.1}
  enc = rq2.get_config("variant=flan_t5_encoder")
  assert enc.model.decoding == "plain" and enc.loss.regularizers.q_flops.weight == 0.1
  assert enc.loss.regularizers.d_flops.weight == 0.08
  dbert = rq2.get_config("variant=distilbert_splade_max")
  assert (dbert.model.query_prefix, dbert.optim.lr, dbert.optim.grad_clip, dbert.train.total_steps) == (
    "Query ",
    1e-6,
    0.3,
    150_000,
  )
  assert opt.loss.reg_warmup_steps == 100_000 and opt.train.total_steps == 160_000
  mixed = rq3.get_config("variant=mixed_mlp_q_vocab_d")
  assert (mixed.model.head, mixed.model.doc_head, mixed.model.towers) == ("mlp", "mlm", "separate")
  assert {k: r.weight for k, r in mixed.loss.regularizers.items()} == {"d_flops": 0.08}
  assert rq3.get_config("variant=mixed_mlp_q_vocab_d,towers=shared").model.towers == "shared"
  assert not rq3.get_config("variant=mlp_multi_token").loss.regularizers
  assert rq3.get_config("variant=mlp_encoder").model.doc_head_kwargs.pooling == "max"
  lora = rq4.get_config("variant=lora_opt_6.7b")
  assert list(lora.model.lora.targets) == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
  assert lora.loss.regularizers.d_flops.weight == 0.001 and "q_flops" not in lora.loss.regularizers
  rl = rq4.get_config("variant=rankllama_opt_350m")
  assert rl.loss.regularizers.d_flops.weight == 0.009 and rl.data.teacher_calibration == "global"
  assert rl.loss.reg_warmup_steps == 130_000
  assert rq4.get_config("variant=rankllama_opt_350m,calibration=none").data.teacher_calibration == "none"
  assert rl.data.teacher_calibration_reference == dcommon.ce_scores_path()
  # controlled: one budget for every backbone
  budgets = {
    (c.optim.lr, c.optim.batch_size, c.train.total_steps, c.optim.schedule)
    for m, v in TRAINED
    if v.startswith("controlled_")
    for c in [_config(m, f"variant={v}")]
  }
  assert len(budgets) == 1


# ----------------------------------------------------------------------------- full size (abstract)


@pytest.mark.parametrize(
  "backbone",
  sorted(
    {_config(m, f"variant={v}").model.backbone for m, v in TRAINED}
    | {_config(m, f"variant={v}").zeroshot.backbone for m, v in ZEROSHOT}
  ),
)
def test_backbone_builds_abstractly_at_full_size(backbone):
  n = _full_size_params(backbone)
  expected = dcommon.param_count(backbone)
  assert 0.8 * expected < n < 1.25 * expected, (backbone, n, expected)


def _stand_in(folder: pathlib.Path, backbone: str) -> str:
  """A local folder with the backbone's real config.json cut to one layer, and a tiny tokenizer."""
  out = folder / backbone.replace("/", "__")
  if out.exists():
    return os.fspath(out)
  cfg = known_configs.known_config(backbone)
  for key in _LAYER_KEYS:
    if key in cfg:
      cfg[key] = 1
  tmp = pathlib.Path(tempfile.mkdtemp(dir=folder))
  (tmp / "config.json").write_text(json.dumps(cfg))
  src = pathlib.Path(hf_weights.resolve(dcommon.TINY_BACKBONES[cfg["model_type"]]))
  for name in _TOKENIZER_FILES:
    if (src / name).exists():
      shutil.copy(src / name, tmp / name)
  tmp.rename(out)
  return os.fspath(out)


@functools.lru_cache(maxsize=None)
def _abstract_encoder(cfg: sparse_encoder.EncoderConfig, folder: str) -> sparse_encoder.SparseEncoder:
  stand_in = _stand_in(pathlib.Path(folder), cfg.backbone)
  return sparse_encoder.build_encoder(dataclasses.replace(cfg, backbone=stand_in), weights=False)[0]


@pytest.mark.parametrize("module,variant", TRAINED, ids=_ids(TRAINED))
def test_trained_variant_builds_abstractly(module, variant, stand_ins):
  """The full config: validated, and its encoder (real width and vocabulary, one layer) built abstractly."""
  c = _config(module, f"variant={variant}")
  config_check.check_config(c)
  cfg = train_lib.encoder_config(c)
  enc = _abstract_encoder(cfg, os.fspath(stand_ins))
  assert enc.output_dim == known_configs.KNOWN_CONFIGS[cfg.backbone]["vocab_size"]
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(enc, nnx.Param))}
  assert any("lora_a" in n for n in names) == bool(cfg.lora)
  if cfg.lora:
    adapted = {n.split("/")[-2] for n in names if n.endswith("lora_a")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, adapted
  assert any(n.startswith(("query_head/linear", "doc_head/linear")) for n in names) == (
    "mlp" in (cfg.head, cfg.doc_head)
  )


# ----------------------------------------------------------------------------- tiny forms

# Tiny graphs compile 2-3x faster without LLVM's expensive passes; the values are the same computation.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_CACHE: dict = {}


def _cached(key, fn):
  if key not in _CACHE:
    _CACHE[key] = fn()
  return _CACHE[key]


def _tiny_batch(c: ml_collections.ConfigDict, tokenizer, workdir: pathlib.Path) -> dict:
  """The first batch of the config's training pipeline (prefixes, lengths, BM25 negatives)."""

  def make():
    pipe, _ = assemble.build_pipeline(c, tokenizer, workdir, progress=False)
    try:
      return {k: jnp.asarray(v) for k, v in next(pipe).items()}
    finally:
      pipe.close()

  m, d = c.model, c.data
  return _cached(
    (
      "batch",
      m.backbone,
      m.query_prefix,
      m.doc_prefix,
      m.query_max_len,
      m.doc_max_len,
      d.collection,
      d.negatives,
      d.n_neg,
      c.optim.batch_size,
    ),
    make,
  )


@pytest.mark.parametrize("module,variant", TRAINED, ids=_ids(TRAINED))
def test_trained_variant_tiny_batch_and_forward(module, variant, tiny_data, tmp_path):
  """The tiny form: its encoder, one batch of its pipeline and its loss (forward) on that batch."""
  c = _config(module, f"variant={variant},tiny,data={tiny_data}")
  config_check.check_config(c)
  assert c.model.backbone in dcommon.TINY_BACKBONES.values()
  cfg = train_lib.encoder_config(c)
  encoder, tokenizer = _cached(("encoder", cfg), lambda: sparse_encoder.build_encoder(cfg))
  batch = _tiny_batch(c, tokenizer, tmp_path)
  B, n, V = c.optim.batch_size, c.data.n_neg, encoder.output_dim
  assert batch["q_input_ids"].shape == (B, c.model.query_max_len)
  assert batch["d_input_ids"].shape == (B * (1 + n), c.model.doc_max_len)
  shapes = _cached(
    ("shapes", cfg, id(batch)),
    lambda: [
      jax.eval_shape(
        lambda i, m, kind=kind: encoder(i, m, kind=kind), batch[f"{p}_input_ids"], batch[f"{p}_attention_mask"]
      ).shape
      for kind, p in (("query", "q"), ("doc", "d"))
    ],
  )
  assert shapes == [(B, V), (B * (1 + n), V)], shapes
  step_cfg = train_step.StepConfig.from_config(c, mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1]))
  # Variants that differ only in regularizer weights share one compiled forward (weights 1.0).
  step_cfg = dataclasses.replace(step_cfg, regularizers=tuple((r[0], r[1], 1.0) for r in step_cfg.regularizers))

  def forward():
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    fn = jax.jit(
      lambda p, b: train_step.loss_fn(
        p, graphdef, rest, b, jnp.asarray(c.train.total_steps), jax.random.key(0), step_cfg
      ),
      compiler_options=_FAST_COMPILE,
    )
    return jax.device_get(fn(params, batch))

  loss, metrics = _cached(("forward", cfg, step_cfg, id(batch)), forward)
  assert np.isfinite(loss), metrics
  # A fresh vocabulary head weights some term of every text; a fresh MLP head (one random direction)
  # may weight none of a tiny random model's few query tokens.
  for side, head in (("q", cfg.head), ("d", cfg.doc_head or cfg.head)):
    assert metrics[f"active_{side}"] > 0 or head == "mlp", (side, metrics)
  if c.loss.regularizers:
    assert any(k.startswith("reg/") for k in metrics), sorted(metrics)


def _zeroshot_encoder_config(z: ml_collections.ConfigDict) -> sparse_encoder.EncoderConfig:
  fields, _ = zeroshot.encoder_fields(z)
  cfg = sparse_encoder.EncoderConfig(**fields)
  zeroshot.check_config(cfg)
  return cfg


@pytest.mark.parametrize("module,variant", ZEROSHOT, ids=_ids(ZEROSHOT))
def test_zeroshot_variant_full_config(module, variant):
  c = _config(module, f"variant={variant}")
  cfg = _zeroshot_encoder_config(c.zeroshot)
  assert cfg.head == "mlm" and zeroshot.is_zeroshot(cfg) == (bool(cfg.prompt) or cfg.in_text_filter)
  _, ev = zeroshot.encoder_fields(c.zeroshot)
  assert (ev["q_topk"], ev["d_topk"]) == (c.eval.q_topk, c.eval.d_topk)


@pytest.mark.parametrize("module,variant", ZEROSHOT, ids=_ids(ZEROSHOT))
def test_zeroshot_variant_tiny_encodes(module, variant, tiny_data):
  """The tiny form's zero-shot encoder reads a batch of the tiny collection's queries and passages."""
  c = _config(module, f"variant={variant},tiny,data={tiny_data}")
  z = c.zeroshot
  assert z.backbone in dcommon.TINY_BACKBONES.values()
  cfg = _zeroshot_encoder_config(z)
  coll = _cached(
    ("collection", c.eval.collection), lambda: sources.load_collection(c.eval.collection, split=c.eval.split)
  )

  def run():
    enc, tok = sparse_encoder.build_encoder(cfg)
    queries = [coll.queries[q] for q in sorted(coll.judged_queries)][: z.batch_size]
    docs = [sources.doc_text(d) for d, _ in zip(coll.docs(), range(z.batch_size))]
    out = []
    for kind, texts, k in (("query", queries, z.query_topk), ("doc", docs, z.topk)):
      rows = list(encode.encode_sparse(enc, tok, texts, kind=kind, k=k, batch_size=z.batch_size))
      out.append((np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])))
    return out

  for idx, val in _cached(("zeroshot", cfg), run):
    assert idx.shape == val.shape and idx.shape[1] >= min(z.topk, z.query_topk)
    assert np.all(np.isfinite(val)) and np.all(val >= 0) and np.any(val > 0)
    if cfg.impacts == "int100":
      assert np.array_equal(val, np.floor(val))
