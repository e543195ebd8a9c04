"""Sparse heads: hidden states h_btd (mask m_bt, ids ids_bt) -> representation rep_bv.

Every head is an NNX module called the same way,
`head(h_btd, mask_bt, ids_bt, *, projection=None, topk=None) -> rep_bv`
(float32; `projection` is the backbone's vocabulary projection, used by heads
with `uses_projection`, ignored by the others), and declares `per_token`:
whether it needs one state per input token at its id (mlp, latent, dense) or
pools vocabulary logits (mlm), which picks the read-out's pooled ids:

- `latent.py`: `LatentAttentionHead` (LASPAR default), `LatentSumHead`,
  `LatentMaxHead` over a learned latent space of width D;
- `vocab.py`: `VocabHead` (SPLADE) over the backbone's vocabulary projection;
- `mlp.py`: `MLPHead`, term weighting without expansion: relu(Linear(h_t))
  per input token, scattered into the vocabulary at the token's id;
- `dense.py`: `DenseHead` (ablation);
- `tiled.py`: the tiled pooling kernels (never B x L x D) and top-k masks;
- `pooling.py`: mean pooling, L2 normalization, masked softmax, log1p(relu).

`make_head(name, ...)` builds one by name through the plain dict `HEADS`; each
head class declares what it needs from the caller (`needs`, `accepts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from laspar_jax.models.heads.dense import DenseHead
from laspar_jax.models.heads.latent import LatentAttentionHead, LatentMaxHead, LatentSumHead, init_projection
from laspar_jax.models.heads.mlp import MLPHead
from laspar_jax.models.heads.pooling import l2_normalize, log_relu, masked_softmax, mean_pool
from laspar_jax.models.heads.tiled import scatter_rows, token_pool, token_pool_at, topk_indices, topk_mask
from laspar_jax.models.heads.vocab import VocabHead

__all__ = [
  "HEADS",
  "make_head",
  "output_dim",
  "uses_vocab",
  "DenseHead",
  "LatentAttentionHead",
  "LatentMaxHead",
  "LatentSumHead",
  "MLPHead",
  "VocabHead",
  "init_projection",
  "l2_normalize",
  "log_relu",
  "masked_softmax",
  "mean_pool",
  "scatter_rows",
  "token_pool",
  "token_pool_at",
  "topk_indices",
  "topk_mask",
]

HEADS: dict[str, type[nnx.Module]] = {
  "latent_attention": LatentAttentionHead,
  "latent_sum": LatentSumHead,
  "latent_max": LatentMaxHead,
  "mlm": VocabHead,
  "mlp": MLPHead,
  "dense": DenseHead,
}


def _head_class(name: str) -> type[nnx.Module]:
  if name not in HEADS:
    raise ValueError(f"unknown head {name!r}; known: {sorted(HEADS)}")
  return HEADS[name]


def uses_vocab(name: str) -> bool:
  """True if the head named `name` needs the backbone's vocabulary projection."""
  return bool(_head_class(name).uses_projection)


def make_head(
  name: str,
  *,
  d: int | None = None,
  D: int | None = None,
  vocab: int | None = None,
  rngs: nnx.Rngs | None = None,
  projection: nnx.Module | None = None,
  special_ids: Sequence[int] | None = None,
  **kwargs: Any,
) -> nnx.Module:
  """Builds a head by name.

  Args:
    name: a key of HEADS ("latent_attention", "latent_sum", "latent_max", "mlm", "mlp",
      "dense").
    d: backbone width (latent, mlp and dense heads).
    D: latent width (latent heads).
    vocab: vocabulary size (mlm, mlp).
    rngs: nnx.Rngs (latent and mlp heads).
    projection: a vocabulary projection for the mlm head to hold (standalone use; None:
      given to each call, as `SparseEncoder` does).
    special_ids: token ids whose dims the mlm and mlp heads zero (kwargs may override).
    **kwargs: passed to the head's constructor (pooling, tile, clamp, ...).

  Returns:
    The head module.
  """
  cls = _head_class(name)
  given = dict(d=d, D=D, vocab=vocab, rngs=rngs, special_ids=special_ids)
  missing = [k for k in cls.needs if given[k] is None]
  if missing:
    raise ValueError(f"head {name!r} needs {', '.join(missing)}")
  args = {k: given[k] for k in cls.needs + cls.accepts if given[k] is not None}
  if projection is not None and cls.uses_projection:
    args["projection"] = projection
  return cls(**{**args, **kwargs})


def output_dim(head: nnx.Module) -> int:
  """Width of the head's representation (D, vocab or d)."""
  if not hasattr(head, "output_dim"):
    raise ValueError(f"cannot tell the output width of {type(head).__name__}")
  return int(head.output_dim)
