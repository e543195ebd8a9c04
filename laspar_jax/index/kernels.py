"""numba search kernels over the dim-major posting arrays (release the GIL).

Weights arrive either as float32 (`table` unused, size 0) or as integer codes
(uint8 / uint16 / float16 bits) decoded by a float32 lookup `table`; each
kernel is compiled for both through `_make`.

Exact search is term-at-a-time: every posting of every query dim is added
into a float32 accumulator over docs, then a size-k heap picks the top-k
(ties: lower row first); chunks whose vectorized max cannot enter the heap
are skipped. Touched docs are tracked when the query touches few
postings, so neither the top-k scan nor the reset costs O(N) then.

Approximate search is impact-ordered with exact re-scoring: a global impact
threshold tau is chosen by bisection so that only about `budget` postings
with q_j * w >= tau are read from the weight-sorted lists; the `n_cand` best
partial scores are then re-scored exactly from the forward (doc-major)
index, and the top-k of those is returned.
"""

from __future__ import annotations

import numba
import numba.extending
import numpy as np

# Docs per accumulator block in exact search (1 MiB of float32: fits L2).
_BLOCK = 1 << 18
# Docs per chunk of the top-k scan (one vectorized max decides whether to look inside).
_CHUNK = 64


@numba.njit(inline="always")
def _worse(s_a, r_a, s_b, r_b):
  """True if (score a, row a) ranks below (score b, row b)."""
  return s_a < s_b or (s_a == s_b and r_a > r_b)


@numba.njit(inline="always")
def _sift_down(hs, hr, n, i):
  while True:
    l = 2 * i + 1
    if l >= n:
      return
    m = l
    r = l + 1
    if r < n and _worse(hs[r], hr[r], hs[l], hr[l]):
      m = r
    if _worse(hs[m], hr[m], hs[i], hr[i]):
      hs[i], hs[m] = hs[m], hs[i]
      hr[i], hr[m] = hr[m], hr[i]
      i = m
    else:
      return


@numba.njit(inline="always")
def heap_push(hs, hr, n, k, s, r):
  """Offers (s, r) to a min-heap of capacity k holding n items; returns new n."""
  if n < k:
    i = n
    hs[i] = s
    hr[i] = r
    n += 1
    while i > 0:
      p = (i - 1) // 2
      if _worse(hs[i], hr[i], hs[p], hr[p]):
        hs[i], hs[p] = hs[p], hs[i]
        hr[i], hr[p] = hr[p], hr[i]
        i = p
      else:
        break
  elif _worse(hs[0], hr[0], s, r):
    hs[0] = s
    hr[0] = r
    _sift_down(hs, hr, n, 0)
  return n


@numba.njit(inline="always")
def heap_drain(hs, hr, n, out_s, out_r):
  """Writes the heap best-first into out_* (length >= n)."""
  while n > 0:
    out_s[n - 1] = hs[0]
    out_r[n - 1] = hr[0]
    n -= 1
    hs[0] = hs[n]
    hr[0] = hr[n]
    _sift_down(hs, hr, n, 0)


def codes_of(vals: np.ndarray) -> np.ndarray:
  """Stored values as numba-comparable codes: float16 (which numba lacks) as its uint16 bits,
  monotonic for w >= 0 and decoded by the weight table; other dtypes as they are."""
  return vals.view(np.uint16) if vals.dtype == np.float16 else vals


def weight(vals, table, p):
  """Weight of posting p: vals[p] (float) or table[vals[p]] (integer codes)."""
  raise NotImplementedError  # only called from numba code (see the overload)


@numba.extending.overload(weight, inline="always")
def _weight_overload(vals, table, p):
  if isinstance(vals.dtype, numba.types.Integer):
    return lambda vals, table, p: table[vals[p]]
  return lambda vals, table, p: vals[p]


@numba.njit(fastmath=True, inline="always")
def _range_max(acc, lo, hi):
  """max(0, acc[lo:hi]), vectorized (no NaNs in accumulators)."""
  m = np.float32(0.0)
  for r in range(lo, hi):
    m = max(m, acc[r])
  return m


@numba.njit(inline="always")
def _scan_block(acc, lo, hi, k, heap_s, heap_r, n):
  """Offers acc[lo:hi] (> 0) to the top-k heap and zeroes it; returns the heap size.

  Chunks of _CHUNK docs whose max cannot enter a full heap are skipped after
  one vectorized max, so the per-doc branch runs on few chunks.
  """
  for c0 in range(lo, hi, _CHUNK):
    c1 = min(c0 + _CHUNK, hi)
    if n == k and _range_max(acc, c0, c1) < heap_s[0]:
      continue
    for r in range(c0, c1):
      s = acc[r]
      if s > 0.0:  # heap_push keeps it only if it beats the heap's worst
        n = heap_push(heap_s, heap_r, n, k, s, r)
  acc[lo:hi] = 0.0
  return n


@numba.njit(inline="always")
def _lower_bound(rows, lo, hi, x):
  """First p in [lo, hi) with rows[p] >= x (rows sorted there)."""
  while lo < hi:
    mid = (lo + hi) >> 1
    if rows[mid] < x:
      lo = mid + 1
    else:
      hi = mid
  return lo


@numba.njit(nogil=True, cache=True)
def exact(offsets, rows, vals, table, q_ptr, q_dims, q_w, k, acc, touched, heap_s, heap_r, out_rows, out_scores):
  n_docs = acc.size
  cursor = np.empty(q_ptr.size, np.int64)  # >= longest query would do; small
  for qi in range(q_ptr.size - 1):
    a = q_ptr[qi]
    b = q_ptr[qi + 1]
    if cursor.size < b - a:
      cursor = np.empty(b - a, np.int64)
    total = 0
    for t in range(a, b):
      d = q_dims[t]
      total += offsets[d + 1] - offsets[d]
    n = 0
    if total < n_docs // 16:
      # Few postings: remember touched docs; no O(N) scan.
      nt = 0
      for t in range(a, b):
        d = q_dims[t]
        w = q_w[t]
        for p in range(offsets[d], offsets[d + 1]):
          r = rows[p]
          if acc[r] == 0.0:
            touched[nt] = r
            nt += 1
          acc[r] += w * weight(vals, table, p)
      for i in range(nt):
        r = touched[i]
        s = acc[r]
        acc[r] = 0.0
        if s > 0.0:  # heap_push keeps it only if it beats the heap's worst
          n = heap_push(heap_s, heap_r, n, k, s, r)
    else:
      # Many postings: doc blocks whose accumulator stays in L2; each list's
      # slice for the block is found by binary search (lists are row-sorted),
      # so the inner loop is a plain scatter-add.
      for t in range(a, b):
        cursor[t - a] = offsets[q_dims[t]]
      for b0 in range(0, n_docs, _BLOCK):
        b1 = min(b0 + _BLOCK, n_docs)
        for t in range(a, b):
          d = q_dims[t]
          w = q_w[t]
          p0 = cursor[t - a]
          p1 = _lower_bound(rows, p0, offsets[d + 1], b1)
          for p in range(p0, p1):
            acc[rows[p]] += w * weight(vals, table, p)
          cursor[t - a] = p1
        n = _scan_block(acc, b0, b1, k, heap_s, heap_r, n)
    heap_drain(heap_s, heap_r, n, out_scores[qi], out_rows[qi])


@numba.njit(inline="always")
def count_at_least(offsets, ivals, table, d, thr):
  """Postings of weight-sorted list d with weight >= thr (binary search)."""
  lo = offsets[d]
  hi = offsets[d + 1]
  while lo < hi:
    mid = (lo + hi) // 2
    if weight(ivals, table, mid) >= thr:
      lo = mid + 1
    else:
      hi = mid
  return lo - offsets[d]


@numba.njit(nogil=True, cache=True)
def query_postings(offsets, q_ptr, q_dims):
  """int64 [B]: postings of each query's dims (the cost of exact search)."""
  out = np.zeros(q_ptr.size - 1, np.int64)
  for qi in range(q_ptr.size - 1):
    for t in range(q_ptr[qi], q_ptr[qi + 1]):
      d = q_dims[t]
      out[qi] += offsets[d + 1] - offsets[d]
  return out


@numba.njit(nogil=True)
def saat_threshold(offsets, ivals, table, q_dims, q_w, a, b, budget):
  """Global impact threshold tau: about (at most) `budget` postings of query terms [a, b) have q_j * w >= tau.

  Bisection over the impact-ordered lists (0 when all postings fit the budget).
  """
  hi = 0.0
  total = 0
  for t in range(a, b):
    d = q_dims[t]
    if offsets[d + 1] > offsets[d]:
      top = q_w[t] * weight(ivals, table, offsets[d])
      if top > hi:
        hi = top
    total += offsets[d + 1] - offsets[d]
  if total <= budget:
    return 0.0
  lo = 0.0
  for _ in range(50):
    mid = 0.5 * (lo + hi)
    cnt = 0
    for t in range(a, b):
      cnt += count_at_least(offsets, ivals, table, q_dims[t], mid / q_w[t])
    if cnt > budget:
      lo = mid
    else:
      hi = mid
      if cnt * 10 >= budget * 9:
        break
    if hi - lo <= 1e-3 * hi:  # integer impacts: counts jump in steps; 0.1% of tau is close enough
      break
  return hi


@numba.njit(inline="always")
def saat_end(offsets, ivals, table, d, w, tau):
  """End of the postings of impact-ordered list d with w * impact >= tau."""
  if tau > 0:
    return offsets[d] + count_at_least(offsets, ivals, table, d, tau / w)
  return offsets[d + 1]


@numba.njit(nogil=True)
def select_top(rows, scores, nt, kc, cand_r):
  """Rows of the kc best of scores[:nt] (> 0; in no particular order) into cand_r; returns their number.

  Selection (O(nt)), not a heap: scores above the kc-th best, then ties of it.
  """
  thr = np.float32(0.0)
  if nt > kc:
    thr = np.partition(scores[:nt].copy(), nt - kc)[nt - kc]
  nc = 0
  for i in range(nt):
    if scores[i] > thr and nc < kc:
      cand_r[nc] = rows[i]
      nc += 1
  if thr > 0.0:
    for i in range(nt):
      if scores[i] == thr and nc < kc:
        cand_r[nc] = rows[i]
        nc += 1
  return nc


@numba.njit(nogil=True)
def saat_candidates(offsets, irows, ivals, table, q_dims, q_w, a, b, budget, kc, acc, touched, cand_r):
  """Score at a time over the impact-ordered lists of query terms [a, b): the `kc` best partial scores.

  Reads the postings with q_j * w >= `saat_threshold` into an N-sized
  accumulator, writes the candidates' rows to cand_r (`select_top`) and
  returns their number; the accumulator is reset through the touched list.
  """
  tau = saat_threshold(offsets, ivals, table, q_dims, q_w, a, b, budget)
  nt = 0
  for t in range(a, b):
    d = q_dims[t]
    w = q_w[t]
    for p in range(offsets[d], saat_end(offsets, ivals, table, d, w, tau)):
      r = irows[p]
      if acc[r] == 0.0:
        touched[nt] = r
        nt += 1
      acc[r] += w * weight(ivals, table, p)
  scores = np.empty(nt, np.float32)
  for i in range(nt):
    scores[i] = acc[touched[i]]
    acc[touched[i]] = 0.0
  return select_top(touched, scores, nt, kc, cand_r)


@numba.njit(nogil=True)
def rescore_query_order(fwd_offsets, fwd_dims, fvals, table, q_dims, q_w, a, b, cand_r, nc, k, qbits, heap_s, heap_r):
  """Exact scores of candidates cand_r[:nc] from the forward index into a top-k heap (size returned).

  A bitmap over D filters the doc's dims; the few query dims sit in a small
  open-addressing table; per-dim terms are summed in query order, as in
  `exact`, so the scores are bitwise equal to exact search.
  """
  nq = b - a
  hsize = 64
  while hsize < 4 * nq:
    hsize *= 2
  hkeys = np.full(hsize, -1, np.int64)
  hslot = np.empty(hsize, np.int64)
  part = np.zeros(max(nq, 1), np.float32)
  first = np.empty(max(nq, 1), np.int64)  # a dim listed twice in a query: both read its first slot
  mask = hsize - 1
  for t in range(a, b):
    d = q_dims[t]
    qbits[d >> 6] |= np.uint64(1) << np.uint64(d & 63)
    h = (d * 2654435761) & mask
    while hkeys[h] != -1 and hkeys[h] != d:
      h = (h + 1) & mask
    if hkeys[h] == -1:
      hkeys[h] = d
      hslot[h] = t - a
    first[t - a] = hslot[h]
  n = 0
  for i in range(nc):
    r = cand_r[i]
    for p in range(fwd_offsets[r], fwd_offsets[r + 1]):
      d = np.int64(fwd_dims[p])
      if (qbits[d >> 6] >> np.uint64(d & 63)) & np.uint64(1):
        h = (d * 2654435761) & mask
        while hkeys[h] != d:
          h = (h + 1) & mask
        part[hslot[h]] = weight(fvals, table, p)
    s = np.float32(0.0)
    for t in range(a, b):
      v = part[first[t - a]]
      if v != 0.0:
        s += q_w[t] * v
    part[:] = 0.0
    if s > 0.0:  # heap_push keeps it only if it beats the heap's worst
      n = heap_push(heap_s, heap_r, n, k, s, r)
  for t in range(a, b):
    qbits[q_dims[t] >> 6] = np.uint64(0)
  return n


@numba.njit(nogil=True, cache=True)
def approx(
  offsets,
  irows,
  ivals,
  fwd_offsets,
  fwd_dims,
  fvals,
  table,
  q_ptr,
  q_dims,
  q_w,
  k,
  budget,
  n_cand,
  acc,
  touched,
  qbits,
  heap_s,
  heap_r,
  cand_r,
  out_rows,
  out_scores,
):
  """Approximate top-k, version 1: `saat_candidates`, then `rescore_query_order` (scores bitwise exact)."""
  kc = min(n_cand, cand_r.size)
  for qi in range(q_ptr.size - 1):
    a = q_ptr[qi]
    b = q_ptr[qi + 1]
    nc = saat_candidates(offsets, irows, ivals, table, q_dims, q_w, a, b, budget, kc, acc, touched, cand_r)
    n = rescore_query_order(
      fwd_offsets, fwd_dims, fvals, table, q_dims, q_w, a, b, cand_r, nc, k, qbits, heap_s, heap_r
    )
    heap_drain(heap_s, heap_r, n, out_scores[qi], out_rows[qi])
