"""Dense-teacher embedding cache (real MiniLM) and balanced clustering."""

import json
import os

import numpy as np
import pytest

from laspar_jax import teacher

TEXTS = [
  "a cat sits on the mat",
  "the dog runs in the park",
  "quantum mechanics of solids",
  "a kitten rests on a rug",
  "",
  "shock waves in hypersonic flow",
]
ITEMS = [(f"t{i}", t) for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def minilm(minilm_path):
  from laspar_jax.models import hf_weights

  return hf_weights.load(minilm_path, max_length=32)


def test_cache_roundtrip_and_reuse(tmp_path, minilm):
  cache = tmp_path / "q"
  e = teacher.dense_embeddings(cache, minilm, ITEMS, max_length=32, batch_size=4, progress=False)
  assert e.emb.dtype == np.float16 and e.emb.shape == (6, 384) and isinstance(e.emb, np.memmap)
  fresh = np.concatenate(list(teacher.encode_dense(minilm, TEXTS, batch_size=4, max_length=32)))
  np.testing.assert_allclose(e.lookup([i for i, _ in ITEMS]), fresh, atol=2e-3)
  np.testing.assert_allclose(np.linalg.norm(fresh, axis=1), 1.0, atol=1e-5)
  sim = fresh @ fresh.T
  assert sim[0, 3] > sim[0, 2] + 0.3  # cat/kitten closer than cat/quantum
  assert sorted(os.listdir(tmp_path)) == ["q"]  # no temporary directories left
  # Reused: a marker in the cached array survives a second call with the same inputs.
  mtime = os.path.getmtime(cache / "embeddings.npy")
  again = teacher.dense_embeddings(cache, str(minilm.path), lambda: iter(ITEMS), max_length=32, on_stale="error")
  assert os.path.getmtime(cache / "embeddings.npy") == mtime
  np.testing.assert_array_equal(np.asarray(again.emb), np.asarray(e.emb))
  with pytest.raises(KeyError):
    e.lookup(["nope"])


def test_stale_cache_detected(tmp_path, minilm):
  cache = tmp_path / "d"
  teacher.dense_embeddings(cache, minilm, ITEMS, max_length=32, progress=False)
  changed = ITEMS[:-1] + [("t5", "shock waves in supersonic flow")]
  with pytest.raises(teacher.StaleCacheError, match="texts_sha256"):
    teacher.dense_embeddings(cache, minilm, changed, max_length=32, on_stale="error")
  with pytest.raises(teacher.StaleCacheError, match="max_length"):
    teacher.dense_embeddings(cache, minilm, ITEMS, max_length=16, on_stale="error")
  other = tmp_path / "other_model"  # same weights, another config: another model
  other.mkdir()
  for name in os.listdir(minilm.path):
    src = os.path.join(minilm.path, name)
    if name == "config.json":
      cfg = json.load(open(src))
      cfg["layer_norm_eps"] = 1e-6
      json.dump(cfg, open(other / name, "w"))
    elif os.path.isfile(src):
      os.symlink(src, other / name)
  with pytest.raises(teacher.StaleCacheError, match="config_sha256"):
    teacher.dense_embeddings(cache, str(other), ITEMS, max_length=32, on_stale="error")
  # Recompute replaces the stale cache atomically.
  e = teacher.dense_embeddings(cache, minilm, changed, max_length=32, progress=False)
  assert e.fingerprint["count"] == 6 and sorted(os.listdir(tmp_path)) == ["d", "other_model"]
  teacher.dense_embeddings(cache, minilm, changed, max_length=32, on_stale="error")
  # A damaged cache (missing ids) is stale, not used.
  os.remove(cache / "ids.npy")
  with pytest.raises(teacher.StaleCacheError, match="unreadable"):
    teacher.dense_embeddings(cache, minilm, changed, max_length=32, on_stale="error")


def test_balanced_clusters():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 8)) * 10
  x = np.concatenate([c + rng.normal(size=(16, 8)) for c in centers])
  perm = rng.permutation(64)
  groups = teacher.balanced_clusters(x[perm], 16, seed=1)
  assert sorted(len(g) for g in groups) == [16] * 4
  assert sorted(np.concatenate(groups).tolist()) == list(range(64))
  for g in groups:
    assert len(set(perm[g] // 16)) == 1  # each batch is one blob
  uneven = teacher.balanced_clusters(rng.normal(size=(70, 4)), 16)
  assert sorted(len(g) for g in uneven) == [6, 16, 16, 16, 16]


def test_teacher_embeddings_for_examples(tmp_path, minilm, shared_data):
  from laspar_jax.data import training
  from laspar_jax.data.sources import load_collection

  c = load_collection(shared_data / "scifact")
  qrels = dict(sorted(c.qrels.items())[:3])
  cand = {q: ["4983", "5836"] for q in qrels}
  ex = training.build_examples(qrels, cand, n_neg=1, seed=0)
  t = teacher.teacher_embeddings(tmp_path, minilm, c, ex, q_len=16, d_len=32, progress=False)
  assert sorted(t.queries.ids.tolist()) == sorted(qrels)
  assert set(t.docs.ids.tolist()) == {d for e in ex for d in (e.pos_id, *e.neg_ids)}
  assert t.docs.fingerprint["max_length"] == 32 and t.queries.fingerprint["max_length"] == 16
  np.testing.assert_allclose(np.linalg.norm(t.docs.lookup([ex[0].pos_id, *ex[0].neg_ids]), axis=1), 1.0, atol=2e-3)
