"""Flags shared by launch/index.py and launch/evaluate.py: the config, the encoder, the collection.

Imported by the launchers as a sibling module (Python puts a script's folder
on sys.path). With --config, the collection and split default to the config's
`eval` section and a missing --encoder builds the config's `model` (a fresh
head); explicit flags always win.
"""

from absl import app, flags
from ml_collections import config_flags

import distributed_flags  # launch/distributed_flags.py: --jax_distributed and its flags
from laspar_jax import config_lib
from laspar_jax.data.sources import load_collection
from laspar_jax.models.sparse_encoder import load_encoder

CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG] (optional)", lock_config=True)
ENCODER = flags.DEFINE_string(
  "encoder", None, "saved encoder dir, backbone dir or hub id (default: config.model.backbone with a fresh head)"
)
HEAD = flags.DEFINE_string("head", None, "head of a fresh encoder (mlm, latent_attention, ...)")
LATENT_DIM = flags.DEFINE_integer("latent_dim", None, "D of a fresh latent head")
COLLECTION = flags.DEFINE_string("collection", None, "collection (dir or ir_datasets id; default config.eval)")
SPLIT = flags.DEFINE_string("split", None, "qrels split (default config.eval.split)")
INDEX = flags.DEFINE_string("index", None, "index directory")
STRICT = flags.DEFINE_bool(
  "strict",
  False,
  "a collection file breaking its format is an error naming the file "
  "and line (default: the documented rule per anomaly, with warnings)",
)
QRELS_LAYOUT = flags.DEFINE_enum(
  "qrels_layout",
  "auto",
  ["auto", "trec", "smart", "cranfield", "plain"],
  "qrels layout (default: detected from the content)",
)
KEYWORDS = flags.DEFINE_bool("keywords", False, "SMART collections: add the .K keywords to the document text")


def setup(encoder_needed: bool = True):
  """Initialises multi-host JAX when asked; returns the loaded config (or None).

  Args:
    encoder_needed: --encoder or --config and --index must be given (not for a BM25-only run).
  """
  distributed_flags.initialize()
  if encoder_needed and ENCODER.value is None and CONFIG.value is None:
    raise app.UsageError("give --encoder or --config")
  if encoder_needed and INDEX.value is None:
    raise app.UsageError("give --index")
  return CONFIG.value


def encoder_and_tokenizer(config):
  """The encoder named by --encoder (or the config's model), with --head/--latent_dim applied."""
  fields = {"backbone": ENCODER.value} if ENCODER.value is not None else config_lib.encoder_fields(config)
  fields.update({k: v for k, v in (("head", HEAD.value), ("latent_dim", LATENT_DIM.value)) if v is not None})
  return load_encoder(fields.pop("backbone"), **fields)


def collection(config, default_split=None):
  """The collection of --collection/--split, else of config.eval."""
  name = config_lib.setting(COLLECTION.value, config, "eval.collection", None)
  if name is None:
    raise app.UsageError("give --collection or --config")
  split = (
    config_lib.setting(SPLIT.value, config, "eval.split", None)
    if config is not None
    else (SPLIT.value or default_split)
  )
  return load_collection(
    name, split=split, strict=STRICT.value, qrels_layout=QRELS_LAYOUT.value, keywords=KEYWORDS.value
  )


def setting(flag, config, dotted, default):
  """An explicit flag's value, else the config field `dotted`, else `default`."""
  return config_lib.setting(flag.value, config, dotted, default)
