"""What only the MongoDB tier promises, on its real server (MongoDB or SecantusDB)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from bson.binary import Binary
from pymongo import monitoring
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from cacheme.errors import ConfigurationError, StorageError
from cacheme.storages.base import Entry, RemoteStorage
from cacheme.storages.mongo import MongoStorage
from cacheme.storages.registry import Storage
from tests.services import MONGO_URL

from .backend_mongo import DATABASE, admin_client, index_specs, mongo_storage

pytestmark = pytest.mark.mongo

Remote = RemoteStorage[Any]
Collection = AsyncCollection[dict[str, Any]]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


async def test_indexes_are_those_of_sql_mongo_js() -> None:
    specs = index_specs()
    assert [(keys, opts.get("unique"), opts.get("expireAfterSeconds")) for keys, opts in specs] == [
        ({"key": 1}, True, None),
        ({"expire": 1}, None, 0),
    ]
    async with mongo_storage("mongo-indexes") as (_, coll):
        found = {ix["name"]: ix async for ix in await coll.list_indexes()}
    for keys, opts in specs:
        index = found[opts["name"]]
        assert dict(index["key"]) == keys
        assert index.get("unique", False) == opts.get("unique", False)
        assert index.get("expireAfterSeconds") == opts.get("expireAfterSeconds")


async def test_expired_documents_are_never_returned() -> None:
    """The read filter hides expired documents the TTL monitor has not deleted yet."""
    async with mongo_storage("mongo-expired") as (storage, coll):
        await storage.set_many(
            [Entry("cacheme:soon:v1", b"soon", 50), Entry("cacheme:later:v1", b"later", 60_000)]
        )
        await asyncio.sleep(0.2)
        # The monitor runs about once a minute: retry in the unlikely case it ran just now,
        # so the document is proven present before and after the read that misses it.
        for _attempt in range(3):
            past = utcnow() - timedelta(seconds=30)
            await coll.update_one(
                {"key": "cacheme:stale:v1"},
                {"$set": {"value": Binary(b"stale"), "expire": past}},
                upsert=True,
            )
            keys = ["cacheme:stale:v1", "cacheme:soon:v1"]
            before = await coll.count_documents({"key": {"$in": keys}})
            found = await storage.get_many([*keys, "cacheme:later:v1"])
            got = await storage.get("cacheme:stale:v1")
            after = await coll.count_documents({"key": {"$in": keys}})
            assert found == {"cacheme:later:v1": b"later"}
            assert got is None
            if before == after == 2:
                break
            await storage.set_many([Entry("cacheme:soon:v1", b"soon", 1)])
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the TTL monitor deleted the expired documents three times in a row")


async def test_ttl_index_deletes_expired_documents() -> None:
    """On SecantusDB a TTL pass can be forced: it must delete expired entries, keep others."""
    async with mongo_storage("mongo-ttl") as (storage, coll):
        await storage.set_many(
            [
                Entry("cacheme:gone:v1", b"1", 1),
                Entry("cacheme:kept:v1", b"2", 60_000),
                Entry("cacheme:forever:v1", b"3", None),
            ]
        )
        await asyncio.sleep(0.05)
        async with admin_client() as client:
            try:
                await client.admin.command({"secantusAdmin.pruneTtl": 1})
            except OperationFailure:
                pytest.skip("not SecantusDB: the TTL monitor cannot be triggered on demand")
        keys = sorted([d["key"] async for d in coll.find({}, {"key": 1})])
        assert keys == ["cacheme:forever:v1", "cacheme:kept:v1"]


async def test_millisecond_ttl_is_stored_exactly() -> None:
    async with mongo_storage("mongo-ms") as (storage, coll):
        before = utcnow()
        await storage.set_many(
            [Entry("cacheme:ms:v1", b"x", 1_234), Entry("cacheme:no:v1", b"y", None)]
        )
        after = utcnow()
        doc = await coll.find_one({"key": "cacheme:ms:v1"})
        assert doc is not None
        low = before + timedelta(milliseconds=1_234) - timedelta(milliseconds=1)
        high = after + timedelta(milliseconds=1_234)
        assert low <= doc["expire"] <= high
        plain = await coll.find_one({"key": "cacheme:no:v1"})
        assert plain is not None
        assert plain["expire"] is None


async def test_key_field_is_the_full_key() -> None:
    """An operator finds and deletes an entry by its full key, as in Redis."""
    async with mongo_storage("mongo-key") as (storage, coll):
        await storage.set_many([Entry("cacheme:user:42:v3", b"\x00value", 60_000)])
        doc = await coll.find_one({"key": "cacheme:user:42:v3"})
        assert doc is not None
        assert set(doc) == {"_id", "key", "value", "expire"}
        assert doc["value"] == b"\x00value"
        binary = {"key": "cacheme:user:42:v3", "value": {"$type": "binData"}}
        assert await coll.count_documents(binary) == 1
        assert isinstance(doc["expire"], datetime)
        await coll.delete_one({"key": "cacheme:user:42:v3"})
        assert await storage.get("cacheme:user:42:v3") is None


async def test_unique_index_prevents_duplicates() -> None:
    async with mongo_storage("mongo-unique") as (storage, coll):
        await storage.set_many([Entry("cacheme:dup:v1", b"one", None)])
        with pytest.raises(DuplicateKeyError):
            await coll.insert_one({"key": "cacheme:dup:v1", "value": Binary(b"two")})
        # Two storages writing the same new keys at once still leave one document per key.
        other = Storage(MONGO_URL, database=DATABASE, collection=coll.name).build("mongo-other")
        assert isinstance(other, RemoteStorage)
        await other.connect()
        try:
            entries = [Entry(f"cacheme:race:{i}:v1", b"v", None) for i in range(50)]
            await asyncio.gather(
                *(s.set_many([e]) for e in entries for s in (storage, other, storage, other))
            )
        finally:
            await other.close()
        pipeline: list[dict[str, Any]] = [
            {"$group": {"_id": "$key", "n": {"$sum": 1}}},
            {"$match": {"n": {"$gt": 1}}},
        ]
        assert [d async for d in await coll.aggregate(pipeline)] == []
        assert await coll.count_documents({}) == 51


async def test_hits_larger_than_one_reply() -> None:
    """Hits beyond the server's 16 MiB per reply still all come back."""
    async with mongo_storage("mongo-big") as (storage, _):
        value = bytes(range(256)) * 4096  # 1 MiB
        entries = [Entry(f"cacheme:big:{i}:v1", value, None) for i in range(20)]
        await storage.set_many(entries)
        found = await storage.get_many([e.key for e in entries])
        assert found == {e.key: value for e in entries}


async def test_write_errors_do_not_quote_values() -> None:
    """A failed upsert names the error, not the (possibly huge, possibly private) value."""
    async with admin_client() as client:
        db = client[DATABASE]
        name = "cacheme_test_validated"
        await db.drop_collection(name)
        await db.create_collection(name, validator={"value": {"$type": "string"}})
        try:
            storage = Storage(MONGO_URL, database=DATABASE, collection=name, fail_open=False)
            backend = storage.build("mongo-invalid")
            assert isinstance(backend, RemoteStorage)
            await backend.connect()
            try:
                with pytest.raises(StorageError) as info:
                    await backend.set_many([Entry("cacheme:v:v1", b"PRIVATE-VALUE" * 100, None)])
            finally:
                await backend.close()
        finally:
            await db.drop_collection(name)
    message = str(info.value)
    assert "1 of 1 upsert(s) failed" in message
    assert "121" in message  # DocumentValidationFailure
    assert "PRIVATE-VALUE" not in message


async def test_missing_indexes_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cacheme"):
        async with mongo_storage("mongo-bare", indexes=False) as (storage, _):
            await storage.set_many([Entry("cacheme:k:v1", b"v", None)])
            assert await storage.get("cacheme:k:v1") == b"v"
    text = caplog.text
    assert "unique index on 'key'" in text
    assert "TTL index on 'expire'" in text
    assert "sql/mongo.js" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cacheme"):
        async with mongo_storage("mongo-indexed"):
            pass
    assert "lacks" not in caplog.text


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"collection": "bad$name"}, "collection"),
        ({"collection": ""}, "collection"),
        ({"collection": "system.cache"}, "collection"),
        ({"collection": "a..b"}, "collection"),
        ({"collection": "x\x00"}, "collection"),
        ({"database": "my.db"}, "database"),
        ({"database": "a/b"}, "database"),
        ({"database": "x" * 64}, "database"),
        ({"pool_size": 0}, "pool_size"),
        ({"poolsize": 5}, "poolsize"),
    ],
)
def test_bad_options_rejected(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Storage("mongodb://127.0.0.1:27017", **options).build("mongo-bad")
    assert problem in str(info.value)


def test_database_defaults() -> None:
    def database(url: str, **options: Any) -> str:
        storage = Storage(url, **options).build("mongo-db")
        assert isinstance(storage, MongoStorage)
        return storage.database

    assert database("mongodb://127.0.0.1:27017") == "cacheme"
    assert database("mongodb://127.0.0.1:27017/") == "cacheme"
    assert database("mongodb://127.0.0.1:27017/app?authSource=admin") == "app"
    assert database("mongodb://127.0.0.1:27017/app", database="cache") == "cache"
    assert database("mongodb+srv://cluster0.example.net/app") == "app"
    assert database("mongodb://h1:27017,h2:27018/app?replicaSet=rs") == "app"
    with pytest.raises(ConfigurationError, match="database"):
        database("mongodb://127.0.0.1:27017/bad.name")


@pytest.mark.parametrize("password", ["s3cret-pw", "p@ss:w/rd%"])
async def test_password_never_shown(password: str) -> None:
    from urllib.parse import quote

    url = f"mongodb://cacheme:{quote(password, safe='')}@127.0.0.1:1/cache"
    descriptor = Storage(url, timeout=0.2)
    storage = descriptor.build("mongo-secret")
    texts = [repr(descriptor), repr(storage), str(storage.options)]
    with pytest.raises(StorageError) as info:
        await storage.connect()
    error: BaseException | None = info.value
    while error is not None:  # the whole chain, driver errors included
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    encoded = quote(password, safe="")
    for text in texts:
        assert password not in text
        assert encoded not in text
    assert "cannot connect" in str(info.value)


async def test_password_never_shown_for_a_replica_set_url() -> None:
    """A replica-set URL lists several hosts: printing it must still hide the password."""
    url = "mongodb://cacheme:s3cret-pw@127.0.0.1:1,127.0.0.1:2/cache?replicaSet=rs"
    storage = Storage(url, timeout=0.2).build("mongo-rs")
    texts = [repr(storage)]
    with pytest.raises(StorageError) as info:
        await storage.connect()
    texts.append(str(info.value))
    for text in texts:
        assert "s3cret-pw" not in text
        assert "127.0.0.1:2" in text  # every host is still shown


async def test_password_not_shown_on_a_live_server() -> None:
    """Wrong credentials against the test server: an error, without the password."""
    async with admin_client():
        pass  # skip (or fail) here if there is no server
    host = MONGO_URL.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    url = f"mongodb://nobody:wr0ng-s3cret@{host}/{DATABASE}?authSource=admin"
    storage = Storage(url, timeout=1.0).build("mongo-auth")
    try:
        await storage.connect()
    except StorageError as exc:
        assert "wr0ng-s3cret" not in str(exc)
        assert "wr0ng-s3cret" not in repr(storage)
    else:  # a server without access control lets anybody in
        await storage.close()
        pytest.skip("the server does not check credentials")


async def test_duplicate_key_race_is_retried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first write that loses a race on the unique index (servers before MongoDB 4.2 and
    look-alikes do not retry it themselves) is sent again once, then reported."""
    async with mongo_storage("mongo-retry") as (storage, _):
        assert isinstance(storage, MongoStorage)
        coll = storage._collection
        real = coll.bulk_write
        calls: list[int] = []

        async def losing_first(ops: list[Any], **kwargs: Any) -> Any:
            calls.append(len(ops))
            result = await real(ops, **kwargs)
            if len(calls) == 1 or always_lose:
                index = min(1, len(ops) - 1)
                details = {
                    "writeErrors": [
                        {"index": index, "code": 11000, "errmsg": "E11000 duplicate key"}
                    ],
                    "writeConcernErrors": [],
                }
                raise BulkWriteError(details)
            return result

        monkeypatch.setattr(coll, "bulk_write", losing_first)
        always_lose = False
        entries = [Entry(f"cacheme:r:{i}:v1", f"{i}".encode(), None) for i in range(3)]
        await storage.set_many(entries)
        assert calls == [3, 1]
        assert await storage.get_many([e.key for e in entries]) == {e.key: e.value for e in entries}

        calls.clear()
        always_lose = True
        with pytest.raises(StorageError, match=r"1 of 1 upsert\(s\) failed; first: error 11000"):
            await storage.set_many(entries)
        # The batch (and its one retry) failed, then each entry was written alone (and
        # retried once), so the entry that keeps failing fails alone.
        assert calls == [3, 1] + [1, 1] * 3


class _CursorCommands(monitoring.CommandListener):
    """Records the find/getMore commands sent for one collection (by any client)."""

    def __init__(self) -> None:
        self.collection = ""
        self.seen: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        field = {"find": "find", "getMore": "collection"}.get(event.command_name)
        if field and event.command.get(field) == self.collection:
            self.seen.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


_cursor_commands = _CursorCommands()
monitoring.register(_cursor_commands)  # global, for clients created from now on


async def test_a_read_is_one_round_trip_even_when_every_key_hits() -> None:
    """A first batch the hits fill exactly would leave the cursor open (a getMore more)."""
    async with mongo_storage("mongo-one-trip") as (storage, coll):
        _cursor_commands.collection = coll.name
        try:
            entries = [Entry(f"cacheme:trip:{i}:v1", b"v", None) for i in range(100)]
            await storage.set_many(entries)
            for wanted in ([entries[0].key], [e.key for e in entries], ["cacheme:none:v1"]):
                _cursor_commands.seen.clear()
                found = await storage.get_many(wanted)
                assert len(found) == len([k for k in wanted if "trip" in k])
                assert _cursor_commands.seen == ["find"]
        finally:
            _cursor_commands.collection = ""
