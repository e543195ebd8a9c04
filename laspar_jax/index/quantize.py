"""Integer impacts: non-negative weights <-> uint8/uint16 with one stored scale.

The form PISA and Anserini expect. Pure numpy (the index imports nothing
above it); `laspar_jax.sparsify` re-exports these for encoder outputs.
"""

from __future__ import annotations

import numpy as np


def quantize_scale(val_max: float, bits: int) -> float:
  """Scale such that `val_max` maps to the largest integer of `bits` bits."""
  top = float(2**bits - 1)
  return float(val_max) / top if val_max > 0 else 1.0


def quantize(val, bits: int = 8, scale: float | None = None) -> tuple[np.ndarray, float]:
  """Maps non-negative weights to integer impacts: q = round(val / scale).

  Positive weights never map to 0 (they are clipped to at least 1), so a
  posting survives quantization. Values above 2**bits-1 saturate.

  Args:
    val: weights (any array-like, any shape), non-negative.
    bits: 8 (uint8) or 16 (uint16).
    scale: weight per integer step; default max(val) / (2**bits - 1).

  Returns:
    (q, scale): q of dtype uint8/uint16, and the scale (val ~= q * scale).
  """
  if bits not in (8, 16):
    raise ValueError(f"bits must be 8 or 16, got {bits}")
  val = np.asarray(val, dtype=np.float32)
  if scale is None:
    scale = quantize_scale(float(val.max()) if val.size else 0.0, bits)
  top = 2**bits - 1
  q = np.rint(val / np.float32(scale))
  q = np.where(val > 0, np.maximum(q, 1), 0)
  q = np.clip(q, 0, top).astype(np.uint8 if bits == 8 else np.uint16)
  return q, float(scale)


def dequantize(q: np.ndarray, scale: float) -> np.ndarray:
  """Inverse of `quantize`: float32 q * scale."""
  return q.astype(np.float32) * np.float32(scale)


def decode_weights(vals: np.ndarray, scale: float | None) -> np.ndarray:
  """Stored weights -> float32 (dequantizes integer impacts)."""
  if vals.dtype.kind == "u":
    return dequantize(vals, scale if scale is not None else 1.0)
  return vals.astype(np.float32)
