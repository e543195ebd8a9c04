"""Flags of multi-host runs, shared by launch/train.py, launch/index.py and launch/evaluate.py.

  --jax_distributed          connect the processes (`jax.distributed.initialize`) before anything else
  --coordinator_address      host:port of process 0 (else $JAX_COORDINATOR_ADDRESS, else detected:
                             TPU VM, SLURM, Open MPI)
  --num_processes            P (else $JAX_NUM_PROCESSES, else detected)
  --process_id               this process's index (else $JAX_PROCESS_ID, else detected)

Two processes on one machine (4 CPU devices each, one mesh of 8; tests/test_multihost.py does this):

  for i in 0 1; do
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python launch/train.py \
        --config configs/laspar.py:runlocal --workdir /tmp/mh --jax_distributed \
        --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=$i &
  done; wait

Imported by the launchers as a sibling module (Python puts a script's folder on sys.path).
"""

from absl import flags

from laspar_jax import distributed

DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "jax.distributed.initialize() first (multi-host)")
COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS or detected)"
)
NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "number of processes (default: $JAX_NUM_PROCESSES or detected)"
)
PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (default: $JAX_PROCESS_ID or detected)")
HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout_seconds", None, "stop the other processes when one is silent this long (default: JAX's)"
)


def initialize() -> None:
  """Calls `distributed.initialize` with the flags when --jax_distributed is given."""
  if DISTRIBUTED.value:
    distributed.initialize(
      COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value, heartbeat_timeout_seconds=HEARTBEAT.value
    )
