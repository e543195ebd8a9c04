r"""Encodes a corpus with a sparse encoder into an on-disk inverted index.

  python launch/index.py --encoder sentence-transformers/all-MiniLM-L6-v2 --head mlm \
      --collection ../shared/data/scifact --index /tmp/scifact_mlm_index --k_doc 512
"""
import argparse

from laspar_jax.data.sources import load_collection
from laspar_jax.index import build_index_from_encoder
from laspar_jax.models.sparse_encoder import load_encoder


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--encoder", required=True, help="saved encoder dir, backbone dir or hub id")
  p.add_argument("--head", default=None, help="head for a fresh encoder (mlm, latent_attention, ...)")
  p.add_argument("--latent_dim", type=int, default=None)
  p.add_argument("--collection", required=True, help="collection spec (dir or ir_datasets id)")
  p.add_argument("--split", default=None)
  p.add_argument("--index", required=True, help="index directory to write")
  p.add_argument("--k_doc", type=int, default=512)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--value_dtype", default="float32", help="float32|float16|uint8|uint16")
  p.add_argument("--ram_budget_gb", type=float, default=4.0)
  p.add_argument("--approx", action="store_true", help="also write approx-search structures")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
  a = p.parse_args()
  if a.distributed:
    import jax
    jax.distributed.initialize()
  overrides = {k: v for k, v in (("head", a.head), ("latent_dim", a.latent_dim)) if v is not None}
  encoder, tokenizer = load_encoder(a.encoder, **overrides)
  path = build_index_from_encoder(
      encoder, tokenizer, load_collection(a.collection, split=a.split), a.index, k_doc=a.k_doc,
      batch_size=a.batch_size, value_dtype=a.value_dtype, approx=a.approx,
      ram_budget_bytes=int(a.ram_budget_gb * 2**30), overwrite=a.overwrite)
  print(f"index written to {path}")


if __name__ == "__main__":
  main()
