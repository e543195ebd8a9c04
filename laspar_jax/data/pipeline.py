"""The training input pipeline: tokenized, fixed-shape, deterministic, resumable batches.

Order. Epoch e visits the examples in `permutation(seed, e)` (or, with
`groups`, e.g. balanced teacher clusters, visits whole groups in permuted
order, one group per global batch) and drops the incomplete last batch. The
negatives of an example are drawn per epoch from its pool with a generator
seeded by (seed, epoch, example index). Batch (e, i) is therefore a pure
function of (seed, e, i), and the iterator state is the JSON-able
`{"seed", "epoch", "step"}`: `set_state(get_state())` resumes exactly.

Hosts. `batch_size` is global. Host p of P (jax.process_index/process_count
by default) builds rows [p*B/P, (p+1)*B/P) of every global batch, and only
reads those documents; `laspar_jax.mesh.put_batch(batch, mesh)` assembles the
hosts' shares into global jax.Arrays sharded on 'data'.

Shapes. Queries are padded to q_len and documents to d_len (fixed, so all
hosts agree and the step compiles once); texts longer than that are
truncated by the tokenizer.

Prefetch. A background thread builds the next `prefetch` batches while the
step runs; each queued batch carries the state after it, so get_state()
always describes the batches the caller has received. Each query and
document is tokenized once (`TokenCache`; on one host with a bounded set of
texts all of them before the first batch, in large batched calls); batches
then only gather and pad.

Batch (numpy, local rows; B = batch_size / P, n = n_neg):
  q_input_ids, q_attention_mask       int32 [B, q_len]
  d_input_ids, d_attention_mask       int32 [B*(1+n), d_len], query-major:
                                      row b*(1+n) is query b's positive, then its negatives
  teacher_scores (if examples carry them) float32 [B, 1+n]
  teacher_q, teacher_d (if teacher=)  float32 [B, E], [B*(1+n), E], L2-normalised
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from laspar_jax.data.sources import doc_text
from laspar_jax.data.training import TrainExample

Batch = dict[str, np.ndarray]


def _pad(a_bl: np.ndarray, length: int, value: int) -> np.ndarray:
  if a_bl.shape[1] == length:
    return a_bl
  out = np.full((a_bl.shape[0], length), value, a_bl.dtype)
  out[:, : min(length, a_bl.shape[1])] = a_bl[:, :length]
  return out


def _doc_lookup(docs) -> Callable[[str], str]:
  if hasattr(docs, "doc"):
    return lambda i: doc_text(docs.doc(i))
  if isinstance(docs, Mapping):
    return docs.__getitem__
  if callable(docs):
    return docs
  raise TypeError("docs must be a Collection, a {doc_id: text} mapping or a callable")


class TokenCache:
  """Token ids of texts by key, tokenized once: later batches only look them up and pad.

  A batch equals the tokenizer's output on the same texts (`Tokenizer.pad_rows`
  pads the cached rows as a call would). One cache serves one kind of text at
  one max_length and prefix. Misses of a batch are tokenized in one call; at
  most `max_entries` rows are kept (then misses are not stored).
  """

  def __init__(self, tokenizer, max_entries: int = 500_000):
    self.tokenizer, self.max_entries = tokenizer, max_entries
    self._rows: dict[Any, np.ndarray] = {}
    self.enabled = hasattr(tokenizer, "pad_rows")

  def __call__(self, keys: Sequence[Any], text: Callable[[Any], str], *, max_length: int, prefix: str) -> Batch:
    """The tokenized batch of the texts of `keys` (`text(key)` is read only on a miss)."""
    if not self.enabled:
      return self.tokenizer([text(k) for k in keys], max_length=max_length, prefix=prefix)
    rows = {k: self._rows.get(k) for k in keys}
    missing = [k for k, r in rows.items() if r is None]
    if missing:
      out = self.tokenizer([text(k) for k in missing], max_length=max_length, prefix=prefix)
      for k, ids_l, mask_l in zip(missing, out["input_ids"], out["attention_mask"]):
        rows[k] = ids_l[mask_l == 1]
        if len(self._rows) < self.max_entries:
          self._rows[k] = rows[k]
    return self.tokenizer.pad_rows([rows[k] for k in keys], max_length=max_length)

  def fill(self, keys: Sequence[Any], text: Callable[[Any], str], *, max_length: int, prefix: str) -> None:
    """Tokenizes the texts of `keys` not cached yet, in large batched calls."""
    todo = [k for k in keys if k not in self._rows][: max(self.max_entries - len(self._rows), 0)]
    for i in range(0, len(todo), 1024):
      self(todo[i : i + 1024], text, max_length=max_length, prefix=prefix)


class TrainPipeline:
  """Iterator over training batches; see the module docstring."""

  def __init__(
    self,
    examples: Sequence[TrainExample],
    docs,
    tokenizer,
    *,
    batch_size: int,
    n_neg: int,
    q_len: int = 32,
    d_len: int = 256,
    seed: int = 0,
    teacher=None,
    queries: Mapping[str, str] | None = None,
    groups: Sequence[np.ndarray] | None = None,
    num_epochs: int | None = None,
    prefetch: int = 2,
    query_prefix: str = "",
    doc_prefix: str = "",
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    """Builds the pipeline.

    Args:
      examples: TrainExamples (each with >= n_neg negatives in its pool).
      docs: a Collection (`.doc(id)`; its `.queries` serve as queries), a
        {doc_id: text} mapping, or a callable doc_id -> text.
      tokenizer: `laspar_jax.tokenizer.Tokenizer`.
      batch_size: global batch size (queries); divisible by process_count.
      n_neg: negatives per query.
      q_len, d_len: padded query / document lengths.
      seed: order and negative sampling seed.
      teacher: `teacher.TeacherEmbeddings` (adds teacher_q / teacher_d) or None.
      queries: {qid: text}; default `docs.queries`.
      groups: optional example-index groups of exactly batch_size (e.g.
        `teacher.balanced_clusters`); other sizes are dropped.
      num_epochs: stop after this many epochs (None: never).
      prefetch: batches built ahead in a background thread (0: none).
      query_prefix, doc_prefix: text prefixes.
      process_index, process_count: this host's share (default: jax's).
    """
    if process_index is None or process_count is None:
      process_index, process_count = jax.process_index(), jax.process_count()
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} hosts")
    self.examples = list(examples)
    short = [e for e in self.examples if len(e.neg_ids) < n_neg]
    if short:
      raise ValueError(f"{len(short)} examples have fewer than n_neg={n_neg} negatives, e.g. {short[0]}")
    if queries is None:
      queries = getattr(docs, "queries", None)
      if queries is None:
        raise ValueError("pass queries= when docs is not a Collection")
    self.queries, self._doc = queries, _doc_lookup(docs)
    self.tokenizer, self.teacher = tokenizer, teacher
    self.batch_size, self.n_neg, self.q_len, self.d_len = batch_size, n_neg, q_len, d_len
    self.local_batch_size = batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    self.num_epochs, self.prefetch = num_epochs, prefetch
    self.query_prefix, self.doc_prefix = query_prefix, doc_prefix
    self.with_scores = bool(self.examples) and all(e.teacher_scores is not None for e in self.examples)
    self.groups = None if groups is None else [np.asarray(g, np.int64) for g in groups if len(g) == batch_size]
    self.steps_per_epoch = len(self.groups) if self.groups is not None else len(self.examples) // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(self.examples)} examples make no full batch of {batch_size}")
    self._state = {"seed": int(seed), "epoch": 0, "step": 0}
    self._worker: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None
    self._order_cache: tuple[int, np.ndarray] | None = None
    # Token ids by text, tokenized once (the host pipeline then only gathers and pads).
    self._q_tokens, self._d_tokens = TokenCache(tokenizer), TokenCache(tokenizer)
    self._filled = False

  # --------------------------------------------------------------------------- state

  def get_state(self) -> dict[str, int]:
    """JSON-able position: the next batch to be returned is (epoch, step)."""
    return dict(self._state)

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a position from get_state(); the following batches are exactly those that followed it."""
    self._stop_worker()
    self._state = {"seed": int(state["seed"]), "epoch": int(state["epoch"]), "step": int(state["step"])}

  # --------------------------------------------------------------------------- batches

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._order_cache is None or self._order_cache[0] != epoch:
      rng = np.random.default_rng([self._state["seed"], epoch, 0])
      if self.groups is not None:
        order = np.concatenate([self.groups[g] for g in rng.permutation(len(self.groups))])
      else:
        order = rng.permutation(len(self.examples))
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def example_indices(self, epoch: int, step: int) -> np.ndarray:
    """This host's example indices of global batch (epoch, step)."""
    order = self._epoch_order(epoch)
    lo = step * self.batch_size + self.process_index * self.local_batch_size
    return order[lo : lo + self.local_batch_size]

  def _pretokenize(self) -> None:
    """One host with a bounded set of texts: tokenizes every query and pool document up front (batched)."""
    self._filled = True
    n_docs = sum(1 + len(e.neg_ids) for e in self.examples)
    if self.process_count > 1 or not self._d_tokens.enabled or n_docs > self._d_tokens.max_entries:
      return  # hosts read only their own documents; huge pools stay lazy
    qids = list(dict.fromkeys(e.qid for e in self.examples))
    dids = list(dict.fromkeys(d for e in self.examples for d in (e.pos_id, *e.neg_ids)))
    self._q_tokens.fill(qids, self.queries.__getitem__, max_length=self.q_len, prefix=self.query_prefix)
    self._d_tokens.fill(dids, self._doc, max_length=self.d_len, prefix=self.doc_prefix)

  def batch_at(self, epoch: int, step: int) -> Batch:
    """This host's share of global batch (epoch, step)."""
    if not self._filled:
      self._pretokenize()
    seed, n = self._state["seed"], self.n_neg
    q_ids, d_ids, scores = [], [], []
    for j in self.example_indices(epoch, step):
      e = self.examples[j]
      pool = len(e.neg_ids)
      if pool == n:
        pick = np.arange(n)
      else:
        pick = np.random.default_rng([seed, epoch, 1, int(j)]).choice(pool, n, replace=False)
      q_ids.append(e.qid)
      d_ids += [e.pos_id] + [e.neg_ids[k] for k in pick]
      if self.with_scores:
        scores.append([e.teacher_scores[0]] + [e.teacher_scores[1 + k] for k in pick])
    q = self._q_tokens(q_ids, self.queries.__getitem__, max_length=self.q_len, prefix=self.query_prefix)
    d = self._d_tokens(d_ids, self._doc, max_length=self.d_len, prefix=self.doc_prefix)
    pad = self.tokenizer.pad_id
    batch = {
      "q_input_ids": _pad(q["input_ids"], self.q_len, pad),
      "q_attention_mask": _pad(q["attention_mask"], self.q_len, 0),
      "d_input_ids": _pad(d["input_ids"], self.d_len, pad),
      "d_attention_mask": _pad(d["attention_mask"], self.d_len, 0),
    }
    if self.with_scores:
      batch["teacher_scores"] = np.asarray(scores, np.float32)
    if self.teacher is not None:
      idx = self.example_indices(epoch, step)
      batch["teacher_q"] = self.teacher.queries.lookup([self.examples[j].qid for j in idx])
      batch["teacher_d"] = self.teacher.docs.lookup(d_ids)
    return batch

  def _advance(self, state: dict[str, int]) -> dict[str, int] | None:
    """The state after returning batch `state`, or None at the end."""
    if self.num_epochs is not None and state["epoch"] >= self.num_epochs:
      return None
    step, epoch = state["step"] + 1, state["epoch"]
    if step == self.steps_per_epoch:
      step, epoch = 0, epoch + 1
    return {"seed": state["seed"], "epoch": epoch, "step": step}

  # --------------------------------------------------------------------------- iteration

  def __iter__(self) -> "TrainPipeline":
    return self

  def __next__(self) -> Batch:
    if self.prefetch <= 0:
      nxt = self._advance(self._state)
      if nxt is None:
        raise StopIteration
      batch = self.batch_at(self._state["epoch"], self._state["step"])
      self._state = nxt
      return batch
    if self._worker is None:
      self._start_worker()
    item = self._queue.get()
    if item is None:
      raise StopIteration
    if isinstance(item, BaseException):
      self._stop_worker()
      raise item
    batch, self._state = item
    return batch

  def _start_worker(self) -> None:
    self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
    q, stop, state = self._queue, self._stop, dict(self._state)

    def put(item) -> bool:
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def work():
      s = state
      try:
        while not stop.is_set():
          nxt = self._advance(s)
          if nxt is None:
            put(None)
            return
          if not put((self.batch_at(s["epoch"], s["step"]), nxt)):
            return
          s = nxt
      except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
        put(e)

    self._worker = threading.Thread(target=work, name="TrainPipeline-prefetch", daemon=True)
    self._worker.start()

  def _stop_worker(self) -> None:
    if self._worker is None:
      return
    self._stop.set()
    self._worker.join()
    self._worker = self._queue = self._stop = None

  def close(self) -> None:
    """Stops the prefetch thread."""
    self._stop_worker()

  def __del__(self):
    try:
      self._stop_worker()
    except Exception:  # pylint: disable=broad-except
      pass
