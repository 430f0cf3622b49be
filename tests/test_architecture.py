"""The import direction of DESIGN.md, read from the source (ast), so that no change can
quietly turn the library back into an experiment:

  experiments -> {sdl.train, sdl.models, sdl.data, sdl.optim, sdl.bench} -> sdl.parallel,
  sdl.optim reads layers by their attributes (no models, train or kernels), sdl.train knows
  no model family, sdl.ops is a leaf, and nothing in sdl imports experiments.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (importer package, forbidden prefixes)
FORBIDDEN = [
    ("sdl", ("experiments",)),
    ("sdl.models", ("sdl.train", "sdl.optim")),
    ("sdl.data", ("sdl.train", "sdl.optim")),
    ("sdl.parallel", ("sdl.train", "sdl.optim")),
    ("sdl.optim", ("sdl.models", "sdl.train", "sdl.kernels")),
    ("sdl.train", ("sdl.models",)),
    ("sdl.bench", ("sdl.train",)),
    ("sdl.ops", ("sdl.models", "sdl.data", "sdl.parallel", "sdl.optim", "sdl.train",
                 "sdl.bench", "sdl.kernels")),
]


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool) -> set[str]:
  """Every module `source` imports, at any depth (functions too), relative ones resolved;
  `from a import b` counts as both `a` and `a.b`."""
  found = set()
  package = module if is_package else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)
  return found


def violations(module: str, imported: set[str]) -> list[str]:
  out = []
  for importer, banned in FORBIDDEN:
    if module == importer or module.startswith(importer + "."):
      for name in sorted(imported):
        if any(name == b or name.startswith(b + ".") for b in banned):
          out.append(f"{module} imports {name}")
  return out


def sdl_modules():
  for path in sorted((ROOT / "sdl").rglob("*.py")):
    yield path, module_name(path)


def test_the_checker_sees_each_kind_of_forbidden_import():
  cases = {
      ("sdl.train.loop", "from sdl.models.cosmoflow import CosmoFlow"): True,
      ("sdl.train.loop", "def f():\n  import sdl.models.resnet"): True,
      ("sdl.optim.kfac", "from ..models import conv"): True,
      ("sdl.optim.kfac", "from sdl.kernels import conv3d"): True,
      ("sdl.optim.kfac", "from sdl.parallel.collectives import device_count"): False,
      ("sdl.models.conv", "from sdl.optim import kfac"): True,
      ("sdl.data.loader", "import experiments.trainers"): True,
      ("sdl.bench.suite", "from sdl.train import step"): True,
      ("sdl.bench.suite", "from sdl.models import conv"): False,
      ("sdl.parallel.mesh", "from sdl import train"): True,
  }
  for (module, source), bad in cases.items():
    assert bool(violations(module, imports(source, module, False))) == bad, (module, source)


@pytest.mark.parametrize("path,module", list(sdl_modules()), ids=lambda v: str(v))
def test_import_direction(path, module):
  found = imports(path.read_text(), module, path.name == "__init__.py")
  assert not violations(module, found)


def test_every_sdl_package_is_covered():
  packages = {module_name(p.parent / "__init__.py") for p in (ROOT / "sdl").glob("*/__init__.py")}
  assert packages <= {importer for importer, _ in FORBIDDEN} | {"sdl.kernels"}, packages
