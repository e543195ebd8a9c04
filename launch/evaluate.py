r"""Encodes the judged queries, searches an index, writes a TREC run, reports metrics.

  python launch/evaluate.py --encoder sentence-transformers/all-MiniLM-L6-v2 --head mlm \
      --collection ../shared/data/scifact --split test --index /tmp/scifact_mlm_index \
      --run /tmp/scifact_mlm.run --k_query 128
"""
import argparse
import json

from laspar_jax.data.sources import load_collection
from laspar_jax.evaluate import DEFAULT_MEASURES, evaluate_encoder
from laspar_jax.models.sparse_encoder import load_encoder


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--encoder", required=True, help="saved encoder dir, backbone dir or hub id")
  p.add_argument("--head", default=None)
  p.add_argument("--latent_dim", type=int, default=None)
  p.add_argument("--collection", required=True)
  p.add_argument("--split", default="test")
  p.add_argument("--index", required=True)
  p.add_argument("--run", default=None, help="TREC run file to write")
  p.add_argument("--k_query", type=int, default=128)
  p.add_argument("--k", type=int, default=1000, help="documents per query")
  p.add_argument("--measures", default=",".join(DEFAULT_MEASURES))
  p.add_argument("--mode", default="exact", help="exact|approx")
  p.add_argument("--json", default=None, help="also write the report as JSON here")
  a = p.parse_args()
  overrides = {k: v for k, v in (("head", a.head), ("latent_dim", a.latent_dim)) if v is not None}
  encoder, tokenizer = load_encoder(a.encoder, **overrides)
  out = evaluate_encoder(encoder, tokenizer, load_collection(a.collection, split=a.split), a.index,
                         k=a.k, k_query=a.k_query, measures=a.measures.split(","),
                         run_path=a.run, mode=a.mode)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
