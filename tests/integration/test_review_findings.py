"""Faults a fresh reviewer found by trying the docs, on every remote backend.

- A value the node's serializer refuses raises ``EncodeError`` on every ``get``: it is not
  kept in the local tier in front either (it used to be served from there the second time).
- ``invalidate`` of a key no tier can store (a lone surrogate) has nothing to remove: it
  succeeds, as ``get`` of that key loads without caching.
- ``close_storages()`` while a loop of another thread that used the storage shuts down
  finishes without ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import cacheme
from cacheme import Cache, Node, schemas
from cacheme.serializer import JSONSerializer
from cacheme.storages.base import RemoteStorage
from cacheme.storages.registry import storages

from .backends import BACKENDS, FACTORIES

VALUES: dict[str, Any] = {}


@pytest.fixture(params=[pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS])
async def remote(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    name: str = request.param
    async with FACTORIES[name](tmp_path, f"review-{name}") as raw:
        options = raw.options.model_dump(exclude_defaults=True)
        await cacheme.register_storage("remote", cacheme.Storage(raw.url, **options))
        await cacheme.register_storage("local", cacheme.Storage("local://tlfu", size=100))
        try:
            yield raw.url
        finally:
            await cacheme.close_storages()


def node_class() -> type[Node]:
    class Thing(Node):
        def __init__(self, k: str) -> None:
            self.k = k

        def key(self) -> str:
            return f"review:{self.k}"

        async def load(self) -> Any:
            return VALUES[self.k]

        class Meta(Node.Meta):
            version = "v1"
            caches = [
                Cache(storage="local", ttl=timedelta(seconds=30)),
                Cache(storage="remote", ttl=timedelta(seconds=30)),
            ]
            serializer = JSONSerializer()

    return Thing


async def test_a_value_the_serializer_refuses_is_never_served_from_memory(remote: str) -> None:
    thing = node_class()
    VALUES["lock"] = {"lock": threading.Lock()}
    for _ in range(3):
        with pytest.raises(cacheme.EncodeError):
            await cacheme.get(thing("lock"))
    assert cacheme.stats(thing).load_count() == 3


async def test_invalidate_of_a_key_no_tier_can_store_succeeds(remote: str) -> None:
    thing = node_class()
    VALUES["a\ud800b"] = 1
    assert await cacheme.get(thing("a\ud800b")) == 1
    await cacheme.invalidate(thing("a\ud800b"))
    storage = storages()["remote"]
    assert isinstance(storage, RemoteStorage) and not storage.breaker_open


async def test_close_while_another_threads_loop_shuts_down(remote: str) -> None:
    thing = node_class()
    VALUES["t"] = 1
    used = threading.Event()
    done = threading.Event()

    def worker() -> None:
        async def work() -> None:
            await cacheme.get(thing("t"))
            used.set()
            await asyncio.to_thread(done.wait)

        asyncio.run(work())

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert await asyncio.to_thread(used.wait, 10)
        closing = asyncio.ensure_future(cacheme.close_storages())
        await asyncio.sleep(0)
        done.set()  # the worker's loop shuts down while the close runs
        await asyncio.wait_for(closing, 10)  # no CancelledError, no hang
    finally:
        done.set()
        await asyncio.to_thread(thread.join, 10)


async def test_a_serializer_raising_outside_its_contract_never_hangs_a_key(remote: str) -> None:
    """``loads`` must raise only DecodeError; one that raises something else is treated as
    undecodable (reloaded), never left with its flight unsettled."""

    class Broken(JSONSerializer):
        def loads(self, data: bytes, value_type: Any = Any) -> Any:
            raise ValueError("corrupt")

    class Odd(Node):
        def key(self) -> str:
            return "review:odd"

        async def load(self) -> int:
            return 1

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="remote", ttl=timedelta(seconds=30))]
            serializer = Broken()

    assert await cacheme.get(Odd()) == 1
    for _ in range(3):
        assert await asyncio.wait_for(cacheme.get(Odd()), 5) == 1
        assert await asyncio.wait_for(cacheme.get_all([Odd()]), 5) == [1]
    assert cacheme.stats(Odd).decode_error_count() >= 6


async def test_close_names_the_loop_that_did_not_run_it(tmp_path: Path) -> None:
    """``close_storages()`` while another thread's loop that used the storage is blocked: it
    gives up after the storage's ``timeout`` and says which loop and which bound (the
    message used to end in an empty ``TimeoutError:``)."""
    url = f"sqlite:///{tmp_path / 'blocked.db'}"
    await schemas.create(url)
    await cacheme.register_storage("remote", cacheme.Storage(url, timeout=0.2))
    await cacheme.register_storage("local", cacheme.Storage("local://tlfu", size=100))
    thing = node_class()
    VALUES["b"] = 2
    used = threading.Event()
    release = threading.Event()
    idents: list[int] = []

    def worker() -> None:
        async def work() -> None:
            idents.append(threading.get_ident())
            await cacheme.get(thing("b"))
            used.set()
            release.wait(10)  # blocks this loop: it cannot run the close

        asyncio.run(work())

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert await asyncio.to_thread(used.wait, 10)
        with pytest.raises(cacheme.StorageError) as raised:
            await asyncio.wait_for(cacheme.close_storages(), 5)
        message = str(raised.value)
        assert "'remote'" in message
        assert f"thread {idents[0]}" in message
        assert "timeout = 0.2 s" in message
    finally:
        release.set()
        await asyncio.to_thread(thread.join, 10)
        await cacheme.close_storages()


async def test_close_waits_for_blocked_loops_at_once(tmp_path: Path) -> None:
    """Four threads' loops, each blocked after using two storages: ``close_storages()`` gives
    up on them all within about one ``timeout`` (the documented bound for each), not one
    after the other (4 loops x 2 storages x 0.3 s = 2.4 s before), and names both storages."""
    urls = [f"sqlite:///{tmp_path / f'blocked{i}.db'}" for i in range(2)]
    for i, url in enumerate(urls):
        await schemas.create(url)
        await cacheme.register_storage(f"remote{i}", cacheme.Storage(url, timeout=0.3))
    await cacheme.register_storage("local", cacheme.Storage("local://tlfu", size=100))

    class Two(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"review:two:{self.n}"

        async def load(self) -> int:
            return self.n

        class Meta(Node.Meta):
            caches = [Cache(storage=f"remote{i}", ttl=timedelta(seconds=30)) for i in range(2)]
            serializer = JSONSerializer()

    used = threading.Semaphore(0)
    release = threading.Event()

    def worker(n: int) -> None:
        async def work() -> None:
            assert await cacheme.get(Two(n)) == n
            used.release()
            release.wait(20)  # blocks this loop: it cannot run the close

        asyncio.run(work())

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in threads:
            assert await asyncio.to_thread(used.acquire, True, 10)
        started = time.monotonic()
        with pytest.raises(cacheme.StorageError) as raised:
            await asyncio.wait_for(cacheme.close_storages(), 10)
        took = time.monotonic() - started
        assert "'remote0'" in str(raised.value) and "'remote1'" in str(raised.value)
        assert took < 1.5, f"close_storages took {took:.2f} s for 8 closes of 0.3 s at most each"
    finally:
        release.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 10)
        await cacheme.close_storages()
