"""pyproject.toml declares what the cacheme package imports.

- Every third-party module that ``import cacheme`` loads at import time (the core: api, node,
  serializer, local tiers...) comes from a distribution listed in ``[project] dependencies``
  with a lower and an upper bound.
- Every other third-party import in the package (the drivers, imported lazily) comes from a
  distribution listed in ``dependencies`` or in an extra.
- ``theine`` is not a dependency (cacheme imports ``theine_core`` only); the benchmarks, which
  compare against it, get it from the ``dev`` extra.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cacheme"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEPENDENCIES = {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["dependencies"])}
EXTRAS = {
    extra: {canonicalize_name(Requirement(line).name) for line in lines}
    for extra, lines in PROJECT["optional-dependencies"].items()
}


def third_party(name: str) -> bool:
    return name != "cacheme" and name not in sys.stdlib_module_names


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Top-level names of the absolute imports in ``path`` (module level only, or all)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if third_party(name)}


# Import names whose distribution is named otherwise, for when it is not installed (the
# minimal install runs these tests without the optional drivers).
NOT_INSTALLED = {"opentelemetry": ["opentelemetry-api"]}


def distributions(module: str) -> set[str]:
    """The distributions that provide ``module`` (its own name when it is not installed)."""
    found = packages_distributions().get(module) or NOT_INSTALLED.get(module, [module])
    return {canonicalize_name(name) for name in found}


def core_files() -> list[Path]:
    """The package's files that ``import cacheme`` loads."""
    code = (
        "import json, sys, cacheme; "
        "print(json.dumps([m.__file__ for n, m in sys.modules.items() "
        "if n.split('.')[0] == 'cacheme' and getattr(m, '__file__', None)]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [Path(f) for f in json.loads(done.stdout)]


def test_core_imports_are_dependencies_with_both_bounds() -> None:
    files = core_files()
    assert PACKAGE / "serializer.py" in files
    modules = set().union(*(imports(f, top_level_only=True) for f in files))
    assert {"msgpack", "pydantic", "pydantic_core"} <= modules  # the scan sees them
    for module in sorted(modules):
        declared = distributions(module) & DEPENDENCIES.keys()
        assert declared, f"cacheme imports {module} but [project] dependencies lacks it"
        for name in declared:
            ops = {spec.operator for spec in DEPENDENCIES[name].specifier}
            assert ops & {">=", ">", "==", "~="}, f"{name} has no lower bound"
            assert ops & {"<", "<=", "==", "~="}, f"{name} has no upper bound"


def test_every_import_of_the_package_is_declared() -> None:
    declared = set(DEPENDENCIES).union(*EXTRAS.values())
    for path in sorted(PACKAGE.rglob("*.py")):
        for module in sorted(imports(path, top_level_only=False)):
            assert distributions(module) & declared, (
                f"{path.relative_to(ROOT)} imports {module}, which no dependency or extra declares"
            )


def test_theine_is_for_the_benchmarks_only() -> None:
    assert "theine" not in DEPENDENCIES
    assert "theine-core" in DEPENDENCIES
    benchmarks = set().union(
        *(imports(p, top_level_only=False) for p in (ROOT / "benchmarks").glob("*.py"))
    )
    if "theine" in benchmarks:
        assert "theine" in EXTRAS["dev"]
    package = set().union(*(imports(p, top_level_only=False) for p in PACKAGE.rglob("*.py")))
    assert "theine" not in package
