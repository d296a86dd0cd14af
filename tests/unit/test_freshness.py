"""Refresh-ahead, stale-while-revalidate, negative caching and tags on local tiers
(freshness.py, tags.py), with an injected clock."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import cacheme
from cacheme import freshness, tags
from cacheme.storages.base import MISS

from .helpers import settle, tier

_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    c = Clock()
    monkeypatch.setattr(freshness, "now_ms", c)
    yield c


class NotFound(Exception):
    pass


class Source:
    """What the nodes load from: a dict; a missing id loads as None; ``gate`` holds loads."""

    def __init__(self) -> None:
        self.data: dict[int, Any] = {}
        self.calls: list[int] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def load(self, ident: int) -> Any:
        self.calls.append(ident)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("source down")
        return self.data.get(ident)


class Gated(Source):
    """Reads the source when a load starts (so a change made meanwhile is not seen), then
    waits for ``gates[n]`` if the n-th load (from 0) has one."""

    def __init__(self, *held: int) -> None:
        super().__init__()
        self.gates = {n: asyncio.Event() for n in held}

    async def load(self, ident: int) -> Any:
        gate = self.gates.get(len(self.calls))
        self.calls.append(ident)
        value = self.data.get(ident)
        if gate is not None:
            await gate.wait()
        return value


def make(source: Source, caches: list[cacheme.Cache] | None = None, **meta: Any) -> Any:
    """A node class of its own with ``meta`` options."""
    n = next(_ids)
    tagged = meta.pop("tagged", False)
    meta.setdefault(
        "caches", caches or [cacheme.Cache(storage="local", ttl=timedelta(seconds=100))]
    )
    meta_cls = type("Meta", (cacheme.Node.Meta,), meta)

    @dataclass
    class Item(cacheme.Node):
        ident: int
        tag: str = "a"

        def key(self) -> str:
            return f"fresh{n}:{self.ident}"

        async def load(self) -> Any:
            return await source.load(self.ident)

        if tagged:

            def tags(self) -> list[str]:
                return [self.tag]

        Meta = meta_cls

    return Item


async def test_unused_options_keep_plain_entries(local: Any) -> None:
    source = Source()
    source.data[1] = "v"
    Item = make(source)
    assert not Item._cacheme_config.stamped
    assert await cacheme.get(Item(1)) == "v"
    assert tier("local").get(f"cacheme:{Item(1).key()}:") == "v"


async def test_refresh_ahead_one_reload_no_caller_waits(local: Any, clock: Clock) -> None:
    source = Source()
    source.data[1] = "old"
    Item = make(source, refresh_after=0.5)
    assert await cacheme.get(Item(1)) == "old"
    source.data[1] = "new"
    source.gate = asyncio.Event()
    clock.advance(60)  # past half the 100 s TTL
    results = await asyncio.wait_for(
        asyncio.gather(*(cacheme.get(Item(1)) for _ in range(1000))), 5
    )
    assert results == ["old"] * 1000
    await settle()
    assert source.calls == [1, 1]  # the first load and exactly one reload
    source.gate.set()
    await settle(20)
    assert await cacheme.get(Item(1)) == "new"
    stored = tier("local").get(f"cacheme:{Item(1).key()}:")
    assert stored.value == "new" and stored.written == clock.ms
    stats = cacheme.stats(Item)
    assert stats.refreshes == 1 and stats.refresh_failures == 0
    assert stats.hit_count() == 1001 and stats.load_count() == 2


async def test_refresh_ahead_timedelta_and_not_before(local: Any, clock: Clock) -> None:
    source = Source()
    source.data[1] = "v"
    Item = make(source, refresh_after=timedelta(seconds=10))
    await cacheme.get(Item(1))
    clock.advance(9)
    await cacheme.get(Item(1))
    await settle()
    assert source.calls == [1]
    clock.advance(2)
    await cacheme.get(Item(1))
    await settle()
    assert source.calls == [1, 1]


async def test_failed_refresh_keeps_value_and_is_counted(
    local: Any, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source()
    source.data[1] = "old"
    Item = make(source, refresh_after=0.5)
    await cacheme.get(Item(1))
    source.fail = True
    clock.advance(60)
    assert await cacheme.get(Item(1)) == "old"
    await settle(20)
    assert await cacheme.get(Item(1)) == "old"
    assert cacheme.stats(Item).refresh_failures == 1
    assert "background refresh" in caplog.text
    clock.advance(50)  # past the TTL: the value is gone, the caller sees the error
    with pytest.raises(RuntimeError):
        await cacheme.get(Item(1))


async def test_get_all_refreshes_stale_entries_through_load_all(local: Any, clock: Clock) -> None:
    source = Source()
    Item = make(source, refresh_after=0.5)
    batches: list[list[int]] = []

    async def load_all(cls: Any, nodes: list[Any]) -> list[tuple[Any, Any]]:
        batches.append(sorted(n.ident for n in nodes))
        return [(n, f"v{n.ident}-{len(batches)}") for n in nodes]

    Item.load_all = classmethod(load_all)
    assert await cacheme.get_all([Item(i) for i in range(5)]) == [f"v{i}-1" for i in range(5)]
    clock.advance(60)
    assert await cacheme.get_all([Item(i) for i in range(5)]) == [f"v{i}-1" for i in range(5)]
    await settle(20)
    assert batches == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert await cacheme.get_all([Item(i) for i in range(5)]) == [f"v{i}-2" for i in range(5)]


async def test_stale_while_revalidate(local: Any, clock: Clock) -> None:
    source = Source()
    source.data[1] = "old"
    Item = make(source, stale_while_revalidate=timedelta(seconds=30))
    await cacheme.get(Item(1))
    source.data[1] = "new"
    clock.advance(110)  # expired 10 s ago, within the grace
    assert await cacheme.get(Item(1)) == "old"
    await settle(20)
    assert source.calls == [1, 1]
    assert await cacheme.get(Item(1)) == "new"
    clock.advance(140)  # 40 s past the TTL: beyond the grace, a plain miss
    source.data[1] = "newer"
    assert await cacheme.get(Item(1)) == "newer"


async def test_stale_if_error_serves_the_stored_copy(local: Any, clock: Clock) -> None:
    source = Source()
    source.data[1] = "kept"
    Item = make(source, stale_if_error=timedelta(seconds=60), negative_ttl=timedelta(seconds=1))
    await cacheme.get(Item(1))
    source.fail = True
    clock.advance(120)  # expired, within the error grace
    assert await cacheme.get(Item(1)) == "kept"
    assert cacheme.stats(Item).stale == 1
    assert not Item._cacheme_config.last_good  # from the tier, not from memory
    clock.advance(60)
    with pytest.raises(RuntimeError):
        await cacheme.get(Item(1))


async def test_negative_entries_live_their_own_ttl(local: Any, clock: Clock) -> None:
    source = Source()
    Item = make(source, negative_ttl=timedelta(seconds=5))
    results = await asyncio.gather(*(cacheme.get(Item(7)) for _ in range(100)))
    assert results == [None] * 100
    for _ in range(100):
        assert await cacheme.get(Item(7)) is None
    assert source.calls == [7]
    clock.advance(6)
    assert await cacheme.get(Item(7)) is None
    assert source.calls == [7, 7]
    source.data[8] = "found"
    await cacheme.get(Item(8))
    clock.advance(6)
    assert await cacheme.get(Item(8)) == "found"  # positive entries keep their 100 s
    assert source.calls == [7, 7, 8]
    stats = cacheme.stats(Item)
    assert stats.negative_hits == 100 and stats.hits == 101  # the coalesced 99 were misses


async def test_negative_ttl_per_tier(clock: Clock) -> None:
    await cacheme.register_storage("l1", cacheme.Storage(url="local://lru", size=100))
    await cacheme.register_storage("l2", cacheme.Storage(url="local://tlfu", size=100))
    source = Source()
    Item = make(
        source,
        caches=[
            cacheme.Cache(
                storage="l1", ttl=timedelta(seconds=100), negative_ttl=timedelta(seconds=1)
            ),
            cacheme.Cache(storage="l2", ttl=timedelta(seconds=100)),
        ],
        negative_ttl=timedelta(seconds=10),
    )
    assert await cacheme.get(Item(1)) is None
    clock.advance(2)  # gone from l1, still in l2
    assert await cacheme.get(Item(1)) is None
    assert source.calls == [1]
    assert cacheme.stats(Item).tier_hit_count("l2") == 1
    clock.advance(9)
    assert await cacheme.get(Item(1)) is None
    assert source.calls == [1, 1]


async def test_not_found_exception_is_cached(local: Any, clock: Clock) -> None:
    calls = []

    @dataclass
    class Missing(cacheme.Node):
        ident: int

        def key(self) -> str:
            return f"missing:{self.ident}"

        async def load(self) -> Any:
            calls.append(self.ident)
            raise NotFound("no such item", self.ident)

        class Meta(cacheme.Node.Meta):
            caches = [cacheme.Cache(storage="local", ttl=timedelta(seconds=60))]
            negative_ttl = timedelta(seconds=2)
            not_found = (KeyError, NotFound)

    for _ in range(3):
        with pytest.raises(NotFound) as info:
            await cacheme.get(Missing(1))
        assert info.value.args == ("no such item", 1)
    assert calls == [1]
    clock.advance(3)
    with pytest.raises(NotFound):
        await cacheme.get(Missing(1))
    assert calls == [1, 1]


@pytest.mark.parametrize("call", ["get", "get_all"])
async def test_stale_while_revalidate_reads_a_later_tier_before_loading(
    local: Any, clock: Clock, call: str
) -> None:
    """[local 100 ms, local2 1 h] with stale_while_revalidate: once the first tier's entry
    expires, the stale value is served and the background reload takes the later tier's
    fresh copy instead of loading; it loads only once the later tier's entry expires too.
    It loaded every time the first tier expired (review 48)."""
    await cacheme.register_storage("local2", cacheme.Storage(url="local://lru", size=100))
    source = Source()
    source.data[1] = "v1"
    Item = make(
        source,
        caches=[
            cacheme.Cache(storage="local", ttl=timedelta(milliseconds=100)),
            cacheme.Cache(storage="local2", ttl=timedelta(hours=1)),
        ],
        stale_while_revalidate=timedelta(seconds=10),
    )

    async def get() -> Any:
        if call == "get":
            return await cacheme.get(Item(1))
        return (await cacheme.get_all([Item(1)]))[0]

    assert await get() == "v1"
    source.data[1] = "v2"
    clock.advance(0.15)  # the first tier's entry expired; the second one's is fresh
    assert await get() == "v1"  # the stale copy, at once
    await settle()
    assert source.calls == [1]  # no load: the second tier had it
    assert cacheme.stats(Item).refresh_count() == 1
    before = cacheme.stats(Item).tier_hits["local"]
    assert await get() == "v1"
    assert cacheme.stats(Item).tier_hits["local"] == before + 1  # fresh in the first again
    clock.advance(3600)  # now both expired, within the grace: the reload loads
    assert await get() == "v1"
    await settle()
    assert source.calls == [1, 1]
    assert await get() == "v2"


async def test_a_revalidating_reload_that_loads_is_not_held_back_by_the_doorkeeper(
    local: Any, clock: Clock
) -> None:
    """Both tiers expired (within the grace): the background reload reads the second, finds
    it expired too, and loads; it writes what it loaded as any background reload does,
    whatever the doorkeeper says (it held the new value back: the stale one stayed, and the
    source was loaded again at each get; review 51)."""
    from cacheme.doorkeeper import BloomFilter

    await cacheme.register_storage("local2", cacheme.Storage(url="local://lru", size=100))
    source = Source()
    source.data[1] = "v1"
    Item = make(
        source,
        caches=[
            cacheme.Cache(storage="local", ttl=timedelta(milliseconds=100)),
            cacheme.Cache(storage="local2", ttl=timedelta(milliseconds=100)),
        ],
        stale_while_revalidate=timedelta(seconds=10),
        doorkeeper=BloomFilter(2, 0.01),
    )
    assert await cacheme.get(Item(1)) == "v1"  # first seen: not stored
    assert await cacheme.get(Item(1)) == "v1"  # seen again: stored
    source.data[1] = "v2"
    clock.advance(0.2)
    assert await cacheme.get(Item(1)) == "v1"  # stale, served; the reload loads
    await settle()
    assert len(source.calls) == 3
    assert await cacheme.get(Item(1)) == "v2"
    assert len(source.calls) == 3


async def test_tags_local(local: Any, clock: Clock) -> None:
    source = Source()
    Item = make(source, tagged=True, negative_ttl=timedelta(seconds=1))
    for i in range(10):
        source.data[i] = i
    nodes = [Item(i, tag="even" if i % 2 == 0 else "odd") for i in range(10)]
    assert await cacheme.get_all(nodes) == list(range(10))
    await cacheme.invalidate_tag(Item, "odd")
    before = cacheme.stats(Item)
    assert await cacheme.get_all(nodes) == list(range(10))
    after = cacheme.stats(Item)
    assert after.hits - before.hits == 5  # the even ones
    assert sorted(source.calls[10:]) == [1, 3, 5, 7, 9]
    await cacheme.invalidate_node(Item)
    assert await cacheme.get(Item(2, tag="even")) == 2
    assert source.calls[-1] == 2


@pytest.mark.parametrize("through", ["parent", "child"])
async def test_a_subclass_without_meta_shares_its_parents_tags(local: Any, through: str) -> None:
    """A subclass without a Meta of its own shares its parent's entries (same keys), so its
    tags too: invalidate_tag and invalidate_node of either class reach the entries either
    one stored. The child's local entry outlived the parent's invalidate_tag (review 48)."""
    source = Source()
    source.data[1] = "v1"
    Item = make(source, tagged=True)

    class Child(Item):  # type: ignore[valid-type,misc]
        pass

    assert Child._cacheme_config.tag_space == Item._cacheme_config.tag_space
    other, invalidated = (Item, Child) if through == "parent" else (Child, Item)
    assert await cacheme.get(invalidated(1)) == "v1"
    source.data[1] = "v2"
    await cacheme.invalidate_tag(other, "a")
    assert await cacheme.get(other(1)) == "v2"
    assert await cacheme.get(invalidated(1)) == "v2"
    source.data[1] = "v3"
    await cacheme.invalidate_node(other)
    assert await cacheme.get(invalidated(1)) == "v3"
    assert source.calls == [1, 1, 1]


async def test_tag_invalidation_during_a_load_wins(local: Any) -> None:
    source = Source()
    source.data[1] = "old"
    Item = make(source, tagged=True)
    source.gate = asyncio.Event()
    task = asyncio.ensure_future(cacheme.get(Item(1)))
    await settle()
    await cacheme.invalidate_tag(Item, "a")
    source.gate.set()
    assert await task == "old"
    source.data[1] = "new"
    assert await cacheme.get(Item(1)) == "new"  # the late write recorded the old version


async def test_tags_from_another_process_through_the_listener(local: Any) -> None:
    source = Source()
    source.data[1] = "v"
    Item = make(source, tagged=True)
    await cacheme.get(Item(1))
    key = tags.tag_key(Item._cacheme_config.name, "a")
    tags._on_message("k", [key], True, None)  # what the backplane's subscriber calls
    await cacheme.get(Item(1))
    assert source.calls == [1, 1]


async def test_untagged_node_refuses_tag_invalidation(local: Any) -> None:
    Item = make(Source(), negative_ttl=timedelta(seconds=1))
    with pytest.raises(cacheme.ConfigurationError, match="has no tags"):
        await cacheme.invalidate_tag(Item, "x")
    with pytest.raises(cacheme.ConfigurationError, match="has no tags"):
        await cacheme.invalidate_node(Item)


async def test_combined_on_local(local: Any, clock: Clock) -> None:
    source = Source()
    source.data[1] = "one"
    Item = make(
        source,
        tagged=True,
        refresh_after=0.5,
        negative_ttl=timedelta(seconds=5),
        stale_while_revalidate=timedelta(seconds=10),
    )
    assert await cacheme.get(Item(1)) == "one"
    assert await cacheme.get(Item(2)) is None
    clock.advance(60)
    assert await cacheme.get(Item(1)) == "one"
    assert await cacheme.get(Item(2)) is None  # negative, expired: reloaded in line
    await settle(20)
    assert sorted(source.calls) == [1, 1, 2, 2]


async def test_refresh_and_invalidate_of_stamped_nodes(local: Any, clock: Clock) -> None:
    source = Source()
    source.data[1] = "a"
    Item = make(source, negative_ttl=timedelta(seconds=5), tagged=True)
    assert await cacheme.get(Item(1)) == "a"
    source.data[1] = "b"
    assert await cacheme.refresh(Item(1)) == "b"
    assert await cacheme.get(Item(1)) == "b"
    await cacheme.invalidate(Item(1))
    assert tier("local").get(f"cacheme:{Item(1).key()}:") is MISS


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("refresh_after", 1.5, "refresh_after must be a positive timedelta or a float in"),
        ("refresh_after", timedelta(0), "refresh_after"),
        ("stale_while_revalidate", 3, "stale_while_revalidate must be a positive timedelta"),
        ("negative_ttl", timedelta(seconds=-1), "negative_ttl must be a positive timedelta"),
        ("not_found", "nope", "not_found must be an exception class"),
        ("not_found", (KeyError, int), "not_found must be an exception class"),
    ],
)
def test_meta_validation(option: str, value: Any, message: str) -> None:
    meta = type("Meta", (cacheme.Node.Meta,), {option: value})
    with pytest.raises(cacheme.ConfigurationError, match=message) as info:
        cacheme.node.Config("Bad", meta)
    assert "Bad.Meta" in str(info.value)


async def test_a_refresh_after_fraction_needs_every_tier_to_have_a_ttl(local: Any) -> None:
    """A fraction of no TTL is refused at the node's first use, naming the node and the
    tier, rather than never refreshing that tier's entries; a timedelta is fine."""
    await cacheme.register_storage("endless", cacheme.Storage("local://lru", size=10))

    def node(refresh_after: Any, *ttls: timedelta | None) -> type[cacheme.Node]:
        names = ["local", "endless"][: len(ttls)]
        meta = type(
            "Meta",
            (cacheme.Node.Meta,),
            {
                "caches": [
                    cacheme.Cache(storage=n, ttl=t) for n, t in zip(names, ttls, strict=True)
                ],
                "refresh_after": refresh_after,
            },
        )

        async def load(self: cacheme.Node) -> int:
            return 1

        return type(
            "Fractional",
            (cacheme.Node,),
            {"Meta": meta, "key": lambda self: "k", "load": load, "__module__": __name__},
        )

    minute = timedelta(minutes=1)
    for ttls in [(None,), (minute, None)]:
        with pytest.raises(
            cacheme.ConfigurationError, match=r"Fractional\.Meta\.refresh_after"
        ) as info:
            await cacheme.get(node(0.5, *ttls)())
        assert f"tier {'local' if ttls == (None,) else 'endless'!r} has none" in str(info.value)
    # A TTL longer than the storage can hold means no expiry: the message says so.
    with pytest.raises(cacheme.ConfigurationError) as info:
        await cacheme.get(node(0.5, timedelta.max)())
    assert "tier 'local' has none (its ttl" in str(info.value)
    assert "longer than the storage can hold, max_ttl" in str(info.value)
    assert await cacheme.get(node(0.5, minute, minute)()) == 1
    assert await cacheme.get(node(timedelta(seconds=30), None, None)()) == 1


def test_cache_negative_ttl_is_checked() -> None:
    meta = type(
        "Meta",
        (cacheme.Node.Meta,),
        {"caches": [cacheme.Cache(storage="x", negative_ttl=5)]},  # type: ignore[arg-type]
    )
    with pytest.raises(cacheme.ConfigurationError, match=r"caches\[0\].negative_ttl"):
        cacheme.node.Config("Bad", meta)


class _Repr(cacheme.serializer.Serializer):
    def dumps(self, value: Any) -> bytes:
        return repr(value).encode()


def test_envelope_round_trip() -> None:
    st = freshness.Stamp({"a": 1}, 123, False, ("", "t"))
    data = freshness.encode(st, 456, [b"v1", b"v2"], _Repr())
    assert data.startswith(freshness.MAGIC)
    back, recorded = freshness.decode(data, lambda b: b.decode())
    assert back.value == "{'a': 1}" and back.written == 123 and back.expires == 456
    assert recorded == [["", b"v1"], ["t", b"v2"]]
    with pytest.raises(cacheme.DecodeError):
        freshness.decode(b"\x93\x01\x02\x03", lambda b: b)


@pytest.mark.parametrize("ends_first", ["overtaken", "later"])
async def test_a_refresh_overtaken_by_a_later_refresh_returns_the_later_value(
    local: Any, clock: Clock, ends_first: str
) -> None:
    """Whichever load ends first, both refreshes return the later one's value: the
    overtaken one writes nothing, then waits for the later flight or reads what it wrote."""
    source = Gated(0, 1)
    gates = source.gates
    Item = make(source, refresh_after=0.5)
    assert Item._cacheme_config.stamped
    source.data[1] = "first"
    first = asyncio.ensure_future(cacheme.refresh(Item(1)))
    await settle()
    source.data[1] = "second"
    second = asyncio.ensure_future(cacheme.refresh(Item(1)))
    await settle()
    if ends_first == "overtaken":
        gates[0].set()
        await settle(20)
        assert not first.done()  # it waits for the later flight
        gates[1].set()
    else:
        gates[1].set()
        assert await second == "second"
        gates[0].set()
    assert await first == "second"
    assert await second == "second"
    assert await cacheme.get(Item(1)) == "second"


@pytest.mark.parametrize("how", ["get", "get_all"])
@pytest.mark.parametrize("scope", ["tag", "node"])
async def test_a_get_after_invalidate_tag_or_node_never_joins_an_older_flight(
    local: Any, how: str, scope: str
) -> None:
    source = Gated(0)
    source.data[1] = "old"
    Item = make(source, tagged=True)
    inflight = asyncio.ensure_future(cacheme.get(Item(1)))
    await settle()
    assert source.calls == [1]  # its load is under way
    source.data[1] = "new"
    if scope == "tag":
        await cacheme.invalidate_tag(Item, "a")
    else:
        await cacheme.invalidate_node(Item)
    # Bounded: joining the held older flight would wait until its gate opens.
    if how == "get":
        after = await asyncio.wait_for(cacheme.get(Item(1)), 2)
    else:
        (after,) = await asyncio.wait_for(cacheme.get_all([Item(1)]), 2)
    assert after == "new"
    source.gates[0].set()
    assert await inflight == "old"  # its own caller still gets what it loaded
    assert source.calls == [1, 1]
    assert await cacheme.get(Item(1)) == "new"


def test_a_negative_entry_of_the_older_header_still_decodes() -> None:
    """Entries written before the class and attributes were kept hold (index, args) only."""
    old = freshness.encode(freshness.Stamp((0, ("no user", 7)), 1, True), 0, None, _Repr())
    st, _ = freshness.decode(old, bytes)
    assert st.negative and st.value == (0, ("no user", 7), {}, "")


async def test_a_negative_entry_naming_a_class_no_longer_declared_is_a_load_error(
    local: Any,
) -> None:
    Item = make(Source(), negative_ttl=timedelta(seconds=30), not_found=NotFound)
    cfg = Item._cacheme_config
    with pytest.raises(cacheme.LoadError, match=r"not_found class #3, but Meta.not_found has 1"):
        freshness.unwrap(cfg, freshness.Stamp((3, ("x",), {}, ""), 1, True))
    rebuilt = freshness._rebuild(cfg, (NotFound,), 0, ("x", 1), {"extra": 2}, "nowhere:Gone")
    assert type(rebuilt) is NotFound and rebuilt.args == ("x", 1) and vars(rebuilt) == {"extra": 2}


async def test_a_refresh_racing_invalidate_tag_of_another_tag_still_writes(
    local: Any, clock: Clock
) -> None:
    """invalidate_tag keeps new requests off the node's flights, but a flight's write stands
    (it carries the tag versions read before its load): a refresh under way is not lost."""
    source = Source()
    source.data[1] = "old"
    Item = make(source, tagged=True)
    assert await cacheme.get(Item(1)) == "old"
    source.data[1] = "new"
    source.gate = asyncio.Event()
    refreshing = asyncio.ensure_future(cacheme.refresh(Item(1)))
    await settle()
    await cacheme.invalidate_tag(Item, "unrelated")
    source.gate.set()
    assert await refreshing == "new"
    assert await cacheme.get(Item(1)) == "new"
    assert source.calls == [1, 1]


async def test_a_refresh_overtaken_by_invalidate_tag_of_its_own_tag_returns_a_new_value(
    local: Any, clock: Clock
) -> None:
    """Its load began before the tag was invalidated: what it wrote reads as stale, so it
    returns what a new read gets (a new load), never its own older value."""
    source = Gated(1)  # the refresh's load waits
    source.data[1] = "old"
    Item = make(source, tagged=True)
    assert await cacheme.get(Item(1)) == "old"
    source.data[1] = "mid"
    refreshing = asyncio.ensure_future(cacheme.refresh(Item(1)))
    await settle()
    source.data[1] = "new"
    await cacheme.invalidate_tag(Item, "a")
    # A get after the invalidation (bounded: joining the held refresh would wait for it).
    assert await asyncio.wait_for(cacheme.get(Item(1)), 2) == "new"
    source.gates[1].set()
    assert await refreshing == "new"
    assert await cacheme.get(Item(1)) == "new"


async def test_a_refresh_detached_by_invalidate_tag_of_another_tag_returns_its_value(
    local: Any, clock: Clock
) -> None:
    """``invalidate_tag`` of a tag the node does not carry detaches the node's flights (no
    new get joins them) but leaves its entries valid: the refresh's written value stands,
    and the refresh returns it. It returned the outcome of whatever flight of the key began
    meanwhile instead: with Redis, a get whose read went out before the refresh's write
    landed, so the value from before the refresh (review 48). Here that flight is a held
    load, which the refresh no longer waits for."""
    source = Gated(0, 1)
    source.data[1] = "new"
    Item = make(source, tagged=True)
    refreshing = asyncio.ensure_future(cacheme.refresh(Item(1, tag="a")))
    await settle()
    await cacheme.invalidate_tag(Item, "b")  # not a tag of Item(1)
    source.data[1] = "got"
    getting = asyncio.ensure_future(cacheme.get(Item(1, tag="a")))  # a flight of its own
    await settle()
    source.gates[0].set()
    assert await asyncio.wait_for(refreshing, 2) == "new"
    source.gates[1].set()
    assert await getting == "got"
    assert source.calls == [1, 1]


async def test_a_refresh_detached_by_invalidate_tag_never_writes_over_a_later_refresh(
    local: Any, clock: Clock
) -> None:
    """Refresh A, detached by ``invalidate_tag`` of a tag its node does not carry (out of
    the table of flights), then refresh B, which ends first: A, ending last, wrote its older
    value over B's, served from then on (review 54). A refresh that is not the latest one
    begun in the process writes nothing, and returns the newer one's value."""
    source = Gated(1)
    source.data[1] = "A"
    Item = make(source, tagged=True)
    assert await cacheme.get(Item(1, tag="a")) is not None
    first = asyncio.ensure_future(cacheme.refresh(Item(1, tag="a")))
    await settle()
    await cacheme.invalidate_tag(Item, "b")
    source.data[1] = "B"
    assert await cacheme.refresh(Item(1, tag="a")) == "B"
    source.gates[1].set()
    assert await first == "B"
    assert await cacheme.get(Item(1, tag="a")) == "B"


@pytest.mark.parametrize("info", [5, "x", [None, 1], []])
def test_a_stamp_with_bad_not_found_info_is_a_decode_error(info: Any) -> None:
    import msgpack

    header = msgpack.packb([1, 0, True, None, info])
    data = freshness.MAGIC + freshness._HEADER.pack(len(header)) + header
    with pytest.raises(cacheme.DecodeError, match="bad not-found info"):
        freshness.decode(data, bytes)


class ReadsFirst:
    """A source whose load reads its value when it starts, then waits for ``gate``."""

    def __init__(self) -> None:
        self.value = "v1"
        self.gate: asyncio.Event | None = None
        self.loads: list[str] = []

    async def load(self, ident: int) -> Any:
        value = self.value
        self.loads.append(value)
        if self.gate is not None:
            await self.gate.wait()
        return value


@pytest.mark.parametrize("option", ["refresh_after", "stale_while_revalidate"])
async def test_a_background_reload_never_writes_over_a_newer_flight(
    local: Any, clock: Clock, option: str
) -> None:
    """A slow background reload read the source (v1); the source became v2 and the entry
    passed its TTL. The next get loads v2, and the slow reload then wrote v1 over it: v1
    was served after v2. The reload began before that get's flight, so it writes nothing
    now."""
    source = ReadsFirst()
    meta = (
        {"refresh_after": 0.5}
        if option == "refresh_after"
        else {"stale_while_revalidate": timedelta(seconds=100)}
    )
    Item = make(source, **meta)  # type: ignore[arg-type]
    assert await cacheme.get(Item(1)) == "v1"
    clock.advance(60 if option == "refresh_after" else 101)  # due for a reload
    gate = source.gate = asyncio.Event()
    assert await cacheme.get(Item(1)) == "v1"  # served; the reload waits on the gate
    await settle()
    assert source.loads == ["v1", "v1"]
    source.value = "v2"
    source.gate = None
    clock.advance(200)  # past the TTL (and grace): a miss
    assert await cacheme.get(Item(1)) == "v2"
    gate.set()  # the older reload ends now
    await settle(20)
    assert await cacheme.get(Item(1)) == "v2"
    assert source.loads == ["v1", "v1", "v2"]


async def test_a_flight_in_another_loop_keeps_an_older_reload_from_writing(
    local: Any, clock: Clock
) -> None:
    """The same race across loops (another thread's get cannot join this loop's reload):
    its flight loads v2, and the older reload, still under way here, no longer writes v1
    over it."""
    source = ReadsFirst()
    Item = make(source, refresh_after=0.5)
    assert await cacheme.get(Item(1)) == "v1"
    clock.advance(60)
    source.gate = asyncio.Event()
    assert await cacheme.get(Item(1)) == "v1"  # the reload (v1) waits on the gate
    await settle()
    source.value = "v2"
    gate, source.gate = source.gate, None
    clock.advance(200)
    got = await asyncio.to_thread(asyncio.run, cacheme.get(Item(1)))
    assert got == "v2"
    gate.set()
    await settle(20)
    assert source.loads == ["v1", "v1", "v2"]
    assert await cacheme.get(Item(1)) == "v2"


def test_a_reload_cancelled_with_its_loop_is_counted_and_logged(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``asyncio.run`` per job: a job that serves a due value starts a background reload
    and returns, and the loop's shutdown cancels the reload before it loads. It was counted
    as a reload and nothing else, silently; now also as a failure, with a warning."""
    source = Source()
    source.data[1] = "old"
    Item = make(source, refresh_after=0.5)

    async def job() -> Any:
        return await cacheme.get(Item(1))

    asyncio.run(cacheme.register_storage("local", cacheme.Storage("local://tlfu", size=100)))
    try:
        assert asyncio.run(job()) == "old"
        clock.advance(60)
        source.data[1] = "new"
        assert asyncio.run(job()) == "old"  # serves, starts the reload, ends the loop
        stats = cacheme.stats(Item)
        assert stats.refreshes == 1 and stats.refresh_failures == 1
        assert "background reload of 1 key(s) cancelled" in caplog.text
        assert source.calls == [1]
    finally:
        asyncio.run(cacheme.close_storages())


async def test_a_reload_under_way_and_an_invalidate_tag(local: Any, clock: Clock) -> None:
    """A background reload has read "old"; the source changes and ``invalidate_tag`` returns:
    a get begun after it returns "new", and the reload writes nothing afterwards (a first
    version of the fix above made the get join the reload, and return "old")."""
    source = ReadsFirst()
    source.value = "old"
    Item = make(source, refresh_after=0.5, tagged=True)
    assert await cacheme.get(Item(1)) == "old"
    clock.advance(60)
    gate = source.gate = asyncio.Event()
    assert await cacheme.get(Item(1)) == "old"  # the reload ("old") waits on the gate
    await settle()
    source.value = "new"
    source.gate = None
    await cacheme.invalidate_tag(Item, "a")
    assert await cacheme.get(Item(1)) == "new"
    gate.set()
    await settle(20)
    assert await cacheme.get(Item(1)) == "new"


async def test_a_miss_during_a_failing_reload_serves_stale_if_error(
    local: Any, clock: Clock
) -> None:
    """The source is down and a reload is under way when the entry expires: the get that
    misses serves the stale-if-error copy, as with no reload under way (a first version of
    the fix above made it join the reload, and raise its error)."""
    source = Source()
    source.data[1] = "v"
    Item = make(source, refresh_after=0.5, stale_if_error=timedelta(seconds=1000))
    assert await cacheme.get(Item(1)) == "v"
    clock.advance(60)
    source.fail = True
    source.gate = asyncio.Event()
    assert await cacheme.get(Item(1)) == "v"  # the reload waits on the gate, then fails
    await settle()
    clock.advance(60)  # past the TTL: a miss
    source.gate.set()
    assert await cacheme.get(Item(1)) == "v"
    assert cacheme.stats(Item).stale_count() == 1


async def test_a_reload_cancelled_before_it_ran_leaves_the_key_reloadable(
    local: Any, clock: Clock
) -> None:
    """A reload's task cancelled before its first step (an app cancelling every other task
    at shutdown) never ran its clean-up: its keys stayed marked as being reloaded, so no
    reload of them ever started again in that loop."""
    from cacheme import runtime

    source = Source()
    source.data[1] = "v1"
    Item = make(source, refresh_after=0.5)
    assert await cacheme.get(Item(1)) == "v1"
    clock.advance(60)
    rt = runtime.current()
    before = set(rt.tasks)
    assert await cacheme.get(Item(1)) == "v1"  # starts the reload's task
    for task in set(rt.tasks) - before:
        task.cancel()
    await settle()
    assert not rt.refreshing
    source.data[1] = "v2"
    assert await cacheme.get(Item(1)) == "v1"  # due still: a new reload starts
    await settle(20)
    assert await cacheme.get(Item(1)) == "v2"
