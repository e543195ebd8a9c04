"""Read-out modes: which hidden states a sparse head pools, under which mask, at which ids.

`read(backbone, ids_bl, mask_bl, mode=...) -> (h_btd, pool_mask_bt, pool_ids_bt)`;
the head then computes `head(h_btd, pool_mask_bt, pool_ids_bt)`. MODES:

- "plain": `backbone(ids, mask)` over the input (BERT; T5 in its `mode`,
  "encoder" by default; OPT and Llama causal, or bidirectional when the
  backbone config says so).
- "multi_token" (T5): the encoder reads x, the decoder is teacher-forced on
  shift_right(x) = [start, x_1 .. x_{L-1}]; every decoder position is pooled
  under the shifted mask [1, m_0 .. m_{L-2}], at the decoder input ids.
  `drop_first` leaves out position 0 (the start-token step; the reference
  always does), `mask_eos` the positions whose decoder input is `</s>` (the
  reference never does).
- "single_token" (T5): one decoder step from the start token: [B, 1, d] at the
  start id. With `per_token` (heads that weight input tokens, e.g. "mlp"):
  the encoder states plus that decoder state at every input position, pooled
  under the input mask at the input ids, so each input token gets its own weight.
- "decoder_stack" (T5): the decoder stack alone (no cross-attention) over x.
- "echo" (OPT, Llama): each row's real tokens twice, [x_1..x_n, x_1..x_n, pad..]
  (length 2L, right-padded), pooled over the second copy only, where every
  token has seen the whole text.
- "last_token" (OPT, Llama; PromptReps): only each row's last real position
  ([B, 1, d]; left or right padding).

In every mode positions whose pool id is in `skip_ids` are not pooled
(decoder-only encoders pass their BOS id).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax.models import bert, llama, opt, t5

MODES = ("plain", "multi_token", "single_token", "decoder_stack", "echo", "last_token")
T5_MODES = ("multi_token", "single_token", "decoder_stack")
DECODER_ONLY_MODES = ("echo", "last_token")
_FAMILIES = ((t5.T5Model, "t5"), (opt.OPTModel, "opt"), (llama.LlamaModel, "llama"), (bert.BertModel, "bert"))


def family(backbone: nnx.Module) -> str:
  """The family name of a backbone ("bert", "t5", "opt", "llama"; else its class name)."""
  for cls, name in _FAMILIES:
    if isinstance(backbone, cls):
      return name
  return type(backbone).__name__


def is_decoder_only(backbone: nnx.Module) -> bool:
  """True for causal-LM backbones (OPT, Llama family)."""
  return isinstance(backbone, (opt.OPTModel, llama.LlamaModel))


def check_mode(backbone: nnx.Module, mode: str) -> None:
  """Raises ValueError when `backbone` cannot read out in `mode` (names the mode and the family)."""
  if mode not in MODES:
    raise ValueError(f"decoding mode must be one of {MODES}, got {mode!r}")
  fam = family(backbone)
  if mode in T5_MODES:
    if not isinstance(backbone, t5.T5Model):
      raise ValueError(
        f"decoding mode {mode!r} needs an encoder-decoder (T5) backbone; the {fam!r} family has no such decoder"
      )
    if backbone.decoder is None:
      raise ValueError(f"decoding mode {mode!r} needs T5's decoder; this checkpoint is a T5EncoderModel (encoder only)")
  if mode in DECODER_ONLY_MODES and not is_decoder_only(backbone):
    raise ValueError(
      f"decoding mode {mode!r} is for decoder-only backbones (OPT, Llama family), not the {fam!r} family"
    )


def skip_mask(ids_bt: jax.Array, skip_ids: Sequence[int]) -> jax.Array:
  """bool [B, T]: True where the id is not in `skip_ids`."""
  if not len(skip_ids):
    return jnp.ones(ids_bt.shape, bool)
  return ~jnp.isin(ids_bt, jnp.asarray(list(skip_ids), ids_bt.dtype))


def echo_inputs(ids_bl: jax.Array, mask_bl: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each row's real tokens twice: (ids [B, 2L], mask [B, 2L], second-copy mask [B, 2L]).

  Works with left or right padding; the output is right-padded with `pad_id`.
  """
  b, l = ids_bl.shape
  real_bl = mask_bl.astype(bool)
  n_b1 = real_bl.sum(1, keepdims=True)
  order_bl = jnp.argsort(~real_bl, axis=1, stable=True)  # real positions first, in order
  packed_bl = jnp.take_along_axis(ids_bl, order_bl, axis=1)
  j_bt = jnp.broadcast_to(jnp.arange(2 * l)[None], (b, 2 * l))
  src_bt = jnp.where(j_bt < n_b1, j_bt, j_bt - n_b1)
  ids_bt = jnp.take_along_axis(packed_bl, jnp.clip(src_bt, 0, l - 1), axis=1)
  mask_bt = j_bt < 2 * n_b1
  ids_bt = jnp.where(mask_bt, ids_bt, jnp.asarray(pad_id, ids_bl.dtype))
  second_bt = mask_bt & (j_bt >= n_b1)
  return ids_bt, mask_bt.astype(mask_bl.dtype), second_bt


def last_index(mask_bl: jax.Array) -> jax.Array:
  """int32 [B]: the index of each row's last nonzero mask entry (L - 1 for an empty row)."""
  l = mask_bl.shape[1]
  return (l - 1 - jnp.argmax(mask_bl[:, ::-1].astype(bool), axis=1)).astype(jnp.int32)


def read(
  backbone: nnx.Module,
  ids_bl: jax.Array,
  mask_bl: jax.Array,
  *,
  mode: str = "plain",
  drop_first: bool = True,
  mask_eos: bool = False,
  skip_ids: Sequence[int] = (),
  per_token: bool = False,
  deterministic: bool = True,
  rngs: nnx.Rngs | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs the backbone in `mode` and says what to pool (see the module docstring).

  Args:
    backbone: a `backbone.Backbone` (T5 modes need a `t5.T5Model` with decoder).
    ids_bl: int [B, L] input ids.
    mask_bl: [B, L] attention mask.
    mode: one of MODES.
    drop_first: multi_token: do not pool decoder position 0 (the start-token step).
    mask_eos: multi_token: do not pool positions whose decoder input id is `</s>`.
    skip_ids: ids whose positions are never pooled (e.g. BOS).
    per_token: single_token: one state per input token (encoder state + the
      decoder state) instead of the single decoder state.
    deterministic: disables dropout.
    rngs: dropout stream when training.

  Returns:
    (h_btd in the compute dtype, pool_mask_bt int32, pool_ids_bt int32).

  Raises:
    ValueError: a mode the backbone's family cannot do.
  """
  check_mode(backbone, mode)
  kw = dict(deterministic=deterministic, rngs=rngs)
  ids_bl = jnp.asarray(ids_bl)
  mask_bl = jnp.asarray(mask_bl).astype(jnp.int32)
  if mode == "plain":
    h, pmask, pids = backbone(ids_bl, mask_bl, **kw), mask_bl, ids_bl
  elif mode == "multi_token":
    pids = backbone.shift_right(ids_bl)
    pmask = t5.shift_right(mask_bl, 1, 0)
    enc_bld = backbone.encode(ids_bl, mask_bl, **kw)
    h = backbone.decode(pids, pmask, enc_bld, mask_bl, **kw)
    if drop_first:
      pmask = pmask.at[:, 0].set(0)
    if mask_eos:
      pmask = jnp.where(pids == backbone.config.eos_token_id, 0, pmask)
  elif mode == "single_token":
    b = ids_bl.shape[0]
    start_b1 = jnp.full((b, 1), backbone.config.decoder_start_token_id, ids_bl.dtype)
    enc_bld = backbone.encode(ids_bl, mask_bl, **kw)
    h = backbone.decode(start_b1, jnp.ones((b, 1), jnp.int32), enc_bld, mask_bl, **kw)
    if per_token:
      h, pmask, pids = enc_bld + h, mask_bl, ids_bl
    else:
      pmask, pids = jnp.ones((b, 1), jnp.int32), start_b1
  elif mode == "decoder_stack":
    h, pmask, pids = backbone.decode(ids_bl, mask_bl, **kw), mask_bl, ids_bl
  elif mode == "echo":
    pids, emask, second = echo_inputs(ids_bl, mask_bl, backbone.pad_id)
    h, pmask = backbone(pids, emask, **kw), second.astype(jnp.int32)
  else:  # last_token
    idx_b1 = last_index(mask_bl)[:, None]
    h_bld = backbone(ids_bl, mask_bl, **kw)
    h = jnp.take_along_axis(h_bld, idx_b1[:, :, None], axis=1)
    pmask = jnp.take_along_axis(mask_bl, idx_b1, axis=1)
    pids = jnp.take_along_axis(ids_bl, idx_b1, axis=1)
  if len(skip_ids):
    pmask = jnp.where(skip_mask(pids, skip_ids), pmask, 0)
  return h, pmask.astype(jnp.int32), pids.astype(jnp.int32)
