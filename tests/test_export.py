"""Export: a self-contained folder that reloads to the same encoder, a model card, Hub upload (mocked only)."""

import contextlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from configs import laspar  # noqa: E402
from laspar_jax import export  # noqa: E402
from laspar_jax.models import sparse_encoder  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ["what causes scurvy?", "vitamin C deficiency leads to scurvy in sailors"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, minilm_path):
  """A training-workdir-like folder: encoder/ (tiny BERT + latent head), config.json, eval/<step>/metrics.json."""
  root = tmp_path_factory.mktemp("export")
  tiny = tiny_bert.write_tiny_bert(root / "bert", minilm_path)
  enc, tok = sparse_encoder.load_encoder(tiny, head="latent_attention", latent_dim=64)
  workdir = root / "run"
  sparse_encoder.save_encoder(enc, tok, workdir / "encoder")
  (workdir / "config.json").write_text(laspar.get_config("runlocal").to_json_best_effort(indent=2))
  for step, ndcg in ((5, 0.25), (10, 0.5)):
    (workdir / "eval" / str(step)).mkdir(parents=True)
    (workdir / "eval" / str(step) / "metrics.json").write_text(
      json.dumps({"nDCG@10": ndcg, "R@100": 0.75, "active_q": 12.0})
    )
  return workdir, enc, tok


def _reps(enc, tok):
  b = tok(TEXTS, max_length=16)
  return [np.asarray(enc(b["input_ids"], b["attention_mask"], kind=kind)) for kind in ("query", "doc")]


def _front_matter(card):
  m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
  assert m, card[:200]
  return m.group(1)


def test_export_workdir_reloads_and_has_card(saved, tmp_path):
  workdir, enc, tok = saved
  out = pathlib.Path(export.export_workdir(workdir, tmp_path / "laspar-tiny"))
  for name in (
    sparse_encoder.CONFIG_NAME,
    sparse_encoder.PARAMS_NAME,
    "config.json",
    "tokenizer.json",
    "vocab.txt",
    "README.md",
    "training_config.json",
    "metrics.json",
  ):
    assert (out / name).is_file(), name
  assert not list(tmp_path.glob("*.tmp-*"))

  enc2, tok2 = sparse_encoder.load_encoder(out)
  for want, got in zip(_reps(enc, tok), _reps(enc2, tok2)):
    np.testing.assert_array_equal(got, want)

  card = (out / "README.md").read_text()
  front = _front_matter(card)
  assert "library_name: laspar_jax" in front
  for tag in ("- sparse-retrieval", "- learned-sparse-retrieval", "- latent_attention"):
    assert tag in front
  assert re.search(r'^datasets:\n- "scifact"', front, re.M), front
  assert '- "nDCG@10"' in front and '- "R@100"' in front and "active_q" not in front
  assert 'base_model: "sentence-transformers/all-MiniLM-L6-v2"' in front
  # The latest evaluation (step 10), as a table, and the recipe.
  assert "| nDCG@10 | 0.5 |" in card and "| R@100 | 0.75 |" in card and "| active_q | 12 |" in card
  assert "at training step 10" in card and "on `scifact`" in card
  assert "/shared/data" not in card  # no local paths published
  exported_cfg = json.loads((out / sparse_encoder.CONFIG_NAME).read_text())
  assert exported_cfg["backbone"] == "sentence-transformers/all-MiniLM-L6-v2"
  saved_cfg = json.loads((workdir / "encoder" / sparse_encoder.CONFIG_NAME).read_text())
  assert {k: v for k, v in exported_cfg.items() if k != "backbone"} == {
    k: v for k, v in saved_cfg.items() if k != "backbone"
  }
  assert "| head | latent_attention |" in card and "| latent dims D | 16384 |" in card
  assert json.loads((out / "metrics.json").read_text())["nDCG@10"] == 0.5
  assert json.loads((out / "training_config.json").read_text())["model"]["head"] == "latent_attention"


def test_card_usage_snippet_runs(saved, tmp_path, monkeypatch):
  workdir, _, _ = saved
  out = pathlib.Path(export.export_encoder(workdir / "encoder", tmp_path / "plain", metrics={"nDCG@10": 0.5}))
  card = (out / "README.md").read_text()
  assert "training_config" not in card and not (out / "training_config.json").exists()
  assert str(workdir.parent) not in card  # the backbone is named by its folder's name, not its path
  assert json.loads((out / sparse_encoder.CONFIG_NAME).read_text())["backbone"] == "bert"
  snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
  monkeypatch.chdir(tmp_path)  # the snippet names the folder relative to its parent
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    exec(compile(snippet, "README.md", "exec"), {})  # pylint: disable=exec-used
  assert buf.getvalue().strip().startswith("[")


def test_push_to_hub_uses_hfapi(saved, tmp_path, monkeypatch):
  workdir, _, _ = saved
  calls = []

  class FakeApi:
    def create_repo(self, repo_id, **kw):
      calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
      calls.append(("upload_folder", kw["repo_id"], sorted(os.listdir(kw["folder_path"]))))

  monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FakeApi))
  out = export.export_workdir(workdir, tmp_path / "pushed", repo_id="someone/laspar-tiny", push_to_hub=True)
  assert [c[:2] for c in calls] == [("create_repo", "someone/laspar-tiny"), ("upload_folder", "someone/laspar-tiny")]
  assert "README.md" in calls[1][2] and sparse_encoder.PARAMS_NAME in calls[1][2]
  card = (pathlib.Path(out) / "README.md").read_text()
  assert 'snapshot_download("someone/laspar-tiny")' in card and card.count("# laspar-tiny") == 1


def test_push_to_hub_errors(saved, tmp_path, monkeypatch):
  workdir, _, _ = saved
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'laspar_jax\[hub\]'"):
    export.export_workdir(workdir, tmp_path / "x", repo_id="a/b", push_to_hub=True)
  assert not (tmp_path / "x").exists()  # nothing written before the error
  with pytest.raises(ValueError, match="repo_id"):
    export.export_workdir(workdir, tmp_path / "x", push_to_hub=True)
  with pytest.raises(FileNotFoundError, match="not a saved encoder"):
    export.export_encoder(tmp_path, tmp_path / "y")


def test_launcher(saved, tmp_path):
  workdir, _, _ = saved
  out = tmp_path / "cli"
  proc = subprocess.run(
    [sys.executable, str(REPO / "launch" / "export.py"), f"--workdir={workdir}", f"--out={out}"],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported to {out}" in proc.stdout
  assert "| nDCG@10 | 0.5 |" in (out / "README.md").read_text()


def test_model_card_titled_with_the_model_name():
  cfg = {"head": "latent_attention", "latent_dim": 131072, "backbone": "/x/all-MiniLM-L6-v2"}
  recipe = {"model": {"backbone": "sentence-transformers/all-MiniLM-L6-v2"}, "data": {"collection": "/d/scifact"}}
  name = export.model_name(cfg, recipe)
  assert name == "laspar-latent-attention-D131072-all-MiniLM-L6-v2-scifact"
  card = export.model_card(cfg, folder_name="out_folder", recipe=recipe)
  assert f"# {name}\n" in card and "# out_folder" not in card
