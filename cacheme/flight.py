"""Singleflight: at most one load per key per burst of concurrent requests.

The first caller for a key registers a ``Call`` and starts one task that fetches the value;
later callers join the same ``Call``. The task, not any caller, owns the work. Each waiter
awaits a future of its own, so a cancelled waiter cancels only that future: never the fetch,
never another waiter. Every waiter still pending gets the outcome, value or exception. The
entry leaves the table when the task settles it, and only if it is still the same entry, so
no entry outlives its fetch. ``forget`` detaches an entry (``invalidate``/``refresh``): its
waiters still get its outcome, but it is marked stale and must not be written back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

Outcome = tuple[Any, bool]  # (value, was_hit)


class Call:
    """One in-flight fetch of one key, and the futures of its waiters."""

    __slots__ = ("stale", "waiters")

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[Outcome]] = []
        self.stale = False  # set by forget(): the result must not be written to the tiers

    def join(self) -> asyncio.Future[Outcome]:
        """A new future that gets this call's outcome; cancelling it affects nobody else."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return fut

    def resolve(self, outcome: Outcome) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(outcome)
        self.waiters.clear()

    def reject(self, error: BaseException) -> None:
        cancelled = isinstance(error, asyncio.CancelledError)
        for fut in self.waiters:
            if not fut.done():
                if cancelled:
                    fut.cancel()
                else:
                    fut.set_exception(error)
        self.waiters.clear()


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
        call = self._calls[key] = Call()
        return call

    def settle(self, key: str, call: Call, outcome: Outcome) -> None:
        call.resolve(outcome)
        self._drop(key, call)

    def fail(self, key: str, call: Call, error: BaseException) -> None:
        call.reject(error)
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


flights = Flights()
