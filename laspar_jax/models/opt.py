"""OPT decoder (Zhang et al., 2022) in Flax NNX; the "opt" family.

Learned positions with OPT's offset 2, computed from the attention mask
(cumsum(mask) * mask - 1, so left padding works); pre-LN blocks
(`do_layer_norm_before`, 125m and >= 1.3b) with a final LayerNorm, or the
opt-350m post-LN blocks without one; `project_in` / `project_out` when the
word embeddings live in a smaller space (`word_embed_proj_dim` != hidden_size);
ReLU FFN (fc1, fc2); LM head tied to `embed_tokens`. `scan_layers` stacks the
layers (`layers.Stacked`) and runs them with `lax.scan`, as Llama's.

The backbone output h_btd is HF's `last_hidden_state`: after the final norm
and after `project_out`, so `hidden_size` is `word_embed_proj_dim` (the space
the LM head works in). Submodules carry HF's names (the name map is `opt_params.py`).

Family facts (`FAMILY`): decoder-only (read-outs "plain", "echo",
"last_token"; BOS never pooled); special tokens "positions" (the reference's
mlm_de_multi_opt multiplies by 1 - special_tokens_mask).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax.models import attention, backbone, known_configs, layers, opt_params

POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """Hyper-parameters of an OPT decoder (Hugging Face names; `bidirectional` and `scan_layers` are ours)."""

  vocab_size: int = 50272
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  ffn_dim: int = 3072
  word_embed_proj_dim: int = 768
  max_position_embeddings: int = 2048
  do_layer_norm_before: bool = True
  remove_final_layer_norm: bool = False
  enable_bias: bool = True
  activation_function: str = "relu"
  dropout: float = 0.1
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bidirectional: bool = False  # LLM2Vec-style: no causal mask
  scan_layers: bool = False  # stacked layers run by lax.scan (layers.Stacked); same name map, row i = layer i

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "OPTConfig":
    """Builds the config from a Hugging Face config.json dict; ValueError on unsupported values."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    kw["remove_final_layer_norm"] = bool(d.get("_remove_final_layer_norm", False))
    if kw.get("word_embed_proj_dim") is None:
      kw["word_embed_proj_dim"] = d.get("hidden_size", cls.hidden_size)
    cfg = cls(**kw)
    layers.activation(cfg.activation_function)
    if not d.get("layer_norm_elementwise_affine", True):
      raise ValueError("layer_norm_elementwise_affine=False is not supported")
    if cfg.hidden_size % cfg.num_attention_heads:
      raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return cfg


class OPTAttention(nnx.Module):
  """Multi-head self-attention with q_proj, k_proj, v_proj, out_proj."""

  def __init__(self, cfg: OPTConfig, *, dtype: Any, rngs: nnx.Rngs, attention_impl: str):
    d, bias = cfg.hidden_size, cfg.enable_bias
    self.num_heads = cfg.num_attention_heads
    self.causal = not cfg.bidirectional
    self.attention_impl = attention_impl
    dense = lambda axes: layers.Dense(d, d, axes=axes, use_bias=bias, dtype=dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = (dense(("embed", "heads")) for _ in range(3))
    self.out_proj = dense(("heads", "embed"))

  def __call__(self, x_btd: jax.Array, mask_bt: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    b, t, d = x_btd.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    a_bthk = attention.attention(
      split(self.q_proj(x_btd, rngs=rngs)),
      split(self.k_proj(x_btd, rngs=rngs)),
      split(self.v_proj(x_btd, rngs=rngs)),
      mask_bs=mask_bt,
      causal=self.causal,
      impl=self.attention_impl,
    )
    return self.out_proj(a_bthk.reshape(b, t, d), rngs=rngs)


class OPTDecoderLayer(nnx.Module):
  """One OPT block: pre-LN (norm, sublayer, add) or post-LN (sublayer, add, norm)."""

  def __init__(self, cfg: OPTConfig, *, dtype: Any, rngs: nnx.Rngs, attention_impl: str):
    d, f = cfg.hidden_size, cfg.ffn_dim
    self.self_attn = OPTAttention(cfg, dtype=dtype, rngs=rngs, attention_impl=attention_impl)
    self.self_attn_layer_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps)
    self.fc1 = layers.Dense(d, f, axes=("embed", "mlp"), use_bias=cfg.enable_bias, dtype=dtype, rngs=rngs)
    self.fc2 = layers.Dense(f, d, axes=("mlp", "embed"), use_bias=cfg.enable_bias, dtype=dtype, rngs=rngs)
    self.final_layer_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps)
    self.pre_ln = cfg.do_layer_norm_before
    self.act = cfg.activation_function
    self.rate = cfg.dropout

  def __call__(self, x_btd, mask_bt, *, deterministic: bool, rngs) -> jax.Array:
    drop = lambda y: layers.dropout(y, self.rate, deterministic=deterministic, rngs=rngs)
    r = None if deterministic else rngs  # adapters' dropout stream (lora.LoRADense), training only
    h_btd = self.self_attn_layer_norm(x_btd) if self.pre_ln else x_btd
    x_btd = x_btd + drop(self.self_attn(h_btd, mask_bt, rngs=r))
    if not self.pre_ln:
      x_btd = self.self_attn_layer_norm(x_btd)
    h_btd = self.final_layer_norm(x_btd) if self.pre_ln else x_btd
    x_btd = x_btd + drop(self.fc2(layers.activation(self.act)(self.fc1(h_btd, rngs=r)), rngs=r))
    return x_btd if self.pre_ln else self.final_layer_norm(x_btd)


class OPTModel(backbone.ConfigBacked, nnx.Module):
  """OPT decoder: ids -> last hidden states h_btd [B, T, word_embed_proj_dim]; a `backbone.Backbone`."""

  def __init__(
    self,
    cfg: OPTConfig,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    remat: bool | str = False,
    attention_impl: str = "xla",
  ):
    self.config = cfg
    self.dtype = dtype
    self.remat = remat
    d, w = cfg.hidden_size, cfg.word_embed_proj_dim
    self.embed_tokens = layers.Embed(cfg.vocab_size, w, axes=("vocab", "embed"), rngs=rngs)
    self.embed_positions = layers.Embed(
      cfg.max_position_embeddings + POSITION_OFFSET, d, axes=(None, "embed"), rngs=rngs
    )
    proj = w != d
    self.project_in = layers.Dense(w, d, axes=(None, "embed"), use_bias=False, dtype=dtype, rngs=rngs) if proj else None
    self.project_out = (
      layers.Dense(d, w, axes=("embed", None), use_bias=False, dtype=dtype, rngs=rngs) if proj else None
    )
    make = lambda _: OPTDecoderLayer(cfg, dtype=dtype, rngs=rngs, attention_impl=attention_impl)
    n = cfg.num_hidden_layers
    self.layers = layers.Stacked(make, n) if cfg.scan_layers else nnx.List([make(i) for i in range(n)])
    final = cfg.do_layer_norm_before and not cfg.remove_final_layer_norm
    self.final_layer_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps) if final else None
    self.lm_head: layers.LMHead | None = nnx.data(None)  # data: a head may be attached later

  @property
  def hidden_size(self) -> int:
    return self.config.word_embed_proj_dim

  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Returns h_btd (after the final norm and project_out) in the compute dtype.

    Args:
      input_ids_bl: [B, L] token ids.
      attention_mask_bl: [B, L] 1 for real tokens, 0 for padding (either side).
      deterministic: disables dropout.
      rngs: needs a 'dropout' stream when not deterministic.
    """
    mask_bl = attention_mask_bl.astype(jnp.int32)
    pos_bl = jnp.cumsum(mask_bl, axis=1) * mask_bl - 1 + POSITION_OFFSET
    x_bld = self.embed_tokens(input_ids_bl, self.dtype)
    if self.project_in is not None:
      x_bld = self.project_in(x_bld)
    x_bld = x_bld + self.embed_positions(pos_bl, self.dtype)  # no embedding dropout (as HF)
    if self.config.scan_layers:
      r = None if deterministic else rngs
      x_bld = self.layers(x_bld, attention_mask_bl, remat=self.remat, rngs=r, deterministic=deterministic)
    else:  # rngs goes in as an argument: a remat trace may not mutate a closed-over Rngs
      run = layers.rematerialized(lambda lyr, h, m, r: lyr(h, m, deterministic=deterministic, rngs=r), self.remat)
      for layer in self.layers:
        x_bld = run(layer, x_bld, attention_mask_bl, rngs)
    if self.final_layer_norm is not None:
      x_bld = self.final_layer_norm(x_bld)
    if self.project_out is not None:
      x_bld = self.project_out(x_bld)
    return x_bld


def build(
  cfg: OPTConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, remat: bool | str = False, attention_impl: str = "xla"
) -> OPTModel:
  """The family's `build`: an OPTModel without LM head (`remat`: False, True or a `layers.REMAT_POLICIES` name)."""
  return OPTModel(cfg, rngs=rngs, dtype=dtype, remat=remat, attention_impl=attention_impl)


def make_lm_head(model: OPTModel, cfg: OPTConfig, *, rngs: nnx.Rngs) -> layers.LMHead:
  """The family's `lm_head`: tied to `embed_tokens` (OPT always ties it)."""
  return layers.LMHead(cfg.word_embed_proj_dim, cfg.vocab_size, tied=model.embed_tokens, rngs=rngs)


FAMILY = backbone.register(
  backbone.Family(
    name="opt",
    model_types=("opt",),
    config_from_hf=OPTConfig.from_hf_dict,
    build=build,
    lm_head=make_lm_head,
    checkpoint_names=opt_params.checkpoint_names,
    model_class=OPTModel,
    decoder_only=True,
    modes=("plain", "echo", "last_token"),
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    known_configs=known_configs.for_model_types("opt"),
    special_tokens="positions",
    attention_shape=lambda c: (c.hidden_size // c.num_attention_heads, False),
  )
)
