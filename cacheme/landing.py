"""Remote writes issued and not landed yet, by key, for the whole process (several loops).

A write-back decided in one event loop before an ``invalidate`` in another thread's loop (see
``backplane.write_guard``) goes out on that loop's own connection: it could reach the server
after the removal and bring the old value back until its TTL. So while more than one loop is
live, each remote write registers its keys here until it has landed, and ``invalidate``
waits for those of its key before it removes it. A lone loop needs none of this: its storage
driver orders the writes and removals of each key itself (see ``storages.base``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any

_lock = threading.Lock()
_pending: dict[str, set[concurrent.futures.Future[None]]] = {}


def note(keys: Sequence[str], write: asyncio.Future[Any]) -> None:
    """Register ``write`` (a future of the running loop) as a write of ``keys`` until it
    is done, landed or failed."""
    signal: concurrent.futures.Future[None] = concurrent.futures.Future()
    keys = list(keys)
    with _lock:
        for key in keys:
            _pending.setdefault(key, set()).add(signal)

    def done(_: object) -> None:
        with _lock:
            for key in keys:
                waiting = _pending.get(key)
                if waiting is not None:
                    waiting.discard(signal)
                    if not waiting:
                        del _pending[key]
        signal.set_result(None)

    write.add_done_callback(done)


def of(keys: Sequence[str]) -> list[concurrent.futures.Future[None]]:
    """The writes of ``keys`` not landed yet, from any loop."""
    with _lock:
        return list({signal for key in keys for signal in _pending.get(key, ())})


async def wait(signals: list[concurrent.futures.Future[None]], timeout: float) -> None:
    """Wait until every one of ``signals`` is done, ``timeout`` seconds at most (a loop that
    was stopped for good with a write queued never sends it)."""
    if signals:
        await asyncio.wait([asyncio.wrap_future(s) for s in signals], timeout=timeout)
