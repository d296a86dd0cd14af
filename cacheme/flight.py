"""Singleflight: at most one fetch per key per burst of concurrent requests, per event loop.

The first caller of a key registers a ``Call``; later callers join it. The walk over the tiers
(see ``walk``), not any caller, owns the fetch: it settles the call with the outcome, value or
exception, and every waiter gets it. Each waiter awaits a future of its own, so a cancelled
waiter cancels only that future: never the fetch, never another waiter. The entry leaves the
table when the walk settles it, and only if it is still the same entry, so no entry outlives
its fetch. ``forget`` detaches an entry (``invalidate``/``refresh``): its waiters still get its
outcome, but the call is marked stale and nothing it produces is written or remembered.

A table belongs to one event loop (``runtime.Runtime``): futures never cross loops.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Where a value came from: the index of the tier that held it, or one of these.
LOADED = -1  # load() ran (a miss)
STALE = -2  # load() failed; a stale value was served (a miss)

Outcome = tuple[Any, int]  # (value, source)


class Call:
    """One in-flight fetch of one key, and the futures of its waiters."""

    __slots__ = ("first", "others", "stale")

    def __init__(self) -> None:
        # The first waiter's future, and a list only when more join (most calls have one).
        self.first: asyncio.Future[Outcome] | None = None
        self.others: list[asyncio.Future[Outcome]] | None = None
        self.stale = False  # set by forget(): the result must not be written or remembered

    def join(self) -> asyncio.Future[Outcome]:
        """A new future that gets this call's outcome; cancelling it affects nobody else."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if self.first is None:
            self.first = fut
        elif self.others is None:
            self.others = [fut]
        else:
            self.others.append(fut)
        return fut

    def _take(self) -> list[asyncio.Future[Outcome]]:
        waiters = [] if self.first is None else [self.first]
        if self.others:
            waiters += self.others
        self.first = self.others = None
        return waiters

    def resolve(self, outcome: Outcome) -> None:
        first = self.first
        if self.others is None and first is not None:  # the common case: one waiter
            self.first = None
            if not first.done():
                first.set_result(outcome)
            return
        for fut in self._take():
            if not fut.done():
                fut.set_result(outcome)

    def reject(self, error: BaseException) -> None:
        cancelled = isinstance(error, asyncio.CancelledError)
        for fut in self._take():
            if not fut.done():
                if cancelled:
                    fut.cancel()
                else:
                    fut.set_exception(error)


class Flights:
    """The table of in-flight calls by full cache key (one loop's: one thread touches it)."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[str, Call] = {}

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

    def abandon(self) -> None:
        """The loop is shutting down: cancel every waiter and empty the table."""
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.stale = True
            call.reject(asyncio.CancelledError())

    def _drop(self, key: str, call: Call) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
