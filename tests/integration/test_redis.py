"""Redis-specific behaviour, against the real server and the real cluster.

Start them with ``redis-server`` (port 6379) and ``scripts/services/redis-cluster.sh start``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.crc import key_slot

from cacheme.errors import ConfigurationError, StorageError
from cacheme.storages.base import Entry, RemoteStorage
from cacheme.storages.redis import RedisStorage
from cacheme.storages.registry import Storage

from .backend_redis import cluster_url, open_redis, redis_url

Remote = RemoteStorage[Any]

redis_only = pytest.mark.redis
cluster_only = pytest.mark.redis_cluster


@pytest.fixture
async def standalone() -> AsyncIterator[Remote]:
    async with open_redis("test-redis") as storage:
        yield storage


@pytest.fixture
async def cluster() -> AsyncIterator[Remote]:
    async with open_redis("test-redis-cluster", cluster=True) as storage:
        yield storage


def _as_redis(storage: Remote) -> RedisStorage:
    assert isinstance(storage, RedisStorage)
    return storage


# -- TTL precision ------------------------------------------------------------------------


@redis_only
async def test_sub_second_ttl_is_milliseconds(standalone: Remote) -> None:
    await standalone.set_many([Entry("cacheme:pttl:v1", b"x", 300)])
    client = redis.asyncio.Redis.from_url(redis_url())
    try:
        pttl = await client.pttl("cacheme:pttl:v1")
    finally:
        await client.aclose()
    assert 0 < pttl <= 300


@cluster_only
async def test_sub_second_ttl_on_cluster(cluster: Remote) -> None:
    # 9,999 ms: a TTL cut to whole seconds would leave at most 9,000 (and a busy machine has
    # almost a second before the check, where 300 ms could run out).
    await cluster.set_many(
        [Entry("cacheme:pttl:v1", b"x", 9_999), Entry("cacheme:n:v1", b"y", None)]
    )
    client = RedisCluster.from_url(cluster_url())
    try:
        pttl = await client.pttl("cacheme:pttl:v1")
        no_ttl = await client.pttl("cacheme:n:v1")
    finally:
        await client.aclose()
    assert 9_000 < pttl <= 9_999
    assert no_ttl == -1  # SET without PX: no expiry


# -- the cluster: many slots, many nodes, one call -----------------------------------------


@cluster_only
async def test_cluster_batch_across_many_slots(cluster: Remote) -> None:
    entries = [Entry(f"cacheme:slots:{i}:v1", f"v{i}".encode(), 60_000) for i in range(100)]
    slots = {key_slot(e.key.encode()) for e in entries}
    assert len(slots) > 90  # the keys really are spread out
    client = _as_redis(cluster)._cluster
    assert client is not None
    nodes = {client.nodes_manager.get_node_from_slot(s).name for s in slots}
    assert len(nodes) == 3  # and over every primary

    await cluster.set_many(entries)
    before = cluster.stats.round_trips
    found = await cluster.get_many([e.key for e in entries] + ["cacheme:absent:v1"])
    assert cluster.stats.round_trips == before + 1
    assert found == {e.key: e.value for e in entries}

    await cluster.remove_many([e.key for e in entries[::2]])
    found = await cluster.get_many([e.key for e in entries])
    assert found == {e.key: e.value for e in entries[1::2]}


@cluster_only
async def test_cluster_hash_tags_and_unicode(cluster: Remote) -> None:
    keys = ["cacheme:{user}:1:v1", "cacheme:{user}:2:v1", "cacheme:用户:v1", "cacheme:🙂:v1"]
    await cluster.set_many([Entry(k, k.encode(), None) for k in keys])
    assert await cluster.get_many(keys) == {k: k.encode() for k in keys}


@cluster_only
async def test_cluster_option_against_cluster_url(cluster: Remote) -> None:
    storage = _as_redis(cluster)
    assert storage.options.cluster is True
    assert storage._cluster is not None and storage._client is None
    await cluster.set_many([Entry("cacheme:c:v1", b"\x00\xff", 60_000)])
    assert await cluster.get("cacheme:c:v1") == b"\x00\xff"


@cluster_only
async def test_cluster_rejects_a_database_number() -> None:
    with pytest.raises(ConfigurationError, match="only database 0"):
        Storage("redis://127.0.0.1:7000/3", cluster=True).build("bad")


# -- the pool -------------------------------------------------------------------------------


@redis_only
async def test_pool_size_reaches_the_pool() -> None:
    async with open_redis("pool", pool_size=7) as storage:
        client = _as_redis(storage)._client
        assert client is not None
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.max_connections == 7


@redis_only
async def test_burst_waits_for_a_connection() -> None:
    # Uncoalesced, 200 concurrent reads over 2 connections: they queue, none fails.
    async with open_redis("burst", pool_size=2, coalesce=False) as storage:
        await storage.set_many([Entry("cacheme:burst:v1", b"b", None)])
        results = await asyncio.gather(*(storage.get("cacheme:burst:v1") for _ in range(200)))
        assert results == [b"b"] * 200
        client = _as_redis(storage)._client
        assert client is not None
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 2
        assert storage.stats.errors == storage.stats.timeouts == 0


@cluster_only
async def test_pool_size_reaches_every_cluster_node() -> None:
    async with open_redis("cpool", cluster=True, pool_size=3, coalesce=False) as storage:
        client = _as_redis(storage)._cluster
        assert client is not None
        assert {node.max_connections for node in client.get_nodes()} == {3}
        # A burst larger than the per-node pool waits instead of raising
        # MaxConnectionsError, and never opens more than pool_size per node.
        keys = [f"cacheme:cburst:{i}:v1" for i in range(50)]
        await storage.set_many([Entry(k, b"z", None) for k in keys])
        results = await asyncio.gather(*(storage.get_many(keys) for _ in range(100)))
        assert all(r == dict.fromkeys(keys, b"z") for r in results)
        assert storage.stats.errors == storage.stats.timeouts == 0
        assert max(len(node._connections) for node in client.get_nodes()) <= 3


# -- bytes in, bytes out --------------------------------------------------------------------


@redis_only
async def test_values_stay_bytes_even_if_the_url_asks_to_decode() -> None:
    url = redis_url() + ("&" if "?" in redis_url() else "?") + "decode_responses=True"
    async with open_redis("decode", url=url) as storage:
        await storage.set_many([Entry("cacheme:text:v1", b"plain", None)])
        assert await storage.get("cacheme:text:v1") == b"plain"


@redis_only
async def test_url_query_parameters_redis_takes_reach_the_server() -> None:
    # The check of query names (an unknown one is refused at registration) keeps those
    # redis-py takes: the connection carries the client name the URL gives.
    url = redis_url() + ("&" if "?" in redis_url() else "?") + "client_name=fix53-query"
    async with open_redis("query", url=url) as storage:
        await storage.set_many([Entry("cacheme:query:v1", b"x", None)])
        assert await storage.get("cacheme:query:v1") == b"x"
        client = storage.here()._standalone()
        names = [c["name"] for c in await client.client_list()]
        assert "fix53-query" in names


# -- the password stays secret ---------------------------------------------------------------


def _chain_text(exc: BaseException | None) -> str:
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc} {exc.args!r}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


@redis_only
@pytest.mark.parametrize("cluster", [False, True])
async def test_password_not_in_repr_or_errors_when_unreachable(cluster: bool) -> None:
    storage = Storage("redis://user:s3cret@127.0.0.1:1/0", cluster=cluster, timeout=0.5).build(
        "secret"
    )
    assert "s3cret" not in repr(storage)
    assert "s3cret" not in repr(Storage("redis://user:s3cret@127.0.0.1:1/0"))
    with pytest.raises(StorageError) as info:
        await storage.connect()
    assert "s3cret" not in str(info.value)
    assert "***" in str(info.value) or "127.0.0.1:1" in str(info.value)
    await storage.close()


@redis_only
async def test_password_not_in_errors_when_rejected() -> None:
    # A real server refusing the credentials (WRONGPASS).
    parts = redis_url().split("://", 1)
    url = f"{parts[0]}://cacheme-nobody:s3cret@{parts[1].split('@')[-1]}"
    storage = Storage(url, timeout=1).build("wrongpass")
    with pytest.raises(StorageError) as info:
        await storage.connect()
    assert "s3cret" not in _chain_text(info.value)
    assert "s3cret" not in repr(storage)
    await storage.close()


# -- the test factories themselves -----------------------------------------------------------


async def _test_keys_left(cluster: bool) -> list[bytes]:
    client: redis.asyncio.Redis | RedisCluster
    if cluster:
        client = RedisCluster.from_url(cluster_url())
    else:
        client = redis.asyncio.Redis.from_url(redis_url())
    try:
        return [k async for k in client.scan_iter(match="cacheme:*")]
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "cluster", [pytest.param(False, marks=redis_only), pytest.param(True, marks=cluster_only)]
)
async def test_factory_leaves_no_test_keys(cluster: bool) -> None:
    keys = [f"cacheme:leftover:{i}:v1" for i in range(50)]  # over many slots / every node
    async with open_redis("leftover", cluster=cluster) as storage:
        await storage.set_many([Entry(k, b"x", None) for k in keys])
        assert len(await storage.get_many(keys)) == 50
    assert await _test_keys_left(cluster) == []


@pytest.mark.redis
async def test_coalesced_reads_respect_batch_size_on_a_real_server() -> None:
    async with open_redis("bounded", batch_size=10) as storage:
        before = storage.stats.round_trips
        values = await asyncio.gather(*(storage.get(f"cacheme:bound:{i}:v1") for i in range(25)))
        assert values == [None] * 25
        assert storage.stats.round_trips - before == 3  # 10 + 10 + 5 keys


# -- a key of another Redis type ------------------------------------------------------------


@redis_only
@pytest.mark.parametrize("keys", [1, 2], ids=["lone GET", "MGET"])
async def test_a_key_of_another_type_reads_as_absent(standalone: Remote, keys: int) -> None:
    # A hash another application left under a cache key: MGET answers nil for it, and the
    # one-key read (a GET, which answers WRONGTYPE) must do the same: a miss, not an error.
    names = [f"cacheme:wrongtype:{i}:v1" for i in range(keys)]
    client = redis.asyncio.Redis.from_url(redis_url())
    try:
        for name in names:
            await client.delete(name)
            await client.hset(name, "field", "value")
        errors = standalone.stats.errors
        assert await standalone.get_many(names) == {}
        assert standalone.stats.errors == errors
        await standalone.set_many([Entry(names[0], b"x", 60_000)])
        assert await standalone.get_many(names[:1]) == {names[0]: b"x"}
    finally:
        await client.delete(*names)
        await client.aclose()
