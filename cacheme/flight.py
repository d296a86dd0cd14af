"""Singleflight: at most one load per key per burst of concurrent requests.

The first caller for a key registers a ``Call`` and starts one task that fetches the value;
later callers await the same ``Call``. The task, not any caller, owns the work: a caller's
cancellation never cancels it, and every waiter gets its result or its exception. The entry
leaves the table when the task settles it, and only if it is still the same entry, so no
entry outlives its load. ``forget`` detaches an entry (``invalidate``/``refresh``): its
waiters still get its result, but it is marked stale and must not be written back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Call:
    """One in-flight fetch of one key. ``future`` gets ``(value, was_hit)``."""

    __slots__ = ("future", "stale")

    def __init__(self, future: asyncio.Future[tuple[Any, bool]]) -> None:
        self.future = future
        self.stale = False  # set by forget(): the result must not be written to the tiers


def _consume(fut: asyncio.Future[Any]) -> None:
    # An exception nobody is left to await is expected here, not a bug to log.
    if not fut.cancelled():
        fut.exception()


class Flights:
    """The table of in-flight calls by full cache key (guarded by the event loop: one thread)."""

    def __init__(self) -> None:
        self._calls: dict[str, Call] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._calls)

    def get(self, key: str) -> Call | None:
        return self._calls.get(key)

    def start(self, key: str) -> Call:
        """Register a new call for ``key`` (replacing none: check ``get`` first)."""
        fut: asyncio.Future[tuple[Any, bool]] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        call = Call(fut)
        self._calls[key] = call
        return call

    def settle(self, key: str, call: Call, result: tuple[Any, bool]) -> None:
        if not call.future.done():
            call.future.set_result(result)
        self._drop(key, call)

    def fail(self, key: str, call: Call, error: BaseException) -> None:
        if not call.future.done():
            if isinstance(error, asyncio.CancelledError):
                call.future.cancel()
            else:
                call.future.set_exception(error)
        self._drop(key, call)

    def forget(self, key: str) -> None:
        """Detach ``key``'s call: new callers start afresh; its result is not written back."""
        call = self._calls.pop(key, None)
        if call is not None:
            call.stale = True

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a fetch task that owns its calls; it is kept alive until done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drop(self, key: str, call: Call) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]


async def wait(call: Call) -> tuple[Any, bool]:
    """Await ``call``'s outcome; cancelling the waiter leaves the fetch running."""
    return await asyncio.shield(call.future)


flights = Flights()
