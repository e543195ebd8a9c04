"""Config helpers: big_vision-style argument strings, dotted updates, plain dicts.

A config file `configs/NAME.py` defines `get_config(arg=None)`; `arg` is the
text after the colon in `--config configs/NAME.py:ARG`, a comma-separated list
of `key=value` pairs and bare flags:

  get_config("variant=latent_sum,D=131072,runlocal")

`parse_arg(arg, **defaults)` turns it into a ConfigDict whose values take the
type of their defaults (bare flags are booleans set to True); unknown keys are
errors; a default of 0 or None reads as "not given", so a config can tell an
explicit value from its default. `--config.key=value` flags (ml_collections
`config_flags`) then override any field of the returned config. Shared config
sections (data root, mesh, sharding rules) live in `configs/common.py`; each
config shrinks itself under `:runlocal`.
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


def to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """A plain nested dict (for JSON dumps and EncoderConfig)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return {k: to_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def encoder_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """EncoderConfig fields of a training config: `config.model` plus `config.seed`."""
  return {**to_dict(config.model), "seed": int(config.get("seed", 0))}


def setting(flag_value: Any, config: ml_collections.ConfigDict | None, dotted: str, default: Any) -> Any:
  """An explicit flag value (not None), else the config field `dotted` (if set), else `default`.

  Args:
    flag_value: the flag's value; None means the flag was not given.
    config: the loaded config, or None.
    dotted: the config field, e.g. "eval.d_topk".
    default: used when neither gives a value (an empty config string counts as unset).
  """
  if flag_value is not None:
    return flag_value
  node: Any = config
  for part in dotted.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return default if node in ("", None) else node
