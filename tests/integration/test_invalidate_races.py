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
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio
import redis.exceptions

import cacheme
from cacheme import Cache, Node, runtime
from cacheme.serializer import MsgPackSerializer
from cacheme.storages.base import Entry, RemoteStorage
from cacheme.storages.registry import storages
from tests.services import REDIS_URL, unavailable

from .backends import BACKENDS, FACTORIES

SOURCE: dict[str, int] = {}
SQL_AND_MONGO = ["sqlite", "postgres", "mysql", "mongo"]
every_backend = pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS]
)


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


async def register_remote(raw: RemoteStorage[Any], **overrides: Any) -> None:
    """Register the backend ``raw`` stands for as ``remote``: its options, with ``overrides``."""
    options = raw.options.model_dump(exclude_defaults=True) | overrides
    await cacheme.register_storage("remote", cacheme.Storage(raw.url, **options))


@pytest.fixture(params=[pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS])
async def remote(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[RemoteStorage[Any]]:
    name: str = request.param
    async with FACTORIES[name](tmp_path, f"race-{name}") as raw:
        await register_remote(raw)
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
@every_backend
async def test_a_write_back_decided_before_an_invalidate_never_lands_after_it(
    tmp_path: Path, backend: str, op: str, coalesce: bool
) -> None:
    """The write-back is registered for ordering when the walk decides it, not when its
    task first runs: with coalescing off too (each write its own round trip), the removal
    of an ``invalidate`` issued in between waits for it, so the old value never outlives
    the invalidate in the shared tier."""
    async with FACTORIES[backend](tmp_path, f"late-{backend}") as raw:
        await register_remote(raw, coalesce=coalesce)
        try:
            node_cls = node_on(_Writer, "remote", op == "get-stamped", pending=[])
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
@every_backend
async def test_an_invalidate_is_never_lost_to_another_threads_write_back(
    tmp_path: Path, backend: str, chain: str
) -> None:
    """Readers in three threads, each with its own loop, keep getting one key while this
    loop bumps the source and invalidates it 300 times. A get begun after an invalidate
    returned never sees a version older than the one bumped before it: a write-back another
    loop decided before the invalidation, sent on that loop's own connection, lands before
    the removal (the invalidate waits for it), never after."""
    async with FACTORIES[backend](tmp_path, f"xthread-{backend}") as raw:
        await register_remote(raw)
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


@pytest.mark.parametrize("op", ["invalidate", "refresh"])
@every_backend
async def test_a_write_back_held_up_past_the_wait_is_removed_again_after_it(
    tmp_path: Path, backend: str, op: str
) -> None:
    """Another thread's loop queues a write-back of the old value, then is blocked for longer
    than an ``invalidate`` or ``refresh`` here waits for it (twice the 0.2 s timeout). When
    that write lands at last, its own loop removes the key again: a get afterwards loads
    (or reads) the new value, never the old one."""
    async with FACTORIES[backend](tmp_path, f"held-{backend}") as raw:
        await register_remote(raw, timeout=0.2)
        k = uuid.uuid4().hex[:8]
        SOURCE[k] = 1

        class Held(Node):
            def __init__(self, which: str) -> None:
                self.which = which

            def key(self) -> str:
                return f"held:{k}:{self.which}"

            async def load(self) -> int:
                value = SOURCE[k]
                if self.which == "y" and value == 1:
                    # Blocks this loop in the turn after the write-backs are queued.
                    asyncio.get_running_loop().call_soon(time.sleep, 0.8)
                    stalling.set()
                return value

            class Meta(Node.Meta):
                caches = [Cache(storage="remote", ttl=timedelta(seconds=30))]
                serializer = MsgPackSerializer()

        got: list[Any] = []
        stalling = threading.Event()

        def other() -> None:
            async def run() -> None:
                # x's write goes at once, y's is queued for the next turn (then blocked)
                got.extend(await asyncio.gather(cacheme.get(Held("x")), cacheme.get(Held("y"))))
                await asyncio.sleep(0.3)  # the removal after the late write lands

            asyncio.run(run())

        thread = threading.Thread(target=other)
        thread.start()
        try:
            assert await asyncio.to_thread(stalling.wait, 10)
            await asyncio.sleep(0.1)  # the other loop is blocked now, y's write queued
            SOURCE[k] = 2
            if op == "invalidate":
                await cacheme.invalidate(Held("y"))
            else:
                assert await cacheme.refresh(Held("y")) == 2
        finally:
            await asyncio.to_thread(thread.join, 10)
        assert got[1] == 1  # y loaded the old value, and its write-back was held up
        assert await cacheme.get(Held("y")) == 2
        await cacheme.close_storages()


async def _run_on_redis(script: str) -> str:
    """Run ``script`` in a fresh interpreter with a Redis URL (database 13) as its argument;
    its standard output. Skips (or fails, under CACHEME_REQUIRE_SERVICES=1) when Redis is
    not reachable."""
    url = REDIS_URL.rsplit("/", 1)[0] + "/13"
    client = redis.asyncio.Redis.from_url(url)
    try:
        await client.ping()
    except (OSError, redis.exceptions.RedisError) as exc:
        unavailable("Redis", url, exc)
    finally:
        await client.aclose()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


_CLOSED_LOOP = """
import asyncio, sys, time
import cacheme
import cacheme.serializer
from cacheme import landing

class N(cacheme.Node):
    def __init__(self, k): self.k = k
    def key(self): return f"closed-loop:{self.k}"
    async def load(self) -> int: return 1
    class Meta(cacheme.Node.Meta):
        caches = [cacheme.Cache(storage="r", ttl=None)]
        serializer = cacheme.serializer.JSONSerializer()

async def setup():
    await cacheme.register_storage("r", cacheme.Storage(sys.argv[1], timeout=1.0))
asyncio.run(setup())
other = asyncio.new_event_loop()  # a second live loop: writes are noted
loop = asyncio.new_event_loop()

async def queue_writes():
    tasks = [asyncio.ensure_future(cacheme.get(N(k))) for k in ("x", "y")]
    # Until a write is noted, before it is flushed: turn by turn, for up to 5 s (this new
    # loop connects first, which a busy machine can make outlast a fixed number of turns).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if landing._pending:
            return sorted(landing._pending)
        await asyncio.sleep(0)
    raise SystemExit("no write was ever noted")

stuck = loop.run_until_complete(queue_writes())
loop.close()  # no shutdown_asyncgens: the queued write is never sent
took = []
for key in stuck:
    async def invalidate():
        started = time.monotonic()
        await cacheme.invalidate(N(key.split(":")[2]))
        return time.monotonic() - started
    took.append(asyncio.run(invalidate()))
print("stuck", len(stuck), "slowest", round(max(took), 3), "left", len(landing._pending))
"""


@pytest.mark.parametrize("op", ["invalidate", "refresh"])
@every_backend
async def test_a_caller_cancelled_while_waiting_for_another_loops_write_calls_nothing_off(
    tmp_path: Path, backend: str, op: str
) -> None:
    """An ``invalidate`` or ``refresh`` waiting for another thread's held-up write-back is
    cancelled (a request's timeout): the invalidation still happens, and a get that joined
    the refresh gets its value, not the caller's ``CancelledError``."""
    async with FACTORIES[backend](tmp_path, f"cancelled-{backend}") as raw:
        await register_remote(raw, timeout=0.2)
        k = uuid.uuid4().hex[:8]
        SOURCE[k] = 1
        stalling = threading.Event()

        class Held(Node):
            def key(self) -> str:
                return f"cancelled:{k}"

            async def load(self) -> int:
                value = SOURCE[k]
                if value == 1:
                    asyncio.get_running_loop().call_soon(time.sleep, 0.8)  # blocks the loop
                    stalling.set()
                return value

            class Meta(Node.Meta):
                caches = [Cache(storage="remote", ttl=timedelta(seconds=30))]
                serializer = MsgPackSerializer()

        thread = threading.Thread(target=lambda: asyncio.run(_get_then_linger(Held())))
        thread.start()
        try:
            assert await asyncio.to_thread(stalling.wait, 10)
            await asyncio.sleep(0.1)  # the other loop is blocked, its write-back queued
            SOURCE[k] = 2
            call = cacheme.invalidate(Held()) if op == "invalidate" else cacheme.refresh(Held())
            caller = asyncio.ensure_future(call)
            await asyncio.sleep(0.05)  # it waits for the other loop's write
            if op == "refresh":
                joined = asyncio.ensure_future(cacheme.get(Held()))
                await asyncio.sleep(0)
            caller.cancel()
            if op == "refresh":
                assert await asyncio.wait_for(joined, 5) == 2
            await runtime.current().quiesce(5)  # the invalidation goes on by itself
        finally:
            await asyncio.to_thread(thread.join, 10)
        assert await cacheme.get(Held()) == 2
        await cacheme.close_storages()


async def _get_then_linger(node: Node) -> None:
    await cacheme.get(node)
    await asyncio.sleep(0.3)  # the removal after its late write lands


@pytest.mark.redis
async def test_a_write_of_a_loop_closed_without_shutdown_is_not_waited_for() -> None:
    """A loop closed with a write still queued (no ``shutdown_asyncgens``) never sends it: an
    ``invalidate`` elsewhere does not wait for it, and nothing is left behind. In a fresh
    interpreter: the closed loop's leftovers are not this test process's business."""
    out = await _run_on_redis(_CLOSED_LOOP)
    words = out.split()
    assert words[0] == "stuck" and int(words[1]) >= 1, out
    assert float(words[3]) < 0.5, out  # not the 2 s the write could take
    assert words[5] == "0", out


_FIRST_LOOP = """
import asyncio, gc, sys, threading, time, uuid
import cacheme
from cacheme.serializer import MsgPackSerializer

k = uuid.uuid4().hex[:8]
SOURCE = {k: 1}
stalling = threading.Event()

class Held(cacheme.Node):
    def __init__(self, which): self.which = which
    def key(self): return f"first-loop:{k}:{self.which}"
    async def load(self) -> int:
        value = SOURCE[k]
        if self.which == "y" and value == 1:
            asyncio.get_running_loop().call_soon(time.sleep, 0.8)  # blocks the loop
            stalling.set()
        return value
    class Meta(cacheme.Node.Meta):
        caches = [cacheme.Cache(storage="remote", ttl=None)]
        serializer = MsgPackSerializer()

asyncio.run(cacheme.register_storage("remote", cacheme.Storage(sys.argv[1], timeout=0.2)))
gc.collect()  # the registering loop is gone: the writer's loop is the only one live

def writer():
    async def run():
        await asyncio.gather(cacheme.get(Held("x")), cacheme.get(Held("y")))
        await asyncio.sleep(0.3)  # the removal after the late write
    asyncio.run(run())

thread = threading.Thread(target=writer)
thread.start()
assert stalling.wait(10)
time.sleep(0.1)
SOURCE[k] = 2
asyncio.run(cacheme.invalidate(Held("y")))  # a loop started after the write was queued
thread.join(10)

async def final():
    value = await cacheme.get(Held("y"))
    await cacheme.close_storages()
    return value
print(asyncio.run(final()))
"""


@pytest.mark.redis
async def test_an_invalidate_from_a_loop_started_later_is_not_lost() -> None:
    """The writer's loop was the only one live when it queued its write-back; a thread then
    runs ``asyncio.run(invalidate(...))`` while that loop is blocked. The write was noted
    anyway, so the invalidation holds. In a fresh interpreter: no other loop is live."""
    assert (await _run_on_redis(_FIRST_LOOP)).split() == ["2"]


class _Gated(Node):
    """A node whose load reads the source only once its gate (if any) opens, and, when told
    to, calls ``then`` once its write-back is decided (the turn after its load returned)."""

    _cacheme_abstract = True

    def __init__(
        self,
        k: str,
        gate: Callable[[], Awaitable[Any]] | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        self.k = k
        self.gate = gate
        self.then = then

    def key(self) -> str:
        return f"gated:{self.k}"

    async def load(self) -> int:
        if self.gate is not None:
            await self.gate()
        if self.then is not None:
            asyncio.get_running_loop().call_soon(self.then)
        return SOURCE[self.k]


N = TypeVar("N", bound=Node)


def node_on(base: type[N], chain: str, stamped: bool, version: str = "v1", **attrs: Any) -> type[N]:
    """A concrete subclass of ``base`` cached on ``chain`` (tier names, comma-separated,
    30 s TTLs, MessagePack); ``stamped``: with negative caching, so the freshness path
    runs. ``attrs``: class attributes of its own (a fresh list, say)."""
    meta: dict[str, Any] = {
        "version": version,
        "caches": [Cache(storage=s, ttl=timedelta(seconds=30)) for s in chain.split(",")],
        "serializer": MsgPackSerializer(),
    }
    if stamped:
        meta["negative_ttl"] = timedelta(seconds=30)
    body = {"Meta": type("Meta", (Node.Meta,), meta), "__module__": __name__, **attrs}
    return type(base.__name__.lstrip("_"), (base,), body)


async def _refresh_during_invalidate(node_cls: type[_Gated], k: str) -> bool:
    """One round of the race below, on a fresh key ``k``; whether the second refresh began
    while the removal was still out (else the round proves nothing)."""
    SOURCE[k] = 0
    assert await cacheme.get(node_cls(k)) == 0
    gate = asyncio.Event()
    second: list[asyncio.Future[Any]] = []
    raced: list[bool] = []
    removal = asyncio.ensure_future(cacheme.invalidate(node_cls(k)))

    def begin_second() -> None:
        if raced:  # the first refresh, detached, may load again: once is enough
            return
        raced.append(not removal.done())
        SOURCE[k] = 1
        second.append(asyncio.ensure_future(cacheme.refresh(node_cls(k, gate.wait))))

    first = asyncio.ensure_future(cacheme.refresh(node_cls(k, then=begin_second)))
    await removal
    assert second, "the first refresh never loaded"
    gate.set()
    assert await second[0] == 1, f"key {k}: the second refresh returned 0"
    assert await first in (0, 1)
    assert await cacheme.get(node_cls(k)) == 1, f"key {k}: 0 came back"
    return raced[0]


async def _rounds(
    tmp_path: Path,
    backend: str,
    name: str,
    one_round: Callable[[type[_Gated], str], Awaitable[bool]],
    node_cls: type[_Gated],
    count: int = 5,
) -> list[bool]:
    """``count`` rounds of ``one_round`` on fresh keys, with ``backend`` as the remote tier
    and a local LRU tier; what each round returned."""
    async with FACTORIES[backend](tmp_path, f"{name}-{backend}") as raw:
        await register_remote(raw)
        await cacheme.register_storage("local", cacheme.Storage("local://lru", size=100))
        try:
            return [await one_round(node_cls, f"{n}-{uuid.uuid4().hex[:6]}") for n in range(count)]
        finally:
            await cacheme.close_storages()


@pytest.mark.parametrize("stamped", [False, True], ids=["plain", "stamped"])
@pytest.mark.parametrize("chain", ["remote", "local,remote"])
@every_backend
async def test_a_refresh_begun_during_an_invalidate_returns_what_it_loaded(
    tmp_path: Path, backend: str, chain: str, stamped: bool
) -> None:
    """An ``invalidate`` whose removal is on the wire; a first refresh, called then, loads 0
    and queues its write of 0; the source becomes 1 and a second refresh begins while the
    removal is still out. The invalidate, once its removal lands, must not detach the second
    refresh (which read no tier): it returns the 1 it loaded, not the 0 the first one left
    in the tier, and 1 is what a get reads afterwards."""
    node_cls = node_on(_Gated, chain, stamped)
    raced = await _rounds(tmp_path, backend, "refresh-inv", _refresh_during_invalidate, node_cls)
    assert any(raced), "in no round did the second refresh begin while the removal was out"


def _run_refresh(node: Node, result: list[Any]) -> None:
    """A thread's body: ``refresh(node)`` in a loop of its own; its value or error."""
    try:
        result.append(asyncio.run(cacheme.refresh(node)))
    except BaseException as exc:
        result.append(exc)


def _refresh_registered_elsewhere(key: str) -> bool:
    """Whether another thread's loop has a refresh of the full key ``key`` under way."""
    here = runtime.current()
    return any(
        type(rt.flights.get(key)).__name__ == "Reload" for rt in runtime.live() if rt is not here
    )


async def _refresh_in_a_thread_during_invalidate(node_cls: type[_Gated], k: str) -> bool:
    """``_refresh_during_invalidate`` with the second refresh in another thread's loop."""
    SOURCE[k] = 0
    assert await cacheme.get(node_cls(k)) == 0
    release = threading.Event()
    result: list[Any] = []
    held = node_cls(k, lambda: asyncio.to_thread(release.wait, 10))
    thread = threading.Thread(target=_run_refresh, args=(held, result))
    removal = asyncio.ensure_future(cacheme.invalidate(node_cls(k)))
    raced: list[bool] = []

    def begin_second() -> None:
        if raced:  # the first refresh, detached, may load again: once is enough
            return
        raced.append(not removal.done())
        SOURCE[k] = 1
        thread.start()
        # Block this loop (on purpose) until that refresh has registered its flight.
        deadline = time.monotonic() + 10
        while not _refresh_registered_elsewhere(f"cacheme:gated:{k}:v1"):
            assert time.monotonic() < deadline, "the other thread's refresh never began"
            time.sleep(0.001)

    first = asyncio.ensure_future(cacheme.refresh(node_cls(k, then=begin_second)))
    await removal
    assert raced, "the first refresh never loaded"
    release.set()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    assert result == [1], f"key {k}: the other thread's refresh gave {result}"
    assert await first in (0, 1)
    assert await cacheme.get(node_cls(k)) == 1, f"key {k}: 0 came back"
    return raced[0]


@pytest.mark.parametrize("chain", ["remote", "local,remote"])
@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in ("redis", "sqlite")]
)
async def test_a_refresh_another_thread_begins_during_an_invalidate_returns_what_it_loaded(
    tmp_path: Path, backend: str, chain: str
) -> None:
    """The same race, with the second refresh in another thread's loop: the invalidate's
    second pass, reaching that loop's flights, leaves the refresh alone; the first refresh,
    overtaken by it, reads again only once its remote write landed, and that write is
    written to the shared local tier again once landed (a read of this loop that overtook
    it may have copied 0 there meanwhile)."""
    node_cls = node_on(_Gated, chain, False)
    raced = await _rounds(
        tmp_path, backend, "refresh-inv-x", _refresh_in_a_thread_during_invalidate, node_cls
    )
    assert any(raced), "in no round did the other refresh begin while the removal was out"


class _Planned(Node):
    """A node whose loads follow ``plan``: per load, (seconds to take, whether to fail)."""

    _cacheme_abstract = True
    plan: list[tuple[float, bool]] = []

    def key(self) -> str:
        return "planned"

    async def load(self) -> int:
        delay, fail = type(self).plan.pop(0) if type(self).plan else (0.0, False)
        await asyncio.sleep(delay)
        if fail:
            raise RuntimeError("the source is down")
        return SOURCE["planned"]


@pytest.mark.parametrize("stamped", [False, True], ids=["plain", "stamped"])
@pytest.mark.parametrize("chain", ["local", "remote", "local,remote"])
@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in ("redis", "postgres")]
)
async def test_a_refresh_overtaken_by_one_that_fails_raises_its_error(
    tmp_path: Path, backend: str, chain: str, stamped: bool
) -> None:
    """Refresh A (10 ms load) is overtaken by refresh B (30 ms load, which fails): A wrote
    nothing (B detached it) and B writes nothing, so A raises B's error rather than
    returning a value no tier holds; a get then serves the value the tiers still hold."""
    async with FACTORIES[backend](tmp_path, f"overtaken-{backend}") as raw:
        await register_remote(raw)
        await cacheme.register_storage("local", cacheme.Storage("local://lru", size=100))
        node_cls = node_on(_Planned, chain, stamped, uuid.uuid4().hex[:8], plan=[])
        try:
            SOURCE["planned"] = 1
            assert await cacheme.get(node_cls()) == 1
            SOURCE["planned"] = 2
            node_cls.plan = [(0.010, False), (0.030, True)]
            first = asyncio.ensure_future(cacheme.refresh(node_cls()))
            await asyncio.sleep(0.003)
            second = asyncio.ensure_future(cacheme.refresh(node_cls()))
            outcomes = await asyncio.gather(first, second, return_exceptions=True)
            assert [str(o) for o in outcomes] == ["the source is down"] * 2, outcomes
            assert await cacheme.get(node_cls()) == 1  # what every tier still holds
            assert await cacheme.refresh(node_cls()) == 2
            assert await cacheme.get(node_cls()) == 2
        finally:
            await cacheme.close_storages()


@pytest.mark.parametrize(
    "backend",
    [pytest.param(b, marks=[pytest.mark.redis, getattr(pytest.mark, b)]) for b in SQL_AND_MONGO],
)
async def test_an_invalidate_of_two_remote_tiers_survives_another_threads_get(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chain [redis, backend]: the key is in the backend, no longer in Redis (its shorter TTL
    ran out). Thread B's get, begun while thread A's invalidate is under way, reads the old
    value from the backend before A's removal there lands (B's loop has connections of its
    own, which A's do not order) and wrote it back into Redis after A's removal there: the
    old value was served for Redis's whole TTL after invalidate returned (review 47). No
    walk now writes a key back while an invalidate of it is under way in the process.

    The interleaving is fixed: A's backend removal is held 0.3 s, and B's backend read is
    answered once A's Redis removal landed."""
    async with (
        FACTORIES["redis"](tmp_path, "two-remote-front") as front_raw,
        FACTORIES[backend](tmp_path, f"two-remote-{backend}") as back_raw,
    ):
        for name, raw in (("front", front_raw), ("back", back_raw)):
            options = raw.options.model_dump(exclude_defaults=True)
            await cacheme.register_storage(name, cacheme.Storage(raw.url, **options))
        meta = type(
            "Meta",
            (Node.Meta,),
            {
                "caches": [
                    Cache(storage="front", ttl=timedelta(minutes=10)),
                    Cache(storage="back", ttl=timedelta(days=1)),
                ],
                "serializer": MsgPackSerializer(),
            },
        )
        node_cls = type("TwoRemote", (Item,), {"Meta": meta, "__module__": __name__})
        k = f"two-remote-{uuid.uuid4().hex[:8]}"
        full = f"cacheme:race:{k}:"
        try:
            SOURCE[k] = 0
            assert await cacheme.get(node_cls(k)) == 0
            await front_raw.remove_many([full])  # Redis's copy expired; the backend has it
            front_removed = threading.Event()
            back_cls, front_cls = type(storages()["back"]), type(storages()["front"])
            real_get, real_remove = back_cls._get_many, back_cls._remove_many
            real_front_remove = front_cls._remove_many

            async def get_many(self: Any, keys: Any) -> Any:
                found = await real_get(self, keys)
                if threading.current_thread().name == "B":
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(None, front_removed.wait, 3)
                return found

            async def remove_many(self: Any, keys: Any) -> None:
                if threading.current_thread().name == "A":
                    await asyncio.sleep(0.3)
                await real_remove(self, keys)

            async def front_remove_many(self: Any, keys: Any) -> None:
                await real_front_remove(self, keys)
                if threading.current_thread().name == "A":
                    front_removed.set()

            monkeypatch.setattr(back_cls, "_get_many", get_many)
            monkeypatch.setattr(back_cls, "_remove_many", remove_many)
            monkeypatch.setattr(front_cls, "_remove_many", front_remove_many)

            def thread_a() -> None:
                SOURCE[k] = 1
                asyncio.run(cacheme.invalidate(node_cls(k)))

            def thread_b() -> None:
                time.sleep(0.05)  # begins while A's invalidate is under way
                asyncio.run(cacheme.get(node_cls(k)))

            threads = [
                threading.Thread(target=thread_a, name="A", daemon=True),
                threading.Thread(target=thread_b, name="B", daemon=True),
            ]
            for t in threads:
                t.start()
            loop = asyncio.get_running_loop()
            for t in threads:
                await loop.run_in_executor(None, t.join, 10)
            front_removed.set()
            assert not any(t.is_alive() for t in threads)
            monkeypatch.undo()
            assert await cacheme.get(node_cls(k)) == 1
        finally:
            await cacheme.close_storages()


@pytest.mark.parametrize("stamped", [False, True], ids=["plain", "stamped"])
@pytest.mark.parametrize("chain", ["remote", "local,remote"])
async def test_a_refresh_begun_during_an_invalidate_writes_its_value(
    remote: RemoteStorage[Any], chain: str, stamped: bool
) -> None:
    """The invalidate's closing note came after the refresh's mark: the refresh wrote
    nothing, returned its value, and the next get loaded again (review 52)."""
    loads: list[int] = []

    class Counted(Item):
        _cacheme_abstract = True

        async def load(self) -> int:
            loads.append(1)
            await asyncio.sleep(0.02)
            return len(loads)  # each load a new value (a version, a timestamp)

    extra: dict[str, Any] = {"negative_ttl": timedelta(seconds=5)} if stamped else {}
    meta = type(
        "Meta",
        (Node.Meta,),
        {
            "caches": [Cache(storage=s, ttl=timedelta(seconds=30)) for s in chain.split(",")],
            "serializer": MsgPackSerializer(),
            **extra,
        },
    )
    node_cls = type("DuringInvalidate", (Counted,), {"Meta": meta, "__module__": __name__})
    k = f"during-{uuid.uuid4().hex[:8]}"
    assert await cacheme.get(node_cls(k)) == 1
    invalidating = asyncio.ensure_future(cacheme.invalidate(node_cls(k)))
    await asyncio.sleep(0)  # its remote removal is under way
    refreshing = asyncio.ensure_future(cacheme.refresh(node_cls(k)))
    await invalidating
    value = await refreshing
    assert await cacheme.get(node_cls(k)) == value
    assert len(loads) == 2
