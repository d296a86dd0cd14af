"""The backplane: local tiers coherent across real OS processes (see ``cacheme.backplane``).

Children are ``bp_child`` processes (each with a deadline); the parent drives them. Times
are measured with ``time.monotonic``, which is one clock for every process on Linux.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import cacheme
from cacheme import backplane
from cacheme.errors import ConfigurationError
from cacheme.storages.base import MISS

from .backend_sql import sql_table
from .bp_harness import (
    Child,
    PrivateRedis,
    redis_or_skip,
    start_children,
    stop_children,
    unique,
    wait_until,
)

PROPAGATION_BOUND = 0.2  # seconds: the bound for 4 processes


def _setup(tmp_path: Path, storages: dict[str, Any], shared: str, bp: str) -> dict[str, Any]:
    source = tmp_path / "source"
    source.write_text("0")
    return {
        "source": str(source),
        "loads": str(tmp_path / "loads"),
        "storages": storages,
        "shared": shared,
        "backplane": bp,
        "channel": unique("bp-test"),
        "key": unique("item"),
    }


def _propagates(children: list[Child], source: Path) -> list[float]:
    """Child 0 invalidates after the source changed; the others must serve the new value."""
    for child in children:
        assert child.call("get")["value"] == 0
    source.write_text("1")
    done = children[0].call("invalidate")
    assert done["ok"], done
    for child in children[1:]:
        child.send("wait_for", value=1, within=2.0)
    delays = []
    for child in children[1:]:
        reply = child.recv(5)
        assert reply["ok"], f"process {child.pid} still serves {reply.get('seen')!r}"
        delays.append(reply["at"] - done["at"])
    return delays


@pytest.fixture
def children_factory() -> Iterator[Any]:
    made: list[Child] = []

    def make(n: int, setup: dict[str, Any], **kw: Any) -> list[Child]:
        children = start_children(n, setup, **kw)
        made.extend(children)
        return children

    yield make
    stop_children(made)


@pytest.mark.redis
def test_invalidate_reaches_every_process(tmp_path: Path, children_factory: Any) -> None:
    url = redis_or_skip()
    setup = _setup(tmp_path, {"redis": {"url": url}}, "redis", "redis")
    children = children_factory(4, setup)
    delays = _propagates(children, Path(setup["source"]))
    assert max(delays) < PROPAGATION_BOUND, delays
    stats = children[1].call("stats")["backplane"]
    assert stats["messages_received"] >= 1 and stats["subscribed"]


@pytest.mark.redis
@pytest.mark.parametrize("worker", ["", "joined", "terminated"])
@pytest.mark.parametrize("change", ["invalidate", "refresh", "invalidate_tag"])
def test_a_process_that_ends_right_after_a_change_still_tells_the_others(
    tmp_path: Path, children_factory: Any, change: str, worker: str
) -> None:
    """Found by review 40: a script or pool worker that invalidated (or refreshed) a key as
    its last act and ended lost the message still queued for the backplane, and the other
    processes served the old value until their local TTL (every run). What is queued now
    goes out as the process ends: at exit (a script), and at the end of a multiprocessing
    worker (which leaves through ``os._exit``, running no atexit handler). A worker that
    is then terminated (SIGTERM, as a ``with Pool()`` block does) awaited
    ``flush_backplane()`` first."""
    url = redis_or_skip()
    setup = _setup(tmp_path, {"redis": {"url": url}}, "redis", "redis")
    writer, reader = children_factory(2, setup)
    tagged = [[setup["key"], "t1"]]
    get = ("tget", {"items": tagged}) if change == "invalidate_tag" else ("get", {})
    first = reader.call(get[0], **get[1])
    assert first.get("value", first.get("values")) in (0, [0]), first  # in its local tier
    Path(setup["source"]).write_text("1")
    done = writer.call("change_then_exit", change=change, tag="t1", worker=worker)
    assert done["ok"], done
    if not worker:
        writer.proc.stdin.close()  # type: ignore[union-attr]  # its reading thread ends too
        assert writer.proc.wait(10) == 0
    time.sleep(PROPAGATION_BOUND)
    now = reader.call(get[0], **get[1])
    assert now.get("value", now.get("values")) in (1, [1]), (
        f"after the other process's {change} and exit, still serves {now!r}"
    )


@pytest.mark.redis
@pytest.mark.parametrize("channel", ["same", "other"])
def test_enabling_again_clears_what_was_missed_meanwhile(
    tmp_path: Path, children_factory: Any, channel: str
) -> None:
    """Found by a review: a process that turned its backplane off and on again kept
    serving what another process invalidated in between, until its local TTL."""
    url = redis_or_skip()
    setup = _setup(tmp_path, {"redis": {"url": url}}, "redis", "redis")
    writer, reader = children_factory(2, setup)
    assert reader.call("get")["value"] == 0  # in its local tier now
    assert writer.call("get")["value"] == 0
    assert reader.call("disable")["ok"]
    Path(setup["source"]).write_text("1")
    assert writer.call("invalidate")["ok"]  # published while the reader listens to nothing
    again = setup["channel"] if channel == "same" else unique("bp-test")
    assert reader.call("enable", channel=again)["ok"]
    reader.send("wait_for", value=1, within=2.0)
    reply = reader.recv(5)
    assert reply["ok"], f"still serves {reply.get('seen')!r} after enabling again"


@pytest.mark.redis
def test_a_kept_stale_value_is_not_served_after_another_process_invalidated(
    tmp_path: Path, children_factory: Any
) -> None:
    """Found by a review: stale-if-error served, in a process that had loaded the key, the
    value another process had just invalidated (the invalidating process itself raised)."""
    url = redis_or_skip()
    setup = _setup(tmp_path, {"redis": {"url": url}}, "redis", "redis")
    setup["stale_if_error_ms"] = 3_600_000
    loader, other = children_factory(2, setup)
    assert loader.call("get")["value"] == 0  # loaded here: kept for stale-if-error
    assert other.call("get")["value"] == 0  # from Redis
    for child in (loader, other):
        assert child.call("fail_loads", n=5)["ok"]  # the source is gone from now on
    assert other.call("invalidate")["ok"]
    time.sleep(0.3)  # the message reaches the loader (the bound is 0.2 s)
    assert "failed" in other.call("get"), "the invalidating process served a value"
    reply = loader.call("get")
    assert "failed" in reply, f"served the invalidated value {reply.get('value')!r}"


def _race(
    setup: dict[str, Any], children_factory: Any, change: str, job: str, then: str = ""
) -> None:
    """The reader's load reads the source, then takes 0.3 s; meanwhile the source changes
    and the writer runs ``change``; the reader hears of it 0.5 s late (after running
    ``then``, if given). The observer must then get the new value within 3 s; the reader
    counts a repair."""
    writer, observer = children_factory(2, setup)
    reader = children_factory(
        1, {**setup, "load_delay": 0.3, "read_first": True, "apply_delay_ms": 500}
    )[0]
    reader.send(job)  # loads 0 for 0.3 s
    loads = Path(setup["loads"])
    assert wait_until(lambda: loads.exists() and "start" in loads.read_text(), 5)
    Path(setup["source"]).write_text("1")
    assert writer.call(change)["ok"]  # before the reader's write lands
    assert reader.recv(5)["value"] == 0  # its own caller gets what it loaded
    if then:
        assert reader.call(then)["ok"]
    observer.send("wait_for", value=1, within=3.0)
    reply = observer.recv(6)
    assert reply["ok"], f"the older value stayed in the shared tier: {reply.get('seen')!r}"
    stats = reader.call("stats")["backplane"]
    assert stats["repairs"] >= 1, stats


@pytest.mark.redis
@pytest.mark.parametrize("change", ["invalidate", "refresh"])
@pytest.mark.parametrize("job", ["get", "get_in_new_loop"])
def test_an_older_value_written_after_another_processs_change_is_removed_again(
    tmp_path: Path, children_factory: Any, change: str, job: str
) -> None:
    """The cache-aside race across processes: the reader's load began before the source
    changed, and its write-back reached Redis after the writer's removal (or refreshed
    value) and before the reader heard of the change. The reader removes the key again
    once the message arrives, so nobody is served the older value after that (it stayed in
    Redis until its TTL). Also when the reader's loop has ended by then (``asyncio.run``
    per job: found by a review)."""
    url = redis_or_skip()
    _race(
        _setup(tmp_path, {"redis": {"url": url}}, "redis", "redis"), children_factory, change, job
    )


@pytest.mark.redis
def test_the_race_is_repaired_after_the_storage_is_registered_again(
    tmp_path: Path, children_factory: Any
) -> None:
    """The reader registers its storages again (as at a configuration reload) between its
    write and the message: the repair goes through the storage registered now under that
    name and URL (it failed, unlogged, on the closed one: found by a review)."""
    url = redis_or_skip()
    setup = _setup(tmp_path, {"redis": {"url": url}}, "redis", "redis")
    _race(setup, children_factory, "invalidate", "get", then="reregister")


@pytest.mark.postgres
@pytest.mark.parametrize("change", ["invalidate", "refresh"])
async def test_the_race_is_repaired_on_a_postgres_shared_tier(
    tmp_path: Path, children_factory: Any, change: str
) -> None:
    """The same race with a ``[local, postgres]`` chain and a Redis backplane."""
    url = redis_or_skip()
    async with sql_table("postgres", tmp_path) as table:
        storages = {"pg": {"url": table.url, "table": table.table}, "redis": {"url": url}}
        setup = _setup(tmp_path, storages, "pg", "redis")
        await asyncio.to_thread(_race, setup, children_factory, change, "get_in_new_loop")


@pytest.mark.redis
def test_a_refresh_is_not_undone_for_a_write_that_landed_before_it(
    tmp_path: Path, children_factory: Any
) -> None:
    """A write of the key that reached Redis before the refresh wrote is overwritten by the
    refresh: nothing to repair (a review found refreshes undone, and loaded again by every
    process, when another process had written the key up to 250 ms before)."""
    url = redis_or_skip()
    setup = _setup(tmp_path, {"redis": {"url": url}}, "redis", "redis")
    writer, reader = children_factory(2, setup)
    for _ in range(5):
        assert reader.call("invalidate")["ok"]
        assert reader.call("get")["value"] is not None  # loaded, written to Redis
        time.sleep(0.02)  # nothing in flight now
        assert writer.call("refresh")["ok"]
        # Let the message arrive before the reader writes the key again: a write that
        # lands after the refresh's is removed again, by design.
        time.sleep(0.1)
    stats = reader.call("stats")["backplane"]
    assert stats["repairs"] == 0, stats


@pytest.mark.redis_cluster
def test_invalidate_reaches_every_process_on_a_cluster(
    tmp_path: Path, children_factory: Any
) -> None:
    url = redis_or_skip(cluster=True)
    setup = _setup(tmp_path, {"cluster": {"url": url, "cluster": True}}, "cluster", "cluster")
    children = children_factory(4, setup)
    delays = _propagates(children, Path(setup["source"]))
    assert max(delays) < PROPAGATION_BOUND, delays


@pytest.mark.postgres
async def test_local_postgres_chain_with_a_redis_backplane(
    tmp_path: Path, children_factory: Any
) -> None:
    url = redis_or_skip()
    async with sql_table("postgres", tmp_path) as table:
        storages = {
            "pg": {"url": table.url, "table": table.table},
            "redis": {"url": url},
        }
        setup = _setup(tmp_path, storages, "pg", "redis")
        children = await asyncio.to_thread(children_factory, 4, setup)
        delays = await asyncio.to_thread(_propagates, children, Path(setup["source"]))
    assert max(delays) < PROPAGATION_BOUND, delays


@pytest.mark.redis
def test_no_stale_value_after_the_redis_server_restarts(
    tmp_path: Path, children_factory: Any
) -> None:
    """Kill the backplane's Redis, invalidate meanwhile, restart it: every process that
    reconnected serves the new value (its local tier was cleared on reconnect)."""
    with PrivateRedis() as server:
        setup = _setup(tmp_path, {"private": {"url": server.url}}, "private", "private")
        children = children_factory(4, setup)
        source = Path(setup["source"])
        for child in children:
            assert child.call("get")["value"] == 0
        # Each load's write-back was published and dropped the others' copies: let those
        # messages land, then fill every local tier again (from Redis: nothing published).
        time.sleep(0.1)
        for child in children:
            assert child.call("get")["value"] == 0
        server.kill()
        source.write_text("1")
        # The shared tier is down: invalidate reports it, but the local tier is dropped.
        assert children[0].call("invalidate", timeout=15)["ok"] is False
        # Meanwhile, the others still serve their local value: that staleness is what the
        # reconnect bounds (and the local TTL, whichever comes first).
        assert children[1].call("get")["value"] == 0
        server.start()

        def reconnected(child: Child) -> bool:
            stats = child.call("stats")["backplane"]
            return bool(stats["reconnects"] >= 1 and stats["subscribed"])

        for child in children:
            assert wait_until(lambda c=child: reconnected(c), 5, 0.05), child.pid
        for child in children:
            assert child.call("get")["value"] == 1, child.pid


@pytest.mark.redis
def test_invalidate_tag_reaches_every_process(tmp_path: Path, children_factory: Any) -> None:
    """[local, redis] tagged nodes in 4 processes with the backplane: one invalidates a tag;
    within the bound no other process serves an entry of it from its local tier (nor from
    Redis), and every entry of the other tag stays a local hit."""
    url = redis_or_skip()
    setup = _setup(tmp_path, {"redis": {"url": url}}, "redis", "redis")
    children = children_factory(4, setup)
    source = Path(setup["source"])
    name = setup["key"]
    items_a = [[f"{name}:a:{i}", "tag-a"] for i in range(20)]
    items_b = [[f"{name}:b:{i}", "tag-b"] for i in range(20)]
    both = items_a + items_b
    # Fill every local tier. Each load's write-back is published and drops the others'
    # copies, and concurrent first writers of a tag key leave one version (the others'
    # entries reload once): repeat until a round loads nothing, then every tier holds all.
    seen_loads = dict.fromkeys((c.pid for c in children), -1)
    for _ in range(10):
        time.sleep(0.1)
        settled = True
        for child in children:
            reply = child.call("tget", items=both)
            assert reply["values"] == [0] * 40
            loads = sum(reply["loads"].values())
            settled = settled and loads == seen_loads[child.pid]
            seen_loads[child.pid] = loads
        if settled:
            break
    else:
        pytest.fail("the local tiers never settled")
    time.sleep(0.1)
    hits = {}
    for child in children:
        reply = child.call("tget", items=both)
        hits[child.pid] = reply["local_hits"]
        reply = child.call("tget", items=both)
        assert reply["local_hits"] - hits[child.pid] == 40, child.pid  # all local hits
        hits[child.pid] = reply["local_hits"]
    loads_b = {c.pid: c.call("tget", items=[])["loads"].get("tag-b", 0) for c in children}

    source.write_text("1")
    done = children[0].call("invalidate_tag", tag="tag-a")
    assert done["ok"]
    for child in children[1:]:
        child.send("twait", items=items_a, value=1, within=2.0)
    delays = []
    for child in children[1:]:
        reply = child.recv(5)
        assert reply["ok"], f"process {child.pid} still serves {reply.get('seen')!r}"
        delays.append(reply["at"] - done["at"])
    assert max(delays) < PROPAGATION_BOUND, delays
    for child in children:
        before = child.call("tget", items=[])["local_hits"]
        reply = child.call("tget", items=items_b)
        assert reply["values"] == [0] * 20, child.pid  # never reloaded: the old value
        assert reply["local_hits"] - before == 20, child.pid
        assert reply["loads"].get("tag-b", 0) == loads_b[child.pid], child.pid
        assert child.call("tget", items=items_a)["values"] == [1] * 20


# -- in this process ----------------------------------------------------------------------


@pytest.fixture
async def registered(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A local storage and the shared Redis, registered; everything torn down after."""
    url = redis_or_skip()
    await cacheme.register_storage("local", cacheme.Storage(url="local://lru", size=100))
    await cacheme.register_storage("redis", cacheme.Storage(url=url, timeout=0.5))
    try:
        yield url
    finally:
        await backplane.disable_backplane()
        await cacheme.close_storages()


def _local() -> Any:
    return cacheme.storages()["local"]


def _has(storage: Any, key: str) -> bool:
    return storage.get(key) is not MISS


@pytest.mark.redis
async def test_enable_names_the_storage_when_it_is_not_redis(registered: str) -> None:
    with pytest.raises(ConfigurationError, match="'nope'"):
        await backplane.enable_backplane("nope")
    with pytest.raises(ConfigurationError, match=r"'local'.*not a Redis storage"):
        await backplane.enable_backplane("local")
    assert not backplane.stats().enabled


@pytest.mark.redis
async def test_a_process_ignores_its_own_messages_and_applies_others(registered: str) -> None:
    channel = unique("bp-own")
    await backplane.enable_backplane("redis", channel=channel)
    assert backplane.stats().subscribed
    local = _local()
    local.set("k1", 1, 60.0)
    before = backplane.stats()
    backplane.publish(["k1"])
    assert await asyncio.to_thread(
        wait_until, lambda: backplane.stats().own_ignored > before.own_ignored, 2
    )
    assert _has(local, "k1")  # its own message did not drop it
    # The same key from another instance is dropped.
    client = redis.Redis.from_url(registered)
    client.publish(channel, "1|someone-else|k|" + json.dumps(["k1"]))
    client.close()
    assert await asyncio.to_thread(
        wait_until, lambda: backplane.stats().messages_received > before.messages_received, 2
    )
    assert not _has(local, "k1")


async def test_publish_with_the_redis_down_never_blocks_or_raises() -> None:
    with PrivateRedis() as server:
        await cacheme.register_storage("local", cacheme.Storage(url="local://lru", size=100))
        await cacheme.register_storage("bp", cacheme.Storage(url=server.url, timeout=0.5))
        try:
            await backplane.enable_backplane("bp", channel=unique("bp-down"))
            server.kill()
            before = backplane.stats().publish_failures
            start = time.perf_counter()
            for i in range(10_000):
                backplane.publish([f"key:{i}"])
            elapsed = time.perf_counter() - start
            assert elapsed < 0.5, f"10,000 publishes took {elapsed:.3f}s"
            assert await asyncio.to_thread(
                wait_until, lambda: backplane.stats().publish_failures > before, 5
            )
            # The subscriber thread notices the dead server on its own schedule.
            assert await asyncio.to_thread(wait_until, lambda: not backplane.stats().subscribed, 5)
            # disable returns (the publisher gives up on the dead server) in bounded time.
            start = time.perf_counter()
            await backplane.disable_backplane()
            assert time.perf_counter() - start < 5
        finally:
            await backplane.disable_backplane()
            await cacheme.close_storages()


@pytest.mark.redis
async def test_a_forked_child_gets_a_new_id_and_subscribes(registered: str) -> None:
    await backplane.enable_backplane("redis", channel=unique("bp-fork"))
    parent_id = backplane.stats().instance_id
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave at once
        try:
            ok = wait_until(lambda: backplane.stats().subscribed, 5)
            stats = backplane.stats()
            os.write(write, json.dumps([ok, stats.instance_id, stats.reconnects]).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        data = await asyncio.to_thread(os.read, read, 1000)
    finally:
        os.close(read)
        await asyncio.to_thread(os.waitpid, pid, 0)
    subscribed, child_id, reconnects = json.loads(data)
    assert subscribed and child_id != parent_id
    assert reconnects == 1  # its inherited local tiers were cleared once subscribed
