"""The storage contract, run against every remote backend on its real server."""

from __future__ import annotations

import asyncio
import gc
import math
from typing import Any

import pytest

from cacheme.storages.base import Entry, RemoteStorage

Remote = RemoteStorage[Any]


async def test_get_missing(remote: Remote) -> None:
    assert await remote.get("cacheme:missing:v1") is None
    assert await remote.get_many(["cacheme:a:v1", "cacheme:b:v1"]) == {}


async def test_set_without_ttl_then_get(remote: Remote) -> None:
    await remote.set_many([Entry("cacheme:k:v1", b"value", None)])
    assert await remote.get("cacheme:k:v1") == b"value"


async def test_overwrite(remote: Remote) -> None:
    await remote.set_many([Entry("cacheme:k:v1", b"one", None)])
    await remote.set_many([Entry("cacheme:k:v1", b"two", 60_000)])
    assert await remote.get("cacheme:k:v1") == b"two"


async def test_ttl_expires(remote: Remote) -> None:
    await remote.set_many(
        [Entry("cacheme:short:v1", b"x", 150), Entry("cacheme:long:v1", b"y", 60_000)]
    )
    assert await remote.get("cacheme:short:v1") == b"x"
    await asyncio.sleep(0.4)
    assert await remote.get("cacheme:short:v1") is None
    assert await remote.get_many(["cacheme:short:v1", "cacheme:long:v1"]) == {
        "cacheme:long:v1": b"y"
    }


async def test_remaining_ttl(remote: Remote) -> None:
    """Every backend reports what is left of an entry's lifetime, in one round trip."""
    await remote.set_many(
        [Entry("cacheme:ttl:v1", b"x", 60_000), Entry("cacheme:forever:v1", b"y", None)]
    )
    trips = remote.stats.round_trips
    left = await remote.remaining_ttl(["cacheme:ttl:v1", "cacheme:forever:v1", "cacheme:no:v1"])
    assert remote.stats.round_trips == trips + 1
    assert set(left) == {"cacheme:ttl:v1", "cacheme:forever:v1"}
    assert 55 < left["cacheme:ttl:v1"] <= 60
    assert left["cacheme:forever:v1"] == math.inf


async def test_get_many_set_many(remote: Remote) -> None:
    entries = [Entry(f"cacheme:batch:{i}:v1", f"value-{i}".encode(), None) for i in range(100)]
    await remote.set_many(entries)
    keys = [e.key for e in entries] + ["cacheme:absent:v1"]
    found = await remote.get_many(keys)
    assert found == {e.key: e.value for e in entries}


async def test_remove(remote: Remote) -> None:
    await remote.set_many([Entry("cacheme:a:v1", b"1", None), Entry("cacheme:b:v1", b"2", None)])
    await remote.remove_many(["cacheme:a:v1", "cacheme:never:v1"])
    assert await remote.get_many(["cacheme:a:v1", "cacheme:b:v1"]) == {"cacheme:b:v1": b"2"}


async def test_binary_values(remote: Remote) -> None:
    value = bytes(range(256)) + b"\x00\x00\xff\xff" + b"\x00"
    await remote.set_many([Entry("cacheme:bin:v1", value, None)])
    assert await remote.get("cacheme:bin:v1") == value


async def test_empty_value(remote: Remote) -> None:
    await remote.set_many([Entry("cacheme:empty:v1", b"", None)])
    assert await remote.get_many(["cacheme:empty:v1"]) == {"cacheme:empty:v1": b""}


async def test_one_mebibyte_value(remote: Remote) -> None:
    value = (bytes(range(256)) * 4096)[: 1 << 20]
    await remote.set_many([Entry("cacheme:big:v1", value, None)])
    assert await remote.get("cacheme:big:v1") == value


async def test_unicode_keys(remote: Remote) -> None:
    keys = [
        "cacheme:用户:1:v1",
        "cacheme:ключ:v1",
        "cacheme:emoji-🙂:v1",
        "cacheme:Case:v1",
        "cacheme:case:v1",
    ]
    await remote.set_many([Entry(k, k.encode(), None) for k in keys])
    assert await remote.get_many(keys) == {k: k.encode() for k in keys}


async def test_long_keys_stay_distinct(remote: Remote) -> None:
    base = "cacheme:" + "x" * 2000
    keys = [f"{base}:{i}:v1" for i in range(3)]
    await remote.set_many([Entry(k, str(i).encode(), None) for i, k in enumerate(keys)])
    assert await remote.get_many(keys) == {k: str(i).encode() for i, k in enumerate(keys)}
    await remote.remove_many([keys[1]])
    assert await remote.get_many(keys) == {keys[0]: b"0", keys[2]: b"2"}


async def test_500_concurrent_tasks(remote: Remote) -> None:
    async def one(i: int) -> bytes | None:
        key = f"cacheme:conc:{i % 50}:v1"
        if i % 3 == 0:
            await remote.set_many([Entry(key, key.encode(), 60_000)])
        return await remote.get(key)

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(500))), 60)
    for i, value in enumerate(results):
        key = f"cacheme:conc:{i % 50}:v1"
        assert value in (None, key.encode())
        if i % 3 == 0:
            assert value == key.encode()


async def test_coalesced_batch_is_one_round_trip(remote: Remote) -> None:
    entries = [Entry(f"cacheme:co:{i}:v1", b"v", None) for i in range(20)]
    before = remote.stats.round_trips
    await asyncio.gather(*(remote.set_many([e]) for e in entries))
    assert remote.stats.round_trips == before + 1
    before = remote.stats.round_trips
    values = await asyncio.gather(*(remote.get(e.key) for e in entries))
    assert values == [b"v"] * 20
    assert remote.stats.round_trips == before + 1


async def test_close_fails_pending_operations_and_is_idempotent(remote: Remote) -> None:
    from cacheme.errors import StorageError

    reads = [asyncio.ensure_future(remote.get(f"cacheme:closing:{i}:v1")) for i in range(10)]
    writes = [
        asyncio.ensure_future(remote.set_many([Entry(f"cacheme:closing:{i}:v1", b"v", None)]))
        for i in range(10)
    ]
    await asyncio.sleep(0)  # queued, flush scheduled but not run
    await asyncio.wait_for(remote.close(), 10)
    outcomes = await asyncio.wait_for(asyncio.gather(*reads, *writes, return_exceptions=True), 10)
    for outcome in outcomes:
        assert outcome is None or isinstance(outcome, (StorageError, dict, bytes)), outcome
    try:
        await remote.get("cacheme:after-close:v1")
    except StorageError as exc:
        assert "closed" in str(exc)
    await remote.close()  # a second close is harmless


async def test_close_in_the_turn_of_a_sealed_batch_leaves_nothing_behind(
    remote: Remote, recwarn: pytest.WarningsRecorder
) -> None:
    """``set; remove; set`` of one key in one turn (the second write seals the first two
    into a batch of their own, see ``_seal_turn``), then ``close`` in that same turn: every
    caller gets the closed-storage error, nothing reaches the server, and no task, ordering
    entry or coroutine is left over (a sealed batch registers its writes at once)."""
    from cacheme.errors import StorageError

    key = "cacheme:close-sealed:v1"
    await remote.set_many([Entry(key, b"old", None)])
    driver = remote.here()
    ops = [
        remote.set_many([Entry(key, b"a", None)]),
        remote.remove_many([key]),
        remote.set_many([Entry(key, b"b", None)]),
    ]
    await remote.close()  # in this turn: nothing of the three has started
    outcomes = await asyncio.wait_for(asyncio.gather(*ops, return_exceptions=True), 10)
    assert all(isinstance(o, StorageError) and "closed" in str(o) for o in outcomes), outcomes
    await asyncio.sleep(0.05)  # anything left over would run (or complain) by now
    assert driver._key_writes == {}
    assert not driver._tasks
    assert not driver._connected  # nothing connected again after close
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
    fresh = type(remote)(remote.name, remote.url, remote.options)
    try:
        assert await fresh.get(key) == b"old"  # nothing was sent after close
    finally:
        await fresh.close()


async def test_writes_land_in_issue_order(remote: Remote) -> None:
    """A write issued after another (next loop turn) of the same key is the one that stays."""
    for i in range(30):
        key = f"cacheme:order:{i}:v1"
        first = asyncio.ensure_future(remote.set_many([Entry(key, b"old", None)]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        second = asyncio.ensure_future(remote.set_many([Entry(key, b"new", None)]))
        removal = asyncio.ensure_future(remote.remove_many([f"{key}:gone"]))
        await asyncio.gather(first, second, removal)
        assert await remote.get(key) == b"new"


async def test_remove_waits_for_an_earlier_write(remote: Remote) -> None:
    for i in range(30):
        key = f"cacheme:rm-order:{i}:v1"
        write = asyncio.ensure_future(remote.set_many([Entry(key, b"v", None)]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await remote.remove_many([key])
        await write
        assert await remote.get(key) is None


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesce", "no-coalesce"])
async def test_operations_of_one_turn_land_in_issue_order(remote: Remote, coalesce: bool) -> None:
    """Writes, adds and removals issued in one event-loop turn (one coalesced batch, or
    each its own round trip) leave each key as issuing them one after another would: a
    write or an add issued after a removal of its key is not undone by that removal, and a
    removal after them removes."""
    if coalesce:
        await _one_turn_in_issue_order(remote, "c")
        return
    options = remote.options.model_copy(update={"coalesce": False})
    alone = type(remote)(remote.name, remote.url, options)
    try:
        await _one_turn_in_issue_order(alone, "n")
    finally:
        await alone.close()


async def _one_turn_in_issue_order(remote: Remote, tag: str) -> None:
    cases: dict[str, tuple[list[tuple[str, bytes | None]], bytes | None]] = {
        "remove-set": ([("remove", None), ("set", b"new")], b"new"),
        "remove-add": ([("remove", None), ("add", b"added")], b"added"),
        "set-remove": ([("set", b"new"), ("remove", None)], None),
        "add-remove": ([("add", b"added"), ("remove", None)], None),
        "set-remove-set": ([("set", b"one"), ("remove", None), ("set", b"two")], b"two"),
        "remove-set-remove": ([("remove", None), ("set", b"new"), ("remove", None)], None),
        "set-remove-add": ([("set", b"one"), ("remove", None), ("add", b"added")], b"added"),
        "remove-add-set": ([("remove", None), ("add", b"added"), ("set", b"set")], b"set"),
    }
    for present in (False, True):
        keys = {name: f"cacheme:turn:{tag}:{name}:{present}:v1" for name in cases}
        if present:
            await remote.set_many([Entry(key, b"before", None) for key in keys.values()])
        ops: list[Any] = []
        for name, (steps, _) in cases.items():  # every case's steps, in one turn
            key = keys[name]
            for op, value in steps:
                if op == "remove":
                    ops.append(remote.remove_many([key]))
                elif op == "set":
                    ops.append(remote.set_many([Entry(key, value or b"", None)]))
                else:
                    ops.append(remote.add_many([Entry(key, value or b"", None)]))
        await asyncio.gather(*ops)
        found = await remote.get_many(list(keys.values()))
        got = {name: found.get(key) for name, key in keys.items()}
        assert got == {name: want for name, (_, want) in cases.items()}, f"present={present}"
    # An add of several keys after a removal of one of them stays an add for all of them
    # (a present key keeps its value), and a second add of the removed key does not win.
    a, b = f"cacheme:turn:{tag}:multi-a:v1", f"cacheme:turn:{tag}:multi-b:v1"
    await remote.set_many([Entry(b, b"present", None)])
    await asyncio.gather(
        remote.remove_many([a]),
        remote.add_many([Entry(a, b"first", None), Entry(b, b"added", None)]),
        remote.add_many([Entry(a, b"second", None)]),
    )
    assert await remote.get_many([a, b]) == {a: b"first", b: b"present"}


async def test_add_many_only_when_absent(remote: Remote) -> None:
    """``add_many`` stores a key only if it is absent or expired, one round trip a batch."""
    await remote.set_many(
        [Entry("cacheme:add:live:v1", b"kept", 60_000), Entry("cacheme:add:old:v1", b"old", 100)]
    )
    await remote.set_many([Entry("cacheme:add:forever:v1", b"kept", None)])
    await asyncio.sleep(0.3)  # cacheme:add:old:v1 has expired (maybe still stored)
    trips = remote.stats.round_trips
    await asyncio.gather(
        remote.add_many([Entry("cacheme:add:live:v1", b"new", 60_000)]),
        remote.add_many([Entry("cacheme:add:forever:v1", b"new", 60_000)]),
        remote.add_many([Entry("cacheme:add:old:v1", b"new", 60_000)]),
        remote.add_many([Entry("cacheme:add:absent:v1", b"new", None)]),
    )
    assert remote.stats.round_trips == trips + 1
    keys = ["live", "forever", "old", "absent"]
    found = await remote.get_many([f"cacheme:add:{k}:v1" for k in keys])
    assert found == {
        "cacheme:add:live:v1": b"kept",
        "cacheme:add:forever:v1": b"kept",
        "cacheme:add:old:v1": b"new",
        "cacheme:add:absent:v1": b"new",
    }
    # The new entries carry their own TTLs: the re-added expired key lives again.
    left = await remote.remaining_ttl(["cacheme:add:old:v1", "cacheme:add:absent:v1"])
    assert 55 < left["cacheme:add:old:v1"] <= 60
    assert left["cacheme:add:absent:v1"] == math.inf
    # A batch of several keys, some present; the first add of a key in a batch wins.
    many = [Entry(f"cacheme:add:many:{i}:v1", b"first", 60_000) for i in range(10)]
    await remote.set_many(many[:5])
    await asyncio.gather(
        remote.add_many([Entry(e.key, b"added", 60_000) for e in many]),
        remote.add_many([Entry(e.key, b"second", 60_000) for e in many]),
    )
    assert await remote.get_many([e.key for e in many]) == {
        e.key: b"first" if i < 5 else b"added" for i, e in enumerate(many)
    }
    # A plain write issued in the same turn as an add of the same key lands first.
    await asyncio.gather(
        remote.add_many([Entry("cacheme:add:race:v1", b"added", 60_000)]),
        remote.set_many([Entry("cacheme:add:race:v1", b"set", 60_000)]),
    )
    assert await remote.get("cacheme:add:race:v1") == b"set"


async def test_add_many_concurrent_writers_keep_one_value(remote: Remote) -> None:
    """Concurrent adds of one absent key from several connections: exactly one value stays,
    and every adder sees the same one."""
    others: list[Remote] = []
    try:
        for _ in range(3):
            others.append(type(remote)(remote.name, remote.url, remote.options))
        for round_ in range(5):
            key = f"cacheme:add:contended:{round_}:v1"
            await asyncio.gather(
                *(
                    s.add_many([Entry(key, f"writer-{i}".encode(), 60_000)])
                    for i, s in enumerate([remote, *others])
                )
            )
            values = {await s.get(key) for s in [remote, *others]}
            assert len(values) == 1 and values != {None}, values
    finally:
        for other in others:
            await other.close()
