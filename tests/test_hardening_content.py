"""Hardening by content: a copied encoder folder is the same encoder; a full disk names the path."""

import errno
import pathlib
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_bert  # noqa: E402

from laspar_jax import distributed_index, encode, evaluate, io_utils  # noqa: E402
from laspar_jax.data.formats import Doc  # noqa: E402
from laspar_jax.index import Index  # noqa: E402
from laspar_jax.models import sparse_encoder  # noqa: E402

DOCS = [Doc(f"d{i}", "", f"a short document number {i} about proteins and cells") for i in range(12)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, minilm_path):
  tmp = tmp_path_factory.mktemp("enc")
  tiny = tiny_bert.write_tiny_bert(tmp / "tiny", minilm_path)
  enc, tok = sparse_encoder.load_encoder(str(tiny), head="latent_attention", latent_dim=64)
  return pathlib.Path(sparse_encoder.save_encoder(enc, tok, tmp / "encoder")), tiny


def test_copied_encoder_folder_is_the_same_encoder(saved, tmp_path):
  folder, _ = saved
  enc, tok = sparse_encoder.load_encoder(str(folder))
  ix = distributed_index.index_collection(enc, tok, DOCS, tmp_path / "ix", k_doc=16, batch_size=4)
  copy = tmp_path / "elsewhere" / "encoder_copy"
  shutil.copytree(folder, copy)
  enc2, _ = sparse_encoder.load_encoder(str(copy))
  assert encode.encoder_fingerprint(enc2) == encode.encoder_fingerprint(enc)
  evaluate.check_encoder_matches(enc2, Index.load(ix))  # accepted: same content, another folder
  # Different content is still refused: another setting (config) ...
  other, _ = sparse_encoder.load_encoder(str(copy), doc_max_len=16)
  with pytest.raises(evaluate.EncoderMismatchError, match="config"):
    evaluate.check_encoder_matches(other, Index.load(ix))


def test_copied_encoder_with_other_weights_refused(saved, tmp_path):
  folder, _ = saved
  enc, tok = sparse_encoder.load_encoder(str(folder))
  ix = distributed_index.index_collection(enc, tok, DOCS, tmp_path / "ix", k_doc=16, batch_size=4)
  copy = tmp_path / "copy"
  shutil.copytree(folder, copy)
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel

  params = load_file(str(copy / sparse_encoder.PARAMS_NAME))
  name = sorted(params)[0]
  params[name] = params[name] + np.float32(1.0)
  save_file(params, str(copy / sparse_encoder.PARAMS_NAME))
  enc2, _ = sparse_encoder.load_encoder(str(copy))
  with pytest.raises(evaluate.EncoderMismatchError, match="parameters differ"):
    evaluate.check_encoder_matches(enc2, Index.load(ix))


def test_saved_config_names_the_backbone_not_a_folder(saved, tmp_path):
  folder, tiny = saved
  enc, tok = sparse_encoder.load_encoder(str(folder))
  again = pathlib.Path(sparse_encoder.save_encoder(enc, tok, tmp_path / "again"))
  assert sparse_encoder.backbone_identity(str(again)) == str(tiny)
  assert encode.encoder_fingerprint(sparse_encoder.load_encoder(str(again))[0]) == encode.encoder_fingerprint(enc)


# ----------------------------------------------------------------------------- a full disk


def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_index_build_names_the_path(saved, tmp_path, monkeypatch):
  folder, _ = saved
  enc, tok = sparse_encoder.load_encoder(str(folder))
  from laspar_jax.index import build  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(build.IndexWriter, "add", _no_space)
  with pytest.raises(OSError, match=r"ix: no space left on device") as e:
    distributed_index.index_collection(enc, tok, DOCS, tmp_path / "ix", k_doc=16, batch_size=4)
  assert e.value.errno == errno.ENOSPC
  assert not any(p.name.startswith("ix") for p in tmp_path.iterdir())  # nothing half-written left


def test_short_write_reads_as_full_disk(tmp_path):
  with pytest.raises(OSError, match=r"x.npy: no space left on device .*153600 requested and 107520 written"):
    with io_utils.disk_space_errors(tmp_path / "x.npy", "the index"):
      raise OSError("153600 requested and 107520 written")
  with pytest.raises(ValueError, match="other"):  # other errors pass through unchanged
    with io_utils.disk_space_errors(tmp_path / "x.npy", "the index"):
      raise ValueError("other")


def test_full_disk_during_encoder_save_names_the_path(saved, tmp_path, monkeypatch):
  folder, _ = saved
  enc, tok = sparse_encoder.load_encoder(str(folder))
  monkeypatch.setattr(sparse_encoder.safetensors.numpy, "save", _no_space)
  with pytest.raises(OSError, match=r"enc_out: no space left on device"):
    sparse_encoder.save_encoder(enc, tok, tmp_path / "enc_out")
  assert not any(p.name.startswith("enc_out") for p in tmp_path.iterdir())


def test_full_disk_during_checkpoint_names_the_path(tmp_path, monkeypatch):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from laspar_jax import checkpoint_integrity, checkpointing  # pylint: disable=import-outside-toplevel

  ck = checkpointing.Checkpointer(tmp_path / "ck", every=1)
  monkeypatch.setattr(checkpoint_integrity, "write_checksums", _no_space)
  with pytest.raises(OSError, match=r"ck/1: no space left on device"):
    ck.save(1, {"w": jnp.ones(4)}, {"data": 0})
  monkeypatch.undo()
  ck.close()
