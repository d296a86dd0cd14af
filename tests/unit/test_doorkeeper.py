"""Doorkeeper: a key reaches the caches only from its second load on."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import cacheme
from cacheme import BloomFilter, Cache, ConfigurationError, Node, Storage

from .helpers import stored


@pytest.fixture(autouse=True)
async def _local() -> AsyncIterator[None]:
    await cacheme.register_storage("local", Storage(url="local://lru", size=1000))
    yield


def guarded(size: int = 1000) -> tuple[type[Node], list[int]]:
    loads: list[int] = []

    class Guarded(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"guarded:{self.n}"

        async def load(self) -> int:
            loads.append(self.n)
            return self.n

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local")]
            doorkeeper = BloomFilter(size, 0.01)

    return Guarded, loads


async def test_first_load_is_not_cached_second_is() -> None:
    node_cls, loads = guarded()
    assert await cacheme.get(node_cls(1)) == 1  # type: ignore[call-arg]
    assert stored("local", "cacheme:guarded:1:v1") == (None, False)
    assert await cacheme.get(node_cls(1)) == 1  # type: ignore[call-arg]
    assert stored("local", "cacheme:guarded:1:v1") == (1, True)
    assert await cacheme.get(node_cls(1)) == 1  # type: ignore[call-arg]
    assert loads == [1, 1]
    stats = cacheme.stats(node_cls)
    assert (stats.request_count(), stats.hit_count(), stats.load_count()) == (3, 1, 2)


async def test_doorkeeper_applies_to_get_all() -> None:
    node_cls, loads = guarded()
    nodes = [node_cls(1), node_cls(2)]  # type: ignore[call-arg]
    assert await cacheme.get_all(nodes) == [1, 2]
    assert await cacheme.get_all(nodes) == [1, 2]
    assert await cacheme.get_all(nodes) == [1, 2]
    assert sorted(loads) == [1, 1, 2, 2]


async def test_refresh_is_not_held_back() -> None:
    node_cls, _ = guarded()
    await cacheme.refresh(node_cls(1))  # type: ignore[call-arg]
    assert stored("local", "cacheme:guarded:1:v1") == (1, True)


def test_filter_admits_from_the_second_sighting() -> None:
    bf = BloomFilter(100, 0.01)
    assert bf.admit("a") is False
    assert bf.admit("a") is True
    assert bf.admit("a") is True
    assert bf.admit("b") is False


def test_filter_resets_when_its_request_count_reaches_size() -> None:
    bf = BloomFilter(4, 0.01)
    assert bf.admit("a") is False  # 1
    assert bf.admit("a") is True  # 2
    assert bf.admit("b") is False  # 3
    assert bf.admit("a") is True  # 4: answered, then the filter resets
    assert bf.admit("a") is False  # forgotten
    assert bf.admit("a") is True


def test_a_filter_of_two_still_admits_a_repeat() -> None:
    bf = BloomFilter(2, 0.01)
    for _ in range(3):
        assert bf.admit("k") is False
        assert bf.admit("k") is True


async def test_filter_reset_at_node_level() -> None:
    node_cls, loads = guarded(size=2)
    await cacheme.get(node_cls(1))  # type: ignore[call-arg]  # sighting 1
    await cacheme.get(node_cls(2))  # type: ignore[call-arg]  # sighting 2: reset
    await cacheme.get(node_cls(1))  # type: ignore[call-arg]  # forgotten: first again
    assert stored("local", "cacheme:guarded:1:v1") == (None, False)
    await cacheme.get(node_cls(1))  # type: ignore[call-arg]
    assert stored("local", "cacheme:guarded:1:v1") == (1, True)
    assert loads == [1, 2, 1, 1]


@pytest.mark.parametrize(
    ("size", "rate"), [(0, 0.01), (-1, 0.01), (1.5, 0.01), (True, 0.01), (10, 0), (10, 1)]
)
def test_bad_filter_parameters(size: object, rate: float) -> None:
    with pytest.raises(ConfigurationError, match="BloomFilter"):
        BloomFilter(size, rate)  # type: ignore[arg-type]


def test_doorkeeper_must_be_a_doorkeeper() -> None:
    with pytest.raises(ConfigurationError, match=r"Bad\.Meta\.doorkeeper must be a DoorKeeper"):

        class Bad(Node):
            class Meta(Node.Meta):
                doorkeeper = "bloom"  # type: ignore[assignment]
