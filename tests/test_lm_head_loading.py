"""Loading never guesses a vocabulary head: a missing untied LM head is an error naming the tensor.

The folders are written here with numpy + safetensors from the Flan-T5 (v1.1)
fixture, with config.json as transformers 4.x writes it (`tie_word_embeddings`
false, no `scale_decoder_outputs`) and as 5.x writes it (both flags; a
fresh 5.x Flan-T5 ties its head without scaling and saves no
`lm_head.weight`).
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from laspar_jax.models import hf_weights

FLAN = pathlib.Path(__file__).parent / "fixtures" / "t5_flan"


def _folder(tmp_path, *, config: dict, keep_lm_head: bool) -> pathlib.Path:
  dst = tmp_path / "t5"
  shutil.copytree(FLAN, dst)
  tensors = load_file(dst / "model.safetensors")
  if not keep_lm_head:
    del tensors["lm_head.weight"]
  save_file(tensors, dst / "model.safetensors")
  hf = json.loads((FLAN / "config.json").read_text())
  hf.pop("scale_decoder_outputs")
  hf.pop("tie_word_embeddings")
  (dst / "config.json").write_text(json.dumps({**hf, **config}))
  return dst


V4_UNTIED = {"tie_word_embeddings": False, "transformers_version": "4.46.3"}
V5_UNTIED = {"tie_word_embeddings": False, "scale_decoder_outputs": False, "transformers_version": "5.0.0"}
V5_TIED = {"tie_word_embeddings": True, "scale_decoder_outputs": False, "transformers_version": "5.0.0"}


@pytest.mark.parametrize("config", [V4_UNTIED, V5_UNTIED], ids=["4.x", "5.x"])
def test_untied_head_without_its_tensor_is_an_error(tmp_path, config):
  dst = _folder(tmp_path, config=config, keep_lm_head=False)
  with pytest.raises(hf_weights.CheckpointError, match=r"lm_head\.weight") as err:
    hf_weights.load(dst, lm_head=True)
  assert "tie_word_embeddings" in str(err.value)
  hf_weights.load(dst)  # no vocabulary head asked for: nothing is missing


def test_tied_flag_gives_the_tied_unscaled_head(tmp_path):
  dst = _folder(tmp_path, config=V5_TIED, keep_lm_head=False)
  ld = hf_weights.load(dst, lm_head=True)
  head = ld.model.vocab_projection()
  shared = np.asarray(ld.model.shared.embedding[...])
  np.testing.assert_array_equal(np.asarray(head.kernel_dv()), shared.T)
  h = np.random.default_rng(0).normal(size=(1, 2, shared.shape[1])).astype(np.float32)
  np.testing.assert_allclose(np.asarray(head.logits(h)), h @ shared.T, atol=1e-5)  # no d_model**-0.5


def test_untied_head_with_its_tensor_loads_it(tmp_path):
  dst = _folder(tmp_path, config=V4_UNTIED, keep_lm_head=True)
  ld = hf_weights.load(dst, lm_head=True)
  want = load_file(dst / "model.safetensors")["lm_head.weight"].T
  np.testing.assert_array_equal(np.asarray(ld.model.vocab_projection().kernel_dv()), want)
