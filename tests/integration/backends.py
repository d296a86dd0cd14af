"""One factory per remote backend: a connected, empty storage for a test.

Each factory is an async context manager taking pytest's ``tmp_path``, a storage name and
storage options (none: the defaults), yielding a connected ``RemoteStorage`` whose
table/collection is empty, and closing it after. Backend modules add themselves to FACTORIES.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from cacheme.storages.base import RemoteStorage


class Factory(Protocol):
    def __call__(
        self, tmp_path: Path, name: str, **options: Any
    ) -> AbstractAsyncContextManager[RemoteStorage[Any]]: ...


FACTORIES: dict[str, Factory] = {}

# The order of the parameters in the contract suite.
BACKENDS = ["redis", "redis_cluster", "sqlite", "postgres", "mysql", "mongo"]


def factory(name: str) -> Callable[[Factory], Factory]:
    def register(fn: Factory) -> Factory:
        FACTORIES[name] = fn
        return fn

    return register
