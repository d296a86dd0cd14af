"""The MongoDB test factory: a fresh collection per test, indexed as ``sql/mongo.js`` says.

The index specifications are read from ``sql/mongo.js`` itself (its ``createIndex`` calls),
so the tests prove the script an operator runs.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from cacheme.errors import StorageError
from cacheme.storages.base import RemoteStorage
from cacheme.storages.registry import Storage
from tests.services import MONGO_URL, unavailable

from .backends import factory

MONGO_JS = Path(__file__).resolve().parents[2] / "sql" / "mongo.js"
DATABASE = "cacheme_test"

Document = dict[str, Any]

_CREATE_INDEX = re.compile(r"\.createIndex\(\s*(\{[^{}]*\})\s*,\s*(\{[^{}]*\})\s*\)")
_BARE_NAME = re.compile(r"([{,]\s*)([A-Za-z_$][\w$]*)\s*:")


def _js_object(text: str) -> dict[str, Any]:
    """A flat JS object literal (bare names, JSON values) as a dict."""
    result: dict[str, Any] = json.loads(_BARE_NAME.sub(r'\1"\2":', text))
    return result


def index_specs() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(keys, options)`` of every ``createIndex`` call in ``sql/mongo.js``."""
    code = "\n".join(
        line for line in MONGO_JS.read_text().splitlines() if not line.lstrip().startswith("//")
    )
    specs = [(_js_object(k), _js_object(o)) for k, o in _CREATE_INDEX.findall(code)]
    assert specs, f"no createIndex calls found in {MONGO_JS}"
    return specs


async def create_collection(client: AsyncMongoClient[Document], name: str) -> None:
    """Create ``name`` in the test database with the indexes of ``sql/mongo.js``."""
    db = client[DATABASE]
    await db.create_collection(name)
    for keys, options in index_specs():
        await db[name].create_index(list(keys.items()), **options)


# Why the server was unreachable, once it was: later tests skip at once instead of waiting.
_unreachable: list[BaseException] = []


@asynccontextmanager
async def admin_client() -> AsyncIterator[AsyncMongoClient[Document]]:
    """A plain client on the test server (skips, or fails, when there is none)."""
    if _unreachable:
        unavailable("MongoDB", MONGO_URL, _unreachable[0])
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        MONGO_URL, serverSelectionTimeoutMS=3000, tz_aware=True
    )
    try:
        try:
            await client.admin.command("ping")
        except PyMongoError as exc:
            _unreachable.append(exc)
            unavailable("MongoDB", MONGO_URL, exc)
        yield client
    finally:
        await client.close()


@asynccontextmanager
async def mongo_storage(
    name: str, *, indexes: bool = True, **options: Any
) -> AsyncIterator[tuple[RemoteStorage[Any], AsyncCollection[Document]]]:
    """A connected storage on a new collection, and that collection (dropped after)."""
    collection = f"cacheme_test_{uuid.uuid4().hex[:16]}"
    async with admin_client() as client:
        db = client[DATABASE]
        try:
            if indexes:
                await create_collection(client, collection)
            storage = Storage(MONGO_URL, database=DATABASE, collection=collection, **options).build(
                name
            )
            assert isinstance(storage, RemoteStorage)
            try:
                await storage.connect()
            except StorageError as exc:
                unavailable("MongoDB", MONGO_URL, exc)
            try:
                yield storage, db[collection]
            finally:
                await storage.close()
        finally:
            await db.drop_collection(collection)


@factory("mongo")
@asynccontextmanager
async def _mongo(tmp_path: Path, name: str, **options: Any) -> AsyncIterator[RemoteStorage[Any]]:
    async with mongo_storage(name, **options) as (storage, _):
        yield storage
