r"""Encodes the judged queries, searches an index, writes a TREC run, reports metrics.

  # A trained encoder with the collection, split, query top-k and measures of its config:
  python launch/evaluate.py --config configs/laspar.py:scifact --encoder /tmp/laspar_scifact/encoder \
      --index /tmp/laspar_scifact_index --run /tmp/laspar_scifact.run

  # Everything as flags:
  python launch/evaluate.py --encoder sentence-transformers/all-MiniLM-L6-v2 --head mlm \
      --collection ../shared/data/scifact --split test --index /tmp/scifact_mlm_index \
      --run /tmp/scifact_mlm.run --k_query 128

  # Zero-shot (RQ1): a backbone's vocabulary head over prompted texts, the index built at --index,
  # beside BM25 on the same queries:
  python launch/evaluate.py --zeroshot reference --encoder HuggingFaceTB/SmolLM2-135M-Instruct \
      --in_text_filter --collection ../shared/data/scifact --split test --index /tmp/scifact_zs_ref \
      --dtype bfloat16 --bm25 --json /tmp/scifact_zs_ref.json

  # BM25 alone:
  python launch/evaluate.py --bm25 --collection ../shared/data/scifact --split test

With --config, --collection/--split/--k_query/--measures/--batch_size/--threads
default to the config's `eval` section and a missing --encoder builds the
config's `model` (a fresh head); explicit flags win. With --zeroshot PRESET
(`laspar_jax.prompts.PRESETS`; "none": no prompt) the encoder is an untrained
vocabulary head ("mlm") on the backbone (--encoder, else the config's
`model`, whose zero-shot fields count unless a flag is given) and goes
through `evaluate.evaluate_config` (the index built at --index, searched,
scored, the run and metrics.json written): --k_doc/--k_query the dims kept
per document/query, --doc_max_len/--query_max_len the tokens kept, prompt
included (the reference's 250), --pool all|text, --in_text_filter with
--term_cap (0: every in-text term), --impacts int100|float. The defaults are
the reference's (JingfenQiao/Decoder4LSR, lsr/inference_zeroshot.py).
--bm25 without --encoder/--config evaluates BM25 alone.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402

import encoder_flags as ef  # noqa: E402  (launch/encoder_flags.py)
from laspar_jax import config_lib, distributed, evaluate, io_utils, prompts, zeroshot  # noqa: E402
from laspar_jax.evaluate import DEFAULT_MEASURES  # noqa: E402
from laspar_jax.models import sparse_encoder  # noqa: E402

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
_BM25 = flags.DEFINE_bool("bm25", False, "BM25 on the same queries: alone (no --encoder/--config) or beside")
_DECODING = flags.DEFINE_string("decoding", "", "zero-shot read-off mode (default: the preset's)")
_POOL = flags.DEFINE_enum("pool", "all", ["text", "all"], "zero-shot pooled positions: prompt + text (all) or text")
_K_DOC = flags.DEFINE_integer("k_doc", None, "zero-shot: dims kept per document (default config.eval.d_topk, else 128)")
_DOC_MAX_LEN = flags.DEFINE_integer("doc_max_len", 250, "zero-shot: document tokens kept, prompt included")
_QUERY_MAX_LEN = flags.DEFINE_integer("query_max_len", 250, "zero-shot: query tokens kept, prompt included")
_TERM_CAP = flags.DEFINE_integer("term_cap", 0, "zero-shot, in-text filter: dims kept (0: every in-text term)")
_IMPACTS = flags.DEFINE_enum("impacts", "int100", ["int100", "float"], "zero-shot impacts: int(w*100) or float")
_SPECIAL = flags.DEFINE_enum("special_tokens", "", ["", "family", "dims", "positions", "keep"], "special-token rule")
_IN_TEXT = flags.DEFINE_bool(
  "in_text_filter", False, "zero-shot: keep only ids occurring in the text (stop words removed)"
)
_FILTER_MATCH = flags.DEFINE_enum(
  "filter_match",
  "id",
  ["id", "string"],
  "zero-shot in-text filter rule: id (the filtered text's token ids, the reference's) or string (ours: every "
  "vocabulary id whose token string, without the word marker and lowercased, is a filtered text token's)",
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "zero-shot compute dtype")
_MAX_QUERIES = flags.DEFINE_integer("max_queries", None, "the first judged queries only")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "zero-shot: replace the index at --index if there is one")


def _eval_section(c, extra=None) -> ml_collections.ConfigDict:
  """config.eval (updated by `extra`) with the explicit flags applied (flags only: a zero-shot run's defaults)."""
  ev = ml_collections.ConfigDict({**(dict(c.eval) if c is not None else {}), **(extra or {})})
  ev.q_topk = _K_QUERY.value or ev.get("q_topk", 128)
  ev.d_topk = _K_DOC.value or ev.get("d_topk", 128)
  ev.batch_size = _BATCH_SIZE.value or ev.get("batch_size", 16)
  ev.measures = ",".join(_MEASURES.value) if _MEASURES.value else ev.get("measures", ",".join(DEFAULT_MEASURES))
  ev.search_threads = _THREADS.value if _THREADS.value is not None else ev.get("search_threads", 0)
  ev.max_queries = _MAX_QUERIES.value or ev.get("max_queries", 0)
  ev.max_docs = ev.get("max_docs", 0)
  return ev


def _config_fields(c) -> tuple[dict, dict]:
  """(EncoderConfig fields, eval fields) of a config: its `zeroshot` section, else its `model` with an mlm head."""
  if c.get("zeroshot") is not None and c.zeroshot.get("backbone"):
    return zeroshot.encoder_fields(c.zeroshot)
  return {**config_lib.encoder_fields(c), "head": "mlm"}, {}


def zeroshot_main(c):
  """--zeroshot: a prompted SparseEncoder through `evaluate.evaluate_config` (index, search, measures, files)."""
  base, ev_extra = _config_fields(c) if c is not None else ({}, {})
  backbone = ef.ENCODER.value or base.get("backbone")
  if backbone is None:
    raise app.UsageError("--zeroshot needs --encoder (the backbone: folder, .gguf or hub id) or --config")
  z = dict(
    backbone=backbone,
    preset=_ZEROSHOT.value,
    decoding=_DECODING.value,
    prompt_pool=_POOL.value,
    query_max_len=_QUERY_MAX_LEN.value,
    doc_max_len=_DOC_MAX_LEN.value,
    in_text_filter=_IN_TEXT.value,
    filter_match=_FILTER_MATCH.value,
    term_cap=_TERM_CAP.value,
    impacts=_IMPACTS.value,
    dtype=_DTYPE.value,
  )
  if _SPECIAL.value:
    z["special_tokens"] = _SPECIAL.value
  fields, _ = zeroshot.encoder_fields(z)
  if c is not None:  # the config's encoder, then --zeroshot's prompt and the flags given explicitly
    given = {f for f in fields if f in flags.FLAGS and flags.FLAGS[f].present} | {"prompt", "backbone"}
    given |= {"decoding"} if _DECODING.value else set()
    given |= {"prompt_pool"} if flags.FLAGS["pool"].present else set()
    fields = {**base, **{k: v for k, v in fields.items() if k in given}}
  index = epath.Path(ef.INDEX.value)
  if (index / "manifest.json").exists() and not _OVERWRITE.value:
    raise app.UsageError(f"{index} holds an index; pass --overwrite to rebuild it")
  encoder, tokenizer = sparse_encoder.build_encoder(sparse_encoder.EncoderConfig(**fields))
  out_dir = epath.Path(_RUN.value).parent if _RUN.value else index.parent / f"{index.name}.eval"
  out = evaluate.evaluate_config(
    encoder,
    tokenizer,
    _eval_section(c, ev_extra),
    out_dir,
    efficiency=True,
    bm25=_BM25.value,
    collection=ef.collection(c, default_split="test"),
    index_path=index,
  )
  if _RUN.value and os.fspath(out_dir / "run.trec") != _RUN.value:
    (out_dir / "run.trec").rename(_RUN.value)
    out["run_path"] = _RUN.value
  return out, f"zero-shot {_ZEROSHOT.value}", fields


def _report(out, label, fields=None):
  rows = [(label, out)] + ([("BM25", out["bm25"])] if "bm25" in out else [])
  print(evaluate.format_table(rows))
  if _JSON.value:
    io_utils.write_text_atomic(_JSON.value, json.dumps({**out, "encoder": fields}, indent=1, default=str))


def main(argv):
  del argv
  c = ef.setup(encoder_needed=not (_BM25.value and not _ZEROSHOT.value))
  if not distributed.is_lead():  # evaluation is one host's work: the others must not write the same run
    return
  if _ZEROSHOT.value:
    _report(*zeroshot_main(c))
    return
  measures = _MEASURES.value or ef.setting(_MEASURES, c, "eval.measures", ",".join(DEFAULT_MEASURES)).split(",")
  coll = ef.collection(c, default_split="test")
  if _BM25.value and ef.ENCODER.value is None and c is None:  # the baseline on its own
    qids = sorted(coll.judged_queries)[: _MAX_QUERIES.value or None]
    _report(evaluate.bm25_report(coll, qids, measures=measures, k=_K.value, run_path=_RUN.value), "BM25")
    return
  encoder, tokenizer = ef.encoder_and_tokenizer(c)
  out = evaluate.evaluate_encoder(
    encoder,
    tokenizer,
    coll,
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
    max_queries=_MAX_QUERIES.value,
  )
  if _BM25.value:
    qids = sorted(coll.judged_queries)[: _MAX_QUERIES.value or None]
    out["bm25"] = evaluate.bm25_report(coll, qids, measures=measures, k=_K.value)
  _report(out, "encoder")


if __name__ == "__main__":
  app.run(main)
