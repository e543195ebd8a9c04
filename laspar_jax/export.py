"""Export a trained encoder as a self-contained folder to publish (model card, optional Hub upload).

The folder holds everything `load_encoder(folder)` needs (encoder_config.json,
params.safetensors, the backbone's config.json and tokenizer files), plus a
model card `README.md` (YAML front matter, the recipe, the metrics and a usage
snippet), and, when known, the training config (`training_config.json`) and
the metrics (`metrics.json`). It is written under a temporary name and renamed
when complete (`io_utils.atomic_directory`; local or gs://).

  export_workdir("/tmp/laspar_scifact", "/tmp/laspar_scifact_export")  # encoder + eval + config of a run
  export_encoder("/tmp/enc", "/tmp/enc_export", metrics={"nDCG@10": 0.66}, repo_id="me/laspar-scifact",
                 push_to_hub=True)

Uploading goes through `huggingface_hub` (`pip install 'laspar_jax[hub]'`),
an optional dependency imported only when pushing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from laspar_jax import io_utils
from laspar_jax.models import sparse_encoder

CARD_NAME = "README.md"
TRAINING_CONFIG_NAME = "training_config.json"
METRICS_NAME = "metrics.json"
_EFFICIENCY_KEYS = ("active_q", "active_d", "index_seconds", "eval_seconds")  # in the table, not the front matter
TAGS = ("sparse-retrieval", "learned-sparse-retrieval", "laspar", "jax", "flax")

# (label, dotted key of the training config) shown in the card's recipe table.
_RECIPE_KEYS = (
  ("backbone", "model.backbone"),
  ("head", "model.head"),
  ("latent dims D", "model.latent_dim"),
  ("towers", "model.towers"),
  ("query / doc max length", ("model.query_max_len", "model.doc_max_len")),
  ("training data", "data.collection"),
  ("teacher", "data.teacher"),
  ("ranking loss", "loss.ranking"),
  ("distillation", "loss.distill"),
  ("regularizers", "loss.regularizers"),
  ("regularizer warm-up steps", "loss.reg_warmup_steps"),
  ("learning rate", "optim.lr"),
  ("batch size x accumulation", ("optim.batch_size", "optim.accum_steps")),
  ("training steps", "train.total_steps"),
  ("query / doc top-k", ("eval.q_topk", "eval.d_topk")),
  ("evaluation collection", "eval.collection"),
  ("evaluation split", "eval.split"),
)


def _get(d: Mapping[str, Any], dotted: str) -> Any:
  for key in dotted.split("."):
    if not isinstance(d, Mapping) or key not in d:
      return None
    d = d[key]
  return d


def _fmt(v: Any) -> str:
  if isinstance(v, Mapping):  # regularizer terms: name(side)=weight
    parts = [
      f"{t.get('name', k)}({t.get('side', '')})={t.get('weight', '')}" if isinstance(t, Mapping) else f"{k}={t}"
      for k, t in v.items()
    ]
    return ", ".join(parts)
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def _looks_like_hub_id(name: Any) -> bool:
  return (
    isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)
  )


def _dataset_name(name: Any) -> str | None:
  """An ir_datasets id as is; a folder or URI by its last component."""
  if not isinstance(name, str) or not name:
    return None
  if os.path.isabs(name) or name.startswith((".", "~")) or "://" in name:
    return os.path.basename(os.path.normpath(name))
  return name


def _portable(encoder_config: Mapping[str, Any], recipe: Mapping[str, Any] | None) -> dict[str, Any]:
  """The encoder config without the trainer's local backbone path (`load_encoder` reads the folder itself)."""
  out = dict(encoder_config)
  backbone = out.get("backbone")
  if isinstance(backbone, str) and io_utils.is_local(backbone) and os.path.isabs(backbone):
    name = _get(recipe or {}, "model.backbone")
    out["backbone"] = name if _looks_like_hub_id(name) else os.path.basename(os.path.normpath(backbone))
  return out


def latest_eval(workdir: io_utils.PathLike) -> tuple[int | None, dict[str, float] | None]:
  """The metrics of a training run's latest evaluation, WORKDIR/eval/<step>/metrics.json.

  Args:
    workdir: a training workdir (local or gs://).

  Returns:
    (step, metrics), or (None, None) when the run has no evaluation.
  """
  eval_dir = io_utils.as_path(workdir) / "eval"
  steps = (
    sorted(int(p.name) for p in eval_dir.iterdir() if p.name.isdigit() and (p / METRICS_NAME).exists())
    if eval_dir.exists()
    else []
  )
  if not steps:
    return None, None
  return steps[-1], json.loads((eval_dir / str(steps[-1]) / METRICS_NAME).read_text())


def model_name(encoder_config: Mapping[str, Any], recipe: Mapping[str, Any] | None = None) -> str:
  """A model's name from what it is: laspar-<head>[-D<dims>]-<backbone>[-<training data>]."""
  head = str(encoder_config.get("head") or "sparse")
  dim = encoder_config.get("latent_dim")
  base = _get(recipe or {}, "model.backbone") or encoder_config.get("backbone") or ""
  parts = ["laspar", head.replace("_", "-")]
  if head.startswith("latent") and isinstance(dim, int) and dim > 0:
    parts.append(f"D{dim}")
  parts.append(os.path.basename(os.path.normpath(str(base))) if base else "")
  parts.append(_dataset_name(_get(recipe or {}, "data.collection")) or "")
  return "-".join(p.replace("/", "-") for p in parts if p)


def model_card(
  encoder_config: Mapping[str, Any],
  *,
  folder_name: str,
  metrics: Mapping[str, float] | None = None,
  recipe: Mapping[str, Any] | None = None,
  repo_id: str | None = None,
  eval_step: int | None = None,
) -> str:
  """The model card (README.md text) of an exported encoder.

  Args:
    encoder_config: the encoder's `encoder_config.json` as a dict.
    folder_name: the exported folder's name (used by the usage snippet without `repo_id`).
    metrics: {measure: value} of an evaluation (e.g. metrics.json of a training run).
    recipe: the training config as a dict (WORKDIR/config.json).
    repo_id: the Hub repository the folder is published to (the snippet downloads it).
    eval_step: the training step the metrics were measured at.

  Returns:
    Markdown with YAML front matter.
  """
  recipe = recipe or {}
  head, dim = encoder_config.get("head"), encoder_config.get("latent_dim")
  base = _get(recipe, "model.backbone") or encoder_config.get("backbone")
  datasets = [
    d for d in (_dataset_name(_get(recipe, "data.collection")), _dataset_name(_get(recipe, "eval.collection"))) if d
  ]
  front = ["---", "library_name: laspar_jax", "pipeline_tag: feature-extraction", "tags:"]
  front += [f"- {t}" for t in TAGS + ((head,) if head else ())]
  if _looks_like_hub_id(base):
    front.append(f"base_model: {json.dumps(base)}")
  if datasets:
    front += ["datasets:"] + [f"- {json.dumps(d)}" for d in dict.fromkeys(datasets)]
  measures = [k for k in metrics or {} if k not in _EFFICIENCY_KEYS]
  if measures:
    front += ["metrics:"] + [f"- {json.dumps(k)}" for k in measures]
  front.append("---")

  title = repo_id.split("/")[-1] if repo_id else model_name(encoder_config, recipe)
  width = "vocabulary" if head in ("mlm", "lm") else f"D = {dim:,}" if isinstance(dim, int) else "?"
  lines = [
    f"# {title}",
    "",
    f"A learned sparse retrieval encoder trained with laspar_jax: a `{head}` head "
    f"({width} dimensions) on `{_dataset_name(base)}`. Queries and documents become sparse vectors; "
    "their dot product is the relevance score, served by an inverted index.",
    "",
    "## Usage",
    "",
    "```python",
  ]
  if repo_id:
    lines += ["from huggingface_hub import snapshot_download"]
  lines += [
    "from laspar_jax.encode import encode_sparse",
    "from laspar_jax.models.sparse_encoder import load_encoder",
    "",
    f"path = snapshot_download({json.dumps(repo_id)})"
    if repo_id
    else f"path = {json.dumps(folder_name)}  # this folder",
    "encoder, tokenizer = load_encoder(path)",
    "k = min(128, encoder.output_dim)  # dims kept per query",
    'for idx_bk, val_bk in encode_sparse(encoder, tokenizer, ["what causes scurvy?"], kind="query", k=k):',
    "  print(idx_bk[0][:10], val_bk[0][:10])  # top dimensions and weights",
    "```",
    "",
    "Index and evaluate a collection with it:",
    "",
    "```bash",
    "python launch/index.py --encoder PATH --collection COLLECTION --index /tmp/index",
    "python launch/evaluate.py --encoder PATH --collection COLLECTION --split test --index /tmp/index",
    "```",
  ]
  if metrics:
    where = " ".join(
      x
      for x in (
        f"on `{_dataset_name(_get(recipe, 'eval.collection'))}`" if _get(recipe, "eval.collection") else "",
        f"split `{_get(recipe, 'eval.split')}`" if _get(recipe, "eval.split") else "",
        f"at training step {eval_step}" if eval_step is not None else "",
      )
      if x
    )
    lines += [
      "",
      "## Evaluation",
      "",
      f"Measured {where}:" if where else "Measured:",
      "",
      "| measure | value |",
      "| --- | --- |",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
  rows = []
  for label, key in _RECIPE_KEYS:
    vals = [_get(recipe, k) for k in ((key,) if isinstance(key, str) else key)]
    if any(v not in (None, "", {}) for v in vals):
      if "collection" in label or "data" in label:
        vals = [_dataset_name(v) for v in vals]  # no local paths in a published card
      rows.append(f"| {label} | {' / '.join(_fmt(v) for v in vals)} |")
  if rows:
    lines += ["", "## Training recipe", "", "| setting | value |", "| --- | --- |"] + rows
    lines += ["", f"The full training config is in `{TRAINING_CONFIG_NAME}`."]
  lines += [
    "",
    "## Files",
    "",
    f"`{sparse_encoder.CONFIG_NAME}` (how to build the encoder), `{sparse_encoder.PARAMS_NAME}` "
    "(all parameters), the backbone's `config.json` and tokenizer files.",
  ]
  return "\n".join(front + [""] + lines) + "\n"


def export_encoder(
  encoder_dir: io_utils.PathLike,
  out_dir: io_utils.PathLike,
  *,
  metrics: Mapping[str, float] | None = None,
  recipe: Mapping[str, Any] | None = None,
  repo_id: str | None = None,
  push_to_hub: bool = False,
  eval_step: int | None = None,
  overwrite: bool = True,
) -> str:
  """Writes a saved encoder folder, its model card and its metadata to `out_dir`; optionally uploads it.

  Args:
    encoder_dir: a folder written by `sparse_encoder.save_encoder` (local or gs://).
    out_dir: the folder to write (local or gs://; a local one to push).
    metrics: {measure: value} for the card and metrics.json.
    recipe: the training config as a dict (card table and training_config.json).
    repo_id: the Hub repository ("user/name") named in the card and pushed to.
    push_to_hub: upload the folder with `huggingface_hub.HfApi().upload_folder`.
    eval_step: the training step of `metrics` (shown in the card).
    overwrite: replace an existing `out_dir`.

  Returns:
    The exported folder.

  Raises:
    FileNotFoundError: `encoder_dir` is not a saved encoder.
    ValueError: `push_to_hub` without `repo_id`, or to push a non-local folder.
    ImportError: `push_to_hub` without huggingface_hub installed.
  """
  src, out = io_utils.as_path(encoder_dir), io_utils.as_path(out_dir)
  if not (src / sparse_encoder.CONFIG_NAME).exists():
    raise FileNotFoundError(f"{src} is not a saved encoder (no {sparse_encoder.CONFIG_NAME})")
  if os.fspath(src).rstrip("/") == os.fspath(out).rstrip("/"):
    raise ValueError("out_dir must differ from encoder_dir")
  if push_to_hub and not repo_id:
    raise ValueError("push_to_hub needs repo_id ('user/name')")
  if push_to_hub and not io_utils.is_local(out):
    raise ValueError(f"push_to_hub uploads a local folder; {out} is not local")
  api = _hf_api() if push_to_hub else None  # fail before writing anything
  enc_cfg = _portable(json.loads((src / sparse_encoder.CONFIG_NAME).read_text()), recipe)
  card = model_card(enc_cfg, folder_name=out.name, metrics=metrics, recipe=recipe, repo_id=repo_id, eval_step=eval_step)
  with io_utils.atomic_directory(out, overwrite=overwrite) as tmp:
    for f in src.iterdir():
      if f.is_file() and f.name not in (CARD_NAME, sparse_encoder.CONFIG_NAME):
        f.copy(tmp / f.name)
    (tmp / sparse_encoder.CONFIG_NAME).write_text(json.dumps(enc_cfg, indent=2))
    (tmp / CARD_NAME).write_text(card)
    if recipe:
      (tmp / TRAINING_CONFIG_NAME).write_text(json.dumps(dict(recipe), indent=2, default=str))
    if metrics:
      (tmp / METRICS_NAME).write_text(json.dumps(dict(metrics), indent=1))
  if api is not None:
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(
      folder_path=os.fspath(out), repo_id=repo_id, repo_type="model", commit_message="Upload laspar_jax sparse encoder"
    )
  return os.fspath(out)


def export_workdir(workdir: io_utils.PathLike, out_dir: io_utils.PathLike, **kwargs: Any) -> str:
  """`export_encoder` of a training run: WORKDIR/encoder, its latest eval metrics and WORKDIR/config.json.

  Args:
    workdir: a training workdir (`train_lib.train_and_evaluate`; local or gs://).
    out_dir: the folder to write.
    **kwargs: `export_encoder` arguments (repo_id, push_to_hub, overwrite; explicit
      metrics/recipe replace the run's).

  Returns:
    The exported folder.
  """
  wd = io_utils.as_path(workdir)
  step, metrics = latest_eval(wd)
  recipe = json.loads((wd / "config.json").read_text()) if (wd / "config.json").exists() else None
  kwargs = {"metrics": metrics, "recipe": recipe, "eval_step": step, **kwargs}
  return export_encoder(wd / "encoder", out_dir, **kwargs)


def _hf_api() -> Any:
  """`huggingface_hub.HfApi()`, or an ImportError that says how to install it."""
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel  (optional dependency)
  except ImportError as e:
    raise ImportError(
      "push_to_hub needs huggingface_hub: pip install 'laspar_jax[hub]' (or pip install huggingface_hub)"
    ) from e
  return huggingface_hub.HfApi()
