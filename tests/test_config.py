"""Config args (big_vision style), the configs' defaults, runlocal, command-line overrides."""
import pathlib
import sys

import pytest

from laspar_jax import config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
sys.path.insert(0, str(CONFIGS))
import laspar  # noqa: E402
import splade  # noqa: E402


def test_parse_arg_types_flags_and_errors():
  a = config_lib.parse_arg("variant=latent_sum,D=131072,runlocal,lr=3e-4,name=x",
                           variant="latent_attention", D=2 ** 22, runlocal=False, lr=1e-4, name="")
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


def test_laspar_paper_defaults():
  c = laspar.get_config()
  assert c.model.backbone == "microsoft/MiniLM-L12-H384-uncased"
  assert (c.model.head, c.model.latent_dim, c.model.doc_max_len) == ("latent_attention", 4_194_304, 256)
  assert (c.optim.batch_size, c.optim.accum_steps, c.optim.lr, c.optim.warmup_steps) == (32, 8, 1e-4, 4000)
  assert c.loss.regularizers == "flops:q:5e-3,flops:d:5e-3,equipartition:d:5e-3"
  assert c.loss.reg_warmup_steps == 10_000
  assert (c.data.teacher, c.loss.distill) == ("dense", "dense_kl")
  assert (c.train.q_topk, c.train.d_topk, c.eval.q_topk, c.eval.d_topk) == (128, 512, 128, 512)


def test_variants_runlocal_and_scifact():
  c = laspar.get_config("variant=latent_max,reg=l1,equipartition=False,D=65536")
  assert (c.model.head, c.model.latent_dim, c.loss.regularizers) == ("latent_max", 65536, "l1:q:5e-3,l1:d:5e-3")
  r = laspar.get_config("runlocal")
  assert r.model.backbone == "sentence-transformers/all-MiniLM-L6-v2"
  assert r.model.latent_dim == 2 ** 14 and r.train.total_steps <= 20 and r.optim.accum_steps == 1
  assert r.data.collection == "../shared/data/scifact"
  assert laspar.get_config("runlocal,D=4096").model.latent_dim == 4096
  s = laspar.get_config("scifact")
  assert (s.model.latent_dim, s.model.head, s.eval.split, s.data.teacher) == (2 ** 17, "latent_attention", "test", "dense")
  sp = splade.get_config("runlocal")
  assert sp.model.head == "mlm" and sp.loss.regularizers.startswith("flops:q:")


def test_regularizer_spec_and_config_check():
  from laspar_jax import train_lib
  assert train_lib.parse_regularizers("flops:q:5e-3,equipartition:d:1") == (
      ("flops", "q", 5e-3), ("equipartition", "d", 1.0))
  with pytest.raises(ValueError, match="bad regularizer"):
    train_lib.parse_regularizers("flops:x:1")
  c = laspar.get_config("runlocal")
  train_lib.check_config(c)
  c.data.teacher = "none"
  with pytest.raises(ValueError, match="needs data.teacher='dense'"):
    train_lib.check_config(c)


def test_command_line_overrides():
  """`--config FILE:ARG --config.a.b=v` as launch/train.py parses it (absl + ml_collections)."""
  import subprocess
  code = ("from absl import flags; from ml_collections import config_flags; import sys\n"
          "config_flags.DEFINE_config_file('config', None, '')\n"
          "flags.FLAGS(sys.argv)\n"
          "c = flags.FLAGS.config\n"
          "print(c.model.head, c.train.total_steps, c.model.latent_dim, repr(c.loss.distill))\n")
  out = subprocess.run([sys.executable, "-c", code, f"--config={CONFIGS / 'laspar.py'}:runlocal,variant=latent_sum",
                        "--config.train.total_steps=3", "--config.model.latent_dim=1024", "--config.loss.distill="],
                       capture_output=True, text=True, check=True, cwd=CONFIGS.parent).stdout
  assert out.split() == ["latent_sum", "3", "1024", "''"]
