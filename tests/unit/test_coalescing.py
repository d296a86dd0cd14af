"""The remote-storage machinery of ``RemoteStorage``: coalescing, batch bound, error routing.

The backend here is an in-process implementation of the contract (a dict), so the tests can
make exactly one batch fail; every backend runs the same machinery against its real server in
tests/integration/test_storage_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from cacheme.errors import StorageError, StorageUnavailableError
from cacheme.storages.base import Entry, RemoteOptions, RemoteStorage


class DictStorage(RemoteStorage[RemoteOptions]):
    """Keys starting with ``bad`` make the whole batch that holds them fail."""

    def __init__(self, **options: Any) -> None:
        super().__init__("dict", "dict://", RemoteOptions(**options))
        self.data: dict[str, bytes] = {}
        self.batches: list[list[str]] = []

    async def _connect(self) -> None:
        pass

    async def _close(self) -> None:
        pass

    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        self.batches.append(list(keys))
        await asyncio.sleep(0)
        if any(k.startswith("bad") for k in keys):
            raise OSError("connection reset")
        return {k: self.data[k] for k in keys if k in self.data}

    async def _set_many(self, entries: Sequence[Entry]) -> None:
        self.batches.append([e.key for e in entries])
        await asyncio.sleep(0)
        if any(e.key.startswith("bad") for e in entries):
            raise OSError("connection reset")
        self.data.update({e.key: e.value for e in entries})

    async def _remove_many(self, keys: Sequence[str]) -> None:
        self.batches.append(list(keys))
        for key in keys:
            self.data.pop(key, None)


async def test_reads_of_one_turn_are_one_batch_each_caller_gets_its_own() -> None:
    store = DictStorage()
    store.data = {f"k{i}": str(i).encode() for i in range(10)}
    results = await asyncio.gather(*(store.get(f"k{i}") for i in range(10)), store.get("none"))
    assert results == [str(i).encode() for i in range(10)] + [None]
    assert len(store.batches) == 1


async def test_duplicate_keys_are_sent_once() -> None:
    store = DictStorage()
    store.data = {"a": b"1"}

    async def many() -> dict[str, bytes]:
        return await store.get_many(["a", "a"])

    assert await asyncio.gather(store.get("a"), store.get("a"), many()) == [
        b"1",
        b"1",
        {"a": b"1"},
    ]
    assert store.batches == [["a"]]


async def test_batches_are_bounded_by_batch_size() -> None:
    store = DictStorage(batch_size=10)
    await asyncio.gather(*(store.get(f"k{i}") for i in range(25)))
    assert [len(b) for b in store.batches] == [10, 10, 5]


async def test_a_failed_batch_fails_only_its_own_callers() -> None:
    store = DictStorage(batch_size=2, breaker_threshold=100)
    store.data = {"k1": b"1", "k2": b"2", "k3": b"3"}
    # batches: [k1, k2], [bad, k3]
    outcomes = await asyncio.gather(
        store.get("k1"),
        store.get("k2"),
        store.get("bad"),
        store.get("k3"),
        return_exceptions=True,
    )
    assert outcomes[:2] == [b"1", b"2"]
    assert isinstance(outcomes[2], StorageError) and isinstance(outcomes[3], StorageError)
    assert "connection reset" in str(outcomes[2])


async def test_failed_writes_reach_only_their_callers() -> None:
    store = DictStorage(batch_size=1, breaker_threshold=100)
    outcomes = await asyncio.gather(
        store.set_many([Entry("good", b"g", None)]),
        store.set_many([Entry("bad", b"b", None)]),
        return_exceptions=True,
    )
    assert outcomes[0] is None and isinstance(outcomes[1], StorageError)
    assert store.data == {"good": b"g"}


async def test_coalescing_can_be_turned_off() -> None:
    store = DictStorage(coalesce=False)
    await asyncio.gather(*(store.get(f"k{i}") for i in range(5)))
    assert len(store.batches) == 5


async def test_breaker_opens_then_one_trial_closes_it() -> None:
    store = DictStorage(breaker_threshold=2, breaker_cooldown=0.05, coalesce=False)
    for _ in range(2):
        with pytest.raises(StorageError):
            await store.get("bad")
    assert store.breaker_open
    with pytest.raises(StorageUnavailableError):
        await store.get("k")  # skipped without a round trip
    trips = len(store.batches)
    await asyncio.sleep(0.08)
    # After the cooldown one call is the trial; calls made meanwhile are still rejected.
    trial = asyncio.ensure_future(store.get("k"))
    await asyncio.sleep(0)  # the trial is under way (its round trip has started)
    with pytest.raises(StorageUnavailableError):
        await store.get("other")
    assert await trial is None
    assert not store.breaker_open
    assert len(store.batches) == trips + 1
    assert store.stats.breaker_opens == 1 and store.stats.rejected == 2
