"""The public API: a sorted, complete ``__all__``; importing works without any driver."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import cacheme

INIT = Path(cacheme.__file__)


def test_all_is_sorted_and_unique() -> None:
    assert cacheme.__all__ == sorted(cacheme.__all__)
    assert len(set(cacheme.__all__)) == len(cacheme.__all__)


def test_every_name_in_all_exists() -> None:
    for name in cacheme.__all__:
        assert hasattr(cacheme, name), name


def test_every_name_imported_in_init_is_in_all() -> None:
    tree = ast.parse(INIT.read_text())
    imported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
    }
    defined = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    public = {n for n in imported | defined if not n.startswith("_")}
    assert public == set(cacheme.__all__)


def test_no_public_attribute_is_left_out() -> None:
    public = {
        name
        for name, value in vars(cacheme).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # from __future__ import annotations
    }
    assert public == set(cacheme.__all__)


def test_spec_names_are_public() -> None:
    for name in (
        "Node",
        "Cache",
        "Storage",
        "Memoize",
        "DynamicNode",
        "BloomFilter",
        "build_node",
        "register_storage",
        "get",
        "get_all",
        "invalidate",
        "refresh",
        "nodes",
        "stats",
        "set_prefix",
    ):
        assert name in cacheme.__all__, name


def test_errors_share_one_root() -> None:
    for name in cacheme.__all__:
        value = getattr(cacheme, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, cacheme.CachemeError), name


def test_import_without_any_driver() -> None:
    code = """
import sys
for name in ("redis", "asyncpg", "aiosqlite", "asyncmy", "pymongo"):
    sys.modules[name] = None
import cacheme
from cacheme import *  # noqa
assert cacheme.Node and cacheme.get
loaded = sorted(m for m in sys.modules if m.startswith("cacheme.storages."))
print(loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    for backend in ("redis", "sql", "sqlite", "postgres", "mysql", "mongo"):
        assert f"'cacheme.storages.{backend}'" not in out.stdout
