"""Loads that get other keys: a cycle fails with ``LoadError`` instead of hanging, and what
is not a cycle is never refused (review 44 found both kinds when a load ran in the context
of whatever task delivered its read: another caller's batch).

The remote tier is SQLite (embedded, no server): its reads are delivered by a batch task of
the storage, shared by the callers of one event-loop turn."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import cacheme
from cacheme import Cache, LoadError, Node, Storage, schemas
from cacheme.serializer import MsgPackSerializer

# The remote tier is SQLite: its driver is optional (scripts/minimal leaves it out).
pytestmark = pytest.mark.needs_dev


@pytest.fixture(autouse=True)
async def _sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cycles.db"
    await schemas.create(url)
    await cacheme.register_storage("sqlite", Storage(url=url))
    await cacheme.register_storage("local", Storage(url="local://lru", size=100))


class Base(Node):
    _cacheme_abstract = True

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def key(self) -> str:
        return f"{type(self).__name__.lower()}:{self.n}"

    class Meta(Node.Meta):
        caches = [Cache(storage="sqlite", ttl=None)]
        serializer = MsgPackSerializer()


def outside(coro: Any) -> asyncio.Future[Any]:
    """A caller that has nothing to do with the running code (an empty context)."""
    return contextvars.Context().run(asyncio.ensure_future, coro)


async def test_a_cycle_through_get_all_fails() -> None:
    """A's load gets B(1) and B(2) in one get_all; B's load gets A. Another caller reads in
    the same turn, so the batch task that delivers the reads is not A's: A's load hung."""

    class A(Base):
        async def load(self) -> int:
            # Two outside callers: the first reads at once, the second starts a batch that
            # the reads of this get_all join in the same turn.
            others = [outside(cacheme.get(Other(i))) for i in (5, 6)]
            await asyncio.sleep(0)
            values = await cacheme.get_all([B(1), B(2)])
            await asyncio.gather(*others)
            return sum(values)

    class B(Base):
        async def load(self) -> int:
            return await cacheme.get(A()) + 1

    class Other(Base):
        async def load(self) -> int:
            return self.n

    with pytest.raises(LoadError, match="would"):
        await asyncio.wait_for(cacheme.get(A()), 3)


async def test_a_load_that_waits_for_no_cycle_is_not_refused() -> None:
    """X's load gets Y(1) and Y(2); in the same turn an unrelated caller gets B, whose load
    gets X. X never waits for B: B's caller gets its value (it got ``LoadError``, since
    B's load ran in the context of X's read batch)."""
    started: list[asyncio.Future[Any]] = []

    class Y(Base):
        async def load(self) -> int:
            return self.n

    class X(Base):
        async def load(self) -> str:
            gets = asyncio.gather(cacheme.get(Y(1)), cacheme.get(Y(2)))
            started.append(outside(cacheme.get(B())))
            await gets
            await asyncio.sleep(0.05)
            return "x"

    class B(Base):
        async def load(self) -> str:
            return "b+" + await cacheme.get(X())

    assert await asyncio.wait_for(cacheme.get(X()), 3) == "x"
    assert await asyncio.wait_for(started[0], 3) == "b+x"


async def test_a_background_reload_a_load_triggered_is_not_part_of_it() -> None:
    """X's load gets B, whose entry is due for refresh-ahead: B's background reload gets X.
    X does not wait for that reload: it must not fail as a cycle (it did, as it inherited
    X's load)."""
    loads: list[int] = []

    class B(Base):
        async def load(self) -> str:
            loads.append(1)
            if len(loads) == 1:
                return "b1"
            return "b2+" + await cacheme.get(X())

        class Meta(Node.Meta):
            caches = [Cache(storage="local", ttl=None)]
            refresh_after = timedelta(milliseconds=20)

    class X(Base):
        async def load(self) -> str:
            await cacheme.get(B())
            await asyncio.sleep(0.05)
            return "x"

        class Meta(Node.Meta):
            caches = [Cache(storage="local", ttl=None)]

    assert await cacheme.get(B()) == "b1"
    await asyncio.sleep(0.03)  # due for refresh-ahead
    assert await asyncio.wait_for(cacheme.get(X()), 3) == "x"
    for _ in range(100):
        if cacheme.stats(B).refresh_count() >= 1:
            break
        await asyncio.sleep(0.01)
    assert cacheme.stats(B).refresh_failure_count() == 0
    assert await cacheme.get(B()) == "b2+x"


async def test_a_diamond_is_not_a_cycle() -> None:
    """A gets B and C, both get D: no key waits for itself."""

    class D(Base):
        async def load(self) -> int:
            await asyncio.sleep(0.01)
            return 1

    class B(Base):
        async def load(self) -> int:
            return await cacheme.get(D()) + 10

    class C(Base):
        async def load(self) -> int:
            return await cacheme.get(D()) + 100

    class A(Base):
        async def load(self) -> int:
            return sum(await asyncio.gather(cacheme.get(B()), cacheme.get(C()), cacheme.get(D())))

    assert await asyncio.wait_for(cacheme.get(A()), 3) == 11 + 101 + 1


async def test_a_load_that_gets_a_found_node_of_its_batch_fails() -> None:
    """Review 45: ``get_all([B(1), B(2)])`` where B(1) is in the remote tier and B(2)'s load
    gets B(1). The batch settles B(1) with B(2), so that get would wait for itself: it hung,
    and every later get of both keys with it. It fails now; the keys are free after."""

    class B(Base):
        async def load(self) -> int:
            if self.n == 1:
                return 1
            return await cacheme.get(B(1)) + 100

    assert await cacheme.get(B(1)) == 1  # stored in the remote tier
    with pytest.raises(LoadError, match="same get_all batch"):
        await asyncio.wait_for(cacheme.get_all([B(1), B(2)]), 3)
    assert await asyncio.wait_for(cacheme.get(B(2)), 3) == 101


async def test_a_load_that_stopped_waiting_is_no_cycle() -> None:
    """Review 45: A's load gives up waiting for B (a timeout) and goes on; B's load then gets
    A. Nothing waits in a loop any more: B gets A's value (it got ``LoadError``)."""

    class A(Base):
        async def load(self) -> str:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(cacheme.get(B()), 0.02)
            await asyncio.sleep(0.1)
            return "a"

    class B(Base):
        async def load(self) -> str:
            await asyncio.sleep(0.05)
            return "b+" + await cacheme.get(A())

    a = outside(cacheme.get(A()))
    await asyncio.sleep(0.01)
    b = outside(cacheme.get(B()))
    assert await asyncio.wait_for(a, 3) == "a"
    assert await asyncio.wait_for(b, 3) == "b+a"


async def test_a_task_that_outlives_its_load_is_not_part_of_it() -> None:
    """Review 45: a task A's load started gets Y after A's load ended, while Y's load had
    joined A before: no cycle (it was refused as one)."""
    later: list[asyncio.Future[Any]] = []

    class A(Base):
        async def load(self) -> str:
            async def after() -> str:
                await asyncio.sleep(0.1)
                return await cacheme.get(Y())

            later.append(asyncio.ensure_future(after()))
            await asyncio.sleep(0.03)
            return "a"

    class Y(Base):
        async def load(self) -> str:
            return "y+" + await cacheme.get(A())

    a = outside(cacheme.get(A()))
    await asyncio.sleep(0.01)
    assert await asyncio.wait_for(outside(cacheme.get(Y())), 3) == "y+a"
    assert await asyncio.wait_for(a, 3) == "a"
    assert await asyncio.wait_for(later[0], 3) == "y+a"


REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="-")


async def test_a_background_reload_runs_in_the_context_of_the_get_that_found_it_due() -> None:
    """Review 45: the refresh-ahead reloads found due in one read batch all ran in the
    context of the caller that had begun the batch; each runs in its own caller's now."""
    seen: dict[int, list[str]] = {}

    class Due(Base):
        async def load(self) -> int:
            seen.setdefault(self.n, []).append(REQUEST.get())
            return self.n

        class Meta(Node.Meta):
            caches = [Cache(storage="sqlite", ttl=None)]
            serializer = MsgPackSerializer()
            refresh_after = timedelta(milliseconds=20)

    assert await cacheme.get_all([Due(i) for i in range(4)]) == [0, 1, 2, 3]
    await asyncio.sleep(0.03)  # all due for refresh-ahead

    def caller(i: int) -> asyncio.Future[Any]:
        context = contextvars.Context()
        context.run(REQUEST.set, f"r{i}")
        return context.run(asyncio.ensure_future, cacheme.get(Due(i)))

    assert await asyncio.gather(*(caller(i) for i in range(4))) == [0, 1, 2, 3]
    for _ in range(100):
        if all(len(seen[i]) == 2 for i in range(4)):
            break
        await asyncio.sleep(0.01)
    assert {i: seen[i][1] for i in range(4)} == {i: f"r{i}" for i in range(4)}


async def test_a_task_that_outlives_its_load_while_the_value_is_written() -> None:
    """Review 46: A's load starts a task and returns; while A's value is written to the
    remote tier (its flight not settled yet), the task gets B, whose load gets A. A's load
    is over, so nothing waits in a loop: the task gets B's value (it got ``LoadError``)."""
    helpers: list[asyncio.Future[Any]] = []

    class A(Base):
        async def load(self) -> str:
            async def helper() -> str:
                await asyncio.sleep(0)
                return await cacheme.get(B())

            helpers.append(asyncio.ensure_future(helper()))
            return "a"

    class B(Base):
        async def load(self) -> str:
            return "b+" + await cacheme.get(A())

        class Meta(Node.Meta):
            caches = [Cache(storage="local", ttl=None)]

    assert await asyncio.wait_for(cacheme.get(A()), 3) == "a"
    assert await asyncio.wait_for(helpers[0], 3) == "b+a"
