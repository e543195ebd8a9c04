"""Shared pieces of the configs: argument parsing, the data root, mesh, sharding rules, sections.

Every `configs/NAME.py` defines `get_config(arg=None)` and builds its
ConfigDict from these sections; `:runlocal` shrinks are decided inside each
config (there is no global shrink table).

The shared collections live in `../shared/data` next to the repository
(resolved from this file, not from the working directory); set
`$LASPAR_DATA` to use another folder. A collection missing from that folder
is read through ir_datasets instead (`IRDS_IDS`: SciFact is `beir/scifact`,
downloaded on first use into $IR_DATASETS_HOME); a run that can neither find
the folder nor download stops before writing anything, naming both.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import ml_collections

from laspar_jax import config_lib
from laspar_jax import mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_ENV = "LASPAR_DATA"

# Logical axis -> mesh axis (None: replicated), read by `laspar_jax.mesh.rules_from_config`; a config
# copies the library's defaults and may change any of them (e.g. ("kv", "model"), or an 'fsdp' axis).
SHARDING_RULES = tuple(mesh.DEFAULT_RULES)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """ "key=value,flag,..." against typed defaults (see `laspar_jax.config_lib.parse_arg`)."""
  return config_lib.parse_arg(arg, **defaults)


def data_root() -> str:
  """The folder of the shared collections: `$LASPAR_DATA`, else `<repo>/../shared/data`."""
  return os.environ.get(DATA_ENV) or os.path.normpath(REPO.parent / "shared" / "data")


# Collections of the data root that ir_datasets also serves (the split is appended: beir/scifact/train).
IRDS_IDS = {"scifact": "beir/scifact"}


def data_path(name: str) -> str:
  """A collection under the data root (e.g. "scifact"); its ir_datasets id when the folder is missing."""
  path = os.path.join(data_root(), name)
  if not os.path.isdir(path) and name in IRDS_IDS:
    return IRDS_IDS[name]
  return path


def sharding_rules() -> list[tuple[str, str | None]]:
  """The default logical-axis rules (a fresh list: configs may edit it)."""
  return [tuple(r) for r in SHARDING_RULES]


def mesh(data: int = -1, model: int = 1) -> ml_collections.ConfigDict:
  """Device mesh sizes; -1 takes the remaining devices."""
  return ml_collections.ConfigDict({"data": data, "model": model})


def regularizer(name: str, side: str, weight: float) -> dict[str, Any]:
  """One regularizer term of `config.loss.regularizers` (e.g. flops on queries)."""
  return {"name": name, "side": side, "weight": weight}


# Fields of the `data` and `loss` sections added after the first configs, with defaults that keep the
# old behaviour; `with_defaults(c)` adds those a config does not set.
DATA_DEFAULTS: dict[str, Any] = {
  # Affine calibration of data.teacher_scores onto a reference teacher's scale (teacher="scores"):
  # "none", "global" or "per_query" mean/std (laspar_jax.data.training.calibrate_scores).
  "teacher_calibration": "none",
  "teacher_calibration_reference": "",  # the score file whose scale to match
}
LOSS_DEFAULTS: dict[str, Any] = {
  # () : document regularizers over all documents; (pos, neg): pos * reg(positives) +
  # neg * reg(hard negatives), needs data.n_neg >= 1 (the decoder study: (0.5, 0.5); its reference (0.25, 0.75)).
  "doc_reg_weights": (),
}


def with_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the fields of DATA_DEFAULTS / LOSS_DEFAULTS missing from `c.data` / `c.loss` (in place)."""
  for section, defaults in (("data", DATA_DEFAULTS), ("loss", LOSS_DEFAULTS)):
    if section in c:
      for key, value in defaults.items():
        if key not in c[section]:
          c[section][key] = value
  return c


def optim(**overrides: Any) -> ml_collections.ConfigDict:
  """AdamW with warm-up and linear decay (paper defaults), then `overrides`."""
  c = ml_collections.ConfigDict()
  c.batch_size = 32  # queries per micro-batch (global)
  c.accum_steps = 8
  c.lr = 1e-4
  c.warmup_steps = 4_000
  c.schedule = "linear"  # warm-up then "linear" or "cosine" decay to end_lr, or "constant"
  c.end_lr = 0.0
  c.weight_decay = 0.01
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.grad_clip = 1.0
  c.head_lr_mult = 1.0  # learning rate of the sparse heads / of the backbone
  c.freeze = ()  # regexes over "/"-joined parameter paths: no update and no optimizer state
  c.lora_trainable = ()  # with model.lora: regexes of backbone parameters that still train
  c.update(overrides)
  return c


def train(**overrides: Any) -> ml_collections.ConfigDict:
  """The training loop: steps, logging, checkpoints, periodic evaluation, then `overrides`."""
  c = ml_collections.ConfigDict()
  c.total_steps = 100_000  # optimizer steps
  c.log_every = 50
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.async_checkpoints = True  # save returns once the state is on the host; written and hashed in the background
  c.eval_every = 10_000  # 0: only at the end
  c.final_eval = True
  c.dropout = True
  c.rng_impl = "threefry2x32"  # dropout PRNG; "rbg" compiles and runs faster (bits depend on sharding)
  c.q_topk = 128  # training-time top-k masking (0: off)
  c.d_topk = 512
  c.update(overrides)
  return c


def evaluation(collection: str, **overrides: Any) -> ml_collections.ConfigDict:
  """Full-corpus evaluation through the index (`config.eval`), then `overrides`."""
  c = ml_collections.ConfigDict()
  c.collection = collection
  c.split = ""
  c.q_topk = 128
  c.d_topk = 512
  c.batch_size = 0  # texts per encoder call; 0: 64 on CPU, 256 on GPU / TPU (platform.encode_batch_size)
  c.measures = "nDCG@10,RR@10,R@100,R@1000"
  c.max_queries = 0  # 0: all judged queries
  c.max_docs = 0  # 0: the full corpus
  c.search_threads = 0  # 0: all cores
  c.update(overrides)
  return c
