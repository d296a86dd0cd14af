"""get_all: one class, input order, duplicates kept, shared flights, load_all."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import cacheme
from cacheme import Cache, ConfigurationError, LoadError, Node, Storage, runtime

from .helpers import settle, stored, tier


@pytest.fixture(autouse=True)
async def _local() -> AsyncIterator[None]:
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=1000))
    yield


LOADS: list[int] = []
GATE: list[asyncio.Event] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOADS.clear()
    GATE.clear()


@dataclass
class Num(Node):
    n: int

    def key(self) -> str:
        return f"num:{self.n}"

    async def load(self) -> int:
        LOADS.append(self.n)
        if GATE:
            await GATE[0].wait()
        return self.n * 10

    class Meta(Node.Meta):
        version = "v1"
        caches = [Cache(storage="local")]


@dataclass
class Other(Node):
    n: int

    def key(self) -> str:
        return f"other:{self.n}"

    async def load(self) -> int:
        return self.n

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]


async def test_empty() -> None:
    assert await cacheme.get_all([]) == []


async def test_mixed_classes_raise() -> None:
    with pytest.raises(ConfigurationError, match=r"one class.*Num.*Other"):
        await cacheme.get_all([Num(1), Other(1)])  # type: ignore[list-item]


async def test_a_subclass_is_another_class() -> None:
    @dataclass
    class Sub(Num):
        pass

    with pytest.raises(ConfigurationError, match="one class"):
        await cacheme.get_all([Num(1), Sub(2)])


async def test_results_in_input_order_with_hits_and_misses() -> None:
    await cacheme.get(Num(2))
    assert await cacheme.get_all([Num(3), Num(2), Num(1)]) == [30, 20, 10]
    assert sorted(LOADS) == [1, 2, 3]
    assert stored("local", "cacheme:num:3:v1") == (30, True)


async def test_duplicates_are_kept_and_loaded_once() -> None:
    a, b = Num(1), Num(2)
    assert await cacheme.get_all([a, a, b]) == [10, 10, 20]
    assert sorted(LOADS) == [1, 2]
    assert await cacheme.get_all([b, a, b, b]) == [20, 10, 20, 20]
    assert sorted(LOADS) == [1, 2]


async def test_accepts_any_sequence() -> None:
    assert await cacheme.get_all((Num(1), Num(2))) == [10, 20]


async def test_shares_flights_with_concurrent_gets() -> None:
    GATE.append(asyncio.Event())
    single = asyncio.ensure_future(cacheme.get(Num(1)))
    await settle()
    assert LOADS == [1]
    batch = asyncio.ensure_future(cacheme.get_all([Num(1), Num(2), Num(1)]))
    await settle()
    later = asyncio.ensure_future(cacheme.get(Num(2)))
    await settle()
    GATE[0].set()
    assert await asyncio.wait_for(single, 2) == 10
    assert await asyncio.wait_for(batch, 2) == [10, 20, 10]
    assert await asyncio.wait_for(later, 2) == 20
    assert sorted(LOADS) == [1, 2]


async def test_default_loads_misses_concurrently() -> None:
    running = 0
    peak = 0

    class Parallel(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"par:{self.n}"

        async def load(self) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            return self.n

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    assert await cacheme.get_all([Parallel(i) for i in range(5)]) == list(range(5))
    assert peak == 5


async def test_default_a_failing_node_fails_only_its_callers() -> None:
    class Partly(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"partly:{self.n}"

        async def load(self) -> int:
            if self.n == 2:
                raise ValueError("two")
            return self.n

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    with pytest.raises(ValueError, match="two"):
        await cacheme.get_all([Partly(1), Partly(2), Partly(3)])
    assert stored("local", "cacheme:partly:1:") == (1, True)
    assert stored("local", "cacheme:partly:3:") == (3, True)
    assert len(runtime.current().flights) == 0


class Batched(Node):
    batches: list[list[int]] = []
    singles: list[int] = []
    omit: set[int] = set()

    def __init__(self, n: int) -> None:
        self.n = n

    def key(self) -> str:
        return f"batched:{self.n}"

    async def load(self) -> int:
        Batched.singles.append(self.n)
        return -self.n

    @classmethod
    async def load_all(cls, nodes: Sequence[Batched]) -> list[tuple[Batched, int]]:
        cls.batches.append(sorted(n.n for n in nodes))
        if GATE:
            await GATE[0].wait()
        return [(n, n.n * 100) for n in nodes if n.n not in cls.omit]

    class Meta(Node.Meta):
        version = "v1"
        caches = [Cache(storage="local")]


@pytest.fixture
def batched() -> type[Batched]:
    """A fresh subclass of ``Batched`` (same settings, its own stats)."""
    Batched.batches = []
    Batched.singles = []
    Batched.omit = set()

    class Fresh(Batched):
        pass

    return Fresh


async def test_load_all_override_loads_the_misses_in_one_call(batched: type[Batched]) -> None:
    await cacheme.get(batched(2))  # one node alone goes through load()
    assert batched.singles == [2]
    result = await cacheme.get_all([batched(1), batched(2), batched(3), batched(1)])
    assert result == [100, -2, 300, 100]
    assert batched.batches == [[1, 3]]
    assert batched.singles == [2]
    assert stored("local", "cacheme:batched:3:v1") == (300, True)
    stats = cacheme.stats(batched)
    assert stats.load_count() == 3


class OnlyBatched(Node):
    """Defines ``load_all`` and no ``load``: every load goes through ``load_all``."""

    batches: list[list[int]] = []

    def __init__(self, n: int) -> None:
        self.n = n

    def key(self) -> str:
        return f"only:{self.n}"

    @classmethod
    async def load_all(cls, nodes: Sequence[OnlyBatched]) -> list[tuple[OnlyBatched, int]]:
        cls.batches.append(sorted(n.n for n in nodes))
        return [(n, n.n * 10) for n in nodes if n.n != 13]

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]


@pytest.mark.parametrize("timeout", [None, 1.0])
async def test_a_node_with_load_all_only_loads_through_it_even_alone(
    local: Any, timeout: Any
) -> None:
    class Only(OnlyBatched):
        class Meta(Node.Meta):
            caches = [Cache(storage="local")]
            load_timeout = timeout

    Only.batches = []
    assert await cacheme.get_all([Only(1), Only(2)]) == [10, 20]
    assert await cacheme.get_all([Only(3)]) == [30]  # one miss
    assert await cacheme.get_all([Only(1), Only(4), Only(4)]) == [10, 40, 40]
    assert await cacheme.get(Only(5)) == 50  # a lone get
    assert await cacheme.refresh(Only(5)) == 50
    assert Only.batches == [[1, 2], [3], [4], [5], [5]]
    with pytest.raises(LoadError, match=r"Only\.load_all returned no value.*only:13"):
        await cacheme.get(Only(13))
    stats = cacheme.stats(Only)
    assert stats.load_success_count() == 6 and stats.load_failure_count() == 1


async def test_load_all_that_omits_a_node_fails_that_node(batched: type[Batched]) -> None:
    batched.omit = {2}
    GATE.append(asyncio.Event())
    batch = asyncio.ensure_future(cacheme.get_all([batched(1), batched(2), batched(3)]))
    await settle()
    waiter_2 = asyncio.ensure_future(cacheme.get(batched(2)))
    waiter_3 = asyncio.ensure_future(cacheme.get(batched(3)))
    await settle()
    GATE[0].set()
    with pytest.raises(LoadError, match=r"Fresh\.load_all returned no value.*batched:2"):
        await asyncio.wait_for(batch, 2)
    with pytest.raises(LoadError):
        await asyncio.wait_for(waiter_2, 2)
    assert await asyncio.wait_for(waiter_3, 2) == 300
    assert stored("local", "cacheme:batched:1:v1") == (100, True)
    assert stored("local", "cacheme:batched:2:v1") == (None, False)
    assert len(runtime.current().flights) == 0
    stats = cacheme.stats(batched)
    assert stats.load_success_count() == 2
    assert stats.load_failure_count() == 1


async def test_load_all_returning_two_values_for_a_node_fails_that_node(local: Any) -> None:
    """A ``load_all`` that pairs one node with two values (a JOIN that doubled a row): which
    one is the node's is unknown, so that node fails with a ``LoadError`` and nothing of it
    is cached; the others are served. Before, the last value was kept and cached."""

    class Doubled(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"doubled:{self.n}"

        @classmethod
        async def load_all(cls, nodes: Sequence[Doubled]) -> list[tuple[Doubled, str]]:
            return [(n, f"item {n.n}") for n in nodes] + [(nodes[0], "another row")]

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local")]

    with pytest.raises(
        LoadError, match=r"Doubled\.load_all returned more than one value .*doubled:1"
    ):
        await cacheme.get_all([Doubled(1), Doubled(2)])
    assert stored("local", "cacheme:doubled:1:v1") == (None, False)
    assert stored("local", "cacheme:doubled:2:v1") == ("item 2", True)
    assert await cacheme.get(Doubled(2)) == "item 2"
    stats = cacheme.stats(Doubled)
    assert stats.load_success_count() == 1 and stats.load_failure_count() == 1


async def test_load_all_returning_garbage_is_a_load_error(batched: type[Batched]) -> None:
    class Garbage(Batched):
        @classmethod
        async def load_all(cls, nodes: Sequence[Any]) -> Any:
            return 42

    with pytest.raises(LoadError, match=r"Garbage\.load_all must return \(node, value\) pairs"):
        await asyncio.wait_for(cacheme.get_all([Garbage(1), Garbage(2)]), 2)
    stats = cacheme.stats(Garbage)
    assert stats.load_failure_count() == 2
    assert stats.load_success_count() == 0
    assert len(runtime.current().flights) == 0


async def test_load_all_returning_non_nodes_is_a_load_error(batched: type[Batched]) -> None:
    class NotNodes(Batched):
        @classmethod
        async def load_all(cls, nodes: Sequence[Any]) -> Any:
            return [(n.n, n.n) for n in nodes]

    with pytest.raises(LoadError, match=r"1 is not a node"):
        await asyncio.wait_for(cacheme.get_all([NotNodes(1), NotNodes(2)]), 2)
    assert cacheme.stats(NotNodes).load_failure_count() == 2
    assert len(runtime.current().flights) == 0


async def test_load_all_raising_fails_every_node(batched: type[Batched]) -> None:
    class Raising(Batched):
        @classmethod
        async def load_all(cls, nodes: Sequence[Any]) -> Any:
            raise RuntimeError("db down")

    with pytest.raises(RuntimeError, match="db down"):
        await asyncio.wait_for(cacheme.get_all([Raising(1), Raising(2)]), 2)
    assert cacheme.stats(Raising).load_failure_count() == 2
    assert len(runtime.current().flights) == 0


async def test_get_all_backfills_earlier_local_tiers() -> None:
    await cacheme.register_storage("l1", Storage(url="local://lru", size=10))

    class Chained(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"chained:{self.n}"

        async def load(self) -> int:
            return self.n

        class Meta(Node.Meta):
            caches = [
                Cache(storage="l1", ttl=timedelta(seconds=5)),
                Cache(storage="local", ttl=timedelta(seconds=50)),
            ]

    tier("local").set("cacheme:chained:1:", "from-l2", None)
    assert await cacheme.get_all([Chained(1), Chained(2)]) == ["from-l2", 2]
    assert stored("l1", "cacheme:chained:1:") == ("from-l2", True)
    assert stored("l1", "cacheme:chained:2:") == (2, True)


async def test_invalidate_during_get_all_is_not_undone() -> None:
    GATE.append(asyncio.Event())
    batch = asyncio.ensure_future(cacheme.get_all([Num(1), Num(2)]))
    await settle()
    await cacheme.invalidate(Num(1))
    GATE[0].set()
    assert await asyncio.wait_for(batch, 2) == [10, 20]
    assert stored("local", "cacheme:num:1:v1") == (None, False)
    assert stored("local", "cacheme:num:2:v1") == (20, True)
