"""Singleflight: one load per burst, errors and cancellation fan out, nothing leaks."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

import cacheme
from cacheme import Cache, Node, Storage, runtime

from .helpers import Counter, settle, stored


@pytest.fixture(autouse=True)
async def _local() -> AsyncIterator[None]:
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=10_000))
    yield


@dataclass
class Key(Node):
    name: str

    def key(self) -> str:
        return f"flight:{self.name}"

    class Meta(Node.Meta):
        version = "v1"
        caches = [Cache(storage="local")]


class Boom(Exception):
    pass


async def test_concurrent_gets_load_once() -> None:
    gate = asyncio.Event()
    load = Counter("v", gate)
    tasks = [asyncio.ensure_future(cacheme.get(Key("a"), load_fn=load)) for _ in range(100)]
    await settle()
    assert len(runtime.current().flights) == 1
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 2) == ["v"] * 100
    assert load.calls == 1
    assert len(runtime.current().flights) == 0


async def test_concurrent_gets_of_node_load_once() -> None:
    calls = 0

    class Slow(Node):
        def key(self) -> str:
            return "slow"

        async def load(self) -> int:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            return calls

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    results = await asyncio.gather(*(cacheme.get(Slow()) for _ in range(100)))
    assert results == [1] * 100
    assert calls == 1


async def test_load_error_reaches_every_waiter_and_is_not_cached() -> None:
    gate = asyncio.Event()
    calls = 0

    async def failing(_node: object) -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise Boom(f"load {calls}")

    tasks = [asyncio.ensure_future(cacheme.get(Key("b"), load_fn=failing)) for _ in range(100)]
    await settle()
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
    assert all(isinstance(r, Boom) and str(r) == "load 1" for r in results)
    assert calls == 1
    assert len(runtime.current().flights) == 0
    assert stored("local", "cacheme:flight:b:v1") == (None, False)

    with pytest.raises(Boom, match="load 2"):
        await asyncio.wait_for(cacheme.get(Key("b"), load_fn=failing), 2)
    assert calls == 2
    assert await cacheme.get(Key("b"), load_fn=Counter("ok")) == "ok"


class Abort(BaseException):
    """Not an ``Exception``: what a framework's own abort signal may be."""


async def test_a_base_exception_from_load_reaches_the_callers_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every caller of ``get``, ``get_all`` and ``refresh`` gets it; the load's task does not
    end with it too (asyncio logged "Task exception was never retrieved" for it)."""

    async def load(node: Key) -> str:
        await asyncio.sleep(0)
        raise Abort(node.name)

    results = await asyncio.gather(
        *(cacheme.get(Key("b"), load_fn=load) for _ in range(3)), return_exceptions=True
    )
    assert [type(r) for r in results] == [Abort] * 3

    class Batch(Key):
        async def load(self) -> str:
            return await load(self)

    for call in (cacheme.get_all([Batch("c"), Batch("d")]), cacheme.refresh(Batch("e"))):
        with pytest.raises(Abort):
            await call
    await settle()
    gc.collect()
    await settle()
    assert "never retrieved" not in caplog.text
    assert len(runtime.current().flights) == 0
    assert await cacheme.get(Key("b"), load_fn=Counter("v")) == "v"  # not cached, key free


async def test_cancelling_the_first_caller_does_not_cancel_the_load() -> None:
    gate = asyncio.Event()
    finished = False

    async def load(_node: object) -> str:
        nonlocal finished
        await gate.wait()
        finished = True
        return "v"

    first = asyncio.ensure_future(cacheme.get(Key("c"), load_fn=load))
    await settle()
    others = [asyncio.ensure_future(cacheme.get(Key("c"), load_fn=load)) for _ in range(10)]
    await settle()
    first.cancel()
    await settle()
    assert first.cancelled()
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*others), 2) == ["v"] * 10
    assert finished
    assert stored("local", "cacheme:flight:c:v1") == ("v", True)


async def test_cancelling_every_caller_still_finishes_and_stores_the_load() -> None:
    gate = asyncio.Event()
    load = Counter("v", gate)
    tasks = [asyncio.ensure_future(cacheme.get(Key("d"), load_fn=load)) for _ in range(5)]
    await settle()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*runtime.current().tasks), 2)
    assert len(runtime.current().flights) == 0
    assert stored("local", "cacheme:flight:d:v1") == ("v", True)
    assert await cacheme.get(Key("d"), load_fn=load) == "v"
    assert load.calls == 1


async def test_a_cancelled_load_fails_its_waiters_and_frees_the_key() -> None:
    async def cancelled(_node: object) -> str:
        raise asyncio.CancelledError

    tasks = [asyncio.ensure_future(cacheme.get(Key("e"), load_fn=cancelled)) for _ in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
    assert all(isinstance(r, BaseException) for r in results)
    assert len(runtime.current().flights) == 0
    assert await cacheme.get(Key("e"), load_fn=Counter("after")) == "after"


async def test_no_entry_leaks_after_many_mixed_gets() -> None:
    rng = random.Random(1234)
    loads = 0

    async def load_for(name: str) -> str:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0)
        if name.startswith("fail"):
            raise Boom(name)
        return name

    names = [f"ok{i}" for i in range(30)] + [f"fail{i}" for i in range(30)]

    async def one(name: str) -> str:
        return await cacheme.get(Key(name), load_fn=lambda _node: load_for(name))  # type: ignore[no-any-return]

    tasks = []
    for i in range(10_000):
        task = asyncio.ensure_future(one(rng.choice(names)))
        tasks.append(task)
        if i % 7 == 0:
            task.get_loop().call_soon(task.cancel)
        if i % 500 == 0:
            await asyncio.sleep(0)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
    outcomes = {type(r).__name__ for r in results}
    assert outcomes <= {"str", "Boom", "CancelledError"}
    assert {"str", "Boom", "CancelledError"} <= outcomes
    await asyncio.wait_for(asyncio.gather(*runtime.current().tasks), 5)
    assert len(runtime.current().flights) == 0
    assert not runtime.current().tasks
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert 0 < loads < 10_000


async def test_invalidate_during_a_flight_is_not_undone() -> None:
    gate = asyncio.Event()
    load = Counter("late", gate)
    tasks = [asyncio.ensure_future(cacheme.get(Key("f"), load_fn=load)) for _ in range(10)]
    await settle()
    assert load.calls == 1
    await cacheme.invalidate(Key("f"))
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 2) == ["late"] * 10
    assert stored("local", "cacheme:flight:f:v1") == (None, False)
    assert len(runtime.current().flights) == 0


async def test_get_after_invalidate_starts_a_new_flight() -> None:
    gate = asyncio.Event()
    old = Counter("old", gate)
    first = asyncio.ensure_future(cacheme.get(Key("g"), load_fn=old))
    await settle()
    await cacheme.invalidate(Key("g"))
    new = Counter("new")
    assert await asyncio.wait_for(cacheme.get(Key("g"), load_fn=new), 2) == "new"
    assert new.calls == 1
    gate.set()
    assert await first == "old"
    assert stored("local", "cacheme:flight:g:v1") == ("new", True)


async def test_waiters_get_the_same_object() -> None:
    gate = asyncio.Event()
    value: list[int] = []
    tasks = [
        asyncio.ensure_future(cacheme.get(Key("h"), load_fn=Counter(value, gate))) for _ in range(3)
    ]
    await settle()
    gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r is value for r in results)
