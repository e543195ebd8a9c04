"""A tiny random BERT in Hugging Face layout (config.json + model.safetensors + tokenizer), for fast tests."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

import numpy as np
from safetensors.numpy import save_file

from laspar_jax.models import backbone, bert, bert_params, hf_weights

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tiny_bert(
  path: str | os.PathLike,
  minilm_path: str | os.PathLike,
  *,
  hidden: int = 32,
  layers: int = 2,
  heads: int = 2,
  intermediate: int = 64,
  seed: int = 0,
) -> pathlib.Path:
  """Writes a random BERT (MiniLM's vocabulary and tokenizer, tiny widths) to `path`.

  Returns:
    The folder.
  """
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  with open(pathlib.Path(minilm_path) / "config.json") as f:
    cfg = json.load(f)
  cfg.update(
    hidden_size=hidden,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    intermediate_size=intermediate,
    max_position_embeddings=128,
  )
  with open(path / "config.json", "w") as f:
    json.dump(cfg, f)
  for name in TOKENIZER_FILES:
    if (pathlib.Path(minilm_path) / name).exists():
      shutil.copy(pathlib.Path(minilm_path) / name, path / name)
  bcfg = bert.BertConfig.from_hf_dict(cfg)
  model = hf_weights.load(path, weights=False).model
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, (ours, fn) in bert_params.checkpoint_names(bcfg).params.items():
    shape = tuple(hf_weights._get_var(model, ours).get_value().shape)  # pylint: disable=protected-access
    if fn is backbone.transpose:
      shape = shape[::-1]
    if "LayerNorm.weight" in name:
      arr = np.ones(shape, np.float32)
    elif name.endswith("bias"):
      arr = np.zeros(shape, np.float32)
    else:
      arr = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    tensors[name] = arr
  save_file(tensors, str(path / "model.safetensors"))
  return path


def train_command(tiny: str | os.PathLike, shared_data: pathlib.Path, workdir: os.PathLike, total: int) -> list[str]:
  """`launch/train.py` on the tiny BERT at `tiny` over SciFact: a few seconds a step, checkpoints every 2 steps."""
  over = {
    "model.backbone": tiny,
    "model.latent_dim": 512,
    "model.query_max_len": 16,
    "model.doc_max_len": 32,
    "data.collection": shared_data / "scifact",
    "data.teacher": "none",
    "loss.distill": "",
    "optim.batch_size": 8,
    "optim.warmup_steps": 2,
    "train.total_steps": total,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 0,
    "train.log_every": 2,
    "train.final_eval": False,
    "train.dropout": False,
    "train.q_topk": 64,
    "train.d_topk": 128,
  }
  repo = pathlib.Path(__file__).resolve().parents[1]
  cmd = [sys.executable, str(repo / "launch" / "train.py"), "--config", str(repo / "configs" / "laspar.py:runlocal")]
  return cmd + ["--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in over.items()]
