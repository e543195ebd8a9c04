"""The packaged English stop-word list."""

from laspar_jax.data import stopwords


def test_english_stopwords():
  words = stopwords.english()
  assert isinstance(words, frozenset) and len(words) == 179
  lucene = (
    "a an and are as at be but by for if in into is it no not of on or such that the "
    "their then there these they this to was will with"
  ).split()
  assert set(lucene) <= words
  assert {"i", "myself", "don't", "don", "wouldn't", "ourselves"} <= words
  assert all(w == w.lower() and w.strip() == w and w for w in words)
  assert not {"protein", "cell", "search", "query"} & words
  assert stopwords.english() is words  # read once
