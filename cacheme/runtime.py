"""What cacheme keeps per event loop: the flight table, each storage's per-loop driver, tasks.

A program may run many event loops, one after another (``asyncio.run`` per Celery task or CLI
command, pytest's loop per test) or side by side (a loop per thread). Futures, tasks and
driver connections belong to one loop, so cacheme keeps one ``Runtime`` per loop, created at
the first call made in that loop and kept on the loop object itself: it lives exactly as long
as the loop does, and nothing of one loop can wait on a future of another.

When the loop shuts down through ``asyncio.run`` (or ``asyncio.Runner``, or anything that calls
``loop.shutdown_asyncgens()``), the runtime closes the driver connections it opened, so no
server-side session of a finished loop is left open (holding locks). A loop closed without
that step leaves its connections to the garbage collector, which closes their sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Coroutine
from typing import TYPE_CHECKING, Any

from .flight import Call, Flights

if TYPE_CHECKING:
    from .storages.base import RemoteStorage

logger = logging.getLogger("cacheme")

_ATTR = "_cacheme_runtime"
# For loops that take no attributes (uvloop's is a C type): weak, so it dies with the loop.
_fallback: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = (
    weakref.WeakKeyDictionary()
)
_create_lock = threading.Lock()
# Every live runtime, so close_storages can reach the loops of other threads.
_live: weakref.WeakSet[Runtime] = weakref.WeakSet()

# Seconds the shutdown of a loop waits for one storage's connections to close.
CLOSE_TIMEOUT = 5.0


class Runtime:
    """The state cacheme keeps for one event loop (touched only from that loop's thread)."""

    __slots__ = (
        "__weakref__",
        "closed",
        "flights",
        "instances",
        "loop",
        "pid",
        "refreshing",
        "sentinel",
        "tasks",
        "thread",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.flights = Flights()
        # key -> the call of its background reload (freshness: refresh-ahead, one per key)
        self.refreshing: dict[str, Call] = {}
        # registered storage -> its driver instance for this loop
        self.instances: dict[RemoteStorage[Any], RemoteStorage[Any]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.sentinel: AsyncGenerator[None, None] | None = None
        self.thread = threading.get_ident()  # the loop's thread: runtimes are made in it
        self.pid = os.getpid()  # a forked child inherits this runtime but not its loop

    def spawn(
        self, coro: Coroutine[Any, Any, Any], context: contextvars.Context | None = None
    ) -> asyncio.Task[Any]:
        """Run ``coro`` in a task of this loop, kept alive until it is done: in ``context``
        when given (a context made for this task alone, such as ``flight.outside_loads``
        returns: the task may change it), else in a copy of the running code's context."""
        if context is None:
            task = self.loop.create_task(coro)
        elif sys.version_info >= (3, 11):  # the task runs in ``context`` itself, no copy
            task = self.loop.create_task(coro, context=context)
        else:  # Python 3.10's create_task takes no context: the task copies the current one
            task = context.run(self.loop.create_task, coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def quiesce(self, timeout: float) -> None:
        """Wait, ``timeout`` seconds at most, until nothing cacheme started in this loop is
        still running: loads, and the batches of every storage driver of the loop (a flight
        whose callers were all cancelled finishes on its own). Raises ``TimeoutError``."""
        await asyncio.wait_for(self._drain(), timeout)

    async def _drain(self) -> None:
        while True:
            # Done tasks leave these sets by a callback the loop runs later; waiting for
            # them again would never yield to it (gather of done futures is done at once on
            # Python 3.12+): the loop would spin.
            running = [t for t in self.tasks if not t.done()]
            for driver in self.instances.values():
                running += [t for t in driver._tasks if not t.done()]
            if not running:
                return
            await asyncio.gather(*running, return_exceptions=True)

    async def close_instances(self) -> list[tuple[str, BaseException]]:
        """Close every storage driver this loop opened; ``(storage name, error)`` of failures."""
        failed: list[tuple[str, BaseException]] = []
        for instance in list(self.instances.values()):
            try:
                await asyncio.wait_for(instance.close_loop(), CLOSE_TIMEOUT)
            except Exception as exc:
                failed.append((instance.name, exc))
                instance.drop_loop()
        self.instances.clear()
        return failed


def current() -> Runtime:
    """The runtime of the running loop (created at first use); ``RuntimeError`` outside one."""
    loop = asyncio.get_running_loop()
    rt: Runtime | None = getattr(loop, _ATTR, None)
    if rt is None:
        rt = _fallback.get(loop)
        if rt is None:
            rt = _create(loop)
    return rt


def of_loop(loop: asyncio.AbstractEventLoop) -> Runtime | None:
    """The runtime of ``loop`` if it has one."""
    rt: Runtime | None = getattr(loop, _ATTR, None)
    return rt if rt is not None else _fallback.get(loop)


def live() -> list[Runtime]:
    """Every runtime whose loop is still referenced somewhere."""
    with _create_lock:  # another thread may be adding its loop's runtime
        return list(_live)


def _create(loop: asyncio.AbstractEventLoop) -> Runtime:
    with _create_lock:
        rt = Runtime(loop)
        try:
            setattr(loop, _ATTR, rt)
        except AttributeError:
            _fallback[loop] = rt
        _live.add(rt)
    _watch_shutdown(rt)
    return rt


def _watch_shutdown(rt: Runtime) -> None:
    """Close ``rt``'s drivers when its loop shuts its async generators down.

    An async generator started in a loop is registered with it (``sys.set_asyncgen_hooks``),
    and ``loop.shutdown_asyncgens()``, which ``asyncio.run`` calls before closing the loop,
    closes it: its ``finally`` then runs inside the loop, while awaiting is still possible.
    """

    async def watcher() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await _shutdown(rt)

    agen = watcher()
    rt.sentinel = agen
    step = agen.__anext__()
    # The generator reaches its yield without awaiting: one send runs it there.
    with contextlib.suppress(StopIteration):
        step.send(None)


async def _shutdown(rt: Runtime) -> None:
    rt.closed = True
    if rt.pid != os.getpid():
        # Inherited through fork: its connections are the parent's too; closing them here
        # would end the parent's sessions. They are left to the garbage collector.
        return
    rt.flights.abandon()
    for name, exc in await rt.close_instances():
        logger.warning("cacheme: closing storage %r at event-loop shutdown failed: %r", name, exc)


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked, and no loop of its parent runs in it:
    not those of the parent's other threads, nor one the forking thread was running (asyncio
    refuses ``get_running_loop`` in a child for a loop of its parent; the child starts its
    own, ``asyncio.run``). Every inherited runtime is therefore closed: ``close_storages``
    and the cross-loop steps of ``invalidate`` skip them instead of waiting for those loops,
    and their connections, which the parent still uses, are never closed from here."""
    global _create_lock
    _create_lock = threading.Lock()  # another thread of the parent may have held it
    for rt in list(_live):
        rt.closed = True
        _live.discard(rt)


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
