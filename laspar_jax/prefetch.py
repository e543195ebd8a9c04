"""Device prefetch: the next step's batch is on the device while the current step runs.

`device_batches(pipe, accum, mesh)` turns the host pipeline (numpy batches,
built ahead in its own thread, `data.pipeline`) into global `jax.Array`s
(`mesh.put_batch`), `ahead` optimizer steps ahead of the loop. Each batch
comes with the pipeline state after it, so a checkpoint written after step
i records the data position of step i, not of the prefetched batch (a
resume replays exactly the batches the stopped run had not used).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh

from laspar_jax import mesh as mesh_lib
from laspar_jax.data import assemble


def device_batches(
  pipe: Any, accum: int, mesh: Mesh, ahead: int = 1
) -> Iterator[tuple[dict[str, jax.Array], dict[str, Any]]]:
  """Yields (batch on the device, pipeline state after it), `ahead` steps put ahead.

  Args:
    pipe: the training pipeline (an iterator of numpy batches with `get_state()`).
    accum: micro-batches per optimizer step (> 1: stacked on a leading axis).
    mesh: the device mesh the batch is sharded on ('data').
    ahead: steps put on the device before the loop asks for them (0: none).

  Returns:
    An iterator that ends when the pipeline does.
  """
  micro = assemble.micro_batches(pipe, accum)
  buf: collections.deque = collections.deque()
  while True:
    while len(buf) <= ahead:
      try:
        host = next(micro)
      except (StopIteration, RuntimeError) as e:  # micro_batches turns the pipeline's end into RuntimeError
        if isinstance(e, RuntimeError) and not isinstance(e.__cause__, StopIteration):
          raise
        break
      buf.append((mesh_lib.put_batch(host, mesh, accum > 1), pipe.get_state()))
    if not buf:
      return
    yield buf.popleft()


def one_ahead(items: Iterable[Any]) -> Iterator[Any]:
  """Yields item i only after item i + 1 has been taken from `items`.

  With items that dispatch device work when taken (e.g. `(rows, jitted(batch))`
  pairs), batch i + 1 is running on the device while the caller fetches and
  post-processes batch i: host and device work overlap.
  """
  it = iter(items)
  try:
    prev = next(it)
  except StopIteration:
    return
  for item in it:
    yield prev
    prev = item
  yield prev
