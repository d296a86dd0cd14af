"""The PostgreSQL tier: ``Storage(url="postgresql://user:pw@host:5432/db", table="cache")``.

Create the table first from ``sql/postgresql.sql``. The URL goes to asyncpg as is (so its
query parameters, such as ``sslmode``, work); ``postgres://`` and ``postgresql+asyncpg://``
are accepted too. The pool holds at most ``pool_size`` connections.

Statements (each one round trip, on a prepared statement asyncpg caches per connection)
    read    ``SELECT key, value ... WHERE key = ANY($1::text[]) AND (expire IS NULL OR
            expire > now())``
    write   ``INSERT ... SELECT ... FROM unnest($1::text[], $2::bytea[], $3::bigint[])
            ON CONFLICT (key) DO UPDATE``, rows sorted by key so concurrent batches from
            several processes lock rows in the same order and cannot deadlock
    add     the same, ``ON CONFLICT (key) DO UPDATE ... WHERE t.expire <= now()``: a live
            row stays, an expired one counts as absent (set-if-absent)
    remove  ``DELETE ... WHERE key = ANY($1::text[])``

Expiry
    Computed by the server: ``expire = now() + ttl_ms * interval '1 millisecond'`` (a
    ``timestamptz``, so it is UTC whatever the session time zone), and reads compare with
    the server's ``now()``. One clock decides, as with Redis; millisecond TTLs work.
    Expired rows are purged in the background (see ``cacheme.storages.sql``) with
    ``FOR UPDATE SKIP LOCKED``, so purges from several processes do not wait for each other.

Durability
    A cache can be refilled, so sessions run with ``synchronous_commit = off`` unless the
    ``synchronous_commit=True`` option says otherwise: a write returns without waiting for
    its WAL flush (a crash may lose the last fraction of a second of cache writes; the
    table is never corrupted), which makes single-row writes several times faster. An
    ``UNLOGGED`` table (see ``sql/postgresql.sql``) goes further.

Behind PgBouncer, pass ``synchronous_commit=True`` (the setting travels as a startup
parameter, which PgBouncer refuses unless listed in its ``ignore_startup_parameters``), and
in transaction mode also ``statement_cache_size=0``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from pydantic import Field

from .base import Entry, binary
from .sql import MAX_KEY_LENGTH, SQLOptions, SQLStorage, stored_key, stored_keys


class PostgresOptions(SQLOptions):
    """Options of ``postgresql://`` storages."""

    synchronous_commit: bool = Field(
        default=False,
        description="wait for the WAL flush on every write; off: a crash may lose the last "
        "fraction of a second of cache writes (never corrupt the table), writes ~5x faster",
    )
    statement_cache_size: int = Field(
        default=100,
        ge=0,
        description="prepared statements cached per connection; 0 for "
        "PgBouncer in transaction mode",
    )


def _first(row: tuple[str, bytes, int | None]) -> str:
    return row[0]


# asyncpg >= 0.30 lets the pool skip its reset on release (a round trip per operation: this
# tier keeps no session state to reset: no transactions, LISTEN, advisory locks or SETs).
_POOL_TAKES_RESET = "reset" in inspect.signature(asyncpg.create_pool).parameters


async def _keep_session(connection: Any) -> None:
    """The pool's reset hook: nothing to undo (see ``_POOL_TAKES_RESET``)."""


# The type, length and collation of the key and value columns of the table ($1: its quoted
# name, found as the storage's statements find it). `collisdeterministic` (PostgreSQL 12+)
# is read through to_jsonb, which gives NULL on older servers instead of failing.
COLUMNS_QUERY = (
    "SELECT a.attname, t.typname, a.atttypmod, c.collname, "
    "to_jsonb(c) ->> 'collisdeterministic' "
    "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
    "LEFT JOIN pg_collation c ON c.oid = a.attcollation "
    "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped "
    "AND a.attname IN ('key', 'value')"
)


def column_problems(rows: Sequence[Sequence[Any]]) -> list[str]:
    """What is wrong with the ``key`` and ``value`` columns, from their rows of ``COLUMNS_QUERY``
    (name, type, type modifier, collation, whether the collation is deterministic): a key
    column that is not text (citext compares case-insensitively, char(n) pads), shorter than
    255 characters or compared by a nondeterministic collation, a value column that is not
    bytea."""
    problems: list[str] = []
    for name, type_name, typmod, collation, deterministic in rows:
        if name == "key":
            fix = "make it TEXT"
            if type_name not in ("text", "varchar"):
                # citext compares case-insensitively; char(n) pads with spaces.
                problems.append(f"column 'key' is of type {type_name}; {fix}")
                continue
            if type_name == "varchar" and typmod > 0 and typmod - 4 < MAX_KEY_LENGTH:
                problems.append(
                    f"column 'key' holds at most {typmod - 4} characters, and cacheme writes "
                    f"keys of up to {MAX_KEY_LENGTH}; {fix}"
                )
            if deterministic == "false":
                problems.append(
                    f"column 'key' compares with the nondeterministic collation {collation}, "
                    f"under which different keys (such as 'User' and 'user') can be one row; "
                    f"{fix} with a deterministic collation (the default)"
                )
        elif name == "value" and type_name != "bytea":
            problems.append(
                f"column 'value' is of type {type_name}, not bytea (values are bytes); "
                f"make it BYTEA"
            )
    return problems


def dsn_of(url: str) -> str:
    """``url`` with the scheme asyncpg expects."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


class PostgresStorage(SQLStorage[PostgresOptions]):
    """Cache entries in a PostgreSQL table, through an asyncpg pool."""

    options_model = PostgresOptions
    options: PostgresOptions
    schema_file: ClassVar[str] = "sql/postgresql.sql"
    # The server cancelled the statement (statement_timeout, lock_timeout): a timeout.
    timeout_errors = (asyncpg.QueryCanceledError,)

    def misconfigured(self, exc: BaseException) -> bool:
        # No such database; no such role, or a wrong password (a subclass of the latter); a
        # URL query option the server takes for a setting it does not have.
        return isinstance(
            exc,
            (
                asyncpg.InvalidCatalogNameError,
                asyncpg.InvalidAuthorizationSpecificationError,
                asyncpg.UndefinedObjectError,
            ),
        )

    def __init__(self, name: str, url: str, options: PostgresOptions) -> None:
        super().__init__(name, url, options)
        self._pool: Any = None  # asyncpg.Pool
        t = f'"{self.table}"'
        self._select = (
            f'SELECT "key", "value" FROM {t} WHERE "key" = ANY($1::text[]) '
            f'AND ("expire" IS NULL OR "expire" > now())'
        )
        self._ttl_select = (
            f'SELECT "key", EXTRACT(EPOCH FROM ("expire" - now()))::float8 FROM {t} '
            f'WHERE "key" = ANY($1::text[]) AND ("expire" IS NULL OR "expire" > now())'
        )
        self._upsert = (
            f'INSERT INTO {t} ("key", "value", "expire") '
            f"SELECT u.k, u.v, now() + u.ttl * interval '1 millisecond' "
            f"FROM unnest($1::text[], $2::bytea[], $3::bigint[]) AS u(k, v, ttl) "
            f'ON CONFLICT ("key") DO UPDATE SET "value" = EXCLUDED."value", '
            f'"expire" = EXCLUDED."expire"'
        )
        self._add = (
            f'INSERT INTO {t} AS t ("key", "value", "expire") '
            f"SELECT u.k, u.v, now() + u.ttl * interval '1 millisecond' "
            f"FROM unnest($1::text[], $2::bytea[], $3::bigint[]) AS u(k, v, ttl) "
            f'ON CONFLICT ("key") DO UPDATE SET "value" = EXCLUDED."value", '
            f'"expire" = EXCLUDED."expire" WHERE t."expire" <= now()'
        )
        self._delete = f'DELETE FROM {t} WHERE "key" = ANY($1::text[])'
        self._purge_sql = (
            f'DELETE FROM {t} WHERE "key" IN (SELECT "key" FROM {t} '
            f'WHERE "expire" <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)'
        )

    async def _open(self) -> None:
        size = self.options.pool_size
        extra: dict[str, Any] = {}
        if _POOL_TAKES_RESET:
            extra["reset"] = _keep_session
        self._pool = await asyncpg.create_pool(
            dsn_of(self.url),
            min_size=min(2, size),
            max_size=size,
            timeout=self.options.timeout,
            statement_cache_size=self.options.statement_cache_size,
            server_settings={
                "synchronous_commit": "on" if self.options.synchronous_commit else "off"
            },
            **extra,
        )
        try:
            await self._using(
                "fetch", f'SELECT "key", "value", "expire" FROM "{self.table}" LIMIT 0'
            )
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
            raise self._missing_table(exc) from exc
        rows = await self._using("fetch", COLUMNS_QUERY, f'"{self.table}"')
        self._check_columns(column_problems(rows))

    async def _shutdown(self) -> None:
        await self._close_stopper()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:  # a graceful close talks to the server: bounded, then cut
                await asyncio.wait_for(pool.close(), self.options.timeout)
            except Exception:
                pool.terminate()
            except BaseException:
                pool.terminate()
                raise

    async def _using(self, method: str, query: str, *args: Any) -> Any:
        """``connection.<method>(query, *args)`` on a pooled connection.

        A call that does not end with an answer from the server (cancelled by the storage
        timeout, or a network error) terminates its connection instead of handing it back:
        asyncpg would otherwise send a CancelRequest and reset the connection before the
        caller gets control back, which over a black-holed network never ends. A write
        (``execute``) cut that way also has its server process stopped before this
        returns (see ``SQLStorage._stop_cut``): closing the socket alone leaves a statement
        that waits on a row lock running, to land after an ``invalidate`` ordered behind it.
        """
        if self._pool is None:
            raise ConnectionError("PostgreSQL storage is not connected")
        pool = self._pool
        con = await pool.acquire()
        cut = None
        try:
            return await getattr(con, method)(query, *args)
        except asyncpg.PostgresError:
            raise  # the server answered: the connection is fine
        except BaseException:
            cut = con.get_server_pid()
            con.terminate()
            raise
        finally:
            await pool.release(con)  # first: the stop below may need its place in the pool
            if cut is not None and method == "execute":
                await self._stop_cut(cut, "server process")

    # The stop of a write cut short (see SQLStorage._stop_cut). A process waiting on a lock
    # ends at once on the signal. (The PostgreSQL 14+ form that waits for the exit polls
    # in 100 ms steps: a storm of cut writes then outlasted the stops' bound.)

    async def _stopper_connect(self) -> Any:
        return await asyncpg.connect(dsn_of(self.url), timeout=self.options.timeout)

    async def _stop_on(self, conn: Any, ident: int) -> None:
        await conn.execute("SELECT pg_terminate_backend($1)", ident)

    async def _stopper_close(self, conn: Any) -> None:
        conn.terminate()  # nothing left to say to the server

    @property
    def pool(self) -> Any:
        """The asyncpg pool (for inspection and tests; operations go through ``_using``)."""
        if self._pool is None:
            raise ConnectionError("PostgreSQL storage is not connected")
        return self._pool

    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        wanted = stored_keys(keys)
        rows = await self._using("fetch", self._select, list(wanted))
        return {wanted[key]: binary(self.name, value) for key, value in rows if key in wanted}

    async def _ttl_many(self, keys: Sequence[str]) -> dict[str, float]:
        wanted = stored_keys(keys)
        rows = await self._using("fetch", self._ttl_select, list(wanted))
        return {wanted[key]: math.inf if left is None else max(0.0, left) for key, left in rows}

    async def _set_many(self, entries: Sequence[Entry]) -> None:
        rows = sorted(((stored_key(e.key), e.value, e.ttl_ms) for e in entries), key=_first)
        keys, values, ttls = zip(*rows, strict=True)
        await self._using("execute", self._upsert, keys, values, ttls)

    async def _add_many(self, entries: Sequence[Entry]) -> None:
        rows = sorted(((stored_key(e.key), e.value, e.ttl_ms) for e in entries), key=_first)
        keys, values, ttls = zip(*rows, strict=True)
        await self._using("execute", self._add, keys, values, ttls)

    async def _remove_many(self, keys: Sequence[str]) -> None:
        await self._using("execute", self._delete, sorted(stored_keys(keys)))

    async def _purge(self, limit: int) -> int:
        status: str = await self._using("execute", self._purge_sql, limit)
        return int(status.rsplit(" ", 1)[-1])
