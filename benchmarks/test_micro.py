"""Micro benchmarks: cacheme's overhead over the bare libraries it sits on.

    pytest benchmarks/test_micro.py --benchmark-only

Not part of the normal test run (``testpaths = ["tests"]``); no timing assertions. The ratios
(cacheme / bare) are printed at the end by ``conftest.py`` (see ``micro_report.py``).

- local hit: ``cacheme.get(node)`` answered by a ``local://tlfu`` tier vs theine's
  ``Cache.get`` of the same key. A local hit never suspends, so the coroutine is driven by
  hand (``send(None)``): no event-loop cost on either side.
- Redis hit: ``cacheme.get(node)`` with ``[redis]`` (value decoded) vs ``await client.get(key)``
  on a redis-py client with the same blocking pool of 100 (bytes, not decoded).
- ``get_all`` of 20 keys on Redis vs one bare ``MGET`` of the same 20 keys.
- a miss that loads: a new key each call, ``[redis]`` tier, ``load()`` returns at once, vs a
  bare ``GET`` (miss) then ``SET``.

The async ones run ``OPS`` sequential operations per round inside one ``run_until_complete``;
their times are per round and the report divides by ``OPS``. Redis: ``CACHEME_BENCH_REDIS``
(default ``redis://127.0.0.1:6379/14``, flushed first); skipped when unreachable.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import cacheme
from cacheme.serializer import MsgPackSerializer

OPS = 100  # sequential async operations per benchmark round
REDIS_URL = os.environ.get("CACHEME_BENCH_REDIS", "redis://127.0.0.1:6379/14")
VALUE = {"id": 1, "name": "user 1", "tags": ["a", "b"]}


@dataclass
class LocalNode(cacheme.Node):
    uid: int

    def key(self) -> str:
        return f"micro:{self.uid}"

    async def load(self) -> dict[str, Any]:
        return VALUE

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [cacheme.Cache(storage="micro-local")]


@dataclass
class RedisNode(cacheme.Node):
    uid: int

    def key(self) -> str:
        return f"micro:{self.uid}"

    async def load(self) -> dict[str, Any]:
        return VALUE

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [cacheme.Cache(storage="micro-redis")]
        serializer = MsgPackSerializer()


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that must not suspend (a local hit) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the coroutine suspended: not a local hit")


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(cacheme.close_storages())
    loop.close()


@pytest.fixture(scope="module")
def local(loop: asyncio.AbstractEventLoop) -> str:
    loop.run_until_complete(
        cacheme.register_storage("micro-local", cacheme.Storage(url="local://tlfu", size=10_000))
    )
    loop.run_until_complete(cacheme.get(LocalNode(1)))  # now a hit
    return "micro-local"


@pytest.fixture(scope="module")
def redis_client(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    redis_asyncio = pytest.importorskip("redis.asyncio")
    from redis.asyncio import BlockingConnectionPool

    pool = BlockingConnectionPool.from_url(REDIS_URL, max_connections=100, timeout=None)
    client = redis_asyncio.Redis.from_pool(pool)
    try:
        loop.run_until_complete(client.ping())
    except Exception as exc:
        loop.run_until_complete(client.aclose())
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    loop.run_until_complete(client.flushdb())
    loop.run_until_complete(
        cacheme.register_storage("micro-redis", cacheme.Storage(url=REDIS_URL, pool_size=100))
    )
    # Warm: the 20 nodes exist in Redis; pooled connections are open on both sides.
    loop.run_until_complete(cacheme.get_all([RedisNode(i) for i in range(20)]))
    for i in range(20):
        loop.run_until_complete(client.set(f"bare:{i}", MsgPackSerializer().dumps(VALUE)))
    yield client
    loop.run_until_complete(client.aclose())


# -- local hit ------------------------------------------------------------------------------


def test_local_hit_cacheme(benchmark: Any, local: str) -> None:
    node = LocalNode(1)
    get = cacheme.get
    assert benchmark(lambda: drive(get(node))) == VALUE


def test_local_hit_cacheme_new_node(benchmark: Any, local: str) -> None:
    get = cacheme.get
    assert benchmark(lambda: drive(get(LocalNode(1)))) == VALUE


def test_local_hit_theine(benchmark: Any, local: str) -> None:
    from theine import Cache

    cache: Cache[str, Any] = Cache(10_000)
    key = "cacheme:micro:1:v1"
    cache.set(key, VALUE)
    value, found = benchmark(cache.get, key)
    assert found and value == VALUE


# -- Redis hit ------------------------------------------------------------------------------


def test_redis_hit_cacheme(
    benchmark: Any, loop: asyncio.AbstractEventLoop, redis_client: Any
) -> None:
    node = RedisNode(1)
    get = cacheme.get

    async def ops() -> Any:
        for _ in range(OPS):
            value = await get(node)
        return value

    benchmark.extra_info["ops_per_round"] = OPS
    assert benchmark.pedantic(lambda: loop.run_until_complete(ops()), rounds=200) == VALUE


def test_redis_hit_bare(benchmark: Any, loop: asyncio.AbstractEventLoop, redis_client: Any) -> None:
    get = redis_client.get

    async def ops() -> Any:
        for _ in range(OPS):
            value = await get("bare:1")
        return value

    benchmark.extra_info["ops_per_round"] = OPS
    assert benchmark.pedantic(lambda: loop.run_until_complete(ops()), rounds=200)


# -- get_all of 20 on Redis ---------------------------------------------------------------------


def test_redis_get_all20_cacheme(
    benchmark: Any, loop: asyncio.AbstractEventLoop, redis_client: Any
) -> None:
    nodes = [RedisNode(i) for i in range(20)]
    get_all = cacheme.get_all

    async def ops() -> Any:
        for _ in range(OPS):
            values = await get_all(nodes)
        return values

    benchmark.extra_info["ops_per_round"] = OPS
    assert benchmark.pedantic(lambda: loop.run_until_complete(ops()), rounds=50) == [VALUE] * 20


def test_redis_get_all20_bare(
    benchmark: Any, loop: asyncio.AbstractEventLoop, redis_client: Any
) -> None:
    keys = [f"bare:{i}" for i in range(20)]
    mget = redis_client.mget

    async def ops() -> Any:
        for _ in range(OPS):
            values = await mget(keys)
        return values

    benchmark.extra_info["ops_per_round"] = OPS
    assert len(benchmark.pedantic(lambda: loop.run_until_complete(ops()), rounds=50)) == 20


# -- a miss that loads ------------------------------------------------------------------------

_fresh = itertools.count(1_000_000)


def test_redis_miss_load_cacheme(
    benchmark: Any, loop: asyncio.AbstractEventLoop, redis_client: Any
) -> None:
    get = cacheme.get

    async def ops() -> Any:
        for _ in range(OPS):
            value = await get(RedisNode(next(_fresh)))
        return value

    benchmark.extra_info["ops_per_round"] = OPS
    assert benchmark.pedantic(lambda: loop.run_until_complete(ops()), rounds=50) == VALUE


def test_redis_miss_load_bare(
    benchmark: Any, loop: asyncio.AbstractEventLoop, redis_client: Any
) -> None:
    dumps = MsgPackSerializer().dumps

    async def load() -> Any:
        return VALUE

    async def ops() -> Any:
        for _ in range(OPS):
            key = f"bare:{next(_fresh)}"
            value = await redis_client.get(key)
            if value is None:
                value = await load()
                await redis_client.set(key, dumps(value))
        return value

    benchmark.extra_info["ops_per_round"] = OPS
    assert benchmark.pedantic(lambda: loop.run_until_complete(ops()), rounds=50) == VALUE
