"""Unit tests: local tiers only, no network.

After every test: wait for the flights still running (a test may leave one behind on purpose,
e.g. by cancelling its caller), check that no in-flight entry leaked, close every registered
storage and put the key prefix back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

import cacheme
from cacheme import runtime
from cacheme.storages.base import LocalStorage


@pytest.fixture(autouse=True)
async def _reset_cacheme() -> AsyncIterator[None]:
    yield
    try:
        await runtime.current().quiesce(5)
        leaked = len(runtime.current().flights)
    finally:
        await cacheme.close_storages()
        cacheme.set_prefix("cacheme")
    assert leaked == 0, f"{leaked} in-flight entries outlived their test"


@pytest.fixture
async def local() -> LocalStorage[Any]:
    """A W-TinyLFU tier registered as ``local``."""
    await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=1000))
    storage = cacheme.storages()["local"]
    assert isinstance(storage, LocalStorage)
    return storage
