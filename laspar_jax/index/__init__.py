"""Inverted index: streaming out-of-core build, versioned checksummed format, fast search."""
from laspar_jax.index.build import (IndexWriter, build_index, build_index_from_encoder,
                                    encoder_fingerprint)
from laspar_jax.index.format import IndexCorruptError, IndexFormatError
from laspar_jax.index.search import Index

__all__ = ["Index", "IndexWriter", "IndexCorruptError", "IndexFormatError", "build_index",
           "build_index_from_encoder", "encoder_fingerprint"]
