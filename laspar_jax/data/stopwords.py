"""English stop words shipped with the package (no download at run time).

`stopwords_en.txt` holds the standard 179-word English list of NLTK (a superset
of Lucene's 33-word English set), one lowercase word per line, contractions
included ("don't") as well as their tokenizer fragments ("don", "t").
"""

from __future__ import annotations

import functools
import importlib.resources


@functools.cache
def english() -> frozenset[str]:
  """The English stop words (lowercase), read once from the packaged `stopwords_en.txt`.

  Returns:
    frozenset of lowercase words.
  """
  text = importlib.resources.files(__package__).joinpath("stopwords_en.txt").read_text("utf-8")
  return frozenset(w.strip().lower() for w in text.splitlines() if w.strip())
