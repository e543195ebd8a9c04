"""Read-out modes: which hidden states a sparse head pools, under which mask, at which ids.

`read(backbone, ids_bl, mask_bl, mode=...) -> (h_btd, pool_mask_bt, pool_ids_bt)`;
the head then computes `head(h_btd, pool_mask_bt, pool_ids_bt)`. A family
allows the modes it lists (`backbone.Family.modes`). `per_token` is set for
heads that weight each pooled token at its id (`head.per_token`, e.g. "mlp");
vocabulary heads ignore the ids. MODES, with the reference's rule
(JingfenQiao/Decoder4LSR, lsr/models/*.py) as the default:

- "plain": `backbone(ids, mask)` over the input (BERT; T5 in its `mode`,
  "encoder" by default; OPT and Llama causal, or bidirectional when the
  backbone config says so).
- "multi_token" (T5): the encoder reads x, the decoder is teacher-forced on
  shift_right(x) = [start, x_0 .. x_{L-2}] under the shifted mask
  [1, m_0 .. m_{L-2}]. Pooled: decoder steps t >= 1 with m_{t-1} = 1
  (`drop_first` leaves out step 0, the start-token step, as the reference
  always does; `mask_eos` also the steps whose decoder input is `</s>`, which
  the reference never does). Per-token heads place step t's weight at
  input_ids[t], the token step t predicts (`token_ids="target"`, the
  reference's mlp_en_de_multi); `token_ids="decoder_input"` (ours before) at
  the decoder input x[t-1].
- "single_token" (T5): one decoder step from the start token: [B, 1, d] at the
  start id. With `per_token`: the encoder states plus that decoder state at
  every input position, pooled under the input mask at the input ids, so each
  input token gets its own weight.
- "decoder_stack" (T5): the decoder stack alone (no cross-attention) fed
  shift_right(x) under the *unshifted* mask m, as the reference
  (mlm_de_multi_t5, mlp_de_multi_t5). Vocabulary heads pool steps t >= 1 with
  m_{t-1} = 1 (the reference's shifted mask); per-token heads pool under m at
  the decoder input ids shift_right(x) (the reference's mlp row). `shift=False`
  (ours before) feeds x and pools under m at x.
- "echo" (OPT, Llama): each row's real tokens twice, [x_1..x_n, x_1..x_n, pad..]
  (length 2L, right-padded), pooled over the second copy only, where every
  token has seen the whole text.
- "last_token" (OPT, Llama; PromptReps): only each row's last real position
  ([B, 1, d]; left or right padding).

In every mode positions whose pool id is in `skip_ids` are not pooled (BOS of
decoder-only backbones; the special tokens where the family's rule removes
special positions, see `sparse_encoder`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax.models import backbone as backbone_lib

MODES = ("plain", "multi_token", "single_token", "decoder_stack", "echo", "last_token")
DECODER_MODES = ("multi_token", "single_token", "decoder_stack")  # need an encoder-decoder's decoder
TOKEN_IDS = ("target", "decoder_input")


def family(backbone: nnx.Module) -> str:
  """The family name of a backbone (registry lookup; else its class name)."""
  try:
    return backbone_lib.family_of(backbone).name
  except KeyError:
    return type(backbone).__name__


def is_decoder_only(backbone: nnx.Module) -> bool:
  """True for causal-LM backbones (the family says so)."""
  try:
    return backbone_lib.family_of(backbone).decoder_only
  except KeyError:
    return False


def check_mode(backbone: nnx.Module, mode: str) -> None:
  """Raises ValueError when `backbone` cannot read out in `mode` (names the mode and the family)."""
  if mode not in MODES:
    raise ValueError(f"decoding mode must be one of {MODES}, got {mode!r}")
  try:
    fam = backbone_lib.family_of(backbone)
  except KeyError:
    if mode != "plain":
      raise ValueError(f"decoding mode {mode!r} needs a registered family; {type(backbone).__name__} is none")
    return
  if mode not in fam.modes:
    raise ValueError(f"decoding mode {mode!r} is not a read-out of the {fam.name!r} family (it allows {fam.modes})")
  if mode in DECODER_MODES and getattr(backbone, "decoder", None) is None:
    raise ValueError(f"decoding mode {mode!r} needs the decoder; this checkpoint is encoder only")


def shift_right(x_bl: jax.Array, first: int) -> jax.Array:
  """[first, x_0 .. x_{L-2}] per row (decoder inputs from ids; shifted masks from masks)."""
  return jnp.concatenate([jnp.full(x_bl.shape[:1] + (1,), first, x_bl.dtype), x_bl[:, :-1]], axis=1)


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
  shift: bool = True,
  token_ids: str = "target",
  skip_ids: Sequence[int] = (),
  per_token: bool = False,
  text_mask_bt: jax.Array | None = None,
  deterministic: bool = True,
  rngs: nnx.Rngs | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs the backbone in `mode` and says what to pool (see the module docstring).

  Args:
    backbone: a `backbone.Backbone` of a family that allows `mode`.
    ids_bl: int [B, L] input ids.
    mask_bl: [B, L] attention mask.
    mode: one of MODES.
    drop_first: multi_token: do not pool decoder step 0 (the start-token step).
    mask_eos: multi_token: do not pool steps whose decoder input id is `</s>`.
    shift: decoder_stack: feed shift_right(x) under the unshifted mask (the reference);
      False feeds x.
    token_ids: multi_token, per-token heads: "target" (input_ids[t], the reference) or
      "decoder_input" (the decoder input x[t-1]).
    skip_ids: ids whose positions are never pooled (e.g. BOS).
    per_token: the head weights each pooled token at its id (mlp; latent heads in
      single_token).
    text_mask_bt: [B, L] 1 at the text's tokens of a prompted input, 0 at the prompt's
      (`Tokenizer.encode_with_offsets`); when given only positions reading a text token
      are pooled (a decoder step t reads input t-1; echo: the text in the second copy;
      last_token and single_token ignore it). None pools prompt and text alike.
    deterministic: disables dropout.
    rngs: dropout stream when training.

  Returns:
    (h_btd in the compute dtype, pool_mask_bt int32, pool_ids_bt int32).

  Raises:
    ValueError: a mode the backbone's family cannot do, or a bad option.
  """
  check_mode(backbone, mode)
  if token_ids not in TOKEN_IDS:
    raise ValueError(f"token_ids must be one of {TOKEN_IDS}, got {token_ids!r}")
  kw = dict(deterministic=deterministic, rngs=rngs)
  ids_bl = jnp.asarray(ids_bl)
  mask_bl = jnp.asarray(mask_bl).astype(jnp.int32)
  if mode == "plain":
    h, pmask, pids = backbone(ids_bl, mask_bl, **kw), mask_bl, ids_bl
  elif mode == "multi_token":
    dec_ids = backbone.shift_right(ids_bl)
    dec_mask = shift_right(mask_bl, 1)
    enc_bld = backbone.encode(ids_bl, mask_bl, **kw)
    h = backbone.decode(dec_ids, dec_mask, enc_bld, mask_bl, **kw)
    pmask = dec_mask.at[:, 0].set(0) if drop_first else dec_mask
    if mask_eos:
      pmask = jnp.where(dec_ids == backbone.config.eos_token_id, 0, pmask)
    pids = ids_bl if per_token and token_ids == "target" else dec_ids
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
    if shift:
      dec_ids = backbone.shift_right(ids_bl)
      h = backbone.decode(dec_ids, mask_bl, **kw)
      pmask, pids = (mask_bl, dec_ids) if per_token else (shift_right(mask_bl, 0), dec_ids)
    else:
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
  if text_mask_bt is not None:
    pmask = pmask * _text_positions(jnp.asarray(text_mask_bt).astype(jnp.int32), mask_bl, pmask, mode, shift)
  if len(skip_ids):
    pmask = jnp.where(skip_mask(pids, skip_ids), pmask, 0)
  return h, pmask.astype(jnp.int32), pids.astype(jnp.int32)


def _text_positions(text_bl: jax.Array, mask_bl: jax.Array, pmask: jax.Array, mode: str, shift: bool) -> jax.Array:
  """1 where a pooled position reads a text token (see `read`'s text_mask_bt), aligned with pmask."""
  if mode == "multi_token" or (mode == "decoder_stack" and shift):
    return shift_right(text_bl, 0)  # decoder step t reads input t-1
  if mode == "echo":
    echoed, _, second = echo_inputs(text_bl, mask_bl, 0)
    return echoed * second.astype(jnp.int32)
  if pmask.shape != text_bl.shape:  # last_token, single_token: one position, not the text's
    return jnp.ones_like(pmask)
  return text_bl
