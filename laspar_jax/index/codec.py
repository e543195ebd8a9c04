"""Block codec of the compressed (format version 2) posting lists, in numba.

Each posting list is cut into blocks of `BLOCK` postings. A block stores its
doc rows as gaps `row - previous_row - 1` (the previous row of a list's first
posting is -1), bit-packed at the block's width `w` (bits of its largest gap,
0..32) into one little-endian stream of uint32 words, each block starting at
the bit where the previous one ended (no padding). Per
block the index keeps its last row (uint32), its width (uint8) and its largest
impact (in the stored value dtype); impacts themselves stay one fixed-width
value per posting (uint8 codes, float16 bits or float32), addressed by posting
position, so a block's impacts need no decoding.

Derived at load (never stored): the first block of each dim (`blk_ptr`), the
first bit of each block (`blk_bit`) and the largest impact of each dim.
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 128


@numba.njit(inline="always")
def _bit_width(x):
  w = 0
  while x:
    w += 1
    x >>= 1
  return w


@numba.njit(nogil=True, cache=True)
def encode_lists(offsets, rows, vals, d0, d1, out_words, bit0, out_last, out_width, out_max):
  """Encodes the lists of dims [d0, d1) (postings offsets[d0]..offsets[d1] of rows/vals).

  Args:
    offsets: int64 [D + 1] posting offsets.
    rows: uint32 doc rows of the chunk's postings (indexed from offsets[d0]).
    vals: stored values of the same postings (uint8/uint16 codes or float32);
      the block max compares them directly (float16 bits are monotonic).
    d0, d1: dim range.
    out_words: uint32 buffer, zero past word 0, >= postings + 2 words; word 0
      holds the `bit0` bits the previous chunk left.
    bit0: bits already used in out_words[0] (0..31).
    out_last, out_width, out_max: per-block outputs, >= blocks of the chunk.

  Returns:
    (bits used from the start of out_words, blocks written).
  """
  base = offsets[d0]
  bit = np.int64(bit0)
  nb = 0
  for d in range(d0, d1):
    p0 = offsets[d] - base
    p1 = offsets[d + 1] - base
    prev = np.int64(-1)
    for b0 in range(p0, p1, BLOCK):
      b1 = min(b0 + BLOCK, p1)
      g_max = np.int64(0)
      v_max = vals[b0]
      last = prev
      for p in range(b0, b1):
        r = np.int64(rows[p])
        g = r - last - 1
        if g > g_max:
          g_max = g
        last = r
        if vals[p] > v_max:
          v_max = vals[p]
      w = _bit_width(g_max)
      last = prev
      for p in range(b0, b1):
        r = np.int64(rows[p])
        g = np.uint64(r - last - 1)
        last = r
        if w:
          j = bit >> 5
          s = bit & 31
          out_words[j] |= np.uint32((g << np.uint64(s)) & np.uint64(0xFFFFFFFF))
          if s + w > 32:
            out_words[j + 1] |= np.uint32(g >> np.uint64(32 - s))
          bit += w
      out_last[nb] = np.uint32(last)
      out_width[nb] = w
      out_max[nb] = v_max
      nb += 1
      prev = last
  return bit, nb


@numba.njit(inline="always")
def decode_block(words, bit0, width, n, prev, out):
  """Decodes n rows of a block starting at bit bit0 into out[:n] (prev = row before the block)."""
  r = prev
  if width == 0:
    for i in range(n):
      r += 1
      out[i] = r
    return
  mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
  wd = np.uint64(width)
  bit = np.uint64(bit0)
  for i in range(n):
    j = bit >> np.uint64(5)
    x = np.uint64(words[j]) | (np.uint64(words[j + np.uint64(1)]) << np.uint64(32))
    r += np.int64((x >> (bit & np.uint64(31))) & mask) + 1
    out[i] = r
    bit += wd


@numba.njit(nogil=True, cache=True)
def derive(offsets, blk_last, blk_width, blk_max):
  """Block pointers of each dim, first bit of each block and the max code of each dim.

  Returns:
    blk_ptr int64 [D + 1], blk_bit int64 [NB + 1], dim_max (blk_max dtype) [D].
  """
  dim = offsets.size - 1
  nb = blk_last.size
  blk_ptr = np.empty(dim + 1, np.int64)
  blk_bit = np.empty(nb + 1, np.int64)
  dim_max = np.zeros(dim, blk_max.dtype)
  b = 0
  bits = np.int64(0)
  for d in range(dim):
    blk_ptr[d] = b
    n = offsets[d + 1] - offsets[d]
    while n > 0 and b < nb:
      m = min(n, BLOCK)
      blk_bit[b] = bits
      bits += m * np.int64(blk_width[b])
      if blk_max[b] > dim_max[d]:
        dim_max[d] = blk_max[b]
      n -= m
      b += 1
    if n > 0:  # fewer blocks than the posting counts need (a damaged directory)
      blk_ptr[dim] = nb + 1
      return blk_ptr, blk_bit, dim_max
  blk_ptr[dim] = b
  blk_bit[min(b, nb)] = bits
  return blk_ptr, blk_bit, dim_max


@numba.njit(nogil=True, cache=True)
def decode_all(offsets, words, blk_ptr, blk_bit, blk_width, d0, d1, out_rows):
  """Decodes the rows of dims [d0, d1) into out_rows (indexed from offsets[d0])."""
  base = offsets[d0]
  for d in range(d0, d1):
    prev = np.int64(-1)
    p = offsets[d]
    for b in range(blk_ptr[d], blk_ptr[d + 1]):
      n = min(BLOCK, offsets[d + 1] - p)
      decode_block(words, blk_bit[b], blk_width[b], n, prev, out_rows[p - base : p - base + n])
      prev = out_rows[p - base + n - 1]
      p += n
