"""MongoDB tier: ``mongodb://user:password@host:27017/authdb?options`` and ``mongodb+srv://``.

Built on PyMongo's native asyncio client, ``pymongo.AsyncMongoClient`` (PyMongo >= 4.13.2).
Motor, the older asyncio wrapper around PyMongo, is deprecated (since May 2026) in favour of
this client and is not used.

One document per cache key::

    {key: "<prefix>:<key>:<version>", value: BinData(0, ...), expire: ISODate(...) | null}

``key`` holds the full cache key, as in Redis, so an operator can find or delete an entry by
hand (``db.cacheme_data.deleteOne({key: "..."})``). ``expire`` is the absolute expiry time in
UTC (``null``: no expiry). BSON dates have millisecond precision, which is what TTLs arrive
in. Expiry times are computed from this process's clock, and reads compare against it too.
A TTL longer than ``MongoStorage.max_ttl`` (7000 years: dates end with the year 9999) means
no expiry (``null``).

Round trips: a batch read is one ``find({key: {$in: [...]}, <live>})`` whose first batch
holds every hit (keys are stored whole, so a batch whose keys pass
``MAX_KEY_BYTES_PER_COMMAND``, 8 MiB, is read with several such commands, one after another:
a command is one BSON document of at most 16 MiB; ``remaining_ttl`` and removals likewise);
a batch write is one unordered ``bulk_write`` of ``UpdateOne(..., upsert=True)``; a batch
add (set-if-absent) is one unordered ``bulk_write`` of two updates per key: one that
replaces the document only if it has expired (``{key, expire: {$lte: now}}``, no upsert) and
one ``$setOnInsert`` upsert, which inserts only when no document exists (in either order, a
live document stays and an expired or missing one takes the new value); a batch remove is
one ``delete_many({key: {$in: [...]}})``.

Reads return only live entries: ``expire`` is ``null`` (or absent) or later than now. MongoDB's TTL
monitor deletes expired documents only about once a minute, so the read filter, not the
index, is what makes a TTL exact; the TTL index just reclaims the space.

The collection needs two indexes, created once by an operator (``sql/mongo.js``)::

    db.cacheme_data.createIndex({key: 1}, {unique: true})
    db.cacheme_data.createIndex({expire: 1}, {expireAfterSeconds: 0})

Without the unique index every read scans the collection and concurrent upserts of a new key
can insert it twice; without the TTL index expired documents are never deleted. ``connect``
logs a warning when either is missing (it does not create them: that needs privileges a cache
user should not have), and refuses (``StorageMisconfiguredError``) a collection or a key
index with a collation other than ``simple``: a case-insensitive one would make 'User' and
'user' one entry. A document whose ``value`` is not binary (written by something else) is
an ``Unreadable`` entry: undecodable for its key alone.

Options (besides ``RemoteOptions``): ``database`` (default: the database named in the URL's
path, else ``"cacheme"``), ``collection`` (default ``"cacheme_data"``), ``pool_size``
(``maxPoolSize``, default 50). Any other client setting (TLS, ``authSource``, ``replicaSet``,
``w``, ``readPreference``, ...) goes in the URL's query string.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from pydantic import Field, field_validator
from pymongo import AsyncMongoClient, UpdateOne, uri_parser
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    BulkWriteError,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
)

from ..errors import ConfigurationError, StorageMisconfiguredError
from .base import MAX_POOL_SIZE, Entry, RemoteOptions, RemoteStorage, binary
from .url import redact

__all__ = ["DEFAULT_DATABASE", "MongoOptions", "MongoStorage"]

logger = logging.getLogger("cacheme")

DEFAULT_DATABASE = "cacheme"

# mongod rejects these in database names (the Windows set, so a name works everywhere).
_DATABASE_FORBIDDEN = frozenset('/\\. "$*<>:|?\x00')
_DUPLICATE_KEY = 11000
# The most key bytes one command carries in its ``$in`` list. A command is one BSON document
# of at most 16 MiB; keys are stored whole (not hashed as by the SQL tiers), so a batch of
# long keys is sent as several commands of at most this many bytes each.
MAX_KEY_BYTES_PER_COMMAND = 8 * 1024 * 1024
_KEY_OVERHEAD = 16  # per key in the $in array: type byte, index name, length, NUL
_REFUSED_CODES = (13, 18)  # Unauthorized, AuthenticationFailed

Document = dict[str, Any]


def check_database_name(name: str) -> str:
    """``name`` if MongoDB accepts it as a database name; ``ValueError`` saying why not."""
    if not name:
        raise ValueError("database name must not be empty")
    bad = sorted(set(name) & _DATABASE_FORBIDDEN)
    if bad:
        raise ValueError(
            f"database name {name!r} may not contain {', '.join(repr(c) for c in bad)}"
        )
    if len(name.encode()) >= 64:
        raise ValueError(f"database name {name!r} is longer than 63 bytes")
    return name


def check_collection_name(name: str) -> str:
    """``name`` if MongoDB accepts it as a collection name; ``ValueError`` saying why not."""
    if not name:
        raise ValueError("collection name must not be empty")
    for char in ("$", "\x00"):
        if char in name:
            raise ValueError(f"collection name {name!r} may not contain {char!r}")
    if name.startswith(".") or name.endswith(".") or ".." in name:
        raise ValueError(f"collection name {name!r} may not start or end with '.' or contain '..'")
    if name.startswith("system."):
        raise ValueError(f"collection name {name!r} may not start with 'system.'")
    if len(name.encode()) > 200:
        raise ValueError(f"collection name {name!r} is longer than 200 bytes")
    return name


class MongoOptions(RemoteOptions):
    """Options of a MongoDB storage (on top of ``RemoteOptions``)."""

    database: str | None = Field(
        default=None,
        description="database holding the collection; default: the database in the URL's "
        f"path, else {DEFAULT_DATABASE!r}",
    )
    collection: str = Field(default="cacheme_data", description="collection of the entries")
    pool_size: int = Field(
        default=50,
        ge=1,
        le=MAX_POOL_SIZE,
        description="most connections open at once (maxPoolSize)",
    )

    @field_validator("database")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        return None if value is None else check_database_name(value)

    @field_validator("collection")
    @classmethod
    def _collection(cls, value: str) -> str:
        return check_collection_name(value)


class MongoStorage(RemoteStorage[MongoOptions]):
    """A MongoDB tier."""

    options_model = MongoOptions
    options: MongoOptions
    timeout_errors = (NetworkTimeout, ServerSelectionTimeoutError, ExecutionTimeout)

    def misconfigured(self, exc: BaseException) -> bool:
        return isinstance(exc, OperationFailure) and exc.code in _REFUSED_CODES

    # ``expire`` is now + TTL as a date (Python's end with the year 9999): a longer TTL than
    # this (7000 years) means no expiry (see ``Cache``).
    max_ttl: ClassVar[timedelta] = timedelta(days=365 * 7000)

    def __init__(self, name: str, url: str, options: MongoOptions) -> None:
        super().__init__(name, url, options)
        database = options.database or unquote(urlsplit(url).path.lstrip("/"))
        try:
            self.database = check_database_name(database or DEFAULT_DATABASE)
        except ValueError as exc:
            raise ConfigurationError(
                f"storage {name!r} ({redact(url)}): database from the URL: {exc}"
            ) from None
        _check_url_options(name, url)
        self.collection = options.collection
        self._client: AsyncMongoClient[Document] | None = None
        self._coll: AsyncCollection[Document] | None = None

    # -- connect / close ------------------------------------------------------------------

    async def _connect(self) -> None:
        # A backstop: the base class's timeout fires first on every operation.
        backstop_ms = round(self.options.timeout * 2 * 1000)
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            self.url,
            maxPoolSize=self.options.pool_size,
            serverSelectionTimeoutMS=backstop_ms,
            connectTimeoutMS=backstop_ms,
            appname="cacheme",
        )
        try:
            # The client connects lazily; a ping proves the server is there (and the
            # credentials work).
            await client.admin.command("ping")
            db = client[self.database]
            coll = db[self.collection]
            await self._check_indexes(coll)
            await self._check_collation(db)
        except BaseException:
            await client.close()
            raise
        self._client = client
        self._coll = coll

    async def _check_indexes(self, coll: AsyncCollection[Document]) -> None:
        try:
            indexes = await coll.index_information()
        except OperationFailure:  # e.g. not authorized to list indexes: not our business
            return
        wrong = [
            f"index {name!r} on 'key' compares with collation {dict(spec['collation'])}"
            for name, spec in indexes.items()
            if any(field == "key" for field, _ in spec["key"]) and inexact(spec.get("collation"))
        ]
        self._refuse_collation(wrong)
        by_key = {tuple(spec["key"]): spec for spec in indexes.values()}
        missing = []
        if not by_key.get((("key", 1),), {}).get("unique", False):
            missing.append(
                "a unique index on 'key' (without it reads scan the collection "
                "and two first writes of a key can store it twice)"
            )
        if by_key.get((("expire", 1),), {}).get("expireAfterSeconds") is None:
            missing.append("a TTL index on 'expire' (without it expired entries stay forever)")
        if missing:
            logger.warning(
                "cacheme: storage %r: collection %s.%s lacks %s; create them with sql/mongo.js",
                self.name,
                self.database,
                self.collection,
                " and ".join(missing),
            )

    async def _check_collation(self, db: Any) -> None:
        """Refuse a collection whose default collation is not the exact (``simple``) one:
        with a case-insensitive one, say, a read of 'User' finds the document of 'user'."""
        try:
            infos = await (await db.list_collections(filter={"name": self.collection})).to_list()
        except OperationFailure:  # not authorized to list collections: cannot tell
            return
        collation: Any = infos[0].get("options", {}).get("collation") if infos else None
        if inexact(collation):
            self._refuse_collation([f"its default collation is {dict(collation)}"])

    def _refuse_collation(self, problems: list[str]) -> None:
        if problems:
            raise StorageMisconfiguredError(
                f"storage {self.name!r} ({redact(self.url)}): collection "
                f"{self.database}.{self.collection} compares keys inexactly: "
                f"{'; '.join(problems)}; under such a collation different keys (such as "
                f"'User' and 'user') are one entry. Create the collection and its indexes "
                f"without a collation (sql/mongo.js)"
            )

    async def _close(self) -> None:
        client, self._client, self._coll = self._client, None, None
        if client is not None:
            await client.close()

    @property
    def _collection(self) -> AsyncCollection[Document]:
        if self._coll is None:
            raise RuntimeError(f"storage {self.name!r} is not connected")
        return self._coll

    # -- raw operations ---------------------------------------------------------------------

    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        now = datetime.now(timezone.utc)
        found: dict[str, bytes] = {}
        for part in key_groups(keys):
            cursor = self._collection.find(
                # Live: `expire` null (or absent) or later than now. Written as one `$not` on
                # the field rather than `$or: [{expire: null}, {expire: {$gt: now}}]`: the same
                # documents, but SecantusDB answers a query with a top-level `$or` by scanning
                # the whole collection. MongoDB reads both through the unique index on `key`.
                {"key": {"$in": part}, "expire": {"$not": {"$lte": now}}},
                {"_id": 0, "key": 1, "value": 1},
                # Every hit in the first reply (up to the server's 16 MiB per batch), and room
                # for one more: a batch the hits fill exactly would leave the cursor open,
                # costing a second round trip (a getMore) to learn there is nothing else.
                batch_size=len(part) + 1,
            )
            for doc in await cursor.to_list():
                # bytes for BinData subtype 0, a Binary for another subtype; a string or a
                # number in a document written by something else: Unreadable (see binary).
                found[doc["key"]] = binary(self.name, doc.get("value"))
        return found

    async def _ttl_many(self, keys: Sequence[str]) -> dict[str, float]:
        now = datetime.now(timezone.utc)
        docs: list[Document] = []
        for part in key_groups(keys):
            cursor = self._collection.find(
                {"key": {"$in": part}, "expire": {"$not": {"$lte": now}}},
                {"_id": 0, "key": 1, "expire": 1},
                batch_size=len(part) + 1,
            )
            docs += await cursor.to_list()
        left: dict[str, float] = {}
        for doc in docs:
            expire = doc.get("expire")
            if expire is None:
                left[doc["key"]] = math.inf
            else:
                if expire.tzinfo is None:
                    expire = expire.replace(tzinfo=timezone.utc)
                left[doc["key"]] = max(0.0, (expire - now).total_seconds())
        return left

    async def _set_many(self, entries: Sequence[Entry]) -> None:
        now = datetime.now(timezone.utc)
        ops = [
            UpdateOne(
                {"key": key},
                {
                    "$set": {
                        "value": value,  # bytes: BSON binary, subtype 0 (no copy)
                        "expire": None if ttl_ms is None else now + timedelta(milliseconds=ttl_ms),
                    }
                },
                upsert=True,
            )
            for key, value, ttl_ms in entries
        ]
        failed = await self._bulk_upsert(ops)
        if failed and all(code == _DUPLICATE_KEY for _, code, _ in failed):
            # Two first writes of one key raced (another process, or a concurrent batch):
            # the loser's upsert hit the unique index. MongoDB >= 4.2 retries this itself;
            # older servers (and look-alikes) do not. Now the key exists, so it updates.
            failed = await self._bulk_upsert([ops[i] for i, _, _ in failed])
        if failed:
            _, code, message = failed[0]
            raise OperationFailure(
                f"{len(failed)} of {len(entries)} upsert(s) failed; first: error {code}: {message}",
                code,
            )

    async def _add_many(self, entries: Sequence[Entry]) -> None:
        now = datetime.now(timezone.utc)
        ops: list[UpdateOne] = []
        for key, value, ttl_ms in entries:
            fields = {
                "value": value,
                "expire": None if ttl_ms is None else now + timedelta(milliseconds=ttl_ms),
            }
            ops.append(UpdateOne({"key": key, "expire": {"$lte": now}}, {"$set": fields}))
            ops.append(UpdateOne({"key": key}, {"$setOnInsert": fields}, upsert=True))
        # A duplicate key error is an upsert that lost a race with another writer's insert
        # of the key: the key is present, so this add rightly stored nothing.
        failed = [f for f in await self._bulk_upsert(ops) if f[1] != _DUPLICATE_KEY]
        if failed:
            _, code, message = failed[0]
            raise OperationFailure(
                f"{len(failed)} of {len(ops)} add operation(s) failed; first: error {code}: "
                f"{message}",
                code,
            )

    async def _bulk_upsert(self, ops: list[UpdateOne]) -> list[tuple[int, int, str]]:
        """Run ``ops``; ``(index, code, message)`` of each failed one.

        PyMongo's ``BulkWriteError`` text quotes every failed operation, values included
        (up to megabytes each); only the codes and messages are kept.
        """
        try:
            await self._collection.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            details = exc.details
            if details.get("writeConcernErrors"):
                error = details["writeConcernErrors"][0]
                raise OperationFailure(
                    f"write concern error {error.get('code')}: {error.get('errmsg')}",
                    error.get("code"),
                ) from None
            return [
                (err["index"], err.get("code", 0), str(err.get("errmsg", "")))
                for err in details.get("writeErrors", ())
            ]
        return []

    async def _remove_many(self, keys: Sequence[str]) -> None:
        for part in key_groups(keys):
            await self._collection.delete_many({"key": {"$in": part}})


def inexact(collation: Any) -> bool:
    """Whether a collation (from ``listCollections`` or an index) compares strings other
    than byte by byte: any but none at all and ``{locale: "simple"}``."""
    return bool(collation) and dict(collation).get("locale") != "simple"


def key_groups(keys: Sequence[str]) -> list[list[str]]:
    """``keys`` in groups of at most ``MAX_KEY_BYTES_PER_COMMAND`` bytes of UTF-8 (a single
    key larger than that makes a group of its own): one command each. The usual batch is
    one group."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        length = len(key) if key.isascii() else len(key.encode("utf-8", "surrogatepass"))
        cost = length + _KEY_OVERHEAD
        if groups[-1] and size + cost > MAX_KEY_BYTES_PER_COMMAND:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += cost
    return groups


def _check_url_options(name: str, url: str) -> None:
    """``StorageMisconfiguredError`` naming each URL query option pymongo does not know or
    takes no such value for (pymongo itself only warns and ignores an unknown one). An SRV
    URL (``mongodb+srv://``) is checked by the driver when it connects: parsing it here
    would mean a DNS lookup."""
    parts = urlsplit(url)
    if parts.scheme != "mongodb" or not parts.query:
        return
    bad = []
    for option, value in parse_qsl(parts.query, keep_blank_values=True):
        try:
            uri_parser.parse_uri(f"mongodb://127.0.0.1/?{urlencode({option: value})}", warn=False)
        except Exception as exc:  # pymongo's ConfigurationError, or ValueError for a value
            bad.append(f"{option!r} ({exc})")
    if bad:
        raise StorageMisconfiguredError(
            f"storage {name!r} ({redact(url)}): URL query option(s) pymongo refuses: "
            f"{'; '.join(bad)}"
        )
