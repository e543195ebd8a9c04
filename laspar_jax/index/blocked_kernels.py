"""Search over the compressed (blocked) postings: windowed term-at-a-time with block-max pruning.

Documents are scored in windows of `window` rows. For each window every
query term's blocks that overlap it are known from the block directory
(`blk_last`), and their largest impact bounds what the term can add to any
document of the window (q_t x block max). A window whose bound sum cannot
reach the current k-th score is skipped without decoding anything (block-max
pruning at window granularity). Otherwise every term's blocks are added into
a window-sized accumulator: a block inside the window is decoded and added in
one pass; a block that reaches past it is decoded once into a per-term buffer
and consumed over the windows it spans. With theta = 1 this is exact;
theta > 1 prunes against theta x the k-th score (approximate, faster). No
array of size N or D is touched per query: the accumulator is `window` floats.
"""

from __future__ import annotations

import numba
import numpy as np

from laspar_jax.index.codec import BLOCK, decode_block
from laspar_jax.index.kernels import heap_drain, heap_push, weight

# Relative slack of the pruning tests, so float rounding never prunes a document that ties.
_EPS = 1e-5


@numba.njit(inline="always")
def _next_row(t, cur, bend, dec_blk, dec_pos, dec_n, buf, blk_last, blk_ptr_d):
  """Lower bound of the next unread row of term t (huge when the list is done)."""
  b = cur[t]
  if b >= bend[t]:
    return np.int64(1) << np.int64(62)
  if dec_blk[t] == b:
    return buf[t * BLOCK + dec_pos[t]]
  if b > blk_ptr_d[t]:
    return np.int64(blk_last[b - 1]) + 1
  return np.int64(0)


@numba.njit(nogil=True, cache=True)
def search(
  offsets,
  blk_ptr,
  blk_bit,
  blk_last,
  blk_width,
  blk_max,
  words,
  impacts,
  table,
  dim_max,
  q_ptr,
  q_dims,
  q_w,
  k,
  theta,
  exact_below,
  window,
  acc,
  heap_s,
  heap_r,
  out_rows,
  out_scores,
):
  """Top-k of each query over the blocked postings.

  Args:
    offsets, blk_ptr, blk_bit, blk_last, blk_width, blk_max, words, impacts,
      dim_max: the index (codec.py; blk_max / impacts / dim_max as stored codes).
    table: float32 decode table of integer codes (size 0 for float32 values).
    q_ptr, q_dims, q_w: queries in CSR form.
    k: results per query.
    theta: pruning factor (1 = exact).
    exact_below: queries with fewer postings than this use theta = 1.
    window: rows per accumulator window (acc.size >= window).
    acc: float32 scratch (zero on entry, zero on exit).
    heap_s, heap_r: heap scratch (>= k).
    out_rows, out_scores: [B, k] outputs (pre-filled with -1 / -inf).
  """
  nmax = 1
  for qi in range(q_ptr.size - 1):
    nmax = max(nmax, q_ptr[qi + 1] - q_ptr[qi])
  cur = np.empty(nmax, np.int64)
  bend = np.empty(nmax, np.int64)
  bptr = np.empty(nmax, np.int64)
  dec_blk = np.empty(nmax, np.int64)
  dec_pos = np.empty(nmax, np.int64)
  dec_n = np.empty(nmax, np.int64)
  ubw = np.empty(nmax, np.float32)
  buf = np.empty(nmax * BLOCK, np.int64)
  for qi in range(q_ptr.size - 1):
    a = q_ptr[qi]
    nt = q_ptr[qi + 1] - a
    total = 0
    for t in range(nt):
      d = q_dims[a + t]
      cur[t] = blk_ptr[d]
      bptr[t] = blk_ptr[d]
      bend[t] = blk_ptr[d + 1]
      dec_blk[t] = -1
      total += offsets[d + 1] - offsets[d]
    th = np.float32(theta if total >= exact_below else 1.0) * np.float32(1.0 - _EPS)
    n = 0
    w0 = np.int64(0)
    while True:
      # Jump to the window of the next unread posting of any term.
      nxt = np.int64(1) << np.int64(62)
      for t in range(nt):
        nxt = min(nxt, _next_row(t, cur, bend, dec_blk, dec_pos, dec_n, buf, blk_last, bptr))
      if nxt >= np.int64(1) << np.int64(61):
        break
      w0 = max(w0, nxt - nxt % window)
      w1 = w0 + window
      # Bounds of each term in the window (its blocks from cur up to the one reaching w1).
      ub_sum = np.float32(0.0)
      for t in range(nt):
        m = np.float32(0.0)
        b = cur[t]
        if _next_row(t, cur, bend, dec_blk, dec_pos, dec_n, buf, blk_last, bptr) < w1:
          d = q_dims[a + t]
          while b < bend[t]:
            m = max(m, weight(blk_max, table, b))
            if blk_last[b] >= w1:
              break
            b += 1
          m *= q_w[a + t]
        ubw[t] = m
        ub_sum += m
      full = n == k
      thr = heap_s[0] if full else np.float32(0.0)
      pruned = full and ub_sum < th * thr
      added = 0
      if not pruned:
        for t in range(nt):
          if ubw[t] == 0.0:
            continue
          d = q_dims[a + t]
          w = q_w[a + t]
          b = cur[t]
          base = t * BLOCK
          while b < bend[t]:
            p_blk = offsets[d] + (b - bptr[t]) * BLOCK
            if dec_blk[t] != b and blk_last[b] < w1:
              # The whole block lies in the window: decode and add in one pass.
              nb = min(BLOCK, offsets[d + 1] - p_blk)
              r = np.int64(blk_last[b - 1]) if b > bptr[t] else np.int64(-1)
              width = blk_width[b]
              if width == 0:
                for i in range(nb):
                  r += 1
                  acc[r - w0] += w * weight(impacts, table, p_blk + i)
              else:
                mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
                wd = np.uint64(width)
                bit = np.uint64(blk_bit[b])
                for i in range(nb):
                  j = bit >> np.uint64(5)
                  x = np.uint64(words[j]) | (np.uint64(words[j + np.uint64(1)]) << np.uint64(32))
                  r += np.int64((x >> (bit & np.uint64(31))) & mask) + 1
                  acc[r - w0] += w * weight(impacts, table, p_blk + i)
                  bit += wd
              added += nb
              b += 1
              continue
            if dec_blk[t] != b:
              nb = min(BLOCK, offsets[d + 1] - p_blk)
              prev = np.int64(blk_last[b - 1]) if b > bptr[t] else np.int64(-1)
              decode_block(words, blk_bit[b], blk_width[b], nb, prev, buf[base : base + nb])
              dec_blk[t] = b
              dec_pos[t] = 0
              dec_n[t] = nb
            i = dec_pos[t]
            nb = dec_n[t]
            while i < nb and buf[base + i] < w0:
              i += 1
            i0 = i
            while i < nb:
              r = buf[base + i]
              if r >= w1:
                break
              acc[r - w0] += w * weight(impacts, table, p_blk + i)
              i += 1
            added += i - i0
            dec_pos[t] = i
            if i < nb:
              break
            b += 1
          cur[t] = b
      if added:
        for c0 in range(0, window, 64):
          if n == k:
            mx = np.float32(0.0)
            for r in range(c0, c0 + 64):
              mx = max(mx, acc[r])
            if mx < heap_s[0]:
              continue
          for r in range(c0, c0 + 64):
            s = acc[r]
            if s > 0.0:
              n = heap_push(heap_s, heap_r, n, k, s, w0 + r)
        acc[:window] = 0.0
      # Every term moves past the blocks that end inside this window.
      for t in range(nt):
        b = cur[t]
        while b < bend[t] and blk_last[b] < w1:
          b += 1
        cur[t] = b
      w0 = w1
    heap_drain(heap_s, heap_r, n, out_scores[qi], out_rows[qi])
