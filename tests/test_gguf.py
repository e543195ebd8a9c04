"""GGUF reading: dequantization, q/k un-permutation, name and config mapping, tokenizer, bad files.

Tiny Llama-shaped GGUF files are written here with the `gguf` package.
"""

from __future__ import annotations

import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from laspar_jax.models import gguf as gguf_lib
from laspar_jax.models import hf_weights
from laspar_jax.gguf_tokenizer import byte_alphabet
from laspar_jax.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
HIDDEN, INTER, HEADS, KV, LAYERS = 64, 96, 4, 2, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
TEMPLATE = (
  "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokens() -> list[str]:
  byte_tokens = list(byte_alphabet().values())
  return SPECIALS + byte_tokens + [m.replace(" ", "") for m in MERGES]


def hf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
  """Random tensors of a tiny Llama in Hugging Face names and layout."""
  rng = np.random.default_rng(seed)
  vocab, hd = len(_tokens()), HIDDEN // HEADS
  t = {
    "model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)),
    "model.norm.weight": 1 + 0.1 * rng.standard_normal(HIDDEN),
  }
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    t.update(
      {
        p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(HIDDEN),
        p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(HIDDEN),
        p + "self_attn.q_proj.weight": 0.1 * rng.standard_normal((HEADS * hd, HIDDEN)),
        p + "self_attn.k_proj.weight": 0.1 * rng.standard_normal((KV * hd, HIDDEN)),
        p + "self_attn.v_proj.weight": 0.1 * rng.standard_normal((KV * hd, HIDDEN)),
        p + "self_attn.o_proj.weight": 0.1 * rng.standard_normal((HIDDEN, HEADS * hd)),
        p + "mlp.gate_proj.weight": 0.1 * rng.standard_normal((INTER, HIDDEN)),
        p + "mlp.up_proj.weight": 0.1 * rng.standard_normal((INTER, HIDDEN)),
        p + "mlp.down_proj.weight": 0.1 * rng.standard_normal((HIDDEN, INTER)),
      }
    )
  return {k: v.astype(np.float32) for k, v in t.items()}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf's LlamaModel.permute (HF -> llama.cpp row order)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {v: k for k, v in gguf_lib._LAYER_NAMES.items()}  # pylint: disable=protected-access


def gguf_name(hf: str) -> str:
  if hf.startswith("model.layers."):
    _, _, i, rest = hf.split(".", 3)
    base, _, kind = rest.rpartition(".")
    return f"blk.{i}.{_TO_GGUF[base]}.{kind}"
  return {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
  }[hf]


def write_gguf(
  path: str,
  tensors: dict[str, np.ndarray],
  *,
  qtype: Q = Q.F32,
  arch: str = "llama",
  extra: dict[str, tuple[np.ndarray, Q]] | None = None,
) -> str:
  """A GGUF file of `tensors` (HF names), matrices stored as `qtype`, with a byte-level BPE tokenizer."""
  w = gguf.GGUFWriter(path, arch)
  w.add_uint32(f"{arch}.block_count", LAYERS)
  w.add_uint32(f"{arch}.context_length", 128)
  w.add_uint32(f"{arch}.embedding_length", HIDDEN)
  w.add_uint32(f"{arch}.feed_forward_length", INTER)
  w.add_uint32(f"{arch}.attention.head_count", HEADS)
  w.add_uint32(f"{arch}.attention.head_count_kv", KV)
  w.add_float32(f"{arch}.rope.freq_base", 10000.0)
  w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
  tokens = _tokens()
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_add_bos_token(False)
  w.add_chat_template(TEMPLATE)
  for name, arr in tensors.items():
    if name.endswith("q_proj.weight"):
      arr = _permute(arr, HEADS)
    elif name.endswith("k_proj.weight"):
      arr = _permute(arr, KV)
    if arr.ndim == 1 or qtype == Q.F32:
      w.add_tensor(gguf_name(name), arr)
    elif qtype == Q.F16:
      w.add_tensor(gguf_name(name), arr.astype(np.float16))
    else:
      w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
  for name, (arr, q) in (extra or {}).items():
    w.add_tensor(name, gguf.quants.quantize(arr, q) if q not in (Q.F32,) else arr, raw_dtype=q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_read_dequantizes_and_unpermutes(tmp_path, qtype):
  tensors = hf_tensors()
  path = write_gguf(str(tmp_path / "m.gguf"), tensors, qtype=qtype)
  cfg, got = gguf_lib.read(path)
  assert set(got) == set(tensors)
  for name, want in tensors.items():
    if want.ndim == 2 and qtype != Q.F32:  # what the quantization keeps, in HF row order
      raw = gguf.quants.dequantize(
        gguf.quants.quantize(want, qtype) if qtype != Q.F16 else want.astype(np.float16), qtype
      )
      want = np.asarray(raw, np.float32).reshape(want.shape)
    assert got[name].dtype == np.float32 and got[name].shape == want.shape, name
    np.testing.assert_array_equal(got[name], want, err_msg=name)
  assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
  assert (
    cfg["hidden_size"],
    cfg["intermediate_size"],
    cfg["num_attention_heads"],
    cfg["num_key_value_heads"],
    cfg["num_hidden_layers"],
    cfg["vocab_size"],
  ) == (HIDDEN, INTER, HEADS, KV, LAYERS, len(_tokens()))
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)


def test_load_gguf_matches_safetensors(tmp_path):
  tensors = hf_tensors()
  path = write_gguf(str(tmp_path / "m.gguf"), tensors)
  folder = tmp_path / "hf"
  folder.mkdir()
  cfg, _ = gguf_lib.read(path)
  (folder / "config.json").write_text(json.dumps(cfg))
  save_file(tensors, str(folder / "model.safetensors"))
  (folder / "tokenizer.json").write_text(Tokenizer.from_gguf(path).to_json())
  a = hf_weights.load(path, lm_head=True)
  b = hf_weights.load(str(folder), lm_head=True)
  assert a.path == path and a.hf_config["model_type"] == "llama"
  ids = jnp.asarray([[5, 70, 80, 261, 0, 0], [3, 4, 5, 6, 7, 8]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1] * 6], jnp.int32)
  la, lb = a.model.lm_head.logits(a.model(ids, mask)), b.model.lm_head.logits(b.model(ids, mask))
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-6)
  # a folder holding one .gguf (and no config.json) loads the same
  c = hf_weights.load(str(tmp_path), weights=False)
  assert c.path == path


def test_gguf_tokenizer_and_chat_template(tmp_path):
  path = write_gguf(str(tmp_path / "m.gguf"), hf_tensors())
  tok = Tokenizer.from_gguf(path, max_length=16)
  vocab = tok.vocab()
  ids = tok(["the the a<|im_end|>"])["input_ids"][0]
  assert list(ids[:6]) == [vocab["t"], vocab["he"], vocab["Ġthe"], vocab["Ġa"], 2, 0]
  assert tok.pad_id == 0 and tok.num_special_tokens == 0 and set(tok.special_ids) >= {0, 1, 2}
  assert tok.decode_batch([[vocab["Ġthe"]]])[0] == " the"
  prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert Tokenizer.from_dir(str(tmp_path)).vocab_size == tok.vocab_size  # the folder's single .gguf


def test_unsupported_quantization_names_tensor_and_file(tmp_path):
  tensors = hf_tensors()
  path = write_gguf(str(tmp_path / "m.gguf"), tensors, qtype=Q.Q5_0)
  with pytest.raises(
    hf_weights.CheckpointError,
    match=r"m\.gguf.*blk\.0\.ffn_down\.weight.*Q5_0|"
    r"m\.gguf.*token_embd.*Q5_0|m\.gguf.*Q5_0",
  ):
    hf_weights.load(path)
  with pytest.raises(hf_weights.CheckpointError, match=r"m\.gguf: tensor '[a-z_.0-9]+' has GGUF type Q5_0"):
    hf_weights.load(path)


def test_bad_gguf_files(tmp_path):
  tensors = hf_tensors()
  p = write_gguf(str(tmp_path / "arch.gguf"), tensors, arch="gpt2")
  with pytest.raises(hf_weights.CheckpointError, match="arch.gguf.*architecture 'gpt2'"):
    hf_weights.load(p)
  p = write_gguf(str(tmp_path / "extra.gguf"), tensors, extra={"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)})
  with pytest.raises(hf_weights.CheckpointError, match="extra.gguf.*unexpected GGUF tensor 'rope_freqs.weight'"):
    hf_weights.load(p)
  p = write_gguf(str(tmp_path / "cut.gguf"), tensors)
  data = open(p, "rb").read()
  with open(p, "wb") as f:
    f.write(data[: len(data) - 5000])
  with pytest.raises(hf_weights.CheckpointError, match="cut.gguf"):
    hf_weights.load(p)
  two = tmp_path / "two"
  two.mkdir()
  write_gguf(str(two / "a.gguf"), tensors)
  write_gguf(str(two / "b.gguf"), tensors)
  with pytest.raises(hf_weights.CheckpointError, match="several .gguf"):
    hf_weights.load(str(two))
  missing = dict(tensors)
  del missing["model.layers.1.mlp.up_proj.weight"]
  p = write_gguf(str(tmp_path / "missing.gguf"), missing)
  with pytest.raises(hf_weights.CheckpointError, match=r"missing.gguf: missing tensors.*layers\.1\.mlp\.up_proj"):
    hf_weights.load(p)
  assert os.path.exists(p)
