"""A clone without ../shared/data: SciFact through ir_datasets (`beir/scifact`); offline, one line naming
LASPAR_DATA and the ir_datasets id, before the workdir exists (the download is faked: no network wait)."""

import importlib

import pytest

from laspar_jax import train_lib
from laspar_jax.data import ir_datasets_source, sources


@pytest.fixture
def no_data_root(tmp_path, monkeypatch):
  monkeypatch.setenv("LASPAR_DATA", str(tmp_path / "no_such_root"))
  from configs import common, laspar  # pylint: disable=import-outside-toplevel

  importlib.reload(common)
  yield importlib.reload(laspar)
  monkeypatch.delenv("LASPAR_DATA")
  importlib.reload(common)
  importlib.reload(laspar)


def test_missing_folder_reads_scifact_through_ir_datasets(no_data_root):
  c = no_data_root.get_config("runlocal")
  assert (c.data.collection, c.data.split) == ("beir/scifact", "train")
  assert c.eval.collection == "beir/scifact" and sources.irds_id(c.eval.collection, c.eval.split or None) == (
    "beir/scifact/test"
  )


def test_offline_stops_in_one_line_before_the_workdir(no_data_root, tmp_path, monkeypatch):
  calls = []

  def offline(ds):
    calls.append(ds)
    raise ConnectionError("Failed to resolve 'public.ukp.informatik.tu-darmstadt.de'")

  monkeypatch.setattr(ir_datasets_source, "_fetch", offline)
  with pytest.raises(train_lib.RunRefusedError) as e:
    train_lib.train_and_evaluate(no_data_root.get_config("runlocal"), tmp_path / "run")
  msg = str(e.value)
  assert "\n" not in msg and "'beir/scifact/train'" in msg and "LASPAR_DATA" in msg and "offline" in msg, msg
  assert calls and not (tmp_path / "run").exists()


def test_cached_dataset_passes_the_check(monkeypatch):
  monkeypatch.setattr(ir_datasets_source, "_fetch", lambda ds: None)  # e.g. already in ~/.ir_datasets
  sources.check_available("beir/scifact", split="test")


def test_missing_folder_named(tmp_path):
  with pytest.raises(sources.DataUnavailableError, match=r"no_such: no such folder"):
    sources.check_available(str(tmp_path / "no_such"))
