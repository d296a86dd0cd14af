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
import time
from collections.abc import Sequence
from typing import Any

from . import backplane, landing
from .storages import registry
from .storages.base import RemoteStorage

logger = logging.getLogger("cacheme.backplane")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None  # the repairs' loop, started at first use


def _on_message(kind: str, keys: Sequence[str], remote: bool, since: float | None) -> None:
    """Backplane listener (subscriber thread): another process changed ``keys`` at their
    source from wall-clock ``since`` on."""
    if kind != "i" or not remote or since is None:
        return
    seen: set[tuple[int, str]] = set()
    for remove, key in landing.to_repair(keys, since):
        if (id(remove), key) not in seen:
            seen.add((id(remove), key))
            _schedule(remove, [key])


def _schedule(remove: landing.Remover, keys: list[str]) -> None:
    """Remove ``keys`` again with ``remove`` (a write's storage's), in the repairs' loop
    (from any thread)."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(
                target=_loop.run_forever, name="cacheme-backplane-repair", daemon=True
            ).start()
        loop = _loop
    loop.call_soon_threadsafe(_remove_again, remove, keys)


def _remove_again(remove: landing.Remover, keys: list[str]) -> None:
    """In the repairs' loop: start the removal; once it landed, tell everyone."""
    try:
        removal = remove(keys)
        if removal is None:
            # That storage was closed since, perhaps registered again under its name (the
            # entry is still on the server): remove it through what is registered now.
            removal = _through_registered(remove, keys)
    except Exception as exc:  # a callback of the loop: never let it raise
        _failed(keys, repr(exc))
        return
    if not isinstance(removal, asyncio.Future):
        _failed(keys, "its storage was closed")
        return

    def done(fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            error = "cancelled" if fut.cancelled() else repr(fut.exception())
            _failed(keys, error)
            return
        backplane.count_repair(True)
        backplane.drop_local(keys)
        backplane.publish(keys)

    removal.add_done_callback(done)


def _through_registered(remove: landing.Remover, keys: list[str]) -> Any:
    """The removal of ``keys`` through the storage now registered under the name and URL
    of ``remove``'s (closed) storage, or ``None``."""
    old = getattr(remove, "__self__", None)
    if not isinstance(old, RemoteStorage):
        return None
    now = registry.storages().get(old.name)
    if not isinstance(now, RemoteStorage) or now is old or now.url != old.url:
        return None
    return now._remove_revoked(keys)


_last_warning = 0.0
_unreported = 0


def _failed(keys: list[str], why: str) -> None:
    """Count a failed repair; warn at most once per 10 s (a close fails many at once)."""
    global _last_warning, _unreported
    backplane.count_repair(False)
    now = time.monotonic()
    if now - _last_warning < 10.0:
        _unreported += 1
        return
    more = f" (and {_unreported} more since the last warning)" if _unreported else ""
    _last_warning, _unreported = now, 0
    logger.warning(
        "cacheme: removing %r again, after another process changed it, failed (%s)%s; a "
        "shared tier may keep an older value until its TTL",
        keys,
        why,
        more,
    )


def _after_fork_in_child() -> None:
    """The repairs' thread is not in a forked child: it starts its own at first use."""
    global _lock, _loop
    _lock = threading.Lock()
    _loop = None


landing.repairer = _schedule
backplane.add_listener(_on_message)
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
