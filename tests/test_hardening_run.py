"""Run hardening: workdir lock, config validation, history rows, stale temporaries, folder permissions,
huge documents, empty corpora, encoder/index mismatch, launcher switches."""

import json
import os
import pathlib
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from laspar_jax import distributed_index, encode, evaluate, io_utils, metric_writers, teacher, train_lib, workdir_lock
from laspar_jax.tokenizer import Tokenizer
from configs import laspar

REPO = pathlib.Path(__file__).resolve().parents[1]


def _dead_pid():
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


# ----------------------------------------------------------------------------- workdir lock


def test_workdir_lock_refuses_second_holder_and_takes_over_dead_one(tmp_path):
  code = (
    "import sys, time; sys.path.insert(0, %r)\n"
    "from laspar_jax import workdir_lock\n"
    "with workdir_lock.workdir_lock(%r):\n  print('held', flush=True); time.sleep(600)\n" % (str(REPO), str(tmp_path))
  )
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
      with workdir_lock.workdir_lock(tmp_path):
        pass
    # train_and_evaluate fails fast, before it writes anything.
    c = laspar.get_config("runlocal")
    with pytest.raises(workdir_lock.WorkdirLockedError):
      train_lib.train_and_evaluate(c, tmp_path)
    assert not (tmp_path / "config.json").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.workdir_lock(tmp_path):  # the dead holder's lock is taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
  "field,value,msg",
  [
    ("model.latent_dim", -5, r"config.model.latent_dim=-5: must be >= 0"),
    ("optim.batch_size", 0, r"config.optim.batch_size=0: must be >= 1"),
    ("model.head", "latent_atention", r"config.model.head='latent_atention': must be one of"),
    ("optim.lr", -1e-3, r"config.optim.lr=-0.001: must be > 0"),
    ("eval.d_topk", 0, r"config.eval.d_topk=0"),
  ],
)
def test_config_validated_before_anything_is_written(tmp_path, field, value, msg):
  c = laspar.get_config("runlocal")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=msg):
    train_lib.train_and_evaluate(c, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()


def test_shipped_configs_pass_the_check():
  for arg in (None, "runlocal"):
    train_lib.check_config(laspar.get_config(arg))


# ----------------------------------------------------------------------------- history.jsonl


def test_history_rows_on_disk_at_once_and_resume_drops_later_rows(tmp_path):
  w = metric_writers.MetricWriter(tmp_path)
  for step in (2, 4, 6):
    w.write_scalars(step, {"train/loss": float(step)})
  # No close(): a kill -9 here keeps every row.
  rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6]
  with open(tmp_path / "history.jsonl", "a") as f:
    f.write('{"step": 8, "train/lo')  # a row torn by the kill
  w2 = metric_writers.MetricWriter(tmp_path, resume_step=4)  # restored checkpoint 4
  w2.write_scalars(6, {"train/loss": 6.5})
  w2.close()
  w.close()
  rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
  assert rows == [{"step": 2, "train/loss": 2.0}, {"step": 4, "train/loss": 4.0}, {"step": 6, "train/loss": 6.5}]


# ----------------------------------------------------------------------------- stale temporaries


def test_stale_encoder_and_teacher_tmp_folders_removed(tmp_path, monkeypatch):
  dead, alive = _dead_pid(), os.getppid()
  (tmp_path / f"encoder.tmp-{dead}").mkdir()
  (tmp_path / f"encoder.tmp-{alive}").mkdir()  # a live process's: kept
  with io_utils.atomic_directory(tmp_path / "encoder") as tmp:
    (tmp / "x").write_text("x")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder", f"encoder.tmp-{alive}"]
  # teacher caches: WORKDIR/teacher/{queries,docs}.tmp-<pid> of killed runs
  root = tmp_path / "teacher"
  (root / f"docs.tmp-{dead}").mkdir(parents=True)
  (root / f"queries.tmp-{dead}").mkdir()
  monkeypatch.setattr(teacher, "dense_embeddings", lambda *a, **k: None)
  teacher.teacher_embeddings(os.fspath(root), object(), None, [], progress=False)
  assert not list(root.iterdir())


def test_atomic_directory_gives_umask_permissions(tmp_path):
  with io_utils.atomic_directory(tmp_path / "enc") as tmp:
    (tmp / "params.safetensors").write_bytes(b"p")
    os.chmod(tmp / "params.safetensors", 0o600)  # as a tempfile-based writer leaves it
    (tmp / "config.json").write_text("{}")
  umask = os.umask(0)
  os.umask(umask)
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "enc").iterdir()}
  assert modes == {"params.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


# ----------------------------------------------------------------------------- encode / evaluate


def test_huge_document_cut_before_tokenizing(minilm_path):
  tok = Tokenizer.from_dir(minilm_path, max_length=64)
  seen = []
  real = tok._truncating_tokenizer  # pylint: disable=protected-access

  class Spy:
    def __init__(self, t):
      self.t = t

    def encode_batch(self, texts):
      seen.extend(len(x) for x in texts)
      return self.t.encode_batch(texts)

  tok._truncating_tokenizer = lambda n: Spy(real(n))  # pylint: disable=protected-access
  huge = "sparse retrieval of long documents " * 300_000  # 10 MB
  b = tok([huge, "short"], max_length=32)
  assert max(seen) <= 100 * 32
  ref = Tokenizer.from_dir(minilm_path, max_length=64)([huge[:5000], "short"], max_length=32)
  np.testing.assert_array_equal(b["input_ids"], ref["input_ids"])


class _NoDocs:
  name = "empty"
  num_docs = 0

  def docs(self):
    return iter(())


def test_empty_corpus_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="has no documents"):
    distributed_index.index_collection(object(), None, _NoDocs(), tmp_path / "ix", dim=16, progress=False)
  assert not (tmp_path / "ix").exists()


class _Index:
  path = "/ix"

  def __init__(self, encoder_hash, params=None):
    self.manifest = {"encoder_hash": encoder_hash, "metadata": {"encoder_params": params} if params else {}}


def test_encoder_mismatch_refused_unless_allowed(minilm_path, tmp_path):
  sys.path.insert(0, str(REPO / "tests"))
  import tiny_bert  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from laspar_jax.models import sparse_encoder  # pylint: disable=import-outside-toplevel

  path = tiny_bert.write_tiny_bert(tmp_path / "tiny", minilm_path)
  enc, _ = sparse_encoder.load_encoder(str(path), head="latent_attention", latent_dim=64)
  fp, digest = encode.encoder_fingerprint(enc), encode.params_digest(enc)
  evaluate.check_encoder_matches(enc, _Index(fp, digest))  # the same encoder
  evaluate.check_encoder_matches(enc, _Index(fp))  # an index without a parameter digest
  with pytest.raises(evaluate.EncoderMismatchError, match="config"):
    evaluate.check_encoder_matches(enc, _Index("0123456789abcdef", digest))
  # Same config, other weights (e.g. trained vs fresh): the parameter digest differs.
  param = jax_first_param(nnx, enc)
  param.set_value(param.get_value() + 1.0)
  with pytest.raises(evaluate.EncoderMismatchError, match="parameters differ.*allow_encoder_mismatch"):
    evaluate.check_encoder_matches(enc, _Index(fp, digest))
  evaluate.check_encoder_matches(enc, _Index(fp, digest), allow=True)


def jax_first_param(nnx, enc):
  return next(v for _, v in nnx.iter_graph(enc) if isinstance(v, nnx.Param))


def test_launchers_have_the_switches():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for script, want in (
    ("evaluate.py", ("--strict", "--verify", "--allow_encoder_mismatch", "--qrels_layout")),
    ("index.py", ("--strict", "--qrels_layout")),
    ("train.py", ("--strict",)),
  ):
    out = subprocess.run(
      [sys.executable, str(REPO / "launch" / script), "--helpfull"],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    ).stdout
    for flag in want:
      assert re.search(rf"--(\[no\])?{flag[2:]}:", out), (script, flag)
