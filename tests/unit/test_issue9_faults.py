"""Issue 9, items 1, 4, 5 and 7, on local tiers (no network, no driver): each fault's
example and the neighbours of its kind.

1. ``get(node, load_fn)`` calls ``load_fn(node)``, as cacheme 0.3.0 did.
4. No public call acts silently on a node without tiers of its own: a bare ``DynamicNode``
   raises ``ConfigurationError`` or, through ``Memoize``, resolves to the built class.
5. A TTL too large for a tier means no expiry: never ``OverflowError``, never uncached.
7. Nothing a load detached by ``invalidate()``/``refresh()`` produces is written or
   remembered for stale-if-error.

Item 2 (registration while down), 5 and 6 on remote tiers are in
``tests/integration/test_faults_kinds.py``.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import cacheme
from cacheme import Cache, ConfigurationError, DynamicNode, Node, Storage
from cacheme.storages.base import LocalStorage

from .helpers import Counter, settle, stored, tier


@pytest.fixture(autouse=True)
async def _tiers() -> AsyncIterator[None]:
    await cacheme.register_storage("tlfu", Storage(url="local://tlfu", size=100))
    await cacheme.register_storage("lru", Storage(url="local://lru", size=100))
    yield


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# -- 1. get(node, load_fn) calls load_fn(node) ------------------------------------------------


@dataclass
class User(Node):
    user_id: int

    def key(self) -> str:
        return f"issue9:user:{self.user_id}"

    async def load(self) -> str:
        return "from-load"

    class Meta(Node.Meta):
        caches = [Cache(storage="tlfu", ttl=timedelta(seconds=10))]


async def test_load_fn_receives_the_node_as_in_030() -> None:
    seen: list[Node] = []

    async def override(node: User) -> str:
        seen.append(node)
        return f"override-{node.user_id}"

    node = User(1)
    assert await cacheme.get(node, override) == "override-1"
    assert seen == [node] and seen[0] is node
    # Stored: the second call is a hit, neither load runs again.
    assert await cacheme.get(User(1), override) == "override-1"
    assert len(seen) == 1


async def test_load_fn_by_keyword_and_coalesced_callers_run_it_once() -> None:
    gate = asyncio.Event()
    counter = Counter("v", gate)
    tasks = [asyncio.ensure_future(cacheme.get(User(2), load_fn=counter)) for _ in range(5)]
    await settle()
    gate.set()
    assert await asyncio.gather(*tasks) == ["v"] * 5
    assert counter.calls == 1


async def test_load_fn_without_a_parameter_fails_its_callers_only() -> None:
    async def no_arg() -> str:  # the pre-fix calling convention: now a TypeError
        return "x"

    with pytest.raises(TypeError):
        await cacheme.get(User(3), no_arg)  # type: ignore[arg-type]
    assert await cacheme.get(User(3)) == "from-load"  # the error was not cached


# -- 4. nodes without tiers of their own -----------------------------------------------------


async def test_bare_dynamic_node_raises_on_every_public_call() -> None:
    bare = DynamicNode(key="issue9:bare")
    with pytest.raises(ConfigurationError, match="no tiers"):
        await cacheme.get(bare)
    with pytest.raises(ConfigurationError, match="no tiers"):
        await cacheme.get(bare, Counter())
    with pytest.raises(ConfigurationError, match="no tiers"):
        await cacheme.get_all([bare, DynamicNode(key="issue9:bare2")])
    with pytest.raises(ConfigurationError, match="no tiers"):
        await cacheme.invalidate(bare)
    with pytest.raises(ConfigurationError, match="no tiers"):
        await cacheme.refresh(bare)


async def test_node_with_empty_caches_cannot_be_invalidated() -> None:
    class NoTiers(Node):
        def key(self) -> str:
            return "issue9:none"

        async def load(self) -> int:
            return 1

    with pytest.raises(ConfigurationError, match="no tiers"):
        await cacheme.invalidate(NoTiers())


def spec_sample(name: str, storage: str = "tlfu") -> tuple[Any, list[int], type[DynamicNode]]:
    """The spec's ``Memoize(build_node(...))`` sample, counting its loads."""
    built = cacheme.build_node(name, "v1", [Cache(storage=storage, ttl=None)])
    calls: list[int] = []
    value = {"v": 1}

    @cacheme.Memoize(built)
    async def fn(a: int) -> int:
        calls.append(a)
        return value["v"] * 100 + a

    @fn.to_node
    def _(a: int) -> DynamicNode:
        return DynamicNode(key=f"bar:{a}")

    fn.value = value  # type: ignore[attr-defined]
    return fn, calls, built


@pytest.mark.parametrize("storage", ["tlfu", "lru"])
@pytest.mark.parametrize(
    "route", ["memoized.invalidate", "cacheme.invalidate(fn.node)", "built(key=)", "refresh"]
)
async def test_spec_memoize_sample_invalidates_by_every_route(route: str, storage: str) -> None:
    fn, calls, built = spec_sample(unique("Issue9Spec"), storage)
    assert await fn(1) == 101 and await fn(1) == 101
    assert calls == [1]
    assert isinstance(fn.node(1), built) and fn.node(1).key() == "bar:1"
    key = "cacheme:bar:1:v1"
    assert stored(storage, key) == (101, True)
    fn.value["v"] = 2  # the source changed
    if route == "memoized.invalidate":
        await fn.invalidate(1)
    elif route == "cacheme.invalidate(fn.node)":
        await cacheme.invalidate(fn.node(1))
    elif route == "built(key=)":
        await cacheme.invalidate(built(key="bar:1"))
    else:
        assert await fn.refresh(1) == 201
        assert calls == [1, 1]
        assert stored(storage, key) == (201, True)
    if route != "refresh":
        assert stored(storage, key) == (None, False)
    assert await fn(1) == 201  # the next call reloads (or finds the refreshed value)
    assert calls == [1, 1]
    assert await fn(2) == 202  # a neighbour key is untouched by all this
    # The invalidation itself removed only its own key.
    assert stored(storage, "cacheme:bar:2:v1") == (202, True)


async def test_spec_memoize_sample_node_works_with_get_and_get_all() -> None:
    fn, calls, built = spec_sample(unique("Issue9Get"))
    assert await fn(5) == 105
    # The node of fn is an instance of the built class: usable with the public calls.
    assert await cacheme.get(fn.node(5)) == 105
    assert await cacheme.get_all([fn.node(5), built(key="bar:5")]) == [105, 105]
    assert calls == [5]


async def test_memoize_with_a_plain_node_class_and_bare_dynamic_node() -> None:
    """A class that does not take ``key=``: the memoized calls still work by its config."""
    calls: list[int] = []

    @cacheme.Memoize(User)
    async def fn(a: int) -> str:
        calls.append(a)
        return f"v{len(calls)}"

    @fn.to_node
    def _(a: int) -> DynamicNode:
        return DynamicNode(key=f"issue9:plain:{a}")

    assert await fn(1) == "v1" and await fn(1) == "v1"
    await fn.invalidate(1)
    assert await fn(1) == "v2"
    assert await fn.refresh(1) == "v3"
    assert await fn(1) == "v3"
    # fn.node() is a node of the function (a bare DynamicNode before, which both refused).
    await cacheme.invalidate(fn.node(1))
    assert await cacheme.get(fn.node(1)) == "v4"
    assert await fn(1) == "v4"
    with pytest.raises(ConfigurationError, match="no tiers"):
        await cacheme.invalidate(DynamicNode(key="issue9:plain:1"))  # a bare one has none


# -- 5. TTLs too large for a tier ------------------------------------------------------------

LOCAL_MAX = LocalStorage.max_ttl


@pytest.mark.parametrize("storage", ["tlfu", "lru"])
@pytest.mark.parametrize(
    "ttl",
    [
        timedelta(days=106751),
        timedelta(days=106752),  # the issue's example
        timedelta.max,
        LOCAL_MAX,
        LOCAL_MAX - timedelta(microseconds=1),
        LOCAL_MAX - timedelta(days=1),
        LOCAL_MAX + timedelta(microseconds=1),
        timedelta(days=365 * 7000),
    ],
    ids=str,
)
async def test_huge_ttl_on_a_local_tier_means_no_expiry(storage: str, ttl: timedelta) -> None:
    Kept, loads = keyed_node([Cache(storage=storage, ttl=ttl)], "kept")
    assert await cacheme.get(Kept("ttl")) == "kept"
    assert await cacheme.get(Kept("ttl")) == "kept"
    assert loads == ["ttl"]  # stored, not silently left uncached
    left = tier(storage).remaining(["cacheme:ttl:v1"])["cacheme:ttl:v1"]
    assert left == math.inf or left > 200 * 365 * 86400
    await cacheme.invalidate(Kept("ttl"))
    assert await cacheme.get_all([Kept("ttl"), Kept("other")]) == ["kept", "kept"]
    assert await cacheme.get_all([Kept("ttl"), Kept("other")]) == ["kept", "kept"]
    assert await cacheme.refresh(Kept("ttl")) == "kept"
    assert loads == ["ttl", "ttl", "other", "ttl"]


def keyed_node(caches: list[Cache], value: Any) -> tuple[type[Node], list[str]]:
    """A node class ``Cls(key)`` over ``caches`` whose ``load`` returns ``value``."""
    loads: list[str] = []

    class Keyed(Node):
        def __init__(self, key: str) -> None:
            self._key = key

        def key(self) -> str:
            return self._key

        async def load(self) -> Any:
            loads.append(self._key)
            return value

        class Meta(Node.Meta):
            version = "v1"

    Keyed.Meta.caches = caches
    Keyed._cacheme_config = type(Keyed._cacheme_config)(unique("Keyed"), Keyed.Meta, Keyed)
    return Keyed, loads


async def test_huge_ttl_in_a_two_tier_chain_backfills() -> None:
    built = cacheme.build_node(
        unique("Issue9Chain"),
        "v1",
        [Cache(storage="lru", ttl=timedelta.max), Cache(storage="tlfu", ttl=timedelta(days=10**6))],
    )
    counter = Counter(7)
    assert await cacheme.get(built(key="c"), counter) == 7
    tier("lru").remove("cacheme:c:v1")
    assert await cacheme.get(built(key="c"), counter) == 7  # from tlfu, copied forward
    assert stored("lru", "cacheme:c:v1") == (7, True)
    assert counter.calls == 1


# -- 7. stale-if-error never revives what invalidate()/refresh() detached -------------------


class Source:
    """A row in a database: ``load`` reads it; a deleted row makes ``load`` fail. With
    ``hold`` set, the next load stalls after reading, on a gate recorded in ``_EVENTS``."""

    def __init__(self) -> None:
        self.row: str | None = "old"
        self.hold = False

    async def load(self) -> str:
        row = self.row
        if self.hold:
            self.hold = False
            gate = asyncio.Event()
            _EVENTS.append(gate)
            await gate.wait()
        if row is None:
            raise LookupError("row deleted")
        return row


_EVENTS: list[asyncio.Event] = []


@pytest.fixture(autouse=True)
def _no_events() -> None:
    _EVENTS.clear()


async def stalled_get(Row: Any, source: Source, n: int = 1) -> asyncio.Future[Any]:
    """A ``get`` whose load has read the row and stalls until ``release()``."""
    source.hold = True
    task = asyncio.ensure_future(cacheme.get(Row(n)))
    await settle()
    assert _EVENTS, "the load did not start"
    return task


def release() -> None:
    for gate in _EVENTS:
        gate.set()


def stale_node(source: Source, storage: str = "tlfu", ttl: timedelta | None = None) -> Any:
    class Row(Node):
        def __init__(self, n: int = 1) -> None:
            self.n = n

        def key(self) -> str:
            return f"issue9:row:{self.n}"

        async def load(self) -> str:
            return await source.load()

        class Meta(Node.Meta):
            caches = [Cache(storage=storage, ttl=ttl)]
            stale_if_error = timedelta(minutes=5)

        @classmethod
        async def load_all(cls, nodes: Any) -> Any:
            row = await source.load()  # one query for every node
            return [(n, row) for n in nodes]

    Row.__qualname__ = unique("Row")
    return Row


async def test_issue_scenario_invalidate_during_load_then_failing_load_raises() -> None:
    source = Source()
    Row = stale_node(source)
    first = await stalled_get(Row, source)  # the load read "old" and stalls
    source.row = None  # the row is deleted...
    await cacheme.invalidate(Row())  # ...and the cache invalidated
    release()
    assert await first == "old"  # its caller gets what it read
    assert stored("tlfu", "cacheme:issue9:row:1:") == (None, False)  # not written
    with pytest.raises(LookupError, match="row deleted"):
        await cacheme.get(Row())  # not the invalidated value
    assert cacheme.stats(Row).stale_count() == 0


@pytest.mark.parametrize("storage", ["tlfu", "lru"])
async def test_invalidate_during_load_leaves_nothing_behind(storage: str) -> None:
    source = Source()
    Row = stale_node(source, storage)
    assert await cacheme.get(Row()) == "old"  # remembered for stale-if-error
    await cacheme.invalidate(Row())
    source.row = "older-read"
    first = await stalled_get(Row, source)
    source.row = None
    await cacheme.invalidate(Row())
    release()
    assert await first == "older-read"  # its caller gets what it read
    assert stored(storage, "cacheme:issue9:row:1:") == (None, False)
    with pytest.raises(LookupError):
        await cacheme.get(Row())  # neither "old" nor "older-read" comes back
    with pytest.raises(LookupError):
        await cacheme.get_all([Row()])
    assert cacheme.stats(Row).stale_count() == 0


async def test_refresh_during_load_wins_and_the_detached_value_is_not_remembered() -> None:
    source = Source()
    Row = stale_node(source, "tlfu", ttl=timedelta(milliseconds=60))
    first = await stalled_get(Row, source)  # will return "old"
    source.row = "new"
    assert await cacheme.refresh(Row()) == "new"
    release()
    assert await first == "old"
    assert stored("tlfu", "cacheme:issue9:row:1:") == ("new", True)  # not overwritten
    assert await cacheme.get(Row()) == "new"
    await asyncio.sleep(0.08)  # the entry expires; the source fails
    source.row = None
    assert await cacheme.get(Row()) == "new"  # stale-if-error serves the refreshed value...
    assert cacheme.stats(Row).stale_count() == 1  # ...never the detached "old"


async def test_refresh_during_load_then_invalidate_leaves_no_stale_value() -> None:
    source = Source()
    Row = stale_node(source, "lru")
    first = await stalled_get(Row, source)
    source.row = "new"
    await cacheme.refresh(Row())
    await cacheme.invalidate(Row())
    source.row = None
    release()
    assert await first == "old"
    with pytest.raises(LookupError):
        await cacheme.get(Row())


async def test_invalidate_during_a_get_all_load() -> None:
    source = Source()
    Row = stale_node(source, "tlfu")
    source.hold = True
    batch = asyncio.ensure_future(cacheme.get_all([Row(1), Row(2)]))
    await settle()
    assert _EVENTS
    source.row = None
    await cacheme.invalidate(Row(1))  # only key 1 is detached
    release()
    assert await batch == ["old", "old"]
    assert stored("tlfu", "cacheme:issue9:row:1:") == (None, False)
    assert stored("tlfu", "cacheme:issue9:row:2:") == ("old", True)  # its neighbour is kept
    with pytest.raises(LookupError):
        await cacheme.get(Row(1))
    assert await cacheme.get(Row(2)) == "old"  # a hit
    assert cacheme.stats(Row).stale_count() == 0


async def test_invalidate_during_a_memoized_load() -> None:
    row: dict[str, str | None] = {"v": "old"}
    gate = asyncio.Event()
    built = cacheme.build_node(unique("Issue9MemoStale"), "v1", [Cache(storage="tlfu")])

    @cacheme.Memoize(built)
    async def fn(a: int) -> str:
        value = row["v"]
        await gate.wait()
        if value is None:
            raise LookupError("row deleted")
        return value

    @fn.to_node
    def _(a: int) -> DynamicNode:
        return DynamicNode(key=f"memo-stale:{a}")

    first = asyncio.ensure_future(fn(1))
    await settle()
    row["v"] = None
    await fn.invalidate(1)
    gate.set()
    assert await first == "old"
    assert stored("tlfu", "cacheme:memo-stale:1:v1") == (None, False)
    with pytest.raises(LookupError):
        await fn(1)
