r"""Converts indexes: to and from CIFF, and to the compressed (version 2) format.

  # An index to CIFF (Anserini / PISA / Terrier / JASS read it; .gz is gzipped):
  python launch/export_index.py --index /tmp/laspar_scifact_index --to_ciff /tmp/scifact.ciff.gz

  # A CIFF file (from any of those engines) to a compressed index with 8-bit impacts:
  python launch/export_index.py --from_ciff /tmp/scifact.ciff.gz --index /tmp/from_ciff \
      --posting_format blocked --value_dtype uint8

  # A version-1 index to a compressed copy (--approx: with what mode="approx" reads):
  python launch/export_index.py --index /tmp/laspar_scifact_index --compress /tmp/scifact_blocked --approx
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from laspar_jax.index import Index  # noqa: E402

_INDEX = flags.DEFINE_string("index", None, "the index directory (read, or written with --from_ciff)")
_TO_CIFF = flags.DEFINE_string("to_ciff", None, "write --index as this CIFF file")
_FROM_CIFF = flags.DEFINE_string("from_ciff", None, "build --index from this CIFF file")
_COMPRESS = flags.DEFINE_string("compress", None, "write a compressed (version 2) copy of --index here")
_SCALE = flags.DEFINE_float("scale", 100.0, "--to_ciff of a float index: tf = round(weight * scale)")
_QUANT_SCALE = flags.DEFINE_float("quant_scale", None, "--from_ciff: weight per tf unit (default: from the header)")
_VALUE_DTYPE = flags.DEFINE_enum(
  "value_dtype", "uint8", ["uint8", "uint16", "float16", "float32"], "stored impacts (--from_ciff, --compress)"
)
_POSTING_FORMAT = flags.DEFINE_enum("posting_format", "blocked", ["raw", "blocked"], "--from_ciff: the format")
_APPROX = flags.DEFINE_bool(
  "approx", False, "--compress: also write the approximate-search structures (impact-ordered heads, forward index)"
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output")
flags.mark_flags_as_required(["index"])
flags.mark_flags_as_mutual_exclusive(["to_ciff", "from_ciff", "compress"], required=True)


def main(argv):
  del argv
  if _FROM_CIFF.value:
    ix = Index.from_ciff(
      _FROM_CIFF.value,
      _INDEX.value,
      quant_scale=_QUANT_SCALE.value,
      value_dtype=_VALUE_DTYPE.value,
      posting_format=_POSTING_FORMAT.value,
      overwrite=_OVERWRITE.value,
    )
    print(f"index written to {ix.path}: {ix.n_docs} docs, {ix.n_postings} postings, {ix.size_bytes() / 1e6:.1f} MB")
    return
  ix = Index.load(_INDEX.value)
  if _TO_CIFF.value:
    if os.path.exists(_TO_CIFF.value) and not _OVERWRITE.value:
      raise app.UsageError(f"{_TO_CIFF.value} exists (pass --overwrite)")
    path = ix.to_ciff(_TO_CIFF.value, scale=_SCALE.value)
    print(f"CIFF written to {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
  else:
    out = ix.compress(_COMPRESS.value, value_dtype=_VALUE_DTYPE.value, overwrite=_OVERWRITE.value, approx=_APPROX.value)
    print(f"compressed index written to {out.path}: {out.size_bytes() / 1e6:.1f} MB (was {ix.size_bytes() / 1e6:.1f})")


if __name__ == "__main__":
  app.run(main)
