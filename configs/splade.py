r"""SPLADE baseline: the backbone's MLM head over the vocabulary, max pooling, FLOPS.

SPLADE-max (SPLADE v2): w_j = max_t log(1 + ReLU(logit_tj)), special tokens
masked; FLOPS regularization with lambda_q = 3e-4, lambda_d = 1e-4 warmed up
quadratically over 50,000 steps; in-batch softmax cross-entropy plus
dense-teacher KL, as the LASPAR config, so the two differ only in the head.
Backbones without an MLM head (e.g. all-MiniLM-L6-v2) tie the decoder to the
word embeddings.

Arguments: the same as configs/laspar.py (variant/D are ignored), e.g.
`runlocal`, `scifact`, `data=...`, `reg=l1`.

Commands:
  python launch/train.py --config configs/splade.py --workdir /tmp/splade
  python launch/train.py --config configs/splade.py:runlocal --workdir /tmp/splade_local
  python launch/train.py --config configs/splade.py:scifact --workdir /tmp/splade_scifact
"""

from __future__ import annotations

import ml_collections

from configs import common, laspar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The SPLADE baseline config (the LASPAR config with a vocabulary head)."""
  a = common.parse_arg(arg, **laspar.ARGS)
  c = laspar.get_config(arg)
  c.model.head = "mlm"
  c.model.latent_dim = 0  # unused: D is the vocabulary
  c.model.head_kwargs = ml_collections.ConfigDict({"pooling": "max"})
  if not a.runlocal and not a.scifact:
    c.model.backbone = "distilbert/distilbert-base-uncased"
  c.loss.regularizers = ml_collections.ConfigDict(
    {f"q_{a.reg}": common.regularizer(a.reg, "q", 3e-4), f"d_{a.reg}": common.regularizer(a.reg, "d", 1e-4)}
  )
  if not a.runlocal:
    c.loss.reg_warmup_steps = 50_000
  c.train.q_topk = 0  # no training-time top-k: FLOPS makes it sparse
  c.train.d_topk = 0
  c.eval.q_topk = 256
  c.eval.d_topk = 1024
  return c
