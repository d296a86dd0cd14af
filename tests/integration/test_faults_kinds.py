"""Issue 9, items 2, 5 and 6 on every remote backend: each fault's example and neighbours.

2. Registration while the server is down: every backend's "connection refused", and a SQLite
   file in a missing directory, register (fail-open) with the breaker open, and are used
   once they answer; ``fail_open=False`` raises.
5. A TTL too large for a tier (``timedelta(days=106752)``, ``timedelta.max``, just under and
   just over the backend's ``max_ttl``) is stored (a second ``get`` is a hit), never an
   ``OverflowError``.
6. One bad key (a lone surrogate) can never be stored: it reads as absent, its writes and
   removals do nothing (fail-closed tiers too); it never counts toward the breaker, and
   neighbours read in the same event-loop turn (or the same get_all) are hits.
   Neighbours of the kind: a NUL in a key, a 10 kB key, a value the server refuses.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import cacheme
from cacheme import Cache, Node, StorageError, StorageMisconfiguredError
from cacheme.serializer import MsgPackSerializer
from cacheme.storages.base import RemoteStorage
from cacheme.storages.registry import storages
from tests.services import MYSQL_URL, POSTGRES_URL

from .backend_sql import schema
from .backends import BACKENDS, FACTORIES
from .faults import free_port


@dataclass
class Tier:
    name: str  # the backend
    storage: RemoteStorage[Any]  # registered as "t"


@pytest.fixture(params=[pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS])
async def tier(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Tier]:
    """The backend registered as ``t`` (on a fresh table / collection / key space)."""
    name: str = request.param
    async with FACTORIES[name](tmp_path, f"raw-{name}") as raw:
        options = raw.options.model_dump(exclude_defaults=True)
        await cacheme.register_storage("t", cacheme.Storage(raw.url, **options))
        try:
            storage = storages()["t"]
            assert isinstance(storage, RemoteStorage)
            yield Tier(name, storage)
        finally:
            await cacheme.close_storages()


def keyed(
    ttl: timedelta | None = None, *, fail_open: bool | None = None
) -> tuple[type[Node], list[str]]:
    """A node class ``Cls(key)`` on tier ``t``; ``load`` returns ``"v:" + key`` (or, for a
    key starting with ``big:``, that many bytes), recording each key it loads."""
    loads: list[str] = []

    class Keyed(Node):
        def __init__(self, key: str) -> None:
            self._key = key

        def key(self) -> str:
            return self._key

        async def load(self) -> Any:
            loads.append(self._key)
            if self._key.startswith("big:"):
                return b"x" * int(self._key.split(":")[1])
            return value_of(self._key)

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="t", ttl=ttl, fail_open=fail_open)]
            serializer = MsgPackSerializer()

    Keyed.__qualname__ = f"Keyed_{uuid.uuid4().hex[:8]}"
    return Keyed, loads


def value_of(key: str) -> str:
    """What ``Keyed(key)`` loads: ``"v:" + key``, with a key that is not valid UTF-8 spelled
    with escapes (the value must be storable; only the key is at fault in these tests)."""
    try:
        key.encode()
    except UnicodeEncodeError:
        return f"v:{key!a}"
    return f"v:{key}"


# -- 5. TTLs too large for a tier ------------------------------------------------------------


def huge_ttls(storage: RemoteStorage[Any]) -> list[timedelta]:
    limit = type(storage).max_ttl
    ttls = [timedelta(days=106752), timedelta.max, limit, limit - timedelta(days=1)]
    if limit < timedelta.max:
        ttls.append(limit + timedelta(days=1))
    return ttls


async def test_huge_ttls_are_stored(tier: Tier) -> None:
    for ttl in huge_ttls(tier.storage):
        Keyed, loads = keyed(ttl)
        assert await cacheme.get(Keyed("ttl")) == "v:ttl", ttl
        assert await cacheme.get(Keyed("ttl")) == "v:ttl", ttl
        assert loads == ["ttl"], f"{ttl}: not stored"
        assert await cacheme.get_all([Keyed("ttl"), Keyed("b")]) == ["v:ttl", "v:b"]
        assert await cacheme.refresh(Keyed("ttl")) == "v:ttl"
        await cacheme.invalidate(Keyed("ttl"))
    assert tier.storage.stats.errors == 0 and tier.storage.stats.timeouts == 0
    left = await tier.storage.remaining_ttl(["cacheme:b:v1"])
    assert left.get("cacheme:b:v1", float("inf")) > 200 * 365 * 86400


def test_sql_and_mongo_limits_keep_dates_before_the_year_9999() -> None:
    from datetime import datetime, timezone

    from cacheme.storages.sql import SQLStorage

    limits = [SQLStorage.max_ttl]
    try:
        from cacheme.storages.mongo import MongoStorage
    except ImportError:  # pragma: no cover - pymongo missing
        pass
    else:
        limits.append(MongoStorage.max_ttl)
    for limit in limits:
        assert datetime.now(timezone.utc) + limit < datetime(9500, 1, 1, tzinfo=timezone.utc)


# -- 6. one bad key --------------------------------------------------------------------------

BAD = "\ud800"  # what os.fsdecode makes of a non-UTF-8 file name


async def stored_neighbours(Keyed: Any, loads: list[str]) -> list[str]:
    names = [f"n{i}" for i in range(3)]
    assert await cacheme.get_all([Keyed(n) for n in names]) == [f"v:{n}" for n in names]
    loads.clear()
    return names


async def test_bad_key_fails_alone_and_never_opens_the_breaker(tier: Tier) -> None:
    Keyed, loads = keyed()
    names = await stored_neighbours(Keyed, loads)
    for _ in range(10):
        got = await asyncio.gather(cacheme.get(Keyed(BAD)), *(cacheme.get(Keyed(n)) for n in names))
        assert got == [value_of(BAD), *(f"v:{n}" for n in names)]
    assert loads == [BAD] * 10  # the neighbours were hits every time
    assert tier.storage.breaker_open is False
    assert tier.storage.stats.errors == 0 and tier.storage.stats.breaker_opens == 0
    stats = cacheme.stats(Keyed)
    assert stats.hit_count() == 30


async def test_bad_key_on_a_fail_closed_tier_is_loaded_and_spares_its_neighbours(
    tier: Tier,
) -> None:
    # A key no driver can send is never stored: it reads as absent and its write does
    # nothing, so even a fail-closed tier hands its caller the loaded value, and the
    # neighbours (alone or in the same get_all) are hits.
    Keyed, loads = keyed(fail_open=False)
    names = await stored_neighbours(Keyed, loads)
    for _ in range(6):
        got = await asyncio.gather(cacheme.get(Keyed(BAD)), *(cacheme.get(Keyed(n)) for n in names))
        assert got == [value_of(BAD), *(value_of(n) for n in names)]
    assert await cacheme.get_all([Keyed(names[0]), Keyed(BAD)]) == [
        value_of(names[0]),
        value_of(BAD),
    ]
    assert loads == [BAD] * 7
    assert tier.storage.breaker_open is False and tier.storage.stats.errors == 0


async def test_bad_key_in_get_all_and_invalidate(tier: Tier) -> None:
    Keyed, loads = keyed()
    names = await stored_neighbours(Keyed, loads)
    loads.clear()
    got = await cacheme.get_all([Keyed(n) for n in names[:2]] + [Keyed(BAD)])
    assert got == ["v:n0", "v:n1", value_of(BAD)]
    # get_all reads its keys in one call: the bad key reads as absent, the others are hits.
    assert loads == [BAD]
    await cacheme.invalidate(Keyed(BAD))  # nothing could have been stored: nothing to remove
    assert tier.storage.breaker_open is False and tier.storage.stats.errors == 0
    assert await cacheme.get(Keyed("n2")) == "v:n2"


@pytest.mark.parametrize("key", ["a\x00b", "\x00", "L" * 10_000, "é" * 5_000, "trail "], ids=repr)
async def test_unusual_keys_are_stored_and_leave_neighbours_alone(tier: Tier, key: str) -> None:
    Keyed, loads = keyed()
    names = await stored_neighbours(Keyed, loads)
    for _ in range(3):
        got = await asyncio.gather(cacheme.get(Keyed(key)), *(cacheme.get(Keyed(n)) for n in names))
        assert got == [f"v:{key}", *(f"v:{n}" for n in names)]
    assert loads == [key]  # stored once, then hits; neighbours hits throughout
    assert tier.storage.breaker_open is False and tier.storage.stats.errors == 0
    await cacheme.invalidate(Keyed(key))
    assert await cacheme.get(Keyed(key)) == f"v:{key}"
    assert loads == [key, key]


# -- 6. a value the server refuses -----------------------------------------------------------


async def refused_value_round(Keyed: Any, loads: list[str], size: int, rounds: int) -> None:
    """``rounds`` times: load the refused value with fresh neighbours in the same turn."""
    for r in range(rounds):
        names = [f"r{r}n{i}" for i in range(3)]
        big = f"big:{size}:{r}"
        got = await asyncio.gather(cacheme.get(Keyed(big)), *(cacheme.get(Keyed(n)) for n in names))
        assert len(got[0]) == size  # its caller still gets the loaded value (fail-open)
        assert got[1:] == [f"v:{n}" for n in names]
        loads.clear()
        assert await cacheme.get_all([Keyed(n) for n in names]) == [f"v:{n}" for n in names]
        assert loads == [], "the neighbours' writes were lost with the refused one"


def refusal_size(tier: Tier) -> int:
    if tier.name == "mongo":
        return 17 << 20  # over the 16 MiB BSON document limit
    assert tier.name == "mysql", tier.name
    return int(getattr(tier.storage.here(), "max_packet", 16 << 20)) // 2 + 1


# The backends with a per-value limit a test can reach cheaply (Redis: see the private
# server with a small proto-max-bulk-len below; the others take values of any size).
REFUSING = pytest.mark.parametrize(
    "tier",
    [
        pytest.param("mongo", marks=pytest.mark.mongo),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
    indirect=True,
)


@REFUSING
async def test_refused_value_fails_only_its_write_and_spares_the_breaker(tier: Tier) -> None:
    size = refusal_size(tier)
    Keyed, loads = keyed()
    await refused_value_round(Keyed, loads, size, rounds=6)
    assert tier.storage.breaker_open is False
    assert tier.storage.stats.breaker_opens == 0


@REFUSING
async def test_refused_values_in_a_row_do_not_open_the_breaker(tier: Tier) -> None:
    # Each refusal counts one storage error, but every get reads first, and that read's
    # success closes the count again: refusals alone never reach the threshold.
    size = refusal_size(tier)
    Keyed, _ = keyed()
    for r in range(6):
        assert len(await cacheme.get(Keyed(f"big:{size}:{r}"))) == size
    assert tier.storage.stats.breaker_opens == 0


@pytest.fixture
async def small_bulk_redis(tmp_path: Path) -> AsyncIterator[str]:
    """A private redis-server refusing any argument over 1 MB (``proto-max-bulk-len``)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()  # a random port could be one in use (a client's ephemeral port)
    proc = await asyncio.create_subprocess_exec(
        *(server, "--port", str(port), "--save", "", "--appendonly", "no"),
        *("--proto-max-bulk-len", "1mb", "--dir", str(tmp_path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        import redis.asyncio

        client = redis.asyncio.Redis(port=port)
        for _ in range(50):
            try:
                await client.ping()
                break
            except Exception:
                await asyncio.sleep(0.1)
        await client.aclose()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:  # a loaded machine: do not fail the test for it
            proc.kill()
            await proc.wait()


@pytest.mark.redis
async def test_redis_refusing_a_big_value_spares_its_neighbours(small_bulk_redis: str) -> None:
    await cacheme.register_storage("t", cacheme.Storage(small_bulk_redis))
    storage = storages()["t"]
    assert isinstance(storage, RemoteStorage)
    try:
        Keyed, loads = keyed()
        await refused_value_round(Keyed, loads, 2 << 20, rounds=6)
        assert storage.breaker_open is False and storage.stats.breaker_opens == 0
    finally:
        await cacheme.close_storages()


# -- 2. registration while the server is down -------------------------------------------------

REFUSED = {
    "redis": ("redis://127.0.0.1:1/0", {}),
    "redis_cluster": ("redis://127.0.0.1:1", {"cluster": True}),
    "postgres": (POSTGRES_URL.rsplit("@", 1)[0] + "@127.0.0.1:1/test", {}),
    "mysql": (MYSQL_URL.rsplit("@", 1)[0] + "@127.0.0.1:1/test", {}),
    "mongo": ("mongodb://127.0.0.1:1", {}),
}


@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in REFUSED]
)
async def test_connection_refused_registers_fail_open_and_raises_fail_closed(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, options = REFUSED[backend]
    timeout = 0.5
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="cacheme"):
        await cacheme.register_storage("down", cacheme.Storage(url, timeout=timeout, **options))
    assert loop.time() - started <= 2 * timeout + 0.5
    assert "unreachable" in caplog.text
    storage = storages()["down"]
    assert isinstance(storage, RemoteStorage) and storage.breaker_open
    # A node on it still answers (from its load), the tier skipped.
    Down = cacheme.build_node(f"Down_{backend}", "v1", [Cache(storage="down")], MsgPackSerializer())
    assert await cacheme.get(Down(key="k"), lambda node: asyncio.sleep(0, "loaded")) == "loaded"
    started = loop.time()
    with pytest.raises(StorageError):
        await cacheme.register_storage(
            "down2", cacheme.Storage(url, timeout=timeout, fail_open=False, **options)
        )
    assert loop.time() - started <= 2 * timeout + 0.5
    await cacheme.close_storages()


@pytest.mark.sqlite
async def test_sqlite_in_a_missing_directory_is_refused_then_used_once_it_exists(
    tmp_path: Path,
) -> None:
    # A missing directory is a setting, not a server that is down: it was registered with
    # its breaker open (the tier skipped until someone made the directory); now it is
    # refused, failing open or not, and the storage registers once the directory exists.
    folder = tmp_path / "not" / "yet"
    path = folder / "cache.db"
    url = f"sqlite:///{path}"
    for fail_open in (True, False):
        with pytest.raises(StorageMisconfiguredError, match="does not exist"):
            await cacheme.register_storage("lite", cacheme.Storage(url, fail_open=fail_open))
    assert "lite" not in storages()
    folder.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        for statement in schema("sqlite", "cacheme_data"):
            db.execute(statement)
    await cacheme.register_storage("lite", cacheme.Storage(url))
    storage = storages()["lite"]
    assert isinstance(storage, RemoteStorage) and not storage.breaker_open
    Lite = cacheme.build_node("LiteLater", "v1", [Cache(storage="lite")], MsgPackSerializer())
    loads: list[str] = []

    async def load(node: Any) -> str:
        loads.append(node.key())
        return "v"

    assert await cacheme.get(Lite(key="b"), load) == "v"
    assert await storage.get_many(["cacheme:b:v1"]), "the tier was not used"
    loads.clear()
    assert await cacheme.get(Lite(key="b"), load) == "v"
    assert loads == []  # a hit from SQLite
    await cacheme.close_storages()
