"""Stopping the server side of writes cut short by their storage's timeout.

A write whose caller gave up may still be on its way to the server, or waiting there on a
lock, and land after what is ordered behind it: an ``invalidate`` that returned, and whose
removal the late write then undoes. So before such a write counts as failed, its storage
ends the server side of the connection that carried it (PostgreSQL ``pg_terminate_backend``,
MySQL ``KILL``, Redis ``CLIENT KILL ID``): once that returns, the write has landed or never
will.

The stops of one event loop go one after another through one connection of their own,
outside the storage's pool (whose callers may all be waiting for a connection), opened at the
first stop and closed at shutdown. Each is a statement of about a millisecond, so a storm of
cut writes is stopped in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("cacheme")


class CutStops:
    """One storage's stops of cut writes (see the module docstring).

    ``connect()`` opens a new connection outside the pool; ``stop_on(conn, ident)`` ends the
    server side ``ident`` (a server process, thread or client id) through it;
    ``close(conn)`` closes it without waiting for the server.
    """

    __slots__ = ("_close", "_conn", "_connect", "_lock", "_loop", "_stop_on", "_tasks", "name")

    def __init__(
        self,
        name: str,
        connect: Callable[[], Awaitable[Any]],
        stop_on: Callable[[Any, Any], Awaitable[Any]],
        close: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.name = name  # the storage's, for the log
        self._connect = connect
        self._stop_on = stop_on
        self._close = close
        # Of the loop that stopped last (a registered storage serves one loop after another;
        # a lock and a connection belong to one).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._conn: Any = None
        self._tasks: set[asyncio.Future[None]] = set()  # stops under way

    async def stop(self, ident: Any, what: str, bound: float) -> None:
        """End the server side ``ident`` of a write cut short (``what`` names it for the log),
        waiting at most ``bound`` seconds. A stop that fails or runs out of time goes on in
        the background and is logged (the write may still land); raises nothing but
        ``CancelledError`` and the like."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._lock is None:
            self._loop, self._lock, self._conn = loop, asyncio.Lock(), None
        lock = self._lock

        async def stop() -> None:
            async with lock:
                conn = self._conn
                if conn is None:
                    conn = self._conn = await self._connect()
                try:
                    await self._stop_on(conn, ident)
                except BaseException:
                    if self._conn is conn:
                        self._conn = None
                    with contextlib.suppress(Exception):
                        await self._close(conn)
                    raise

        # A task of its own, its outcome always retrieved: once the wait below gives up,
        # asyncio.shield stops watching it, and asyncio would log a later failure as "Task
        # exception was never retrieved" (the warning below already says it).
        task = asyncio.ensure_future(stop())
        self._tasks.add(task)
        task.add_done_callback(self._late)
        try:
            await asyncio.wait_for(asyncio.shield(task), bound)
        except BaseException as exc:
            logger.warning(
                "cacheme: storage %r: could not stop the %s of a write cut short (%r); it "
                "may still land",
                self.name,
                what,
                exc,
            )
            if not isinstance(exc, Exception):
                raise

    def _late(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug(
                "cacheme: storage %r: a stop of a write cut short ended with %r",
                self.name,
                task.exception(),
            )

    async def aclose(self) -> None:
        """Close the stopping connection of the loop that stopped last, if open, and cancel
        the stops under way (at shutdown; never raises)."""
        for task in list(self._tasks):
            task.cancel()
        conn, self._conn = self._conn, None
        self._loop = self._lock = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._close(conn)
