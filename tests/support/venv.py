"""Offline virtual environments that hold exactly a set of distributions and their
dependency closure, taken from the environment running the tests.

A bare ``python -m venv --without-pip`` gets one symbolic link per top-level entry (package,
module, ``.libs`` folder, ``.dist-info``) of each distribution in the closure, read from
``importlib.metadata``: no network, no copy, about a second. A top-level folder that two
distributions share (a namespace package such as ``google``) is linked file by file.
"""

import collections
import importlib.metadata as metadata
import os
import pathlib
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"


def project_requirements(*extras: str) -> list[str]:
  """pyproject.toml's dependencies plus those of ``extras``, the project's own extras
  (``aol-jax[train]``) expanded: what ``pip install -e '.[extras]'`` installs first."""
  project = tomllib.loads(PYPROJECT.read_text())["project"]
  out, todo, seen = [], list(project["dependencies"]) + [f"aol-jax[{e}]" for e in extras], set()
  while todo:
    req = Requirement(todo.pop(0))
    if canonicalize_name(req.name) != canonicalize_name(project["name"]):
      out.append(str(req))
      continue
    for extra in sorted(set(req.extras) - seen):
      seen.add(extra)
      todo.extend(project["optional-dependencies"][extra])
  return out


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
  """The installed distributions ``requirements`` need, transitively, by canonical name
  (markers evaluated for this interpreter and the extras each requirement names)."""
  found: dict[str, metadata.Distribution] = {}
  extras_of: dict[str, set[str]] = collections.defaultdict(set)
  todo = [Requirement(r) for r in requirements]
  while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    if name in found and set(req.extras) <= extras_of[name]:
      continue
    extras_of[name] |= set(req.extras)
    dist = found[name] = metadata.distribution(req.name)
    for line in dist.requires or []:
      sub = Requirement(line)
      if sub.marker is None or any(sub.marker.evaluate({"extra": e})
                                   for e in extras_of[name] | {""}):
        todo.append(sub)
  return found


def _top_level(dist: metadata.Distribution) -> set[str]:
  """The distribution's entries directly in site-packages (scripts in ``bin/`` left out)."""
  return {pathlib.PurePath(f).parts[0] for f in dist.files or ()
          if not str(f).startswith("..")}


def build(directory: str | os.PathLike, requirements: list[str]) -> tuple[pathlib.Path, list]:
  """A venv at ``directory`` with exactly the closure of ``requirements``; returns its
  interpreter and the closure's canonical names."""
  directory = pathlib.Path(directory)
  dists = closure(requirements)
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True,
                 timeout=120)
  site = directory / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
  site = site / "site-packages"
  owners = collections.Counter(entry for d in dists.values() for entry in _top_level(d))
  for dist in dists.values():
    root = pathlib.Path(dist.locate_file(""))
    for entry in _top_level(dist):
      if owners[entry] == 1:
        os.symlink(root / entry, site / entry)
        continue
      for f in dist.files:
        if pathlib.PurePath(f).parts[0] == entry:  # shared: link this distribution's files
          (site / f).parent.mkdir(parents=True, exist_ok=True)
          os.symlink(root / f, site / f)
  return directory / "bin" / "python", sorted(dists)


def clean_environment(**extra: str) -> dict[str, str]:
  """This process's environment without what would let the venv see other packages."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE")}
  env.update(extra)
  return env
