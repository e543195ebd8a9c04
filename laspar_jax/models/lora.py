"""LoRA adapters (Hu et al., 2021) on the projections of any backbone family.

`apply_lora(backbone, targets=..., rank=r, alpha=a)` replaces, in place,
every `layers.Dense` held under one of the `targets` attribute names (the
Hugging Face names: `q_proj`, `fc1`, `wi_0`, ...) by a `LoRADense`:

  y = base(x) + (alpha / r) * dropout(x) @ lora_a @ lora_b

with the base Dense kept as it is (its parameters move to `<name>/base/...`),
`lora_a` [in, r] drawn as Hugging Face peft does (kaiming-uniform with
a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and `lora_b` [r, out] zeros, so a
fresh adapter leaves the outputs unchanged. The adapters carry logical axes
(`lora_a`: the base's input axis and None; `lora_b`: None and the base's
output axis); on scanned (stacked) layers they are stacked the same way, and
dropout inside the scan draws from one key per layer (`layers.Stacked`).
The vocabulary head (`lm_head`) is never adapted.

The optimizer (`laspar_jax.optim`) trains the parameters named `lora_a` /
`lora_b` and freezes the rest of the backbone (no optimizer state).
`merge_lora` folds the adapters back into plain Dense layers for export.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from laspar_jax.models import backbone, layers

LORA_NAMES = ("lora_a", "lora_b")  # parameter names the optimizer labels "lora"
SKIPPED = ("lm_head",)  # submodules never adapted


def default_targets(family: str) -> tuple[str, ...]:
  """The default target names of a family (`backbone.Family.lora_targets`; by family name or model_type).

  Raises:
    ValueError: no such family, or it lists no default targets.
  """
  try:
    targets = backbone.family_named(family).lora_targets
  except KeyError as e:
    raise ValueError(f"no default LoRA targets for family {family!r} ({e.args[0]}); list the target names") from e
  if not targets:
    raise ValueError(f"family {family!r} lists no default LoRA targets; list the target attribute names explicitly")
  return targets


class LoRADense(nnx.Module):
  """A frozen-by-the-optimizer base Dense plus a low-rank update.

  Attributes:
    base: the wrapped `layers.Dense` (unchanged).
    lora_a: [..., in, r] (leading axes: stacked layers).
    lora_b: [..., r, out], zeros at initialisation.
    scale: alpha / r.
    rate: dropout rate on the adapter's input (applied when a call passes `rngs`).
  """

  CAST_AT_USE = ("lora_a", "lora_b")  # in the step only as `.astype(dtype)` (`layers.cast_once`)

  def __init__(self, base: layers.Dense, *, rank: int, alpha: float, dropout: float = 0.0, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    shape = tuple(base.kernel.get_value().shape)
    axes = layers.logical_axes(base.kernel) or (None,) * len(shape)
    *lead, d_in, d_out = shape
    bound = d_in**-0.5  # kaiming_uniform_(a=sqrt(5)) on peft's [r, in] weight
    a = jax.random.uniform(rngs.params(), (*lead, d_in, rank), jnp.float32, -bound, bound)
    self.base = base
    self.lora_a = layers.param(a, (*axes[:-2], axes[-2], None))
    self.lora_b = layers.param(jnp.zeros((*lead, rank, d_out), jnp.float32), (*axes[:-2], None, axes[-1]))
    self.scale = float(alpha) / rank
    self.rate = float(dropout)
    self.dtype = base.dtype

  def delta(self) -> jax.Array:
    """(alpha / r) * A @ B, shaped like the base kernel (float32)."""
    return self.scale * jnp.matmul(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """base(x) + scale * dropout(x) A B; dropout (rate > 0) draws from `rngs.dropout()` when rngs is given
    (the backbone passes its dropout stream while training, None otherwise)."""
    y = self.base(x)
    if rngs is not None and self.rate > 0.0:
      x = layers.dropout(x, self.rate, deterministic=False, rngs=rngs)
    z = jnp.dot(x.astype(self.dtype), self.lora_a[...].astype(self.dtype), preferred_element_type=jnp.float32)
    z = jnp.dot(z.astype(self.dtype), self.lora_b[...].astype(self.dtype), preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32) + self.scale * z).astype(y.dtype)


def _slots(module: nnx.Module, kind: type) -> Iterator[tuple[tuple[Any, ...], nnx.Module, str, Any]]:
  """(path, parent, attribute, child) for every `kind` child attribute, outside `SKIPPED` subtrees."""
  seen: set[int] = set()
  for path, parent in nnx.iter_modules(module):
    if any(str(p) in SKIPPED for p in path):
      continue
    for name, child in sorted(vars(parent).items()):
      if isinstance(child, kind) and id(child) not in seen and name not in SKIPPED:
        seen.add(id(child))
        yield (*path, name), parent, name, child


def apply_lora(
  module: nnx.Module, *, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0, rngs: nnx.Rngs
) -> int:
  """Wraps every `layers.Dense` named in `targets` by a `LoRADense` (in place).

  Args:
    module: a backbone (or any module; `lm_head` subtrees are skipped).
    targets: attribute names of the Dense layers to adapt (see `default_targets`).
    rank: r.
    alpha: the update is scaled by alpha / r.
    dropout: dropout rate on the adapters' input (when the backbone's call passes a dropout stream).
    rngs: `rngs.params()` draws each lora_a, in a fixed (sorted path) order.

  Returns:
    The number of layers adapted.

  Raises:
    ValueError: no Dense layer matches `targets`.
  """
  targets = set(targets)
  found = [(parent, name, child) for _, parent, name, child in _slots(module, layers.Dense) if name in targets]
  if not found:
    names = sorted({name for _, _, name, _ in _slots(module, layers.Dense)})
    raise ValueError(
      f"no Dense layer named {sorted(targets)} in {type(module).__name__}; its Dense layers are named {names}"
    )
  for parent, name, child in found:
    setattr(parent, name, LoRADense(child, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
  return len(found)


LORA_KEYS = ("rank", "alpha", "dropout", "targets")  # keys of an encoder config's `lora` dict


def apply_lora_config(model: nnx.Module, spec: dict[str, Any], *, seed: int) -> int:
  """`apply_lora` from an encoder config's `lora` dict: {"rank", "alpha", "dropout", "targets"}.

  Args:
    model: a backbone of a registered family (its `lora_targets` serve "default").
    spec: rank (required), alpha (default rank), dropout (0), targets ("default" or names).
    seed: lora_a draws from `nnx.Rngs(params=seed)`.

  Returns:
    The number of layers adapted.

  Raises:
    ValueError: unknown keys or no rank.
  """
  spec = dict(spec)
  unknown = sorted(set(spec) - set(LORA_KEYS))
  if unknown or "rank" not in spec:
    raise ValueError(f"EncoderConfig.lora = {spec}: expected the keys {sorted(LORA_KEYS)} (rank required)")
  targets = spec.get("targets", "default")
  if targets == "default":
    targets = default_targets(backbone.family_of(model).name)
  rank = int(spec["rank"])
  return apply_lora(
    model,
    targets=targets,
    rank=rank,
    alpha=float(spec.get("alpha", rank)),
    dropout=float(spec.get("dropout", 0.0)),
    rngs=nnx.Rngs(params=seed),
  )


def merge_lora(module: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel (W + (alpha/r) A B) and unwraps it (in place).

  Returns:
    `module`, holding plain Dense layers again.
  """
  for _, parent, name, child in list(_slots(module, LoRADense)):
    kernel = child.base.kernel
    kernel.set_value((kernel.get_value().astype(jnp.float32) + child.delta()).astype(kernel.get_value().dtype))
    setattr(parent, name, child.base)
  return module


def lora_modules(module: nnx.Module) -> list[LoRADense]:
  """Every LoRADense under `module`."""
  return [child for _, _, _, child in _slots(module, LoRADense)]


def lora_param_count(module: nnx.Module) -> int:
  """Number of adapter parameters (lora_a and lora_b) under `module`."""
  return sum(m.lora_a.get_value().size + m.lora_b.get_value().size for m in lora_modules(module))


def merged_flat_params(flat: dict[str, Any], scales: dict[str, float], sep: str = ".") -> dict[str, Any]:
  """Flat parameter dict with adapters folded in: "<p>.base.kernel" + A B -> "<p>.kernel".

  Args:
    flat: "."-joined parameter names -> arrays (numpy or jax), as saved.
    scales: "<p>" (the LoRADense's path) -> alpha / r.
    sep: the name separator.

  Returns:
    The names and arrays of the merged (plain Dense) model.
  """
  out = {}
  for name, arr in flat.items():
    prefix, _, leaf = name.rpartition(sep)
    if leaf in LORA_NAMES:
      continue
    owner, _, part = prefix.rpartition(sep)
    if part == "base" and owner in scales:
      if leaf == "kernel":
        delta = jnp.matmul(
          jnp.asarray(flat[f"{owner}{sep}lora_a"], jnp.float32),
          jnp.asarray(flat[f"{owner}{sep}lora_b"], jnp.float32),
          precision=jax.lax.Precision.HIGHEST,
        )
        arr = (jnp.asarray(arr, jnp.float32) + scales[owner] * delta).astype(arr.dtype)
      name = f"{owner}{sep}{leaf}"
    out[name] = arr
  return out


def scales_by_path(module: nnx.Module, sep: str = ".") -> dict[str, float]:
  """ "<path of each LoRADense>" -> alpha / r (for `merged_flat_params`)."""
  return {sep.join(map(str, path)): child.scale for path, _, _, child in _slots(module, LoRADense)}
