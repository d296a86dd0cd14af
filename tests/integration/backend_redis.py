"""Test factories for the Redis tiers: ``redis`` (standalone) and ``redis_cluster``.

Which database: unless ``REDIS_URL`` is set, the standalone tests use database 15 of the
local server (not the usual 0), so a developer's own data in db 0 is out of the way. Either
way, emptying a storage for a test deletes only the keys matching ``cacheme:*`` (SCAN +
UNLINK), never FLUSHDB, so pointing REDIS_URL at a shared server cannot wipe anything else.
The cluster (``scripts/services/redis-cluster.sh start``) is emptied the same way, on every
primary. Keys are removed before the test and again after it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from cacheme.errors import StorageError
from cacheme.storages.base import RemoteStorage
from cacheme.storages.registry import Storage

from ..services import REDIS_CLUSTER_URL, REDIS_URL, unavailable
from .backends import factory

TEST_KEYS = "cacheme:*"


def redis_url() -> str:
    """The standalone server for the tests: REDIS_URL if set, else db 15 on localhost."""
    if "REDIS_URL" in os.environ:
        return REDIS_URL
    return "redis://127.0.0.1:6379/15"


def cluster_url() -> str:
    return REDIS_CLUSTER_URL


async def clear_standalone(url: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=TEST_KEYS, count=1000)]
        for i in range(0, len(keys), 1000):
            await client.unlink(*keys[i : i + 1000])
    finally:
        await client.aclose()


async def clear_cluster(url: str) -> None:
    client = RedisCluster.from_url(url)
    try:
        # The cluster's scan_iter walks every primary, each with its own cursor.
        keys = [k async for k in client.scan_iter(match=TEST_KEYS, count=1000)]
        for i in range(0, len(keys), 1000):
            await client.unlink(*keys[i : i + 1000])
    finally:
        await client.aclose()


@asynccontextmanager
async def open_redis(
    name: str, *, cluster: bool = False, url: str | None = None, **options: Any
) -> AsyncIterator[RemoteStorage[Any]]:
    """A connected Redis storage with no ``cacheme:*`` keys; skips if the server is down."""
    if url is None:
        url = cluster_url() if cluster else redis_url()
    if cluster:
        options["cluster"] = True
    storage = Storage(url, **options).build(name)
    assert isinstance(storage, RemoteStorage)
    try:
        await storage.connect()
    except StorageError as exc:
        unavailable("Redis Cluster" if cluster else "Redis", url, exc)
    clear = clear_cluster if cluster else clear_standalone
    try:
        await clear(url)
        yield storage
        await clear(url)
    finally:
        await storage.close()


@factory("redis")
def _redis(
    tmp_path: Path, name: str, **options: Any
) -> AbstractAsyncContextManager[RemoteStorage[Any]]:
    return open_redis(name, **options)


@factory("redis_cluster")
def _redis_cluster(
    tmp_path: Path, name: str, **options: Any
) -> AbstractAsyncContextManager[RemoteStorage[Any]]:
    return open_redis(name, cluster=True, **options)
