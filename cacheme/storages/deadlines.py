"""The timeout of a storage's round trips in one event loop: one timer for all of them.

Every round trip of a storage has the same timeout (``RemoteOptions.timeout``, seconds), so
their deadlines fall in the order they began. ``Deadlines`` keeps the round trips under way
in that order and holds a single timer, set for the oldest one's deadline. When it fires, the
round trips past their deadline have their task cancelled, and the timer is set again for the
next oldest. Beginning and ending a round trip is a dictionary insert and delete.

``asyncio.timeout`` per round trip, which this replaces, schedules a timer per operation and
cancels it at the end; a cancelled timer stays in the loop's heap until its time comes (up to
``timeout`` seconds), so under steady traffic the heap holds thousands of them, and each push
into it compares timers in Python. Measured with ``benchmarks/sequential.py``: a miss that
loads (a read and a write) cost about 1.26x ``GET`` + ``SET`` with it and 1.17x without any
timeout.

The owner turns the cancellation into a timeout (see ``RemoteStorage._call``):

    token = deadlines.begin()
    try:
        result = await op()
    except asyncio.CancelledError:
        if deadlines.end(token):  # past its deadline: this cancelled it
            raise TimeoutError from None
        raise
    deadlines.end(token)

A task cancelled from elsewhere while its round trip is under way stays cancelled: ``end``
reports a timeout only for the cancellation this made (``Task.uncancel``, Python 3.11+).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
from typing import Any


class Deadlines:
    """The round trips under way in one event loop, each with ``timeout`` seconds to run.

    It serves the loop of its first ``begin``; every call runs in that loop's thread.
    """

    __slots__ = ("_expired", "_loop", "_next", "_running", "_timeout", "_timer")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        # token -> (task, deadline in loop time, the task's cancel requests at begin);
        # insertion order is deadline order, since every deadline is begin + timeout.
        self._running: dict[int, tuple[asyncio.Task[object], float, int]] = {}
        # token -> [task, cancel requests at begin, cancels made, when to cancel again]
        # for the round trips past their deadline whose owner has not called ``end`` yet;
        # in the order of that last field.
        self._expired: dict[int, list[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._next = itertools.count().__next__

    def __len__(self) -> int:
        return len(self._running)

    def begin(self) -> int:
        """Start the clock for a round trip of the current task; a token for ``end``.

        Raises ``RuntimeError`` outside a task of the loop it serves.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a storage round trip must run in a task of the loop that began it")
        token = self._next()
        deadline = loop.time() + self._timeout
        cancelling = 0
        if sys.version_info >= (3, 11):
            cancelling = task.cancelling()
        self._running[token] = (task, deadline, cancelling)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._fire)
        return token

    def end(self, token: int) -> bool:
        """Stop the clock; True if the round trip ran past its deadline and its task's
        cancellation is this timeout's alone (the caller raises a timeout), else False.

        Takes back the cancel requests this made of the task (``Task.uncancel``), whether
        the round trip raised or, its driver having swallowed them, returned.
        """
        if self._running.pop(token, None) is not None:
            return False
        record = self._expired.pop(token, None)
        if record is None:
            return False
        task, cancelling, cancels, _ = record
        if sys.version_info >= (3, 11):
            left = task.cancelling()
            for _ in range(cancels):
                left = task.uncancel()
            return left <= cancelling
        return True  # pragma: no cover - the owner uses asyncio.wait_for before 3.11

    def expire_all(self) -> None:
        """Cancel every round trip under way, one loop turn from now, as if its deadline
        had passed (the owner is closing: they end at once).

        One turn later, so that it lands apart from the cancellations the owner makes of its
        own tasks in this turn: two requests in one turn reach a task as one
        ``CancelledError``, and a driver step that swallows one (redis-py's send, in a
        ``wait_for`` on Python 3.11) would swallow both.
        """
        loop = self._loop
        if loop is not None and self._running:
            loop.call_soon(self._expire_due, math.inf)

    def _expire_due(self, now: float) -> None:
        """Cancel the round trips whose deadline is ``now`` or earlier (loop time)."""
        running = self._running
        expired = self._expired
        again = now + self._timeout
        while running:
            token = next(iter(running))
            task, deadline, cancelling = running[token]
            if deadline > now:
                return
            del running[token]
            expired[token] = [task, cancelling, 1, again]
            task.cancel()

    def _cancel_again(self, now: float) -> None:
        """A round trip still under way a whole timeout after it was cancelled swallowed
        the cancellation (a driver step that shields itself): cancel its task again."""
        expired = self._expired
        while expired:
            token = next(iter(expired))
            record = expired[token]
            if record[3] > now:
                return
            del expired[token]  # back at the end, in order of its next turn
            record[2] += 1
            record[3] = now + self._timeout
            expired[token] = record
            record[0].cancel()

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None  # set by the begin that set the timer
        now = loop.time()
        self._expire_due(now)
        self._cancel_again(now)
        when = math.inf
        if self._running:
            when = self._running[next(iter(self._running))][1]
        if self._expired:
            when = min(when, self._expired[next(iter(self._expired))][3])
        if when != math.inf:
            self._timer = loop.call_at(when, self._fire)
