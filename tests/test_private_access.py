"""No module reaches into another's internals: no access to `_`-prefixed attributes of foreign objects.

The AST of every file under laspar_jax/, launch/ and configs/ is walked.
`self._x` / `cls._x` (a class using its own internals) and dunders are fine;
`module._name`, `obj._attr` on any other object and `from m import _name`
are not.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOTS = ("laspar_jax", "launch", "configs")
OWN = ("self", "cls")


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(source: str, filename: str = "<src>") -> list[str]:
  """`file:line: expr` for each access to a private attribute of a foreign object in `source`."""
  out = []
  for node in ast.walk(ast.parse(source, filename)):
    if isinstance(node, ast.Attribute) and _private(node.attr):
      if isinstance(node.value, ast.Name) and node.value.id in OWN:
        continue
      out.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out += [f"{filename}:{node.lineno}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
  return out


def _files():
  for root in ROOTS:
    yield from sorted((REPO / root).rglob("*.py"))


def test_checker_sees_violations():
  src = (
    "import m\nfrom m import _hidden\nclass A:\n  def f(self, o):\n"
    "    self._ok = cls_ok = 1\n    return o._bad, m._worse, self.__class__, o.__dict__\n"
  )
  got = violations(src)
  assert got == ["<src>:2: from m import _hidden", "<src>:6: o._bad", "<src>:6: m._worse"]


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_access(path):
  found = violations(path.read_text(), str(path.relative_to(REPO)))
  assert not found, "private attributes of other modules' objects:\n" + "\n".join(found)
