"""One load per key across processes: a short lease in Redis around a miss's load.

A node with ``Meta.lease = timedelta(seconds=5)`` takes, on a miss that would load, a lease
``{key}:lease`` in Redis (``SET NX PX``, in the storage ``Meta.lease_storage`` or, by default,
the backplane's). The process that gets it loads; the core writes the value through to the
shared tier and publishes the key on the backplane, which releases the lease and wakes the
waiters. The processes that find the lease taken wait for the value to appear in the shared
tier: woken by that backplane message (or, failing it, by polling every 20-200 ms), they read
the shared tier. A waiter loads by itself when the lease expires (its holder died: the next
``SET NX`` succeeds, then it is the holder) or when its wait exceeds twice the lease.

The holder's failure is not cached: it deletes its lease at once (compare-and-delete with its
token, a Lua script, so an expired-and-retaken lease is never deleted by its old holder) and
sends a "released" message, so one waiter takes the lease and loads, and the others wait on it.

Redis is reached through a synchronous client on the event loop's executor (one short command
per lease operation), so leases work whatever loops the program runs. A lease storage that
fails is skipped for a second: the miss loads without a lease (fail-open, counted).

``get_all`` batches are not leased: only single-key loads are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from . import backplane

logger = logging.getLogger("cacheme.lease")

T = TypeVar("T")

__all__ = ["LeaseStats", "give_back", "holds", "load_once", "stats"]

_POLL_MIN = 0.02  # seconds: first fallback poll of a waiter
_POLL_MAX = 0.2  # seconds: the poll interval grows up to this
_RELEASE_GRACE = 1.0  # seconds after a successful load before the lease goes anyway
_SKIP_AFTER_ERROR = 1.0  # seconds a failing lease storage is skipped
_ACQUIRED = -3

# Take the lease (-3), or say how long it still runs (PTTL: ms, or -2 if it just vanished).
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -3 end
return redis.call('PTTL', KEYS[1])
"""
# Delete the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class LeaseStats:
    """Counters of the lease machinery in this process (since start or fork)."""

    acquired: int  # leases taken (then this process loaded)
    waited: int  # loads that found the lease taken and waited
    woken: int  # waits ended by a message rather than a poll
    served: int  # waits that ended with the value read from the shared tier
    took_over: int  # waits that ended by taking the lease (expired or released)
    gave_up: int  # waits that exceeded their bound: loaded without a lease
    released: int  # leases deleted by their holder
    errors: int  # lease operations that failed (the load went on without a lease)


class _Counters:
    def __init__(self) -> None:
        self.acquired = 0
        self.waited = 0
        self.woken = 0
        self.served = 0
        self.took_over = 0
        self.gave_up = 0
        self.released = 0
        self.errors = 0


_counters = _Counters()


def stats() -> LeaseStats:
    c = _counters
    return LeaseStats(
        c.acquired, c.waited, c.woken, c.served, c.took_over, c.gave_up, c.released, c.errors
    )


# Waiters by key: (loop, future) pairs, woken from any thread. Leases this process holds
# after a successful load, by key: (token, storage name, loop), until the core publishes
# the key (the value is in the shared tier) or _RELEASE_GRACE passes.
_lock = threading.Lock()
_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
_held: dict[str, tuple[str, str, asyncio.AbstractEventLoop]] = {}
_skip_until: dict[str, float] = {}
_warned: set[str] = set()


def _wake_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _on_message(kind: str, keys: Sequence[str], remote: bool, since: float | None) -> None:
    """Backplane listener: wake the waiters of ``keys``; release what this process published."""
    if not _waiters and not _held:
        return
    for key in keys:
        with _lock:
            waiting = list(_waiters.get(key, ()))
            held = _held.get(key) if not remote and kind == "k" else None
        for loop, fut in waiting:
            with contextlib.suppress(RuntimeError):  # RuntimeError: that loop is closed
                loop.call_soon_threadsafe(_wake_future, fut)
        if held is not None:
            _release_held(key, held[0])


backplane.add_listener(_on_message)


def _storage_of(cfg: Any) -> str | None:
    name: str | None = getattr(cfg, "lease_storage", None) or backplane.storage_name()
    if name is None and cfg.name not in _warned:
        _warned.add(cfg.name)
        logger.warning(
            "cacheme: node %s has Meta.lease but no Meta.lease_storage and the backplane is "
            "not enabled; loading without a lease",
            cfg.name,
        )
    return name


def _acquire(client: Any, lease_key: str, token: str, ttl_ms: int) -> int:
    return int(client.eval(_ACQUIRE, 1, lease_key, token, ttl_ms))


def _release(client: Any, lease_key: str, token: str) -> None:
    try:
        if client.eval(_RELEASE, 1, lease_key, token):
            _counters.released += 1
    except Exception as exc:
        _counters.errors += 1
        logger.debug("cacheme: lease release of %r failed: %r", lease_key, exc)


def _release_held(key: str, token: str) -> None:
    """Release the lease held for ``key`` if it is still ``token``'s (any thread)."""
    with _lock:
        held = _held.get(key)
        if held is None or held[0] != token:
            return
        del _held[key]
    _, storage, loop = held
    try:
        client = backplane.sync_client(storage)
        loop.call_soon_threadsafe(
            loop.run_in_executor, None, _release, client, f"{key}:lease", token
        )
    except Exception as exc:  # loop closed, storage gone: the lease expires by itself
        logger.debug("cacheme: lease release of %r skipped: %r", key, exc)


async def load_once(
    cfg: Any,
    key: str,
    load: Callable[[], Awaitable[T]],
    read_shared: Callable[[], Awaitable[tuple[bool, Any]]],
) -> tuple[Any, bool]:
    """Run ``load`` for ``key`` in at most one process at a time (per lease).

    ``cfg`` is the node's configuration (``name``, ``lease``: ``timedelta`` or ``None``,
    ``lease_storage``); ``read_shared`` reads ``key`` from the node's shared tiers as
    ``(found, value)``. Returns ``(value, loaded)``: ``loaded`` is ``True`` when this call
    ran ``load`` (write the value through as usual), ``False`` when the value was read from
    the shared tier after another process loaded it. ``load``'s exception propagates after
    the lease is released.
    """
    lease: timedelta | None = getattr(cfg, "lease", None)
    storage = _storage_of(cfg) if lease is not None else None
    if lease is None or storage is None or _skip_until.get(storage, 0.0) > time.monotonic():
        return await load(), True
    client = backplane.sync_client(storage, user=f"node {cfg.name} (Meta.lease_storage)")
    loop = asyncio.get_running_loop()
    ttl_ms = max(1, round(lease.total_seconds() * 1000))
    lease_key = f"{key}:lease"
    token = f"{backplane.instance_id()}:{uuid.uuid4().hex}"
    deadline = time.monotonic() + 2 * lease.total_seconds()
    fut: asyncio.Future[None] | None = None
    waited = False
    poll = _POLL_MIN
    try:
        while True:
            try:
                pttl = await loop.run_in_executor(None, _acquire, client, lease_key, token, ttl_ms)
            except Exception as exc:
                _counters.errors += 1
                _skip_until[storage] = time.monotonic() + _SKIP_AFTER_ERROR
                logger.warning(
                    "cacheme: node %s: lease on storage %r failed (%s: %s); loading without "
                    "a lease",
                    cfg.name,
                    storage,
                    type(exc).__name__,
                    exc,
                )
                return await load(), True
            if pttl == _ACQUIRED:
                if waited:
                    _counters.took_over += 1
                    # The lease may have been released because the value just landed.
                    found, value = await read_shared()
                    if found:
                        _counters.served += 1
                        await loop.run_in_executor(None, _release, client, lease_key, token)
                        return value, False
                _counters.acquired += 1
                return await _hold(loop, key, storage, client, lease_key, token, load), True
            if fut is None:
                # Register before reading the shared tier: no wake-up can fall in between.
                fut = loop.create_future()
                with _lock:
                    _waiters.setdefault(key, []).append((loop, fut))
                _counters.waited += 1
                waited = True
            found, value = await read_shared()
            if found:
                _counters.served += 1
                return value, False
            now = time.monotonic()
            if now >= deadline:
                _counters.gave_up += 1
                return await load(), True
            timeout = min(poll, deadline - now)
            if pttl >= 0:
                timeout = min(timeout, pttl / 1000 + 0.002)  # wake as the lease expires
            poll = min(poll * 2, _POLL_MAX)
            done, _ = await asyncio.wait((fut,), timeout=timeout)
            if done:
                _counters.woken += 1
                fut = loop.create_future()
                with _lock:
                    entries = _waiters.setdefault(key, [])
                    entries[:] = [(lp, f) for lp, f in entries if not f.done()]
                    entries.append((loop, fut))
    finally:
        if fut is not None:
            with _lock:
                entries = _waiters.get(key, [])
                entries[:] = [(lp, f) for lp, f in entries if f is not fut]
                if not entries:
                    _waiters.pop(key, None)


async def _hold(
    loop: asyncio.AbstractEventLoop,
    key: str,
    storage: str,
    client: Any,
    lease_key: str,
    token: str,
    load: Callable[[], Awaitable[T]],
) -> T:
    try:
        value = await load()
    except BaseException:
        # Not cached: give the lease back now and wake the waiters so one of them loads.
        await asyncio.shield(loop.run_in_executor(None, _release, client, lease_key, token))
        backplane.publish((key,), kind="r")
        raise
    # The core writes the value through and publishes the key, which releases the lease
    # (_on_message); if it writes nothing to a shared tier, it gives the lease back
    # (give_back); the grace timer is the last resort (the process died meanwhile).
    with _lock:
        _held[key] = (token, storage, loop)
    loop.call_later(_RELEASE_GRACE, _release_held, key, token)
    return value


def holds(key: str) -> bool:
    """Whether this process holds ``key``'s lease after loading it (until the key is
    published, given back, or the grace passes)."""
    with _lock:
        return key in _held


async def give_back(key: str) -> None:
    """The holder of ``key``'s lease loaded it but wrote nothing to a shared tier (the value
    could not be encoded, or the key was invalidated meanwhile): release the lease now and
    wake the waiters, so that one of them loads at once instead of after the grace."""
    with _lock:
        held = _held.pop(key, None)
    if held is None:
        return
    token, storage, loop = held
    try:
        client = backplane.sync_client(storage)
        await asyncio.shield(loop.run_in_executor(None, _release, client, f"{key}:lease", token))
    except Exception as exc:  # storage gone: the lease expires by itself
        logger.debug("cacheme: lease release of %r skipped: %r", key, exc)
    backplane.publish((key,), kind="r")


def _after_fork_in_child() -> None:
    global _lock, _counters
    _lock = threading.Lock()
    _counters = _Counters()
    _waiters.clear()
    _held.clear()
    _skip_until.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
