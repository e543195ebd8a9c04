r"""Exports a trained encoder as a self-contained folder to publish (weights, tokenizer, model card).

  # A training run: WORKDIR/encoder, with the latest WORKDIR/eval/<step>/metrics.json and the recipe:
  python launch/export.py --workdir /tmp/laspar_scifact --out /tmp/laspar-scifact

  # A saved encoder folder, then publish it (needs `pip install 'laspar_jax[hub]'` and a Hub token):
  python launch/export.py --encoder /tmp/laspar_scifact/encoder --out /tmp/laspar-scifact \
      --repo_id USER/laspar-scifact --push_to_hub

The folder loads with `load_encoder(folder)`; its README.md is the model card.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from laspar_jax import export  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (its encoder/, eval/ and config.json)")
_ENCODER = flags.DEFINE_string("encoder", None, "a saved encoder folder (instead of --workdir)")
_OUT = flags.DEFINE_string("out", None, "the folder to write (local or gs://)")
_REPO_ID = flags.DEFINE_string("repo_id", None, "Hugging Face Hub repository, USER/NAME (named in the card)")
_PUSH = flags.DEFINE_bool("push_to_hub", False, "upload the folder to --repo_id with huggingface_hub")
flags.mark_flags_as_required(["out"])
flags.mark_flags_as_mutual_exclusive(["workdir", "encoder"], required=True)


def main(argv):
  del argv
  kwargs = {"repo_id": _REPO_ID.value, "push_to_hub": _PUSH.value}
  if _WORKDIR.value:
    path = export.export_workdir(_WORKDIR.value, _OUT.value, **kwargs)
  else:
    path = export.export_encoder(_ENCODER.value, _OUT.value, **kwargs)
  print(f"exported to {path}" + (f" and pushed to {_REPO_ID.value}" if _PUSH.value else ""))


if __name__ == "__main__":
  app.run(main)
