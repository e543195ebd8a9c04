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

from absl import app, flags  # noqa: E402

import encoder_flags as ef  # noqa: E402  (launch/encoder_flags.py)
from laspar_jax import distributed, io_utils  # noqa: E402
from laspar_jax.evaluate import DEFAULT_MEASURES, evaluate_encoder  # noqa: E402

_RUN = flags.DEFINE_string("run", None, "TREC run file to write")
_K_QUERY = flags.DEFINE_integer("k_query", None, "dims kept per query (default config.eval.q_topk, else 128)")
_K = flags.DEFINE_integer("k", 1000, "documents per query")
_MEASURES = flags.DEFINE_list("measures", None, "ir-measures names (default config.eval.measures)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "queries per encoder call (default config.eval, else 64)")
_THREADS = flags.DEFINE_integer("threads", None, "search threads (default config.eval.search_threads; 0: all)")
_MODE = flags.DEFINE_enum("mode", "exact", ["exact", "approx"], "search mode")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON here")
_VERIFY = flags.DEFINE_enum("verify", "auto", ["auto", "size", "full", "none"],
                            "index file checks: full re-hashes every file (auto: full up to 1 GiB, else sizes)")
_ALLOW_MISMATCH = flags.DEFINE_bool("allow_encoder_mismatch", False,
                                    "evaluate even if the index was built by another encoder")


def main(argv):
  del argv
  c = ef.setup()
  if not distributed.is_lead():  # evaluation is one host's work: the others must not write the same run
    return
  encoder, tokenizer = ef.encoder_and_tokenizer(c)
  measures = _MEASURES.value or ef.setting(_MEASURES, c, "eval.measures", ",".join(DEFAULT_MEASURES)).split(",")
  out = evaluate_encoder(
      encoder, tokenizer, ef.collection(c, default_split="test"), ef.INDEX.value, k=_K.value,
      k_query=ef.setting(_K_QUERY, c, "eval.q_topk", 128), measures=measures,
      run_path=_RUN.value, batch_size=ef.setting(_BATCH_SIZE, c, "eval.batch_size", 64),
      threads=ef.setting(_THREADS, c, "eval.search_threads", 0) or None, mode=_MODE.value,
      verify=_VERIFY.value, allow_encoder_mismatch=_ALLOW_MISMATCH.value)
  if _JSON.value:
    io_utils.write_text_atomic(_JSON.value, json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
