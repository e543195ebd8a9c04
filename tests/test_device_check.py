"""benchmarks/device_check.py --tiny: every task runs on CPU and prints every row, each value finite.

The script is what a session with an accelerator runs once; this test keeps
each of its code paths (paper-size step, SciFact recipe phases, encoder vs
torch, LoRA steps of three families) from rotting on CPU-only CI.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_MISSING = "torch not installed"

# Rows every run must have (names as the table prints them).
EXPECTED = {
  "paper": ["compile", "step", "loss (finite)", "XLA memory estimate"],
  "scifact": [
    "set-up (config, encoder, state)",
    "data + teacher",
    "compile (first step)",
    "steps (5 after the first)",
    "steady step",
    "checkpoints",
    "save encoder",
    "index",
    "evaluation",
    "total",
    "nDCG@10",
  ],
  "encoder": [
    f"{side} {kind} {prec}{length}"
    for prec in ("fp32", "tf32", "bf16")
    for kind, length in (("forward", " L16"), ("fwd+bwd", ""))
    for side in ("jax", "torch")
  ]
  + ["fp32 max |jax - torch|"],
  **{f"lora_{m}": ["compile (first step)", "step", "loss (finite)"] for m in ("flan_t5_base", "opt_1.3b", "llama3_8b")},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
  out = tmp_path_factory.mktemp("device_check") / "rows.json"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",  # one device, as on one accelerator
    LASPAR_DATA=str(shared_data),
  )
  # The persistent compilation cache at its default place (on, as for users): compiling is most of
  # this test's time on a small CPU, and a second run reads it back.
  env.pop("LASPAR_COMPILATION_CACHE", None)
  proc = subprocess.run(
    [sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--tiny", "--json", str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_every_row_present_and_finite(tiny_run):
  data, table = tiny_run
  assert data["meta"]["tiny"] and not data["meta"]["failed"] and not data["meta"]["isolated"]
  got = {(r["task"], r["row"]): r for r in data["rows"]}
  for task, names in EXPECTED.items():
    for name in names:
      r = got.get((task, name))
      assert r is not None, f"missing row {task} / {name}; rows: {sorted(got)}"
      if r["note"] == TORCH_MISSING and r["row"].startswith(("torch", "fp32 max")):
        assert math.isnan(r["value"])  # a skipped torch row says why
      else:
        assert math.isfinite(r["value"]), r
      assert r["peak_GiB"] is None or r["peak_GiB"] > 0  # CPU: n/a
      assert task in table and name in table  # the printed table has it too
  rows = {k: r["value"] for k, r in got.items()}
  assert rows[("scifact", "total")] >= rows[("scifact", "index")] + rows[("scifact", "evaluation")]
  assert 0.0 <= rows[("scifact", "nDCG@10")] <= 1.0
  for task in EXPECTED:
    if task.startswith("lora_") or task == "paper":
      assert rows[(task, "step")] > 0
  jax_rows = [r for r in data["rows"] if r["task"] == "encoder" and r["row"].startswith("jax")]
  assert all(r["value"] > 0 for r in jax_rows)
  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert all(r["note"] == TORCH_MISSING for r in jax_rows)
