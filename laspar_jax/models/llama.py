"""Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM) in Flax NNX; the "llama" family.

Pre-RMSNorm blocks with rotary positions (`rope_theta`, optional Llama 3.1
`rope_scaling`), grouped-query attention (`num_key_value_heads`), optional
attention biases (`attention_bias` on q/k/v/o; Qwen2: q/k/v only), a SwiGLU MLP
and a final RMSNorm; the LM head tied to `embed_tokens` or its own.

Positions come from the attention mask, max(cumsum(mask) - 1, 0), so left and
right padding give every real token the positions of the unpadded sequence.
Causal by default; `bidirectional` (LLM2Vec style) drops the causal mask.
Sliding windows (Mistral's `sliding_window`, Qwen2's sliding layers) mask keys
s with t - s >= window, over array indices as transformers does (a window no
shorter than the sequence changes nothing); they apply to causal attention
only. `scan_layers` stacks the layers (`layers.Stacked`) and runs them with
`lax.scan`; the name map is the same. HF attention dropout is not modelled
(the family has no hidden dropout; checkpoints use 0).

Family facts (`FAMILY`): decoder-only (read-outs "plain", "echo",
"last_token"; BOS never pooled); special tokens "positions" (as OPT in the
reference); GGUF architectures llama, mistral, qwen2.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax.models import attention, backbone, known_configs, layers, llama_params


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters (Hugging Face names, plus `qkv_bias`, `layer_windows`, `bidirectional`, `scan_layers`)."""

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted dict items (hashable)
  attention_bias: bool = False  # bias on q, k, v and o (Llama)
  qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  pad_token_id: int = 0
  layer_windows: tuple[int | None, ...] = ()  # per layer sliding window (None: full causal)
  bidirectional: bool = False
  scan_layers: bool = False
  model_type: str = "llama"

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
    """Builds the config from a Llama / Qwen2 / Mistral config.json dict; ValueError on bad values."""
    names = {f.name for f in dataclasses.fields(cls)} - {
      "rope_scaling",
      "layer_windows",
      "head_dim",
      "pad_token_id",
      "qkv_bias",
    }
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    heads = d["num_attention_heads"]
    kw["num_key_value_heads"] = d.get("num_key_value_heads") or heads
    kw["head_dim"] = d.get("head_dim") or d["hidden_size"] // heads
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", cls.rope_theta)))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kw["rope_scaling"] = None if kind == "default" else tuple(sorted(scaling.items()))
    kw["pad_token_id"] = _first(d.get("pad_token_id"), d.get("eos_token_id"), 0)
    model_type = d.get("model_type", "llama")
    kw["qkv_bias"] = model_type == "qwen2"
    n = d["num_hidden_layers"]
    if model_type == "qwen2":
      window = d.get("sliding_window") if d.get("use_sliding_window") else None
      types = d.get("layer_types") or [
        "sliding_attention" if window and i >= d.get("max_window_layers", 28) else "full_attention" for i in range(n)
      ]
      kw["layer_windows"] = tuple(window if t == "sliding_attention" else None for t in types)
    else:
      kw["layer_windows"] = (d.get("sliding_window") if model_type == "mistral" else None,) * n
    cfg = cls(**kw)
    layers.activation(cfg.hidden_act)
    layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))
    if heads % cfg.num_key_value_heads:
      raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def _first(*values: Any) -> int:
  for v in values:
    if isinstance(v, (list, tuple)):
      v = v[0] if v else None
    if v is not None:
      return int(v)
  return 0


class LlamaAttention(nnx.Module):
  """Rotary grouped-query self-attention with q_proj, k_proj, v_proj, o_proj."""

  def __init__(self, cfg: LlamaConfig, *, window: int | None, dtype: Any, rngs: nnx.Rngs, attention_impl: str):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
    self.causal = not cfg.bidirectional
    self.window = window
    self.attention_impl = attention_impl
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    dense = lambda i, o, axes, bias: layers.Dense(i, o, axes=axes, use_bias=bias, dtype=dtype, rngs=rngs)
    self.q_proj = dense(d, self.num_heads * hd, ("embed", "heads"), qkv_bias)
    self.k_proj = dense(d, self.num_kv * hd, ("embed", "kv"), qkv_bias)
    self.v_proj = dense(d, self.num_kv * hd, ("embed", "kv"), qkv_bias)
    self.o_proj = dense(self.num_heads * hd, d, ("heads", "embed"), cfg.attention_bias)

  def __call__(self, x_btd, mask_bt, cos_btd, sin_btd, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    b, t, _ = x_btd.shape
    q = layers.apply_rope(self.q_proj(x_btd, rngs=rngs).reshape(b, t, self.num_heads, self.head_dim), cos_btd, sin_btd)
    k = layers.apply_rope(self.k_proj(x_btd, rngs=rngs).reshape(b, t, self.num_kv, self.head_dim), cos_btd, sin_btd)
    v = self.v_proj(x_btd, rngs=rngs).reshape(b, t, self.num_kv, self.head_dim)
    mask = mask_bt
    if self.causal and self.window is not None and self.window < t:
      idx = jnp.arange(t)
      near_tt = (idx[:, None] - idx[None, :]) < self.window
      mask = (mask_bt > 0)[:, None, :] & near_tt[None]
    a_bthk = attention.attention(q, k, v, mask_bs=mask, causal=self.causal, impl=self.attention_impl)
    return self.o_proj(a_bthk.reshape(b, t, self.num_heads * self.head_dim), rngs=rngs)


class LlamaDecoderLayer(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: LlamaConfig, *, window: int | None, dtype: Any, rngs: nnx.Rngs, attention_impl: str):
    d = cfg.hidden_size
    self.input_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps)
    self.self_attn = LlamaAttention(cfg, window=window, dtype=dtype, rngs=rngs, attention_impl=attention_impl)
    self.post_attention_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps)
    self.mlp = layers.GatedMLP(
      d, cfg.intermediate_size, act=cfg.hidden_act, use_bias=cfg.mlp_bias, dtype=dtype, rngs=rngs
    )

  def __call__(self, x_btd, mask_bt, cos_btd, sin_btd, rngs: nnx.Rngs | None = None) -> jax.Array:
    """One block; `rngs` is the adapters' dropout stream (lora.LoRADense) while training, else None."""
    x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), mask_bt, cos_btd, sin_btd, rngs=rngs)
    return x_btd + self.mlp(self.post_attention_layernorm(x_btd), rngs=rngs)


class LlamaModel(backbone.ConfigBacked, nnx.Module):
  """Llama-family decoder: ids -> h_btd after the final RMSNorm; a `backbone.Backbone`."""

  def __init__(
    self,
    cfg: LlamaConfig,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    remat: bool | str = False,
    attention_impl: str = "xla",
  ):
    self.config = cfg
    self.dtype = dtype
    self.remat = remat
    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))
    self.inv_freq = tuple(float(f) for f in inv_freq)  # static (hashable), exact fp32 values
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), rngs=rngs)
    windows = cfg.layer_windows or (None,) * cfg.num_hidden_layers
    make = lambda w: LlamaDecoderLayer(cfg, window=w, dtype=dtype, rngs=rngs, attention_impl=attention_impl)
    if cfg.scan_layers:
      if len(set(windows)) > 1:
        raise ValueError("scan_layers needs the same sliding window in every layer")
      self.layers = layers.Stacked(lambda _: make(windows[0]), cfg.num_hidden_layers)
    else:
      self.layers = nnx.List([make(w) for w in windows])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    self.lm_head: layers.LMHead | None = nnx.data(None)  # data: a head may be attached later

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Returns h_btd (after the final RMSNorm) in the compute dtype.

    Args:
      input_ids_bl: [B, L] token ids.
      attention_mask_bl: [B, L] 1 for real tokens, 0 for padding (either side).
      deterministic, rngs: the family has no dropout of its own; while training
        (`deterministic` False) `rngs` reaches LoRA adapters' dropout.
    """
    r = None if deterministic else rngs
    pos_bl = jnp.maximum(jnp.cumsum(attention_mask_bl.astype(jnp.int32), axis=1) - 1, 0)
    cos_bld, sin_bld = layers.rope_cos_sin(pos_bl, jnp.asarray(self.inv_freq, jnp.float32))
    x_bld = self.embed_tokens(input_ids_bl, self.dtype)
    if self.config.scan_layers:
      x_bld = self.layers(x_bld, attention_mask_bl, cos_bld, sin_bld, remat=self.remat, rngs=r)
    else:
      run = layers.rematerialized(lambda lyr, *a: lyr(*a), self.remat)
      for layer in self.layers:
        x_bld = run(layer, x_bld, attention_mask_bl, cos_bld, sin_bld, r)
    return self.norm(x_bld)


def build(
  cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, remat: bool | str = False, attention_impl: str = "xla"
) -> LlamaModel:
  """The family's `build`: a LlamaModel without LM head (`remat`: False, True or a `layers.REMAT_POLICIES` name)."""
  return LlamaModel(cfg, rngs=rngs, dtype=dtype, remat=remat, attention_impl=attention_impl)


def make_lm_head(model: LlamaModel, cfg: LlamaConfig, *, rngs: nnx.Rngs) -> layers.LMHead:
  """The family's `lm_head`: tied to `embed_tokens` when `tie_word_embeddings`, else its own kernel."""
  tied = model.embed_tokens if cfg.tie_word_embeddings else None
  return layers.LMHead(cfg.hidden_size, cfg.vocab_size, tied=tied, rngs=rngs)


FAMILY = backbone.register(
  backbone.Family(
    name="llama",
    model_types=("llama", "qwen2", "mistral"),
    config_from_hf=LlamaConfig.from_hf_dict,
    build=build,
    lm_head=make_lm_head,
    checkpoint_names=llama_params.checkpoint_names,
    model_class=LlamaModel,
    decoder_only=True,
    modes=("plain", "echo", "last_token"),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    gguf_architectures={"llama": ("llama", True), "mistral": ("mistral", True), "qwen2": ("qwen2", False)},
    known_configs=known_configs.for_model_types("llama", "qwen2", "mistral"),
    special_tokens="positions",
    attention_shape=lambda c: (c.head_dim, False),
  )
)
