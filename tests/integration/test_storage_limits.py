"""Storage-side limits and checks, on every backend they concern (reviews 39 and 41).

1. ``batch_size`` bounds every round trip: a lone ``get_all`` (the direct read), uncoalesced
   reads, writes, adds and removes, ``remaining_ttl``, direct writes; MySQL splits a read
   larger than ``max_allowed_packet``, MongoDB one whose keys pass 8 MiB.
2. A stored value that is not bytes (a row or document someone else wrote, a Redis key of
   another type) is undecodable for its key alone: a miss, loaded again and overwritten;
   its neighbours are hits and the breaker stays closed.
3. A key column that does not compare exactly (a case-insensitive collation) or is too
   short, or a value column that is not binary, is refused at registration and reported by
   ``cacheme check``; a MongoDB collection or key index with a collation likewise.
4. ``timeout`` at most a day (drivers refuse much longer ones only when connecting), and
   ``pool_size`` at most 10 000 on every backend.
5. A relative SQLite path is resolved once, at registration.
6. No asyncio "never retrieved" noise from PostgreSQL: the stop of a write cut short, and
   connects cut by tiny timeouts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import cacheme
from cacheme import Cache, Node, schemas
from cacheme.errors import ConfigurationError, StorageMisconfiguredError
from cacheme.serializer import MsgPackSerializer, Serializer
from cacheme.storages.base import MAX_TIMEOUT, Entry, RemoteStorage
from cacheme.storages.mysql import MySQLStorage
from cacheme.storages.registry import storages
from cacheme.storages.sql import stored_key
from tests.services import MONGO_URL, MYSQL_URL, POSTGRES_URL

from .backend_sql import sql_table
from .backends import BACKENDS, FACTORIES
from .faults import Proxy, port_of, with_port
from .test_cli import cli

every_backend = pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS]
)


@asynccontextmanager
async def tier(backend: str, tmp_path: Path, **options: Any) -> AsyncIterator[RemoteStorage[Any]]:
    """``backend`` on a fresh table / collection / key space, registered as ``t`` with
    ``options``; yields the storage the factory built on it (to look past cacheme)."""
    async with FACTORIES[backend](tmp_path, f"raw-{backend}", **options) as raw:
        await cacheme.register_storage(
            "t", cacheme.Storage(raw.url, **raw.options.model_dump(exclude_defaults=True))
        )
        try:
            yield raw
        finally:
            await cacheme.close_storages()


def registered() -> RemoteStorage[Any]:
    storage = storages()["t"]
    assert isinstance(storage, RemoteStorage)
    return storage


class Raw(Serializer):
    """Bytes in, bytes out: a serializer that decodes anything it is handed."""

    def dumps(self, value: Any) -> bytes:
        return bytes(value)

    def loads(self, data: bytes, value_type: Any = None) -> Any:
        return data


def keyed(serializer: Serializer | None = None, **meta: Any) -> tuple[type[Node], list[str]]:
    """A node class ``Cls(key)`` on tier ``t`` (key ``cacheme:<key>:v1``) whose ``load``
    returns ``b"v:" + key`` (bytes, so ``Raw`` can store it), recording the keys it loads."""
    loads: list[str] = []
    settings = {
        "version": "v1",
        "caches": [Cache(storage="t", ttl=timedelta(minutes=5))],
        "serializer": serializer or MsgPackSerializer(),
        **meta,
    }

    class Keyed(Node):
        def __init__(self, key: str) -> None:
            self._key = key

        def key(self) -> str:
            return self._key

        async def load(self) -> bytes:
            loads.append(self._key)
            return f"v:{self._key}".encode()

        Meta = type("Meta", (Node.Meta,), settings)

    Keyed.__qualname__ = f"Keyed_{uuid.uuid4().hex[:8]}"
    return Keyed, loads


# -- 1. batch_size bounds every round trip --------------------------------------------------


@every_backend
async def test_a_lone_get_all_reads_in_batches(backend: str, tmp_path: Path) -> None:
    async with tier(backend, tmp_path, batch_size=10):
        storage = registered()
        Keyed, loads = keyed()
        nodes = [Keyed(f"k{i}") for i in range(100)]
        await cacheme.get_all(nodes)  # loads and writes them
        await cacheme.get_all(nodes)  # hits: reads after those writes
        assert len(loads) == 100
        for count, trips in ((100, 10), (10, 1), (11, 2), (25, 3)):
            before, read = storage.stats.round_trips, storage.stats.keys_read
            assert await cacheme.get_all(nodes[:count]) == [
                f"v:k{i}".encode() for i in range(count)
            ]
            assert storage.stats.round_trips - before == trips, count
            assert storage.stats.keys_read - read == count
        assert len(loads) == 100  # all hits
        assert storage.stats.errors == 0


@every_backend
async def test_uncoalesced_operations_go_in_batches(backend: str, tmp_path: Path) -> None:
    async with FACTORIES[backend](tmp_path, f"nc-{backend}", coalesce=False, batch_size=10) as s:
        entries = [Entry(f"cacheme:nc:{i}:v1", str(i).encode(), 60_000) for i in range(25)]
        keys = [e.key for e in entries]

        async def trips(operation: Any) -> int:
            before = s.stats.round_trips
            await operation
            return s.stats.round_trips - before

        assert await trips(s.set_many(entries)) == 3
        found: dict[str, bytes] = {}

        async def read() -> None:
            found.update(await s.get_many(keys))

        assert await trips(read()) == 3
        assert found == {e.key: e.value for e in entries}
        left: dict[str, float] = {}

        async def ttl() -> None:
            left.update(await s.remaining_ttl(keys))

        assert await trips(ttl()) == 3
        assert set(left) == set(keys)
        added = [Entry(f"cacheme:nc-add:{i}:v1", b"a", None) for i in range(25)]
        assert await trips(s.add_many(added)) == 3
        assert await trips(s.remove_many(keys)) == 3
        assert await s.get_many(keys) == {}
        assert await s.get_many([e.key for e in added]) == {e.key: b"a" for e in added}
        assert s.stats.errors == 0


@every_backend
async def test_direct_paths_respect_batch_size(backend: str, tmp_path: Path) -> None:
    if sys.version_info < (3, 11):
        pytest.skip("no direct operations before Python 3.11 (see RemoteStorage._call)")
    async with FACTORIES[backend](tmp_path, f"direct-{backend}", batch_size=10) as s:
        entries = [Entry(f"cacheme:d:{i}:v1", b"x", None) for i in range(25)]
        write = s.write_now(entries)
        assert write is not None
        before = s.stats.round_trips
        await write
        assert s.stats.round_trips - before == 3
        assert s.read_now([e.key for e in entries[:11]]) is None  # queued instead: batches
        read = s.read_now([e.key for e in entries[:10]])
        assert read is not None
        assert await read == {e.key: b"x" for e in entries[:10]}


@pytest.mark.mysql
async def test_mysql_read_beyond_max_allowed_packet_is_split(tmp_path: Path) -> None:
    """Keys of 250 four-byte characters, more of them than one packet holds: one batch
    (``batch_size`` allows it), several statements. (A long timeout: the round trips of 19k
    long keys took over 3 s on a busy 2-core machine.)"""
    async with FACTORIES["mysql"](tmp_path, "packet", batch_size=100_000, timeout=60.0) as s:
        assert isinstance(s, MySQLStorage)
        body = "\U0001f642" * 230  # keys stay under 255 characters: stored as they are
        count = s.max_packet // (len(body) * 4) + 1000
        keys = [f"cacheme:{body}:{i}:v1" for i in range(count)]
        assert all(stored_key(k) == k for k in keys)
        assert sum(len(k.encode()) for k in keys) > s.max_packet
        await s.set_many([Entry(keys[0], b"first", None), Entry(keys[-1], b"last", None)])
        before = s.stats.round_trips
        assert await s.get_many(keys) == {keys[0]: b"first", keys[-1]: b"last"}
        assert set(await s.remaining_ttl(keys)) == {keys[0], keys[-1]}
        await s.remove_many(keys)
        assert s.stats.round_trips - before == 3
        assert await s.get_many([keys[0], keys[-1]]) == {}
        assert s.stats.errors == 0


@pytest.mark.mongo
async def test_mongo_keys_beyond_16_mib_are_read_in_several_commands(tmp_path: Path) -> None:
    """MongoDB stores keys whole: 180 keys of 100 kB (18 MB) in one batch would make a
    command larger than a BSON document may be."""
    from cacheme.storages.mongo import MAX_KEY_BYTES_PER_COMMAND, key_groups

    async with FACTORIES["mongo"](tmp_path, "long-keys") as s:
        keys = [f"cacheme:{i:04d}{'k' * 100_000}:v1" for i in range(180)]
        groups = key_groups(keys)
        assert len(groups) == 3 and [k for g in groups for k in g] == keys
        assert all(sum(len(k) for k in g) <= MAX_KEY_BYTES_PER_COMMAND for g in groups)
        await s.set_many([Entry(keys[0], b"first", None), Entry(keys[-1], b"last", None)])
        before = s.stats.round_trips
        assert await s.get_many(keys) == {keys[0]: b"first", keys[-1]: b"last"}
        assert set(await s.remaining_ttl(keys)) == {keys[0], keys[-1]}
        await s.remove_many(keys)
        assert s.stats.round_trips - before == 3
        assert await s.get_many([keys[0], keys[-1]]) == {}
        assert s.stats.errors == 0


# -- 2. a stored value that is not bytes ----------------------------------------------------


FOREIGN_BACKENDS = ["sqlite", "mongo", "redis", "redis_cluster"]


async def plant(backend: str, raw: RemoteStorage[Any], key: str, value: Any) -> None:
    """Store ``value`` under the full cache key ``key`` past cacheme, as another program
    would (SQLite: a row of that type; MongoDB: a field of that type; Redis: ``value`` is
    the type of key to make)."""
    if backend == "sqlite":
        db = sqlite3.connect(raw.database)  # type: ignore[attr-defined]
        with db:
            db.execute(
                f'INSERT INTO "{raw.table}" VALUES (?, ?, NULL)',  # type: ignore[attr-defined]
                (stored_key(key), value),
            )
        db.close()
    elif backend == "mongo":
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(MONGO_URL)
        try:
            coll = client[raw.database][raw.collection]  # type: ignore[attr-defined]
            await coll.insert_one({"key": key, "expire": None, **value})
        finally:
            await client.close()
    else:
        import redis.asyncio
        from redis.asyncio.cluster import RedisCluster

        client_: Any = (
            RedisCluster.from_url(raw.url)
            if backend == "redis_cluster"
            else redis.asyncio.Redis.from_url(raw.url)
        )
        try:
            if value == "list":
                await client_.rpush(key, b"a", b"b")
            else:
                await client_.hset(key, mapping={"a": b"1"})
        finally:
            await client_.aclose()


FOREIGN_VALUES: dict[str, list[Any]] = {
    "sqlite": ["text, not bytes", 10**15, 5, 2.5],
    "mongo": [{"value": "text"}, {"value": 10**15}, {"value": 2.5}, {"value": None}, {}],
    "redis": ["list", "hash"],
    "redis_cluster": ["list", "hash"],
}


@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in FOREIGN_BACKENDS]
)
@pytest.mark.parametrize("serializer", [MsgPackSerializer(), Raw()], ids=["msgpack", "raw"])
async def test_a_foreign_value_is_undecodable_for_its_key_alone(
    backend: str, serializer: Serializer, tmp_path: Path
) -> None:
    async with tier(backend, tmp_path) as raw:
        Keyed, loads = keyed(serializer)
        await cacheme.get_all([Keyed("good1"), Keyed("good2")])
        bad = [f"bad{i}" for i in range(len(FOREIGN_VALUES[backend]))]
        for key, value in zip(bad, FOREIGN_VALUES[backend], strict=True):
            await plant(backend, raw, f"cacheme:{key}:v1", value)
        await plant(backend, raw, "cacheme:lone:v1", FOREIGN_VALUES[backend][0])
        loads.clear()
        everything = [*bad, "good1", "good2"]
        expected = [f"v:{k}".encode() for k in everything]
        assert await cacheme.get_all([Keyed(k) for k in everything]) == expected
        assert sorted(loads) == bad  # the foreign entries only: their neighbours are hits
        assert await cacheme.get(Keyed("lone")) == b"v:lone"  # a read of one key alone
        stats = cacheme.stats(Keyed)
        # A Redis key of another type reads as absent (MGET: nil; GET: WRONGTYPE, caught);
        # a foreign row or document is an entry that cannot be decoded.
        undecodable = 0 if backend.startswith("redis") else len(bad) + 1
        assert stats.decode_error_count() == undecodable
        assert stats.storage_error_count() == 0
        storage = registered()
        assert storage.stats.errors == 0 and not storage.breaker_open
        loads.clear()
        await asyncio.sleep(0)  # (the write-backs went out with the loads)
        assert await cacheme.get_all([Keyed(k) for k in everything]) == expected
        assert loads == []  # overwritten with cacheme's own bytes: hits now
        assert [await cacheme.get(Keyed(k)) for k in [*bad, "lone"]] == [
            *expected[: len(bad)],
            b"v:lone",
        ]
        assert loads == []


@pytest.mark.sqlite
async def test_a_foreign_value_under_freshness_is_undecodable(tmp_path: Path) -> None:
    async with tier("sqlite", tmp_path) as raw:
        Keyed, loads = keyed(stale_if_error=timedelta(minutes=1))
        await plant("sqlite", raw, "cacheme:bad:v1", "text")
        await plant("sqlite", raw, "cacheme:worse:v1", 10**15)
        assert await cacheme.get_all([Keyed("bad"), Keyed("worse")]) == [b"v:bad", b"v:worse"]
        assert sorted(loads) == ["bad", "worse"]
        assert cacheme.stats(Keyed).decode_error_count() == 2
        assert await cacheme.get(Keyed("bad")) == b"v:bad"
        assert sorted(loads) == ["bad", "worse"]


@pytest.mark.sqlite
async def test_a_foreign_value_under_a_tag_key_breaks_nothing(tmp_path: Path) -> None:
    """A tag's version key holding a text: read as a version like any other (what it holds
    cannot be decoded, and need not be), never an error for the caller."""
    from cacheme import tags

    loads: list[str] = []

    class Tagged(Node):
        def __init__(self, key: str) -> None:
            self._key = key

        def key(self) -> str:
            return self._key

        def tags(self) -> list[str]:
            return ["group"]

        async def load(self) -> str:
            loads.append(self._key)
            return f"v:{self._key}"

        class Meta(Node.Meta):
            caches = [Cache(storage="t", ttl=timedelta(minutes=5))]
            serializer = MsgPackSerializer()

    async with tier("sqlite", tmp_path) as raw:
        await plant("sqlite", raw, tags.tag_key(Tagged._cacheme_config.name, "group"), "text")
        assert [await cacheme.get(Tagged("a")) for _ in range(3)] == ["v:a"] * 3
        assert loads == ["a"]
        assert cacheme.stats(Tagged).storage_error_count() == 0
        await cacheme.invalidate_tag(Tagged, "group")
        assert await cacheme.get(Tagged("a")) == "v:a"
        assert loads == ["a", "a"]


# -- 3. key and value columns that cannot hold entries faithfully ---------------------------


async def refused(url: str, what: list[str], **options: Any) -> str:
    """Register ``url`` (failing open: a misconfiguration is raised all the same) and return
    the error, after checking it names the storage and each of ``what``; ``cacheme check``
    (the library function) must report the same problem."""
    with pytest.raises(StorageMisconfiguredError) as info:
        await cacheme.register_storage("refused", cacheme.Storage(url, **options))
    message = str(info.value)
    for part in ["storage 'refused'", *what]:
        assert part in message, (part, message)
    report = await schemas.check(url, **options)
    assert not report.passed
    for part in what:
        assert any(part in problem for problem in report.problems), (part, report.problems)
    await cacheme.close_storages()
    return message


SQLITE_TABLES = {
    "nocase column": (
        '"key" TEXT COLLATE NOCASE NOT NULL PRIMARY KEY, "value" BLOB NOT NULL, "expire" TEXT',
        "",
        ["column 'key'", "COLLATE NOCASE"],
    ),
    "rtrim column": (
        '"key" TEXT NOT NULL COLLATE RTRIM, "value" BLOB NOT NULL, "expire" TEXT, '
        'PRIMARY KEY ("key")',
        "",
        ["column 'key'", "COLLATE RTRIM"],
    ),
    "nocase index": (
        '"key" TEXT NOT NULL, "value" BLOB NOT NULL, "expire" TEXT',
        'CREATE UNIQUE INDEX "{t}_k" ON "{t}" ("key" COLLATE NOCASE)',
        ["index '{t}_k'", "COLLATE NOCASE"],
    ),
}


@pytest.mark.sqlite
@pytest.mark.parametrize("case", list(SQLITE_TABLES))
async def test_sqlite_key_column_that_ignores_case_is_refused(case: str, tmp_path: Path) -> None:
    columns, index, what = SQLITE_TABLES[case]
    table = "t_" + uuid.uuid4().hex[:8]
    path = tmp_path / "c.db"
    with sqlite3.connect(path) as db:
        db.execute(f'CREATE TABLE "{table}" ({columns})')
        db.execute(f'CREATE INDEX "{table}_e" ON "{table}" ("expire")')
        if index:
            db.execute(index.format(t=table))
    message = await refused(
        f"sqlite:///{path}", [w.format(t=table) for w in what], table=table, purge_interval=0
    )
    assert f"table {table!r}" in message and "sql/sqlite.sql" in message
    result = cli("check", f"sqlite:///{path}", "--table", table)
    assert result.returncode == 1 and "COLLATE" in result.stderr, result.stderr


@pytest.mark.sqlite
async def test_sqlite_schema_file_is_accepted_and_keys_differ_by_case(tmp_path: Path) -> None:
    async with tier("sqlite", tmp_path):
        Keyed, loads = keyed()
        assert await cacheme.get_all([Keyed("User"), Keyed("user")]) == [b"v:User", b"v:user"]
        assert await cacheme.get(Keyed("User")) == b"v:User"
        assert sorted(loads) == ["User", "user"]


MYSQL_TABLES = {
    "case-insensitive": (
        "`key` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci NOT NULL",
        "`value` LONGBLOB NOT NULL",
        ["column 'key'", "utf8mb4_general_ci"],
    ),
    "too short": (
        "`key` VARCHAR(40) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
        "`value` LONGBLOB NOT NULL",
        ["column 'key'", "at most 40 characters"],
    ),
    "latin1": (
        "`key` VARCHAR(255) CHARACTER SET latin1 COLLATE latin1_bin NOT NULL",
        "`value` LONGBLOB NOT NULL",
        ["column 'key'", "character set latin1"],
    ),
    "text value": (
        "`key` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
        "`value` LONGTEXT NOT NULL",
        ["column 'value'", "LONGTEXT"],
    ),
    # Review 43: it passed, then every write of more than 50 bytes failed.
    "small binary value": (
        "`key` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL",
        "`value` VARBINARY(50) NOT NULL",
        ["column 'value'", "VARBINARY", "LONGBLOB"],
    ),
}


@asynccontextmanager
async def mysql_table(key: str, value: str) -> AsyncIterator[str]:
    import asyncmy

    from cacheme.storages.mysql import connect_args

    table = "t_" + uuid.uuid4().hex[:10]
    conn = await asyncmy.connect(autocommit=True, **connect_args(MYSQL_URL))
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                f"CREATE TABLE `{table}` ({key}, {value}, `expire` DATETIME(6) NULL, "
                f"PRIMARY KEY (`key`), KEY `{table}_e` (`expire`))"
            )
        yield table
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP TABLE IF EXISTS `{table}`")
        await conn.ensure_closed()


@pytest.mark.mysql
@pytest.mark.parametrize("case", list(MYSQL_TABLES))
async def test_mysql_key_or_value_column_that_changes_entries_is_refused(case: str) -> None:
    key, value, what = MYSQL_TABLES[case]
    async with mysql_table(key, value) as table:
        message = await refused(MYSQL_URL, what, table=table, purge_interval=0)
        assert f"table {table!r}" in message and "sql/mysql.sql" in message


@pytest.mark.mysql
async def test_mysql_sessions_are_strict(tmp_path: Path) -> None:
    """Whatever the server's sql_mode, nothing is silently cut to fit a column."""
    async with FACTORIES["mysql"](tmp_path, "strict") as s:
        assert isinstance(s, MySQLStorage)
        rows = await s._run([("SELECT @@SESSION.sql_mode", ())], fetch=True)
        assert "STRICT_ALL_TABLES" in str(rows[0][0]).split(",")


PG_TABLES = {
    "too short": ('"key" VARCHAR(40)', '"value" BYTEA', ["column 'key'", "at most 40"]),
    "padded": ('"key" CHAR(300)', '"value" BYTEA', ["column 'key'", "type bpchar"]),
    "text value": ('"key" TEXT', '"value" TEXT', ["column 'value'", "type text"]),
    "case-insensitive": (
        '"key" TEXT COLLATE "{c}"',
        '"value" BYTEA',
        ["column 'key'", "nondeterministic collation"],
    ),
}


@pytest.mark.postgres
@pytest.mark.parametrize("case", list(PG_TABLES))
async def test_postgres_key_or_value_column_that_changes_entries_is_refused(case: str) -> None:
    import asyncpg

    key, value, what = PG_TABLES[case]
    table = "t_" + uuid.uuid4().hex[:10]
    collation = f"ci_{table}"
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        if "{c}" in key:
            try:
                await conn.execute(
                    f'CREATE COLLATION "{collation}" (provider = icu, '
                    f"locale = 'und-u-ks-level2', deterministic = false)"
                )
            except asyncpg.PostgresError as exc:
                pytest.skip(f"no nondeterministic ICU collation on this server: {exc}")
        await conn.execute(
            f'CREATE TABLE "{table}" ({key.format(c=collation)} NOT NULL PRIMARY KEY, '
            f'{value} NOT NULL, "expire" TIMESTAMPTZ NULL)'
        )
        message = await refused(POSTGRES_URL, what, table=table, purge_interval=0)
        assert f"table {table!r}" in message and "sql/postgresql.sql" in message
    finally:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        await conn.execute(f'DROP COLLATION IF EXISTS "{collation}"')
        await conn.close()


@pytest.mark.parametrize(
    "backend",
    [pytest.param(b, marks=getattr(pytest.mark, b)) for b in ("sqlite", "postgres", "mysql")],
)
async def test_the_shipped_sql_schemas_pass_the_column_check(backend: str, tmp_path: Path) -> None:
    async with sql_table(backend, tmp_path) as table:
        report = await schemas.check(table.url, table=table.table, purge_interval=0)
        assert report.passed, report.problems
        assert "key compared exactly (binary), value binary" in report.ok


@pytest.mark.mongo
@pytest.mark.parametrize("where", ["collection", "index"])
async def test_mongo_collation_that_ignores_case_is_refused(where: str) -> None:
    from .backend_mongo import DATABASE, admin_client

    name = f"cacheme_ci_{uuid.uuid4().hex[:10]}"
    case_insensitive = {"locale": "en", "strength": 2}
    async with admin_client() as client:
        db = client[DATABASE]
        try:
            if where == "collection":
                await db.create_collection(name, collation=case_insensitive)
                await db[name].create_index("key", unique=True)
                what = ["default collation"]
            else:
                await db.create_collection(name)
                await db[name].create_index("key", unique=True, collation=case_insensitive)
                what = ["index 'key_1'"]
            await db[name].create_index("expire", expireAfterSeconds=0)
            message = await refused(
                MONGO_URL, [*what, "'strength': 2"], database=DATABASE, collection=name
            )
            assert "sql/mongo.js" in message
        finally:
            await db.drop_collection(name)


# -- 4. timeout and pool_size within what drivers take ---------------------------------------

URLS = {
    "redis": "redis://127.0.0.1:6379/0",
    "sqlite": "sqlite:///c.db",
    "postgres": "postgresql://u@127.0.0.1:5432/db",
    "mysql": "mysql://u:p@127.0.0.1:3306/db",
    "mongo": "mongodb://127.0.0.1:27017",
}


@pytest.mark.parametrize("scheme", list(URLS))
@pytest.mark.parametrize(
    ("option", "value"),
    [("timeout", MAX_TIMEOUT + 0.5), ("timeout", 6e5), ("timeout", 1e12), ("pool_size", 10_001)],
)
def test_options_beyond_driver_limits_are_configuration_errors(
    scheme: str, option: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as info:
        cacheme.Storage(URLS[scheme], **{option: value}).build("limits")
    assert "storage 'limits'" in str(info.value) and f"{option}:" in str(info.value)


@every_backend
async def test_the_longest_timeout_works(backend: str, tmp_path: Path) -> None:
    async with tier(backend, tmp_path, timeout=MAX_TIMEOUT, pool_size=20):
        Keyed, loads = keyed()
        assert await cacheme.get(Keyed("a")) == b"v:a"
        assert await cacheme.get(Keyed("a")) == b"v:a"
        assert loads == ["a"]
        assert registered().stats.errors == 0


# -- 5. a relative SQLite path ---------------------------------------------------------------


@pytest.mark.sqlite
def test_a_relative_sqlite_path_is_resolved_at_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    Keyed, loads = keyed()
    databases: list[str] = []

    async def setup() -> None:
        await schemas.create("sqlite:///rel.db")
        await cacheme.register_storage("t", cacheme.Storage("sqlite:///rel.db", purge_interval=0))
        databases.append(registered().database)  # type: ignore[attr-defined]
        assert await cacheme.get(Keyed("k")) == b"v:k"

    async def later() -> None:
        assert await cacheme.get(Keyed("k")) == b"v:k"  # the same file: a hit
        await cacheme.invalidate(Keyed("k"))
        assert await cacheme.get(Keyed("k")) == b"v:k"

    try:
        asyncio.run(setup())
        assert os.path.isabs(databases[0]) and os.path.samefile(databases[0], first / "rel.db")
        monkeypatch.chdir(second)
        asyncio.run(later())  # another event loop: a driver of its own
    finally:
        asyncio.run(cacheme.close_storages())
    assert loads == ["k", "k"]
    assert list(second.iterdir()) == []  # no stray database in the new directory


# -- 6. no "never retrieved" noise from PostgreSQL ------------------------------------------


def never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.postgres
async def test_a_stop_that_fails_late_is_not_logged_as_never_retrieved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The network to PostgreSQL swallows everything: a write is cut, and the stop of its
    server process cannot even connect; it fails after the storage stopped waiting for it.
    cacheme warns once per cut; asyncio must not add a 'Task exception was never retrieved'."""
    async with (
        sql_table("postgres", tmp_path) as table,
        Proxy(port_of(POSTGRES_URL, 5432)) as proxy,
    ):
        timeout = 0.2
        await cacheme.register_storage(
            "t",
            cacheme.Storage(
                with_port(table.url, proxy.port),
                table=table.table,
                timeout=timeout,
                breaker_threshold=100,
                purge_interval=0,
            ),
        )
        try:
            loading, go = asyncio.Event(), asyncio.Event()

            class Slow(Node):
                def __init__(self, key: str) -> None:
                    self._key = key

                def key(self) -> str:
                    return self._key

                async def load(self) -> str:
                    loading.set()
                    await go.wait()
                    return self._key

                class Meta(Node.Meta):
                    caches = [Cache(storage="t", ttl=timedelta(minutes=5))]
                    serializer = MsgPackSerializer()

            go.set()
            assert await cacheme.get(Slow("warm")) == "warm"
            go.clear()
            loading.clear()
            with caplog.at_level(logging.DEBUG):
                # The read goes through; the network dies while the load runs: the
                # write-back is cut, and the stop of its server process cannot connect.
                get = asyncio.ensure_future(cacheme.get_all([Slow(f"k{i}") for i in range(3)]))
                await loading.wait()
                proxy.hang()
                go.set()
                assert await get == ["k0", "k1", "k2"]
                await asyncio.sleep(4 * timeout)  # the stop fails after the wait gave up
                assert "could not stop the server process" in caplog.text
                assert never_retrieved(caplog) == []
        finally:
            await cacheme.close_storages()


# -- the parsing and grouping helpers, without a server --------------------------------------


@pytest.mark.parametrize(
    ("create", "collation"),
    [
        ('CREATE TABLE t ("key" TEXT NOT NULL PRIMARY KEY, "value" BLOB)', "BINARY"),
        ('CREATE TABLE t ("key" TEXT COLLATE NOCASE PRIMARY KEY, v BLOB)', "NOCASE"),
        (
            "CREATE TABLE t ([key] varchar(10) /* a, b */ collate 'rtrim', CHECK (x IN (1, 2)))",
            "rtrim",
        ),
        ("CREATE TABLE t (`KEY` TEXT -- COLLATE NOCASE\n, v BLOB)", "BINARY"),
        ('CREATE TABLE t ("value" BLOB, "key_2" TEXT COLLATE NOCASE)', None),
        ("CREATE TABLE t AS SELECT 1", None),
    ],
)
def test_sqlite_column_collation(create: str, collation: str | None) -> None:
    from cacheme.storages.sqlite import column_collation

    assert column_collation(create, "key") == collation


def test_mongo_key_groups_stay_under_the_command_budget() -> None:
    from cacheme.storages.mongo import MAX_KEY_BYTES_PER_COMMAND, key_groups

    assert key_groups(["a", "b"]) == [["a", "b"]]
    huge = "k" * (MAX_KEY_BYTES_PER_COMMAND + 1)
    assert key_groups(["a", huge, "b"]) == [["a"], [huge], ["b"]]  # alone, however large
    wide = "\U0001f642" * 1_500_000  # 6 MB of UTF-8 in 1.5 million characters
    assert key_groups([wide, wide, wide]) == [[wide], [wide], [wide]]
