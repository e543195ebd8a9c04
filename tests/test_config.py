"""Config args (big_vision style), the configs package, runlocal/scifact recipes, command-line overrides."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import common, laspar, splade  # noqa: E402

from laspar_jax import config_lib, mesh as mesh_lib, train_lib, train_step  # noqa: E402
from laspar_jax.data import ir_datasets_source  # noqa: E402

SCIFACT = os.path.normpath(REPO.parent / "shared" / "data" / "scifact")


def _reg(name, side, weight):
  return {"name": name, "side": side, "weight": weight}


def test_parse_arg_types_flags_and_errors():
  a = config_lib.parse_arg(
    "variant=latent_sum,D=131072,runlocal,lr=3e-4,name=x",
    variant="latent_attention",
    D=2**22,
    runlocal=False,
    lr=1e-4,
    name="",
  )
  assert (a.variant, a.D, a.runlocal, a.lr, a.name) == ("latent_sum", 131072, True, 3e-4, "x")
  assert isinstance(a.D, int) and isinstance(a.lr, float)
  assert config_lib.parse_arg(None, D=4).D == 4
  assert config_lib.parse_arg("D=1e3", D=4).D == 1000
  assert config_lib.parse_arg("flag=false", flag=True).flag is False
  with pytest.raises(ValueError, match="unknown config arg 'Dx'"):
    config_lib.parse_arg("Dx=3", D=4)
  with pytest.raises(ValueError, match="expected an integer"):
    config_lib.parse_arg("D=abc", D=4)
  with pytest.raises(ValueError, match="needs a value"):
    config_lib.parse_arg("D", D=4)
  assert not hasattr(config_lib, "RUNLOCAL") and not hasattr(config_lib, "runlocal")


def test_laspar_paper_defaults():
  c = laspar.get_config()
  assert c.model.backbone == "microsoft/MiniLM-L12-H384-uncased"
  assert (c.model.head, c.model.latent_dim, c.model.doc_max_len) == ("latent_attention", 4_194_304, 256)
  assert (c.optim.batch_size, c.optim.accum_steps, c.optim.lr, c.optim.warmup_steps) == (32, 8, 1e-4, 4000)
  assert (c.optim.head_lr_mult, c.optim.freeze) == (1.0, ())
  assert c.loss.regularizers.to_dict() == {
    "q_flops": _reg("flops", "q", 5e-3),
    "d_flops": _reg("flops", "d", 5e-3),
    "d_equipartition": _reg("equipartition", "d", 5e-3),
  }
  assert c.loss.reg_warmup_steps == 10_000
  assert (c.data.teacher, c.loss.distill) == ("dense", "dense_kl")
  assert ir_datasets_source.irds_id(c.data.collection, c.data.split) == "msmarco-passage/train/judged"
  assert laspar.get_config("data=scifact").data.split == "train"
  assert (c.train.q_topk, c.train.d_topk, c.eval.q_topk, c.eval.d_topk) == (128, 512, 128, 512)
  assert (c.train.total_steps, c.eval.collection) == (100_000, "msmarco-passage/dev/small")
  assert "topk_mode" not in c.train
  assert (c.mesh.data, c.mesh.model, c.data.batching) == (-1, 1, "random")
  assert mesh_lib.rules_from_config(c) == mesh_lib.DEFAULT_RULES


def test_runlocal_key_values():
  r = laspar.get_config("runlocal")
  assert r.model.backbone == "sentence-transformers/all-MiniLM-L6-v2"
  assert (r.model.latent_dim, r.model.query_max_len, r.model.doc_max_len) == (2**14, 32, 64)
  assert (r.optim.batch_size, r.optim.accum_steps, r.optim.lr, r.optim.warmup_steps) == (8, 1, 1e-4, 2)
  assert r.optim.head_lr_mult == 1.0
  assert (r.train.total_steps, r.train.log_every, r.train.checkpoint_every, r.train.eval_every) == (10, 2, 5, 0)
  assert r.loss.reg_warmup_steps == 5 and set(r.loss.regularizers) == {"q_flops", "d_flops", "d_equipartition"}
  assert r.data.collection == r.eval.collection == SCIFACT
  assert (r.data.split, r.eval.split, r.eval.max_docs, r.eval.max_queries) == ("train", "", 0, 0)
  assert laspar.get_config("runlocal,D=4096").model.latent_dim == 4096  # an explicit D wins
  assert laspar.get_config("runlocal,data=/x/y").data.collection == "/x/y"


def test_scifact_key_values():
  s = laspar.get_config("scifact")
  assert (s.model.backbone, s.model.head) == ("sentence-transformers/all-MiniLM-L6-v2", "latent_attention")
  assert (s.model.latent_dim, s.model.doc_max_len, s.model.head_kwargs.kernel_std) == (2**17, 192, 1.0)
  assert (s.optim.lr, s.optim.head_lr_mult, s.optim.warmup_steps, s.optim.accum_steps) == (5e-5, 20.0, 10, 1)
  assert (s.train.total_steps, s.train.checkpoint_every, s.loss.reg_warmup_steps) == (80, 40, 50)
  assert s.loss.regularizers.q_flops.weight == 5e-3 and s.loss.regularizers.d_equipartition.weight == 5e-3
  assert (s.data.collection, s.eval.collection, s.eval.split) == (SCIFACT, SCIFACT, "test")
  assert (s.eval.measures, s.data.teacher) == ("nDCG@10,RR@10,R@100", "dense")
  both = laspar.get_config("scifact,runlocal")  # runlocal shrinks the recipe
  assert (both.model.latent_dim, both.optim.lr, both.optim.head_lr_mult, both.train.total_steps) == (
    2**14,
    5e-5,
    20.0,
    10,
  )


def test_variants():
  c = laspar.get_config("variant=latent_max,reg=l1,equipartition=False,D=65536")
  assert (c.model.head, c.model.latent_dim, c.model.head_kwargs.tile) == ("latent_max", 65536, 4096)
  assert c.loss.regularizers.to_dict() == {"q_l1": _reg("l1", "q", 5e-3), "d_l1": _reg("l1", "d", 5e-3)}
  assert laspar.get_config("data=scifact").data.collection == SCIFACT


def test_splade_key_values():
  p = splade.get_config()
  assert (p.model.backbone, p.model.head, p.model.latent_dim) == ("distilbert/distilbert-base-uncased", "mlm", 0)
  assert p.model.head_kwargs.to_dict() == {"pooling": "max"}
  assert p.loss.regularizers.to_dict() == {"q_flops": _reg("flops", "q", 3e-4), "d_flops": _reg("flops", "d", 1e-4)}
  assert (p.loss.reg_warmup_steps, p.optim.lr, p.train.total_steps) == (50_000, 1e-4, 100_000)
  assert (p.train.q_topk, p.train.d_topk, p.eval.q_topk, p.eval.d_topk) == (0, 0, 256, 1024)
  r = splade.get_config("runlocal")
  assert (r.model.backbone, r.model.head, r.loss.reg_warmup_steps) == (
    "sentence-transformers/all-MiniLM-L6-v2",
    "mlm",
    5,
  )
  assert (r.optim.batch_size, r.train.total_steps, r.data.collection) == (8, 10, SCIFACT)
  s = splade.get_config("scifact")
  assert (s.model.backbone, s.loss.reg_warmup_steps, s.optim.head_lr_mult) == (
    "sentence-transformers/all-MiniLM-L6-v2",
    50_000,
    20.0,
  )
  assert set(splade.get_config("reg=l1").loss.regularizers) == {"q_l1", "d_l1"}


def test_data_root_env_override(monkeypatch, tmp_path):
  (tmp_path / "scifact").mkdir()
  monkeypatch.setenv(common.DATA_ENV, str(tmp_path))
  assert laspar.get_config("runlocal").data.collection == str(tmp_path / "scifact")
  monkeypatch.setenv(common.DATA_ENV, str(tmp_path / "missing"))  # no folder: the ir_datasets id
  assert laspar.get_config("runlocal").data.collection == "beir/scifact"
  monkeypatch.delenv(common.DATA_ENV)
  assert common.data_path("scifact") == SCIFACT


def test_regularizers_and_config_check():
  c = laspar.get_config("runlocal")
  assert train_step.regularizers_from_config(c.loss.regularizers) == (
    ("flops", "q", 5e-3),
    ("flops", "d", 5e-3),
    ("equipartition", "d", 5e-3),
  )
  train_lib.check_config(c)
  c.data.teacher = "none"
  with pytest.raises(ValueError, match="needs data.teacher='dense'"):
    train_lib.check_config(c)


def test_command_line_overrides_from_any_directory(tmp_path):
  """`--config FILE:ARG --config.a.b=v` as the launchers parse it, run outside the repository."""
  code = (
    f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    "from absl import flags; from ml_collections import config_flags\n"
    "config_flags.DEFINE_config_file('config', None, '')\n"
    "flags.FLAGS(sys.argv)\n"
    "c = flags.FLAGS.config\n"
    "print(c.model.head, c.train.total_steps, c.model.latent_dim, repr(c.loss.distill), c.data.collection,\n"
    "      *c.optim.freeze)\n"
  )
  for name in ("laspar.py", "splade.py"):
    out = subprocess.run(
      [
        sys.executable,
        "-c",
        code,
        f"--config={REPO / 'configs' / name}:runlocal,variant=latent_sum",
        "--config.train.total_steps=3",
        "--config.model.latent_dim=1024",
        "--config.loss.distill=",
        "--config.optim.freeze=('backbone/.*',)",
      ],
      capture_output=True,
      text=True,
      check=True,
      cwd=tmp_path,
    ).stdout
    head = "latent_sum" if name == "laspar.py" else "mlm"
    assert out.split() == [head, "3", "1024", "''", SCIFACT, "backbone/.*"]


def test_new_training_fields_default_off_and_checks():
  """loss.doc_reg_weights, optim.schedule='cosine', data.teacher_calibration, data.negatives='scores'."""
  c = common.with_defaults(laspar.get_config("runlocal"))
  assert c.loss.doc_reg_weights == () and c.data.teacher_calibration == "none"
  assert c.data.teacher_calibration_reference == ""
  assert common.with_defaults(c).to_dict() == c.to_dict()  # idempotent, never overrides a set field
  train_lib.check_config(c)
  c.optim.schedule = "cosine"
  train_lib.check_config(c)
  c.optim.schedule = "cosine_restarts"
  with pytest.raises(ValueError, match="optim.schedule='cosine_restarts'"):
    train_lib.check_config(c)
  c.optim.schedule = "linear"
  c.loss.doc_reg_weights = (0.25, 0.75)  # in-batch only (n_neg = 0): a clear error, no silent fall-back
  with pytest.raises(ValueError, match=r"loss.doc_reg_weights=\(0.25, 0.75\).*data.n_neg >= 1"):
    train_lib.check_config(c)
  c.data.negatives, c.data.n_neg = "bm25", 1
  train_lib.check_config(c)
  c.loss.doc_reg_weights = (0.5,)
  with pytest.raises(ValueError, match="loss.doc_reg_weights"):
    train_lib.check_config(c)
  c.loss.doc_reg_weights = ()
  # MarginMSE from a score file, negatives from its scored documents, RankLLaMA calibrated to MiniLM.
  c.loss.distill, c.data.teacher, c.data.negatives = "margin_mse", "scores", "scores"
  with pytest.raises(ValueError, match="data.teacher='scores' needs data.teacher_scores"):
    train_lib.check_config(c)
  c.data.teacher_scores = "/data/rankllama.pkl.gz"
  train_lib.check_config(c)
  c.data.teacher_calibration = "per_query"
  with pytest.raises(ValueError, match="needs data.teacher_calibration_reference"):
    train_lib.check_config(c)
  c.data.teacher_calibration_reference = "/data/minilm_ce.pkl.gz"
  train_lib.check_config(c)
  c.data.teacher_calibration = "minmax"
  with pytest.raises(ValueError, match="data.teacher_calibration='minmax'"):
    train_lib.check_config(c)
  c.data.teacher_calibration = "global"
  c.loss.distill, c.data.teacher = "dense_kl", "dense"
  with pytest.raises(ValueError, match="negatives='scores' needs data.teacher='scores'"):
    train_lib.check_config(c)
  c.data.negatives = "bm25"
  with pytest.raises(ValueError, match="teacher_calibration='global' needs data.teacher='scores'"):
    train_lib.check_config(c)
  # Existing configs keep their numbers: with_defaults only adds the new fields.
  for cfg in (laspar.get_config(), laspar.get_config("scifact"), splade.get_config("runlocal")):
    before = cfg.to_dict()
    after = common.with_defaults(cfg).to_dict()
    assert {
      k: {f: v for f, v in sec.items() if f in before.get(k, {})} if isinstance(sec, dict) else sec
      for k, sec in after.items()
    } == before


def test_doc_reg_weights_on_the_command_line(tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
    f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    "from configs import common, laspar\n"
    "def get_config(arg=None):\n  return common.with_defaults(laspar.get_config(arg))\n"
  )
  code = (
    "from absl import flags; from ml_collections import config_flags; import sys\n"
    "config_flags.DEFINE_config_file('config', None, '')\n"
    "flags.FLAGS(sys.argv)\n"
    "c = flags.FLAGS.config\n"
    "print(tuple(c.loss.doc_reg_weights), c.optim.schedule, c.data.teacher_calibration)\n"
  )
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      code,
      f"--config={cfg}:runlocal",
      "--config.loss.doc_reg_weights=(0.25,0.75)",
      "--config.optim.schedule=cosine",
      "--config.data.teacher_calibration=per_query",
    ],
    capture_output=True,
    text=True,
    check=True,
    cwd=tmp_path,
  ).stdout
  assert out.split() == ["(0.25,", "0.75)", "cosine", "per_query"]


def test_vocabulary_configs_pass_the_checks_and_latent_heads_need_a_width():
  """configs/splade.py sets latent_dim 0 (unused by the mlm head): valid; a latent head with 0 is not."""
  for arg in (None, "scifact", "runlocal"):
    train_lib.check_config(splade.get_config(arg))
  c = laspar.get_config("runlocal")
  c.model.latent_dim = 0
  with pytest.raises(ValueError, match="latent_dim=0: the 'latent_attention' head needs >= 1"):
    train_lib.check_config(c)
  assert "doc_reg_weights" in c.loss and "teacher_calibration" in c.data  # common.with_defaults
