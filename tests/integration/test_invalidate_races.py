"""An invalidate is never lost to a get racing it, on a ``[local, remote]`` chain.

The kind: a read of the remote tier that lands after an ``invalidate`` of its key was issued
must not see the removed value (the storage orders reads after the writes and removals
already issued for their keys), and a load or read that an ``invalidate`` detached writes
nothing back, to any tier. Each order is tried: the get first, the invalidate first, the
get's read and the removal in one event-loop turn, and through ``get_all``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import cacheme
from cacheme import Cache, Node
from cacheme.serializer import MsgPackSerializer
from cacheme.storages.base import Entry, RemoteStorage
from cacheme.storages.registry import storages

from .backends import BACKENDS, FACTORIES

SOURCE: dict[str, int] = {}


class Item(Node):
    _cacheme_abstract = True

    def __init__(self, k: str) -> None:
        self.k = k

    def key(self) -> str:
        return f"race:{self.k}"

    async def load(self) -> int:
        return SOURCE[self.k]


def item_class() -> type[Item]:
    meta = type(
        "Meta",
        (Node.Meta,),
        {
            "version": "v1",
            "caches": [
                Cache(storage="local", ttl=timedelta(seconds=30)),
                Cache(storage="remote", ttl=timedelta(seconds=30)),
            ],
            "serializer": MsgPackSerializer(),
        },
    )
    return type("RaceItem", (Item,), {"Meta": meta, "__module__": __name__})


@pytest.fixture(params=[pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS])
async def remote(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[RemoteStorage[Any]]:
    name: str = request.param
    async with FACTORIES[name](tmp_path, f"race-{name}") as raw:
        options = raw.options.model_dump(exclude_defaults=True)
        await cacheme.register_storage("remote", cacheme.Storage(raw.url, **options))
        await cacheme.register_storage("local", cacheme.Storage("local://tlfu", size=1000))
        try:
            storage = storages()["remote"]
            assert isinstance(storage, RemoteStorage)
            yield storage
        finally:
            await cacheme.close_storages()


async def stored_elsewhere(storage: RemoteStorage[Any], k: str, value: int) -> None:
    """Another process cached ``value`` for ``k`` in the shared tier."""
    await storage.set_many([Entry(f"cacheme:race:{k}:v1", MsgPackSerializer().dumps(value), None)])


@pytest.mark.parametrize("order", ["get-first", "invalidate-first", "get_all"])
async def test_a_get_racing_invalidate_never_brings_the_old_value_back(
    remote: RemoteStorage[Any], order: str
) -> None:
    node_cls = item_class()
    for round_ in range(10):
        k = f"{order}-{round_}-{uuid.uuid4().hex[:6]}"
        SOURCE[k] = 1
        await stored_elsewhere(remote, k, 1)
        if order == "invalidate-first":
            SOURCE[k] = 2
            removal = asyncio.ensure_future(cacheme.invalidate(node_cls(k)))
            racing = asyncio.ensure_future(cacheme.get(node_cls(k)))
            await removal
        else:
            if order == "get_all":
                racing = asyncio.ensure_future(cacheme.get_all([node_cls(k), node_cls(k)]))
            else:
                racing = asyncio.ensure_future(cacheme.get(node_cls(k)))
            SOURCE[k] = 2
            await cacheme.invalidate(node_cls(k))
        await racing  # concurrent with the invalidate: either value is fine for it
        # Once invalidate returned and the racing get is done, only the new value is served.
        assert await cacheme.get(node_cls(k)) == 2, f"round {round_}: the old value came back"
        assert await cacheme.get(node_cls(k)) == 2


async def test_a_removal_is_queued_when_invalidate_is_called(remote: RemoteStorage[Any]) -> None:
    """A get issued in the same turn right after invalidate (behind an unrelated read that
    opened the turn's batch) reads after the removal, not before it."""
    node_cls = item_class()
    for round_ in range(10):
        k = f"same-turn-{round_}-{uuid.uuid4().hex[:6]}"
        SOURCE[k] = 1
        SOURCE[f"{k}-other"] = 0
        assert await cacheme.get(node_cls(k)) == 1
        SOURCE[k] = 2
        other = asyncio.ensure_future(cacheme.get(node_cls(f"{k}-other")))
        removal = asyncio.ensure_future(cacheme.invalidate(node_cls(k)))
        racing = asyncio.ensure_future(cacheme.get(node_cls(k)))
        await asyncio.gather(other, removal, racing)
        assert await cacheme.get(node_cls(k)) == 2, f"round {round_}: the old value came back"


async def test_many_rounds_of_invalidate_among_concurrent_readers(
    remote: RemoteStorage[Any],
) -> None:
    """20 readers (get and get_all) on 5 keys; each writer bumps its key's source,
    invalidates, and must then read at least the new value, 100 times per key."""
    node_cls = item_class()
    tag = uuid.uuid4().hex[:6]
    keys = [f"{tag}-{i}" for i in range(5)]
    for k in keys:
        SOURCE[k] = 0
    stop = asyncio.Event()
    stale: list[tuple[str, int, int]] = []

    async def reader(seed: int) -> None:
        i = seed
        while not stop.is_set():
            i += 1
            if i % 2:
                await cacheme.get(node_cls(keys[i % 5]))
            else:
                await cacheme.get_all([node_cls(keys[i % 5]), node_cls(keys[(i * 7) % 5])])
            await asyncio.sleep(0)

    async def writer(k: str) -> None:
        for _ in range(100):
            SOURCE[k] += 1
            wanted = SOURCE[k]
            await cacheme.invalidate(node_cls(k))
            got = await cacheme.get(node_cls(k))
            if got < wanted:
                stale.append((k, got, wanted))

    readers = [asyncio.ensure_future(reader(n)) for n in range(20)]
    try:
        await asyncio.wait_for(asyncio.gather(*(writer(k) for k in keys)), 60)
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert not stale, stale[:5]


class _Writer(Node):
    """A node whose load, as it returns, starts an ``invalidate`` of its own key (the row
    changed right then): the walk decides its write-back before that invalidate runs."""

    _cacheme_abstract = True
    pending: list[asyncio.Task[None]] = []

    def __init__(self, k: str) -> None:
        self.k = k

    def key(self) -> str:
        return f"late:{self.k}"

    async def load(self) -> int:
        value = SOURCE[self.k]
        await asyncio.sleep(0.005)
        if not type(self).pending:

            async def change() -> None:
                SOURCE[self.k] = value + 1
                await cacheme.invalidate(type(self)(self.k))

            type(self).pending.append(asyncio.ensure_future(change()))
        return value


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesce", "no-coalesce"])
@pytest.mark.parametrize("op", ["get", "get_all", "refresh", "get-stamped"])
@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS]
)
async def test_a_write_back_decided_before_an_invalidate_never_lands_after_it(
    tmp_path: Path, backend: str, op: str, coalesce: bool
) -> None:
    """The write-back is registered for ordering when the walk decides it, not when its
    task first runs: with coalescing off too (each write its own round trip), the removal
    of an ``invalidate`` issued in between waits for it, so the old value never outlives
    the invalidate in the shared tier."""
    async with FACTORIES[backend](tmp_path, f"late-{backend}") as raw:
        options = raw.options.model_dump(exclude_defaults=True)
        options["coalesce"] = coalesce
        await cacheme.register_storage("remote", cacheme.Storage(raw.url, **options))
        try:
            meta: dict[str, Any] = {
                "version": "v1",
                "caches": [Cache(storage="remote", ttl=timedelta(seconds=30))],
                "serializer": MsgPackSerializer(),
            }
            if op == "get-stamped":
                meta["negative_ttl"] = timedelta(seconds=30)
            node_cls = type(
                "LateWriter",
                (_Writer,),
                {"Meta": type("Meta", (Node.Meta,), meta), "__module__": __name__, "pending": []},
            )
            for round_ in range(3):
                k = f"{op}-{round_}-{uuid.uuid4().hex[:6]}"
                SOURCE[k] = 1
                node_cls.pending = []
                if op == "get_all":
                    assert await cacheme.get_all([node_cls(k)]) == [1]
                elif op == "refresh":
                    # 2 when the invalidate detached it first: it then reads again.
                    assert await cacheme.refresh(node_cls(k)) in (1, 2)
                else:
                    assert await cacheme.get(node_cls(k)) == 1
                await node_cls.pending[0]  # the invalidate has returned
                assert await cacheme.get(node_cls(k)) == 2, f"round {round_}: old value back"
        finally:
            await cacheme.close_storages()


@pytest.mark.parametrize("chain", ["remote", "local,remote"])
@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS]
)
async def test_an_invalidate_is_never_lost_to_another_threads_write_back(
    tmp_path: Path, backend: str, chain: str
) -> None:
    """Readers in three threads, each with its own loop, keep getting one key while this
    loop bumps the source and invalidates it 300 times. A get begun after an invalidate
    returned never sees a version older than the one bumped before it: a write-back another
    loop decided before the invalidation, sent on that loop's own connection, lands before
    the removal (the invalidate waits for it), never after."""
    async with FACTORIES[backend](tmp_path, f"xthread-{backend}") as raw:
        options = raw.options.model_dump(exclude_defaults=True)
        await cacheme.register_storage("remote", cacheme.Storage(raw.url, **options))
        await cacheme.register_storage("local", cacheme.Storage("local://lru", size=100))
        k = uuid.uuid4().hex[:8]
        pauses = itertools.cycle([0, 0, 0.0005, 0.002])

        class Versioned(Node):
            def key(self) -> str:
                return f"xthread:{k}"

            async def load(self) -> int:
                value = SOURCE[k]
                await asyncio.sleep(next(pauses))
                return value

            class Meta(Node.Meta):
                caches = [Cache(storage=s, ttl=timedelta(seconds=30)) for s in chain.split(",")]
                serializer = MsgPackSerializer()

        SOURCE[k] = 0
        floor = [0]  # the version every get begun from now on must see at least
        stop = threading.Event()
        older: list[tuple[int, int]] = []
        errors: list[BaseException] = []

        def reader() -> None:
            async def run() -> None:
                while not stop.is_set():
                    wanted = floor[0]
                    got = await cacheme.get(Versioned())
                    if got < wanted:
                        older.append((wanted, got))
                    await asyncio.sleep(0)

            try:
                asyncio.run(run())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            for version in range(1, 301):
                SOURCE[k] = version
                await cacheme.invalidate(Versioned())
                floor[0] = version
                await asyncio.sleep(next(pauses))
        finally:
            stop.set()
            for thread in threads:
                await asyncio.to_thread(thread.join, 30)
            await cacheme.close_storages()
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        assert not older, f"{len(older)} gets saw an older version, e.g. {older[:3]}"
