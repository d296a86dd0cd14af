"""One adapter per benchmarked framework configuration.

Each adapter wires a framework to the same Redis (a blocking connection pool of 100
connections), the same key names ``uid:{n}`` and the same load function (given by the harness:
it counts its calls and sleeps), and exposes ``get(n)`` (and ``get_all([n, ...])`` for the
batch workload). Framework imports happen inside ``setup`` only, because each adapter runs in
its own interpreter: ours in the repo's venv, the peers in ``benchmarks/.venv-peers``, the
original cacheme 0.3.0 in ``benchmarks/.venv-original`` (it shares our import name). The
references (``floor``: no Redis at all; ``lean``: ``lean.py``) are written for the benchmark.

Standard library only at import time.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Load = Callable[[int], Awaitable[int]]


@dataclass
class Context:
    load: Load  # the counted, sleeping load function
    redis_url: str  # redis://host:port/db
    sqlite_path: str  # embedded runs only
    pool_size: int = 100
    local_size: int = 3000


class Adapter:
    """A framework configuration under test."""

    name: str = ""
    label: str = ""  # as shown in tables
    package: str = ""  # distribution whose version is reported
    env: str = "ours"  # ours | peers | original
    backend: str = "redis"  # redis | sqlite | memory (no storage: runs in either mode)
    batch: bool = False  # runs the get_all workload

    async def setup(self, ctx: Context) -> None:
        raise NotImplementedError

    async def get(self, n: int) -> Any:
        raise NotImplementedError

    async def get_all(self, ns: list[int]) -> list[Any]:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Framework-side counters worth reporting (optional)."""
        return {}

    async def close(self) -> None:
        pass

    def version(self) -> str:
        return importlib.metadata.version(self.package)


# -- cacheme (this repository) ------------------------------------------------------------


class Cacheme(Adapter):
    package = "cacheme"
    env = "ours"
    chain: tuple[str, ...] = ("redis",)

    def version(self) -> str:
        import cacheme

        root = os.path.dirname(os.path.dirname(os.path.abspath(cacheme.__file__)))
        try:
            return importlib.metadata.version("cacheme") + " (this repo)"
        except importlib.metadata.PackageNotFoundError:
            pass
        import tomllib

        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            return str(tomllib.load(f)["project"]["version"]) + " (this repo)"

    async def setup(self, ctx: Context) -> None:
        from dataclasses import dataclass as _dataclass

        import cacheme
        from cacheme.serializer import MsgPackSerializer

        for tier in self.chain:
            if tier == "local":
                await cacheme.register_storage(
                    "local", cacheme.Storage(url="local://tlfu", size=ctx.local_size)
                )
            elif tier == "redis":
                await cacheme.register_storage(
                    "redis", cacheme.Storage(url=ctx.redis_url, pool_size=ctx.pool_size)
                )
            elif tier == "sqlite":
                await cacheme.register_storage(
                    "sqlite",
                    cacheme.Storage(url=f"sqlite:///{ctx.sqlite_path}", table="cacheme_data"),
                )
        tiers = [cacheme.Cache(storage=t, ttl=None) for t in self.chain]
        load = ctx.load

        @_dataclass
        class TraceNode(cacheme.Node):
            uid: int

            def key(self) -> str:
                return f"uid:{self.uid}"

            async def load(self) -> int:
                return await load(self.uid)

            class Meta(cacheme.Node.Meta):
                version = "v1"
                caches = tiers
                serializer = MsgPackSerializer()

        self._node = TraceNode
        self._get = cacheme.get
        self._get_all = cacheme.get_all
        self._cacheme = cacheme

    async def get(self, n: int) -> Any:
        return await self._get(self._node(n))

    async def get_all(self, ns: list[int]) -> list[Any]:
        node = self._node
        return await self._get_all([node(n) for n in ns])

    def stats(self) -> dict[str, Any]:
        """The node's counters and each storage's, as cacheme reports them."""
        import dataclasses

        snap = self._cacheme.stats(self._node)
        out: dict[str, Any] = {}
        if dataclasses.is_dataclass(snap):
            out.update(dataclasses.asdict(snap))
        for name, storage in self._cacheme.storages().items():
            st = getattr(storage, "stats", None)
            if dataclasses.is_dataclass(st):
                for field, value in dataclasses.asdict(st).items():
                    out[f"{name}_{field}"] = value
        return out

    async def close(self) -> None:
        await self._cacheme.close_storages()


class CachemeRedis(Cacheme):
    name = "cacheme"
    label = "cacheme [redis]"
    chain = ("redis",)


class CachemeLocalRedis(Cacheme):
    name = "cacheme-local"
    label = "cacheme [local tlfu 3000, redis]"
    chain = ("local", "redis")


class CachemeRedisBatch(Cacheme):
    name = "cacheme-batch"
    label = "cacheme [redis] get_all x20"
    chain = ("redis",)
    batch = True


class CachemeSQLite(Cacheme):
    name = "cacheme-sqlite"
    label = "cacheme [sqlite]"
    chain = ("sqlite",)
    backend = "sqlite"


class CachemeLocalSQLite(Cacheme):
    name = "cacheme-local-sqlite"
    label = "cacheme [local tlfu 3000, sqlite]"
    chain = ("local", "sqlite")
    backend = "sqlite"


class CachemeSQLiteBatch(Cacheme):
    name = "cacheme-sqlite-batch"
    label = "cacheme [local tlfu 3000, sqlite] get_all x20"
    chain = ("local", "sqlite")
    backend = "sqlite"
    batch = True


# -- references: the floor (no framework, no Redis) and a lean Redis cache --------------------


class Floor(Adapter):
    """The ideal in-process cache: a dict of values plus one future per key being loaded.

    The first caller of a key creates its future and runs the load in its own coroutine;
    the others await that future. No Redis, no serializer: the least time and CPU any cache
    framework can take on this workload (the benchmark's own work, the loads' sleeps).
    """

    name = "floor"
    label = "floor [dict + future per key]"
    env = "ours"
    backend = "memory"  # no server: runs with and without --embedded

    def version(self) -> str:
        return "reference"

    async def setup(self, ctx: Context) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._load = ctx.load
        self._values: dict[str, Any] = {}
        self._flights: dict[str, Any] = {}  # key -> asyncio.Future
        self._tasks: set[Any] = set()

    async def get(self, n: int) -> Any:
        key = f"uid:{n}"
        try:
            return self._values[key]
        except KeyError:
            pass
        fut = self._flights.get(key)
        if fut is not None:
            return await fut
        fut = self._flights[key] = self._loop.create_future()
        await self._fill(key, n, fut)
        return fut.result()

    async def _fill(self, key: str, n: int, fut: Any) -> None:
        try:
            value = await self._load(n)
        except BaseException as exc:  # the waiters get it too, and nobody waits forever
            del self._flights[key]
            fut.set_exception(exc)
            raise
        self._values[key] = value
        del self._flights[key]
        fut.set_result(value)

    async def get_all(self, ns: list[int]) -> list[Any]:
        values = self._values
        flights = self._flights
        out: list[Any] = []
        waits: list[tuple[int, Any]] = []
        for i, n in enumerate(ns):
            key = f"uid:{n}"
            if key in values:
                out.append(values[key])
                continue
            out.append(None)
            fut = flights.get(key)
            if fut is None:
                # several misses load at once: a task each
                fut = flights[key] = self._loop.create_future()
                task = self._loop.create_task(self._fill(key, n, fut))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            waits.append((i, fut))
        for i, fut in waits:
            out[i] = await fut
        return out


class FloorBatch(Floor):
    name = "floor-batch"
    label = "floor [dict + future per key] get_all x20"
    batch = True


class Lean(Adapter):
    """``benchmarks/lean.py``: a future per key, one MGET per loop turn, one SET pipeline
    per loop turn, a task per load, MsgPack, redis-py asyncio (+ hiredis); nothing else."""

    name = "lean"
    label = "lean [redis]"
    env = "ours"

    def version(self) -> str:
        import redis

        try:
            import hiredis

            parser = f"hiredis {hiredis.__version__}"
        except ImportError:
            parser = "no hiredis"
        return f"redis-py {redis.__version__}, {parser}"

    async def setup(self, ctx: Context) -> None:
        import lean  # benchmarks/lean.py, beside this file

        self._lean = lean.Lean(ctx.redis_url, ctx.load, pool_size=ctx.pool_size)

    async def get(self, n: int) -> Any:
        return await self._lean.get(n)

    async def get_all(self, ns: list[int]) -> list[Any]:
        return await self._lean.get_all(ns)

    async def close(self) -> None:
        await self._lean.close()


class LeanBatch(Lean):
    name = "lean-batch"
    label = "lean [redis] get_all x20"
    batch = True


# -- the original cacheme 0.3.0 (PyPI), in its own venv ---------------------------------------


class Original(Adapter):
    package = "cacheme"
    env = "original"
    chain: tuple[str, ...] = ("redis",)

    async def setup(self, ctx: Context) -> None:
        from dataclasses import dataclass as _dataclass

        import cacheme
        from cacheme.serializer import MsgPackSerializer

        for tier in self.chain:
            if tier == "local":
                await cacheme.register_storage(
                    "local", cacheme.Storage(url="local://tlfu", size=ctx.local_size)
                )
            else:
                await cacheme.register_storage(
                    "redis", cacheme.Storage(url=ctx.redis_url, pool_size=ctx.pool_size)
                )
        load = ctx.load
        chain = self.chain

        @_dataclass
        class TraceNode(cacheme.Node):
            uid: int

            def key(self) -> str:
                return f"uid:{self.uid}"

            async def load(self) -> int:
                return await load(self.uid)

            class Meta(cacheme.Node.Meta):
                version = "v1"
                caches = [cacheme.Cache(storage=t, ttl=None) for t in chain]
                serializer = MsgPackSerializer()

        self._node = TraceNode
        self._cacheme = cacheme

    async def get(self, n: int) -> Any:
        return await self._cacheme.get(self._node(n))

    async def get_all(self, ns: list[int]) -> list[Any]:
        node = self._node
        return list(await self._cacheme.get_all([node(n) for n in ns]))


class OriginalRedis(Original):
    name = "original"
    label = "cacheme 0.3.0 [redis]"
    chain = ("redis",)


class OriginalLocalRedis(Original):
    name = "original-local"
    label = "cacheme 0.3.0 [local tlfu 3000, redis]"
    chain = ("local", "redis")


class OriginalRedisBatch(Original):
    name = "original-batch"
    label = "cacheme 0.3.0 [redis] get_all x20"
    chain = ("redis",)
    batch = True


# -- aiocache ---------------------------------------------------------------------------------


class Aiocache(Adapter):
    name = "aiocache"
    label = "aiocache cached"
    package = "aiocache"
    env = "peers"
    stampede = False

    async def setup(self, ctx: Context) -> None:
        import logging
        from urllib.parse import urlsplit

        import aiocache
        import redis.asyncio

        # A failed cache read is logged with a traceback per call; the harness counts
        # extra loads instead.
        logging.getLogger("aiocache").setLevel(logging.CRITICAL)
        u = urlsplit(ctx.redis_url)
        db = int(u.path.strip("/") or 0)
        options: dict[str, Any] = {
            "cache": aiocache.Cache.REDIS,
            "endpoint": u.hostname or "127.0.0.1",
            "port": u.port or 6379,
            "db": db,
            "pool_max_size": ctx.pool_size,
            "connection_pool_class": redis.asyncio.BlockingConnectionPool,
            "connection_pool_kwargs": {"timeout": None},
            "timeout": None,  # aiocache's default 5 s per operation fails pool waits
            "ttl": None,
            "key_builder": lambda fn, n: f"uid:{n}",
        }
        load = ctx.load
        if self.stampede:
            # lease as in the original benchmark: long enough for any load here
            decorator = aiocache.cached_stampede(lease=30, **options)
        else:
            decorator = aiocache.cached(**options)

        @decorator
        async def cached_load(n: int) -> int:
            return await load(n)

        self._fn = cached_load

    async def get(self, n: int) -> Any:
        return await self._fn(n)

    async def close(self) -> None:
        await self._fn.cache.close()


class AiocacheStampede(Aiocache):
    name = "aiocache-stampede"
    label = "aiocache cached_stampede"
    stampede = True


# -- cashews ----------------------------------------------------------------------------------


class Cashews(Adapter):
    name = "cashews"
    label = "cashews @cache"
    package = "cashews"
    env = "peers"
    lock = False

    async def setup(self, ctx: Context) -> None:
        from cashews import Cache

        cache = Cache()
        cache.setup(
            ctx.redis_url,
            max_connections=ctx.pool_size,  # a BlockingConnectionPool by default
            wait_for_connection_timeout=300,
        )
        await cache.init()
        load = ctx.load

        @cache(ttl="1h", key="uid:{n}", lock=self.lock)
        async def cached_load(n: int) -> int:
            return await load(n)

        self._cache = cache
        self._fn = cached_load

    async def get(self, n: int) -> Any:
        return await self._fn(n)

    async def close(self) -> None:
        await self._cache.close()


class CashewsLock(Cashews):
    name = "cashews-lock"
    label = "cashews @cache(lock=True)"
    lock = True


ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (
        Floor,
        FloorBatch,
        Lean,
        LeanBatch,
        CachemeRedis,
        CachemeLocalRedis,
        CachemeRedisBatch,
        OriginalRedis,
        OriginalLocalRedis,
        OriginalRedisBatch,
        Aiocache,
        AiocacheStampede,
        Cashews,
        CashewsLock,
        CachemeSQLite,
        CachemeLocalSQLite,
        CachemeSQLiteBatch,
    )
}
