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
from decimal import Decimal
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


async def test_the_node_of_a_memoized_function_decodes_to_its_type(sqlite_tier: None) -> None:
    """``fn.node(...)`` from a ``DynamicNode(key=...)`` works with ``cacheme.get`` and
    ``cacheme.invalidate`` whatever class was given to ``Memoize`` (for a plain class it was
    a bare ``DynamicNode`` that both refused), decodes to the function's return type (a
    ``Decimal`` came back as ``str``), and loads through the function on a miss."""
    built = cacheme.build_node(
        "MemoTypesBuilt", "v1", [cacheme.Cache(storage=TIER, ttl=None)], JSONSerializer()
    )
    calls: list[str] = []

    @cacheme.Memoize(SharedNode)
    async def balance(user: int) -> Decimal:
        calls.append("balance")
        return Decimal("10.50")

    @balance.to_node
    def _(user: int) -> cacheme.DynamicNode:
        return cacheme.DynamicNode(key=f"balance:{user}")

    @cacheme.Memoize(built)
    async def square(n: int) -> Decimal:
        calls.append("square")
        return Decimal(n * n)

    @square.to_node
    def _(n: int) -> cacheme.DynamicNode:
        return cacheme.DynamicNode(key=f"square:{n}")

    node = balance.node(8)
    assert node.key() == "balance:8" and "balance" in repr(node)
    assert await cacheme.get(node) == Decimal("10.50")  # a miss: loaded by the function
    assert calls == ["balance"]
    got = await cacheme.get(balance.node(8))  # a hit of the remote tier, decoded
    assert type(got) is Decimal and got == Decimal("10.50")
    assert await balance(8) == Decimal("10.50") and calls == ["balance"]
    await cacheme.invalidate(balance.node(8))
    assert await balance(8) == Decimal("10.50") and calls == ["balance"] * 2

    assert await square(3) == Decimal(9)
    node = square.node(3)
    assert isinstance(node, built) and repr(node) == "MemoTypesBuilt(key='square:3')"
    got = await cacheme.get(node)
    assert type(got) is Decimal and got == Decimal(9)
    assert calls == ["balance"] * 2 + ["square"]
    # Neither is listed among the node classes: they are views of the function.
    assert not [c for c in cacheme.nodes() if c.__name__.endswith(".node")]


async def test_get_all_of_two_functions_nodes_keeps_each_type(sqlite_tier: None) -> None:
    """``get_all`` mixing the nodes of two functions memoized with one class: each value
    decodes to its own function's type. The batch was decoded
    with the first node's type (a ``Decimal`` came back as ``str``, or a ``str`` failed to
    decode as ``Decimal`` and was loaded again)."""
    calls: list[str] = []

    @cacheme.Memoize(SharedNode)
    async def label(n: int) -> str:
        calls.append("label")
        return f"user {n}"

    @label.to_node
    def _(n: int) -> cacheme.DynamicNode:
        return cacheme.DynamicNode(key=f"mixed-label:{n}")

    @cacheme.Memoize(SharedNode)
    async def amount(n: int) -> Decimal:
        calls.append("amount")
        return Decimal(n) + Decimal("0.75")

    @amount.to_node
    def _(n: int) -> cacheme.DynamicNode:
        return cacheme.DynamicNode(key=f"mixed-amount:{n}")

    for order in (0, 1):
        nodes = [label.node(7), amount.node(7)]
        if order:
            nodes.reverse()
        got = await cacheme.get_all(nodes)
        if order:
            got.reverse()
        assert got[0] == "user 7" and type(got[1]) is Decimal and got[1] == Decimal("7.75")
    assert calls == ["label", "amount"]  # the second batch was all hits, none reloaded
