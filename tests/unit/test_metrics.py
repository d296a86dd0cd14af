"""cacheme.metrics.snapshot(): every node and every storage, frozen, detached, JSON-ready."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

import cacheme
from cacheme import Cache, Node, NodeStats, Storage
from cacheme.metrics import StatsSnapshot, node_names, snapshot, tier_hits
from cacheme.storages import registry
from cacheme.storages.base import StorageStats


def make_node(label: str = "Metered") -> type[Node]:
    class Metered(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"{label}:{self.n}"

        async def load(self) -> int:
            return self.n * 10

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local", ttl=None)]

    Metered.__qualname__ = label
    return Metered


@pytest.fixture
async def local() -> None:
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=100))


async def test_counts_every_node_and_storage(local: None) -> None:
    node_cls = make_node("MeteredCounts")
    assert await cacheme.get(node_cls(1)) == 10
    assert await cacheme.get(node_cls(1)) == 10
    assert await cacheme.get(node_cls(2)) == 20

    snap = snapshot()
    assert isinstance(snap, StatsSnapshot)
    stats = snap.node(node_cls)
    assert snap.nodes[snap.name_of(node_cls)] is stats
    assert stats == cacheme.stats(node_cls)
    assert (stats.requests, stats.hits, stats.load_count()) == (3, 1, 2)
    if hasattr(stats, "tier_hits"):  # a core that counts hits per tier
        assert dict(tier_hits(stats)) == {"local": 1}
    # Every node class is listed, in definition order.
    assert len(snap.nodes) == len(cacheme.nodes())
    assert list(snap.nodes)[-1] == snap.name_of(node_cls)

    local_tier = snap.storages["local"]
    assert local_tier.local and local_tier.scheme == "local"
    assert local_tier.url == "local://tlfu"
    assert (local_tier.round_trips, local_tier.breaker_open) == (0, False)
    assert snap.taken_at > 0


async def test_snapshot_is_frozen_and_detached(local: None) -> None:
    node_cls = make_node("MeteredFrozen")
    await cacheme.get(node_cls(1))
    snap = snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.taken_at = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.nodes["x"] = NodeStats()  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.storages["x"] = snap.storages["local"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.storages["local"].errors = 3  # type: ignore[misc]

    await cacheme.get(node_cls(1))
    assert snap.node(node_cls).requests == 1  # the old snapshot does not move
    assert snapshot().node(node_cls).requests == 2


async def test_remote_storage_counters_and_breaker(
    local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage counters are copied as they are; the breaker state is read at that moment."""

    class FakeRemote:
        local = False
        url = "redis://user:secret@cache.example:6379/0"
        breaker_open = True
        stats = StorageStats(
            round_trips=7, keys_read=20, keys_written=5, keys_removed=1, errors=2, timeouts=1,
            rejected=4, breaker_opens=1,
        )  # fmt: skip

    monkeypatch.setitem(registry._storages, "remote", FakeRemote())  # type: ignore[arg-type]
    snap = snapshot()
    assert list(snap.storages) == ["local", "remote"]
    remote = snap.storages["remote"]
    assert remote.url == "redis://user:***@cache.example:6379/0"
    assert (remote.scheme, remote.local, remote.breaker_open) == ("redis", False, True)
    assert (remote.round_trips, remote.keys_read, remote.keys_written) == (7, 20, 5)
    assert (remote.keys_removed, remote.errors, remote.timeouts) == (1, 2, 1)
    assert (remote.rejected, remote.breaker_opens) == (4, 1)
    FakeRemote.stats.round_trips = 8
    assert remote.round_trips == 7


async def test_as_dict_is_plain_json(local: None) -> None:
    node_cls = make_node("MeteredJson")
    await cacheme.get(node_cls(3))
    await cacheme.get(node_cls(3))
    snap = snapshot()
    data: dict[str, Any] = json.loads(json.dumps(snap.as_dict()))
    entry = data["nodes"][snap.name_of(node_cls)]
    assert entry["requests"] == 2 and entry["hits"] == 1 and entry["misses"] == 1
    assert entry["loads"] == 1 and entry["hit_rate"] == 0.5
    assert entry["load_seconds"] == pytest.approx(entry["load_time_ns"] / 1e9)
    assert isinstance(entry["tier_hits"], dict) and entry["negative_hits"] >= 0
    assert data["storages"]["local"]["local"] is True


async def test_total_adds_up_every_node(local: None) -> None:
    a, b = make_node("MeteredTotalA"), make_node("MeteredTotalB")
    before = snapshot().total()
    await cacheme.get(a(1))
    await cacheme.get(a(1))
    await cacheme.get(b(1))
    total = snapshot().total()
    assert total.requests - before.requests == 3
    assert total.hits - before.hits == 1
    assert total.load_count() - before.load_count() == 2


def test_names_are_unique() -> None:
    first, second, third = make_node("Same"), make_node("Same"), make_node("Other")
    names = node_names([first, second, third])
    here = __name__
    assert names == [f"{here}.Same", f"{here}.Same#2", "Other"]
    snap = snapshot()
    assert len(set(snap.nodes)) == len(cacheme.nodes())
    assert snap.name_of(first) != snap.name_of(second)
