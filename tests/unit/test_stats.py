"""Per-node stats: every method of the spec, zero-safe, counted by the rules in cacheme/stats.py."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

import cacheme
from cacheme import Cache, ConfigurationError, Node, NodeStats, Storage

from .helpers import Counter, settle, tier

SPEC_METHODS = [
    "request_count",
    "hit_count",
    "hit_rate",
    "miss_count",
    "miss_rate",
    "load_success_count",
    "load_failure_count",
    "load_failure_rate",
    "load_count",
    "total_load_time",
    "average_load_time",
]


@pytest.fixture(autouse=True)
async def _local() -> AsyncIterator[None]:
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=1000))
    yield


def fresh_node() -> type[Node]:
    class Fresh(Node):
        def __init__(self, n: int = 0) -> None:
            self.n = n

        def key(self) -> str:
            return f"fresh:{self.n}"

        async def load(self) -> int:
            await asyncio.sleep(0.001)
            return self.n

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local")]

    return Fresh


def counts(stats: NodeStats) -> dict[str, Any]:
    return {name: getattr(stats, name)() for name in SPEC_METHODS}


def test_fresh_node_is_zero_safe() -> None:
    assert counts(cacheme.stats(fresh_node())) == {
        "request_count": 0,
        "hit_count": 0,
        "hit_rate": 1.0,
        "miss_count": 0,
        "miss_rate": 0.0,
        "load_success_count": 0,
        "load_failure_count": 0,
        "load_failure_rate": 0.0,
        "load_count": 0,
        "total_load_time": 0,
        "average_load_time": 0.0,
    }


def test_extra_counters_start_at_zero() -> None:
    stats = cacheme.stats(fresh_node())
    assert stats.storage_error_count() == 0
    assert stats.storage_timeout_count() == 0
    assert stats.decode_error_count() == 0
    assert stats.stale_count() == 0


async def test_hits_misses_and_loads() -> None:
    node_cls = fresh_node()
    await cacheme.get(node_cls(1))  # miss, load
    await cacheme.get(node_cls(1))  # hit
    await cacheme.get(node_cls(1))  # hit
    await cacheme.get(node_cls(2))  # miss, load
    stats = cacheme.stats(node_cls)
    c = counts(stats)
    assert c["request_count"] == 4
    assert c["hit_count"] == 2
    assert c["miss_count"] == 2
    assert c["hit_rate"] == 0.5
    assert c["miss_rate"] == 0.5
    assert c["load_success_count"] == 2
    assert c["load_failure_count"] == 0
    assert c["load_count"] == 2
    assert c["load_failure_rate"] == 0.0
    assert c["total_load_time"] >= 2 * 1_000_000  # two loads of >= 1 ms, in ns
    assert c["average_load_time"] == c["total_load_time"] / 2


async def test_failed_loads() -> None:
    node_cls = fresh_node()

    async def fail(_node: object) -> int:
        raise RuntimeError("no")

    for _ in range(3):
        with pytest.raises(RuntimeError):
            await cacheme.get(node_cls(1), load_fn=fail)
    await cacheme.get(node_cls(1))
    c = counts(cacheme.stats(node_cls))
    assert c["request_count"] == 4
    assert c["hit_count"] == 0
    assert c["miss_count"] == 4
    assert c["load_failure_count"] == 3
    assert c["load_success_count"] == 1
    assert c["load_count"] == 4
    assert c["load_failure_rate"] == 0.75


async def test_coalesced_waiters_are_misses_when_the_flight_loaded() -> None:
    node_cls = fresh_node()
    gate = asyncio.Event()
    load = Counter(1, gate)
    tasks = [asyncio.ensure_future(cacheme.get(node_cls(1), load_fn=load)) for _ in range(10)]
    await settle()
    gate.set()
    await asyncio.gather(*tasks)
    c = counts(cacheme.stats(node_cls))
    assert (c["request_count"], c["hit_count"], c["miss_count"], c["load_count"]) == (10, 0, 10, 1)
    assert cacheme.stats(node_cls).coalesced_count() == 9


async def test_hits_are_counted_per_tier() -> None:
    await cacheme.register_storage("second", cacheme.Storage(url="local://lru", size=10))

    class Two(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"two:{self.n}"

        async def load(self) -> int:
            return self.n

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local"), Cache(storage="second")]

    tier("second").set("cacheme:two:1:v1", "landed", None)
    assert await asyncio.gather(*[cacheme.get(Two(1)) for _ in range(3)]) == ["landed"] * 3
    # The first hit in "second" copied the value into "local": the others hit there.
    s = cacheme.stats(Two)
    assert (s.request_count(), s.hit_count(), s.load_count()) == (3, 3, 0)
    assert s.tier_hits == {"local": 2, "second": 1}
    assert s.tier_hit_count("second") == 1


async def test_get_all_counts_like_get_duplicates_included() -> None:
    node_cls = fresh_node()
    a, b = node_cls(1), node_cls(2)
    await cacheme.get_all([a, a, b])
    c = counts(cacheme.stats(node_cls))
    assert (c["request_count"], c["hit_count"], c["load_count"]) == (3, 0, 2)
    assert cacheme.stats(node_cls).coalesced_count() == 1  # the duplicate a
    await cacheme.get_all([a, b, b])
    c = counts(cacheme.stats(node_cls))
    assert (c["request_count"], c["hit_count"], c["load_count"]) == (6, 3, 2)


async def test_refresh_counts_a_load_not_a_request() -> None:
    node_cls = fresh_node()
    await cacheme.refresh(node_cls(1))
    c = counts(cacheme.stats(node_cls))
    assert (c["request_count"], c["load_count"]) == (0, 1)


async def test_snapshot_is_frozen_and_detached() -> None:
    node_cls = fresh_node()
    before = cacheme.stats(node_cls)
    await cacheme.get(node_cls(1))
    assert before.request_count() == 0
    assert cacheme.stats(node_cls).request_count() == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.requests = 5  # type: ignore[misc]


def test_stats_takes_a_node_class() -> None:
    node_cls = fresh_node()
    with pytest.raises(ConfigurationError, match="node class"):
        cacheme.stats(node_cls())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="node class"):
        cacheme.stats(int)  # type: ignore[arg-type]


def test_rates_on_hand_made_snapshots() -> None:
    stats = NodeStats(requests=4, hits=1, load_successes=1, load_failures=3, load_time_ns=400)
    assert stats.hit_rate() == 0.25
    assert stats.miss_count() == 3
    assert stats.miss_rate() == 0.75
    assert stats.load_count() == 4
    assert stats.load_failure_rate() == 0.75
    assert stats.average_load_time() == 100.0
