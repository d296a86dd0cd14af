"""Remote writes issued and not landed yet, by key, for the whole process (several loops).

A write-back decided in one event loop before an ``invalidate`` or ``refresh`` in another
thread's loop (see ``backplane.write_guard``) goes out on that loop's own connection: it
could reach the server after the removal and bring the old value back until its TTL. So
while more than one loop is live, each remote write registers its keys here until it has
landed, and ``invalidate`` and ``refresh`` wait for those of their key. The wait is bounded
(a loop may be blocked for long); a write still pending then is *revoked* for that key: once
it lands, its own loop removes the key again, after it. A lone loop needs none of this: its
storage driver orders the writes and removals of each key itself (see ``storages.base``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

_lock = threading.Lock()
_pending: dict[str, set[Write]] = {}


class Write:
    """One remote write of ``keys`` in ``loop``, until it lands (or fails)."""

    __slots__ = ("keys", "landed", "loop", "revoked", "signal")

    def __init__(self, keys: list[str], loop: asyncio.AbstractEventLoop) -> None:
        self.keys = keys
        self.loop = loop
        self.signal: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.landed = False
        self.revoked: set[str] = set()


def note(
    keys: Sequence[str],
    write: asyncio.Future[Any],
    remove: Callable[[list[str]], Any],
) -> None:
    """Register ``write`` (a future of the running loop) as a write of ``keys`` until it is
    done. ``remove(keys)`` is called in that loop, once it is done, for the keys an
    ``invalidate`` or ``refresh`` revoked meanwhile (see ``wait``)."""
    entry = Write(list(keys), write.get_loop())
    with _lock:
        for key in entry.keys:
            _pending.setdefault(key, set()).add(entry)

    def done(_: object) -> None:
        with _lock:
            entry.landed = True
            revoked = sorted(entry.revoked)
            _forget(entry)
        entry.signal.set_result(None)
        if revoked:
            remove(revoked)

    write.add_done_callback(done)


def _forget(entry: Write) -> None:
    for key in entry.keys:
        waiting = _pending.get(key)
        if waiting is not None:
            waiting.discard(entry)
            if not waiting:
                del _pending[key]


def of(key: str) -> list[Write]:
    """The writes of ``key`` not landed yet, from any loop still open (a write of a loop
    closed without its shutdown step can never land: it is dropped here)."""
    with _lock:
        found = list(_pending.get(key, ()))
        dead = [w for w in found if w.loop.is_closed()]
        for entry in dead:
            _forget(entry)
    return [w for w in found if w not in dead]


async def wait(key: str, writes: list[Write], timeout: float) -> None:
    """Wait until each of ``writes`` has landed, ``timeout`` seconds at most; revoke ``key``
    from those still pending then (their own loop removes it again once they land)."""
    if not writes:
        return
    await asyncio.wait([asyncio.wrap_future(w.signal) for w in writes], timeout=timeout)
    with _lock:
        for entry in writes:
            if not entry.landed:
                entry.revoked.add(key)


def _reset_after_fork() -> None:
    """A forked child has none of its parent's writes under way (the threads and loops that
    were sending them are not in the child)."""
    global _lock
    _lock = threading.Lock()
    _pending.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
