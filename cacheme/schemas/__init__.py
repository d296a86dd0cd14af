"""The shipped schemas of the SQL and MongoDB tiers, and code that applies and verifies them.

Files (the same text as the repository's ``sql/`` folder; a test keeps them identical):
``sqlite.sql``, ``postgresql.sql``, ``mysql.sql`` (one table ``cacheme_data`` with the columns
``key``, ``value``, ``expire`` and an index on ``expire``) and ``mongo.js`` (a collection
``cacheme_data`` with a unique index on ``key`` and a TTL index on ``expire``). Read one with
``schema_text("postgresql")``.

``create(url, ...)`` creates the table or the collection and its indexes (safe to run again:
what exists is kept). ``check(url, ...)`` reports whether a storage URL is reachable and its
table or collection is as the schema says. Both talk to the server with its driver directly
(sqlite3, asyncpg, asyncmy, PyMongo), not through a storage, so they work before the schema
exists. ``cacheme schema create`` and ``cacheme check`` (``cacheme/cli.py``) are built on
them.

Errors: ``ConfigurationError`` (a bad URL or option, a scheme with no schema),
``MissingDriverError`` (the driver's extra is not installed), ``StorageError`` (the server
could not be reached, or refused a statement).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import ConfigurationError, StorageError, StorageMisconfiguredError
from ..storages.base import BaseStorage, RemoteStorage
from ..storages.registry import Storage
from ..storages.url import redact, scheme_of, scrub, secrets_of

__all__ = [
    "SCHEMA_FILES",
    "CheckReport",
    "check",
    "create",
    "mongo_indexes",
    "schema_kind",
    "schema_text",
    "sql_statements",
]

# The schema file of each kind of storage that needs one.
SCHEMA_FILES = {
    "sqlite": "sqlite.sql",
    "postgresql": "postgresql.sql",
    "mysql": "mysql.sql",
    "mongodb": "mongo.js",
}
_KIND_OF_SCHEME = {"postgres": "postgresql"}
DEFAULT_TABLE = "cacheme_data"
_PROBE_KEY = "cacheme:check:probe"


def schema_kind(url: str) -> str | None:
    """``"sqlite"``, ``"postgresql"``, ``"mysql"`` or ``"mongodb"`` for a URL that needs a
    schema; ``None`` for one that does not (``redis://``, ``local://``)."""
    scheme = scheme_of(url)
    kind = _KIND_OF_SCHEME.get(scheme, scheme)
    return kind if kind in SCHEMA_FILES else None


def schema_text(kind: str) -> str:
    """The text of the shipped schema file for ``kind`` (a key of ``SCHEMA_FILES``)."""
    try:
        name = SCHEMA_FILES[kind]
    except KeyError:
        raise ConfigurationError(
            f"no schema for {kind!r}; schemas exist for {', '.join(SCHEMA_FILES)}"
        ) from None
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def sql_statements(kind: str, table: str = DEFAULT_TABLE) -> list[str]:
    """The statements of the SQL schema for ``kind``, for ``table``, comments removed.

    ``table`` must be a plain SQL identifier (``ConfigurationError`` otherwise). On
    PostgreSQL the name is quoted, as the storage quotes it, so it is used exactly as given.
    """
    from ..storages.sql import validate_identifier

    validate_identifier("table", table)
    if kind == "mongodb" or kind not in SCHEMA_FILES:
        raise ConfigurationError(f"no SQL schema for {kind!r}")
    text = re.sub(r"--[^\n]*", "", schema_text(kind))
    if kind == "postgresql":
        text = text.replace("cacheme_data_expire", f'"{table}_expire"')
        text = re.sub(r"\bcacheme_data\b", f'"{table}"', text)
    else:
        text = text.replace("cacheme_data", table)
    return [s.strip() for s in text.split(";") if s.strip()]


_CREATE_INDEX = re.compile(r"\.createIndex\(\s*(\{[^{}]*\})\s*,\s*(\{[^{}]*\})\s*\)")
_BARE_NAME = re.compile(r"([{,]\s*)([A-Za-z_$][\w$]*)\s*:")


def mongo_indexes() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(keys, options)`` of every ``createIndex`` call in ``mongo.js``."""
    code = "\n".join(
        line for line in schema_text("mongodb").splitlines() if not line.lstrip().startswith("//")
    )
    return [
        (json.loads(_BARE_NAME.sub(r'\1"\2":', keys)), json.loads(_BARE_NAME.sub(r'\1"\2":', opts)))
        for keys, opts in _CREATE_INDEX.findall(code)
    ]


@dataclass
class CheckReport:
    """What ``check`` found: ``ok`` lines (what is right) and ``problems`` (what is not)."""

    url: str  # redacted
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def shown(url: str) -> str:
    """``url`` fit to print: as written when it holds no secret, else redacted."""
    return redact(url) if secrets_of(url) else url


def _backend(url: str, options: dict[str, Any]) -> BaseStorage[Any]:
    """The storage ``url`` would be, built (not connected) to validate URL and options."""
    return Storage(url, **options).build("cacheme-cli")


def _merged(mapping: Mapping[str, Any] | None, options: dict[str, Any]) -> dict[str, Any]:
    """The storage options given as a mapping and as keywords; a name given both ways is a
    ``ConfigurationError`` (which of the two was meant cannot be told)."""
    if mapping is None:
        return options
    if not isinstance(mapping, Mapping):
        raise ConfigurationError(f"storage_options must be a mapping, got {mapping!r}")
    if "url" in mapping:
        raise ConfigurationError(
            "storage_options: 'url' is not a storage option; the URL is the first argument"
        )
    both = sorted(set(mapping) & set(options))
    if both:
        raise ConfigurationError(
            f"storage option(s) {', '.join(map(repr, both))} given both in storage_options "
            f"and as keywords"
        )
    return {**mapping, **options}


def _unreachable(url: str, exc: BaseException) -> StorageError:
    text = scrub(f"{type(exc).__name__}: {exc}", url)
    return StorageError(f"{shown(url)}: cannot connect: {text}")


# -- create -------------------------------------------------------------------------------


async def create(
    url: str,
    *,
    timeout: float = 10.0,
    storage_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> list[str]:
    """Create the table (or collection) and indexes that the storage at ``url`` needs.

    ``options`` are the storage's (``table=`` for SQL, ``database=`` / ``collection=`` for
    MongoDB) and are validated as ``cacheme.Storage`` does; ``storage_options`` takes them
    as a mapping too, for a name that is also a parameter here (the storage's own
    ``timeout``). ``timeout`` bounds the whole operation, in seconds. Returns one line per
    step done. Raises ``ConfigurationError`` for a URL without a schema (``redis://``,
    ``local://``) or a bad option,
    ``MissingDriverError``, or ``StorageError`` (unreachable, timed out, statement refused).
    """
    kind = schema_kind(url)
    if kind is None:
        raise ConfigurationError(
            f"{shown(url)}: {scheme_of(url)}:// storages need no schema; "
            f"schemas exist for {', '.join(SCHEMA_FILES)}"
        )
    backend = _backend(url, _merged(storage_options, options))
    try:
        return await asyncio.wait_for(_create(kind, url, backend), timeout)
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise StorageError(f"{shown(url)}: no answer within {timeout:g}s") from exc


async def _create(kind: str, url: str, backend: Any) -> list[str]:
    if kind == "mongodb":
        return await _create_mongo(url, backend)
    table: str = backend.table
    statements = sql_statements(kind, table)
    done = [f"created table {table!r} (if missing) and its index on expire"]
    if kind == "sqlite":
        from ..storages.sqlite import database_of

        path = database_of(url)
        await _sqlite_path_ok(url, path)
        try:
            await asyncio.to_thread(_run_sqlite, path, statements)
        except sqlite3.Error as exc:
            raise StorageError(f"{shown(url)}: {exc}") from exc
        return [*done, f"in SQLite database {path}"]
    async with _SQLConnection(kind, url) as run:
        for statement in statements:
            await run(statement, ())
    return done


async def _sqlite_path_ok(url: str, path: str) -> None:
    """``StorageMisconfiguredError`` when ``path`` cannot be the database file of a SQLite
    tier (a missing directory, say), as ``register_storage`` refuses it."""
    from ..storages.sqlite import path_problem

    problem = await asyncio.to_thread(path_problem, path)
    if problem is not None:
        raise StorageMisconfiguredError(f"{shown(url)}: SQLite database {path}: {problem}")


def _run_sqlite(path: str, statements: list[str]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement)
    finally:
        db.close()


class _SQLConnection:
    """``async with _SQLConnection(kind, url) as run``: ``await run(sql, args)`` -> rows."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.conn: Any = None

    async def __aenter__(self) -> Any:
        try:
            if self.kind == "postgresql":
                import asyncpg

                from ..storages.postgres import dsn_of

                self.conn = await asyncpg.connect(dsn_of(self.url))
            else:
                import asyncmy

                from ..storages.mysql import connect_args

                self.conn = await asyncmy.connect(
                    charset="utf8mb4", autocommit=True, **connect_args(self.url)
                )
                # CREATE ... IF NOT EXISTS of what exists is expected here: without this the
                # server notes it, and the driver logs the note as a warning.
                async with self.conn.cursor() as cur:
                    await cur.execute("SET SESSION sql_notes = 0")
        except ConfigurationError:
            raise
        except Exception as exc:
            raise _unreachable(self.url, exc) from exc
        return self.run

    async def run(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            if self.kind == "postgresql":
                return [tuple(r) for r in await self.conn.fetch(sql, *args)]
            async with self.conn.cursor() as cur:
                await cur.execute(sql, args)
                return [tuple(r) for r in (await cur.fetchall() or [])]
        except Exception as exc:
            raise StorageError(f"{shown(self.url)}: {scrub(str(exc), self.url)}") from exc

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is None:
            return
        if self.kind == "postgresql":
            await self.conn.close()
        else:
            await self.conn.ensure_closed()


def _mongo_client(url: str, timeout_ms: int) -> Any:
    from pymongo import AsyncMongoClient

    return AsyncMongoClient(
        url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms, appname="cacheme"
    )


async def _create_mongo(url: str, backend: Any) -> list[str]:
    from pymongo.errors import PyMongoError

    client = _mongo_client(url, 5000)
    try:
        db = client[backend.database]
        name = backend.collection
        try:
            if name not in await db.list_collection_names():
                await db.create_collection(name)
            made = []
            for keys, opts in mongo_indexes():
                made.append(await db[name].create_index(list(keys.items()), **opts))
        except PyMongoError as exc:
            raise _unreachable(url, exc) from exc
        return [
            f"created collection {backend.database}.{name} (if missing)",
            f"created indexes {', '.join(made)} (if missing)",
        ]
    finally:
        await client.close()


# -- check --------------------------------------------------------------------------------


async def check(
    url: str,
    *,
    timeout: float = 10.0,
    storage_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> CheckReport:
    """Whether the storage at ``url`` is reachable and has the schema its tier needs.

    For SQL: the table exists with the columns ``key``, ``value``, ``expire``, ``key`` is
    unique (primary key) and ``expire`` is indexed. For MongoDB: the collection exists with
    a unique index on ``key`` and a TTL index on ``expire``. Then, for every remote storage
    (Redis too), a cacheme storage connects and reads one key. A ``local://`` URL passes
    with nothing to check. ``timeout`` bounds each of the two steps, in seconds.
    ``options`` are the storage's, as for ``create``; ``storage_options`` takes them as a
    mapping too (the storage's own ``timeout``, for one, bounds each operation of the
    cacheme storage that connects).

    Returns a ``CheckReport``; raises ``ConfigurationError`` or ``MissingDriverError`` for a
    bad URL, option or missing driver, and ``StorageError`` when the server cannot be
    reached (or does not answer within ``timeout``).
    """
    options = _merged(storage_options, options)
    backend = _backend(url, options)
    report = CheckReport(url=shown(url))
    if not isinstance(backend, RemoteStorage):
        report.ok.append("local tier: in-process, nothing to check")
        return report
    kind = schema_kind(url)
    try:
        if kind is not None:
            await asyncio.wait_for(_check_schema(kind, url, backend, report), timeout)
        if report.passed:
            try:
                await asyncio.wait_for(_probe(url, options), timeout)
            except StorageMisconfiguredError as exc:  # e.g. what register_storage refuses
                report.problems.append(str(exc))
                return report
            report.ok.append(f"a cacheme storage connected and read a key ({_PROBE_KEY!r})")
    except StorageError:
        raise
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise StorageError(f"{shown(url)}: no answer within {timeout:g}s") from exc
    return report


async def _probe(url: str, options: dict[str, Any]) -> None:
    """Connect a real storage and read one key: what a node's tier will do."""
    probe = Storage(url, **options).build("cacheme-check")
    assert isinstance(probe, RemoteStorage)
    await probe.connect()
    try:
        await probe.get_many([_PROBE_KEY])
    finally:
        await probe.close()


async def _check_schema(kind: str, url: str, backend: Any, report: CheckReport) -> None:
    if kind == "mongodb":
        await _check_mongo(url, backend, report)
        return
    table: str = backend.table
    if kind == "sqlite":
        from ..storages.sqlite import database_of

        path = database_of(url)
        await _sqlite_path_ok(url, path)
        if not await asyncio.to_thread(os.path.exists, path):
            report.problems.append(
                f"SQLite database file {path} does not exist; create it and the table with: "
                f"cacheme schema create URL --table {table}"
            )
            return
        try:
            columns, indexes, wrong = await asyncio.to_thread(_inspect_sqlite, path, table)
        except sqlite3.Error as exc:
            raise _unreachable(url, exc) from exc
    else:
        async with _SQLConnection(kind, url) as run:
            if kind == "postgresql":
                columns, indexes, wrong = await _inspect_postgres(run, table)
            else:
                columns, indexes, wrong = await _inspect_mysql(run, table)
    fix = f"create it with: cacheme schema create URL --table {table}"
    if not columns:
        report.problems.append(f"table {table!r} does not exist; {fix}")
        return
    report.ok.append(f"table {table!r} exists")
    missing = [c for c in ("key", "value", "expire") if c not in columns]
    if missing:
        report.problems.append(
            f"table {table!r} lacks the column(s) {', '.join(missing)} (has "
            f"{', '.join(sorted(columns))}); it was not made from the {SCHEMA_FILES[kind]} schema"
        )
    else:
        report.ok.append("columns key, value, expire")
    # What register_storage refuses too: a key compared inexactly or too short, a value
    # column that is not binary.
    report.problems += [f"table {table!r}: {problem}" for problem in wrong]
    if not wrong and not missing:
        report.ok.append("key compared exactly (binary), value binary")
    if any(unique and cols == ["key"] for cols, unique in indexes):
        report.ok.append("key is unique (primary key)")
    else:
        report.problems.append(f"table {table!r}: key is not a primary key or unique index")
    if any(cols[:1] == ["expire"] for cols, _ in indexes):
        report.ok.append("expire is indexed")
    else:
        report.problems.append(
            f"table {table!r} has no index on expire (purges of expired rows scan the table); {fix}"
        )


Indexes = list[tuple[list[str], bool]]  # (columns in order, unique)


def _inspect_sqlite(path: str, table: str) -> tuple[set[str], Indexes, list[str]]:
    from ..storages.sqlite import TABLE_SQL, key_problems

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # never creates the file
    try:
        info = db.execute(f'PRAGMA table_info("{table}")').fetchall()
        columns = {row[1] for row in info}
        indexes: Indexes = []
        pk = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5]]
        if pk:
            indexes.append((pk, True))
        xinfo = []
        for row in db.execute(f'PRAGMA index_list("{table}")').fetchall():
            cols = [r[2] for r in db.execute(f'PRAGMA index_info("{row[1]}")').fetchall()]
            indexes.append((cols, bool(row[2])))
            xinfo.append((str(row[1]), db.execute(f'PRAGMA index_xinfo("{row[1]}")').fetchall()))
        created = db.execute(TABLE_SQL, (table,)).fetchone()
        wrong = key_problems(str(created[0] or "") if created else "", xinfo)
        return columns, indexes, wrong
    finally:
        db.close()


async def _inspect_postgres(run: Any, table: str) -> tuple[set[str], Indexes, list[str]]:
    from ..storages.postgres import COLUMNS_QUERY, column_problems

    rows = await run(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1",
        (table,),
    )
    columns = {r[0] for r in rows}
    rows = await run(
        "SELECT ix.indisunique, array_agg(a.attname ORDER BY k.n) "
        "FROM pg_index ix "
        "JOIN pg_class t ON t.oid = ix.indrelid "
        "JOIN pg_namespace ns ON ns.oid = t.relnamespace "
        "CROSS JOIN LATERAL unnest(ix.indkey) WITH ORDINALITY AS k(attnum, n) "
        "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
        "WHERE t.relname = $1 AND ns.nspname = current_schema() "
        "GROUP BY ix.indexrelid, ix.indisunique",
        (table,),
    )
    wrong = column_problems(await run(COLUMNS_QUERY, (f'"{table}"',))) if columns else []
    return columns, [(list(r[1]), bool(r[0])) for r in rows], wrong


async def _inspect_mysql(run: Any, table: str) -> tuple[set[str], Indexes, list[str]]:
    from ..storages.mysql import COLUMNS_QUERY, column_problems

    rows = await run(
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
        (table,),
    )
    columns = {str(r[0]) for r in rows}
    rows = await run(
        "SELECT INDEX_NAME, COLUMN_NAME, NON_UNIQUE FROM information_schema.STATISTICS "
        "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s ORDER BY INDEX_NAME, SEQ_IN_INDEX",
        (table,),
    )
    by_name: dict[str, tuple[list[str], bool]] = {}
    for name, column, non_unique in rows:
        cols, _ = by_name.setdefault(str(name), ([], not int(non_unique)))
        cols.append(str(column))
    wrong = column_problems(await run(COLUMNS_QUERY, (table,))) if columns else []
    return columns, list(by_name.values()), wrong


async def _check_mongo(url: str, backend: Any, report: CheckReport) -> None:
    from pymongo.errors import PyMongoError

    client = _mongo_client(url, 5000)
    try:
        db = client[backend.database]
        name = backend.collection
        where = f"{backend.database}.{name}"
        try:
            await client.admin.command("ping")
            infos = await (await db.list_collections(filter={"name": name})).to_list()
            exists = bool(infos)
            indexes = await db[name].index_information() if exists else {}
        except PyMongoError as exc:
            raise _unreachable(url, exc) from exc
    finally:
        await client.close()
    fix = f"create it with: cacheme schema create URL --collection {name}"
    if not exists:
        report.problems.append(f"collection {where} does not exist; {fix}")
        return
    report.ok.append(f"collection {where} exists")
    by_key = {tuple(tuple(k) for k in spec["key"]): spec for spec in indexes.values()}
    if by_key.get((("key", 1),), {}).get("unique", False):
        report.ok.append("unique index on key")
    else:
        report.problems.append(f"collection {where} has no unique index on key; {fix}")
    if by_key.get((("expire", 1),), {}).get("expireAfterSeconds") is not None:
        report.ok.append("TTL index on expire")
    else:
        report.problems.append(f"collection {where} has no TTL index on expire; {fix}")
    from ..storages.mongo import inexact

    # What register_storage refuses too: keys compared by a collation ('User' = 'user').
    collation = infos[0].get("options", {}).get("collation")
    inexact_here = []
    if inexact(collation):
        inexact_here.append(f"the collection's default collation is {dict(collation)}")
    inexact_here += [
        f"index {index!r} on key has the collation {dict(spec['collation'])}"
        for index, spec in indexes.items()
        if any(k == "key" for k, _ in spec["key"]) and inexact(spec.get("collation"))
    ]
    for problem in inexact_here:
        report.problems.append(
            f"collection {where}: {problem}, under which different keys (such as 'User' and "
            f"'user') are one entry; recreate it without a collation"
        )
    if not inexact_here:
        report.ok.append("keys compared exactly (no collation)")
