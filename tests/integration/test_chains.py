"""Tier chains end to end through ``cacheme.get``: backfill, invalidate, TTL per tier, batches."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import cacheme
from cacheme.serializer import MsgPackSerializer
from cacheme.storages.base import MISS, RemoteStorage

from .backends import FACTORIES

CHAINS = [
    pytest.param(("local", "redis"), marks=pytest.mark.redis, id="local-redis"),
    pytest.param(("local", "postgres"), marks=pytest.mark.postgres, id="local-postgres"),
    pytest.param(
        ("redis", "mongo"), marks=(pytest.mark.redis, pytest.mark.mongo), id="redis-mongo"
    ),
    pytest.param(("local", "sqlite"), marks=pytest.mark.sqlite, id="local-sqlite"),
]

_ids = itertools.count()


@dataclass
class Item:
    id: int
    label: str


@dataclass
class Chain:
    names: tuple[str, str]
    raw: dict[str, RemoteStorage[Any]]  # a second, independent connection per remote tier

    async def reset_local(self) -> None:
        """A fresh local tier, as after a restart."""
        await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=1000))


@pytest.fixture(params=CHAINS)
async def chain(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Chain]:
    names: tuple[str, str] = request.param
    async with AsyncExitStack() as stack:
        raw: dict[str, RemoteStorage[Any]] = {}
        for name in names:
            if name == "local":
                await cacheme.register_storage(
                    "local", cacheme.Storage(url="local://tlfu", size=1000)
                )
                continue
            backend = await stack.enter_async_context(FACTORIES[name](tmp_path, f"raw-{name}"))
            options = backend.options.model_dump(exclude_defaults=True)
            await cacheme.register_storage(name, cacheme.Storage(backend.url, **options))
            raw[name] = backend
        try:
            yield Chain(names, raw)
        finally:
            await cacheme.close_storages()


def make_node(chain: Chain, first_ttl: timedelta, second_ttl: timedelta) -> Any:
    """A node class of its own over the chain's two tiers; counts its loads."""
    first, second = chain.names

    @dataclass
    class ItemNode(cacheme.Node):
        item_id: int

        def key(self) -> str:
            return f"chain-item:{self.item_id}"

        async def load(self) -> Item:
            ItemNode.loads += 1
            return Item(self.item_id, f"item-{self.item_id}")

        class Meta(cacheme.Node.Meta):
            version = f"t{next(_ids)}"
            caches = [
                cacheme.Cache(storage=first, ttl=first_ttl),
                cacheme.Cache(storage=second, ttl=second_ttl),
            ]
            serializer = MsgPackSerializer()

    ItemNode.loads = 0  # type: ignore[attr-defined]
    return ItemNode


def full_key(node_cls: Any, item_id: int) -> str:
    return f"cacheme:chain-item:{item_id}:{node_cls._cacheme_config.version}"


async def stored(chain: Chain, tier: str, key: str) -> Item | None:
    """What ``tier`` holds for ``key``, read past cacheme's own connection."""
    if tier == "local":
        value = cacheme.storages()["local"].get(key)  # type: ignore[attr-defined]
        return None if value is MISS else value
    data = await chain.raw[tier].get(key)
    return None if data is None else MsgPackSerializer().loads(data, Item)


async def test_load_then_backfill_from_the_second_tier(chain: Chain) -> None:
    node_cls = make_node(chain, timedelta(seconds=30), timedelta(seconds=30))
    first, second = chain.names
    key = full_key(node_cls, 1)
    assert await cacheme.get(node_cls(1)) == Item(1, "item-1")
    assert node_cls.loads == 1
    assert await stored(chain, first, key) == Item(1, "item-1")
    assert await stored(chain, second, key) == Item(1, "item-1")

    # Empty the first tier only: the next get is served by the second and refills the first.
    if first == "local":
        await chain.reset_local()
    else:
        await chain.raw[first].remove_many([key])
    assert await stored(chain, first, key) is None
    assert await cacheme.get(node_cls(1)) == Item(1, "item-1")
    assert node_cls.loads == 1
    assert await stored(chain, first, key) == Item(1, "item-1")
    snapshot = cacheme.stats(node_cls)
    assert (snapshot.request_count(), snapshot.hit_count(), snapshot.load_count()) == (2, 1, 1)


async def test_invalidate_removes_from_every_tier(chain: Chain) -> None:
    node_cls = make_node(chain, timedelta(seconds=30), timedelta(seconds=30))
    key = full_key(node_cls, 2)
    await cacheme.get(node_cls(2))
    await cacheme.invalidate(node_cls(2))
    for tier in chain.names:
        assert await stored(chain, tier, key) is None, tier
    await cacheme.get(node_cls(2))
    assert node_cls.loads == 2


async def test_refresh_rewrites_every_tier(chain: Chain) -> None:
    node_cls = make_node(chain, timedelta(seconds=30), timedelta(seconds=30))
    key = full_key(node_cls, 3)
    await cacheme.get(node_cls(3))
    assert await cacheme.refresh(node_cls(3)) == Item(3, "item-3")
    assert node_cls.loads == 2
    for tier in chain.names:
        assert await stored(chain, tier, key) == Item(3, "item-3"), tier


async def test_each_tier_keeps_its_own_ttl(chain: Chain) -> None:
    node_cls = make_node(chain, timedelta(milliseconds=150), timedelta(seconds=30))
    first, second = chain.names
    key = full_key(node_cls, 4)
    await cacheme.get(node_cls(4))
    await asyncio.sleep(0.4)
    assert await stored(chain, first, key) is None  # expired in the short tier
    assert await stored(chain, second, key) == Item(4, "item-4")
    assert await cacheme.get(node_cls(4)) == Item(4, "item-4")
    assert node_cls.loads == 1  # served by the long tier, not reloaded


async def test_get_all_reads_each_remote_tier_in_one_round_trip(chain: Chain) -> None:
    node_cls = make_node(chain, timedelta(seconds=30), timedelta(seconds=30))
    nodes = [node_cls(i) for i in range(100)]
    remote = {n: cacheme.storages()[n] for n in chain.names if n != "local"}
    before = {n: s.stats.round_trips for n, s in remote.items()}  # type: ignore[attr-defined]
    values = await cacheme.get_all(nodes)
    assert values == [Item(i, f"item-{i}") for i in range(100)]
    assert node_cls.loads == 100
    for name, storage in remote.items():
        # one batched read of the misses, one batched write-back
        assert storage.stats.round_trips - before[name] <= 2, name  # type: ignore[attr-defined]
    if chain.names[0] == "local":
        await chain.reset_local()
    values = await cacheme.get_all(nodes + nodes[:10])
    assert values == [Item(i, f"item-{i}") for i in list(range(100)) + list(range(10))]
    assert node_cls.loads == 100


async def test_a_remote_tier_without_serializer_is_a_clear_error(chain: Chain) -> None:
    remote = next(n for n in chain.names if n != "local")

    class Bare(cacheme.Node):
        def key(self) -> str:
            return "bare"

        async def load(self) -> int:
            return 1

        class Meta(cacheme.Node.Meta):
            caches = [cacheme.Cache(storage=remote, ttl=None)]

    with pytest.raises(cacheme.ConfigurationError, match=rf"Bare.*{remote}.*serializer"):
        await cacheme.get(Bare())
