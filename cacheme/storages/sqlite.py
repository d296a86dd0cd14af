"""The SQLite tier: ``Storage(url="sqlite:///path/to/file", table="cache")``.

URLs follow SQLAlchemy: ``sqlite:///relative/path.db`` (relative to the working directory
when the storage is registered: resolved then, once, so every event loop's driver opens the
same file) and ``sqlite:////absolute/path.db``. Create the table first from ``sql/sqlite.sql``. An
in-memory database (``sqlite://``, ``:memory:``) is refused: it would start without the
table, and a cache that lives in the process belongs in a ``local://`` tier anyway.

Never blocking the event loop
    All SQLite work runs through aiosqlite, which owns one ``sqlite3`` connection on its own
    thread; the loop only awaits futures. ``pool_size`` is accepted (so the same options
    work for every SQL tier) but there is always exactly one connection: SQLite allows one
    writer at a time anyway, and the batching of ``RemoteStorage`` already turns the calls
    of one event-loop turn into one statement.

Statements
    The connection is in autocommit mode and every operation is one statement, so each is
    atomic on its own and a timed-out call never leaves a transaction open: reads are
    ``SELECT ... WHERE key IN (?, ?, ...)``, writes one multi-row
    ``INSERT ... ON CONFLICT(key) DO UPDATE``, adds (set-if-absent) the same with
    ``DO UPDATE ... WHERE`` the stored row has expired, removes
    ``DELETE ... WHERE key IN (...)``.
    (A batch with more bound values than SQLite allows in one statement, 32766 since
    SQLite 3.32, is split.) The journal is WAL with ``synchronous=NORMAL``: readers in other
    processes never wait for the writer, and a commit costs no fsync. The busy timeout is the
    storage's ``timeout``, so a write that meets another process's write waits (on the
    SQLite thread, not on the loop) instead of failing at once.

Expiry
    SQLite has no server clock: ``expire`` is computed here, in UTC, and stored as text
    ``YYYY-MM-DD HH:MM:SS.ffffff`` (it sorts like the time it names, and an operator can read
    it); reads compare it with the current UTC time. Expired rows are purged in the
    background (see ``cacheme.storages.sql``).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import sqlite3
import stat
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import aiosqlite

from .. import runtime
from ..errors import ConfigurationError, StorageMisconfiguredError
from .base import Entry, binary
from .sql import SQLOptions, SQLStorage, expire_at, stored_key, stored_keys, utc_now
from .url import redact

# Bound values one statement may carry (SQLITE_MAX_VARIABLE_NUMBER's default).
MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def utc_text(moment: datetime) -> str:
    """``moment`` (aware, UTC) as stored in the ``expire`` column."""
    return moment.strftime(_TIME_FORMAT)


def database_of(url: str, name: str | None = None) -> str:
    """The file that a ``sqlite://`` URL names (errors name the storage ``name`` if given)."""
    parts = urlsplit(url)
    where = f"SQLite URL {redact(url)!r}" if name is None else f"storage {name!r} ({redact(url)})"
    if parts.netloc:
        raise ConfigurationError(
            f"{where} names a host; use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    if parts.query or parts.fragment:
        raise StorageMisconfiguredError(f"{where}: no URL query parameter or fragment is accepted")
    path = unquote(parts.path)
    if path.startswith("/"):
        path = path[1:]  # sqlite:///rel -> "rel"; sqlite:////abs -> "/abs"
    if not path or path == ":memory:" or path.startswith("file:"):
        raise ConfigurationError(
            f"{where} must name a database file, like "
            f"sqlite:///relative/path.db or sqlite:////absolute/path.db (an in-memory "
            f"database would have no table; use a local:// tier for an in-process cache)"
        )
    return path


_HEADER = b"SQLite format 3\x00"


def path_problem(path: str) -> str | None:
    """What makes ``path`` unusable as the database file of a SQLite tier, read from the file
    system (``None`` when nothing is found): a missing directory, a directory or a file
    that is not an SQLite database where the file should be, or no permission to create
    or write it. These are settings to fix, not a server that is down: SQLite would say
    only "unable to open database file" or "file is not a database". Blocking: run it on a
    thread."""
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    try:
        if stat.S_ISDIR(os.stat(full).st_mode):
            return "it is a directory, not a database file"
        exists = True
    except FileNotFoundError:
        exists = False
    except NotADirectoryError:
        return f"{_first_file(parent)} is a file, not a directory"
    except OSError as exc:
        return f"cannot reach it: {exc.strerror or exc}"
    if not exists:
        try:
            if not stat.S_ISDIR(os.stat(parent).st_mode):  # pragma: no cover - NotADirectory
                return f"{parent} is not a directory"
        except FileNotFoundError:
            return (
                f"the directory {parent} does not exist; create it (cacheme creates the "
                f"database file, with `cacheme schema create URL`, not its directory)"
            )
        except OSError as exc:
            return f"cannot reach the directory {parent}: {exc.strerror or exc}"
    if not os.access(parent, os.W_OK | os.X_OK):
        what = "" if exists else "the database file and "
        return f"no permission to create {what}SQLite's -wal and -shm files in {parent}"
    if not exists:
        return None
    if not os.access(full, os.R_OK | os.W_OK):
        return "no permission to read and write it"
    try:
        with open(full, "rb") as file:
            head = file.read(len(_HEADER))
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if head and head != _HEADER:  # an empty file is a new, empty database
        return "it is not a SQLite database file (it does not start with the SQLite header)"
    return None


def _first_file(path: str) -> str:
    """The first component of ``path`` that exists and is not a directory."""
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        head = os.sep.join(parts[:i]) or os.sep
        if os.path.exists(head) and not os.path.isdir(head):
            return head
    return path


# The tokens of an SQLite statement: blanks and comments (dropped), quoted names and strings,
# words, and any other single character.
_TOKEN = re.compile(
    r"""\s+|--[^\n]*|/\*.*?(?:\*/|\Z)|'(?:[^']|'')*'|"(?:[^"]|"")*"|`(?:[^`]|``)*`"""
    r"""|\[[^\]]*\]|\w+|.""",
    re.DOTALL,
)


def _unquoted(token: str) -> str:
    """A name token as SQLite reads it: without its quotes (any of the four kinds)."""
    if token[:1] in ("'", '"', "`"):
        return token[1:-1].replace(token[0] * 2, token[0])
    if token[:1] == "[":
        return token[1:-1]
    return token


def column_collation(create_sql: str, column: str) -> str | None:
    """The collation ``column`` compares with, from its table's ``CREATE TABLE`` statement
    (as ``sqlite_master`` keeps it): the name after ``COLLATE`` in its definition, else
    ``BINARY`` (SQLite's default); ``None`` if the statement defines no such column."""
    tokens = [
        t for t in _TOKEN.findall(create_sql) if not (t.isspace() or t.startswith(("--", "/*")))
    ]
    if "(" not in tokens:
        return None
    parts: list[list[str]] = [[]]
    depth = 0
    for token in tokens[tokens.index("(") + 1 :]:
        if token == "(":
            depth += 1
        elif token == ")":
            if depth == 0:
                break
            depth -= 1
        elif token == "," and depth == 0:
            parts.append([])
            continue
        parts[-1].append(token)
    for part in parts:
        if part and _unquoted(part[0]).lower() == column.lower():
            for i, token in enumerate(part[:-1]):
                if token.upper() == "COLLATE":
                    return _unquoted(part[i + 1])
            return "BINARY"
    return None


# The CREATE TABLE statement of a table (? its name; SQLite's names ignore ASCII case).
TABLE_SQL = "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE"


def key_problems(create_sql: str, indexes: list[tuple[str, list[Any]]]) -> list[str]:
    """What makes a table's ``key`` comparison inexact, from its ``CREATE TABLE`` statement
    (``TABLE_SQL``) and its indexes (name, rows of ``PRAGMA index_xinfo``): a ``COLLATE``
    other than ``BINARY`` on the column or in an index on it (``NOCASE``: 'User' and 'user'
    are one row; ``RTRIM``: 'a' and 'a ' are)."""
    problems: list[str] = []
    collation = column_collation(create_sql, "key") or "BINARY"
    if collation.upper() != "BINARY":
        problems.append(
            f"column 'key' compares with COLLATE {collation}, under which different keys "
            f"(such as 'User' and 'user') are one row; declare it without COLLATE"
        )
    for name, rows in indexes:
        for row in rows:
            # (seqno, cid, column, desc, collation, key column?); an index with the column's
            # own collation is covered by the problem above.
            used = str(row[4]).upper()
            if (
                row[5]
                and str(row[2]).lower() == "key"
                and used not in ("BINARY", collation.upper())
            ):
                problems.append(
                    f"index {name!r} compares column 'key' with COLLATE {row[4]}, under which "
                    f"different keys are one entry; drop the index or recreate it without COLLATE"
                )
    return problems


class SQLiteOptions(SQLOptions):
    """Options of ``sqlite://`` storages (``pool_size`` is accepted and unused)."""


class SQLiteStorage(SQLStorage[SQLiteOptions]):
    """Cache entries in a SQLite table, on aiosqlite's thread."""

    options_model = SQLiteOptions
    options: SQLiteOptions
    schema_file: ClassVar[str] = "sql/sqlite.sql"

    def __init__(self, name: str, url: str, options: SQLiteOptions) -> None:
        super().__init__(name, url, options)
        # Resolved once, here (registration): every event loop's driver opens this file,
        # whatever the working directory is when that loop first uses the storage.
        self.database = os.path.abspath(database_of(url, name))
        self._db: aiosqlite.Connection | None = None
        t = f'"{self.table}"'
        self._select = f'SELECT "key", "value" FROM {t} WHERE ("expire" IS NULL OR "expire" > ?)'
        self._insert = f'INSERT INTO {t} ("key", "value", "expire") VALUES '
        self._upsert = (
            ' ON CONFLICT ("key") DO UPDATE SET "value" = excluded."value", '
            '"expire" = excluded."expire"'
        )
        # An add replaces only a row that has expired (``?``: now): a live one stays.
        self._add_if = f' WHERE {t}."expire" IS NOT NULL AND {t}."expire" <= ?'
        self._delete = f'DELETE FROM {t} WHERE "key" IN '
        self._purge_sql = (
            f'DELETE FROM {t} WHERE "key" IN (SELECT "key" FROM {t} WHERE "expire" <= ? LIMIT ?)'
        )

    def _attach(self, rt: runtime.Runtime) -> SQLiteStorage:
        driver = super()._attach(rt)
        assert isinstance(driver, SQLiteStorage)
        driver.database = self.database  # not resolved again in another directory
        return driver

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ConnectionError("SQLite storage is not connected")
        return self._db

    async def _open(self) -> None:
        problem = await asyncio.to_thread(path_problem, self.database)
        if problem is not None:
            raise StorageMisconfiguredError(
                f"storage {self.name!r} ({redact(self.url)}): SQLite database {self.database}: "
                f"{problem}"
            )
        pending = aiosqlite.connect(
            self.database, isolation_level=None, timeout=self.options.timeout
        )
        # aiosqlite runs each connection on a thread that is not a daemon: a connection that
        # is never closed (a crash, a forgotten close_storages) would keep the interpreter
        # from exiting. The file is in WAL mode; an abrupt exit loses nothing committed.
        worker = getattr(pending, "_thread", None)
        if worker is not None and not worker.is_alive():
            worker.daemon = True
        self._db = await pending
        db = self._db
        await db.execute_fetchall("PRAGMA journal_mode=WAL")
        await db.execute_fetchall("PRAGMA synchronous=NORMAL")
        try:
            await db.execute_fetchall(
                f'SELECT "key", "value", "expire" FROM "{self.table}" LIMIT 0'
            )
        except sqlite3.OperationalError as exc:
            raise self._missing_table(exc) from exc
        await self._check_key_collation(db)

    async def _check_key_collation(self, db: aiosqlite.Connection) -> None:
        """Refuse a ``key`` column, or an index on it, that does not compare with ``BINARY``
        (see ``key_problems``)."""
        rows = list(await db.execute_fetchall(TABLE_SQL, (self.table,)))
        indexes = []
        for index in await db.execute_fetchall(f'PRAGMA index_list("{self.table}")'):
            name = str(index[1])
            indexes.append((name, list(await db.execute_fetchall(f'PRAGMA index_xinfo("{name}")'))))
        self._check_columns(key_problems(str(rows[0][0] or "") if rows else "", indexes))

    async def _shutdown(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        wanted = stored_keys(keys)
        stored = list(wanted)
        now = utc_text(utc_now())
        found: dict[str, bytes] = {}
        step = MAX_VARIABLES - 1
        for i in range(0, len(stored), step):
            chunk = stored[i : i + step]
            sql = f'{self._select} AND "key" IN ({",".join("?" * len(chunk))})'
            for key, value in await self.db.execute_fetchall(sql, [now, *chunk]):
                cache_key = wanted.get(key)
                if cache_key is not None:  # (an exact match, see _check_key_collation)
                    found[cache_key] = binary(self.name, value)
        return found

    async def _ttl_many(self, keys: Sequence[str]) -> dict[str, float]:
        wanted = stored_keys(keys)
        stored = list(wanted)
        now = utc_now()
        text = utc_text(now)
        left: dict[str, float] = {}
        step = MAX_VARIABLES - 1
        t = f'"{self.table}"'
        for i in range(0, len(stored), step):
            chunk = stored[i : i + step]
            sql = (
                f'SELECT "key", "expire" FROM {t} WHERE ("expire" IS NULL OR "expire" > ?) '
                f'AND "key" IN ({",".join("?" * len(chunk))})'
            )
            for key, expire in await self.db.execute_fetchall(sql, [text, *chunk]):
                if expire is None:
                    left[wanted[key]] = math.inf
                else:
                    moment = datetime.strptime(expire, _TIME_FORMAT).replace(tzinfo=timezone.utc)
                    left[wanted[key]] = max(0.0, (moment - now).total_seconds())
        return left

    async def _set_many(self, entries: Sequence[Entry]) -> None:
        await self._write(entries, add=False)

    async def _add_many(self, entries: Sequence[Entry]) -> None:
        await self._write(entries, add=True)

    async def _write(self, entries: Sequence[Entry], *, add: bool) -> None:
        now = utc_now()
        rows: list[Any] = []
        for e in entries:
            expire = expire_at(e.ttl_ms, now)
            rows.append((stored_key(e.key), e.value, None if expire is None else utc_text(expire)))
        step = (MAX_VARIABLES - 1) // 3
        tail = self._upsert + self._add_if if add else self._upsert
        extra = [utc_text(now)] if add else []
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            sql = self._insert + ",".join(["(?,?,?)"] * len(chunk)) + tail
            await self.db.execute_fetchall(sql, [v for row in chunk for v in row] + extra)

    async def _remove_many(self, keys: Sequence[str]) -> None:
        stored = list(stored_keys(keys))
        for i in range(0, len(stored), MAX_VARIABLES):
            chunk = stored[i : i + MAX_VARIABLES]
            await self.db.execute_fetchall(f"{self._delete}({','.join('?' * len(chunk))})", chunk)

    async def _purge(self, limit: int) -> int:
        async with self.db.execute(self._purge_sql, (utc_text(utc_now()), limit)) as cursor:
            return max(cursor.rowcount, 0)
