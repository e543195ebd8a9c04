r"""Encodes a corpus with a sparse encoder into an on-disk inverted index.

  # A trained encoder over the collection and document top-k of its config:
  python launch/index.py --config configs/laspar.py:scifact --encoder /tmp/laspar_scifact/encoder \
      --index /tmp/laspar_scifact_index

  # A fresh head on a backbone, everything given as flags:
  python launch/index.py --encoder sentence-transformers/all-MiniLM-L6-v2 --head mlm \
      --collection ../shared/data/scifact --index /tmp/scifact_mlm_index --k_doc 512

With --config, --collection/--split/--k_doc/--batch_size default to the
config's `eval` section and a missing --encoder builds the config's `model`
(a fresh head); explicit flags win. `--config.a.b=value` overrides any field.

Multi-host (`--jax_distributed`, see launch/distributed_flags.py): each
process encodes its share of the corpus into `<index>.parts/part-<p>`, and
process 0 alone merges them into `<index>` (laspar_jax/distributed_index.py);
the index path must be on a filesystem every host sees.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import encoder_flags as ef  # noqa: E402  (launch/encoder_flags.py)
from laspar_jax import distributed, distributed_index  # noqa: E402

_K_DOC = flags.DEFINE_integer("k_doc", None, "dims kept per document (default config.eval.d_topk, else 512)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "documents per encoder call (default config.eval, else 32)")
_VALUE_DTYPE = flags.DEFINE_enum("value_dtype", "float32", ["float32", "float16", "uint8", "uint16"], "stored weights")
_RAM_BUDGET_GB = flags.DEFINE_float("ram_budget_gb", 4.0, "memory target of the index build")
_APPROX = flags.DEFINE_bool("approx", False, "also write the approximate-search structures")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing index")
# H2 (issue 21): the compressed posting format (index/compress.py); "blocked" + uint8 = 8-bit impacts.
_POSTING_FORMAT = flags.DEFINE_enum("posting_format", "raw", ["raw", "blocked"], "raw (v1) or compressed blocks (v2)")


def main(argv):
  del argv
  c = ef.setup()
  encoder, tokenizer = ef.encoder_and_tokenizer(c)
  path = distributed_index.index_collection(  # one process: encode.index_collection
    encoder,
    tokenizer,
    ef.collection(c),
    ef.INDEX.value,
    k_doc=ef.setting(_K_DOC, c, "eval.d_topk", 512),
    batch_size=ef.setting(_BATCH_SIZE, c, "eval.batch_size", 32),
    value_dtype=_VALUE_DTYPE.value,
    approx=_APPROX.value,
    ram_budget_bytes=int(_RAM_BUDGET_GB.value * 2**30),
    overwrite=_OVERWRITE.value,
    posting_format=_POSTING_FORMAT.value,  # H2 (issue 21)
  )
  if distributed.is_lead():
    print(f"index written to {path}")


if __name__ == "__main__":
  app.run(main)
