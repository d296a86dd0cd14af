"""get: the walk over the tiers, loading, backfill with each tier's TTL; invalidate; refresh."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import cacheme
from cacheme import Cache, Node, Storage

from .helpers import Counter, stored, tier

L1_TTL = timedelta(milliseconds=30)
L2_TTL = timedelta(seconds=10)


@pytest.fixture(autouse=True)
async def _two_tiers() -> AsyncIterator[None]:
    await cacheme.register_storage("l1", Storage(url="local://lru", size=100))
    await cacheme.register_storage("l2", Storage(url="local://tlfu", size=100))
    yield


LOADED: list[int] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOADED.clear()


@dataclass
class Two(Node):
    n: int

    def key(self) -> str:
        return f"two:{self.n}"

    async def load(self) -> str:
        LOADED.append(self.n)
        return f"loaded-{self.n}"

    class Meta(Node.Meta):
        version = "v1"
        caches = [Cache(storage="l1", ttl=L1_TTL), Cache(storage="l2", ttl=L2_TTL)]


KEY = "cacheme:two:1:v1"


async def test_miss_loads_and_fills_every_tier() -> None:
    assert await cacheme.get(Two(1)) == "loaded-1"
    assert LOADED == [1]
    assert stored("l1", KEY) == ("loaded-1", True)
    assert stored("l2", KEY) == ("loaded-1", True)
    assert await cacheme.get(Two(1)) == "loaded-1"
    assert LOADED == [1]


async def test_each_tier_keeps_its_own_ttl_and_l2_backfills_l1() -> None:
    before = cacheme.stats(Two)
    await cacheme.get(Two(1))
    await asyncio.sleep(0.05)  # past l1's 30 ms, far from l2's 10 s
    assert stored("l1", KEY) == (None, False)
    assert stored("l2", KEY) == ("loaded-1", True)
    assert await cacheme.get(Two(1)) == "loaded-1"
    assert LOADED == [1]  # answered by l2
    assert stored("l1", KEY) == ("loaded-1", True)  # backfilled...
    await asyncio.sleep(0.05)
    assert stored("l1", KEY) == (None, False)  # ...with l1's own TTL
    after = cacheme.stats(Two)
    assert after.request_count() - before.request_count() == 2
    assert after.hit_count() - before.hit_count() == 1
    assert after.load_count() - before.load_count() == 1


async def test_tiers_are_read_left_to_right() -> None:
    tier("l1").set(KEY, "from-l1", None)
    tier("l2").set(KEY, "from-l2", None)
    assert await cacheme.get(Two(1)) == "from-l1"
    tier("l1").remove(KEY)
    assert await cacheme.get(Two(1)) == "from-l2"
    assert stored("l1", KEY) == ("from-l2", True)
    assert LOADED == []


async def test_a_hit_in_l1_does_not_touch_l2() -> None:
    tier("l1").set(KEY, "only-l1", None)
    assert await cacheme.get(Two(1)) == "only-l1"
    assert stored("l2", KEY) == (None, False)


async def test_load_fn_replaces_load() -> None:
    load = Counter("custom")
    assert await cacheme.get(Two(1), load_fn=load) == "custom"
    assert await cacheme.get(Two(1), load_fn=load) == "custom"
    assert load.calls == 1
    assert LOADED == []
    assert stored("l2", KEY) == ("custom", True)


async def test_load_error_reaches_the_caller_unchanged_and_nothing_is_stored() -> None:
    class Boom(Exception):
        pass

    async def fail(_node: object) -> str:
        raise Boom("no")

    with pytest.raises(Boom, match="no"):
        await cacheme.get(Two(1), load_fn=fail)
    assert stored("l1", KEY) == (None, False)
    assert stored("l2", KEY) == (None, False)
    assert await cacheme.get(Two(1)) == "loaded-1"


async def test_node_without_load_raises_not_implemented() -> None:
    class NoLoad(Node):
        def key(self) -> str:
            return "noload"

        class Meta(Node.Meta):
            caches = [Cache(storage="l1")]

    with pytest.raises(cacheme.NotDefinedError, match=r"NoLoad has no load\(\)") as raised:
        await cacheme.get(NoLoad())
    # Part of the error tree, and still the NotImplementedError it was before.
    assert isinstance(raised.value, cacheme.ConfigurationError)
    assert isinstance(raised.value, NotImplementedError)

    class NoKey(Node):
        class Meta(Node.Meta):
            caches = [Cache(storage="l1")]

    with pytest.raises(cacheme.NotDefinedError, match=r"NoKey must define key\(\)"):
        await cacheme.get(NoKey())


async def test_node_without_caches_always_loads() -> None:
    class Uncached(Node):
        def key(self) -> str:
            return "uncached"

        async def load(self) -> int:
            LOADED.append(0)
            return 0

    assert await cacheme.get(Uncached()) == 0
    assert await cacheme.get(Uncached()) == 0
    assert LOADED == [0, 0]


# -- invalidate / refresh ----------------------------------------------------------------


async def test_invalidate_removes_from_every_tier() -> None:
    await cacheme.get(Two(1))
    await cacheme.get(Two(2))
    await cacheme.invalidate(Two(1))
    assert stored("l1", KEY) == (None, False)
    assert stored("l2", KEY) == (None, False)
    assert stored("l2", "cacheme:two:2:v1") == ("loaded-2", True)
    assert await cacheme.get(Two(1)) == "loaded-1"
    assert LOADED == [1, 2, 1]


async def test_invalidate_absent_key_is_fine() -> None:
    await cacheme.invalidate(Two(99))


async def test_refresh_reloads_and_stores_in_every_tier() -> None:
    tier("l1").set(KEY, "old", None)
    tier("l2").set(KEY, "old", None)
    assert await cacheme.refresh(Two(1)) == "loaded-1"
    assert LOADED == [1]
    assert stored("l1", KEY) == ("loaded-1", True)
    assert stored("l2", KEY) == ("loaded-1", True)
    assert await cacheme.get(Two(1)) == "loaded-1"
    assert LOADED == [1]


async def test_refresh_error_reaches_the_caller_and_keeps_old_value() -> None:
    calls = 0

    class Flaky(Node):
        def key(self) -> str:
            return "flaky"

        async def load(self) -> int:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError("down")
            return calls

        class Meta(Node.Meta):
            caches = [Cache(storage="l2")]

    assert await cacheme.get(Flaky()) == 1
    with pytest.raises(RuntimeError, match="down"):
        await cacheme.refresh(Flaky())
    assert await cacheme.get(Flaky()) == 1


async def test_refresh_during_a_flight_wins() -> None:
    gate = asyncio.Event()
    slow = Counter("stale", gate)
    waiting = asyncio.ensure_future(cacheme.get(Two(1), load_fn=slow))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert slow.calls == 1
    assert await cacheme.refresh(Two(1)) == "loaded-1"
    gate.set()
    assert await waiting == "stale"  # its callers still get the old flight's value
    assert stored("l2", KEY) == ("loaded-1", True)  # but it does not overwrite the refresh
    assert stored("l1", KEY) == ("loaded-1", True)


class Queued(Node):
    """Each load takes the next gate and value from ``GATES``, and waits for its gate."""

    def key(self) -> str:
        return "queued"

    async def load(self) -> str:
        gate, value = GATES.pop(0)
        await gate.wait()
        if isinstance(value, Exception):
            raise value
        return value

    class Meta(Node.Meta):
        caches = [Cache(storage="l1", ttl=L2_TTL), Cache(storage="l2", ttl=L2_TTL)]


GATES: list[tuple[asyncio.Event, Any]] = []


def gates(*values: Any) -> list[asyncio.Event]:
    GATES[:] = [(asyncio.Event(), v) for v in values]
    return [g for g, _ in GATES]


async def test_a_refresh_overtaken_by_a_later_refresh_returns_the_later_value() -> None:
    tier("l1").set("cacheme:queued:", "old", None)
    first_gate, second_gate = gates("first", "second")
    first = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    first_gate.set()  # the overtaken load ends first: it writes nothing...
    await asyncio.sleep(0.01)
    assert not first.done()  # ...and its caller waits for the later refresh
    second_gate.set()
    assert await first == "second"
    assert await second == "second"
    assert await cacheme.get(Queued()) == "second"


async def test_a_refresh_overtaken_by_an_invalidate_waits_for_the_get_after_it() -> None:
    first_gate, get_gate = gates("before", "after")
    refreshing = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    await cacheme.invalidate(Queued())
    getting = asyncio.ensure_future(cacheme.get(Queued()))  # a flight begun after it
    await asyncio.sleep(0)
    first_gate.set()
    await asyncio.sleep(0.01)
    assert not refreshing.done()
    get_gate.set()
    assert await refreshing == "after"
    assert await getting == "after"
    assert stored("l2", "cacheme:queued:") == ("after", True)


async def test_a_refresh_overtaken_by_an_invalidate_alone_reads_again() -> None:
    """Its own load may predate the invalidation: it writes nothing, and returns what a new
    read of every tier gets (here a new load, written as a get's would be)."""
    before, after = gates("before", "after")
    refreshing = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    await cacheme.invalidate(Queued())
    before.set()
    after.set()
    assert await refreshing == "after"
    assert stored("l1", "cacheme:queued:") == ("after", True)
    assert stored("l2", "cacheme:queued:") == ("after", True)


async def test_a_refresh_overtaken_by_a_refresh_that_ended_first_returns_its_value() -> None:
    first_gate, second_gate = gates("first", "second")
    first = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    second_gate.set()
    assert await second == "second"
    first_gate.set()  # the overtaken load ends last: the cache already holds "second"
    assert await first == "second"
    assert await cacheme.get(Queued()) == "second"


async def test_a_refresh_overtaken_by_one_that_failed_first_raises_its_error() -> None:
    """Refresh B overtakes A and fails before A's load ends: A wrote nothing, B wrote
    nothing, so A raises B's error. It returned the value from before both refreshes, as
    if it had been refreshed (review 48)."""
    tier("l1").set("cacheme:queued:", "old", None)
    first_gate, second_gate = gates("first", RuntimeError("the source is down"))
    first = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    second_gate.set()
    with pytest.raises(RuntimeError, match="the source is down"):
        await second
    first_gate.set()
    with pytest.raises(RuntimeError, match="the source is down"):
        await first
    assert stored("l1", "cacheme:queued:") == ("old", True)  # nothing was written


async def test_refreshes_overtaken_one_after_another_return_the_last_ones_outcome() -> None:
    """R1 (slowest) is overtaken by R2, R2 by R3 (fastest). Whatever ended how, each returns
    what the last one got, as a get then serves: a middle one's error did not count once a
    later one overtook it, nor its own (review 51)."""
    tier("l1").set("cacheme:queued:", "old", None)
    g1, g2, g3 = gates("first", RuntimeError("the middle one failed"), "third")
    refreshes = []
    for _ in range(3):
        refreshes.append(asyncio.ensure_future(cacheme.refresh(Queued())))
        await asyncio.sleep(0)
    g3.set()
    await asyncio.sleep(0.01)
    g2.set()
    await asyncio.sleep(0.01)
    g1.set()
    assert await asyncio.gather(*refreshes) == ["third"] * 3
    assert await cacheme.get(Queued()) == "third"


async def test_a_chain_of_five_refreshes_returns_the_last_value() -> None:
    """Five refreshes, each overtaking the one before and ending first: each returns the
    last one's value (with three rounds of one hop each, the first returned the fourth's)."""
    tier("l1").set("cacheme:queued:", "old", None)
    held = gates("A", "B", "C", "D", "E")
    refreshes = []
    for _ in range(5):
        refreshes.append(asyncio.ensure_future(cacheme.refresh(Queued())))
        await asyncio.sleep(0)
    for gate in reversed(held):
        gate.set()
        await asyncio.sleep(0.01)
    assert await asyncio.gather(*refreshes) == ["E"] * 5
    assert await cacheme.get(Queued()) == "E"


async def test_a_refresh_overtaken_by_refreshes_arriving_one_after_another() -> None:
    """Each refresh is overtaken by the next one after its own load ended: the first still
    returns the last one's value, not that of the fourth (which wrote nothing), whatever
    the number of hops (review 52: three rounds, one hop each)."""
    tier("l1").set("cacheme:queued:", "old", None)
    held = gates("A", "B", "C", "D", "E")
    refreshes = [asyncio.ensure_future(cacheme.refresh(Queued()))]
    await asyncio.sleep(0)
    for gate in held[:-1]:
        refreshes.append(asyncio.ensure_future(cacheme.refresh(Queued())))
        await asyncio.sleep(0)
        gate.set()  # the one just overtaken ends
        await asyncio.sleep(0.01)
    assert not refreshes[0].done()  # it waits for the last one
    held[-1].set()
    assert await asyncio.gather(*refreshes) == ["E"] * 5
    assert await cacheme.get(Queued()) == "E"


async def test_a_failed_refresh_overtaken_by_an_invalidate_returns_the_newer_flights_value() -> (
    None
):
    """Its own load failed after an invalidate overtook it: it returns what the get begun
    after the invalidate gets, as it would have had its load succeeded (review 52: it
    raised its own error)."""
    failing, after = gates(RuntimeError("the source is down"), "after")
    refreshing = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    await cacheme.invalidate(Queued())
    getting = asyncio.ensure_future(cacheme.get(Queued()))
    await asyncio.sleep(0)
    failing.set()
    await asyncio.sleep(0.01)
    after.set()
    assert await refreshing == "after"
    assert await getting == "after"


async def test_overlapping_refreshes_of_a_node_without_tiers() -> None:
    """A node with ``Meta.caches = []`` caches nothing, but ``refresh`` works, and one
    refresh overtaken by another does too (no tier to wait for: no error)."""
    gate = asyncio.Event()
    loads = 0

    class Tierless(Node):
        def key(self) -> str:
            return "tierless"

        async def load(self) -> int:
            nonlocal loads
            loads += 1
            await gate.wait()
            return loads

        class Meta(Node.Meta):
            caches = []

    first = asyncio.ensure_future(cacheme.refresh(Tierless()))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(cacheme.refresh(Tierless()))
    await asyncio.sleep(0.01)  # both loads are waiting
    gate.set()
    mine, theirs = await asyncio.wait_for(asyncio.gather(first, second), 5)
    # The first, overtaken, takes the second's value, or loads again once that one is over.
    assert theirs == 2 and mine in (2, 3)


async def test_a_refresh_whose_newer_flight_fails_raises_its_error() -> None:
    """Detached by an invalidate, the refresh writes nothing: it hands on the outcome of
    the flight begun after, here an error, as a get that joined that flight does."""
    mine, theirs = gates("mine", RuntimeError("the get's load failed"))
    refreshing = asyncio.ensure_future(cacheme.refresh(Queued()))
    await asyncio.sleep(0)
    await cacheme.invalidate(Queued())
    getting = asyncio.ensure_future(cacheme.get(Queued()))
    await asyncio.sleep(0)
    mine.set()
    await asyncio.sleep(0.01)  # the refresh's load returned; it joined the get's flight
    theirs.set()
    with pytest.raises(RuntimeError, match="the get's load failed"):
        await refreshing
    with pytest.raises(RuntimeError, match="the get's load failed"):
        await getting


# -- load_timeout / stale_if_error ----------------------------------------------------------


async def test_load_timeout_fails_every_waiter_and_frees_the_key() -> None:
    class Slow(Node):
        def key(self) -> str:
            return "slow"

        async def load(self) -> str:
            await asyncio.sleep(5)
            return "never"

        class Meta(Node.Meta):
            caches = [Cache(storage="l1")]
            load_timeout = 0.02

    tasks = [asyncio.ensure_future(cacheme.get(Slow())) for _ in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
    assert all(isinstance(r, cacheme.LoadTimeoutError) for r in results)
    assert all(isinstance(r, TimeoutError) and "Slow" in str(r) for r in results)
    stats = cacheme.stats(Slow)
    assert (stats.load_count(), stats.load_failure_count()) == (1, 1)
    assert await cacheme.get(Slow(), load_fn=lambda _node: asyncio.sleep(0, "fast")) == "fast"


async def test_stale_if_error_serves_the_last_value_without_storing_it() -> None:
    fail = False

    class Kept(Node):
        def key(self) -> str:
            return "kept"

        async def load(self) -> str:
            if fail:
                raise RuntimeError("source down")
            return "good"

        class Meta(Node.Meta):
            caches = [Cache(storage="l1", ttl=timedelta(milliseconds=20))]
            stale_if_error = timedelta(seconds=10)

    assert await cacheme.get(Kept()) == "good"
    await asyncio.sleep(0.04)
    fail = True
    assert await cacheme.get(Kept()) == "good"
    assert stored("l1", "cacheme:kept:") == (None, False)
    assert cacheme.stats(Kept).stale_count() == 1
    await cacheme.invalidate(Kept())  # forgets the last good value too
    with pytest.raises(RuntimeError, match="source down"):
        await cacheme.get(Kept())


@pytest.mark.parametrize(
    ("option", "value"),
    [("load_timeout", 0), ("load_timeout", -1), ("stale_if_error", timedelta(0))],
)
def test_non_positive_timeouts_are_rejected(option: str, value: object) -> None:
    meta = type("Meta", (Node.Meta,), {option: value})
    with pytest.raises(
        cacheme.ConfigurationError, match=rf"Bad\.Meta\.{option} must be (a )?positive"
    ):
        type("Bad", (Node,), {"Meta": meta})


@pytest.mark.parametrize("chain", [["l1"], ["l1", "l2"]], ids=["one local", "two local"])
async def test_a_lease_without_a_shared_tier_is_refused(chain: list[str]) -> None:
    """Found by a review: with local tiers only, each process waited out the lease and then
    loaded the key itself (the holder has no shared tier to hand its value over in)."""
    tiers = [Cache(storage=name) for name in chain]

    @dataclass
    class Leased(Node):
        n: int

        def key(self) -> str:
            return f"leased:{self.n}"

        async def load(self) -> int:
            return self.n

        class Meta(Node.Meta):
            version = "v1"
            caches = tiers
            lease = timedelta(seconds=5)

    for call in (cacheme.get(Leased(1)), cacheme.get_all([Leased(2)])):
        with pytest.raises(cacheme.ConfigurationError, match=r"Leased\.Meta\.lease needs a shared"):
            await call


@pytest.mark.parametrize("stamped", [False, True])
async def test_stale_values_are_counted_per_caller(stamped: bool) -> None:
    """stats.md: ``stale_count()`` counts the values served by ``stale_if_error``. Five
    callers served the stale value of one failed load counted 1 (negative hits count per
    caller). Now 5 for ``get``, and one per position for ``get_all``."""
    await cacheme.register_storage("l1", cacheme.Storage(url="local://lru", size=100))
    fail = False
    gate = asyncio.Event()

    class Kept(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"kept-per-caller:{self.n}"

        async def load(self) -> str:
            if fail:
                await gate.wait()
                raise RuntimeError("source down")
            return "good"

        class Meta(Node.Meta):
            caches = [Cache(storage="l1", ttl=timedelta(milliseconds=20))]
            stale_if_error = timedelta(seconds=10)
            if stamped:
                negative_ttl = timedelta(seconds=1)  # any freshness option: stamped entries

    assert Kept._cacheme_config.stamped is stamped
    assert await cacheme.get_all([Kept(1), Kept(2)]) == ["good", "good"]
    await asyncio.sleep(0.04)
    fail = True
    callers = [asyncio.ensure_future(cacheme.get(Kept(1))) for _ in range(5)]
    batch = asyncio.ensure_future(cacheme.get_all([Kept(2), Kept(2), Kept(2)]))
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.gather(*callers) == ["good"] * 5
    assert await batch == ["good"] * 3
    assert cacheme.stats(Kept).stale_count() == 8


@dataclass
class Cyclic(Node):
    """Its load gets the keys of ``deps[n]`` first: a cycle when one leads back to ``n``."""

    n: int
    deps = {1: [1], 2: [3], 3: [2], 4: [], 5: [4, 5]}
    batch = False

    def key(self) -> str:
        return f"cyclic:{self.n}"

    async def load(self) -> int:
        deps = [Cyclic(d) for d in self.deps[self.n]]
        if type(self).batch:
            return self.n + sum(await cacheme.get_all(deps))
        return self.n + sum([await cacheme.get(d) for d in deps])

    class Meta(Node.Meta):
        caches = [Cache(storage="l1", ttl=None)]


@pytest.mark.parametrize("batch", [False, True], ids=["get", "get_all"])
@pytest.mark.parametrize("n", [1, 2, 5])
async def test_a_load_that_awaits_its_own_key_fails_instead_of_hanging(
    n: int, batch: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``load()`` that gets its own key, directly (1) or through other keys' loads (2 -> 3
    -> 2, and 5 among others in a get_all): a ``LoadError`` that says so, at once. Before,
    it waited for itself forever, and every later get of the key with it."""
    monkeypatch.setattr(Cyclic, "batch", batch)
    for _ in range(2):  # the key is not left stuck
        with pytest.raises(cacheme.LoadError, match=rf"awaits a get of 'cacheme:cyclic:{n}:'"):
            await asyncio.wait_for(cacheme.get(Cyclic(n)), 2)
    monkeypatch.setitem(Cyclic.deps, n, [])
    assert await asyncio.wait_for(cacheme.get(Cyclic(n)), 2) == n
    assert await asyncio.wait_for(cacheme.get(Cyclic(4)), 2) == 4  # no cycle: fine


async def test_concurrent_gets_of_one_key_are_not_a_cycle() -> None:
    """Callers of a key under way from outside its load still join it (one load)."""
    gate = asyncio.Event()

    class Slow(Node):
        def key(self) -> str:
            return "slow"

        async def load(self) -> int:
            LOADED.append(1)
            await gate.wait()
            return 7

        class Meta(Node.Meta):
            caches = [Cache(storage="l1", ttl=None)]

    callers = [asyncio.ensure_future(cacheme.get(Slow())) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.gather(*callers) == [7, 7, 7]
    assert LOADED == [1]


async def test_a_cycle_begun_by_two_callers_fails_instead_of_hanging() -> None:
    """Review 43: 2's load gets 3 while 3's load, begun by another caller, gets 2. Neither
    load is part of the other, yet each waits for the other: both callers now get a
    ``LoadError`` at once (they waited forever, and every later get of either key too)."""
    results = await asyncio.wait_for(
        asyncio.gather(cacheme.get(Cyclic(2)), cacheme.get(Cyclic(3)), return_exceptions=True),
        2,
    )
    assert all(isinstance(r, cacheme.LoadError) for r in results), results
    assert any("a cycle, which would never end" in str(r) for r in results), results
    results = await asyncio.wait_for(
        asyncio.gather(cacheme.get(Cyclic(3)), cacheme.get(Cyclic(2)), return_exceptions=True),
        2,
    )
    assert all(isinstance(r, cacheme.LoadError) for r in results), results
