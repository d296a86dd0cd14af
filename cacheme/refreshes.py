"""The refreshes under way in this process, by key, across all its event loops and threads.

Each ``refresh`` takes a ticket (a number, growing) when it begins and gives it back when its
call is settled, or dropped unsettled. Two questions are answered from them:

- ``newer``: whether a refresh of the key began after a given one. What that one loaded may
  be older, so it writes nothing (``walk.Walk._current``). This reaches a refresh that no
  later refresh could detach: one that ``invalidate_tag`` took out of its loop's table of
  flights, or one of another thread's loop.
- ``ended``: for a refresh overtaken by one of another loop, still loading, a future of the
  caller's own loop, done once every refresh of the key begun up to the newest one so far has
  ended (``api.latest`` then reads the tiers, which hold that one's value). It is set through
  that loop's ``call_soon_threadsafe``: nothing here touches another loop's futures.

A ticket given back by the garbage collector (a call dropped unsettled) while the table's lock
is taken in the same thread (the collector runs finalizers wherever Python allocates) is
queued, and given back by the next holder of the lock: the lock is never waited for from a
finalizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from collections import deque

__all__ = ["Ticket", "ended", "newer"]


# (loop, future, lowest ticket not waited for, newest ticket waited for): see ended
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]", int, int]


class _Key:
    """The refreshes of one key under way."""

    __slots__ = ("latest", "running", "waiters")

    def __init__(self, number: int) -> None:
        self.latest = number
        self.running = {number}
        self.waiters: list[_Waiter] = []

    def waits(self, after: int, upto: int) -> bool:
        """Whether a refresh with a ticket above ``after``, up to ``upto``, is under way."""
        return any(after < number <= upto for number in self.running)


_by_key: dict[str, _Key] = {}
_numbers = itertools.count(1)
_lock = threading.Lock()
_deferred: deque[Ticket] = deque()  # given back by the collector while the lock was taken


class Ticket:
    """A refresh's place among the refreshes of its key (see the module docstring)."""

    __slots__ = ("ended", "key", "number")

    def __init__(self, key: str) -> None:
        self.key = key
        self.ended = False
        with _lock:
            self.number = next(_numbers)
            entry = _by_key.get(key)
            if entry is None:
                _by_key[key] = _Key(self.number)
            else:
                entry.latest = self.number
                entry.running.add(self.number)
        _drain()

    def end(self, collected: bool = False) -> None:
        """Give the ticket back (once; later calls do nothing). ``collected``: called by the
        garbage collector, which must not wait for the lock."""
        if not collected:
            _lock.acquire()
        elif not _lock.acquire(blocking=False):
            _deferred.append(self)
            _retry()
            return
        woken: list[_Waiter] = []
        try:
            if self.ended:
                return
            self.ended = True
            entry = _by_key.get(self.key)
            if entry is not None:
                entry.running.discard(self.number)
                still: list[_Waiter] = []
                for waiter in entry.waiters:
                    (still if entry.waits(waiter[2], waiter[3]) else woken).append(waiter)
                entry.waiters = still
                if not entry.running:
                    del _by_key[self.key]
        finally:
            _lock.release()
        for loop, fut, _, _ in woken:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(_wake, fut)
        _drain()


def newer(key: str, number: int) -> bool:
    """Whether a refresh of ``key`` began in this process, in any loop, after the one that
    holds ticket ``number`` (while some refresh of ``key`` is under way)."""
    entry = _by_key.get(key)
    return entry is not None and entry.latest > number


def ended(key: str, number: int) -> asyncio.Future[None] | None:
    """A future of the running loop, done once every refresh of ``key`` begun after ticket
    ``number``, up to the newest one so far, has ended; ``None`` when none is under way
    (nothing to wait for)."""
    loop = asyncio.get_running_loop()
    with _lock:
        entry = _by_key.get(key)
        if entry is None or not entry.waits(number, entry.latest):
            fut = None
        else:
            fut = loop.create_future()
            entry.waiters.append((loop, fut, number, entry.latest))
    _drain()
    return fut


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _retry() -> None:
    """After a ticket was queued: give the queue back now if the lock is free (its holder
    may have released it before the ticket was queued)."""
    if _lock.acquire(blocking=False):
        _lock.release()
        _drain()


def _drain() -> None:
    while True:
        try:
            ticket = _deferred.popleft()
        except IndexError:
            return
        ticket.end()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # one held by a thread of the parent stays held
    # The parent's refreshes end in the parent; one of the forking thread's loop, which
    # runs on here, gives back a ticket the child does not hold (a no-op).
    _by_key.clear()
    _deferred.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
