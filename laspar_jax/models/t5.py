"""T5 v1.0 and v1.1 / Flan-T5 (and mT5, the same code) in Flax NNX; the "t5" family.

Pre-norm encoder-decoder (Raffel et al., 2020) with Hugging Face's numerics:
relative position buckets (bidirectional in the encoder, causal in the
decoder; one bias per stack, computed from its first layer's table and shared
by all its layers), q.k logits without the 1/sqrt(d) scale, RMS norms without
mean or bias, a ReLU FFN (v1.0, `feed_forward_proj` "relu") or gated-GELU with
the tanh GELU (v1.1, "gated-gelu"), and an LM head tied to the shared
embeddings with the d_model**-0.5 rescale (v1.0) or untied (v1.1).

The LM head follows config.json: `tie_word_embeddings` says whether the head
is the shared table (absent: tied for "t5", untied for "mt5", as transformers
4.x defaults), `scale_decoder_outputs` whether decoder outputs are scaled by
d_model**-0.5 (absent: when tied, the 4.x rule). transformers 5.x writes both
flags; its Flan-T5 (v1.1) models built from a fresh config tie the head
without scaling and save no `lm_head.weight`. An untied head whose tensor the
checkpoint lacks is a `CheckpointError` naming `lm_head.weight` (never a
random head).

One module, three modes (`T5Model`):
  - `encode(ids, mask)`: the encoder stack -> encoder states;
  - `decode(dec_ids, dec_mask, encoder_states_bsd, encoder_mask_bs)`: the
    decoder stack with cross-attention (teacher forcing), or without it when
    no encoder states are given (the decoder stack alone);
  - `__call__(ids, mask)` (the backbone contract) runs `model.mode`
    ("encoder" by default; "encoder_decoder"; "decoder"), or teacher forcing
    whenever `decoder_input_ids_bl` is given.
Attention-probability dropout is folded into the sub-layer output dropout (as
in `bert.py`); the other dropouts sit where Hugging Face puts them.

Family facts (`FAMILY`): read-outs "plain", "multi_token", "single_token",
"decoder_stack"; special tokens "keep" (the reference pools T5's special
positions and keeps their dims: mlm/mlp_*_t5 never use special_tokens_mask).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax.models import attention, backbone, known_configs, layers, t5_params
from laspar_jax.models.t5_position import position_bias, relative_position_buckets  # noqa: F401 (re-exported)

MODES = ("encoder", "encoder_decoder", "decoder")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 model (Hugging Face names) and the default `mode` of `__call__`."""

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  # v1.0: the LM head is the shared table and decoder outputs are scaled by
  # d_model**-0.5; v1.1 / Flan (transformers 4.x): an untied head, no scaling.
  # transformers 5.x writes scale_decoder_outputs beside the tie flag; the two
  # are read independently (None: scaled exactly when tied).
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool | None = None
  pad_token_id: int = 0
  decoder_start_token_id: int = 0
  eos_token_id: int = 1  # `</s>` (the multi-token read-out may leave it out of pooling)
  has_decoder: bool = True  # False for T5EncoderModel checkpoints
  mode: str = "encoder"
  scan_layers: bool = False  # both stacks' blocks stacked and run by lax.scan (layers.Stacked)
  model_type: str = "t5"

  @property
  def act(self) -> str:
    """The FFN activation's name in `layers.ACTIVATIONS` (HF: "gated-gelu" is the tanh GELU)."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @property
  def scales_lm_head(self) -> bool:
    """Whether decoder outputs are scaled by d_model**-0.5 before the LM head."""
    return self.tie_word_embeddings if self.scale_decoder_outputs is None else bool(self.scale_decoder_outputs)

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "T5Config":
    """Builds the config from a Hugging Face config.json dict (an optional "mode" key sets `mode`)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"has_decoder", "num_decoder_layers"}
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    kw["num_decoder_layers"] = d.get("num_decoder_layers") or d.get("num_layers", cls.num_layers)
    kw["has_decoder"] = d.get("architectures") != ["T5EncoderModel"]
    kw.setdefault("decoder_start_token_id", kw.get("pad_token_id", 0))
    if d.get("model_type") == "mt5":  # T5 v1.1 code: untied and gated unless the config says otherwise
      kw.setdefault("tie_word_embeddings", False)
      kw.setdefault("feed_forward_proj", "gated-gelu")
    cfg = cls(**kw)
    parts = cfg.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"bad feed_forward_proj {cfg.feed_forward_proj!r}; expected 'ACT' or 'gated-ACT'")
    layers.activation(cfg.act)
    if cfg.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode != "encoder" and not cfg.has_decoder:
      raise ValueError(f"mode {cfg.mode!r} needs a decoder; this checkpoint is a T5EncoderModel")
    return cfg


class T5Attention(nnx.Module):
  """Multi-head attention without biases or q.k scaling; the first layer of a stack owns the position bias table."""

  def __init__(self, cfg: T5Config, *, relative_bias: bool, dtype: Any, rngs: nnx.Rngs, attention_impl: str = "xla"):
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
    self.attention_impl = attention_impl
    dense = lambda n_in, n_out, axes, std: layers.Dense(
      n_in, n_out, axes=axes, use_bias=False, std=std, dtype=dtype, rngs=rngs
    )
    self.q = dense(d, inner, ("embed", "heads"), (d * cfg.d_kv) ** -0.5)
    self.k = dense(d, inner, ("embed", "kv"), d**-0.5)
    self.v = dense(d, inner, ("embed", "kv"), d**-0.5)
    self.o = dense(inner, d, ("heads", "embed"), inner**-0.5)
    self.relative_attention_bias = (
      layers.param(
        layers.normal_init(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), d**-0.5), (None, "heads")
      )
      if relative_bias
      else None
    )

  def __call__(
    self,
    x_btd: jax.Array,
    kv_bsd: jax.Array,
    mask_bs: jax.Array | None,
    bias_1hts: jax.Array | None,
    *,
    causal: bool,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    split = lambda y: y.reshape(y.shape[:2] + (self.num_heads, self.d_kv))
    a_bthk = attention.attention(
      split(self.q(x_btd, rngs=rngs)),
      split(self.k(kv_bsd, rngs=rngs)),
      split(self.v(kv_bsd, rngs=rngs)),
      mask_bs=mask_bs,
      bias_bhts=bias_1hts,
      causal=causal,
      scale=1.0,
      impl=self.attention_impl,
    )
    return self.o(a_bthk.reshape(a_bthk.shape[:2] + (-1,)), rngs=rngs)


class T5FeedForward(nnx.Module):
  """wo(dropout(act(wi(x)))) or, gated, wo(dropout(act(wi_0(x)) * wi_1(x))); no biases."""

  def __init__(self, cfg: T5Config, *, dtype: Any, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    dense = lambda n_in, n_out, axes: layers.Dense(
      n_in, n_out, axes=axes, use_bias=False, std=n_in**-0.5, dtype=dtype, rngs=rngs
    )
    self.gated = cfg.gated
    if cfg.gated:
      self.wi_0 = dense(d, f, ("embed", "mlp"))
      self.wi_1 = dense(d, f, ("embed", "mlp"))
    else:
      self.wi = dense(d, f, ("embed", "mlp"))
    self.wo = dense(f, d, ("mlp", "embed"))
    self.act = cfg.act
    self.rate = cfg.dropout_rate

  def __call__(self, x_btd: jax.Array, *, deterministic: bool, rngs) -> jax.Array:
    act = layers.activation(self.act)
    r = None if deterministic else rngs  # adapters' dropout stream (lora.LoRADense), training only
    h_btf = act(self.wi_0(x_btd, rngs=r)) * self.wi_1(x_btd, rngs=r) if self.gated else act(self.wi(x_btd, rngs=r))
    return self.wo(layers.dropout(h_btf, self.rate, deterministic=deterministic, rngs=rngs), rngs=r)


class T5Block(nnx.Module):
  """Self-attention, (decoder) cross-attention, FFN; each pre-normed, dropped out and added back."""

  def __init__(
    self,
    cfg: T5Config,
    *,
    is_decoder: bool,
    relative_bias: bool,
    dtype: Any,
    rngs: nnx.Rngs,
    attention_impl: str = "xla",
  ):
    d, eps = cfg.d_model, cfg.layer_norm_epsilon
    self.self_attn_norm = layers.RMSNorm(d, eps=eps)
    self.self_attn = T5Attention(
      cfg, relative_bias=relative_bias, dtype=dtype, rngs=rngs, attention_impl=attention_impl
    )
    self.cross_attn_norm = layers.RMSNorm(d, eps=eps) if is_decoder else None
    self.cross_attn = (
      T5Attention(cfg, relative_bias=False, dtype=dtype, rngs=rngs, attention_impl=attention_impl)
      if is_decoder
      else None
    )
    self.mlp_norm = layers.RMSNorm(d, eps=eps)
    self.mlp = T5FeedForward(cfg, dtype=dtype, rngs=rngs)
    self.is_decoder = is_decoder
    self.rate = cfg.dropout_rate

  def __call__(self, x_btd, mask_bt, bias_1htt, enc_bsd, enc_mask_bs, *, deterministic: bool, rngs) -> jax.Array:
    drop = lambda y: layers.dropout(y, self.rate, deterministic=deterministic, rngs=rngs)
    r = None if deterministic else rngs  # adapters' dropout stream (lora.LoRADense), training only
    h_btd = self.self_attn_norm(x_btd)
    x_btd = x_btd + drop(self.self_attn(h_btd, h_btd, mask_bt, bias_1htt, causal=self.is_decoder, rngs=r))
    if enc_bsd is not None:
      h_btd = self.cross_attn_norm(x_btd)
      x_btd = x_btd + drop(self.cross_attn(h_btd, enc_bsd, enc_mask_bs, None, causal=False, rngs=r))
    return x_btd + drop(self.mlp(self.mlp_norm(x_btd), deterministic=deterministic, rngs=rngs))


class T5Stack(nnx.Module):
  """The encoder or the decoder: blocks, a final RMS norm, dropout at entry and exit.

  Scanned (`scan_layers`): the blocks are a `layers.Stacked` and block 0's position bias table
  moves to the stack (`relative_attention_bias`), so that every block has the same structure.
  """

  def __init__(
    self,
    cfg: T5Config,
    *,
    is_decoder: bool,
    dtype: Any,
    rngs: nnx.Rngs,
    remat: bool | str = False,
    attention_impl: str = "xla",
  ):
    n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
    make = lambda i: T5Block(
      cfg, is_decoder=is_decoder, relative_bias=i == 0, dtype=dtype, rngs=rngs, attention_impl=attention_impl
    )
    if cfg.scan_layers:  # block 0 drawn first, as in the loop; its table then moves to the stack
      first = make(0)
      self.relative_attention_bias = first.self_attn.relative_attention_bias
      first.self_attn.relative_attention_bias = None
      self.blocks = layers.Stacked(lambda i: first if i == 0 else make(i), n)
    else:
      self.blocks = nnx.List([make(i) for i in range(n)])
    self.final_layer_norm = layers.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
    self.is_decoder = is_decoder
    self.remat = remat
    self.max_distance = cfg.relative_attention_max_distance
    self.rate = cfg.dropout_rate

  def __call__(
    self,
    x_btd: jax.Array,
    mask_bt: jax.Array,
    enc_bsd: jax.Array | None = None,
    enc_mask_bs: jax.Array | None = None,
    *,
    deterministic: bool,
    rngs,
  ) -> jax.Array:
    scanned = isinstance(self.blocks, layers.Stacked)
    table = self.relative_attention_bias if scanned else self.blocks[0].self_attn.relative_attention_bias
    bias_1htt = position_bias(
      table[...], x_btd.shape[1], bidirectional=not self.is_decoder, max_distance=self.max_distance
    )
    x_btd = layers.dropout(x_btd, self.rate, deterministic=deterministic, rngs=rngs)
    args = (mask_bt, bias_1htt, enc_bsd, enc_mask_bs)
    if scanned:
      r = None if deterministic else rngs
      x_btd = self.blocks(x_btd, *args, remat=self.remat, rngs=r, deterministic=deterministic)
    else:  # rngs goes in as an argument: a remat trace may not mutate an Rngs it closes over.
      run = lambda blk, x, m, b, e, em, r: blk(x, m, b, e, em, deterministic=deterministic, rngs=r)
      run = layers.rematerialized(run, self.remat)
      for block in self.blocks:
        x_btd = run(block, x_btd, *args, rngs)
    x_btd = self.final_layer_norm(x_btd)
    return layers.dropout(x_btd, self.rate, deterministic=deterministic, rngs=rngs)


class T5LMHead(nnx.Module):
  """The LM head as a `backbone.VocabProjection`: logits = transform(h) @ kernel_dv().

  Tied: the shared embedding table transposed (v1.0; transformers 5.x Flan-T5
  written from a fresh config). Untied (v1.1 / Flan): its own `kernel` [d, V]
  (drawn N(0, 1) from `rngs.params()` as Hugging Face initialises it). h is
  scaled by d_model**-0.5 when `cfg.scales_lm_head` (v1.0).
  """

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, tied: layers.Embed | None):
    self.tied = tied
    self.scale = cfg.d_model**-0.5 if cfg.scales_lm_head else 1.0
    self.kernel = (
      None
      if tied is not None
      else layers.param(layers.normal_init(rngs.params(), (cfg.d_model, cfg.vocab_size), 1.0), ("embed", "vocab"))
    )

  def transform(self, h_btd: jax.Array) -> jax.Array:
    """float32 h, scaled by d_model**-0.5 when the config scales decoder outputs."""
    h_btd = h_btd.astype(jnp.float32)
    return h_btd * self.scale if self.scale != 1.0 else h_btd

  def kernel_dv(self) -> jax.Array:
    """[d, V]: the untied kernel, or the shared embeddings transposed."""
    return self.kernel[...] if self.kernel is not None else self.tied.embedding[...].T

  def bias_v(self) -> None:
    """T5 has no vocabulary bias."""
    return None

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """Full-vocabulary logits [B, T, V] float32 (small vocabularies: parity tests, decoding)."""
    return jnp.einsum(
      "btd,dv->btv",
      self.transform(h_btd),
      self.kernel_dv().astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32,
    )


def shift_right(ids_bl: jax.Array, start_id: int = 0, pad_id: int = 0) -> jax.Array:
  """Decoder inputs for teacher forcing: [start, ids[:-1]] with -100 (ignored labels) read as pad.

  Applied to an attention mask with `start_id=1` it gives the decoder mask.
  """
  ids_bl = jnp.asarray(ids_bl)
  start_b1 = jnp.full(ids_bl.shape[:1] + (1,), start_id, ids_bl.dtype)
  out_bl = jnp.concatenate([start_b1, ids_bl[:, :-1]], axis=1)
  return jnp.where(out_bl == -100, jnp.asarray(pad_id, ids_bl.dtype), out_bl)


class T5Model(backbone.ConfigBacked, nnx.Module):
  """T5 encoder-decoder: a `backbone.Backbone` whose `__call__` runs `self.mode` (see the module docstring).

  Attributes:
    shared: the token embeddings [V, d] of both stacks.
    encoder / decoder: the stacks (`decoder` None for T5EncoderModel checkpoints).
    lm_head: None unless attached (`make_lm_head`; `hf_weights.load(..., lm_head=True)`).
    mode: the default of `__call__` (a plain attribute: it may be changed after loading).
  """

  def __init__(
    self,
    cfg: T5Config,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    remat: bool | str = False,
    attention_impl: str = "xla",
  ):
    self.config = cfg
    self.dtype = dtype
    self.mode = cfg.mode
    self.shared = layers.Embed(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), std=1.0, rngs=rngs)
    stack = lambda is_decoder: T5Stack(
      cfg, is_decoder=is_decoder, dtype=dtype, rngs=rngs, remat=remat, attention_impl=attention_impl
    )
    self.encoder = stack(False)
    self.decoder = stack(True) if cfg.has_decoder else None
    self.lm_head: T5LMHead | None = nnx.data(None)  # data: a head may be attached later

  @property
  def hidden_size(self) -> int:
    return self.config.d_model

  def shift_right(self, ids_bl: jax.Array) -> jax.Array:
    """`shift_right` with this model's decoder start token (= pad) and pad id."""
    return shift_right(ids_bl, self.config.decoder_start_token_id, self.config.pad_token_id)

  def encode(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Encoder states [B, L, d] in the compute dtype."""
    x_bld = self.shared(input_ids_bl, self.dtype)
    return self.encoder(x_bld, attention_mask_bl, deterministic=deterministic, rngs=rngs)

  def decode(
    self,
    decoder_input_ids_bt: jax.Array,
    decoder_attention_mask_bt: jax.Array | None = None,
    encoder_states_bsd: jax.Array | None = None,
    encoder_mask_bs: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Decoder states [B, T, d] (causal); position t has seen decoder inputs <= t.

    Args:
      decoder_input_ids_bt: [B, T] decoder inputs (teacher forcing: `shift_right(targets)`).
      decoder_attention_mask_bt: [B, T] (ones when None).
      encoder_states_bsd: [B, S, d] from `encode`; None runs the decoder stack
        alone (no cross-attention).
      encoder_mask_bs: [B, S] mask of the encoder input (ones when None).
      deterministic: disables dropout.
      rngs: needs a 'dropout' stream when not deterministic.
    """
    if self.decoder is None:
      raise ValueError("this T5Model has no decoder (a T5EncoderModel checkpoint)")
    if decoder_attention_mask_bt is None:
      decoder_attention_mask_bt = jnp.ones(decoder_input_ids_bt.shape, jnp.int32)
    if encoder_states_bsd is not None and encoder_mask_bs is None:
      encoder_mask_bs = jnp.ones(encoder_states_bsd.shape[:2], jnp.int32)
    x_btd = self.shared(decoder_input_ids_bt, self.dtype)
    return self.decoder(
      x_btd, decoder_attention_mask_bt, encoder_states_bsd, encoder_mask_bs, deterministic=deterministic, rngs=rngs
    )

  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    decoder_input_ids_bl: jax.Array | None = None,
    decoder_attention_mask_bl: jax.Array | None = None,
    mode: str | None = None,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Hidden states h_btd of the chosen mode.

    Args:
      input_ids_bl, attention_mask_bl: [B, L] ids and mask (encoder input; the
        decoder input in "decoder" mode).
      decoder_input_ids_bl: teacher forcing (implies "encoder_decoder"); when
        None in "encoder_decoder" mode: `shift_right(input_ids_bl)`, so that
        output t has seen tokens < t (and the encoder), aligned with
        `attention_mask_bl`.
      decoder_attention_mask_bl: decoder mask (default: the shifted
        `attention_mask_bl` for the default decoder inputs, else ones).
      mode: overrides `self.mode` ("encoder", "encoder_decoder", "decoder").
      deterministic, rngs: dropout control.

    Returns:
      Encoder states ("encoder") or decoder states, [B, T, d].
    """
    mode = "encoder_decoder" if decoder_input_ids_bl is not None else (mode or self.mode)
    kw = dict(deterministic=deterministic, rngs=rngs)
    if mode == "encoder":
      return self.encode(input_ids_bl, attention_mask_bl, **kw)
    if mode == "decoder":
      return self.decode(input_ids_bl, attention_mask_bl, **kw)
    if mode != "encoder_decoder":
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if decoder_input_ids_bl is None:
      decoder_input_ids_bl = self.shift_right(input_ids_bl)
      if decoder_attention_mask_bl is None:
        decoder_attention_mask_bl = shift_right(attention_mask_bl, 1, 0)
    enc_bsd = self.encode(input_ids_bl, attention_mask_bl, **kw)
    return self.decode(decoder_input_ids_bl, decoder_attention_mask_bl, enc_bsd, attention_mask_bl, **kw)


def build(
  cfg: T5Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, remat: bool | str = False, attention_impl: str = "xla"
) -> T5Model:
  """The family's `build`: a T5Model without LM head (`remat`: False, True or a `layers.REMAT_POLICIES` name)."""
  return T5Model(cfg, rngs=rngs, dtype=dtype, remat=remat, attention_impl=attention_impl)


def make_lm_head(model: T5Model, cfg: T5Config, *, rngs: nnx.Rngs) -> T5LMHead:
  """The family's `lm_head`: tied to `model.shared` (v1.0) or a fresh untied kernel (v1.1)."""
  return T5LMHead(cfg, rngs=rngs, tied=model.shared if cfg.tie_word_embeddings else None)


FAMILY = backbone.register(
  backbone.Family(
    name="t5",
    model_types=("t5", "mt5"),
    config_from_hf=T5Config.from_hf_dict,
    build=build,
    lm_head=make_lm_head,
    checkpoint_names=t5_params.checkpoint_names,
    model_class=T5Model,
    modes=("plain", "multi_token", "single_token", "decoder_stack"),
    lora_targets=("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
    known_configs=known_configs.for_model_types("t5", "mt5"),
    special_tokens="keep",
    attention_shape=lambda c: (c.d_kv, True),
  )
)
