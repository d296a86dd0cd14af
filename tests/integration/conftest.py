from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cacheme.storages.base import RemoteStorage

from .backends import BACKENDS, FACTORIES

# Each backend's factory lives in its own module beside this file.
for _module in ("backend_redis", "backend_sql", "backend_mongo"):
    try:
        importlib.import_module(f"{__package__}.{_module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.{_module}":
            raise


@pytest.fixture(params=[pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS])
async def remote(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[RemoteStorage[Any]]:
    """A connected, empty remote storage, once per backend."""
    name: str = request.param
    if name not in FACTORIES:
        pytest.fail(f"no test factory for backend {name!r}")
    async with FACTORIES[name](tmp_path, f"contract-{name}") as storage:
        yield storage
