"""``RemoteStorage.add_many`` (set-if-absent): batched, ordered and isolated like
``set_many``, on an in-process backend that uses the base's fallback ``_add_many``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from cacheme.errors import StorageError
from cacheme.storages.base import Entry

from .test_coalescing import DictStorage


class AddingStorage(DictStorage):
    """Counts the raw adds; delegates to the base's read-then-write fallback."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.adds: list[list[str]] = []

    async def _add_many(self, entries: Sequence[Entry]) -> None:
        self.adds.append([e.key for e in entries])
        await super()._add_many(entries)


async def test_stores_only_absent_keys_in_one_batch_per_turn() -> None:
    store = AddingStorage()
    store.data = {"a": b"old"}
    await asyncio.gather(
        store.add_many([Entry("a", b"new", None)]),
        store.add_many([Entry("b", b"new", None), Entry("c", b"new", 1000)]),
    )
    assert store.data == {"a": b"old", "b": b"new", "c": b"new"}
    assert store.adds == [["a", "b", "c"]]


async def test_the_first_add_of_a_key_wins_and_writes_of_the_turn_land_first() -> None:
    store = AddingStorage()
    await asyncio.gather(
        store.add_many([Entry("k", b"first", None)]),
        store.add_many([Entry("k", b"second", None)]),
    )
    assert store.data == {"k": b"first"}
    assert store.adds == [["k"]]
    await asyncio.gather(
        store.add_many([Entry("w", b"added", None)]),
        store.set_many([Entry("w", b"set", None)]),
    )
    assert store.data["w"] == b"set"


async def test_an_add_waits_for_an_earlier_write_of_its_key() -> None:
    store = AddingStorage()
    write = asyncio.ensure_future(store.set_many([Entry("k", b"set", None)]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the write's batch is running
    await store.add_many([Entry("k", b"added", None)])
    await write
    assert store.data == {"k": b"set"}


async def test_a_refused_key_fails_only_its_caller() -> None:
    store = AddingStorage()
    good = store.add_many([Entry("good", b"g", None)])
    bad = store.add_many([Entry("bad", b"b", None)])
    outcomes = await asyncio.gather(good, bad, return_exceptions=True)
    assert outcomes[0] is None
    assert isinstance(outcomes[1], StorageError)
    assert store.data == {"good": b"g"}
    assert store.stats.errors >= 1


async def test_without_coalescing() -> None:
    store = AddingStorage(coalesce=False)
    store.data = {"a": b"old"}
    await store.add_many([Entry("a", b"new", None), Entry("b", b"new", None)])
    await store.add_many([])
    assert store.data == {"a": b"old", "b": b"new"}
    assert store.adds == [["a", "b"]]


async def test_close_fails_queued_adds() -> None:
    store = AddingStorage()
    pending = store.add_many([Entry("k", b"v", None)])
    await store.close()
    with pytest.raises(StorageError, match="closed"):
        await pending
