r"""Trains a sparse encoder: `python launch/train.py --config configs/laspar.py[:ARG] --workdir DIR`.

  --config.a.b=value     overrides any config field
  --jax_distributed      call jax.distributed.initialize() first (multi-host)

Killed runs resume from the latest checkpoint in DIR; SIGTERM saves one and
exits with status 143. See configs/laspar.py for the commands of each recipe.
"""
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from laspar_jax import train_lib  # noqa: E402  (importing it initialises no JAX backend)

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, tb, encoder, eval)")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "jax.distributed.initialize() (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(f"step {result['step']}  eval {result['eval']}  encoder {result['encoder']}", flush=True)
  if result["preempted"]:
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
