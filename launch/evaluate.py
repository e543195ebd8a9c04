r"""Encodes the judged queries, searches an index, writes a TREC run, reports metrics.

  # A trained encoder with the collection, split, query top-k and measures of its config:
  python launch/evaluate.py --config configs/laspar.py:scifact --encoder /tmp/laspar_scifact/encoder \
      --index /tmp/laspar_scifact_index --run /tmp/laspar_scifact.run

  # Everything as flags:
  python launch/evaluate.py --encoder sentence-transformers/all-MiniLM-L6-v2 --head mlm \
      --collection ../shared/data/scifact --split test --index /tmp/scifact_mlm_index \
      --run /tmp/scifact_mlm.run --k_query 128

With --config, --collection/--split/--k_query/--measures/--batch_size/--threads
default to the config's `eval` section and a missing --encoder builds the
config's `model` (a fresh head); explicit flags win.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from laspar_jax import config_lib, io_utils  # noqa: E402
from laspar_jax.data.sources import load_collection  # noqa: E402
from laspar_jax.evaluate import DEFAULT_MEASURES, evaluate_encoder  # noqa: E402
from laspar_jax.models.sparse_encoder import load_encoder  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG] (optional)", lock_config=True)
_ENCODER = flags.DEFINE_string("encoder", None, "saved encoder dir, backbone dir or hub id "
                               "(default: config.model.backbone with a fresh head)")
_HEAD = flags.DEFINE_string("head", None, "head of a fresh encoder (mlm, latent_attention, ...)")
_LATENT_DIM = flags.DEFINE_integer("latent_dim", None, "D of a fresh latent head")
_COLLECTION = flags.DEFINE_string("collection", None, "collection (dir or ir_datasets id; default config.eval)")
_SPLIT = flags.DEFINE_string("split", None, "qrels split (default: config.eval.split; test without --config)")
_INDEX = flags.DEFINE_string("index", None, "index directory (from launch/index.py)")
_RUN = flags.DEFINE_string("run", None, "TREC run file to write")
_K_QUERY = flags.DEFINE_integer("k_query", None, "dims kept per query (default config.eval.q_topk, else 128)")
_K = flags.DEFINE_integer("k", 1000, "documents per query")
_MEASURES = flags.DEFINE_list("measures", None, "ir-measures names (default config.eval.measures)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "queries per encoder call (default config.eval, else 64)")
_THREADS = flags.DEFINE_integer("threads", None, "search threads (default config.eval.search_threads; 0: all)")
_MODE = flags.DEFINE_enum("mode", "exact", ["exact", "approx"], "search mode")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON here")
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
  split = config_lib.setting(_SPLIT.value, c, "eval.split", None) if c is not None else (_SPLIT.value or "test")
  measures = _MEASURES.value or config_lib.setting(None, c, "eval.measures", ",".join(DEFAULT_MEASURES)).split(",")
  out = evaluate_encoder(
      encoder, tokenizer, load_collection(collection, split=split), _INDEX.value, k=_K.value,
      k_query=config_lib.setting(_K_QUERY.value, c, "eval.q_topk", 128), measures=measures,
      run_path=_RUN.value, batch_size=config_lib.setting(_BATCH_SIZE.value, c, "eval.batch_size", 64),
      threads=config_lib.setting(_THREADS.value, c, "eval.search_threads", 0) or None, mode=_MODE.value)
  if _JSON.value:
    io_utils.write_text_atomic(_JSON.value, json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
