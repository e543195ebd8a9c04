"""Config helpers: big_vision-style argument strings and the `runlocal` shrink.

A config file `configs/NAME.py` defines `get_config(arg=None)`; `arg` is the
text after the colon in `--config configs/NAME.py:ARG`, a comma-separated list
of `key=value` pairs and bare flags:

  get_config("variant=latent_sum,D=131072,runlocal")

`parse_arg(arg, **defaults)` turns it into a ConfigDict whose values take the
type of their defaults (bare flags are booleans set to True); unknown keys are
errors. `--config.key=value` flags (ml_collections `config_flags`) then
override any field of the returned config.
"""
from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

import ml_collections


def _convert(key: str, text: str, default: Any) -> Any:
  """Converts `text` to the type of `default`."""
  if isinstance(default, bool):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on", ""):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"config arg {key}={text!r}: expected a boolean")
  if isinstance(default, int):
    try:
      return int(float(text)) if "e" in text.lower() else int(text, 0)
    except ValueError:
      raise ValueError(f"config arg {key}={text!r}: expected an integer") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"config arg {key}={text!r}: expected a number") from None
  if isinstance(default, str):
    return text
  try:  # None or containers: a Python literal, else the plain string
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "key=value,flag,..." against typed defaults.

  Args:
    arg: the config argument (None or "" gives the defaults).
    **defaults: every accepted key with its default value; the value's type
      (bool, int, float, str) decides how its text is parsed.

  Returns:
    A ConfigDict with every key of `defaults`.

  Raises:
    ValueError: an unknown key, or a value of the wrong type.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    if not eq:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _convert(key, value.strip(), defaults[key])
  return out


def update(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ("train.total_steps": 5) in place; unknown keys are errors.

  Args:
    config: the config to change.
    overrides: {dotted key: value}.

  Returns:
    `config`.
  """
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise KeyError(f"config has no field {dotted!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config has no field {dotted!r}")
    with node.ignore_type():
      node[leaf] = value
  return config


# Fields changed by `runlocal` (a laptop / CI-sized run of any config).
RUNLOCAL = {
    "model.backbone": "sentence-transformers/all-MiniLM-L6-v2",
    "model.latent_dim": 2 ** 14,
    "model.query_max_len": 32,
    "model.doc_max_len": 64,
    "model.remat": False,
    "data.collection": "../shared/data/scifact",
    "data.split": "train",
    "data.negatives": "none",
    "data.n_neg": 0,
    "optim.batch_size": 8,
    "optim.accum_steps": 1,
    "optim.warmup_steps": 2,
    "train.total_steps": 10,
    "train.log_every": 2,
    "train.checkpoint_every": 5,
    "train.eval_every": 0,
    "loss.reg_warmup_steps": 5,
    "eval.collection": "../shared/data/scifact",
    # Even the smoke run evaluates on the full corpus and every judged query
    # (a corpus subset flatters); short documents keep it to a few minutes.
    "eval.max_queries": 0,
    "eval.max_docs": 0,
    "mesh.data": -1,
    "mesh.model": 1,
}


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config for a laptop: small backbone and D, scifact, few steps (in place).

  Keys of RUNLOCAL the config lacks are skipped (so a family config without
  e.g. `model.latent_dim` still shrinks the rest).

  Returns:
    `config`.
  """
  for dotted, value in RUNLOCAL.items():
    try:
      update(config, {dotted: value})
    except KeyError:
      continue
  return config


def to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """A plain nested dict (for JSON dumps and EncoderConfig)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return {k: to_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
