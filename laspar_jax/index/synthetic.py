"""Deterministic synthetic learned-sparse collections for tests and benchmarks.

Dims are drawn from a Zipf-like law p(rank r) ~ 1 / (r + shift)^a over a
random permutation of the D dims; each document draws enough dims (with
replacement, duplicates dropped) to average `doc_len` distinct dims; weights
are log-normal. Queries use the same law with `query_len` dims. Every batch
is generated from its own seed, so any batch is reproducible on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  n_docs: int = 1_000_000
  dim: int = 30_522
  doc_len: float = 160.0
  n_queries: int = 1_000
  query_len: float = 30.0
  zipf_a: float = 1.0
  zipf_shift: float = 20.0
  seed: int = 0


class SyntheticCollection:
  """Docs as (doc_ids, idx_bk, val_bk) batches, queries as (idx_bk, val_bk)."""

  def __init__(self, spec: SyntheticSpec):
    self.spec = spec
    rng = np.random.default_rng([spec.seed, 0])
    ranks = np.arange(spec.dim, dtype=np.float64)
    p = (ranks + spec.zipf_shift) ** (-spec.zipf_a)
    self.p_rank = p / p.sum()
    self.cdf = np.cumsum(self.p_rank)
    self.cdf[-1] = 1.0
    self.perm = rng.permutation(spec.dim).astype(np.int32)
    self.doc_draws = self._draws_for(spec.doc_len)
    self.query_draws = self._draws_for(spec.query_len)

  def _draws_for(self, distinct: float) -> int:
    """Number of draws whose expected number of distinct dims is `distinct`."""
    lo, hi = 1, max(2, int(distinct * 50))
    while lo < hi:
      m = (lo + hi) // 2
      if np.sum(1.0 - (1.0 - self.p_rank) ** m) < distinct:
        lo = m + 1
      else:
        hi = m
    return lo

  def _rows(self, rng: np.random.Generator, n: int, draws: int) -> tuple[np.ndarray, np.ndarray]:
    u = rng.random((n, draws))
    ranks = np.searchsorted(self.cdf, u).astype(np.int32)
    ranks.sort(axis=1)
    dup = np.zeros_like(ranks, dtype=bool)
    dup[:, 1:] = ranks[:, 1:] == ranks[:, :-1]
    val = rng.lognormal(0.0, 0.6, size=(n, draws)).astype(np.float32)
    val[dup] = 0.0
    return self.perm[ranks], val

  def doc_batches(
    self, batch_size: int = 10_000, start: int = 0, stop: int | None = None
  ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """Yields (doc_ids, idx_bk int32, val_bk float32) for docs [start, stop)."""
    stop = self.spec.n_docs if stop is None else stop
    for b0 in range(start - start % batch_size, stop, batch_size):
      rng = np.random.default_rng([self.spec.seed, 1, b0 // batch_size, batch_size])
      n = min(batch_size, self.spec.n_docs - b0)
      idx, val = self._rows(rng, n, self.doc_draws)
      lo, hi = max(start - b0, 0), min(stop - b0, n)
      yield [f"D{j}" for j in range(b0 + lo, b0 + hi)], idx[lo:hi], val[lo:hi]

  def queries(self) -> tuple[np.ndarray, np.ndarray]:
    """All queries: (idx_bk int32, val_bk float32), zero-padded."""
    rng = np.random.default_rng([self.spec.seed, 2])
    return self._rows(rng, self.spec.n_queries, self.query_draws)
