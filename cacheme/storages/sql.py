"""What the three SQL tiers (SQLite, PostgreSQL, MySQL/MariaDB) share.

The table
    Every SQL tier reads and writes one table (``table`` option, default ``cacheme_data``)
    that the user creates first from ``sql/sqlite.sql``, ``sql/postgresql.sql`` or
    ``sql/mysql.sql``; no tier creates tables by itself. Columns: ``key`` (unique: the full
    cache key ``{prefix}:{key}:{version}``, as in Redis, so an operator can find and delete
    an entry by hand), ``value`` (the serializer's bytes), ``expire`` (UTC; ``NULL`` means
    never) with an index on ``expire``. ``connect`` checks that the table and its columns
    exist and says which file creates it if not, and refuses (``StorageMisconfiguredError``
    naming the table, the column and the fix) a ``key`` column that does not compare keys
    exactly (a case-insensitive collation would serve 'User' the value of 'user'), is
    shorter than 255 characters, or a ``value`` column that is not binary; ``cacheme check``
    reports the same. A value of another type in a row someone else wrote (SQLite keeps each
    value's own type) is an ``Unreadable`` entry: undecodable for its key alone.

The table name
    ``table`` must be a plain SQL identifier: the whole name matches
    ``[A-Za-z_][A-Za-z0-9_]{0,62}``. Anything else is a ``ConfigurationError`` naming the
    option when the storage is registered, so no SQL can be smuggled in through options.
    The name is always quoted in statements, so it is used exactly as given (on PostgreSQL,
    a quoted name is case-sensitive: prefer lower case).

Keys that do not fit
    The ``key`` column holds at most ``MAX_KEY_LENGTH`` (255) characters, the most a MySQL
    ``VARCHAR`` primary key can index in utf8mb4. A key longer than that is stored as its
    first 183 characters + ``:sha256:`` + the 64 hex digits of the SHA-256 of the whole key
    (UTF-8), exactly 255 characters. Two more kinds of keys take the same hashed form, as
    the column could not hold them faithfully: a key ending in a space (MySQL's
    ``utf8mb4_bin`` ignores trailing spaces when comparing: ``'a' = 'a '``) and a key
    holding a NUL character (PostgreSQL text cannot store it); in the readable prefix of
    the hashed form, NUL becomes ``?``. The mapping is identical on all three
    backends: a row written by one can be found by hand the same way on another. Distinct
    keys stay distinct (up to SHA-256 collisions); the readable prefix still tells an operator
    which node the row belongs to.

Expiry
    ``expire`` is a date, and dates end with the year 9999: a TTL longer than ``max_ttl``
    (7000 years) is stored as ``NULL`` (no expiry), like every TTL above a tier's limit.
    A read never returns an expired row: the ``SELECT`` filters on ``expire``. Expired rows
    do not pile up either: each storage runs a background purge every ``purge_interval``
    seconds (default 60; 0 turns it off, e.g. when a cron job does it) that deletes at most
    ``purge_limit`` expired rows (default 1000) per statement, so no purge holds long locks.
    When a purge deletes a full ``purge_limit``, the next one runs after a second, so a
    backlog drains quickly. The first purge runs at a random point of the first interval, so
    a fleet of processes started together does not purge in lockstep. Purge failures are
    logged (password and query values masked) and never reach callers.
    ``purge_expired()`` runs one purge now and returns the number of rows it deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
from abc import abstractmethod
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, TypeVar

from pydantic import Field, field_validator

from ..errors import ConfigurationError, StorageError, StorageMisconfiguredError
from .base import MAX_POOL_SIZE, RemoteOptions, RemoteStorage, describe
from .stops import CutStops
from .url import redact

logger = logging.getLogger("cacheme")

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # the whole name (fullmatch)

MAX_KEY_LENGTH = 255
_HASH_MARK = ":sha256:"
_HASH_HEX_LENGTH = 64
_KEPT_PREFIX = MAX_KEY_LENGTH - len(_HASH_MARK) - _HASH_HEX_LENGTH  # 183 characters

# The longest TTL a tier that stores an expiry date can honour (see ``SQLStorage.max_ttl``).
MAX_DATE_TTL = timedelta(days=365 * 7000)

# Seconds until the next purge when the last one deleted a full purge_limit.
_BACKLOG_PAUSE = 1.0


def validate_identifier(option: str, value: str) -> str:
    """``value`` if it is a plain SQL identifier, else ``ConfigurationError`` naming ``option``."""
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise ConfigurationError(
            f"option {option!r} must be a plain SQL identifier (letters, digits and '_', "
            f"not starting with a digit, at most 63 characters), got {value!r}"
        )
    return value


def stored_key(key: str) -> str:
    """The value of the ``key`` column for cache key ``key`` (see the module docstring)."""
    if len(key) <= MAX_KEY_LENGTH and not key.endswith(" ") and "\x00" not in key:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{key[:_KEPT_PREFIX].replace(chr(0), '?')}{_HASH_MARK}{digest}"


def stored_keys(keys: Any) -> dict[str, str]:
    """``{stored key: cache key}`` for ``keys`` (an iterable of distinct cache keys)."""
    return {stored_key(k): k for k in keys}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def expire_at(ttl_ms: int | None, now: datetime) -> datetime | None:
    """When an entry written at ``now`` with ``ttl_ms`` expires (``None``: never)."""
    if ttl_ms is None:
        return None
    return now + timedelta(milliseconds=ttl_ms)


class SQLOptions(RemoteOptions):
    """Options every SQL storage accepts."""

    table: str = Field(
        default="cacheme_data", description="the table created from the sql/ schema file"
    )
    pool_size: int = Field(default=50, ge=1, le=MAX_POOL_SIZE, description="most open connections")
    purge_interval: float = Field(
        default=60.0, ge=0, description="seconds between purges of expired rows; 0: never"
    )
    purge_limit: int = Field(
        default=1000, ge=1, le=1_000_000, description="most expired rows one purge deletes"
    )

    @field_validator("table")
    @classmethod
    def _plain_identifier(cls, value: str) -> str:
        return validate_identifier("table", value)


SO = TypeVar("SO", bound=SQLOptions)


class SQLStorage(RemoteStorage[SO]):
    """A remote tier kept in one SQL table; runs the purge of expired rows.

    Subclasses implement ``_open`` (pool or connection, and the table check), ``_shutdown``,
    ``_purge`` and the three raw operations of ``RemoteStorage``.
    """

    options_model: ClassVar[type[SQLOptions]] = SQLOptions
    options: SQLOptions
    schema_file: ClassVar[str] = "sql/<backend>.sql"
    # ``expire`` is now + TTL as a date, and dates end with the year 9999 (Python, MySQL's
    # DATETIME): a longer TTL means no expiry (see ``Cache``). 7000 years leaves a margin of
    # centuries, and keeps PostgreSQL's interval arithmetic in range.
    max_ttl: ClassVar[timedelta] = MAX_DATE_TTL

    def __init__(self, name: str, url: str, options: SO) -> None:
        super().__init__(name, url, options)
        self.table = options.table
        self.purged = 0  # expired rows deleted by purges so far
        self.purge_failures = 0
        self._purge_task: asyncio.Task[None] | None = None
        self._stops = CutStops(name, self._stopper_connect, self._stop_on, self._stopper_close)

    async def _stop_cut(self, ident: int, what: str) -> None:
        """Stop the server side of a write cut short (``ident``: its server process or
        thread, ``what`` names it for the log) before the write counts as failed: its
        statement may still be waiting on a row lock, to land after what is ordered behind
        it (see ``stops``). Bounded by 0.8 x ``timeout`` from here: the storage cancels a cut
        operation again one ``timeout`` after the cut, and the stop should be over by then.
        """
        await self._stops.stop(ident, what, 0.8 * self.options.timeout)

    async def _close_stopper(self) -> None:
        """Close this loop's stopping connection, if it has one (at shutdown)."""
        await self._stops.aclose()

    async def _stopper_connect(self) -> Any:
        """A new connection to the server, outside the pool (see ``_stop_cut``)."""
        raise NotImplementedError

    async def _stop_on(self, conn: Any, ident: int) -> None:
        """End server process or thread ``ident`` through ``conn``."""
        raise NotImplementedError

    async def _stopper_close(self, conn: Any) -> None:
        """Close ``conn`` without waiting for the server."""
        raise NotImplementedError

    @abstractmethod
    async def _open(self) -> None:
        """Create the pool or connection and check the table; clean up if that fails."""

    @abstractmethod
    async def _shutdown(self) -> None:
        """Close the pool or connection; safe to call twice."""

    @abstractmethod
    async def _purge(self, limit: int) -> int:
        """Delete at most ``limit`` expired rows in one statement; the number deleted."""

    async def _connect(self) -> None:
        try:
            await self._open()
        except BaseException:
            await self._shutdown()
            raise
        if self.options.purge_interval > 0 and self._purge_task is None:
            self._purge_task = asyncio.ensure_future(self._purge_loop())

    async def _close(self) -> None:
        task, self._purge_task = self._purge_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._shutdown()

    async def purge_expired(self) -> int:
        """Delete up to ``purge_limit`` expired rows now; the number deleted."""
        limit = self.options.purge_limit
        deleted = await asyncio.wait_for(self._purge(limit), max(self.options.timeout, 1.0) * 10)
        self.purged += deleted
        return deleted

    async def _purge_loop(self) -> None:
        interval = self.options.purge_interval
        delay = random.uniform(0.1, 1.0) * interval
        while True:
            await asyncio.sleep(delay)
            delay = interval
            try:
                if await self.purge_expired() >= self.options.purge_limit:
                    delay = min(interval, _BACKLOG_PAUSE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.purge_failures += 1
                logger.warning(
                    "cacheme: storage %r (%s): purge of expired rows failed: %s",
                    self.name,
                    redact(self.url),
                    describe(exc, self.url),
                )

    def _check_columns(self, problems: list[str]) -> None:
        """Refuse the table when its ``key`` or ``value`` column cannot hold what cacheme
        stores faithfully (``problems``: one sentence per column found wrong).

        A ``key`` column whose comparison is not exact (a case-insensitive collation, say)
        would serve one key's value for another key; one too short would cut keys or refuse
        their writes; a ``value`` column that is not binary would change values. Such a
        table is a ``StorageMisconfiguredError`` at registration (and ``cacheme check``),
        naming the storage, the table, the column and the fix."""
        if problems:
            raise StorageMisconfiguredError(
                f"storage {self.name!r} ({redact(self.url)}): table {self.table!r} cannot "
                f"hold cache entries faithfully: {'; '.join(problems)}. Create the table "
                f"from {self.schema_file} (or alter these columns as it says)"
            )

    def _missing_table(self, exc: BaseException) -> StorageError:
        rename = "" if self.table == "cacheme_data" else f" (its table named {self.table})"
        return StorageMisconfiguredError(
            f"storage {self.name!r} ({redact(self.url)}): table {self.table!r} with columns "
            f"key, value, expire not found ({describe(exc, self.url)}); create it first with "
            f"{self.schema_file}{rename}"
        )
