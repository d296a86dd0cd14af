"""The W-TinyLFU tier: bounded, frequency-aware, per-entry TTLs, collisions handled."""

from __future__ import annotations

import math
import threading
import time

import pytest

from cacheme.storages.base import MISS
from cacheme.storages.local import LocalOptions, LRUStorage, TinyLFUStorage


def tlfu(size: int) -> TinyLFUStorage:
    return TinyLFUStorage("t", "local://tlfu", LocalOptions(size=size))


def test_get_set_remove_and_none_values() -> None:
    store = tlfu(10)
    assert store.get("a") is MISS
    store.set("a", None, None)
    assert store.get("a") is None
    store.remove("a")
    assert store.get("a") is MISS
    store.remove("a")  # absent: fine


def test_size_is_a_bound() -> None:
    store = tlfu(100)
    for i in range(5_000):
        store.set(f"k{i}", i, None)
        assert len(store) <= 100


def test_frequently_read_keys_survive_a_scan() -> None:
    store = tlfu(100)
    hot = [f"hot{i}" for i in range(20)]
    for key in hot:
        store.set(key, key, None)
    for _ in range(30):
        for key in hot:
            assert store.get(key) == key
    for i in range(2_000):  # one-hit wonders
        store.set(f"scan{i}", i, None)
    kept = sum(store.get(key) is not MISS for key in hot)
    # The frequency sketch is probabilistic (string hashes vary per process): allow one loss.
    assert kept >= len(hot) - 1


def test_entries_expire_per_entry() -> None:
    store = tlfu(10)
    store.set("short", 1, 0.03)
    store.set("long", 2, 30.0)
    store.set("never", 3, None)
    assert store.get("short") == 1
    time.sleep(0.06)
    assert store.get("short") is MISS
    assert store.get("long") == 2
    assert store.get("never") == 3


def test_overwrite_changes_value_and_ttl() -> None:
    store = tlfu(10)
    store.set("k", 1, 0.02)
    store.set("k", 2, None)
    time.sleep(0.04)
    assert store.get("k") == 2
    assert len(store) == 1


@pytest.mark.parametrize("cls", [TinyLFUStorage, LRUStorage])
def test_remaining_lifetime_and_threadsafe_handoff(cls: type[TinyLFUStorage]) -> None:
    store = cls("t", "local://x", LocalOptions(size=10))
    store.set("ttl", 1, 60.0)
    store.set("forever", 2, None)
    left = store.remaining(["ttl", "forever", "absent"])
    assert set(left) == {"ttl", "forever"}
    assert 59 < left["ttl"] <= 60
    assert left["forever"] == math.inf
    # Another thread hands drops over; they apply before the next operation.
    worker = threading.Thread(target=store.discard_threadsafe, args=(["ttl"],))
    worker.start()
    worker.join()
    assert store.get("ttl") is MISS
    assert store.get("forever") == 2
    store.clear_threadsafe()
    assert store.get("forever") is MISS


@pytest.mark.parametrize("cls", [TinyLFUStorage, LRUStorage])
def test_several_threads_at_once(cls: type[TinyLFUStorage]) -> None:
    """Threads that each run a loop share the process's local storages: gets, sets (some
    expiring at once), removals and the backplane's handovers from four threads at a time,
    with a thread switch forced every microsecond, raise nothing, keep the size bound and
    leave the entry map and the eviction policy agreeing. (An expired entry deleted twice,
    an LRU entry removed between its lookup and its move to the end, two threads applying
    one handover: each raised before.)"""
    import random

    from .helpers import threads_switching_fast

    store = cls("t", "local://x", LocalOptions(size=10))
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while not stop.is_set():
                key = f"k{rnd.randrange(40)}"
                op = rnd.random()
                if op < 0.5:
                    value = store.get(key)
                    assert value is MISS or value[0] == key, (key, value)
                elif op < 0.8:
                    store.set(key, (key, seed), rnd.choice([None, 1e-6, 30.0]))
                elif op < 0.95:
                    store.remove(key)
                else:
                    store.discard_threadsafe([key])
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    with threads_switching_fast(hammer) as threads:
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not errors, errors
    store.remove("absent")  # applies what was handed over
    assert len(store) <= 10
    if isinstance(store, TinyLFUStorage):
        assert set(store._map) <= set(store._keys.values())
    store.clear_threadsafe()
    store.set("k", ("k", 0), None)
    assert store.get("k") == ("k", 0)
    assert len(store) == 1


@pytest.mark.parametrize("how", ["clear", "clear_threadsafe"])
@pytest.mark.parametrize("cls", [TinyLFUStorage, LRUStorage])
def test_a_storage_cleared_once_full_keeps_new_entries(cls: type[TinyLFUStorage], how: str) -> None:
    """The backplane clears every local tier after a lost link. A W-TinyLFU tier cleared
    once it had been full then evicted every key set afterwards at once (theine-core's
    ``TlfuCore.clear``), so it never held a value again."""
    store = cls("t", "local://x", LocalOptions(size=10))
    for i in range(30):
        store.set(f"old{i}", i, None)
    getattr(store, how)()
    for i in range(10):
        store.set(f"new{i}", i, None)
    assert [store.get(f"new{i}") for i in range(10)] == list(range(10))
    assert store.get("old29") is MISS


@pytest.mark.parametrize("size", [10**8 + 1, 10**9, 2**63 - 1])
async def test_a_tlfu_size_too_large_is_refused(size: int) -> None:
    """theine-core reserves the policy's address space up front: ``size=sys.maxsize``, and
    10**9 on this 24 GiB machine, aborted the interpreter (a failed allocation in Rust). Now
    the option is refused by name above 10**8."""
    import cacheme

    with pytest.raises(cacheme.ConfigurationError, match=r"storage 'huge' .*size"):
        await cacheme.register_storage("huge", cacheme.Storage("local://tlfu", size=size))
    await cacheme.register_storage("huge", cacheme.Storage("local://lru", size=size))
    await cacheme.close_storages()


@pytest.mark.parametrize("cls", [TinyLFUStorage, LRUStorage])
def test_a_value_freed_on_eviction_may_use_the_storage(cls: type[TinyLFUStorage]) -> None:
    """Changes are made under the storage's lock: a value whose finalizer writes to the same
    storage, freed when evicted or replaced there, must not deadlock the thread."""
    store = cls("t", "local://x", LocalOptions(size=2))

    class Noisy:
        def __del__(self) -> None:
            store.set("freed", True, None)
            store.remove("gone")

    done = threading.Event()

    def fill() -> None:
        for i in range(50):
            store.set(f"k{i % 5}", Noisy(), None)
        done.set()

    worker = threading.Thread(target=fill, daemon=True)
    worker.start()
    assert done.wait(10), "deadlocked on the storage's own lock"


@pytest.mark.parametrize("cls", [TinyLFUStorage, LRUStorage])
def test_a_clear_whose_values_write_back_keeps_the_bound(cls: type[TinyLFUStorage]) -> None:
    """Values whose finalizers write to the storage, freed by a clear: the W-TinyLFU tier
    then held entries its policy did not know of (the clear wiped the index after the
    finalizers had written to it), so they were never evicted and the size bound broke."""
    store = cls("t", "local://x", LocalOptions(size=50))

    class Noisy:
        def __init__(self, n: int) -> None:
            self.n = n

        def __del__(self) -> None:
            store.set(f"freed{self.n}", self.n, None)

    for i in range(50):
        store.set(f"k{i}", Noisy(i), None)
    store.clear()
    for i in range(5_000):
        store.set(f"after{i}", i, None)
    assert len(store) <= 50
    if isinstance(store, TinyLFUStorage):
        assert set(store._map) <= set(store._keys.values())
