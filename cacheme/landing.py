"""Remote writes issued and not landed yet, by key, for the whole process (several loops).

A write-back decided in one event loop before an ``invalidate`` or ``refresh`` in another
thread's loop (see ``backplane.write_guard``) goes out on that loop's own connection: it
could reach the server after the removal and bring the old value back until its TTL. So
each remote write registers its keys here until it has landed (a loop started later, in
another thread, may invalidate while it is under way), and ``invalidate`` and ``refresh``
wait for those of their key. The wait is bounded (a loop may be blocked for long); a write
still pending then is *revoked* for that key: once it lands, its own loop removes the key
again, after it, and nobody waits for it again. Within one loop the storage driver orders
the writes and removals of each key itself (see ``storages.base``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

_lock = threading.Lock()
# key -> the writes of it under way: one Write, or a list when there are several.
_pending: dict[str, Write | list[Write]] = {}

# While the backplane is enabled (see ``repair``): the writes that landed in the last
# ``LANDED_KEEP`` seconds, as (wall-clock time it landed, key, the write's ``remove``),
# oldest first, and the function that removes keys again once such a write must be repaired.
LANDED_KEEP = 3.0
keep_landed = False
Remover = Callable[[list[str]], Any]
_landed: collections.deque[tuple[float, str, Remover]] = collections.deque()
repairer: Callable[[Remover, list[str]], None] | None = None


class Write:
    """One remote write of ``keys`` in ``loop``, until it lands (or fails); also the done
    callback of the write's future (no closure made per write)."""

    __slots__ = ("keys", "landed", "loop", "remove", "repair", "revoked", "signal")

    def __init__(
        self,
        keys: Sequence[str],
        loop: asyncio.AbstractEventLoop,
        remove: Callable[[list[str]], Any],
    ) -> None:
        self.keys = keys
        self.loop = loop
        self.remove = remove
        # Made when a waiter asks (under _lock): most writes are never waited for.
        self.signal: concurrent.futures.Future[None] | None = None
        self.landed = False
        self.revoked: set[str] | None = None
        self.repair: set[str] | None = None  # keys another process changed meanwhile

    def __call__(self, _: object) -> None:
        with _lock:
            self.landed = True
            revoked = self.revoked
            repair = self.repair
            signal = self.signal
            for key in self.keys:
                _drop(key, self)
            if keep_landed:
                now = time.time()
                _forget_landed(now)
                for key in self.keys:
                    _landed.append((now, key, self.remove))
        if signal is not None:
            signal.set_result(None)
        if revoked:
            self.remove(sorted(revoked))
        if repair and repairer is not None:
            repairer(self.remove, sorted(repair))


def keep_landed_writes(on: bool) -> None:
    """Start (the backplane was enabled) or stop keeping the writes that landed."""
    global keep_landed
    with _lock:
        keep_landed = on
        if not on:
            _landed.clear()


def _forget_landed(now: float) -> None:
    limit = now - LANDED_KEEP
    while _landed and _landed[0][0] < limit:
        _landed.popleft()


def to_repair(keys: Sequence[str], since: float) -> list[tuple[Remover, str]]:
    """Another process changed ``keys`` at their source, beginning at wall-clock ``since``:
    the writes of them that landed at or after ``since`` are returned, to be removed again
    now; those still under way are marked, and handed to ``repairer`` once they land."""
    wanted = set(keys)
    now_due: list[tuple[Remover, str]] = []
    with _lock:
        for key in wanted:
            for entry in _writes_of(key):
                if entry.repair is None:
                    entry.repair = set()
                entry.repair.add(key)
        for when, key, remove in reversed(_landed):
            if when < since:
                break
            if key in wanted:
                now_due.append((remove, key))
    return now_due


def note(
    keys: Sequence[str],
    write: asyncio.Future[Any],
    remove: Callable[[list[str]], Any],
) -> None:
    """Register ``write`` (a future of the running loop) as a write of ``keys`` until it is
    done. ``remove(keys)`` is called in that loop, once it is done, for the keys an
    ``invalidate`` or ``refresh`` revoked meanwhile (see ``wait``)."""
    entry = Write(keys, write.get_loop(), remove)
    with _lock:
        for key in keys:
            found = _pending.get(key)
            if found is None:
                _pending[key] = entry
            elif type(found) is list:
                found.append(entry)
            else:
                _pending[key] = [found, entry]  # type: ignore[list-item]
    write.add_done_callback(entry)


def _drop(key: str, entry: Write) -> None:
    found = _pending.get(key)
    if found is entry:
        del _pending[key]
    elif type(found) is list:
        if entry in found:
            found.remove(entry)
        if not found:
            del _pending[key]


def _writes_of(key: str) -> list[Write]:
    found = _pending.get(key)
    if found is None:
        return []
    return list(found) if type(found) is list else [found]  # type: ignore[list-item]


def of(key: str) -> list[Write]:
    """The writes of ``key`` not landed yet and not revoked for it, from any loop still open
    (a write of a loop closed without its shutdown step can never land: it is dropped)."""
    live = []
    with _lock:
        for entry in _writes_of(key):
            if entry.revoked and key in entry.revoked:
                continue
            if entry.loop.is_closed():
                for k in entry.keys:
                    _drop(k, entry)
                continue
            if entry.signal is None:
                entry.signal = concurrent.futures.Future()
            live.append(entry)
    return live


async def wait(key: str, writes: list[Write], timeout: float) -> None:
    """Wait until each of ``writes`` (from ``of``) has landed, ``timeout`` seconds at most;
    revoke ``key`` from those still pending then (their own loop removes it again once they
    land)."""
    if not writes:
        return
    signals = [w.signal for w in writes if w.signal is not None]
    await asyncio.wait([asyncio.wrap_future(s) for s in signals], timeout=timeout)
    with _lock:
        for entry in writes:
            if not entry.landed:
                if entry.revoked is None:
                    entry.revoked = set()
                entry.revoked.add(key)


def _reset_after_fork() -> None:
    """A forked child has none of its parent's writes under way (the threads and loops that
    were sending them are not in the child)."""
    global _lock
    _lock = threading.Lock()
    _pending.clear()
    _landed.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
