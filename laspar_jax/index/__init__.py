"""Inverted index: streaming out-of-core build, versioned checksummed format, fast search.

Pure numpy/numba: nothing here imports the encoder, the data layer or JAX
(the encoder -> index glue is `laspar_jax.distributed_index.index_collection`).
"""

from laspar_jax.index.build import IndexWriter, build_index
from laspar_jax.index.format import IndexCorruptError, IndexFormatError
from laspar_jax.index.search import Index

__all__ = ["Index", "IndexWriter", "IndexCorruptError", "IndexFormatError", "build_index"]
