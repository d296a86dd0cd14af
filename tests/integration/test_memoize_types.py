"""Two functions memoized with one node class, through a remote tier: each keeps its type.

The value type a remote tier decodes to belongs to the memoized function, not to the node
class they share: one function returning ``int`` and one returning ``str`` must both
round-trip through SQLite with a JSON serializer, and their second calls must be hits (a
value decoded to the other function's type fails to decode and is reloaded every time).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

import cacheme
from cacheme.serializer import JSONSerializer

from .backend_sql import sql_table

pytestmark = pytest.mark.sqlite

TIER = "memo-types-sqlite"


@dataclass
class SharedNode(cacheme.Node):
    """No typed ``load()``: the memoized function gives the value type."""

    name: str

    def key(self) -> str:
        return f"memo-types:{self.name}"

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [cacheme.Cache(storage=TIER, ttl=timedelta(minutes=5))]
        serializer = JSONSerializer()


@pytest.fixture
async def sqlite_tier(tmp_path: Path) -> AsyncIterator[None]:
    async with sql_table("sqlite", tmp_path) as table:
        await cacheme.register_storage(TIER, cacheme.Storage(table.url, table=table.table))
        try:
            yield
        finally:
            await cacheme.close_storages()


async def test_two_functions_one_node_class_keep_their_types(sqlite_tier: None) -> None:
    calls = {"f": 0, "g": 0}

    @cacheme.Memoize(SharedNode)
    async def f(x: int) -> int:
        calls["f"] += 1
        return x * 10

    @f.to_node
    def _f_node(x: int) -> SharedNode:
        return SharedNode(name=f"f:{x}")

    @cacheme.Memoize(SharedNode)
    async def g(x: int) -> str:
        calls["g"] += 1
        return f"g-{x}"

    @g.to_node
    def _g_node(x: int) -> SharedNode:
        return SharedNode(name=f"g:{x}")

    before = cacheme.stats(SharedNode)
    first = [await f(1), await g(1)]
    second = [await f(1), await g(1)]
    third = [await g(1), await f(1)]
    after = cacheme.stats(SharedNode)

    assert first == [10, "g-1"]
    assert second == [10, "g-1"], "second calls, read back from SQLite"
    assert third == ["g-1", 10], "third calls, in the other order"
    assert [type(v) for v in second] == [int, str]
    assert [type(v) for v in third] == [str, int]
    assert calls == {"f": 1, "g": 1}, f"each function should load once, loaded {calls}"
    assert after.load_count() - before.load_count() == 2
    assert after.hit_count() - before.hit_count() == 4, "the second and third calls are hits"
    assert after.decode_error_count() - before.decode_error_count() == 0
    assert after.storage_error_count() - before.storage_error_count() == 0
