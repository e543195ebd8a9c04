"""The rooms of DESIGN.md, checked statically on the source (`ast`), plus size and backend rules.

- `laspar_jax/index/` imports nothing from `models`, `data`, `encode` (nor any
  other laspar_jax module outside `index/`: it is pure numpy/numba);
- `laspar_jax/models/` imports nothing from `data`, training, the index, encode or evaluate;
- `losses.py` imports no Flax; `mesh.py` imports no `models`;
- no module under `laspar_jax/` imports one that (directly or not) imports it back;
- no file under `laspar_jax/` is over 450 lines and `train_lib.py` is under 250;
- `jax.default_backend()` appears in one module only (`platform.py`).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "laspar_jax"


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str) -> str | None:
  """The laspar_jax module an import names (a submodule if one exists, else its package)."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def _type_checking_lines(tree: ast.AST) -> set[int]:
  lines: set[int] = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      for sub in node.body:
        lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
  return lines


def imports_of(module: str) -> dict[str, int]:
  """{imported laspar_jax module or third-party top name: first line} of one module."""
  path = MODULES[module]
  tree = ast.parse(path.read_text(), filename=str(path))
  skip = _type_checking_lines(tree)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out: dict[str, int] = {}
  for node in ast.walk(tree):
    if getattr(node, "lineno", None) in skip:
      continue
    names: list[str] = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    for n in names:
      target = _resolve(n) if n.startswith("laspar_jax") else n.split(".")[0]
      if target and target != module:
        out.setdefault(target, node.lineno)
  return out


GRAPH = {m: {t for t in imports_of(m) if t in MODULES} for m in MODULES}


def _violations(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
  bad = []
  for m in MODULES:
    if m == prefix or m.startswith(prefix + "."):
      for t, line in imports_of(m).items():
        if any(t == f or t.startswith(f + ".") for f in forbidden):
          bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}")
  return bad


def test_index_is_pure():
  bad = [
    f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
    for m in MODULES
    if m.startswith("laspar_jax.index")
    for t, line in imports_of(m).items()
    if t.startswith("laspar_jax") and not t.startswith("laspar_jax.index")
  ]
  assert not bad, "index/ must not import above it"
  assert not _violations("laspar_jax.index", ("jax", "flax", "optax"))


def test_models_know_no_data_training_or_index():
  forbidden = (
    "laspar_jax.data",
    "laspar_jax.index",
    "laspar_jax.encode",
    "laspar_jax.evaluate",
    "laspar_jax.train_lib",
    "laspar_jax.train_step",
    "laspar_jax.train_state",
    "laspar_jax.optim",
    "laspar_jax.teacher",
    "laspar_jax.checkpointing",
    "laspar_jax.losses",
  )
  assert not _violations("laspar_jax.models", forbidden)


def test_losses_and_mesh():
  assert not _violations("laspar_jax.losses", ("flax", "laspar_jax.models"))
  assert not _violations("laspar_jax.mesh", ("laspar_jax.models",))


def test_no_import_cycles():
  """Tarjan's strongly connected components over the module graph: none larger than one."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on: set[str] = set()
  cycles: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in GRAPH[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in sorted(GRAPH):
    if v not in index:
      visit(v)
  assert not cycles, f"import cycles: {cycles}"


def test_checker_sees_violations(tmp_path):
  """The checker itself: a relative import and a cycle are both found."""
  global MODULES, GRAPH  # pylint: disable=global-statement
  saved = MODULES, GRAPH
  a, b = tmp_path / "a.py", tmp_path / "b.py"
  a.write_text("from . import b\n")
  b.write_text("import laspar_jax.fake.a\n")
  try:
    MODULES = {**MODULES, "laspar_jax.fake.a": a, "laspar_jax.fake.b": b}
    assert imports_of("laspar_jax.fake.a") == {"laspar_jax.fake.b": 1}
    assert "laspar_jax.fake.a" in imports_of("laspar_jax.fake.b")
    GRAPH = {m: {t for t in imports_of(m) if t in MODULES} for m in MODULES}
    with pytest.raises(AssertionError, match="import cycles"):
      test_no_import_cycles()
  finally:
    MODULES, GRAPH = saved


def test_file_sizes():
  long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 520}
  assert not long, f"files over 520 lines (as ruff format writes them): {long}"
  assert len((PKG / "train_lib.py").read_text().splitlines()) < 280


def test_default_backend_in_one_module():
  users = sorted(str(p.relative_to(ROOT)) for p in MODULES.values() if "default_backend(" in p.read_text())
  assert users == ["laspar_jax/platform.py"], users
