"""The MySQL / MariaDB tier: ``Storage("mysql://user:pw@host:3306/db", table="cache")``.

Create the table first from ``sql/mysql.sql``: ``key`` is ``VARCHAR(255)`` in ``utf8mb4``
with the ``utf8mb4_bin`` collation (so ``Case`` and ``case`` are different keys), ``value``
is ``LONGBLOB``, ``expire`` is ``DATETIME(6)`` in UTC. ``mysql+asyncmy://`` is accepted
too; the only query parameter is ``unix_socket=/path/to/mysqld.sock``.

The driver: asyncmy
    Both asyncio drivers were checked on this project's machines (MariaDB 10.11; asyncmy
    0.2.18, aiomysql 0.3.2 on PyMySQL 1.1.3) with values holding NUL and 0xFF bytes,
    invalid UTF-8, an empty value and a 1 MiB value, and with utf8mb4 keys (emoji,
    ``Case``/``case``): both round-trip them all. asyncmy was chosen because aiomysql 0.3.2
    breaks on ``bytes`` parameters with PyMySQL >= 1.2 (so it needs a ``PyMySQL<1.2`` pin
    that would hold users' other code back), while asyncmy is self-contained (a compiled
    protocol, no PyMySQL); it also answered a one-key read in about half aiomysql's time
    (126 µs against 238 µs median). The connection sets ``binary_prefix`` so that any bytes
    parameter goes as ``_binary'...'`` (MySQL 8 warns about plain literals that are not
    valid UTF-8); values themselves go as hex literals, below.

Statements (each one round trip)
    read    ``SELECT ... WHERE `key` IN (...) AND (expire IS NULL OR
            expire > UTC_TIMESTAMP(6))``, several statements on one connection when the
            keys would pass ``max_allowed_packet`` (removals likewise)
    write   one multi-row ``INSERT ... ON DUPLICATE KEY UPDATE``, rows sorted by key so
            concurrent batches lock rows in the same order. A batch larger than the
            server's ``max_allowed_packet`` (read at connect; 16 MiB on MariaDB 10.11,
            64 MiB on MySQL 8) is split into several statements on one connection.
            Values travel as hex literals (``X'...'``: nothing to escape, about 5x faster
            than asyncmy's escaping of binary data), so one value must stay under half of
            ``max_allowed_packet`` (8 MiB on MariaDB's default); a larger one fails with a
            clear error while the rest of its batch is still written. On MariaDB the
            update uses ``VALUES(col)``; on MySQL >= 8.0.19 the row alias ``AS new``
            (``VALUES()`` there is deprecated and would make the server attach a warning
            to every write).
    add     the same ``INSERT``, whose update keeps a live row: ``value = IF(expire <=
            UTC_TIMESTAMP(6), new value, value)``, then ``expire`` likewise (in that order:
            MySQL assigns left to right, so ``expire`` must change last) (set-if-absent;
            an expired row counts as absent)
    remove  ``DELETE ... WHERE `key` IN (...)``

Expiry
    Computed by the server: ``expire = UTC_TIMESTAMP(6) + INTERVAL ttl MICROSECOND``, and
    reads compare with ``UTC_TIMESTAMP(6)`` (never ``NOW()``, which follows the session
    time zone). One clock decides; millisecond TTLs work. Expired rows are purged in the
    background (see ``cacheme.storages.sql``).

Connections run in autocommit, with a strict ``sql_mode`` of their own (``SQL_MODE``): a key
or value too long for its column is an error for that entry, never cut short in silence.
The table check refuses a ``key`` column that is not a ``utf8mb4`` string of at least 255
characters with a binary collation, and a ``value`` column that is not binary (see
``column_problems``). A connection whose statement was interrupted (a timeout,
a cancellation, an error) is closed, not returned to the pool, so no later caller can read
the rest of an old answer.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncmy
from asyncmy import errors as mysql_errors

from ..errors import ConfigurationError, StorageMisconfiguredError
from .base import Entry, binary
from .sql import MAX_KEY_LENGTH, SQLOptions, SQLStorage, stored_key, stored_keys
from .url import redact

# Bytes reserved in each statement for everything but the rows.
_STATEMENT_OVERHEAD = 4096
# Per row, besides the escaped value: the escaped key (4 bytes a character, doubled by
# escaping at worst), the TTL, the _binary prefix, quotes and commas.
_ROW_OVERHEAD = 96
# Per key of an IN (...) list, besides the escaped key: quotes, comma and space.
_KEY_OVERHEAD = 8

# The session's sql_mode, whatever the server's default: strict, so a value or key that does
# not fit its column is an error for that entry, never silently cut (a key cut to the column's
# length would be another key's row); and none of the modes that change how statements read
# (ANSI_QUOTES, NO_BACKSLASH_ESCAPES, PAD_CHAR_TO_FULL_LENGTH...).
SQL_MODE = "STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION"
_INIT_COMMAND = f"SET SESSION sql_mode = '{SQL_MODE}'"

# What the key and value columns may be (information_schema.COLUMNS.DATA_TYPE): a BINARY(n)
# value would come back padded with zero bytes.
_KEY_TYPES = ("varchar", "char")
# TINYBLOB (255 bytes) and VARBINARY(n) hold too little for cache values: every larger write
# would fail (review 43: VARBINARY(50) passed the check, then every write failed).
_VALUE_TYPES = ("blob", "mediumblob", "longblob")


class MySQLOptions(SQLOptions):
    """Options of ``mysql://`` storages."""


def connect_args(url: str, name: str | None = None) -> dict[str, Any]:
    """asyncmy's connection arguments for ``url`` (``ConfigurationError`` if it is wrong,
    naming the storage ``name`` when given)."""
    parts = urlsplit(url)
    where = f"MySQL URL {redact(url)!r}" if name is None else f"storage {name!r} ({redact(url)})"
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ConfigurationError(f"{where} must name one database: mysql://user:pw@host:3306/db")
    args: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": database,
    }
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "unix_socket":
            args["unix_socket"] = value
        else:
            raise StorageMisconfiguredError(
                f"{where}: unknown URL query parameter {key!r} (accepted: unix_socket)"
            )
    return args


# The type, length, character set and collation of the key and value columns (%s: the table).
COLUMNS_QUERY = (
    "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_MAXIMUM_LENGTH, CHARACTER_SET_NAME, "
    "COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
    "AND TABLE_NAME = %s AND COLUMN_NAME IN ('key', 'value')"
)


def column_problems(rows: Sequence[Sequence[Any]]) -> list[str]:
    """What is wrong with the ``key`` and ``value`` columns, from their rows of
    ``COLUMNS_QUERY`` (name, data type, length, character set, collation): a key column
    that is not a utf8mb4 string of at least 255 characters compared by a binary collation
    (``utf8mb4_general_ci`` makes 'User' and 'user' one row), a value column that is not
    binary."""
    problems: list[str] = []
    for name, data_type, length, charset, collation in rows:
        name, data_type = str(name), str(data_type).lower()
        if name == "key":
            fix = "make it VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            if data_type not in _KEY_TYPES:
                problems.append(f"column 'key' is {data_type.upper()}; {fix}")
                continue
            if length is not None and int(length) < MAX_KEY_LENGTH:
                problems.append(
                    f"column 'key' holds at most {int(length)} characters, and cacheme writes "
                    f"keys of up to {MAX_KEY_LENGTH}; {fix}"
                )
            if str(charset).lower() != "utf8mb4":
                problems.append(
                    f"column 'key' has the character set {charset}, which cannot hold every "
                    f"key; {fix}"
                )
            if not str(collation).lower().endswith("_bin"):
                problems.append(
                    f"column 'key' compares with the collation {collation}, under which "
                    f"different keys (such as 'User' and 'user') are one row; {fix}"
                )
        elif name == "value" and data_type not in _VALUE_TYPES:
            problems.append(
                f"column 'value' is {data_type.upper()}, not a BLOB large enough for cache "
                f"values (bytes); make it LONGBLOB"
            )
    return problems


def row_alias_supported(version: str) -> bool:
    """Whether the server (``SELECT VERSION()``) takes ``INSERT ... AS new``."""
    if "mariadb" in version.lower():
        return False
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return bool(match) and tuple(map(int, match.groups())) >= (8, 0, 19)  # type: ignore[union-attr]


class MySQLStorage(SQLStorage[MySQLOptions]):
    """Cache entries in a MySQL or MariaDB table, through an asyncmy pool."""

    options_model = MySQLOptions

    def misconfigured(self, exc: BaseException) -> bool:
        # Access denied to the database or for the user, unknown database.
        return isinstance(exc, mysql_errors.OperationalError) and bool(
            exc.args and exc.args[0] in (1044, 1045, 1049, 1698)
        )

    options: MySQLOptions
    schema_file: ClassVar[str] = "sql/mysql.sql"

    def __init__(self, name: str, url: str, options: MySQLOptions) -> None:
        super().__init__(name, url, options)
        self._connect_args = connect_args(url, name)
        self._pool: Any = None  # asyncmy.Pool
        self.max_packet = 16 * 1024 * 1024  # replaced by the server's value at connect
        self.server_version = ""
        t = f"`{self.table}`"
        self._select = (
            f"SELECT `key`, `value` FROM {t} "
            f"WHERE (`expire` IS NULL OR `expire` > UTC_TIMESTAMP(6)) AND `key` IN "
        )
        self._ttl_select = (
            f"SELECT `key`, TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), `expire`) FROM {t} "
            f"WHERE (`expire` IS NULL OR `expire` > UTC_TIMESTAMP(6)) AND `key` IN "
        )
        self._insert = f"INSERT INTO {t} (`key`, `value`, `expire`) VALUES "
        self._on_duplicate = (
            " ON DUPLICATE KEY UPDATE `value` = VALUES(`value`), `expire` = VALUES(`expire`)"
        )
        self._on_duplicate_add = self._add_clause("VALUES(`value`)", "VALUES(`expire`)")
        self._delete = f"DELETE FROM {t} WHERE `key` IN "
        self._purge_sql = (
            f"DELETE FROM {t} WHERE `expire` <= UTC_TIMESTAMP(6) ORDER BY `expire` LIMIT %s"
        )

    async def _open(self) -> None:
        size = self.options.pool_size
        self._pool = await asyncmy.create_pool(
            minsize=min(2, size),
            maxsize=size,
            charset="utf8mb4",
            autocommit=True,
            binary_prefix=True,
            connect_timeout=max(1, round(self.options.timeout)),
            init_command=_INIT_COMMAND,
            **self._connect_args,
        )
        rows = await self._run([("SELECT VERSION(), @@max_allowed_packet", ())], fetch=True)
        self.server_version, self.max_packet = str(rows[0][0]), int(rows[0][1])
        if row_alias_supported(self.server_version):
            self._on_duplicate = (
                " AS new ON DUPLICATE KEY UPDATE `value` = new.`value`, `expire` = new.`expire`"
            )
            self._on_duplicate_add = " AS new" + self._add_clause("new.`value`", "new.`expire`")
        try:
            await self._run(
                [(f"SELECT `key`, `value`, `expire` FROM `{self.table}` LIMIT 0", ())], fetch=True
            )
        except mysql_errors.MySQLError as exc:
            if exc.args and exc.args[0] in (1054, 1146):  # no such column, no such table
                raise self._missing_table(exc) from exc
            raise
        rows = await self._run([(COLUMNS_QUERY, (self.table,))], fetch=True)
        self._check_columns(column_problems(rows))

    async def _shutdown(self) -> None:
        await self._close_stopper()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            try:  # a graceful close talks to the server: bounded, then cut
                await asyncio.wait_for(pool.wait_closed(), self.options.timeout)
            except Exception:
                pool.terminate()
            except BaseException:
                pool.terminate()
                raise

    async def _run(
        self, statements: Sequence[tuple[str, Sequence[Any]]], *, fetch: bool = False
    ) -> list[Any]:
        """Run ``statements`` on one pooled connection; the rows (``fetch``) or row counts."""
        if self._pool is None:
            raise ConnectionError("MySQL storage is not connected")
        pool = self._pool
        conn = await pool.acquire()
        cut = None
        try:
            cursor = conn.cursor()
            out: list[Any] = []
            for sql, args in statements:
                await cursor.execute(sql, args)
                if fetch:
                    out.extend(await cursor.fetchall())
                else:
                    out.append(cursor.rowcount)
            return out
        except BaseException:
            cut = conn.thread_id()
            conn.close()  # interrupted mid-answer: never hand it to another caller
            raise
        finally:
            pool.release(conn)  # first: the stop below may need its place in the pool
            if cut is not None and not fetch:
                await self._stop_cut(cut, "server thread")

    # The stop of a write cut short (see SQLStorage._stop_cut).

    async def _stopper_connect(self) -> Any:
        return await asyncmy.connect(
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=max(1, round(self.options.timeout)),
            **self._connect_args,
        )

    async def _stop_on(self, conn: Any, ident: int) -> None:
        try:
            await conn.cursor().execute("KILL %s", (ident,))
        except mysql_errors.MySQLError as exc:
            if not (exc.args and exc.args[0] == 1094):  # unknown thread: gone already
                raise

    async def _stopper_close(self, conn: Any) -> None:
        conn.close()

    def _key_statements(self, head: str, keys: list[str]) -> list[tuple[str, list[str]]]:
        """``head`` + ``(%s, ...)`` for ``keys``, as several statements when one would be
        larger than the server's ``max_allowed_packet`` (a batch of many long keys)."""
        budget = self.max_packet - _STATEMENT_OVERHEAD
        statements: list[tuple[str, list[str]]] = []
        chunk: list[str] = []
        size = 0
        for key in keys:
            cost = 8 * len(key) + _KEY_OVERHEAD  # 4 bytes a character, doubled by escaping
            if chunk and size + cost > budget:
                statements.append((f"{head}({', '.join(['%s'] * len(chunk))})", chunk))
                chunk, size = [], 0
            chunk.append(key)
            size += cost
        if chunk:
            statements.append((f"{head}({', '.join(['%s'] * len(chunk))})", chunk))
        return statements

    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        wanted = stored_keys(keys)
        rows = await self._run(self._key_statements(self._select, list(wanted)), fetch=True)
        found: dict[str, bytes] = {}
        for key, value in rows:
            cache_key = wanted.get(key)
            if cache_key is not None:  # (an exact match, see column_problems)
                found[cache_key] = binary(self.name, value)
        return found

    async def _ttl_many(self, keys: Sequence[str]) -> dict[str, float]:
        wanted = stored_keys(keys)
        rows = await self._run(self._key_statements(self._ttl_select, list(wanted)), fetch=True)
        return {
            wanted[key]: math.inf if left is None else max(0.0, int(left) / 1e6)
            for key, left in rows
            if key in wanted
        }

    @staticmethod
    def _add_clause(value: str, expire: str) -> str:
        """The update of an add: only a row that has expired takes the new value. ``value``
        is assigned first: MySQL assigns left to right, and the test reads ``expire``."""
        expired = "`expire` <= UTC_TIMESTAMP(6)"  # NULL (never expires): not expired
        return (
            f" ON DUPLICATE KEY UPDATE `value` = IF({expired}, {value}, `value`), "
            f"`expire` = IF({expired}, {expire}, `expire`)"
        )

    async def _set_many(self, entries: Sequence[Entry]) -> None:
        await self._write(entries, self._on_duplicate)

    async def _add_many(self, entries: Sequence[Entry]) -> None:
        await self._write(entries, self._on_duplicate_add)

    async def _write(self, entries: Sequence[Entry], on_duplicate: str) -> None:
        rows = sorted(
            (
                (stored_key(e.key), e.value.hex(), None if e.ttl_ms is None else e.ttl_ms * 1000)
                for e in entries
            ),
            key=lambda row: row[0],
        )
        budget = self.max_packet - _STATEMENT_OVERHEAD
        statements: list[tuple[str, Sequence[Any]]] = []
        chunk: list[tuple[str, str, int | None]] = []
        too_big: list[tuple[str, int]] = []
        size = 0
        for row in rows:
            row_size = len(row[1]) + 8 * len(row[0]) + _ROW_OVERHEAD
            if row_size > budget:
                too_big.append((row[0], len(row[1]) // 2))
                continue
            if chunk and size + row_size > budget:
                statements.append(self._upsert(chunk, on_duplicate))
                chunk, size = [], 0
            chunk.append(row)
            size += row_size
        if chunk:
            statements.append(self._upsert(chunk, on_duplicate))
        if statements:
            await self._run(statements)
        if too_big:  # the others are written; these would make the server drop the connection
            key, length = too_big[0]
            raise ValueError(
                f"{len(too_big)} value(s) too large for this server, e.g. {length} bytes for "
                f"key {key[:80]!r}: values travel as hex, so one must stay under half of "
                f"max_allowed_packet ({self.max_packet} bytes); raise max_allowed_packet"
            )

    def _upsert(
        self, rows: list[tuple[str, str, int | None]], on_duplicate: str
    ) -> tuple[str, list[Any]]:
        # The value goes in as a hex literal written here: hex digits need no escaping
        # (asyncmy's escaping of bytes costs ~100 ms per MiB) and cannot break out of it.
        values = ", ".join(
            f"(%s, X'{value}', UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND)" for _, value, _ in rows
        )
        return self._insert + values + on_duplicate, [v for r in rows for v in (r[0], r[2])]

    async def _remove_many(self, keys: Sequence[str]) -> None:
        await self._run(self._key_statements(self._delete, sorted(stored_keys(keys))))

    async def _purge(self, limit: int) -> int:
        counts = await self._run([(self._purge_sql, (limit,))])
        return max(int(counts[0]), 0)
