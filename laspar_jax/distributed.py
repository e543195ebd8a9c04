"""Multi-process JAX (`jax.distributed`): start-up, each host's share of a corpus, barriers.

The engine is JAX's own multi-controller runtime: every host runs the same
program, `jax.distributed.initialize` connects them through a coordinator, and
`jax.devices()` then lists the devices of all hosts (process 0's first), so
one mesh spans them. On TPU VMs and SLURM every argument of `initialize` is
detected; elsewhere give them explicitly or through the environment:

  JAX_COORDINATOR_ADDRESS=host:port   (read by JAX itself)
  JAX_NUM_PROCESSES=P, JAX_PROCESS_ID=p (read here)

On CPU the hosts exchange collectives through gloo (TCP):
`jax_cpu_collectives_implementation="gloo"` is set before the backend starts.

Shares. Training: `data.pipeline.TrainPipeline` gives host p rows
[p*B/P, (p+1)*B/P) of every global batch, and `mesh.put_batch` assembles them
(the mesh lists process 0's devices first, so the global batch is the same as
on one host). Indexing: `corpus_share` gives host p a contiguous block of
documents aligned to the encoder's windows, so every document is encoded in
the same batch, with the same padding, as on one host (`distributed_index`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental import multihost_utils

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "")
  return int(value) if value.strip() else None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  cpu_collectives: str = "gloo",
  heartbeat_timeout_seconds: int | None = None,
  **kwargs: Any,
) -> None:
  """`jax.distributed.initialize`, with process count/id also read from the environment.

  Must run before any JAX computation. Arguments left None are taken from
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else detected
  by JAX (TPU VM, SLURM, Open MPI, Kubernetes).

  Args:
    coordinator_address: "host:port" of process 0's coordinator.
    num_processes: P.
    process_id: this process's index in [0, P).
    cpu_collectives: collectives of the CPU backend across processes ("gloo" or "mpi").
    heartbeat_timeout_seconds: how long the coordinator waits for a silent
      (e.g. killed) process before stopping the others (None: JAX's default).
    **kwargs: more `jax.distributed.initialize` arguments.
  """
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if heartbeat_timeout_seconds is not None:
    kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_seconds)
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
  )


def is_lead() -> bool:
  """True on process 0 (the one that writes logs, configs and merged outputs)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Blocks until every process reaches the barrier `name` (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def share(n: int, index: int, count: int, align: int = 1) -> tuple[int, int]:
  """Host `index` of `count`'s contiguous block [lo, hi) of n items, cut at multiples of `align`.

  The blocks cover [0, n) in order; they differ in size by at most one
  `align` unit (the last one may be shorter, and some may be empty when n
  is small).

  Args:
    n: number of items.
    index: this host's index in [0, count).
    count: number of hosts.
    align: block boundaries are multiples of this (e.g. an encoder window).

  Returns:
    (lo, hi).
  """
  if not 0 <= index < count:
    raise ValueError(f"process index {index} not in [0, {count})")
  units = -(-n // align)
  lo, hi = (units * index) // count * align, (units * (index + 1)) // count * align
  return min(lo, n), min(hi, n)
