"""notebooks/*.ipynb: stored without outputs; executed from a clean kernel with the small settings.

Each notebook's first cell is its parameters (tag "parameters"); LASPAR_NB_SMALL=1
switches them to the smoke settings (tiny D, a cut corpus, a couple of steps).
"""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = ("quickstart.ipynb", "train.ipynb")


def _execute(name, tmp_path, monkeypatch):
  """Runs a notebook in a fresh python3 kernel (cwd notebooks/); any cell error raises."""
  monkeypatch.setenv("LASPAR_NB_SMALL", "1")
  monkeypatch.setenv("LASPAR_NB_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("LASPAR_NB_PLOT", str(tmp_path / "plot.png"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # One CPU device in the kernel: a notebook runs on whatever the runtime has (8 virtual
  # devices only add compile time on 2 cores; sharding is tested elsewhere).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": NB_DIR}}).execute()
  return nb


def _stdout(nb):
  return "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.get("output_type") == "stream" and o.get("name") == "stdout"
  )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs_and_parameters_first(name):
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), name
  assert "parameters" in code[0].metadata.get("tags", []) and "LASPAR_NB_SMALL" in code[0].source


def test_quickstart_runs(tmp_path, monkeypatch):
  nb = _execute("quickstart.ipynb", tmp_path, monkeypatch)
  out = _stdout(nb)
  m = re.search(r"^nDCG@10 = (\S+)$", out, re.M)
  assert m, out[-2000:]
  assert 0.0 <= float(m.group(1)) <= 1.0
  assert (tmp_path / "plot.png").stat().st_size > 1000


def test_train_runs(tmp_path, monkeypatch):
  nb = _execute("train.ipynb", tmp_path, monkeypatch)
  out = _stdout(nb)
  assert re.search(r"^nDCG@10 = [01]\.\d+$", out, re.M), out[-2000:]
  assert (tmp_path / "work" / "export").is_dir() and (tmp_path / "work" / "history.jsonl").exists()
