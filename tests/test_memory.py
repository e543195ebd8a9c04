"""laspar_jax.memory: the train-step memory estimate against what XLA plans for the real step (CPU).

The real step is `benchmarks/decoder_throughput.lora_setup` (the LoRA rows of
the --gpu benchmark) on small configs of every family, compiled, never run:
`compiled.memory_analysis()` gives XLA's plan (arguments + outputs - donated +
temp). float32 only: XLA:CPU computes bf16 through float32 converts, so its
bf16 plans say nothing about a GPU's. The XLA attention path (scores
materialized), as on GPUs.
"""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import decoder_throughput as dt

from laspar_jax import memory

SHAPE = (16, 16, 64)  # 16 queries x 16 tokens + 16 documents x 64 tokens (over the test's 8 devices)
SMALL = {  # activations dominate at these sizes, as in the full-size rows
  "bert": {
    "model_type": "bert",
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "vocab_size": 1024,
    "max_position_embeddings": 128,
  },
  "t5": {**dt.CONFIGS["flan_t5_base"][0], "d_model": 128, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2}
  | {"num_heads": 4, "d_kv": 32, "vocab_size": 1024},
  "opt": {**dt.CONFIGS["opt_1.3b"][0], "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
  | {"ffn_dim": 512, "word_embed_proj_dim": 128, "vocab_size": 1024},
  "llama": {**dt.CONFIGS["llama3_8b"][0], "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3}
  | {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024},
}
LOW, HIGH = 0.5, 2.0  # the estimate / XLA's plan must fall in [LOW, HIGH]


def _plan_and_estimate(family: str, remat: bool = False) -> tuple[dict, dict, dict]:
  s = dt.lora_setup(family, hf=SMALL[family], shape=SHAPE, dtype="float32", remat=remat, attention_impl="xla")
  planned = memory.xla_planned_bytes(s["step"].lower(s["state"], s["batch"]).compile())
  assert planned is not None, "XLA:CPU gave no memory analysis"
  return planned, memory.estimate(s["hf"], s["shape"], **s["setting"]), s["setting"]


@pytest.fixture(scope="module")
def plans():
  return {family: _plan_and_estimate(family) for family in SMALL}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_estimate_near_xla_plan(plans, family):
  planned, est, _ = plans[family]
  ratio = est["total"] / planned["peak"]
  assert LOW <= ratio <= HIGH, f"{family}: estimate {est['total']:.3g} B vs XLA plan {planned['peak']:.3g} B"
  assert est["saved"] > est["params"]  # these shapes test the activation model, not the parameter count
  # the donated state (parameters, optimizer moments) is XLA's aliased argument
  assert planned["alias"] == pytest.approx(est["params"] + est["optimizer"], rel=0.05)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_count_params_is_the_built_model(plans, family):
  _, _, setting = plans[family]
  assert memory.count_params(SMALL[family], lora_rank=setting["lora_rank"]) == (
    setting["n_params"],
    setting["n_trainable"],
  )


def test_scanned_remat_lowers_the_plan_as_estimated(plans):
  planned, est, _ = plans["llama"]  # scanned layers (scan_layers in the config)
  planned_r, est_r, _ = _plan_and_estimate("llama", remat=True)
  assert LOW <= est_r["total"] / planned_r["peak"] <= HIGH
  assert planned_r["peak"] < 0.7 * planned["peak"]
  assert est_r["total"] < 0.7 * est["total"]
  assert est_r["saved"] < est["saved"] / 5 and est_r["layer"] > est["layer"]  # the recomputed layer


def test_terms_move_the_right_way():
  hf, shape = dt.CONFIGS["llama3_8b"][0], memory.Shape(32, 32, 256)
  base = {"n_params": 8_000_000_000, "n_trainable": 40_000_000}
  est = lambda **kw: memory.estimate(hf, shape, **base, **kw)
  plain = est()
  assert est(dtype="bfloat16")["saved"] == pytest.approx(plain["saved"] / 2, rel=0.1)
  assert est(remat=True)["saved"] < plain["saved"] / 10
  full, dots, dots_all = (est(remat=p)["saved"] for p in memory.REMAT_POLICIES)
  assert full < dots < dots_all < plain["saved"]
  assert est(remat=True, remat_policy="dots")["saved"] == dots
  assert est(attention="fused")["saved"] < plain["saved"]
  assert est(head_tile=None)["head"] > 10 * plain["head"]
  bf16 = est(dtype="bfloat16", remat=True)
  assert est(dtype="bfloat16", remat=True, scan=True)["casts"] < bf16["casts"] / 10 and plain["casts"] == 0
  assert est(optimizer="sgd")["optimizer"] == 0 and plain["optimizer"] == 2 * 4 * base["n_trainable"]
  assert plain["total"] == pytest.approx(sum(plain[k] for k in memory.TERMS))
  with pytest.raises(ValueError, match="remat policy"):
    est(remat="everything")
