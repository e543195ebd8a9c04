r"""Trains a sparse encoder: `python launch/train.py --config configs/laspar.py[:ARG] --workdir DIR`.

  --config.a.b=value     overrides any config field
  --jax_distributed      call jax.distributed.initialize() first (multi-host; with --coordinator_address,
                         --num_processes, --process_id where not detected: launch/distributed_flags.py)
  --strict               malformed collection files are errors (naming file and line), not warnings

Killed runs resume from the latest intact checkpoint in DIR (damaged ones are set aside); SIGTERM saves one and
exits with status 143. See configs/laspar.py for the commands of each recipe.
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from laspar_jax import train_lib  # noqa: E402  (importing it initialises no JAX backend)
import distributed_flags  # noqa: E402  (launch/distributed_flags.py: --jax_distributed and its flags)

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, tb, encoder, eval)")
_STRICT = flags.DEFINE_bool(
  "strict",
  False,
  "a training or evaluation collection file breaking its format "
  "is an error naming the file and line (default: documented rules, warnings)",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  distributed_flags.initialize()
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  if _STRICT.value:
    with config.unlocked():
      config.data.strict = config.eval.strict = True
  try:
    result = train_lib.train_and_evaluate(config, _WORKDIR.value)
  except train_lib.RunRefusedError as e:  # a bad config, a refused resume, missing data: one line, no traceback
    sys.exit(f"error: {e}")
  print(f"step {result['step']}  eval {result['eval']}  encoder {result['encoder']}", flush=True)
  if result["preempted"]:
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
