"""Deadlines: the timeouts of a storage's round trips in one loop, with one timer.

Millisecond timeouts, no sleeps of seconds. Python 3.11+ (``Task.uncancel``); before it the
storage uses ``asyncio.wait_for`` and never makes a ``Deadlines``.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Awaitable
from typing import Any

import pytest

from cacheme.storages.deadlines import Deadlines

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Task.uncancel is Python 3.11+ (wait_for before it)"
)


async def timed(deadlines: Deadlines, op: Awaitable[Any]) -> Any:
    """What ``RemoteStorage._call`` does around a round trip."""
    token = deadlines.begin()
    try:
        result = await op
    except asyncio.CancelledError:
        if deadlines.end(token):
            raise TimeoutError from None
        raise
    except BaseException:
        deadlines.end(token)
        raise
    deadlines.end(token)
    return result


def scheduled(loop: asyncio.AbstractEventLoop) -> int:
    """Timers in the loop's heap that are not cancelled (asyncio internals, for the count)."""
    return sum(1 for h in loop._scheduled if not h.cancelled())  # type: ignore[attr-defined]


async def test_a_round_trip_within_its_timeout_returns_its_result() -> None:
    deadlines = Deadlines(0.5)
    assert await timed(deadlines, asyncio.sleep(0.001, "ok")) == "ok"
    assert len(deadlines) == 0


async def test_a_round_trip_past_its_timeout_raises_timeout_error() -> None:
    deadlines = Deadlines(0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await timed(deadlines, asyncio.sleep(5))
    took = loop.time() - started
    assert 0.015 <= took < 1.0
    assert len(deadlines) == 0
    # The task is not left cancelled: it goes on awaiting.
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)


async def test_many_round_trips_share_one_timer_and_each_expires_on_time() -> None:
    deadlines = Deadlines(0.05)
    loop = asyncio.get_running_loop()
    before = scheduled(loop)
    slow = [asyncio.ensure_future(timed(deadlines, asyncio.sleep(5))) for _ in range(5)]
    fast = [asyncio.ensure_future(timed(deadlines, asyncio.sleep(0.001, i))) for i in range(50)]
    await asyncio.sleep(0)
    # 55 round trips under way, and one timer beyond the sleeps themselves.
    assert len(deadlines) == 55
    assert scheduled(loop) - before == 55 + 1
    assert await asyncio.gather(*fast) == list(range(50))
    results = await asyncio.gather(*slow, return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results), results
    assert len(deadlines) == 0


async def test_later_round_trips_get_their_own_full_timeout() -> None:
    deadlines = Deadlines(0.06)
    first = asyncio.ensure_future(timed(deadlines, asyncio.sleep(5)))
    await asyncio.sleep(0.04)
    # Begun 40 ms later: when the first expires this one has 40 ms left, and finishes.
    second = asyncio.ensure_future(timed(deadlines, asyncio.sleep(0.045, "second")))
    with pytest.raises(TimeoutError):
        await first
    assert await second == "second"


async def test_an_outside_cancel_stays_a_cancel() -> None:
    deadlines = Deadlines(5)
    task = asyncio.ensure_future(timed(deadlines, asyncio.sleep(5)))
    await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_an_outside_cancel_in_the_turn_the_deadline_passes_stays_a_cancel() -> None:
    deadlines = Deadlines(0.01)
    task = asyncio.ensure_future(timed(deadlines, asyncio.sleep(5)))
    await asyncio.sleep(0)
    deadlines.expire_all()  # the deadline's cancel
    task.cancel()  # and the caller's own
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_result_that_arrives_in_the_turn_the_deadline_passes_is_a_timeout() -> None:
    # As with asyncio.timeout: once the deadline cancelled the task, the round trip counts
    # as timed out even if its answer is already there.
    deadlines = Deadlines(5)
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(timed(deadlines, fut))
    await asyncio.sleep(0)
    fut.set_result("late")
    deadlines._expire_due(math.inf)  # what the timer does when the deadline comes
    with pytest.raises(TimeoutError):
        await task


async def swallows_one_cancel(fut: asyncio.Future[str]) -> str:
    """A driver step that shields itself once (redis-py's send in a 3.11 ``wait_for``)."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        return await asyncio.shield(fut)


async def test_a_round_trip_that_swallows_its_cancel_is_cancelled_again() -> None:
    deadlines = Deadlines(0.03)
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await timed(deadlines, swallows_one_cancel(fut))
    took = loop.time() - started
    assert 0.05 <= took < 1.0  # the deadline, then one more timeout
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    fut.cancel()


async def test_a_swallowed_cancel_on_a_round_trip_that_then_returns_is_taken_back() -> None:
    deadlines = Deadlines(0.02)
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.03, fut.set_result, "ok")  # after the deadline, before a second cancel
    assert await timed(deadlines, swallows_one_cancel(fut)) == "ok"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0.05)  # no late cancel lands on this task
    assert len(deadlines) == 0


async def test_expire_all_lands_apart_from_a_cancel_made_in_the_same_turn() -> None:
    # close() cancels its batch tasks, then expires the round trips: in one turn both
    # would reach the task as one CancelledError, which a shielding step swallows whole.
    deadlines = Deadlines(60)
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()
    task = asyncio.ensure_future(timed(deadlines, swallows_one_cancel(fut)))
    await asyncio.sleep(0)
    task.cancel()
    deadlines.expire_all()
    done, _ = await asyncio.wait([task], timeout=1)
    assert task in done, "the second cancellation never came"
    with pytest.raises((TimeoutError, asyncio.CancelledError)):
        task.result()
    fut.cancel()


async def test_an_error_of_the_round_trip_passes_through() -> None:
    deadlines = Deadlines(5)

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionResetError):
        await timed(deadlines, failing())
    assert len(deadlines) == 0


async def test_expire_all_ends_every_round_trip_at_once() -> None:
    deadlines = Deadlines(60)
    tasks = [asyncio.ensure_future(timed(deadlines, asyncio.sleep(60))) for _ in range(3)]
    await asyncio.sleep(0)
    deadlines.expire_all()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1)
    assert all(isinstance(r, TimeoutError) for r in results), results


async def test_the_timer_is_set_again_after_an_idle_spell() -> None:
    deadlines = Deadlines(0.02)
    assert await timed(deadlines, asyncio.sleep(0, 1)) == 1
    await asyncio.sleep(0.03)  # the first timer fired with nothing under way
    with pytest.raises(TimeoutError):
        await timed(deadlines, asyncio.sleep(5))


def test_one_deadlines_serves_a_new_loop_after_the_first_is_gone() -> None:
    # A storage's per-loop state is made afresh for each loop; a Deadlines is bound to the
    # loop of its first begin, and must not be shared across loops.
    deadlines = Deadlines(0.02)

    async def once() -> None:
        with pytest.raises(TimeoutError):
            await timed(deadlines, asyncio.sleep(5))

    async def refused() -> None:
        op = asyncio.sleep(5)
        try:
            with pytest.raises(RuntimeError, match="loop that began it"):
                await timed(deadlines, op)
        finally:
            op.close()

    asyncio.run(once())
    asyncio.run(refused())  # another loop: refused (its timer belongs to the first)
