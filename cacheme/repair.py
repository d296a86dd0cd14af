"""Closing the cache-aside race on shared tiers between processes.

Process A changes a key's source, then invalidates (or refreshes) the key: it removes the key
from every tier and publishes it on the backplane as changed at its source (kind ``i``, with
the wall-clock time A began). A load of that key in process B that began before the change
may write its older value to a shared tier *after* A's removal and *before* B hears of it;
the shared tier would then hold the older value until its TTL, and every process could copy
it again. The backplane alone narrows that window to the message's delay; this closes it.

While the backplane is enabled, ``landing`` keeps, for ``landing.LANDED_KEEP`` seconds, when
each remote write of this process landed. When a message says that another process changed
a key at its source from time T on, this process removes the key again from the storage of
each of its writes of that key that landed at or after T - ``CLOCK_SKEW``, or is still under
way (once it lands). The removal runs in the writing loop, after the write (a storage keeps
one key's operations in the order they were issued); then the key is dropped from the local
tiers and published as changed, so every process drops a copy it may have taken meanwhile.

Conservative: a write that reached the server just before A's removal is removed again as
well (one more load of the key, never a stale value). Not covered: hosts whose clocks differ
by more than ``CLOCK_SKEW``, and messages that take longer than ``landing.LANDED_KEEP`` to
arrive. Counted in ``backplane_stats().repairs`` and ``repair_failures``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from . import backplane, landing

logger = logging.getLogger("cacheme.backplane")

# Seconds by which two hosts' clocks may differ: a write that landed this long before the
# other process began its change is removed again too.
CLOCK_SKEW = 0.25


def _on_message(kind: str, keys: Sequence[str], remote: bool, since: float | None) -> None:
    """Backplane listener (subscriber thread): another process changed ``keys`` at their
    source, beginning at wall-clock ``since``."""
    if kind != "i" or not remote or since is None:
        return
    seen: set[tuple[int, str]] = set()
    for write, key in landing.to_repair(keys, since - CLOCK_SKEW):
        if (id(write.remove), key) in seen:
            continue
        seen.add((id(write.remove), key))
        with contextlib.suppress(RuntimeError):  # that loop is closed: nothing to follow up
            write.loop.call_soon_threadsafe(_remove_again, write, [key])


def _remove_again(write: landing.Write, keys: list[str]) -> None:
    """In ``write``'s loop: remove ``keys`` again from its storage, then tell everyone."""
    removal = write.remove(keys)
    if not isinstance(removal, asyncio.Future):
        return  # the storage was closed meanwhile

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


landing.repairer = _remove_again
backplane.add_listener(_on_message)
