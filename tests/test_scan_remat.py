"""Scanned layer stacks (BERT, T5 both stacks, OPT) and named remat policies, against the plain layer loop.

Scanned and unscanned models load the same Hugging Face tensors (row i of a stacked parameter is
layer i) and give the same outputs and gradients at fp32; fresh initialisation draws the same
numbers; LoRA adapts, trains with dropout, merges and saves with a scanned stack; every remat
policy gives the gradients of no remat, and an unknown policy name is refused naming the field.
"""

import gc
import pathlib
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from configs import laspar  # noqa: E402
from laspar_jax import train_lib  # noqa: E402
from laspar_jax.models import backbone, hf_weights, layers, lora, sparse_encoder  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FAMILY_FIXTURES = ("opt_pre", "opt_post", "t5_v10", "t5_flan")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, minilm_path):
  return tiny_bert.write_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_path, layers=3)


def _path(name, tiny_path):
  return tiny_path if name == "bert" else FIXTURES / name


def _batch(name):
  if name == "bert":
    ids = np.random.default_rng(0).integers(1000, 2000, (2, 9))
    return jnp.asarray(ids), jnp.asarray([[1] * 9, [1] * 6 + [0] * 3])
  ref = np.load(FIXTURES / name / "reference.npz")
  return jnp.asarray(ref["ids_left"]), jnp.asarray(ref["mask_left"])


def _kw(name):
  return {"mode": "encoder_decoder"} if name.startswith("t5") else {}


def _loop_layout(flat):
  """{path: array} of a scanned model in the loop model's layout (row i of a stacked array -> layer i)."""
  out = {}
  for path, v in flat.items():
    k = path.index("layer") if "layer" in path else -1
    if k > 0 and path[k - 1] in ("layers", "blocks"):
      out.update({path[:k] + (i,) + path[k + 1 :]: v[i] for i in range(v.shape[0])})
    elif path[1:] == ("relative_attention_bias",):  # a scanned T5 stack's own table: block 0's
      out[(path[0], "blocks", 0, "self_attn", "relative_attention_bias")] = v
    else:
      out[path] = v
  return out


def _flat(state):
  return {p: np.asarray(v.get_value() if hasattr(v, "get_value") else v) for p, v in nnx.to_flat_state(state)}


def _assert_same(loop_flat, scanned_flat, **tol):
  scanned = _loop_layout(scanned_flat)
  assert set(scanned) == set(loop_flat)
  for p, v in loop_flat.items():
    np.testing.assert_allclose(scanned[p], v, err_msg=str(p), **tol)


def _grads(model, ids, mask, kw):
  @nnx.jit
  def run(m):
    loss, g = nnx.value_and_grad(lambda m: jnp.sum(jnp.square(m(ids, mask, **kw))))(m)
    return loss, g

  loss, g = run(model)
  return float(loss), _flat(g)


@pytest.mark.parametrize("name", FAMILY_FIXTURES + ("bert",))
def test_scanned_loads_the_same_tensors_and_gives_the_loop_outputs_and_grads(name, tiny_path):
  loop = hf_weights.load(_path(name, tiny_path), attention_impl="xla").model
  scanned = hf_weights.load(_path(name, tiny_path), scan_layers=True, attention_impl="xla").model
  stacks = [scanned.encoder.blocks, scanned.decoder.blocks] if name.startswith("t5") else [scanned.layers]
  assert all(isinstance(s, layers.Stacked) for s in stacks)
  _assert_same(_flat(nnx.state(loop, nnx.Param)), _flat(nnx.state(scanned, nnx.Param)), rtol=0, atol=0)
  ids, mask = _batch(name)
  fwd = nnx.jit(lambda m, i, k: m(i, k, **_kw(name)))
  np.testing.assert_allclose(np.asarray(fwd(scanned, ids, mask)), np.asarray(fwd(loop, ids, mask)), atol=1e-5)
  loss_l, g_loop = _grads(loop, ids, mask, _kw(name))
  loss_s, g_scan = _grads(scanned, ids, mask, _kw(name))
  assert loss_s == pytest.approx(loss_l, rel=1e-5)
  _assert_same(g_loop, g_scan, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_fresh_initialisation_draws_the_same_numbers(name):
  family = backbone.FAMILIES[hf_weights.load(FIXTURES / name, weights=False).hf_config["model_type"]]
  cfg = hf_weights.load(FIXTURES / name, weights=False).config
  loop = family.build(cfg, rngs=nnx.Rngs(3))
  scanned = family.build(hf_weights.load(FIXTURES / name, weights=False, scan_layers=True).config, rngs=nnx.Rngs(3))
  _assert_same(_flat(nnx.state(loop, nnx.Param)), _flat(nnx.state(scanned, nnx.Param)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["opt_pre", "t5_flan"])
def test_lora_on_a_scanned_stack_matches_the_loop_and_trains_with_dropout(name):
  loop = hf_weights.load(FIXTURES / name, attention_impl="xla").model
  scanned = hf_weights.load(FIXTURES / name, scan_layers=True, attention_impl="xla").model
  targets = lora.default_targets(backbone.family_of(scanned).name)
  for m in (loop, scanned):
    lora.apply_lora(m, targets=targets, rank=2, alpha=4, dropout=0.1, rngs=nnx.Rngs(1))
  for i, m in enumerate(lora.lora_modules(scanned)):
    m.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))
  q = lora.lora_modules(scanned)[0]
  assert q.lora_a.get_value().ndim == 3 and layers.logical_axes(q.lora_a)[0] == "layers"
  # the loop model gets the scanned adapters, row i in layer i
  want = _loop_layout(_flat(nnx.state(scanned, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(loop, nnx.Param)):
    var.set_value(jnp.asarray(want[path]))
  ids, mask = _batch(name)
  kw = _kw(name)
  fwd = nnx.jit(lambda m, i, k: m(i, k, **kw))
  adapted = np.asarray(fwd(scanned, ids, mask))
  np.testing.assert_allclose(adapted, np.asarray(fwd(loop, ids, mask)), atol=1e-5)
  _, g_loop = _grads(loop, ids, mask, kw)
  _, g_scan = _grads(scanned, ids, mask, kw)
  _assert_same(g_loop, g_scan, rtol=1e-4, atol=1e-5)
  train = nnx.jit(lambda m, i, k, r: m(i, k, deterministic=False, rngs=r, **kw))
  h_train = np.asarray(train(scanned, ids, mask, nnx.Rngs(dropout=0)))
  assert np.isfinite(h_train).all() and np.abs(h_train - adapted).max() > 1e-3  # dropout inside the scan
  lora.merge_lora(scanned)
  assert not lora.lora_modules(scanned)
  np.testing.assert_allclose(np.asarray(fwd(scanned, ids, mask)), adapted, atol=2e-5)


def test_scanned_encoder_saves_and_loads(tmp_path):
  cfg = sparse_encoder.EncoderConfig(
    backbone=str(FIXTURES / "opt_pre"),
    head="mlm",
    scan_layers=True,
    lora={"rank": 2, "alpha": 4, "dropout": 0.1},
    query_max_len=16,
    doc_max_len=16,
  )
  enc, tok = sparse_encoder.build_encoder(cfg)
  assert isinstance(enc.query_backbone.layers, layers.Stacked)
  for i, m in enumerate(lora.lora_modules(enc)):
    m.lora_b.set_value(0.5 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))
  b = tok(["a query about cells", "another longer query about proteins"], max_length=16)
  want = np.asarray(enc(b["input_ids"], b["attention_mask"], kind="doc"))
  loaded, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, tmp_path / "enc"))
  assert loaded.config.scan_layers and isinstance(loaded.query_backbone.layers, layers.Stacked)
  np.testing.assert_array_equal(np.asarray(loaded(b["input_ids"], b["attention_mask"], kind="doc")), want)
  merged, _ = sparse_encoder.load_encoder(sparse_encoder.save_encoder(enc, tok, tmp_path / "m", merge_lora=True))
  np.testing.assert_allclose(np.asarray(merged(b["input_ids"], b["attention_mask"], kind="doc")), want, atol=1e-4)


def _remat_policies(model, ids, mask, kw) -> list:
  """The `policy` of every rematerialized call in the model's forward jaxpr (scan bodies included)."""
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda st: jnp.sum(nnx.merge(graphdef, st)(ids, mask, **kw)))(state).jaxpr
  out, todo = [], [jaxpr]
  while todo:
    for eqn in todo.pop().eqns:
      if eqn.primitive.name.startswith(("remat", "checkpoint")):
        out.append(eqn.params["policy"])
      todo += [getattr(v, "jaxpr", v) for v in eqn.params.values() if hasattr(getattr(v, "jaxpr", v), "eqns")]
  return out


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", ["opt_pre", "t5_v10"])
def test_every_remat_policy_gives_the_gradients_of_no_remat(name, scan):
  ids, mask = _batch(name)
  plain = hf_weights.load(FIXTURES / name, scan_layers=scan, attention_impl="xla").model
  assert not _remat_policies(plain, ids, mask, _kw(name))
  loss0, g0 = _grads(plain, ids, mask, _kw(name))
  for policy in layers.REMAT_POLICIES:
    model = hf_weights.load(FIXTURES / name, scan_layers=scan, remat=policy, attention_impl="xla").model
    n_stacks = (2 if name.startswith("t5") else 1) if scan else None
    found = _remat_policies(model, ids, mask, _kw(name))
    assert found and all(f == layers.remat_policy(policy) for f in found), (policy, found)
    assert not scan or len(found) == n_stacks  # one rematerialized scan body per stack
    loss, g = _grads(model, ids, mask, _kw(name))
    assert loss == pytest.approx(loss0, rel=1e-6), policy
    assert set(g) == set(g0)
    for p in g0:
      np.testing.assert_allclose(g[p], g0[p], rtol=1e-4, atol=1e-5, err_msg=f"{policy} {p}")


def test_remat_policy_names_are_checked():
  assert layers.remat_policy(True) is None and layers.remat_policy("full") is None
  assert layers.remat_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert layers.remat_setting(False, "dots") is False and layers.remat_setting(True, "dots") == "dots"
  with pytest.raises(ValueError, match="unknown remat policy 'bogus'"):
    layers.remat_setting(False, "bogus")
  with pytest.raises(ValueError, match="EncoderConfig.remat_policy"):
    sparse_encoder.build_encoder(
      sparse_encoder.EncoderConfig(backbone=str(FIXTURES / "opt_pre"), head="mlm", remat_policy="bogus"), weights=False
    )
  c = laspar.get_config("runlocal")
  c.model.remat_policy = "bogus"
  with pytest.raises(ValueError, match="config.model.remat_policy"):
    train_lib.check_config(c)
  # defaults keep the old behaviour and the old fingerprints
  enc_cfg = sparse_encoder.EncoderConfig()
  assert enc_cfg.remat_policy == "full" and not enc_cfg.scan_layers
  assert sparse_encoder.EncoderConfig(remat_policy="full", scan_layers=False).fingerprint() == enc_cfg.fingerprint()
  assert sparse_encoder.EncoderConfig(scan_layers=True).fingerprint() != enc_cfg.fingerprint()


def test_stacked_build_keeps_one_layer_copy_alive():
  """Each copy is written into the stack and dropped before the next is built (the build peaks at the
  stack plus one layer, not twice the stack); the stack holds every copy's values in order."""
  built: list[weakref.ref] = []
  alive_before: list[int] = []

  class Layer(nnx.Module):
    def __init__(self, i: int):
      self.w = nnx.Param(jnp.full((3, 2), float(i)))

  def make(i: int) -> nnx.Module:
    gc.collect()
    alive_before.append(sum(r() is not None for r in built))
    layer = Layer(i)
    built.append(weakref.ref(layer))
    return layer

  stacked = layers.Stacked(make, 4)
  assert alive_before == [0, 0, 0, 0]
  np.testing.assert_array_equal(stacked.layer.w[...][:, 0, 0], [0.0, 1.0, 2.0, 3.0])
