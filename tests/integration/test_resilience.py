"""Real faults against real servers: what a caller of ``cacheme.get`` sees.

Each test breaks a tier for real (a private ``redis-server`` or SecantusDB killed by its pid
and started again on the same port, PostgreSQL backends terminated, a TCP proxy that
black-holes traffic, a server that accepts and never answers, garbage written into the
stored entries) and checks what the caller gets: the right value, in bounded time, with the
failure counted and logged, and the tier used again once it is back.

Every wait is bounded (``asyncio.wait_for`` and the module's pytest timeout). Keys use a
prefix of their own per test, so tests running at the same time against the shared servers
(which empty ``cacheme:*``) cannot disturb them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import sqlite3
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgpack
import pytest
import redis.asyncio
from pydantic import BaseModel

import cacheme
from cacheme import runtime
from cacheme.node import get_prefix
from cacheme.serializer import JSONSerializer, MsgPackSerializer, PickleSerializer, Serializer
from cacheme.storages.base import RemoteStorage
from tests.services import (
    MONGO_URL,
    MYSQL_URL,
    POSTGRES_URL,
    REDIS_CLUSTER_URL,
    REDIS_URL,
    unavailable,
)

from .backend_redis import redis_url
from .backend_sql import sql_table
from .faults import (
    HangingServer,
    Proxy,
    RedisServer,
    SecantusServer,
    free_port,
    port_of,
    wait_until,
    with_port,
    with_query,
)

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

MSGPACK = MsgPackSerializer()
MARGIN = 0.35  # seconds of slack on top of a timeout, for a loaded 2-core CI machine


# The servers every fault test runs against, each under its own marker.
SERVER_BACKENDS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
    pytest.param("mongo", marks=pytest.mark.mongo),
]


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def _isolated() -> AsyncIterator[str]:
    """A key prefix of this test's own; afterwards: no flight left, storages closed."""
    prefix = f"cacheme-res-{uuid.uuid4().hex[:12]}"
    cacheme.set_prefix(prefix)
    try:
        yield prefix
        await runtime.current().quiesce(10)
        assert len(runtime.current().flights) == 0, (
            f"{len(runtime.current().flights)} in-flight entries outlived the test"
        )
    finally:
        cacheme.set_prefix("cacheme")
        await asyncio.wait_for(cacheme.close_storages(), 10)


async def bounded(aw: Awaitable[T], seconds: float = 5.0) -> T:
    """``aw``'s result; a hang fails the test after ``seconds`` instead of blocking it."""
    return await asyncio.wait_for(aw, seconds)


def value_of(i: int) -> str:
    return f"value-{i}"


class Item(cacheme.Node):
    """``Item(i)`` loads ``value_of(i)``; counts its loads; can be made slow or failing."""

    _cacheme_abstract = True
    loads = 0
    delay = 0.0
    error: BaseException | None = None
    suffix = ""  # appended to the value: "the source changed"

    def __init__(self, i: int) -> None:
        self.i = i

    def key(self) -> str:
        return f"item:{self.i}"

    async def load(self) -> str:
        cls = type(self)
        cls.loads += 1
        if cls.delay:
            await asyncio.sleep(cls.delay)
        if cls.error is not None:
            raise cls.error
        return value_of(self.i) + cls.suffix


def item_class(
    *caches: cacheme.Cache,
    name: str = "Item",
    serializer: Serializer = MSGPACK,
    base: type[Item] = Item,
    **meta: Any,
) -> type[Item]:
    """A fresh ``Item`` node class (own stats) cached in ``caches``; ``base``: an abstract
    subclass of ``Item`` with a load of its own."""
    options = {"version": "v1", "caches": list(caches), "serializer": serializer, **meta}
    meta_cls = type("Meta", (cacheme.Node.Meta,), options)
    return type(name, (base,), {"Meta": meta_cls, "__module__": __name__})


def full_key(i: int, version: str = "v1") -> str:
    return f"{get_prefix()}:item:{i}:{version}"


def remote(name: str) -> RemoteStorage[Any]:
    storage = cacheme.storages()[name]
    assert isinstance(storage, RemoteStorage)
    return storage


@asynccontextmanager
async def raw_redis(url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A private redis-server this test may kill and restart."""
    if RedisServer.available() is None:
        unavailable("redis-server", "redis-server", FileNotFoundError("redis-server not on PATH"))
    async with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def shared_redis() -> AsyncIterator[str]:
    """The shared Redis server's URL; this test's keys are removed afterwards."""
    url = redis_url()
    try:
        async with raw_redis(url) as client:
            await client.ping()
    except Exception as exc:
        unavailable("Redis", url, exc)
    yield url
    async with raw_redis(url) as client:
        keys = [k async for k in client.scan_iter(match=f"{get_prefix()}:*", count=1000)]
        if keys:
            await client.unlink(*keys)


async def probe_until_written(
    node: type[Item], start: int, stored: Any, seconds: float, what: str
) -> int:
    """Get new keys until one of them lands in the tier (``stored(i)``); that key."""
    counter = itertools.count(start)
    last: list[int] = []

    async def written() -> bool:
        i = next(counter)
        last.append(i)
        assert await bounded(cacheme.get(node(i))) == value_of(i)
        return bool(await stored(i))

    await wait_until(written, seconds, what, every=0.1)
    return last[-1]


async def assert_hit_without_load(node: type[Item], i: int) -> None:
    """``get(node(i))`` is answered by a cache tier: hits grow by one, loads do not."""
    before = cacheme.stats(node)
    assert await bounded(cacheme.get(node(i))) == value_of(i)
    after = cacheme.stats(node)
    assert after.hit_count() == before.hit_count() + 1
    assert after.load_count() == before.load_count()


# -- 1. Redis stopped mid-run (SIGKILL), then started again on the same port -----------------


@pytest.mark.redis
@pytest.mark.parametrize("chain", ["redis", "local+redis"])
async def test_redis_killed_then_restarted(chain: str, redis_server: RedisServer) -> None:
    timeout = 0.2
    await cacheme.register_storage(
        "dying-redis",
        cacheme.Storage(
            redis_server.url(),
            timeout=timeout,
            breaker_threshold=3,
            breaker_cooldown=0.3,
        ),
    )
    caches = [cacheme.Cache(storage="dying-redis", ttl=timedelta(minutes=5))]
    if chain == "local+redis":
        await cacheme.register_storage("local", cacheme.Storage("local://tlfu", size=1000))
        caches.insert(0, cacheme.Cache(storage="local", ttl=timedelta(minutes=5)))
    node = item_class(*caches)
    storage = remote("dying-redis")

    assert await bounded(cacheme.get(node(0))) == value_of(0)
    async with raw_redis(redis_server.url()) as raw:
        assert MSGPACK.loads(await raw.get(full_key(0))) == value_of(0)

    redis_server.kill()
    slowest = 0.0
    breaker_seen_open = False
    for i in range(1, 21):
        started = time.monotonic()
        assert await bounded(cacheme.get(node(i))) == value_of(i)
        slowest = max(slowest, time.monotonic() - started)
        breaker_seen_open |= storage.breaker_open
    started = time.monotonic()
    burst = await bounded(asyncio.gather(*(cacheme.get(node(i)) for i in range(100, 150))))
    assert burst == [value_of(i) for i in range(100, 150)]
    slowest = max(slowest, time.monotonic() - started)
    assert slowest < timeout + MARGIN, f"a get took {slowest:.3f}s while Redis was down"

    stats = cacheme.stats(node)
    assert stats.storage_error_count() + stats.storage_timeout_count() >= 3
    assert stats.load_count() == 1 + 20 + 50  # each key loaded once, from the source
    assert storage.stats.errors + storage.stats.timeouts >= 3
    assert storage.stats.breaker_opens >= 1
    assert storage.stats.rejected >= 1
    assert breaker_seen_open

    await redis_server.start()  # same port, empty (no persistence)
    async with raw_redis(redis_server.url()) as raw:

        async def in_redis(i: int) -> bool:
            data = await raw.get(full_key(i))
            return data is not None and MSGPACK.loads(data) == value_of(i)

        key = await probe_until_written(node, 1000, in_redis, 10, "Redis used again")
    if chain == "local+redis":
        cacheme.storages()["local"].remove(full_key(key))  # type: ignore[attr-defined]
    await assert_hit_without_load(node, key)  # served by Redis itself
    assert not storage.breaker_open


# -- 2. PostgreSQL: the storage's backends are terminated ------------------------------------


@pytest.mark.postgres
async def test_postgres_backends_terminated(tmp_path: Path) -> None:
    async with sql_table("postgres", tmp_path) as table:
        app = f"cacheme-res-{uuid.uuid4().hex[:8]}"
        await cacheme.register_storage(
            "pg",
            cacheme.Storage(
                with_query(table.url, application_name=app),
                table=table.table,
                timeout=1.0,
                breaker_threshold=3,
                breaker_cooldown=0.3,
                purge_interval=0,
            ),
        )
        node = item_class(cacheme.Cache(storage="pg", ttl=timedelta(minutes=5)))
        for i in range(10):
            assert await bounded(cacheme.get(node(i))) == value_of(i)

        async def terminate() -> int:
            # Only this storage's backends (its application_name): other tests share the db.
            rows = await table.run(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = current_database() AND application_name = '{app}' "
                "AND pid <> pg_backend_pid()"
            )
            return sum(1 for (ok,) in rows if ok)

        assert await terminate() >= 1, await table.run(
            "SELECT pid, application_name, state FROM pg_stat_activity "
            "WHERE datname = current_database()"
        )
        for i in range(20):  # 0-9 were stored before, 10-19 are new
            assert await bounded(cacheme.get(node(i))) == value_of(i)

        # Terminated again while a burst of gets is running.
        burst = asyncio.gather(*(cacheme.get(node(i)) for i in range(100, 300)))
        await asyncio.sleep(0)
        await terminate()
        assert await bounded(burst, 10) == [value_of(i) for i in range(100, 300)]

        async def in_table(i: int) -> bool:
            rows = await table.run(
                f"SELECT {table.q('value')} FROM {table.q(table.table)} "
                f"WHERE {table.q('key')} = '{full_key(i)}'"
            )
            return bool(rows) and MSGPACK.loads(bytes(rows[0][0])) == value_of(i)

        key = await probe_until_written(node, 1000, in_table, 10, "PostgreSQL used again")
        await assert_hit_without_load(node, key)


@pytest.mark.postgres
async def test_postgres_write_blocked_by_a_row_lock(tmp_path: Path) -> None:
    """Another transaction holds the row: the write-back waits, times out, is counted.

    The caller gets its value after read + load + at most one storage timeout (the flight
    settles its waiters once the write-back is done or has failed).
    """
    import asyncpg

    timeout = 0.5
    async with sql_table("postgres", tmp_path) as table:
        name = f"locked-pg-{uuid.uuid4().hex[:6]}"
        await cacheme.register_storage(
            name,
            cacheme.Storage(table.url, table=table.table, timeout=timeout, purge_interval=0),
        )
        node = item_class(cacheme.Cache(storage=name, ttl=timedelta(milliseconds=50)))
        assert await bounded(cacheme.get(node(1))) == value_of(1)
        await asyncio.sleep(0.1)  # the row expires (and stays: no purge)
        locker = await asyncpg.connect(POSTGRES_URL, timeout=5)
        try:
            async with locker.transaction():
                locked = await locker.fetch(
                    f'SELECT 1 FROM "{table.table}" WHERE "key" = $1 FOR UPDATE', full_key(1)
                )
                assert locked
                started = time.monotonic()
                assert await bounded(cacheme.get(node(1))) == value_of(1)
                elapsed = time.monotonic() - started
                assert cacheme.stats(node).storage_timeout_count() == 1
                assert elapsed < 2 * timeout + MARGIN, f"get took {elapsed:.3f}s"
        finally:
            await locker.close()
        node.suffix = "-new"
        assert await bounded(cacheme.get(node(1))) == value_of(1) + "-new"
        rows = await table.run(
            f'SELECT "value" FROM "{table.table}" WHERE "key" = \'{full_key(1)}\''
        )
        assert MSGPACK.loads(bytes(rows[0][0])) == value_of(1) + "-new"


# -- 3. MongoDB (SecantusDB): the server killed, then started again on its data --------------


@pytest.mark.mongo
async def test_mongo_server_killed_then_restarted(tmp_path: Path) -> None:
    if SecantusServer.available() is None:
        if "MONGO_URL" in os.environ:
            pytest.skip(
                "needs a MongoDB server it can kill and restart: secantusd-py is not "
                "installed, and MONGO_URL names a server this test did not start"
            )
        unavailable("SecantusDB", "secantusd-py", FileNotFoundError("secantusd-py not found"))
    from pymongo import AsyncMongoClient

    from .backend_mongo import DATABASE, create_collection

    collection = f"cacheme_res_{uuid.uuid4().hex[:12]}"
    async with SecantusServer(tmp_path / "mongo") as server:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            server.url(), serverSelectionTimeoutMS=5000
        )
        try:
            await create_collection(client, collection)
        finally:
            await client.close()
        timeout = 0.5
        await cacheme.register_storage(
            "dying-mongo",
            cacheme.Storage(
                server.url(),
                database=DATABASE,
                collection=collection,
                timeout=timeout,
                breaker_threshold=3,
                breaker_cooldown=0.3,
            ),
        )
        node = item_class(cacheme.Cache(storage="dying-mongo", ttl=timedelta(minutes=5)))
        storage = remote("dying-mongo")
        assert await bounded(cacheme.get(node(0))) == value_of(0)

        server.kill()
        slowest = 0.0
        for i in range(1, 11):
            started = time.monotonic()
            assert await bounded(cacheme.get(node(i))) == value_of(i)
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < timeout + MARGIN, f"a get took {slowest:.3f}s while Mongo was down"
        stats = cacheme.stats(node)
        assert stats.storage_error_count() + stats.storage_timeout_count() >= 3
        assert storage.stats.errors + storage.stats.timeouts >= 3
        assert storage.stats.breaker_opens >= 1

        await server.start()
        raw: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            server.url(), serverSelectionTimeoutMS=2000
        )
        try:
            docs = raw[DATABASE][collection]

            async def in_mongo(i: int) -> bool:
                doc = await docs.find_one({"key": full_key(i)})
                return doc is not None and MSGPACK.loads(bytes(doc["value"])) == value_of(i)

            # (What was written before the SIGKILL may be lost: without --sync-on-commit
            # SecantusDB does not flush its log on each write. Not cacheme's concern.)
            key = await probe_until_written(node, 1000, in_mongo, 30, "MongoDB used again")
        finally:
            await raw.close()
        await assert_hit_without_load(node, key)


# -- 4. A tier that hangs -----------------------------------------------------------------


HANGING_URLS = {
    "redis": "redis://127.0.0.1:{port}/0",
    "postgres": "postgresql://postgres@127.0.0.1:{port}/test",
    "mysql": "mysql://cacheme:cacheme@127.0.0.1:{port}/test",
    "mongo": "mongodb://127.0.0.1:{port}/?directConnection=true",
}


@pytest.mark.parametrize("backend", ["redis", "postgres", "mysql", "mongo"])
async def test_register_against_a_hanging_server_fails_closed_in_bounded_time(
    backend: str,
) -> None:
    """With ``fail_open=False`` a server that never answers fails the registration, within
    twice the timeout (the attempt, then the cleanup of the failed attempt)."""
    timeout = 0.3
    async with HangingServer() as server:
        url = HANGING_URLS[backend].format(port=server.port)
        started = time.monotonic()
        with pytest.raises(cacheme.StorageTimeoutError) as caught:
            await bounded(
                cacheme.register_storage(
                    "hung", cacheme.Storage(url, timeout=timeout, fail_open=False)
                )
            )
        elapsed = time.monotonic() - started
        assert server.connections >= 1
    assert elapsed < 2 * timeout + MARGIN, f"register took {elapsed:.3f}s"
    assert "'hung'" in str(caught.value)
    assert "hung" not in cacheme.storages()


@pytest.mark.parametrize("backend", ["redis", "postgres", "mysql", "mongo"])
async def test_register_against_a_hanging_server_fails_open(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """By default (fail-open) the app starts anyway: registration returns within twice the
    timeout after a warning, the breaker is open, and gets are served by load()."""
    timeout = 0.3
    async with HangingServer() as server:
        url = HANGING_URLS[backend].format(port=server.port)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="cacheme"):
            await bounded(cacheme.register_storage("hung", cacheme.Storage(url, timeout=timeout)))
        elapsed = time.monotonic() - started
        assert elapsed < 2 * timeout + MARGIN, f"register took {elapsed:.3f}s"
        assert "'hung' is unreachable at registration" in caplog.text
        storage = remote("hung")
        assert storage.breaker_open
        node = item_class(cacheme.Cache(storage="hung", ttl=timedelta(minutes=1)))
        started = time.monotonic()
        assert await bounded(cacheme.get(node(1))) == value_of(1)
        assert time.monotonic() - started < timeout + MARGIN  # the breaker skips the tier
        assert node.loads == 1


@pytest.mark.redis
async def test_registered_while_down_then_used_once_the_server_answers(tmp_path: Path) -> None:
    """A storage registered while nothing listens comes into use by itself once it does."""
    if RedisServer.available() is None:
        unavailable("redis-server", "redis-server", FileNotFoundError("redis-server not found"))
    port = free_port()
    server = RedisServer(tmp_path / "late", port=port)
    await bounded(
        cacheme.register_storage(
            "late", cacheme.Storage(server.url(), timeout=0.3, breaker_cooldown=0.2)
        )
    )
    node = item_class(cacheme.Cache(storage="late", ttl=timedelta(minutes=1)))
    assert await bounded(cacheme.get(node(1))) == value_of(1)
    assert node.loads == 1
    async with server:
        await asyncio.sleep(0.25)  # the breaker's cool-down
        assert await bounded(cacheme.get(node(2))) == value_of(2)  # loaded, written to Redis
        assert await bounded(cacheme.get(node(2))) == value_of(2)  # a hit in Redis
        assert node.loads == 2
        stats = cacheme.stats(node)
        assert stats.tier_hit_count("late") == 1
        async with raw_redis(server.url()) as raw:
            assert MSGPACK.loads(await raw.get(full_key(2))) == value_of(2)


@asynccontextmanager
async def real_server(
    backend: str, tmp_path: Path
) -> AsyncIterator[tuple[str, int, dict[str, Any]]]:
    """``(url, port, options)`` of a shared test server, with a table/collection if needed."""
    if backend == "redis":
        url = redis_url()
        try:
            async with raw_redis(url) as client:
                await client.ping()
        except Exception as exc:
            unavailable("Redis", url, exc)
        try:
            yield url, port_of(url, 6379), {}
        finally:
            async with raw_redis(url) as client:
                keys = [k async for k in client.scan_iter(match=f"{get_prefix()}:*")]
                if keys:
                    await client.unlink(*keys)
    elif backend in ("postgres", "mysql"):
        async with sql_table(backend, tmp_path) as table:
            default = 5432 if backend == "postgres" else 3306
            url = POSTGRES_URL if backend == "postgres" else MYSQL_URL
            yield table.url, port_of(url, default), {"table": table.table, "purge_interval": 0}
    elif backend == "mongo":
        from .backend_mongo import DATABASE, admin_client, create_collection

        collection = f"cacheme_res_{uuid.uuid4().hex[:12]}"
        async with admin_client() as client:
            await create_collection(client, collection)
            try:
                url = with_query(MONGO_URL, directConnection="true")
                yield (
                    url,
                    port_of(MONGO_URL, 27017),
                    {
                        "database": DATABASE,
                        "collection": collection,
                    },
                )
            finally:
                await client[DATABASE].drop_collection(collection)
    else:  # pragma: no cover
        raise ValueError(backend)


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
async def test_black_holed_tier_answers_within_timeout(backend: str, tmp_path: Path) -> None:
    """The network to a working server starts swallowing every byte (no RST, no reply)."""
    timeout = 0.3
    load_time = 0.05
    bound = timeout + load_time + MARGIN
    async with real_server(backend, tmp_path) as (url, port, options), Proxy(port) as proxy:
        await cacheme.register_storage(
            "black-hole",
            cacheme.Storage(
                with_port(url, proxy.port),
                timeout=timeout,
                breaker_threshold=3,
                breaker_cooldown=0.3,
                **options,
            ),
        )
        node = item_class(cacheme.Cache(storage="black-hole", ttl=timedelta(minutes=5)))
        node.delay = load_time
        storage = remote("black-hole")
        assert await bounded(cacheme.get(node(0))) == value_of(0)
        await assert_hit_without_load(node, 0)

        proxy.hang()
        for i in range(5):
            started = time.monotonic()
            assert await bounded(cacheme.get(node(i)), 3 * bound) == value_of(i)
            elapsed = time.monotonic() - started
            assert elapsed < bound, f"get took {elapsed:.3f}s on a hanging tier"
        started = time.monotonic()
        burst = cacheme.get_all([node(i) for i in range(10, 40)])
        assert await bounded(burst, 3 * bound) == [value_of(i) for i in range(10, 40)]
        assert time.monotonic() - started < bound
        assert cacheme.stats(node).storage_timeout_count() >= 1
        assert storage.stats.timeouts >= 1

        proxy.resume()

        async def stored(i: int) -> bool:
            # Written back, then read back: a second get is a hit from this tier.
            hits = cacheme.stats(node).hit_count()
            assert await bounded(cacheme.get(node(i))) == value_of(i)
            return cacheme.stats(node).hit_count() > hits

        key = await probe_until_written(node, 1000, stored, 15, "the tier used again")
        await assert_hit_without_load(node, key)


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
async def test_reset_connections_are_replaced(backend: str, tmp_path: Path) -> None:
    """Every open connection to the tier is reset (RST), twice, once in mid-burst."""
    async with real_server(backend, tmp_path) as (url, port, options), Proxy(port) as proxy:
        await cacheme.register_storage(
            "reset",
            cacheme.Storage(
                with_port(url, proxy.port),
                timeout=1.0,
                breaker_threshold=3,
                breaker_cooldown=0.3,
                **options,
            ),
        )
        node = item_class(cacheme.Cache(storage="reset", ttl=timedelta(minutes=5)))
        for i in range(10):
            assert await bounded(cacheme.get(node(i))) == value_of(i)
        assert proxy.drop() >= 1
        for i in range(20):
            assert await bounded(cacheme.get(node(i))) == value_of(i)

        burst = asyncio.gather(*(cacheme.get(node(i)) for i in range(100, 300)))
        await asyncio.sleep(0.01)
        proxy.drop()
        assert await bounded(burst, 10) == [value_of(i) for i in range(100, 300)]

        async def stored(i: int) -> bool:
            hits = cacheme.stats(node).hit_count()
            assert await bounded(cacheme.get(node(i))) == value_of(i)
            return cacheme.stats(node).hit_count() > hits

        key = await probe_until_written(node, 1000, stored, 10, "the tier used again")
        await assert_hit_without_load(node, key)


@pytest.mark.redis
async def test_invalidate_while_the_tier_is_unreachable_is_not_lost(tmp_path: Path) -> None:
    """``invalidate`` during a partition must not let the old value come back after it."""
    async with real_server("redis", tmp_path) as (url, port, _), Proxy(port) as proxy:
        await cacheme.register_storage(
            "partitioned",
            cacheme.Storage(
                with_port(url, proxy.port), timeout=0.3, breaker_threshold=3, breaker_cooldown=0.3
            ),
        )
        node = item_class(cacheme.Cache(storage="partitioned", ttl=timedelta(minutes=5)))
        assert await bounded(cacheme.get(node(1))) == value_of(1)

        proxy.hang()
        try:
            await bounded(cacheme.invalidate(node(1)))
            refused = False
        except cacheme.StorageError:
            refused = True  # the caller is told the invalidation did not happen
        node.suffix = "-new"  # the source changed: that is why it was invalidated
        proxy.resume()
        await asyncio.sleep(0.4)  # the breaker's cooldown

        value = await bounded(cacheme.get(node(1)))
        assert refused or value == value_of(1) + "-new", (
            f"invalidate() returned normally, yet get() serves the old {value!r}"
        )


@pytest.mark.redis
async def test_close_storages_during_a_hang_releases_every_caller(tmp_path: Path) -> None:
    async with real_server("redis", tmp_path) as (url, port, _), Proxy(port) as proxy:
        await cacheme.register_storage(
            "closing", cacheme.Storage(with_port(url, proxy.port), timeout=5)
        )
        node = item_class(cacheme.Cache(storage="closing", ttl=timedelta(minutes=5)))
        assert await bounded(cacheme.get(node(0))) == value_of(0)
        proxy.hang()
        callers = [asyncio.ensure_future(cacheme.get(node(i))) for i in range(20)]
        await asyncio.sleep(0.1)
        assert not any(c.done() for c in callers)
        started = time.monotonic()
        await bounded(cacheme.close_storages(), 3)
        results = await bounded(asyncio.gather(*callers, return_exceptions=True), 3)
        elapsed = time.monotonic() - started
    # Fail-open: a closed tier is a failed tier; the values come from the source.
    assert results == [value_of(i) for i in range(20)], results
    assert elapsed < 1.0, f"callers released {elapsed:.3f}s after close_storages()"


@pytest.mark.redis
async def test_redis_refusing_writes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis at maxmemory with noeviction: reads work, every write fails with OOM."""
    caplog.set_level(logging.WARNING, logger="cacheme")
    name = f"full-redis-{uuid.uuid4().hex[:6]}"
    await cacheme.register_storage(name, cacheme.Storage(redis_server.url(), timeout=1))
    node = item_class(cacheme.Cache(storage=name, ttl=timedelta(minutes=5)), name="FullNode")
    assert await bounded(cacheme.get(node(0))) == value_of(0)
    async with raw_redis(redis_server.url()) as raw:
        await raw.config_set("maxmemory-policy", "noeviction")
        await raw.config_set("maxmemory", 1)
        try:
            for i in range(1, 11):
                assert await bounded(cacheme.get(node(i))) == value_of(i)
                assert await raw.get(full_key(i)) is None
            await assert_hit_without_load(node, 0)  # reads still served
            assert cacheme.stats(node).storage_error_count() >= 10
            assert remote(name).stats.errors >= 10
            assert any(
                name in r.getMessage()
                and "FullNode" in r.getMessage()
                and "write" in r.getMessage()
                for r in caplog.records
            ), caplog.text
        finally:
            await raw.config_set("maxmemory", 0)
        assert await bounded(cacheme.get(node(20))) == value_of(20)
        assert MSGPACK.loads(await raw.get(full_key(20))) == value_of(20)


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["plain", "stamped", "tagged"])
async def test_refresh_whose_value_a_tier_refuses_raises(
    redis_server: RedisServer, kind: str
) -> None:
    """``refresh`` while a fail-open remote tier refuses writes: the caller is told (as for
    ``invalidate``), since that tier keeps serving the old value to other processes. Both
    kinds: a write that fails on the server (OOM), and one refused before any round trip
    (the breaker open); and two refreshes at once, the first overtaken by the second
    (review 43: it returned the second's value without its error). Before, ``refresh``
    returned the new value and only logged. A tagged node refused at its tag-version read
    (the breaker open) returned normally too (review 43)."""

    class Tagged(Item):
        _cacheme_abstract = True

        def tags(self) -> list[str]:
            return ["t"]

    meta: dict[str, Any] = {"negative_ttl": timedelta(minutes=1)} if kind == "stamped" else {}
    base = Tagged if kind == "tagged" else Item
    name = f"refusing-{uuid.uuid4().hex[:6]}"
    await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=100))
    await cacheme.register_storage(
        name,
        cacheme.Storage(redis_server.url(), timeout=1, breaker_threshold=1, breaker_cooldown=0.5),
    )
    node = item_class(
        cacheme.Cache(storage="local", ttl=timedelta(minutes=5)),
        cacheme.Cache(storage=name, ttl=timedelta(minutes=5)),
        name="RefreshedNode",
        base=base,
        **meta,
    )

    async def remote_holds(value: str) -> bool:
        """Whether Redis holds ``value`` under the key (a stamped entry ends with it)."""
        async with raw_redis(redis_server.url()) as raw:
            data = await raw.get(full_key(0))
        return data is not None and bytes(data).endswith(MSGPACK.dumps(value))

    assert await bounded(cacheme.get(node(0))) == value_of(0)
    async with raw_redis(redis_server.url()) as raw:
        await raw.config_set("maxmemory-policy", "noeviction")
        await raw.config_set("maxmemory", 1)
        try:
            node.suffix = "-new"
            both = await bounded(
                asyncio.gather(
                    cacheme.refresh(node(0)), cacheme.refresh(node(0)), return_exceptions=True
                )
            )
            assert all(isinstance(r, cacheme.StorageError) for r in both), both
            assert await remote_holds(value_of(0))
            for case in ("OOM", "breaker open"):
                with pytest.raises(
                    cacheme.StorageError, match=f"refresh of node RefreshedNode: storage '{name}'"
                ) as info:
                    await bounded(cacheme.refresh(node(0)))
                assert "old one" in str(info.value), case
                # The tiers that took it serve it; the refusing one kept the old value.
                assert await bounded(cacheme.get(node(0))) == value_of(0) + "-new"
                assert await remote_holds(value_of(0))
            assert remote(name).stats.rejected >= 1  # the second was refused by the breaker
        finally:
            await raw.config_set("maxmemory", 0)
        await asyncio.sleep(0.6)  # the breaker's cooldown
        assert await bounded(cacheme.refresh(node(0))) == value_of(0) + "-new"
        assert await remote_holds(value_of(0) + "-new")


@pytest.mark.redis
async def test_tag_invalidations_a_tier_refuses_name_what_failed(
    redis_server: RedisServer,
) -> None:
    """``invalidate_tag`` and ``invalidate_node`` while the remote tier refuses writes: each
    raises, naming itself (``invalidate_node`` spoke of a tag named '' before, review 40)."""
    name = f"tags-{uuid.uuid4().hex[:6]}"
    await cacheme.register_storage(name, cacheme.Storage(redis_server.url(), timeout=1))

    class Tagged(Item):
        _cacheme_abstract = True

        def tags(self) -> list[str]:
            return ["t"]

    node = item_class(
        cacheme.Cache(storage=name, ttl=timedelta(minutes=5)), name="TaggedNode", base=Tagged
    )
    assert await bounded(cacheme.get(node(0))) == value_of(0)
    async with raw_redis(redis_server.url()) as raw:
        await raw.config_set("maxmemory-policy", "noeviction")
        await raw.config_set("maxmemory", 1)
        try:
            with pytest.raises(
                cacheme.StorageError,
                match=rf"^invalidate of tag 't' of node TaggedNode: storage '{name}' did not "
                "take the new version; its entries of that tag may still be served",
            ):
                await bounded(cacheme.invalidate_tag(node, "t"))
            with pytest.raises(
                cacheme.StorageError,
                match=rf"^invalidate_node of node TaggedNode: storage '{name}' did not take "
                "the new version; its entries may still be served",
            ):
                await bounded(cacheme.invalidate_node(node))
        finally:
            await raw.config_set("maxmemory", 0)


@pytest.mark.redis
async def test_a_redis_write_cut_short_never_lands_after_a_later_invalidate(
    tmp_path: Path,
) -> None:
    """A write-back whose bytes are held up on the network past the storage timeout: it
    fails (fail-open), the key is invalidated and loaded anew, then the held-up ``SET``
    reaches Redis. Review 39 saw it land there, the old value kept for the whole TTL (3 of 3
    runs). The cut connection is now closed on the server (``CLIENT KILL ID``) before the
    write counts as failed, so its bytes find no connection to land on."""
    async with real_server("redis", tmp_path) as (url, port, _), Proxy(port) as proxy:
        name = f"stalled-{uuid.uuid4().hex[:6]}"
        await cacheme.register_storage(
            name, cacheme.Storage(with_port(url, proxy.port), timeout=0.3)
        )
        node = item_class(cacheme.Cache(storage=name, ttl=timedelta(minutes=5)), name="Stalled")
        assert await bounded(cacheme.get(node(0))) == value_of(0)  # a pooled connection
        proxy.stall(1.0)
        node.suffix = "-old"
        with pytest.raises(cacheme.StorageError, match="did not take the new value"):
            await bounded(cacheme.refresh(node(1)))  # its SET goes out on the stalled one
        node.suffix = "-new"
        await bounded(cacheme.invalidate(node(1)))
        assert await bounded(cacheme.get(node(1))) == value_of(1) + "-new"
        await asyncio.sleep(1.2)  # the held-up bytes arrive
        async with raw_redis(url) as raw:
            assert MSGPACK.loads(await raw.get(full_key(1))) == value_of(1) + "-new"


# -- 5. Fail-closed --------------------------------------------------------------------------


@pytest.mark.redis
async def test_fail_closed_error_reaches_the_caller(redis_server: RedisServer) -> None:
    await cacheme.register_storage(
        "strict-redis",
        cacheme.Storage(
            redis_server.url(),
            timeout=0.2,
            fail_open=False,
            breaker_threshold=3,
            breaker_cooldown=0.3,
        ),
    )
    node = item_class(cacheme.Cache(storage="strict-redis", ttl=timedelta(minutes=5)))
    assert await bounded(cacheme.get(node(0))) == value_of(0)
    loads = node.loads

    redis_server.kill()
    with pytest.raises(cacheme.StorageError) as caught:
        await bounded(cacheme.get(node(0)))
    assert "'strict-redis'" in str(caught.value)
    # Every waiter of the flight gets the error; none hangs, nothing is loaded.
    results = await bounded(
        asyncio.gather(*(cacheme.get(node(1)) for _ in range(10)), return_exceptions=True)
    )
    assert all(isinstance(r, cacheme.StorageError) for r in results), results
    for _ in range(5):  # the breaker opens: still an error, now StorageUnavailableError
        with pytest.raises(cacheme.StorageError):
            await bounded(cacheme.get(node(2)))
    assert remote("strict-redis").breaker_open
    with pytest.raises(cacheme.StorageUnavailableError):
        await bounded(cacheme.get(node(3)))
    assert node.loads == loads
    assert len(runtime.current().flights) == 0
    stats = cacheme.stats(node)
    assert stats.storage_error_count() + stats.storage_timeout_count() >= 3

    await redis_server.start()

    async def works(i: int) -> bool:
        try:
            return await bounded(cacheme.get(node(i))) == value_of(i)
        except cacheme.StorageError:
            return False

    await wait_until(lambda: works(0), 10, "the strict tier back", every=0.1)


# -- 6. Corrupt bytes in the stored entries --------------------------------------------------

GARBAGE = [
    pytest.param(MsgPackSerializer(), b"\xc1\xc1garbage", id="msgpack-invalid"),
    pytest.param(MsgPackSerializer(), msgpack.packb(42), id="msgpack-wrong-type"),
    pytest.param(MsgPackSerializer(), b"\x92\x01", id="msgpack-truncated"),
    pytest.param(JSONSerializer(), b'{"unterminated', id="json-invalid"),
    pytest.param(JSONSerializer(), b'{"a": 1}', id="json-wrong-type"),
    pytest.param(PickleSerializer(), b"\x80\x05garbage", id="pickle-invalid"),
    pytest.param(MsgPackSerializer(), b"", id="empty"),
]


@pytest.mark.redis
@pytest.mark.parametrize(("serializer", "garbage"), GARBAGE)
async def test_corrupt_redis_entry_is_reloaded_and_overwritten(
    serializer: Serializer, garbage: bytes, shared_redis: str
) -> None:
    await cacheme.register_storage("corrupt-redis", cacheme.Storage(shared_redis, timeout=2))
    node = item_class(
        cacheme.Cache(storage="corrupt-redis", ttl=timedelta(minutes=5)), serializer=serializer
    )
    async with raw_redis(shared_redis) as raw:
        await raw.set(full_key(7), garbage, px=60_000)
        assert await bounded(cacheme.get(node(7))) == value_of(7)
        stats = cacheme.stats(node)
        assert stats.decode_error_count() == 1
        assert stats.load_count() == 1
        stored = await raw.get(full_key(7))
    assert stored is not None and stored != garbage
    assert serializer.loads(stored, str) == value_of(7)
    await assert_hit_without_load(node, 7)  # the rewritten entry decodes
    assert cacheme.stats(node).decode_error_count() == 1


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
async def test_corrupt_sql_row_is_reloaded_and_overwritten(backend: str, tmp_path: Path) -> None:
    async with sql_table(backend, tmp_path) as table:
        await cacheme.register_storage(
            "corrupt-sql",
            cacheme.Storage(table.url, table=table.table, timeout=2, purge_interval=0),
        )
        node = item_class(cacheme.Cache(storage="corrupt-sql", ttl=timedelta(minutes=5)))
        assert await bounded(cacheme.get(node(7))) == value_of(7)
        t, k, v = table.q(table.table), table.q("key"), table.q("value")
        garbage = "decode('c1c100ff', 'hex')" if backend == "postgres" else "X'C1C100FF'"
        await table.run(f"UPDATE {t} SET {v} = {garbage} WHERE {k} = '{full_key(7)}'")
        # Garbage in a row the tier never wrote, too.
        expire = {"sqlite": "NULL", "postgres": "NULL", "mysql": "NULL"}[backend]
        await table.run(
            f"INSERT INTO {t} ({k}, {v}, {table.q('expire')}) "
            f"VALUES ('{full_key(8)}', {garbage}, {expire})"
        )

        for i in (7, 8):
            assert await bounded(cacheme.get(node(i))) == value_of(i)
        stats = cacheme.stats(node)
        assert stats.decode_error_count() == 2
        assert stats.load_count() == 3
        for i in (7, 8):
            rows = await table.run(f"SELECT {v} FROM {t} WHERE {k} = '{full_key(i)}'")
            assert MSGPACK.loads(bytes(rows[0][0]), str) == value_of(i)
            await assert_hit_without_load(node, i)
        assert cacheme.stats(node).decode_error_count() == 2


@pytest.mark.redis
async def test_redis_key_of_another_type_is_replaced(shared_redis: str) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=2))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    async with raw_redis(shared_redis) as raw:
        await raw.hset(full_key(3), "field", "value")
        await raw.rpush(full_key(4), "a", "b")
        assert await bounded(cacheme.get_all([node(3), node(4)])) == [value_of(3), value_of(4)]
        for i in (3, 4):
            assert MSGPACK.loads(await raw.get(full_key(i))) == value_of(i)
    await assert_hit_without_load(node, 3)


# -- 7. A failing load() never poisons a key; stale-if-error ---------------------------------


@pytest.mark.redis
async def test_failed_load_does_not_poison_the_key(shared_redis: str) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=2))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    node.error = RuntimeError("the source is down")
    node.delay = 0.02
    results = await bounded(
        asyncio.gather(*(cacheme.get(node(1)) for _ in range(10)), return_exceptions=True)
    )
    assert all(isinstance(r, RuntimeError) and str(r) == "the source is down" for r in results)
    assert node.loads == 1  # one flight for all ten
    assert len(runtime.current().flights) == 0
    async with raw_redis(shared_redis) as raw:
        assert await raw.get(full_key(1)) is None

    node.error = None
    assert await bounded(cacheme.get(node(1))) == value_of(1)
    assert node.loads == 2
    stats = cacheme.stats(node)
    assert (stats.load_failure_count(), stats.load_success_count()) == (1, 1)
    await assert_hit_without_load(node, 1)


@pytest.mark.redis
async def test_stale_if_error_serves_the_last_value_within_the_grace(shared_redis: str) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=2))
    node = item_class(
        cacheme.Cache(storage="r", ttl=timedelta(milliseconds=50)),
        stale_if_error=timedelta(seconds=5),
    )
    assert await bounded(cacheme.get(node(1))) == value_of(1)
    await asyncio.sleep(0.1)  # the entry expires in Redis
    node.error = RuntimeError("the source is down")
    assert await bounded(cacheme.get(node(1))) == value_of(1)  # the stale value
    stats = cacheme.stats(node)
    assert stats.stale_count() == 1
    assert stats.load_failure_count() == 1
    async with raw_redis(shared_redis) as raw:
        assert await raw.get(full_key(1)) is None  # a stale value is not written back
    # A key never loaded has nothing stale to serve.
    with pytest.raises(RuntimeError):
        await bounded(cacheme.get(node(2)))
    node.error = None
    assert await bounded(cacheme.get(node(1))) == value_of(1)
    assert cacheme.stats(node).load_count() == 4


@pytest.mark.redis
async def test_stale_if_error_ends_with_the_grace(shared_redis: str) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=2))
    node = item_class(
        cacheme.Cache(storage="r", ttl=timedelta(milliseconds=50)),
        stale_if_error=timedelta(milliseconds=100),
    )
    assert await bounded(cacheme.get(node(1))) == value_of(1)
    await asyncio.sleep(0.2)  # past the TTL and past the grace
    node.error = RuntimeError("the source is down")
    with pytest.raises(RuntimeError, match="the source is down"):
        await bounded(cacheme.get(node(1)))
    assert cacheme.stats(node).stale_count() == 0


# -- 8. load_timeout -------------------------------------------------------------------------


@pytest.mark.redis
async def test_load_timeout_fails_every_waiter_then_loads_again(shared_redis: str) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=2))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)), load_timeout=0.05)
    node.delay = 2.0
    started = time.monotonic()
    results = await bounded(
        asyncio.gather(
            *(cacheme.get(node(1)) for _ in range(10)),
            cacheme.get_all([node(1), node(2)]),
            return_exceptions=True,
        )
    )
    elapsed = time.monotonic() - started
    assert elapsed < 0.05 + MARGIN, f"waiters released after {elapsed:.3f}s"
    for result in results:
        assert isinstance(result, cacheme.LoadTimeoutError), result
        assert isinstance(result, TimeoutError) and isinstance(result, cacheme.CachemeError)
    assert node.__qualname__ in str(results[0]) and "0.05" in str(results[0])
    # get_all fails at its first error; key 2's own load (a turn behind key 1's, which was
    # read in the caller's task) times out just after: then no flight is left.
    await runtime.current().quiesce(0.05 + MARGIN)
    assert len(runtime.current().flights) == 0
    node.delay = 0.0
    assert await bounded(cacheme.get(node(1))) == value_of(1)
    assert await bounded(cacheme.get_all([node(1), node(2)])) == [value_of(1), value_of(2)]


# -- 9. Bad input: CachemeError subclasses that say what is wrong ----------------------------


async def test_key_must_return_str() -> None:
    await cacheme.register_storage("local", cacheme.Storage("local://lru", size=10))

    class IntKeyNode(cacheme.Node):
        def key(self) -> Any:
            return 42

        async def load(self) -> str:
            return "x"

        class Meta(cacheme.Node.Meta):
            caches = [cacheme.Cache(storage="local", ttl=None)]

    with pytest.raises(cacheme.ConfigurationError) as caught:
        await bounded(cacheme.get(IntKeyNode()))
    message = str(caught.value)
    assert "IntKeyNode" in message and "str" in message and "int" in message
    assert len(runtime.current().flights) == 0


async def test_node_used_before_its_storage_is_registered() -> None:
    class EarlyNode(cacheme.Node):
        def key(self) -> str:
            return "early"

        async def load(self) -> str:
            return "x"

        class Meta(cacheme.Node.Meta):
            caches = [cacheme.Cache(storage="not-yet-registered", ttl=None)]

    with pytest.raises(cacheme.StorageNotRegisteredError) as caught:
        await bounded(cacheme.get(EarlyNode()))
    assert isinstance(caught.value, cacheme.CachemeError)
    assert "EarlyNode" in str(caught.value) and "'not-yet-registered'" in str(caught.value)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"pool_sise": 3}, "pool_sise"),
        ({"pool_size": "many"}, "pool_size"),
        ({"timeout": -1}, "timeout"),
        ({"fail_open": "sometimes"}, "fail_open"),
    ],
)
async def test_bad_storage_options_name_the_option(options: dict[str, Any], named: str) -> None:
    # A dead port: the options are refused before any connection is tried.
    storage = cacheme.Storage(f"redis://127.0.0.1:{free_port()}/0", **options)
    started = time.monotonic()
    with pytest.raises(cacheme.ConfigurationError) as caught:
        await bounded(cacheme.register_storage("bad-options", storage))
    assert time.monotonic() - started < 1
    assert named in str(caught.value) and "'bad-options'" in str(caught.value)


@pytest.mark.parametrize(
    "ttl", [timedelta(0), timedelta(seconds=-1), timedelta(milliseconds=-5), 5]
)
def test_cache_ttl_must_be_a_positive_timedelta(ttl: Any) -> None:
    with pytest.raises(cacheme.ConfigurationError) as caught:

        class BadTTLNode(cacheme.Node):
            def key(self) -> str:
                return "k"

            async def load(self) -> str:
                return "x"

            class Meta(cacheme.Node.Meta):
                caches = [cacheme.Cache(storage="local", ttl=ttl)]

    assert "BadTTLNode" in str(caught.value) and "ttl" in str(caught.value)


@pytest.mark.redis
@pytest.mark.parametrize("serializer", [JSONSerializer(), MsgPackSerializer()])
async def test_unencodable_value_names_node_and_serializer(
    serializer: Serializer, shared_redis: str
) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=2))
    chosen = serializer

    class OpaqueNode(cacheme.Node):
        def key(self) -> str:
            return "opaque"

        async def load(self) -> Any:
            return object()

        class Meta(cacheme.Node.Meta):
            caches = [cacheme.Cache(storage="r", ttl=timedelta(minutes=1))]
            serializer = chosen

    with pytest.raises(cacheme.EncodeError) as caught:
        await bounded(cacheme.get(OpaqueNode()))
    message = str(caught.value)
    assert "OpaqueNode" in message and type(serializer).__name__ in message
    assert isinstance(caught.value, cacheme.CachemeError)
    assert len(runtime.current().flights) == 0
    with pytest.raises(cacheme.EncodeError):  # not poisoned: loaded (and refused) again
        await bounded(cacheme.get(OpaqueNode()))
    assert cacheme.stats(OpaqueNode).load_count() == 2


async def test_get_all_with_mixed_classes_names_both() -> None:
    await cacheme.register_storage("local", cacheme.Storage("local://lru", size=10))
    first = item_class(cacheme.Cache(storage="local", ttl=None), name="FirstKind")
    second = item_class(cacheme.Cache(storage="local", ttl=None), name="SecondKind")
    with pytest.raises(cacheme.ConfigurationError) as caught:
        await bounded(cacheme.get_all([first(1), second(2)]))
    assert "FirstKind" in str(caught.value) and "SecondKind" in str(caught.value)
    assert first.loads == second.loads == 0


# -- 10. Security: crafted entries run no code; credentials never shown ----------------------


class Profile(BaseModel):
    name: str
    age: int


def plain(value: Any) -> bool:
    """True when ``value`` is made of JSON types only."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def crafted_json(marker: Path) -> Iterator[bytes]:
    command = f"touch {marker}"
    yield (
        b'{"py/object": "os.system", "py/reduce": [{"py/function": "os.system"}, '
        b'{"py/tuple": ["' + command.encode() + b'"]}]}'
    )
    yield b'{"__reduce__": ["os.system", ["' + command.encode() + b'"]]}'
    yield b'{"__class__": "subprocess.Popen", "args": ["touch", "' + str(marker).encode() + b'"]}'
    yield b'{"name": "x", "age": 1, "__class__": "os.system", "__init__": "touch"}'


@pytest.mark.redis
@pytest.mark.parametrize("typed", ["any", "dict", "model"])
async def test_crafted_json_entry_runs_no_code(
    typed: str, shared_redis: str, tmp_path: Path
) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=2))
    good: dict[str, Any] = {"name": "ann", "age": 30}

    class AnyNode(cacheme.Node):
        def __init__(self, i: int) -> None:
            self.i = i

        def key(self) -> str:
            return f"item:{self.i}"

        async def load(self) -> Any:
            return dict(good)

        class Meta(cacheme.Node.Meta):
            version = "v1"
            caches = [cacheme.Cache(storage="r", ttl=timedelta(minutes=1))]
            serializer = JSONSerializer()

    class DictNode(AnyNode):
        async def load(self) -> dict[str, Any]:
            return dict(good)

    class ModelNode(AnyNode):
        async def load(self) -> Profile:
            return Profile(**good)

    node = {"any": AnyNode, "dict": DictNode, "model": ModelNode}[typed]
    marker = tmp_path / "pwned"
    async with raw_redis(shared_redis) as raw:
        for i, payload in enumerate(crafted_json(marker)):
            await raw.set(full_key(i), payload, px=60_000)
            value = await bounded(cacheme.get(node(i)))
            if typed == "model":
                assert isinstance(value, Profile)
                value = value.model_dump()
            assert plain(value), f"payload {i} decoded to {value!r}"
    assert not marker.exists()
    stats = cacheme.stats(node)
    # Either decoded as plain data or refused (decode error) and reloaded.
    assert stats.decode_error_count() == stats.load_count()


@pytest.mark.redis
@pytest.mark.parametrize(
    "typed",
    [
        pytest.param(
            "any",
        ),
        "str",
    ],
)
async def test_msgpack_ext_types_run_no_code(typed: str, shared_redis: str, tmp_path: Path) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=2))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    payloads = [
        msgpack.packb(msgpack.ExtType(1, pickle.dumps(Exploit()))),
        msgpack.packb({"value": msgpack.ExtType(42, b"os.system")}),
        msgpack.packb(msgpack.Timestamp(1, 0)),
    ]

    class AnyPackNode(cacheme.Node):
        def __init__(self, i: int) -> None:
            self.i = i

        def key(self) -> str:
            return f"item:{self.i}"

        async def load(self) -> Any:
            return value_of(self.i)

        class Meta(cacheme.Node.Meta):
            version = "v1"
            caches = [cacheme.Cache(storage="r", ttl=timedelta(minutes=1))]
            serializer = MsgPackSerializer()

    class StrPackNode(AnyPackNode):
        async def load(self) -> str:
            return value_of(self.i)

    node = AnyPackNode if typed == "any" else StrPackNode
    async with raw_redis(shared_redis) as raw:
        for i, payload in enumerate(payloads):
            await raw.set(full_key(i), payload, px=60_000)
            value = await bounded(cacheme.get(node(i)))
            assert plain(value), f"payload {i} decoded to {value!r}"
    assert not marker.exists()
    assert cacheme.stats(node).decode_error_count() == len(payloads)


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


SECRET = "s3cret"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://user:{SECRET}@127.0.0.1:{{port}}/0",
        f"redis://:{SECRET}@127.0.0.1:{{port}}/0",
        f"postgresql://postgres:{SECRET}@127.0.0.1:{{port}}/test",
        f"mysql://cacheme:{SECRET}@127.0.0.1:{{port}}/test",
        f"mongodb://user:{SECRET}@127.0.0.1:{{port}}/?directConnection=true",
        f"redis://127.0.0.1:{{port}}/0?password={SECRET}",
        f"postgresql://postgres@127.0.0.1:{{port}}/test?password={SECRET}",
    ],
)
async def test_credentials_never_shown_when_a_storage_cannot_connect(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = url.format(port=free_port())  # nobody listens there
    description = cacheme.Storage(url, timeout=0.3, fail_open=False)
    with pytest.raises(cacheme.StorageError) as caught:
        await bounded(cacheme.register_storage("secret-store", description))
    # Failing open, registration only warns: the warning hides the secret too.
    await bounded(cacheme.register_storage("secret-open", cacheme.Storage(url, timeout=0.3)))
    texts = [_all_text(caught.value), repr(description), caplog.text]
    assert "'secret-open' is unreachable" in caplog.text
    assert "'secret-store'" in str(caught.value)
    for text in texts:
        assert SECRET not in text, text


@pytest.mark.redis
@pytest.mark.parametrize("fail_open", [True, False])
async def test_credentials_never_shown_when_a_live_storage_fails(
    fail_open: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if RedisServer.available() is None:
        unavailable("redis-server", "redis-server", FileNotFoundError("redis-server not on PATH"))
    caplog.set_level(logging.DEBUG)
    name = f"secret-redis-{uuid.uuid4().hex[:6]}"
    async with RedisServer(tmp_path / "redis", user=("user", SECRET)) as server:
        await cacheme.register_storage(
            name,
            cacheme.Storage(
                server.url(),
                timeout=0.2,
                fail_open=fail_open,
                breaker_threshold=2,
                breaker_cooldown=0.2,
            ),
        )
        node = item_class(cacheme.Cache(storage=name, ttl=timedelta(minutes=1)))
        assert await bounded(cacheme.get(node(0))) == value_of(0)
        server.kill()
        errors: list[BaseException] = []
        for i in range(1, 6):
            try:
                assert await bounded(cacheme.get(node(i))) == value_of(i)
            except cacheme.StorageError as exc:
                errors.append(exc)
        assert bool(errors) == (not fail_open)
        storage = remote(name)
        texts = [
            caplog.text,
            repr(storage),
            repr(cacheme.storages()),
            str(storage.stats),
            *(_all_text(e) for e in errors),
        ]
    assert caplog.records  # the failures were logged
    for text in texts:
        assert SECRET not in text, text


# -- 11. Logging: failures name the storage and the node -------------------------------------


@pytest.mark.redis
async def test_failures_are_logged_naming_storage_and_node(
    redis_server: RedisServer, shared_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cacheme")
    dying = f"logged-redis-{uuid.uuid4().hex[:6]}"
    corrupt = f"logged-corrupt-{uuid.uuid4().hex[:6]}"
    await cacheme.register_storage(
        dying, cacheme.Storage(redis_server.url(), timeout=0.2, breaker_threshold=2)
    )
    await cacheme.register_storage(corrupt, cacheme.Storage(shared_redis, timeout=2))
    on_dying = item_class(
        cacheme.Cache(storage=dying, ttl=timedelta(minutes=1)), name="LoggedDyingNode"
    )
    on_corrupt = item_class(
        cacheme.Cache(storage=corrupt, ttl=timedelta(milliseconds=50)),
        name="LoggedCorruptNode",
        stale_if_error=timedelta(seconds=5),
    )

    def records(*words: str) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name.startswith("cacheme")
            and r.levelno >= logging.WARNING
            and all(w in r.getMessage() for w in words)
        ]

    redis_server.kill()
    for i in range(3):
        assert await bounded(cacheme.get(on_dying(i))) == value_of(i)
    assert records(dying, "LoggedDyingNode"), caplog.text  # the read failure
    assert records(dying, "in a row"), caplog.text  # the breaker opening

    async with raw_redis(shared_redis) as raw:
        await raw.set(full_key(1), b"\xc1garbage", px=60_000)
    assert await bounded(cacheme.get(on_corrupt(1))) == value_of(1)
    assert records(corrupt, "LoggedCorruptNode", "decode"), caplog.text

    await asyncio.sleep(0.1)
    on_corrupt.error = RuntimeError("the source is down")
    assert await bounded(cacheme.get(on_corrupt(1))) == value_of(1)  # stale
    assert records("LoggedCorruptNode", "stale"), caplog.text


# -- 12. A round trip in the caller's own task (an idle storage) -----------------------------
# A lone get/get_all reads from its own task, and a load writes back from its own, when the
# storage has nothing else queued or under way (RemoteStorage.read_now / write_now). These
# break that path: its caller cancelled, a close during it, and the ordering it must keep.

# Keeps the Redis server busy for ARGV[1] milliseconds (a real server that answers late).
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
    t = redis.call('TIME')
    if t[1] * 1000000 + t[2] - start > ARGV[1] * 1000 then return 1 end
end
"""


async def _busy_for(url: str, ms: int) -> asyncio.Task[Any]:
    """Start blocking the server for ``ms`` milliseconds; returns once it is blocked."""

    async def run() -> None:
        async with raw_redis(url) as client:
            await client.eval(BUSY, 0, ms)

    task = asyncio.ensure_future(run())
    await asyncio.sleep(0.05)
    return task


def _driver(name: str) -> RemoteStorage[Any]:
    return remote(name).here()


@pytest.mark.redis
@pytest.mark.parametrize("stored", [True, False], ids=["hit", "miss"])
async def test_cancelled_lone_reader_leaves_its_joiners_served(
    redis_server: RedisServer, stored: bool
) -> None:
    url = redis_server.url()
    await cacheme.register_storage("r", cacheme.Storage(url, timeout=3))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    if stored:
        assert await bounded(cacheme.get(node(1))) == value_of(1)
        node.loads = 0
    busy = await _busy_for(url, 300)
    leader = asyncio.ensure_future(cacheme.get(node(1)))
    await asyncio.sleep(0.02)
    driver = _driver("r")
    assert driver._reading == 1 and not driver._tasks, "the read runs in the caller's task"
    joiner = asyncio.ensure_future(cacheme.get(node(1)))
    await asyncio.sleep(0.02)
    leader.cancel()
    assert await bounded(joiner) == value_of(1)
    await busy
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert node.loads == (0 if stored else 1)
    assert await bounded(cacheme.get(node(1))) == value_of(1)


@pytest.mark.redis
async def test_cancelled_lone_reader_alone_leaves_no_flight(redis_server: RedisServer) -> None:
    url = redis_server.url()
    await cacheme.register_storage("r", cacheme.Storage(url, timeout=3))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    busy = await _busy_for(url, 200)
    leader = asyncio.ensure_future(cacheme.get(node(1)))
    await asyncio.sleep(0.02)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert len(runtime.current().flights) == 0
    assert node.loads == 0
    await busy
    assert await bounded(cacheme.get(node(1))) == value_of(1)
    assert node.loads == 1


@pytest.mark.redis
async def test_cancelled_get_all_leaves_a_joined_get_served(redis_server: RedisServer) -> None:
    url = redis_server.url()
    await cacheme.register_storage("r", cacheme.Storage(url, timeout=3))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    assert await bounded(cacheme.get(node(2))) == value_of(2)
    busy = await _busy_for(url, 300)
    batch = asyncio.ensure_future(cacheme.get_all([node(i) for i in range(4)]))
    await asyncio.sleep(0.02)
    assert _driver("r")._reading == 1
    joiners = [asyncio.ensure_future(cacheme.get(node(i))) for i in (1, 2)]
    await asyncio.sleep(0.02)
    batch.cancel()
    assert await bounded(asyncio.gather(*joiners)) == [value_of(1), value_of(2)]
    await busy
    with pytest.raises(asyncio.CancelledError):
        await batch
    assert await bounded(cacheme.get_all([node(i) for i in range(4)])) == [
        value_of(i) for i in range(4)
    ]


@pytest.mark.redis
async def test_read_after_a_write_back_from_the_load_task_sees_it(
    redis_server: RedisServer,
) -> None:
    """The write-back sent from the load's task is registered when issued: a read of the
    key sent while it is under way waits for it (the server could otherwise answer the read
    first, from another connection)."""
    url = redis_server.url()
    await cacheme.register_storage("r", cacheme.Storage(url, timeout=3))
    blocked: list[asyncio.Task[Any]] = []
    loaded = asyncio.Event()

    class Blocking(Item):
        _cacheme_abstract = True

        async def load(self) -> str:
            blocked.append(await _busy_for(url, 300))  # the write-back will wait on it
            loaded.set()
            return value_of(self.i)

    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)), base=Blocking)
    getter = asyncio.ensure_future(cacheme.get(node(7)))
    await bounded(loaded.wait())
    await asyncio.sleep(0.02)  # the write-back is sent, the server still busy
    driver = _driver("r")
    assert full_key(7) in driver._key_writes
    found = await bounded(driver.get_many([full_key(7)]))
    assert MSGPACK.loads(found[full_key(7)], str) == value_of(7)
    assert await bounded(getter) == value_of(7)
    await blocked[0]


@pytest.mark.redis
async def test_a_write_queued_in_this_turn_goes_before_a_lone_read(shared_redis: str) -> None:
    await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=3))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    assert await bounded(cacheme.get(node(3))) == value_of(3)
    storage = remote("r")
    from cacheme.storages.base import Entry

    # Whether the server sees the queued write first end to end depends on when the read
    # gets its connection, so the rule itself is checked too: while a write, add or removal
    # is queued in this turn, no read is sent from the caller's task.
    idle = storage.read_now([full_key(9)])
    assert idle is not None, "an idle storage sends a lone read at once"
    assert isinstance(idle, Coroutine)
    idle.close()
    write = storage.set_many([Entry(full_key(3), MSGPACK.dumps("newer"), 60_000)])
    assert storage.read_now([full_key(9)]) is None
    assert await bounded(cacheme.get(node(3))) == "newer"
    await write
    added = storage.add_many([Entry(full_key(4), MSGPACK.dumps("added"), 60_000)])
    assert storage.read_now([full_key(9)]) is None
    await added
    removal = storage.remove_many([full_key(3)])
    assert storage.read_now([full_key(9)]) is None
    assert await bounded(cacheme.get(node(3))) == value_of(3)  # reloaded, not the old entry
    await removal
    assert node.loads == 2


@pytest.mark.redis
async def test_close_storages_during_a_write_back_from_the_load_task(tmp_path: Path) -> None:
    async with real_server("redis", tmp_path) as (url, port, _), Proxy(port) as proxy:
        await cacheme.register_storage(
            "closing", cacheme.Storage(with_port(url, proxy.port), timeout=5)
        )

        class Hanging(Item):
            _cacheme_abstract = True

            async def load(self) -> str:
                proxy.hang()  # the write-back that follows never gets an answer
                return value_of(self.i)

        node = item_class(cacheme.Cache(storage="closing", ttl=timedelta(minutes=5)), base=Hanging)
        getter = asyncio.ensure_future(cacheme.get(node(1)))
        await asyncio.sleep(0.2)
        assert not getter.done()
        assert full_key(1) in _driver("closing")._key_writes
        started = time.monotonic()
        await bounded(cacheme.close_storages(), 3)
        value = await bounded(getter, 3)
        elapsed = time.monotonic() - started
    assert value == value_of(1)  # fail-open: the failed write-back does not fail the caller
    assert elapsed < 1.0, f"caller released {elapsed:.3f}s after close_storages()"


@pytest.mark.redis
async def test_a_failed_write_back_never_leaves_a_direct_write_unsent(
    shared_redis: str, tmp_path: Path
) -> None:
    """[redis, sqlite fail-closed]; the SQLite storage is replaced (the old one closed) while
    a load runs: the write-back to Redis is issued first (from the load's task), then the
    closed fail-closed tier refuses its write. The caller gets that error, and the Redis write
    still runs: later reads and removals of the key do not wait on it forever."""
    async with sql_table("sqlite", tmp_path) as table:
        options = {"table": table.table, "timeout": 1, "fail_open": False}
        await cacheme.register_storage("r", cacheme.Storage(shared_redis, timeout=1))
        await cacheme.register_storage("s", cacheme.Storage(table.url, **options))
        node = item_class(
            cacheme.Cache(storage="r", ttl=timedelta(minutes=5)),
            cacheme.Cache(storage="s", ttl=timedelta(minutes=5)),
        )
        node.delay = 0.2
        getter = asyncio.ensure_future(cacheme.get(node(1)))
        await asyncio.sleep(0.1)
        await cacheme.register_storage("s", cacheme.Storage(table.url, **options))
        with pytest.raises(cacheme.StorageError, match="'s'"):
            await bounded(getter)
        node.delay = 0.0
        assert await bounded(cacheme.get(node(1)), 3) == value_of(1)
        await bounded(cacheme.invalidate(node(1)), 3)
        assert await bounded(
            asyncio.gather(cacheme.get_all([node(1), node(3)]), cacheme.get(node(4))), 3
        ) == [[value_of(1), value_of(3)], value_of(4)]
        await cacheme.close_storages()


@pytest.mark.redis
async def test_close_storages_during_a_lone_callers_connect(redis_server: RedisServer) -> None:
    """In a loop of another thread the storage connects at its first operation, here a lone
    get's own read; close_storages() then cancels that connect: the caller was not
    cancelled, so it fails open and gets its value."""
    url = redis_server.url()
    await cacheme.register_storage("r", cacheme.Storage(url, timeout=3))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))

    async def in_thread_loop() -> tuple[Any, Any]:
        busy = await _busy_for(url, 600)  # the connect's PING waits
        getter = asyncio.ensure_future(cacheme.get(node(1)))
        batch = asyncio.ensure_future(cacheme.get_all([node(2), node(3)]))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(cacheme.close_storages(), 5)
        results = await asyncio.wait_for(asyncio.gather(getter, batch, return_exceptions=True), 5)
        await busy
        return results[0], results[1]

    got, batch = await asyncio.to_thread(asyncio.run, in_thread_loop())
    assert got == value_of(1)
    assert batch == [value_of(2), value_of(3)]


@pytest.mark.redis
async def test_close_storages_as_a_storage_timeout_fires(redis_server: RedisServer) -> None:
    """close_storages() in the very turn a lone get's storage timeout fired (the loop was
    busy past both): the expiring deadline is left to fail on its own; the close completes."""
    url = redis_server.url()
    await cacheme.register_storage("r", cacheme.Storage(url, timeout=0.2))
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    assert await bounded(cacheme.get(node(0))) == value_of(0)
    busy = await _busy_for(url, 1000)
    getter = asyncio.ensure_future(cacheme.get(node(1)))
    await asyncio.sleep(0)  # its read is sent; its deadline is 0.2 s away

    async def close_at_the_deadline() -> None:
        await asyncio.sleep(0.19)
        await cacheme.close_storages()

    closer = asyncio.ensure_future(close_at_the_deadline())
    asyncio.get_running_loop().call_later(0.1, time.sleep, 0.2)  # busy across both timers
    await bounded(closer)
    assert await bounded(getter) == value_of(1)
    assert not cacheme.storages()
    await busy


@pytest.mark.redis
async def test_a_cancelled_half_open_trial_lets_the_next_call_try(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url()
    await cacheme.register_storage(
        "r", cacheme.Storage(url, timeout=0.2, breaker_threshold=2, breaker_cooldown=0.3)
    )
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    storage = remote("r")
    assert await bounded(cacheme.get_all([node(i) for i in range(3)])) == [
        value_of(i) for i in range(3)
    ]
    busy = await _busy_for(url, 600)
    assert await bounded(cacheme.get(node(0))) == value_of(0)  # timed out: fail-open load
    assert await bounded(cacheme.get(node(1))) == value_of(1)
    assert storage.breaker_open
    await busy
    await asyncio.sleep(0.35)  # the cooldown is over: the next call is the trial
    busy = await _busy_for(url, 80)
    trial = asyncio.ensure_future(cacheme.get(node(2)))
    await asyncio.sleep(0.01)
    trial.cancel()  # the trial's caller gives up before the (healthy) server answers
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert not storage.breaker_open, "a cancelled trial kept the breaker open"
    await busy
    hits = cacheme.stats(node).hits
    assert await bounded(cacheme.get(node(2))) == value_of(2)
    assert cacheme.stats(node).hits == hits + 1  # served by Redis: the breaker closed


@pytest.mark.redis
async def test_a_cancelled_trial_leaves_a_breaker_another_call_closed(shared_redis: str) -> None:
    """An operation begun before the breaker opened succeeds while the half-open trial runs
    (it closes the breaker); the trial's caller then gives up: the breaker stays closed."""
    await cacheme.register_storage(
        "r", cacheme.Storage(shared_redis, timeout=2, breaker_threshold=1, breaker_cooldown=0.1)
    )
    driver = _driver("r")
    release = asyncio.Event()

    async def slow_but_fine(keys: Any) -> dict[str, bytes]:
        await release.wait()
        return {}

    async def refused(keys: Any) -> dict[str, bytes]:
        raise ConnectionError("refused")

    async def never(keys: Any) -> dict[str, bytes]:
        await asyncio.sleep(30)
        return {}

    old = asyncio.ensure_future(driver._call(slow_but_fine, ["k"], 1, "read"))
    await asyncio.sleep(0)
    with pytest.raises(cacheme.StorageError):
        await driver._call(refused, ["k"], 1, "read")
    assert remote("r").breaker_open
    await asyncio.sleep(0.15)  # the cooldown is over: the next call is the trial
    trial = asyncio.ensure_future(driver._call(never, ["k"], 1, "read"))
    await asyncio.sleep(0)
    release.set()
    await bounded(old)  # a success: the breaker closes
    assert not remote("r").breaker_open
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert driver._breaker.open_until == 0.0, "the cancelled trial reopened a closed breaker"
    node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
    assert await bounded(asyncio.gather(cacheme.get(node(2)), cacheme.get(node(3)))) == [
        value_of(2),
        value_of(3),
    ]
    assert remote("r").stats.rejected == 0


@pytest.mark.redis
async def test_a_trial_cancelled_while_connecting_lets_the_next_call_try(
    tmp_path: Path,
) -> None:
    """Registered while the server hung (fail-open: the breaker opens); after the cooldown
    the trial is the driver's connect, and its caller gives up during it."""
    async with real_server("redis", tmp_path) as (url, port, _), Proxy(port) as proxy:
        proxy.hang()
        await cacheme.register_storage(
            "r",
            cacheme.Storage(with_port(url, proxy.port), timeout=0.3, breaker_cooldown=0.2),
        )
        storage = remote("r")
        assert storage.breaker_open
        await asyncio.sleep(0.25)
        node = item_class(cacheme.Cache(storage="r", ttl=timedelta(minutes=5)))
        trial = asyncio.ensure_future(cacheme.get(node(1)))
        await asyncio.sleep(0.05)  # connecting, through the hung proxy
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        assert not storage.breaker_open, "a cancelled connect trial kept the breaker open"
        await runtime.current().quiesce(2)  # the shared connect attempt gives up
        proxy.resume()
        rejected = storage.stats.rejected
        assert await bounded(cacheme.get(node(2))) == value_of(2)
        assert storage.stats.rejected == rejected  # tried, not skipped


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "gets in flight"])
async def test_close_storages_on_a_black_holed_network_ends_within_the_timeout(
    backend: str, in_flight: bool, tmp_path: Path
) -> None:
    """close_storages() while the network swallows every byte: a client that talks to the
    server while closing (pymongo ends its sessions) must not hold it for long, and gets
    under way end with it, whichever step they are in (found by a review: MongoDB's close
    took 10 s, and on Python 3.11 a batch in redis-py's send step kept close waiting four
    timeouts)."""
    timeout = 0.3
    async with real_server(backend, tmp_path) as (url, port, options), Proxy(port) as proxy:
        for turns in (1, 3, 5, 7, 8, 9) if in_flight else (0,):
            proxy.resume()
            await cacheme.register_storage(
                "closing",
                cacheme.Storage(with_port(url, proxy.port), timeout=timeout, **options),
            )
            node = item_class(cacheme.Cache(storage="closing", ttl=timedelta(minutes=5)))
            node.delay = 0.0
            assert await bounded(cacheme.get(node(0))) == value_of(0)
            proxy.hang()
            gets = [asyncio.ensure_future(cacheme.get(node(i))) for i in range(1, 4) if in_flight]
            for _ in range(turns):
                await asyncio.sleep(0)
            started = time.monotonic()
            await bounded(cacheme.close_storages(), 10 * timeout)  # closed, or dropped
            took = time.monotonic() - started
            assert took < timeout + MARGIN, f"close took {took:.2f}s after {turns} turns"
            if gets:
                done, _ = await asyncio.wait(gets, timeout=2 * timeout + MARGIN)
                assert len(done) == len(gets), f"a get outlived close after {turns} turns"
            for get in gets:
                # a value (loaded, fail-open) or the closed storage's error, never a hang
                error = None if get.cancelled() else get.exception()
                assert error is None or isinstance(error, cacheme.StorageError), error
            proxy.drop()


def _variant(url: str, *, path: str | None = None, user: str | None = None) -> str:
    """``url`` with another database path or user (and no password with a new user)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc, path=parts.path if path is None else path))


MISCONFIGURED = {
    "redis: database out of range": (REDIS_URL, _variant(REDIS_URL, path="/16")),
    "postgres: no such database": (POSTGRES_URL, _variant(POSTGRES_URL, path="/cacheme_none")),
    "postgres: no such role": (POSTGRES_URL, _variant(POSTGRES_URL, user="cacheme_no_role")),
    "mysql: no such database": (MYSQL_URL, _variant(MYSQL_URL, path="/cacheme_none")),
    "mysql: wrong password": (MYSQL_URL, _variant(MYSQL_URL, user="cacheme:wrong")),
    "postgres: unknown URL setting": (POSTGRES_URL, POSTGRES_URL + "?statment_timeout=1000"),
}


@pytest.mark.parametrize("case", sorted(MISCONFIGURED))
async def test_a_server_refusing_the_settings_is_not_registered_even_failing_open(
    case: str,
) -> None:
    """Waiting would not help: the error is raised though the storage fails open."""
    good, bad = MISCONFIGURED[case]
    try:
        await cacheme.register_storage("probe", cacheme.Storage(good, fail_open=False))
    except cacheme.StorageMisconfiguredError:
        pass  # the server answered (its default cache table may not exist yet): reachable
    except cacheme.StorageError as exc:
        unavailable(case.split(":")[0], good, exc)
    finally:
        await cacheme.close_storages()
    with pytest.raises(cacheme.StorageMisconfiguredError, match=r"'refused'.*cannot connect"):
        await cacheme.register_storage("refused", cacheme.Storage(bad))
    assert "refused" not in cacheme.storages()
    assert isinstance(cacheme.StorageMisconfiguredError("x"), cacheme.ConfigurationError)


# Query options the driver does not know, or values it refuses, found before any server is
# contacted (pymongo itself only warns about an unknown option and ignores it).
REFUSED_URL_OPTIONS = {
    "mongo: misspelt option": (f"{MONGO_URL}?maxPoolSzie=5", "'maxPoolSzie'"),
    "mongo: unknown option": (f"{MONGO_URL}?foo=1", "'foo'"),
    "mongo: bad value": (f"{MONGO_URL}?maxPoolSize=many", "'maxPoolSize'"),
    "mongo: one bad of two": (f"{MONGO_URL}?maxPoolSize=5&retryWirtes=true", "'retryWirtes'"),
    "mysql: misspelt option": (f"{MYSQL_URL}?conect_timeout=1", "'conect_timeout'"),
    "sqlite: any option": ("sqlite:///cacheme-refused.db?journal=wal", "no URL query"),
    # redis-py handed it to the connection, which refused it only when connecting
    "redis: misspelt option": (REDIS_URL + "?socket_timeot=1", "'socket_timeot'"),
    "redis cluster: unknown option": (REDIS_CLUSTER_URL + "?foo=1", "'foo' for a Redis Cluster"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_URL_OPTIONS))
async def test_a_url_query_option_the_driver_refuses_is_not_registered(case: str) -> None:
    """Found by a review: a misspelt MongoDB option was registered silently."""
    url, named = REFUSED_URL_OPTIONS[case]
    cluster = {"cluster": True} if case.startswith("redis cluster") else {}
    with pytest.raises(cacheme.StorageMisconfiguredError, match=named):
        await cacheme.register_storage("refused", cacheme.Storage(url, **cluster))
    assert "refused" not in cacheme.storages()
    assert not Path("cacheme-refused.db").exists()  # noqa: ASYNC240 - no file was made


async def test_a_sql_storage_without_its_table_is_not_registered_even_failing_open(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/empty.db"
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(cacheme.StorageMisconfiguredError, match=r"table 'cacheme_data'.*sql/"):
        await cacheme.register_storage("tableless", cacheme.Storage(url))
    assert "tableless" not in cacheme.storages()
