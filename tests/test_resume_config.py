"""Resuming with a changed config: state-shaping changes refused in one line before anything is written,
changed hyperparameters said and each config kept; all-damaged checkpoints said; the first step after a
resume logged."""

import json
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from configs import laspar  # noqa: E402
from laspar_jax import config_lib, run_config, train_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(tiny, shared_data, **over):
  c = laspar.get_config("runlocal")
  base = {
    "model.backbone": str(tiny),
    "model.latent_dim": 512,
    "model.query_max_len": 16,
    "model.doc_max_len": 32,
    "data.collection": str(shared_data / "scifact"),
    "data.teacher": "none",
    "loss.distill": "",
    "optim.batch_size": 8,
    "optim.warmup_steps": 1,
    "train.total_steps": 2,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 0,
    "train.log_every": 1,
    "train.final_eval": False,
    "train.dropout": False,
  }
  return config_lib.update(c, {**base, **over})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny"), minilm_path)


def _listing(root):
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.name != ".lock"}


def test_changed_state_field_refused_before_anything_is_written(tmp_path, tiny, shared_data):
  run = tmp_path / "run"
  train_lib.train_and_evaluate(_config(tiny, shared_data), run)
  before, config_text = _listing(run), (run / "config.json").read_text()
  with pytest.raises(run_config.ResumeRefusedError, match=r"from checkpoint 2: model.latent_dim: 512 -> 256 changed"):
    train_lib.train_and_evaluate(_config(tiny, shared_data, **{"model.latent_dim": 256}), run)
  assert (run / "config.json").read_text() == config_text and _listing(run) == before
  # The launcher: one line on stderr, no traceback (orbax's or asyncio's), status 1.
  cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "laspar.py:runlocal")]
  cmd += ["--workdir", str(run)]
  cmd += [f"--config.model.backbone={tiny}", "--config.model.latent_dim=1024", "--config.model.query_max_len=16"]
  cmd += ["--config.model.doc_max_len=32", f"--config.data.collection={shared_data / 'scifact'}"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  err = [line for line in out.stderr.splitlines() if line.strip()]
  assert err[-1].startswith("error: cannot resume") and "model.latent_dim: 512 -> 1024" in err[-1], out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-3000:]
  assert (run / "config.json").read_text() == config_text


def test_changed_hyperparameter_resumes_says_so_and_keeps_each_config(tmp_path, tiny, shared_data, capsys):
  run = tmp_path / "run"
  train_lib.train_and_evaluate(_config(tiny, shared_data), run)
  capsys.readouterr()
  more = {"optim.lr": 2e-4, "train.total_steps": 4}
  out = train_lib.train_and_evaluate(_config(tiny, shared_data, **more), run)
  said = capsys.readouterr().out
  assert out["step"] == 4 and "resumed from checkpoint 2" in said
  assert "optim.lr: 0.0001 -> 0.0002" in said and "train.total_steps: 2 -> 4" in said
  first, second = (json.loads((run / f"config.{s}.json").read_text()) for s in (0, 2))
  assert first["optim"]["lr"] == 1e-4 and second["optim"]["lr"] == 2e-4
  assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 2e-4
  # Every step's metrics are logged, the first step after the resume included.
  steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
  assert [s for s in steps if s <= 4] == [1, 2, 3, 4], steps


def test_all_damaged_checkpoints_say_training_restarts(tmp_path, tiny, shared_data, capsys):
  run = tmp_path / "run"
  train_lib.train_and_evaluate(_config(tiny, shared_data), run)
  meta = run / "checkpoints" / "2" / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes()[:3])
  capsys.readouterr()
  out = train_lib.train_and_evaluate(_config(tiny, shared_data), run)
  said = capsys.readouterr().out
  assert out["step"] == 2 and "is damaged (set aside: 2 (" in said and "training restarts from step 0" in said


@pytest.mark.parametrize(
  "field,value,msg",
  [
    ("loss.regularizers.q_flops.weight", -1.0, r"config.loss.regularizers.q_flops.weight=-1.0: must be >= 0"),
    ("loss.temperature", 0.0, r"config.loss.temperature=0.0: must be > 0"),
    ("loss.reg_warmup_steps", -3, r"config.loss.reg_warmup_steps=-3: must be >= 0"),
    ("mesh.model", 0, r"config.mesh.model=0: must be >= 1, or -1"),
    ("data.neg_pool", 0, r"config.data.neg_pool=0: must be >= 1"),
    ("loss.doc_reg_weights", (0.5, -0.5), r"config.loss.doc_reg_weights=\(0.5, -0.5\)"),
  ],
)
def test_signed_values_refused_naming_the_field(tmp_path, field, value, msg):
  c = config_lib.update(laspar.get_config("runlocal"), {field: value})
  with pytest.raises(train_lib.RunRefusedError, match=msg):
    train_lib.train_and_evaluate(c, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()
