"""Closing the cache-aside race on shared tiers between processes.

Process A changes a key's source, then invalidates (or refreshes) the key: it removes the key
from every tier (or writes the new value) and publishes it on the backplane as changed at its
source (kind ``i``), with the time it issued that removal (or write). A load of that key in
process B that began before the change may write its older value to a shared tier *after*
A's removal and *before* B hears of it; the shared tier would then hold the older value until
its TTL, and every process could copy it again. The backplane alone narrows that window to
the message's delay; this closes it.

While the backplane is enabled, ``landing`` keeps, for ``landing.LANDED_KEEP`` seconds, when
each remote write of this process landed. When a message says that another process changed
a key from time T on, this process removes the key again from the storage of each of its
writes of that key that landed at or after T (or, for a write still under way, once it
lands), then drops the key from its local tiers and publishes it as changed, so every
process drops a copy it may have taken meanwhile. A write that landed before T reached the
server before A's removal or write, which removed or replaced it.

The removals run in an event loop of their own, on a daemon thread: the loop that wrote may
have ended since (a worker that runs ``asyncio.run`` per job), and every storage works in any
loop. Times come from the wall clock: the processes of one host share one; between hosts
``backplane.CLOCK_SKEW`` is allowed for (a write that landed that long before T is removed
again too, costing one more load, never a stale value). Counted in
``backplane_stats().repairs`` and ``repair_failures``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from . import backplane, landing
from .errors import StorageError

logger = logging.getLogger("cacheme.backplane")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None  # the repairs' loop, started at first use


def _on_message(kind: str, keys: Sequence[str], remote: bool, since: float | None) -> None:
    """Backplane listener (subscriber thread): another process changed ``keys`` at their
    source from wall-clock ``since`` on."""
    if kind != "i" or not remote or since is None:
        return
    seen: set[tuple[int, str]] = set()
    for write, key in landing.to_repair(keys, since):
        if (id(write.remove), key) not in seen:
            seen.add((id(write.remove), key))
            _schedule(write, [key])


def _schedule(write: landing.Write, keys: list[str]) -> None:
    """Remove ``keys`` again from ``write``'s storage, in the repairs' loop (any thread)."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(
                target=_loop.run_forever, name="cacheme-backplane-repair", daemon=True
            ).start()
        loop = _loop
    loop.call_soon_threadsafe(_remove_again, write, keys)


def _remove_again(write: landing.Write, keys: list[str]) -> None:
    """In the repairs' loop: start the removal; once it landed, tell everyone."""
    try:
        removal = write.remove(keys)
    except StorageError:  # closed or replaced meanwhile: its entries went with it
        removal = None
    if not isinstance(removal, asyncio.Future):
        backplane.count_repair(False)
        return

    def done(fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            backplane.count_repair(False)
            logger.warning(
                "cacheme: removing %r again, after another process changed it, failed; a "
                "shared tier may keep an older value until its TTL",
                keys,
            )
            return
        backplane.count_repair(True)
        backplane.drop_local(keys)
        backplane.publish(keys)

    removal.add_done_callback(done)


def _after_fork_in_child() -> None:
    """The repairs' thread is not in a forked child: it starts its own at first use."""
    global _lock, _loop
    _lock = threading.Lock()
    _loop = None


landing.repairer = _schedule
backplane.add_listener(_on_message)
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
