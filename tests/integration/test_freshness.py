"""Freshness on every remote backend (behind a local tier, or alone): negative entries,
refresh-ahead, stale-while-revalidate, stale-if-error from the stored copy after a restart,
tags, and the plain layout of nodes that use none of it. Injected clock (freshness.now_ms)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import cacheme
from cacheme import freshness
from cacheme.serializer import MsgPackSerializer
from cacheme.storages.base import RemoteStorage

from .backends import BACKENDS, FACTORIES

_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.ms = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    c = Clock()
    monkeypatch.setattr(freshness, "now_ms", c)
    yield c


@dataclass
class Backend:
    name: str
    raw: RemoteStorage[Any]  # a second connection, past cacheme
    local_url: str

    async def restart(self) -> None:
        """A fresh local tier and no in-memory state, as after a restart of the process."""
        await cacheme.register_storage("local", cacheme.Storage(url=self.local_url, size=1000))


@pytest.fixture(
    params=[pytest.param(b, marks=getattr(pytest.mark, b)) for b in BACKENDS],
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    name: str = request.param
    local_url = "local://lru" if BACKENDS.index(name) % 2 else "local://tlfu"
    async with AsyncExitStack() as stack:
        raw = await stack.enter_async_context(FACTORIES[name](tmp_path, f"raw-{name}"))
        options = raw.options.model_dump(exclude_defaults=True)
        await cacheme.register_storage("remote", cacheme.Storage(raw.url, **options))
        await cacheme.register_storage("local", cacheme.Storage(url=local_url, size=1000))
        try:
            yield Backend(name, raw, local_url)
        finally:
            await cacheme.close_storages()


class Source:
    def __init__(self) -> None:
        self.data: dict[int, Any] = {}
        self.calls: list[int] = []
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def load(self, ident: int) -> Any:
        self.calls.append(ident)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("source down")
        return self.data.get(ident)


def make(source: Source, chain: tuple[str, ...], **meta: Any) -> Any:
    n = next(_ids)
    tagged = meta.pop("tagged", False)
    ttl = meta.pop("ttl", timedelta(seconds=100))
    meta.setdefault("caches", [cacheme.Cache(storage=s, ttl=ttl) for s in chain])
    meta.setdefault("serializer", MsgPackSerializer())
    meta.setdefault("version", f"f{n}")
    meta_cls = type("Meta", (cacheme.Node.Meta,), meta)

    @dataclass
    class Item(cacheme.Node):
        ident: int
        tag: str = "a"

        def key(self) -> str:
            return f"fresh:{self.ident}"

        async def load(self) -> Any:
            return await source.load(self.ident)

        if tagged:

            def tags(self) -> list[str]:
                return [self.tag]

        Meta = meta_cls

    return Item


def key_of(node: Any) -> str:
    return f"cacheme:{node.key()}:{type(node)._cacheme_config.version}"


async def settle(turns: int = 50) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


async def test_plain_node_stores_the_serializer_bytes(backend: Backend) -> None:
    source = Source()
    source.data[1] = {"a": 1}
    Item = make(source, ("local", "remote"))
    assert not Item._cacheme_config.stamped
    await cacheme.get(Item(1))
    assert await backend.raw.get(key_of(Item(1))) == MsgPackSerializer().dumps({"a": 1})


async def test_negative_entries(backend: Backend, clock: Clock) -> None:
    source = Source()
    Item = make(source, ("remote",), negative_ttl=timedelta(seconds=5))
    assert await asyncio.gather(*(cacheme.get(Item(1)) for _ in range(50))) == [None] * 50
    for _ in range(20):
        assert await cacheme.get(Item(1)) is None
    assert source.calls == [1]
    data = await backend.raw.get(key_of(Item(1)))
    assert data is not None and data.startswith(freshness.MAGIC)
    assert cacheme.stats(Item).negative_hits == 20
    clock.advance(6)
    assert await cacheme.get(Item(1)) is None
    assert source.calls == [1, 1]


@pytest.mark.parametrize(
    "meta",
    [
        {"stale_while_revalidate": timedelta.max},
        {"stale_if_error": timedelta.max},
        {"negative_ttl": timedelta.max},
        {"stale_while_revalidate": timedelta(days=1), "ttl": timedelta.max},
    ],
    ids=["swr", "sie", "negative", "ttl"],
)
async def test_graces_longer_than_the_storage_can_hold_mean_no_expiry(
    backend: Backend, meta: dict[str, Any]
) -> None:
    """A grace or negative TTL past what the tier can hold (``timedelta.max``: "serve stale
    forever") is no expiry, as a TTL is: the TTL plus the grace overflowed the expiry
    date of the SQL and MongoDB tiers, and every write-back failed (each get loaded)."""
    source = Source()
    source.data[1] = "v"
    for chain in (("remote",), ("local", "remote")):
        Item = make(source, chain, **meta)
        negative = "negative_ttl" in meta
        expected = None if negative else "v"
        assert await cacheme.get(Item(2 if negative else 1)) == expected
        assert await cacheme.get(Item(2 if negative else 1)) == expected
        stats = cacheme.stats(Item)
        assert (stats.load_count(), stats.hit_count(), stats.storage_error_count()) == (1, 1, 0)
        assert await backend.raw.get(key_of(Item(2 if negative else 1))) is not None


async def test_refresh_ahead_on_a_remote_hit(backend: Backend, clock: Clock) -> None:
    source = Source()
    source.data[1] = "old"
    Item = make(source, ("remote",), refresh_after=timedelta(seconds=10))
    assert await cacheme.get(Item(1)) == "old"
    source.data[1] = "new"
    source.gate = asyncio.Event()
    clock.advance(11)
    results = await asyncio.wait_for(
        asyncio.gather(*(cacheme.get(Item(1)) for _ in range(200))), 10
    )
    assert results == ["old"] * 200
    source.gate.set()
    await settle()
    assert source.calls == [1, 1]
    assert await cacheme.get(Item(1)) == "new"
    data = await backend.raw.get(key_of(Item(1)))
    assert data is not None
    stamp, _ = freshness.decode(data, lambda b: MsgPackSerializer().loads(b))
    assert stamp.value == "new" and stamp.written == clock.ms


async def test_failed_refresh_keeps_the_value(backend: Backend, clock: Clock) -> None:
    source = Source()
    source.data[1] = "old"
    Item = make(source, ("local", "remote"), refresh_after=0.5)
    await cacheme.get(Item(1))
    source.fail = True
    clock.advance(60)
    assert await cacheme.get(Item(1)) == "old"
    await settle()
    assert cacheme.stats(Item).refresh_failures == 1
    await backend.restart()
    assert await cacheme.get(Item(1)) == "old"  # still in the remote tier


async def test_stale_while_revalidate(backend: Backend, clock: Clock) -> None:
    source = Source()
    source.data[1] = "old"
    Item = make(source, ("local", "remote"), stale_while_revalidate=timedelta(seconds=30))
    await cacheme.get(Item(1))
    source.data[1] = "new"
    clock.advance(110)
    await backend.restart()  # the remote copy serves it
    assert await cacheme.get(Item(1)) == "old"
    await settle()
    assert await cacheme.get(Item(1)) == "new"
    assert source.calls == [1, 1]


async def test_stale_while_revalidate_reads_a_later_remote_tier_before_loading(
    backend: Backend, clock: Clock, tmp_path: Path
) -> None:
    """[remote 100 ms, SQLite 1 h]: the remote entry expired (within the grace) is served, and
    the background reload takes SQLite's fresh copy instead of loading (review 48)."""
    from cacheme import schemas

    url = f"sqlite:///{tmp_path / 'later.db'}"
    await schemas.create(url)
    await cacheme.register_storage("later", cacheme.Storage(url=url))
    source = Source()
    source.data[1] = "v1"
    Item = make(
        source,
        (),
        caches=[
            cacheme.Cache(storage="remote", ttl=timedelta(milliseconds=100)),
            cacheme.Cache(storage="later", ttl=timedelta(hours=1)),
        ],
        stale_while_revalidate=timedelta(seconds=30),
    )
    assert await cacheme.get(Item(1)) == "v1"
    source.data[1] = "v2"
    clock.advance(0.15)
    assert await cacheme.get(Item(1)) == "v1"
    await settle()
    assert source.calls == [1]
    assert cacheme.stats(Item).refresh_count() == 1
    assert await cacheme.get(Item(1)) == "v1"  # the remote tier's copy is fresh again
    assert cacheme.stats(Item).tier_hits["remote"] >= 1


async def test_stale_if_error_after_a_restart(backend: Backend, clock: Clock) -> None:
    source = Source()
    source.data[1] = "kept"
    # stale_if_error alone keeps the in-memory copy (as before); any freshness option makes
    # the node stamped, and then the stored copy serves it.
    Item = make(
        source,
        ("local", "remote"),
        stale_if_error=timedelta(seconds=60),
        negative_ttl=timedelta(seconds=1),
    )
    await cacheme.get(Item(1))
    clock.advance(120)  # logically expired everywhere, still stored (TTL + grace)
    await backend.restart()
    source.fail = True
    assert await cacheme.get(Item(1)) == "kept"
    assert cacheme.stats(Item).stale == 1
    source.fail = False
    source.data[1] = "fresh"
    assert await cacheme.get(Item(1)) == "fresh"  # the stale copy was not written back


async def test_tags(backend: Backend, clock: Clock) -> None:
    source = Source()
    Item = make(source, ("local", "remote"), tagged=True)
    for i in range(20):
        source.data[i] = i
    nodes = [Item(i, tag="x" if i % 2 else "y") for i in range(20)]
    assert await cacheme.get_all(nodes) == list(range(20))
    await cacheme.invalidate_tag(Item, "x")
    for restart in (False, True):
        if restart:
            await backend.restart()
        before = cacheme.stats(Item)
        calls = len(source.calls)
        assert await cacheme.get_all(nodes) == list(range(20))
        after = cacheme.stats(Item)
        assert after.hits - before.hits == (20 if restart else 10)
        assert len(source.calls) - calls == (0 if restart else 10)
    await cacheme.invalidate_node(Item)
    await backend.restart()
    calls = len(source.calls)
    assert await cacheme.get_all(nodes) == list(range(20))
    assert len(source.calls) - calls == 20


async def test_decode_error_for_an_unstamped_entry(backend: Backend) -> None:
    source = Source()
    source.data[1] = "v"
    Item = make(source, ("remote",), negative_ttl=timedelta(seconds=5))
    await backend.raw.set_many([_entry(key_of(Item(1)), MsgPackSerializer().dumps("old"))])
    assert await cacheme.get(Item(1)) == "v"
    assert cacheme.stats(Item).decode_errors == 1


def _entry(key: str, value: bytes) -> Any:
    from cacheme.storages.base import Entry

    return Entry(key, value, 60_000)


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
async def big(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    name: str = request.param
    async with AsyncExitStack() as stack:
        raw = await stack.enter_async_context(FACTORIES[name](tmp_path, f"raw-{name}"))
        options = raw.options.model_dump(exclude_defaults=True)
        options["batch_size"] = 5000
        await cacheme.register_storage("remote", cacheme.Storage(raw.url, **options))
        await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=200_000))
        try:
            yield Backend(name, raw, "local://tlfu")
        finally:
            await cacheme.close_storages()


async def test_100k_tagged_entries(big: Backend) -> None:
    """100,000 entries over two tags; one tag invalidated: none of it is served afterwards,
    from the local tier or (after a restart) the remote one; the other tag is all hits."""
    n = 100_000
    loaded: list[int] = []

    @dataclass
    class Row(cacheme.Node):
        ident: int

        def key(self) -> str:
            return f"row:{self.ident}"

        def tags(self) -> list[str]:
            return ["even" if self.ident % 2 == 0 else "odd"]

        async def load(self) -> int:
            loaded.append(self.ident)
            return self.ident

        @classmethod
        async def load_all(cls, nodes: Any) -> list[tuple[Any, int]]:
            loaded.extend(node.ident for node in nodes)
            return [(node, node.ident) for node in nodes]

        class Meta(cacheme.Node.Meta):
            version = f"big{next(_ids)}"
            caches = [
                cacheme.Cache(storage="local", ttl=timedelta(minutes=10)),
                cacheme.Cache(storage="remote", ttl=timedelta(minutes=10)),
            ]
            serializer = MsgPackSerializer()

    rows = [Row(i) for i in range(n)]
    chunk = 10_000

    async def read_all() -> None:
        for i in range(0, n, chunk):
            assert await cacheme.get_all(rows[i : i + chunk]) == list(range(i, i + chunk))

    await read_all()
    assert len(loaded) == n
    for restart in (False, True):
        await cacheme.invalidate_tag(Row, "odd")
        if restart:  # only the remote tier has them: its tag version must reject them
            await big.restart()
        loaded.clear()
        before = cacheme.stats(Row)
        await read_all()
        after = cacheme.stats(Row)
        assert sorted(loaded) == list(range(1, n, 2)), restart  # every odd one, once
        assert after.hits - before.hits == n // 2
        if restart:
            # the even ones came from the remote tier
            assert after.tier_hits["remote"] - before.tier_hits["remote"] == n // 2
            assert after.tier_hits["local"] == before.tier_hits["local"]
        else:
            assert after.tier_hits["local"] - before.tier_hits["local"] == n // 2


@pytest.mark.redis
async def test_features_combine_on_local_redis(tmp_path: Path, clock: Clock) -> None:
    async with FACTORIES["redis"](tmp_path, "raw-redis") as raw:
        options = raw.options.model_dump(exclude_defaults=True)
        await cacheme.register_storage("remote", cacheme.Storage(raw.url, **options))
        await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=1000))
        try:
            source = Source()
            source.data[1] = "one"
            Item = make(
                source,
                ("local", "remote"),
                tagged=True,
                refresh_after=0.5,
                negative_ttl=timedelta(seconds=5),
            )
            assert await cacheme.get(Item(1)) == "one"
            assert await cacheme.get(Item(2)) is None
            assert await cacheme.get(Item(2)) is None
            assert source.calls == [1, 2]
            # refresh-ahead from the local tier
            source.data[1] = "uno"
            clock.advance(60)
            assert await cacheme.get(Item(1)) == "one"
            await settle()
            assert await cacheme.get(Item(1)) == "uno"
            # the negative entry expired on its own TTL
            assert await cacheme.get(Item(2)) is None
            assert source.calls == [1, 2, 1, 2]
            # the tag drops both, in both tiers
            await cacheme.invalidate_tag(Item, "a")
            source.data[2] = "two"
            await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=1000))
            assert await cacheme.get_all([Item(1), Item(2)]) == ["uno", "two"]
            assert source.calls[-2:] == [1, 2]
            assert cacheme.stats(Item).negative_hits == 1
        finally:
            await cacheme.close_storages()


@pytest.mark.parametrize("where", ["here", "elsewhere"])
@pytest.mark.parametrize("turns", [None, 0, 1, 2, 4, 8])
async def test_first_invalidation_racing_the_tag_key_add(
    backend: Backend, where: str, turns: int | None
) -> None:
    """A writer finds the tag key missing and adds it (set-if-absent) while the tag is
    invalidated for the first time, here or by another process (a second connection),
    before its load ends (``None``) or racing its write by a few loop turns: whatever lands
    first, the value loaded before the invalidation is never served from the remote tier."""
    from cacheme import tags
    from cacheme.storages.base import Entry

    source = Source()
    Item = make(source, ("local", "remote"), tagged=True)
    tag = f"race-{next(_ids)}"
    tag_key = tags.tag_key(Item._cacheme_config.name, tag)
    node = Item(1, tag=tag)
    assert await backend.raw.get(tag_key) is None  # the first use of the tag
    source.data[1] = "before"
    source.gate = asyncio.Event()
    reader = asyncio.ensure_future(cacheme.get(node))
    for _ in range(200):
        if source.calls:
            break
        await asyncio.sleep(0.005)
    assert source.calls == [1]  # loading; its read found no tag key

    async def invalidate() -> None:
        source.data[1] = "after"
        if where == "here":
            await cacheme.invalidate_tag(Item, tag)
        else:
            await backend.raw.set_many([Entry(tag_key, tags.new_token(), None)])

    if turns is None:
        await invalidate()
        source.gate.set()
        await reader
    else:
        source.gate.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        await asyncio.gather(reader, invalidate())
    await settle()
    stored = await backend.raw.get(tag_key)
    assert stored is not None
    await backend.restart()  # a process with only the remote tier's copy
    assert await cacheme.get(node) == "after"
    assert source.calls == [1, 1]
    assert await backend.raw.get(tag_key) == stored  # the invalidation's version stays


class Missing(Exception):
    """The declared not_found class; the two below derive from it."""


class MissingUser(Missing):
    def __init__(self, user_id: int) -> None:  # the message is built from the id
        self.user_id = user_id
        super().__init__(f"user {user_id} not found")


class MissingOrder(Missing):
    def __init__(self, *, kind: str, ident: int) -> None:  # keyword-only
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident} not found")


@pytest.mark.parametrize("chain", [("remote",), ("local", "remote")], ids=["remote", "local"])
async def test_not_found_exceptions_come_back_as_raised(
    backend: Backend, clock: Clock, chain: tuple[str, ...]
) -> None:
    """The caller whose load raised, a later hit, and a hit read from the remote tier after
    a restart all get the exception's own class, args, message and attributes, whatever its
    __init__ takes."""
    raised = {1: MissingUser(1), 2: MissingOrder(kind="order", ident=2), 3: Missing("gone", 3)}

    class Raising(Source):
        async def load(self, ident: int) -> Any:
            self.calls.append(ident)
            raise raised[ident]

    source = Raising()
    Item = make(source, chain, negative_ttl=timedelta(seconds=30), not_found=Missing)
    for ident, original in raised.items():
        for attempt in ("load", "hit", "after a restart"):
            if attempt == "after a restart":
                await backend.restart()
            with pytest.raises(Missing) as info:
                await cacheme.get(Item(ident))
            got = info.value
            assert type(got) is type(original), attempt
            assert got.args == original.args and str(got) == str(original), attempt
            assert vars(got) == vars(original), attempt
    assert source.calls == [1, 2, 3]


class Odd(Missing):
    """args no MessagePack header can hold."""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((2**70,), "1180591620717411303424"),  # past 64 bits
        (("a\ud800b",), "a\\ud800b"),  # a lone surrogate
        (({"id": 3},), "{'id': 3}"),  # not a simple value
    ],
)
async def test_a_not_found_with_args_no_header_can_hold_comes_back_with_its_message(
    backend: Backend, clock: Clock, args: tuple[Any, ...], message: str
) -> None:
    class Raising(Source):
        async def load(self, ident: int) -> Any:
            self.calls.append(ident)
            raise Odd(*args)

    source = Raising()
    Item = make(source, ("remote",), negative_ttl=timedelta(seconds=30), not_found=Missing)
    for _ in range(3):
        with pytest.raises(Odd) as info:
            await cacheme.get(Item(1))
        assert info.value.args == (message,)
    assert source.calls == [1]  # cached after all


async def test_a_not_found_raised_by_load_all_for_a_batch_is_not_cached(
    backend: Backend, clock: Clock
) -> None:
    """load_all raising for the whole batch cannot say which node is missing: each caller
    gets the error, nothing is cached as not found, and the nodes load again later."""
    source = Source()
    source.data = {1: "one", 2: "two"}
    batches: list[list[int]] = []
    Item = make(source, ("local", "remote"), negative_ttl=timedelta(seconds=30), not_found=Missing)

    async def load_all(cls: Any, nodes: Any) -> Any:
        batches.append(sorted(n.ident for n in nodes))
        if len(batches) == 1:
            raise Missing("one of them is missing")
        return [(n, source.data[n.ident]) for n in nodes]

    Item.load_all = classmethod(load_all)
    with pytest.raises(Missing):
        await cacheme.get_all([Item(1), Item(2)])
    assert await cacheme.get_all([Item(1), Item(2)]) == ["one", "two"]
    assert batches == [[1, 2], [1, 2]]


async def test_a_cancelled_refresh_does_not_fail_the_gets_that_joined_it(
    backend: Backend, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A tagged node's refresh first reads the tag versions of the remote tier; its caller
    cancelled then (a request's timeout) cancels only its own wait: a get that joined it gets
    the value, and nothing is logged as failed."""
    source = Source()
    source.data[1] = "v"
    Item = make(source, ("remote",), tagged=True)
    refreshing = asyncio.ensure_future(cacheme.refresh(Item(1)))
    await asyncio.sleep(0)  # its flight is registered; the tag versions are being read
    joined = asyncio.ensure_future(cacheme.get(Item(1)))
    await asyncio.sleep(0)
    refreshing.cancel()
    assert await asyncio.wait_for(joined, 5) == "v"
    with pytest.raises(asyncio.CancelledError):
        await refreshing
    assert source.calls == [1]
    assert "read callback failed" not in caplog.text


@pytest.mark.parametrize("option", ["refresh_after", "stale_while_revalidate"])
async def test_a_reload_lands_while_hits_come_from_the_remote_tier(
    backend: Backend, clock: Clock, option: str
) -> None:
    """A node with no local tier: every get of a due entry is a flight that reads the remote
    tier (a hit), while the reload it started runs. A first version of this session's fix
    for reloads writing over newer values marked the reload stale at every such flight, so
    under steady traffic no reload ever wrote: the value never advanced. Only a walk that
    loads the key keeps a reload from writing."""
    source = Source()
    source.data[1] = "v1"
    meta: dict[str, Any] = (
        {"refresh_after": 0.5}
        if option == "refresh_after"
        else {"stale_while_revalidate": timedelta(seconds=100)}
    )
    Item = make(source, ("remote",), **meta)
    assert await cacheme.get(Item(1)) == "v1"
    clock.advance(60 if option == "refresh_after" else 101)  # due for a reload
    source.data[1] = "v2"
    source.gate = asyncio.Event()
    assert await cacheme.get(Item(1)) == "v1"  # starts the reload, held at the gate
    await settle()
    for _ in range(5):  # steady traffic while it runs: remote hits
        assert await cacheme.get(Item(1)) == "v1"
    source.gate.set()
    await settle()
    assert await cacheme.get(Item(1)) == "v2"
    assert source.calls == [1, 1]
