"""Imports flow one way in aol_jax: no cycle, no import hidden inside a function, formulas
below modules below drivers, and nothing from the experiments or the benchmarks.

The graph is read from the source (every ``import`` statement, at any depth), so a cycle is
found even where Python would tolerate it at run time.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "aol_jax"

# Pure maths of arrays and the rounding models: they never import a module (layer, block,
# network), freezing, or a driver.
FORMULAS = [
    "aol_jax._src.gram", "aol_jax._src.factors", "aol_jax._src.rescaling", "aol_jax._src.padding",
    "aol_jax._src.patches", "aol_jax._src.spectral_bounds", "aol_jax._src.certification.margins",
    "aol_jax._src.certification.rule", "aol_jax._src.certification.modes",
    "aol_jax._src.certification.statistical", "aol_jax._src.certification.rigorous",
]
MODULE_LEVEL = ["aol_jax._src.layers", "aol_jax._src.blocks", "aol_jax._src.network",
                "aol_jax._src.architectures", "aol_jax._src.freeze"]
DRIVERS = ["aol_jax._src.certification.certifier", "aol_jax._src.certification.dataset",
           "aol_jax._src.certification.radii", "aol_jax._src.certification.export"]


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, int, bool]]:
  """``(imported aol_jax module, line, inside a function)`` for each import in ``name``."""
  path = MODULES[name]
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
      targets = []
      if isinstance(child, ast.Import):
        targets = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - child.level + 1]
                          + ([base] if base else []))
        for alias in child.names:
          sub = f"{base}.{alias.name}"
          targets.append(sub if sub in MODULES else base)
      for target in targets:
        if target.split(".")[0] in ("aol_jax", "experiments", "benchmarks", "tests"):
          found.append((target, child.lineno, in_function))
      visit(child, nested)

  visit(tree, False)
  return found


GRAPH = {name: _imports(name) for name in MODULES}


def _reachable(start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for target, _, _ in GRAPH.get(todo.pop(), []):
      if target in MODULES and target not in seen:
        seen.add(target)
        todo.append(target)
  return seen


def test_the_graph_is_read():
  """The reader sees the imports it must: a guard that the checks below are not vacuous."""
  assert "aol_jax._src.layers" in {t for t, _, _ in GRAPH["aol_jax._src.freeze"]}
  assert "aol_jax._src.spectral_bounds" in {t for t, _, _ in GRAPH["aol_jax._src.layers"]}
  assert len(MODULES) > 25


def test_every_named_module_exists():
  """A renamed module would leave the layer checks below looking at nothing."""
  missing = [name for name in FORMULAS + MODULE_LEVEL + DRIVERS if name not in MODULES]
  assert not missing, missing


def test_no_import_cycle():
  cycles = sorted(name for name in MODULES if name in _reachable(name)
                  and not name.endswith("aol_jax"))
  assert not cycles, f"modules on an import cycle: {cycles}"


def test_no_import_inside_a_function():
  deferred = [f"{name}:{line} imports {target}" for name, edges in GRAPH.items()
              for target, line, in_function in edges if in_function]
  assert not deferred, deferred


@pytest.mark.parametrize("name", FORMULAS)
def test_formulas_import_no_module_and_no_driver(name):
  below = _reachable(name)
  assert not below & set(MODULE_LEVEL + DRIVERS), sorted(below & set(MODULE_LEVEL + DRIVERS))


@pytest.mark.parametrize("name", MODULE_LEVEL)
def test_modules_import_no_driver(name):
  assert not _reachable(name) & set(DRIVERS)


def test_the_library_never_imports_experiments_benchmarks_or_tests():
  outside = [f"{name} imports {target}" for name, edges in GRAPH.items()
             for target, _, _ in edges if not target.startswith("aol_jax")]
  assert not outside, outside


@pytest.mark.parametrize("package", ["benchmarks", "experiments"])
def test_benchmarks_and_experiments_never_import_the_tests(package):
  """The tests import the benchmarks' helpers (one copy); never the other way round, so a
  benchmark runs from an install without the test suite."""
  found = []
  for path in (ROOT.parent / package).rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
      found += [f"{path.name}:{node.lineno} imports {n}" for n in names
                if n.split(".")[0] == "tests"]
  assert not found, found
