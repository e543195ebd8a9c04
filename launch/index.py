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
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from laspar_jax import config_lib, encode  # noqa: E402
from laspar_jax.data.sources import load_collection  # noqa: E402
from laspar_jax.models.sparse_encoder import load_encoder  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG] (optional)", lock_config=True)
_ENCODER = flags.DEFINE_string("encoder", None, "saved encoder dir, backbone dir or hub id "
                               "(default: config.model.backbone with a fresh head)")
_HEAD = flags.DEFINE_string("head", None, "head of a fresh encoder (mlm, latent_attention, ...)")
_LATENT_DIM = flags.DEFINE_integer("latent_dim", None, "D of a fresh latent head")
_COLLECTION = flags.DEFINE_string("collection", None, "collection (dir or ir_datasets id; default config.eval)")
_SPLIT = flags.DEFINE_string("split", None, "qrels split (default config.eval.split)")
_INDEX = flags.DEFINE_string("index", None, "index directory to write")
_K_DOC = flags.DEFINE_integer("k_doc", None, "dims kept per document (default config.eval.d_topk, else 512)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "documents per encoder call (default config.eval, else 32)")
_VALUE_DTYPE = flags.DEFINE_enum("value_dtype", "float32", ["float32", "float16", "uint8", "uint16"],
                                 "stored weights")
_RAM_BUDGET_GB = flags.DEFINE_float("ram_budget_gb", 4.0, "memory target of the index build")
_APPROX = flags.DEFINE_bool("approx", False, "also write the approximate-search structures")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing index")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "jax.distributed.initialize() (multi-host)")
flags.mark_flags_as_required(["index"])


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  c = _CONFIG.value
  if _ENCODER.value is None and c is None:
    raise app.UsageError("give --encoder or --config")
  fields = {"backbone": _ENCODER.value} if _ENCODER.value is not None else config_lib.encoder_fields(c)
  fields.update({k: v for k, v in (("head", _HEAD.value), ("latent_dim", _LATENT_DIM.value)) if v is not None})
  encoder, tokenizer = load_encoder(fields.pop("backbone"), **fields)
  collection = config_lib.setting(_COLLECTION.value, c, "eval.collection", None)
  if collection is None:
    raise app.UsageError("give --collection or --config")
  docs = load_collection(collection, split=config_lib.setting(_SPLIT.value, c, "eval.split", None))
  path = encode.index_collection(
      encoder, tokenizer, docs, _INDEX.value, k_doc=config_lib.setting(_K_DOC.value, c, "eval.d_topk", 512),
      batch_size=config_lib.setting(_BATCH_SIZE.value, c, "eval.batch_size", 32),
      value_dtype=_VALUE_DTYPE.value, approx=_APPROX.value, ram_budget_bytes=int(_RAM_BUDGET_GB.value * 2**30),
      overwrite=_OVERWRITE.value)
  print(f"index written to {path}")


if __name__ == "__main__":
  app.run(main)
