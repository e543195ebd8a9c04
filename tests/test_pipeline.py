"""TrainPipeline: shapes, determinism, exact resume, host shares, global arrays."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from laspar_jax import mesh as mesh_lib
from laspar_jax import teacher as teacher_lib
from laspar_jax.data import pipeline as pl
from laspar_jax.data import training
from laspar_jax.data.sources import doc_text, load_collection
from laspar_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(shared_data, minilm_path):
  c = load_collection(shared_data / "scifact", split="train")
  tok = Tokenizer.from_dir(minilm_path, max_length=64)
  doc_ids = [d.doc_id for _, d in zip(range(60), c.docs())]
  cand = {q: doc_ids for q in c.qrels}
  rng = np.random.default_rng(0)
  scores = {q: {d: float(rng.normal()) for d in doc_ids + list(r)} for q, r in c.qrels.items()}
  ex = training.build_examples(c.qrels, cand, n_neg=4, seed=0, teacher_scores=scores)[:40]
  return c, tok, ex


def _pipe(setup, **kw):
  c, tok, ex = setup
  args = dict(batch_size=8, n_neg=2, q_len=16, d_len=32, seed=3, prefetch=2)
  args.update(kw)
  return pl.TrainPipeline(ex, c, tok, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _eq(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_layout(setup):
  c, tok, ex = setup
  p = _pipe(setup, prefetch=0)
  b = next(p)
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
    "q_input_ids": ((8, 16), np.int32),
    "q_attention_mask": ((8, 16), np.int32),
    "d_input_ids": ((24, 32), np.int32),
    "d_attention_mask": ((24, 32), np.int32),
    "teacher_scores": ((8, 3), np.float32),
  }
  idx = p.example_indices(0, 0)
  e = ex[idx[1]]
  pos = tok([doc_text(c.doc(e.pos_id))], max_length=32)["input_ids"][0]
  np.testing.assert_array_equal(b["d_input_ids"][3, : len(pos)], pos)  # row b*(1+n): query b's positive
  q = tok([c.queries[e.qid]], max_length=16)["input_ids"][0]
  np.testing.assert_array_equal(b["q_input_ids"][1, : len(q)], q)
  ts = np.float32(e.teacher_scores)
  assert b["teacher_scores"][1, 0] == ts[0]
  assert set(b["teacher_scores"][1, 1:].tolist()) <= set(ts[1:].tolist())
  assert p.steps_per_epoch == 5


def test_order_deterministic_and_epochs(setup):
  a, b, c = _pipe(setup), _pipe(setup), _pipe(setup, seed=4)
  for x, y in zip(_take(a, 7), _take(b, 7)):
    _eq(x, y)
  p = _pipe(setup)
  e0 = np.concatenate([p.example_indices(0, s) for s in range(5)])
  e1 = np.concatenate([p.example_indices(1, s) for s in range(5)])
  assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(40)) and (e0 != e1).any()
  assert not np.array_equal(next(c)["q_input_ids"], next(_pipe(setup))["q_input_ids"])
  a.close()
  b.close()
  c.close()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_exact_resume(setup, prefetch):
  ref = _take(_pipe(setup, prefetch=prefetch), 12)  # crosses two epoch boundaries (5 steps each)
  p = _pipe(setup, prefetch=prefetch)
  first = _take(p, 7)
  state = json.loads(json.dumps(p.get_state()))
  assert state == {"seed": 3, "epoch": 1, "step": 2}
  p.close()
  q = _pipe(setup, prefetch=prefetch, seed=99)  # the seed comes from the state
  q.set_state(state)
  rest = _take(q, 5)
  for x, y in zip(ref, first + rest):
    _eq(x, y)
  q.set_state({"seed": 3, "epoch": 0, "step": 1})  # rewinding a running pipeline
  _eq(next(q), ref[1])
  q.close()


def test_num_epochs_stops(setup):
  assert len(list(_pipe(setup, num_epochs=2))) == 10


def test_host_shares_make_the_global_batch(setup):
  whole = _take(_pipe(setup, process_index=0, process_count=1), 3)
  h0 = _take(_pipe(setup, process_index=0, process_count=2), 3)
  h1 = _take(_pipe(setup, process_index=1, process_count=2), 3)
  for w, a, b in zip(whole, h0, h1):
    assert a["q_input_ids"].shape == (4, 16)
    _eq(w, {k: np.concatenate([a[k], b[k]]) for k in w})
  with pytest.raises(ValueError, match="divisible"):
    _pipe(setup, process_index=0, process_count=3)


def test_put_batch_on_mesh(setup):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("data", "model"))
  b = next(_pipe(setup, prefetch=0))
  g = mesh_lib.put_batch(b, mesh)
  for k, v in b.items():
    assert g[k].shape == v.shape and g[k].sharding.spec[0] == "data"
    assert len(g[k].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(g[k]), v)


def test_groups_and_teacher_embeddings(setup):
  c, tok, ex = setup
  qids = sorted({e.qid for e in ex})
  dids = sorted({d for e in ex for d in (e.pos_id, *e.neg_ids)})
  rng = np.random.default_rng(1)
  mk = lambda ids: teacher_lib.DenseEmbeddings(np.array(ids), rng.normal(size=(len(ids), 6)).astype(np.float16), {})
  t = teacher_lib.TeacherEmbeddings(mk(qids), mk(dids))
  emb = t.queries.lookup([e.qid for e in ex])
  groups = teacher_lib.balanced_clusters(emb, 8, seed=0)
  p = _pipe(setup, teacher=t, groups=groups, prefetch=0)
  assert p.steps_per_epoch == 5
  b = next(p)
  idx = p.example_indices(0, 0)
  assert any(sorted(idx.tolist()) == g.tolist() for g in groups)
  np.testing.assert_array_equal(b["teacher_q"], t.queries.lookup([ex[j].qid for j in idx]))
  assert b["teacher_d"].shape == (24, 6) and b["teacher_d"].dtype == np.float32
  np.testing.assert_array_equal(b["teacher_d"][0], t.docs.lookup([ex[idx[0]].pos_id])[0])


def test_worker_error_reaches_consumer(setup):
  c, tok, ex = setup
  bad = [training.TrainExample(e.qid, "no-such-doc", e.neg_ids, e.teacher_scores) for e in ex]
  p = pl.TrainPipeline(bad, c, tok, batch_size=8, n_neg=2, q_len=16, d_len=32, prefetch=2)
  with pytest.raises(KeyError, match="no-such-doc"):
    next(p)


def test_token_cache_gives_the_tokenizers_batches(setup):
  """Cached token ids (second epoch: all hits) pad to exactly the tokenizer's batches, left padding too."""
  _, tok, _ = setup
  try:
    for side in ("right", "left"):
      tok.padding_side = side
      cached, plain = _pipe(setup, prefetch=0), _pipe(setup, prefetch=0)
      plain._q_tokens.enabled = plain._d_tokens.enabled = False  # pylint: disable=protected-access
      for a, b in zip(_take(cached, 2 * cached.steps_per_epoch), _take(plain, 2 * plain.steps_per_epoch)):
        _eq(a, b)
      assert cached._d_tokens._rows and not plain._d_tokens._rows  # pylint: disable=protected-access
  finally:
    tok.padding_side = "right"
