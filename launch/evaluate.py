r"""Encodes the judged queries, searches an index, writes a TREC run, reports metrics.

  # A trained encoder with the collection, split, query top-k and measures of its config:
  python launch/evaluate.py --config configs/laspar.py:scifact --encoder /tmp/laspar_scifact/encoder \
      --index /tmp/laspar_scifact_index --run /tmp/laspar_scifact.run

  # Everything as flags:
  python launch/evaluate.py --encoder sentence-transformers/all-MiniLM-L6-v2 --head mlm \
      --collection ../shared/data/scifact --split test --index /tmp/scifact_mlm_index \
      --run /tmp/scifact_mlm.run --k_query 128

  # Zero-shot (RQ1): a backbone's vocabulary head over prompted texts, the index built at --index
  # (or reused when it holds this zero-shot config's index), beside BM25 on the same queries:
  python launch/evaluate.py --zeroshot reference --encoder HuggingFaceTB/SmolLM2-135M-Instruct \
      --in_text_filter --collection ../shared/data/scifact --split test --index /tmp/scifact_zs_ref \
      --dtype bfloat16 --bm25 --json /tmp/scifact_zs_ref.json

With --config, --collection/--split/--k_query/--measures/--batch_size/--threads
default to the config's `eval` section and a missing --encoder builds the
config's `model` (a fresh head); explicit flags win. With --zeroshot PRESET
(`laspar_jax.prompts.PRESETS`) --encoder is the backbone, --k_doc/--k_query the
dims kept per document/query, --doc_max_len/--query_max_len the text tokens
kept (the prompt not counted), --batch_size the texts per call (default 16).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import encoder_flags as ef  # noqa: E402  (launch/encoder_flags.py)
from laspar_jax import distributed, io_utils, prompts, zeroshot  # noqa: E402
from laspar_jax.evaluate import DEFAULT_MEASURES, evaluate_encoder  # noqa: E402

_RUN = flags.DEFINE_string("run", None, "TREC run file to write")
_K_QUERY = flags.DEFINE_integer("k_query", None, "dims kept per query (default config.eval.q_topk, else 128)")
_K = flags.DEFINE_integer("k", 1000, "documents per query")
_MEASURES = flags.DEFINE_list("measures", None, "ir-measures names (default config.eval.measures)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "queries per encoder call (default config.eval, else 64)")
_THREADS = flags.DEFINE_integer("threads", None, "search threads (default config.eval.search_threads; 0: all)")
_MODE = flags.DEFINE_enum("mode", "exact", ["exact", "approx"], "search mode")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON here")
_VERIFY = flags.DEFINE_enum(
  "verify",
  "auto",
  ["auto", "size", "full", "none"],
  "index file checks: full re-hashes every file (auto: full up to 1 GiB, else sizes)",
)
_ALLOW_MISMATCH = flags.DEFINE_bool(
  "allow_encoder_mismatch", False, "evaluate even if the index was built by another encoder"
)
_ZEROSHOT = flags.DEFINE_enum(
  "zeroshot", None, sorted(prompts.PRESETS), "zero-shot mode with this prompt preset (--encoder: the backbone)"
)
_BM25 = flags.DEFINE_bool("bm25", False, "zero-shot mode: also evaluate BM25 on the same queries")
_DECODING = flags.DEFINE_string("decoding", "", "zero-shot read-off mode (default: the preset's)")
_POOL = flags.DEFINE_enum("pool", "", ["", "text", "all"], "zero-shot pooled positions (default: the preset's)")
_K_DOC = flags.DEFINE_integer("k_doc", None, "zero-shot: dims kept per document (default 128)")
_DOC_MAX_LEN = flags.DEFINE_integer("doc_max_len", 256, "zero-shot: document text tokens kept")
_QUERY_MAX_LEN = flags.DEFINE_integer("query_max_len", 64, "zero-shot: query text tokens kept")
_IN_TEXT = flags.DEFINE_bool(
  "in_text_filter", False, "zero-shot: keep only ids occurring in the text (stop words removed)"
)
_FILTER_MATCH = flags.DEFINE_enum("filter_match", "string", ["string", "id"], "zero-shot in-text filter rule")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "zero-shot compute dtype")
_MAX_QUERIES = flags.DEFINE_integer("max_queries", None, "zero-shot: the first judged queries only")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "zero-shot: rebuild the index even if it exists")


def zeroshot_main():
  """--zeroshot: index, evaluate and print the table (zero-shot beside BM25)."""
  if ef.ENCODER.value is None:
    raise app.UsageError("--zeroshot needs --encoder (the backbone: folder, .gguf or hub id)")
  k_query = _K_QUERY.value or 128
  zcfg = zeroshot.ZeroShotConfig(
    backbone=ef.ENCODER.value,
    preset=_ZEROSHOT.value,
    decoding=_DECODING.value,
    pool=_POOL.value,
    query_max_len=_QUERY_MAX_LEN.value,
    doc_max_len=_DOC_MAX_LEN.value,
    in_text_filter=_IN_TEXT.value,
    filter_match=_FILTER_MATCH.value,
    topk=_K_DOC.value or 128,
    query_topk=k_query,
    dtype=_DTYPE.value,
    batch_size=_BATCH_SIZE.value or 16,
  )
  out = zeroshot.evaluate_zeroshot(
    zcfg,
    ef.collection(None, default_split="test"),
    ef.INDEX.value,
    measures=_MEASURES.value or list(DEFAULT_MEASURES),
    k=_K.value,
    run_path=_RUN.value,
    bm25=_BM25.value,
    max_queries=_MAX_QUERIES.value,
    overwrite=_OVERWRITE.value,
    threads=_THREADS.value or None,
  )
  print(zeroshot.format_table(out))
  if _JSON.value:
    io_utils.write_text_atomic(_JSON.value, json.dumps(out, indent=1, default=str))


def main(argv):
  del argv
  c = ef.setup()
  if not distributed.is_lead():  # evaluation is one host's work: the others must not write the same run
    return
  if _ZEROSHOT.value:
    if c is not None:
      raise app.UsageError("--zeroshot takes flags only (no --config)")
    zeroshot_main()
    return
  encoder, tokenizer = ef.encoder_and_tokenizer(c)
  measures = _MEASURES.value or ef.setting(_MEASURES, c, "eval.measures", ",".join(DEFAULT_MEASURES)).split(",")
  out = evaluate_encoder(
    encoder,
    tokenizer,
    ef.collection(c, default_split="test"),
    ef.INDEX.value,
    k=_K.value,
    k_query=ef.setting(_K_QUERY, c, "eval.q_topk", 128),
    measures=measures,
    run_path=_RUN.value,
    batch_size=ef.setting(_BATCH_SIZE, c, "eval.batch_size", 64),
    threads=ef.setting(_THREADS, c, "eval.search_threads", 0) or None,
    mode=_MODE.value,
    verify=_VERIFY.value,
    allow_encoder_mismatch=_ALLOW_MISMATCH.value,
  )
  if _JSON.value:
    io_utils.write_text_atomic(_JSON.value, json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
