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
