"""The one storage contract.

A tier is either *local* (in-process, holds Python objects, answers synchronously) or
*remote* (holds bytes, answers asynchronously). Backends implement only raw operations:

- ``LocalStorage``: ``get``, ``set``, ``remove``.
- ``RemoteStorage``: ``_connect``, ``_close``, ``_get_many``, ``_set_many``, ``_remove_many``,
  and ``_add_many`` (set-if-absent: the base has a fallback of two round trips that is not
  atomic; every shipped backend overrides it with one atomic round trip per batch).

``RemoteStorage`` does everything else once, for every backend: coalescing the operations
issued in one event-loop turn into batches of at most ``batch_size`` (every round trip, on
every path, carries at most ``batch_size`` keys), the timeout (pool waits included), the
circuit breaker, wrapping driver errors into ``StorageError``, and the per-storage counters.
The writes, adds and removals of a key land in the order they were issued, within one turn
too, and a read issued after them reads after them. Keys arrive fully built
(``{prefix}:{key}:{version}``); TTLs arrive as whole milliseconds; values are the node
serializer's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar, Union, overload

from pydantic import BaseModel, ConfigDict, Field

from .. import landing, runtime
from ..errors import (
    DecodeError,
    StorageError,
    StorageMisconfiguredError,
    StorageTimeoutError,
    StorageUnavailableError,
)
from .deadlines import Deadlines
from .url import redact, scrub

logger = logging.getLogger("cacheme")

T = TypeVar("T")
R = TypeVar("R")


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Any = _Miss()  # what a local tier's get returns for a key it does not hold


class Entry(NamedTuple):
    """One value to write: full key, encoded bytes, TTL in ms (``None`` = no expiry)."""

    key: str
    value: bytes
    ttl_ms: int | None


class Unreadable(bytes):
    """What a backend's ``_get_many`` gives for a stored value that is not binary: a row or
    document written by something else than cacheme (a text or a number in the value column
    of SQLite, in the value field of MongoDB). The tier reading it counts it as an entry
    that cannot be decoded, for its key alone: a miss, loaded again and overwritten (see
    ``binary``).

    Empty bytes, so that whatever reads it as bytes all the same decodes nothing from it (a
    freshness envelope check, every serializer) and nothing breaks on its type (a tag
    version compared or recorded); ``reason`` says what was stored instead."""

    reason = "a stored value that is not bytes"  # see binary

    def error(self) -> DecodeError:
        return DecodeError(self.reason)

    def __repr__(self) -> str:
        return f"<Unreadable: {self.reason}>"


def binary(storage: str, value: Any) -> bytes:
    """A value read from ``storage`` as bytes: ``bytes`` as is, ``bytearray`` and
    ``memoryview`` (and bytes subclasses such as PyMongo's ``Binary``) copied; anything
    else (a foreign row's text or number) as an ``Unreadable``, never converted (``bytes(n)``
    of an int ``n`` would be ``n`` zero bytes)."""
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    marker = Unreadable()
    marker.reason = (
        f"storage {storage!r} holds a {type(value).__name__} there, not bytes (written by "
        f"something other than cacheme?)"
    )
    return marker


class StorageOptions(BaseModel):
    """Options every storage accepts. Backends extend this; unknown options are errors."""

    # Strict: "10" or True is not a size; allow_inf_nan=False: a timeout of inf is no timeout.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# The longest ``timeout``: one day. Drivers refuse much longer ones only when they first
# connect (pymongo: server selection under 1e9 ms; MySQL: connect_timeout up to a year),
# which would look like an unreachable server; a cache operation has no use for more.
MAX_TIMEOUT = 86_400.0

# The most connections a storage's pool may hold (the SQL tiers take the same bound): far
# above what any server allows, and a bound drivers do not overflow at connect time.
MAX_POOL_SIZE = 10_000


class RemoteOptions(StorageOptions):
    """Options every remote storage accepts."""

    timeout: float = Field(
        default=3.0,
        gt=0,
        le=MAX_TIMEOUT,
        description="seconds one operation may take, pool wait included (at most a day)",
    )
    fail_open: bool = Field(
        default=True, description="on error or timeout, treat a read as a miss and go on"
    )
    coalesce: bool = Field(
        default=True, description="batch the operations issued in one event-loop turn"
    )
    batch_size: int = Field(default=500, ge=1, le=100_000, description="keys per round trip")
    breaker_threshold: int = Field(
        default=5, ge=1, description="consecutive failures that open the circuit breaker"
    )
    breaker_cooldown: float = Field(
        default=2.0, gt=0, description="seconds the tier is skipped once the breaker opens"
    )


@dataclass
class StorageStats:
    """Counters of one registered storage."""

    round_trips: int = 0
    keys_read: int = 0
    keys_written: int = 0
    keys_removed: int = 0
    errors: int = 0
    timeouts: int = 0
    rejected: int = 0  # calls refused while the breaker was open
    breaker_opens: int = 0


OptionsT = TypeVar("OptionsT", bound=StorageOptions)


class BaseStorage(ABC, Generic[OptionsT]):
    """What every tier has: a name, a URL, validated options, connect and close."""

    local: ClassVar[bool]
    options_model: ClassVar[type[StorageOptions]] = StorageOptions

    def __init__(self, name: str, url: str, options: OptionsT) -> None:
        self.name = name
        self.url = url
        self.options = options
        self.stats = StorageStats()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {redact(self.url)}>"

    async def connect(self) -> None:
        """Open connections (or files); called once by ``register_storage``."""

    async def close(self) -> None:
        """Release everything ``connect`` opened; safe to call twice."""


class LocalStorage(BaseStorage[OptionsT]):
    """An in-process tier: Python objects, synchronous, no serializer.

    One local storage serves every event loop and thread of the process (values are plain
    objects). ``get``, ``set`` and ``remove`` run on the caller's thread, and may run in
    several threads at once: the changes of the storage and its eviction policy are made
    under the storage's lock (``_lock``), while ``get`` takes no lock (a dict lookup) and
    tolerates an entry removed by another thread halfway through it. Another thread (the
    backplane's) hands removals over with ``discard_threadsafe`` and ``clear_threadsafe``,
    which take effect before the storage's next operation.
    """

    local = True
    # The longest TTL an entry can carry; a longer one means no expiry (see ``Cache``).
    max_ttl: ClassVar[timedelta] = timedelta(microseconds=(2**63 - 1) // 1000)

    def __init__(self, name: str, url: str, options: OptionsT) -> None:
        super().__init__(name, url, options)
        self._handoff: deque[str | None] = deque()  # keys to drop; None: drop everything
        # Reentrant: a value freed under it (evicted, replaced) may run a finalizer, or the
        # garbage collector may run one, that uses this storage again on the same thread.
        self._lock = threading.RLock()
        _local_storages.add(self)

    @abstractmethod
    def get(self, key: str) -> Any:
        """The live value of ``key``, or ``MISS``."""

    @abstractmethod
    def set(self, key: str, value: Any, ttl: float | None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: until evicted)."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Drop ``key`` if present."""

    @abstractmethod
    def clear(self) -> None:
        """Drop every entry."""

    @abstractmethod
    def remaining(self, keys: Sequence[str]) -> dict[str, float]:
        """Seconds each live entry of ``keys`` has left (``math.inf``: no expiry)."""

    def discard_threadsafe(self, keys: Iterable[str]) -> None:
        """From any thread: drop ``keys``. They are gone for ``get`` at once (one dict
        operation each, atomic under the GIL); the eviction policy hears of it at the
        storage's next ``set`` or ``remove``."""
        keys = list(keys)
        self._forget_now(keys)
        self._handoff.extend(keys)

    def clear_threadsafe(self) -> None:
        """From any thread: drop every entry (for ``get`` at once; see ``discard_threadsafe``)."""
        self._forget_now(None)
        self._handoff.append(None)

    @abstractmethod
    def _forget_now(self, keys: list[str] | None) -> None:
        """Make ``keys`` (``None``: every key) invisible to ``get``: only operations that are
        atomic under the GIL, since another thread calls it."""

    def _apply_handoff(self) -> None:
        """Finish the removals handed over (with ``_lock`` held: nothing else takes from the
        queue meanwhile, while the backplane's thread may still add to it)."""
        handoff = self._handoff
        keys = [handoff.popleft() for _ in range(len(handoff))]
        for key in keys:
            if key is None:
                self._clear()
            else:
                self._forgotten(key)

    @abstractmethod
    def _clear(self) -> None:
        """``clear``, with ``_lock`` held."""

    @abstractmethod
    def _forgotten(self, key: str) -> None:
        """Finish dropping ``key`` after ``_forget_now`` hid it (``_lock`` held)."""


# Every local storage of the process, for a forked child: a lock held by another thread of
# the parent at the fork would stay held in the child forever (that thread is not there).
_local_storages: weakref.WeakSet[LocalStorage[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for storage in list(_local_storages):
        storage._lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Reader(Protocol):
    """Takes the outcome of a read (values by key, or the exception) from the batch's task."""

    def delivered(self, outcome: Any) -> None: ...


# Where the outcome of one queued call goes: a future, or (reads only) a ``Reader``, called
# straight from the batch's task (no extra loop turn).
Sink = Union["asyncio.Future[R]", Reader]


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    """The calls of one operation kind waiting for the next flush."""

    calls: list[tuple[Sequence[T], Sink[R]]] = field(default_factory=list)


def _deliver(sink: Sink[Any], outcome: Any, failed: bool) -> None:
    """Hand ``outcome`` (a result, or an exception when ``failed``) to ``sink``."""
    if isinstance(sink, asyncio.Future):
        if not sink.done():
            if failed:
                sink.set_exception(outcome)
            else:
                sink.set_result(outcome)
        return
    try:
        sink.delivered(outcome)
    except Exception:  # a reader's bug must not keep the batch from its other readers
        logger.exception("cacheme: a read callback failed")


class Breaker:
    """Consecutive failures of one storage, shared by its drivers in every event loop."""

    __slots__ = ("failures", "open_until")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0  # time.monotonic() until which calls are refused; 0: closed


class RemoteStorage(BaseStorage[OptionsT]):
    """A tier behind the network (or a file): bytes in, bytes out, asynchronous.

    The registered object serves every event loop of the process. Driver connections, queued
    operations and their tasks belong to one loop, so each loop that uses the storage gets a
    driver of its own, connected lazily at its first operation: the registered object itself
    for the first loop that takes it, a fresh instance of the same class (sharing the
    counters and the circuit breaker) for any other. When a loop shuts down, its driver is
    closed (see ``runtime``) and the registered object is free for the next loop.
    """

    local = False
    options_model: ClassVar[type[StorageOptions]] = RemoteOptions
    options: RemoteOptions  # type: ignore[assignment]

    def __init__(self, name: str, url: str, options: OptionsT) -> None:
        super().__init__(name, url, options)
        # The registered storage this driver serves a loop for (None: it is that storage).
        self._origin: RemoteStorage[Any] | None = None
        self._breaker = Breaker()
        self._dead = False  # closed for good (close_storages / replaced)
        self._home: weakref.ref[runtime.Runtime] | None = None  # the loop this driver serves
        # Held to take the registered object as a loop's driver, or to let it go: two
        # threads' loops attaching at once must not both take it.
        self._claim = threading.Lock()
        self._connected = False
        self._connecting: asyncio.Future[None] | None = None
        # Made once: landing keeps it with each write not landed yet (no method object each).
        self._revoker = self._remove_revoked
        self._reset_loop_state()

    def _reset_loop_state(self) -> None:
        self._reads: _Pending[str, dict[str, bytes]] = _Pending()
        self._writes: _Pending[Entry, None] = _Pending()
        self._adds: _Pending[Entry, None] = _Pending()
        self._removes: _Pending[str, None] = _Pending()
        self._removed: set[str] = set()  # the keys of _removes
        self._flush_scheduled = False
        self._reading = 0  # reads under way (queued batches and direct reads)
        self._writing = 0  # write, add and removal batches under way, direct writes too
        # The timeouts of the round trips under way (3.11+). close() expires them, so that
        # an operation running in a caller's own task (read_now, write_now) ends at once.
        self._deadlines = Deadlines(self.options.timeout)
        # The latest write task of each key with a write under way: later writes and removes
        # of the key wait for it, so what lands last on the server is what was issued last.
        self._key_writes: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._flushing: set[_Pending[Any, Any]] = set()  # handed to runner tasks, not settled

    # Driver exceptions that mean "the server did not answer in time"; counted as timeouts.
    timeout_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def misconfigured(self, exc: BaseException) -> bool:
        """Whether a failed connect's driver exception is the server refusing this storage's
        settings (see ``StorageMisconfiguredError``); backends that can tell override it."""
        return False

    # The longest TTL an entry can carry; a longer one means no expiry (see ``Cache``).
    max_ttl: ClassVar[timedelta] = timedelta.max

    # -- what backends implement -------------------------------------------------------

    @abstractmethod
    async def _connect(self) -> None:
        """Create the client or pool (in the running loop)."""

    @abstractmethod
    async def _close(self) -> None:
        """Close the client or pool; safe to call when ``_connect`` never ran or failed."""

    @abstractmethod
    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Live (unexpired) values of ``keys``, in one round trip; absent keys left out. A
        stored value that is not binary is given as an ``Unreadable`` (see ``binary``)."""

    @abstractmethod
    async def _set_many(self, entries: Sequence[Entry]) -> None:
        """Upsert ``entries`` (distinct keys), each with its own TTL, in one round trip."""

    @abstractmethod
    async def _remove_many(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (distinct) in one round trip; absent keys are fine."""

    async def _add_many(self, entries: Sequence[Entry]) -> None:
        """Store each of ``entries`` (distinct keys) only if its key is absent (or expired),
        with its own TTL; return nothing. A key another writer holds keeps its value.

        Backends override this with one round trip per batch that is atomic per key (two
        processes adding one absent key: exactly one value stays). This fallback, for
        backends that do not, reads then writes: two round trips, and a write that lands
        between them is overwritten.
        """
        found = await self._get_many([e.key for e in entries])
        absent = [e for e in entries if e.key not in found]
        if absent:
            await self._set_many(absent)

    # -- the driver of the running loop ---------------------------------------------------

    def here(self, rt: runtime.Runtime | None = None) -> RemoteStorage[OptionsT]:
        """This storage's driver for the running event loop (created at first use).

        ``rt``: the running loop's runtime, when the caller has it at hand (finding the
        running loop costs a system call, ``getpid``, in CPython's asyncio).
        """
        if rt is None:
            rt = runtime.current()
        home = self._home
        if home is not None and home() is rt:
            return self
        driver = rt.instances.get(self)
        if driver is not None:
            return driver
        return self._attach(rt)

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The loop of this driver (it runs in it: ``here`` handed it out there)."""
        home = self._home
        rt = home() if home is not None else None
        return rt.loop if rt is not None else asyncio.get_running_loop()

    def _attach(self, rt: runtime.Runtime) -> RemoteStorage[OptionsT]:
        if self._dead:
            raise StorageError(f"storage {self.name!r} is closed")
        with self._claim:
            free = self._home is None and self._origin is None
            if free:  # the registered object serves this loop
                self._home = weakref.ref(rt)
        if free:
            driver = self
            self._reset_loop_state()
        else:
            options: Any = self.options  # narrowed to RemoteOptions above; the same object
            driver = type(self)(self.name, self.url, options)
            driver._origin = self
            driver._breaker = self._breaker
            driver.stats = self.stats
            driver._home = weakref.ref(rt)
        rt.instances[self] = driver
        return driver

    async def _ensure_connected(self) -> None:
        """Connect this loop's driver once; concurrent callers share the attempt."""
        if self._connected:
            return
        attempt = self._connecting
        if attempt is None:
            attempt = self._connecting = asyncio.ensure_future(self._connect_once())
            attempt.add_done_callback(self._connect_done)
        await asyncio.shield(attempt)

    def _connect_done(self, attempt: asyncio.Future[None]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._connected = True

    async def _connect_once(self) -> None:
        timeout = self.options.timeout
        try:
            await asyncio.wait_for(self._connect(), timeout)
        except BaseException as exc:
            # Release whatever _connect built before it failed, within the timeout too.
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._close(), timeout)
            if isinstance(exc, StorageError) or not isinstance(exc, Exception):
                raise
            if isinstance(exc, (asyncio.TimeoutError, TimeoutError, *self.timeout_errors)):
                raise StorageTimeoutError(
                    f"storage {self.name!r} ({redact(self.url)}): cannot connect within "
                    f"{timeout:g}s: {_shorten(describe(exc, self.url))}"
                ) from exc
            kind = StorageMisconfiguredError if self.misconfigured(exc) else StorageError
            raise kind(
                f"storage {self.name!r} ({redact(self.url)}): cannot connect: "
                f"{_shorten(describe(exc, self.url))}"
            ) from exc

    # -- what the framework calls ---------------------------------------------------------

    async def connect(self) -> None:
        """Connect in the running loop (``register_storage`` calls it).

        Takes at most twice ``timeout``: the attempt, then the cleanup of a failed attempt.
        Raises ``StorageError`` (``StorageTimeoutError`` when the server does not answer).
        """
        driver = self.here()
        try:
            await driver._ensure_connected()
        except BaseException:
            if driver is not self:
                await driver.close_loop()
            raise

    def note_unreachable(self, exc: StorageError) -> None:
        """Count a failed connect at registration toward the breaker, as an operation would."""
        self.stats.errors += 1
        self._breaker.failures = max(self._breaker.failures, self.options.breaker_threshold - 1)
        self._failed()

    async def close(self) -> None:
        """Close this storage for good, in every event loop that has a driver for it.

        The running loop's driver is closed here; a driver of a loop running in another thread
        is closed in that loop (waiting at most ``timeout`` for it); a driver of a loop that is
        no longer running is dropped, its sockets left to the garbage collector. Queued and
        running operations fail with ``StorageError``. Raises ``StorageError`` naming the
        storage if a driver could not be closed.
        """
        self._dead = True
        current = runtime.current()
        closes = []
        for rt in runtime.live():
            driver = rt.instances.get(self)
            if driver is not None:
                closes.append(self._close_driver(driver, rt, rt is current))
        # At once: each loop within ``timeout``, not one after the other.
        outcomes = await asyncio.gather(*closes, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # this task is being cancelled
        failures = [o for o in outcomes if isinstance(o, Exception)]
        if failures:
            raise StorageError(
                f"storage {self.name!r}: {len(failures)} event loop(s) could not close their "
                f"connections: {describe(failures[0], self.url)}"
            ) from failures[0]

    async def _close_driver(
        self, driver: RemoteStorage[Any], rt: runtime.Runtime, here: bool
    ) -> None:
        """Close ``driver``, the one of ``rt``'s loop (``here``: the running loop)."""
        if here:
            await driver.close_loop()
        elif rt.closed:
            pass  # that loop is shutting down: its shutdown closes its drivers
        elif rt.loop.is_running() and not rt.loop.is_closed():
            handed = asyncio.run_coroutine_threadsafe(driver.close_loop(), rt.loop)
            closing = asyncio.wrap_future(handed)
            try:
                await asyncio.wait_for(asyncio.shield(closing), self.options.timeout)
            except (asyncio.CancelledError, asyncio.TimeoutError) as exc:
                if not (closing.cancelled() or rt.closed or not rt.loop.is_running()):
                    if isinstance(exc, asyncio.CancelledError):
                        raise  # this task is being cancelled
                    raise TimeoutError(
                        f"the event loop of thread {rt.thread} did not run the close "
                        f"within timeout = {self.options.timeout} s (it is blocked "
                        "or busy)"
                    ) from None
                # That loop shut down meanwhile, before or while running our close:
                # its own shutdown closes its drivers (see runtime).
                driver.drop_loop()
        else:
            driver.drop_loop()

    async def close_loop(self) -> None:
        """Close this loop's driver: fail queued and running operations, close the client."""
        self._closed = True
        for pending in (self._reads, self._writes, self._adds, self._removes):
            self._abandon(pending)
        for task in list(self._tasks):
            task.cancel()
        self._deadlines.expire_all()  # operations in callers' tasks: they fail at once
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # A runner cancelled before its first step never ran: settle its calls here.
        for pending in self._flushing:
            self._abandon(pending)
        self._flushing.clear()
        # Nor did the writes it had registered: their markers would hold their keys for good.
        for write in list(self._key_writes.values()):
            if isinstance(write, asyncio.Task):
                write.cancel()
            else:
                _mark_done(write)
        self._key_writes.clear()
        attempt = self._connecting
        if attempt is not None:
            attempt.cancel()
        try:
            # Bounded: a client may talk to the server while closing (pymongo ends its
            # sessions), and a server that stopped answering would hold close() for long.
            await asyncio.wait_for(self._close(), self.options.timeout)
        except asyncio.TimeoutError:
            # The storage is closed all the same (nothing more runs on it): a warning, not
            # an error for a program that is shutting down.
            logger.warning(
                "cacheme: storage %r: closing its connections took longer than %gs; what is "
                "left open is dropped (the garbage collector closes the sockets)",
                self.name,
                self.options.timeout,
            )
        finally:
            self._connected = False
            self.drop_loop()

    def drop_loop(self) -> None:
        """Forget the loop this driver served (its connections are closed or abandoned)."""
        origin = self._origin if self._origin is not None else self
        with origin._claim:
            home = self._home() if self._home is not None else None
            self._connected = False
            self._home = None  # last: from here another loop may take it (see _attach)
        if home is not None and home.instances.get(origin) is self:
            with contextlib.suppress(KeyError):  # another thread's drop_loop of it
                del home.instances[origin]

    def _abandon(self, pending: _Pending[Any, Any]) -> None:
        error = StorageError(f"storage {self.name!r} was closed before the operation finished")
        calls = list(pending.calls)
        pending.calls.clear()
        for _, sink in calls:
            _deliver(sink, error, True)

    # get_many and set_many hand back the batch's own future when coalescing: no coroutine
    # frame between the caller and the flush (they sit on every remote read and write).

    def get_many(self, keys: Sequence[str]) -> Awaitable[dict[str, bytes]]:
        """Values found for ``keys``; raises ``StorageError`` on failure or timeout.

        A key no driver can send (not encodable as UTF-8, e.g. a lone surrogate) can never
        be stored: it reads as absent, and writes and removals of it do nothing; the other
        keys of the same call go ahead, and none of this counts toward the breaker.
        """
        driver = self.here()
        if keys and driver.options.coalesce:
            return driver._submit(driver._reads, keys)
        return driver._get_many_now(keys)

    def read_many(
        self, keys: Sequence[str], done: Reader, rt: runtime.Runtime | None = None
    ) -> None:
        """Like ``get_many``, but ``done.delivered`` is called with the values found (a dict)
        or the ``StorageError``, from the batch's own task: no future, no extra loop turn.

        ``done.delivered`` must not raise; it is called exactly once. ``rt`` as for ``here``.
        """
        driver = self.here(rt)
        if driver.options.coalesce:
            driver._submit(driver._reads, keys, done)
            return

        def settle(task: asyncio.Future[dict[str, bytes]]) -> None:
            if task.cancelled():
                done.delivered(StorageError(f"storage {self.name!r}: read cancelled"))
            else:
                exc = task.exception()
                done.delivered(exc if exc is not None else task.result())

        asyncio.ensure_future(driver._get_many_now(keys)).add_done_callback(settle)

    def read_now(
        self, keys: Sequence[str], rt: runtime.Runtime | None = None
    ) -> Awaitable[dict[str, bytes]] | None:
        """The read of ``keys``, sent at once from the caller's own task, when this loop's
        driver is idle: no read under way, nothing queued in this turn, no write or removal
        of these keys under way, every key sendable, and no more keys than ``batch_size``
        (one round trip). ``None`` otherwise: then queue it (``read_many``), which splits
        it into batches.

        A lone caller thus pays one round trip and no extra loop turn; under load, reads
        are always under way, so they keep coalescing per turn. Raises like ``get_many``.
        ``rt`` as for ``here``.
        """
        driver = self.here(rt)
        if (
            driver._reading
            or driver._reads.calls
            or len(keys) > driver.options.batch_size
            or not driver._can_go_direct(keys)
        ):
            return None
        return driver._call(driver._get_many, keys, len(keys), "read", True)

    def _can_go_direct(self, keys: Iterable[str]) -> bool:
        """What ``read_now`` and ``write_now`` both need: coalescing on, no write, add or
        removal queued in this turn (they go first) or under way for ``keys``, the driver
        open, every key sendable."""
        if (
            not self.options.coalesce
            or self._writes.calls
            or self._adds.calls
            or self._removes.calls
            or self._closed
            or self._dead
            or sys.version_info < (3, 11)  # close() could not end it early (see _call)
        ):
            return False
        key_writes = self._key_writes
        for key in keys:  # a loop, not all(): no generator on a lone get's path
            if key in key_writes or not (key.isascii() or utf8_encodable(key)):
                return False
        return True

    async def _get_many_now(self, keys: Sequence[str]) -> dict[str, bytes]:
        unique = _unique(_sendable(keys))
        if not unique:
            return {}
        if self._key_writes:  # writes or removals of these keys still under way
            await self._after_writes(unique)
        return await self._read_all(self._get_many, unique)

    async def _read_all(
        self, op: Callable[[Sequence[str]], Awaitable[dict[str, R]]], keys: list[str]
    ) -> dict[str, R]:
        """``op`` (a read) of ``keys`` in batches of at most ``batch_size``; raises the
        first failure."""
        if len(keys) <= self.options.batch_size:
            return await self._call(op, keys, len(keys), "read")
        found: dict[str, R] = {}
        for _, result in await self._chunked(op, keys, "read"):
            if isinstance(result, BaseException):
                raise result
            found.update(result)
        return found

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many((key,))).get(key)

    async def remaining_ttl(self, keys: Sequence[str]) -> dict[str, float]:
        """Seconds each stored entry of ``keys`` has left (``math.inf``: no expiry), in one
        round trip per ``batch_size`` keys; keys not stored, or whose lifetime the backend
        cannot tell, are left out. Raises ``StorageError`` like a read."""
        if not keys:
            return {}
        driver = self.here()
        unique = _unique(_sendable(keys))
        if not unique:
            return {}
        return await driver._read_all(driver._ttl_many, unique)

    async def _ttl_many(self, keys: Sequence[str]) -> dict[str, float]:
        """Backends that can tell an entry's remaining lifetime override this."""
        return {}

    def set_many(
        self, entries: Sequence[Entry], rt: runtime.Runtime | None = None
    ) -> Awaitable[None]:
        """Write ``entries``; raises ``StorageError`` on failure or timeout. ``rt`` as for
        ``here``."""
        driver = self.here(rt)
        if entries and driver.options.coalesce:
            write: Awaitable[None] = driver._submit(driver._writes, entries)
        else:
            write = driver._set_many_now(entries)
        if entries and isinstance(write, asyncio.Future):
            # A tuple of str leaves the garbage collector's lists at its first collection.
            keys = (entries[0].key,) if len(entries) == 1 else tuple(e.key for e in entries)
            landing.note(keys, write, self._revoker)
        return write

    def _set_many_now(self, entries: Sequence[Entry]) -> Awaitable[None]:
        return self._write_uncoalesced(entries, self._set_many, _last_per_key)

    def _write_uncoalesced(
        self,
        entries: Sequence[Entry],
        op: Callable[[Sequence[Entry]], Awaitable[None]],
        pick: Callable[[Sequence[Entry]], list[Entry]],
    ) -> Awaitable[None]:
        """A write or add with coalescing off: its own round trip per ``batch_size`` entries,
        ordered per key; ``pick`` keeps one entry per key (the last write, the first add).

        Registered for ordering when called, not when first awaited: a removal or read of
        its keys issued afterwards (an ``invalidate``) waits for it, whenever its caller
        gets to await it. Shielded: a cancelled caller does not leave a half-known write.
        """
        unique = pick(_sendable_entries(entries)) if entries else []
        if not unique:
            return _completed(None)
        task = self._ordered([e.key for e in unique], lambda: self._write_all(unique, op))
        return asyncio.shield(task)

    def write_now(
        self, entries: Sequence[Entry], rt: runtime.Runtime | None = None
    ) -> Awaitable[None] | None:
        """The write of ``entries``, sent at once from the caller's own task, when this loop's
        driver has no write, add or removal queued or under way and every key is sendable;
        ``None`` otherwise (then use ``set_many``, which coalesces per turn).

        The write is registered for ordering when this is called (later reads and writes
        of its keys wait for it), so the returned awaitable must be awaited (or wrapped in
        a task) at once. Raises like ``set_many``; an entry the server refuses fails alone.
        ``rt`` as for ``here``.
        """
        driver = self.here(rt)
        unique = _last_per_key(entries)
        keys = [e.key for e in unique]
        # Under load writes are under way: they keep coalescing per turn.
        if driver._writing or not driver._can_go_direct(keys):
            return None
        marker: asyncio.Future[None] = driver._loop().create_future()
        driver._hold(keys, marker)
        landing.note(keys, marker, self._revoker)
        return driver._write_direct(unique, keys, marker)

    async def _write_direct(
        self, entries: list[Entry], keys: list[str], marker: asyncio.Future[None]
    ) -> None:
        self._writing += 1
        try:
            await self._write_all(entries, self._set_many)
        finally:
            self._writing -= 1
            _mark_done(marker)
            self._release(keys, marker)

    async def _write_all(
        self, entries: list[Entry], op: Callable[[Sequence[Entry]], Awaitable[None]]
    ) -> None:
        """Write ``entries`` with ``op`` in batches of at most ``batch_size`` (see
        ``_write_isolating``); raises the first failure once every batch is over."""
        for _, result in await self._write_isolating(entries, op):
            if isinstance(result, BaseException):
                raise result

    def _remove_revoked(self, keys: Sequence[str]) -> asyncio.Future[None] | None:
        """A write of ``keys`` landed after an ``invalidate`` or ``refresh`` elsewhere gave
        up waiting for it, or another process changed them (see ``landing``): remove them
        again, after it, from this loop. The removal's future; ``None`` if closed."""
        try:
            removal = self.remove_many(keys)
        except StorageError:  # closed meanwhile: nothing more to do here
            return None
        future = asyncio.ensure_future(removal)
        future.add_done_callback(retrieve_outcome)
        return future

    def add_many(self, entries: Sequence[Entry]) -> Awaitable[None]:
        """Store each entry only if its key is absent (or expired); return nothing.

        Batched per event-loop turn, timed out, counted and ordered like ``set_many`` (an add
        waits for the writes already issued for its key; within one batch, the plain writes
        of a key land before its adds, and the first add of a key wins). Whether an entry
        was stored is not reported: read the key back to know which value it holds. Raises
        ``StorageError`` on failure or timeout.
        """
        driver = self.here()
        if entries and driver.options.coalesce:
            return driver._submit(driver._adds, entries)
        return driver._add_many_now(entries)

    def _add_many_now(self, entries: Sequence[Entry]) -> Awaitable[None]:
        return self._write_uncoalesced(entries, self._add_many, _first_per_key)

    def remove_many(self, keys: Sequence[str]) -> Awaitable[None]:
        """Delete ``keys``; ordered after every write already issued to this storage.

        The removal is queued when this is called, not when it is awaited: a read issued
        afterwards (even in the same event-loop turn) waits for it.
        """
        if not keys:
            return _completed(None)
        driver = self.here()
        if not driver.options.coalesce:
            unique_keys = _unique(_sendable(keys))
            if not unique_keys:
                return _completed(None)
            return driver._ordered(unique_keys, lambda: driver._remove_all(unique_keys))
        return driver._submit(driver._removes, keys)

    async def _remove_all(self, keys: list[str]) -> None:
        """Remove ``keys`` in batches of at most ``batch_size``; raises the first failure."""
        for _, result in await self._chunked(self._remove_many, keys, "remove"):
            if isinstance(result, BaseException):
                raise result

    @property
    def breaker_open(self) -> bool:
        return self._breaker.open_until > time.monotonic()

    # -- machinery --------------------------------------------------------------------------

    @overload
    def _submit(self, pending: _Pending[T, R], items: Sequence[T]) -> asyncio.Future[R]: ...

    @overload
    def _submit(self, pending: _Pending[T, R], items: Sequence[T], sink: Reader) -> None: ...

    def _submit(
        self,
        pending: _Pending[T, R],
        items: Sequence[T],
        sink: Reader | None = None,
    ) -> asyncio.Future[R] | None:
        if self._closed or self._dead:
            error = StorageError(f"storage {self.name!r} is closed")
            if sink is None:
                raise error
            sink.delivered(error)
            return None
        if pending is self._removes:
            self._removed.update(items)  # type: ignore[arg-type]
        elif (
            self._removed  # a write or add of a key removed earlier in this turn seals it
            and (pending is self._writes or pending is self._adds)
            and any(entry.key in self._removed for entry in items)  # type: ignore[attr-defined]
        ):
            adding = pending is self._adds
            self._seal_turn()
            pending = self._adds if adding else self._writes  # type: ignore[assignment]
        fut: asyncio.Future[R] | None = None
        if sink is None:
            fut = self._loop().create_future()
            pending.calls.append((items, fut))
        else:
            pending.calls.append((items, sink))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # The task's first step runs after every callback already ready in this loop
            # iteration, so all the operations issued in this turn land in one batch.
            self._spawn(self._run_turn())
        return fut

    def _seal_turn(self) -> None:
        """Register the writes, adds and removals queued so far in this turn now, as a batch
        of their own: what is queued after them (a write or an add of a key removed earlier
        in the turn) lands after them, as if issued one after another."""
        writes, adds, removes = self._take_changes()
        self._flushing |= {writes, adds, removes}
        self._writing += 1
        # Tasks, not coroutines: a runner cancelled (close) before its first step would
        # leave coroutines that never ran.
        jobs = [self._spawn(job) for job in self._register_writes(writes, adds, removes)]
        self._spawn(self._run_writes(writes, adds, removes, jobs))

    def _take_changes(
        self,
    ) -> tuple[_Pending[Entry, None], _Pending[Entry, None], _Pending[str, None]]:
        """The writes, adds and removals queued so far (unsendable keys taken out), and
        fresh batches in their place."""
        writes, self._writes = self._writes, _Pending()
        adds, self._adds = self._adds, _Pending()
        removes, self._removes = self._removes, _Pending()
        if self._removed:
            self._removed = set()
        _reject_bad_keys(writes, _entry_key, None)
        _reject_bad_keys(adds, _entry_key, None)
        _reject_bad_keys(removes, _same, None)
        return writes, adds, removes

    async def _run_turn(self) -> None:
        """Take what this turn queued and run it: reads here, writes and removes in a task
        of their own when both kinds are waiting (a slow write never delays a read)."""
        self._flush_scheduled = False
        reads, self._reads = self._reads, _Pending()
        writes, adds, removes = self._take_changes()
        _reject_bad_keys(reads, _same, {})
        if reads.calls:
            self._flushing.add(reads)  # settled by close() if this task never gets to them
        if writes.calls or adds.calls or removes.calls:
            self._flushing |= {writes, adds, removes}
            # Counted from now (not when _run_writes starts): no direct write may slip in
            # before this turn's writes register their keys.
            self._writing += 1
            if not reads.calls:
                await self._run_writes(writes, adds, removes)
                return
            if _overlap(reads, writes, adds, removes):
                # A read never overtakes a write or removal issued before it for its key:
                # it would bring back what an invalidate() just removed.
                await self._run_writes(writes, adds, removes)
            else:
                self._spawn(self._run_writes(writes, adds, removes))
        if reads.calls:
            await self._run_reads(reads)

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        """Run ``coro`` in a task that ``close`` cancels."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_reads(self, pending: _Pending[str, dict[str, bytes]]) -> None:
        self._reading += 1
        try:
            calls = pending.calls
            if len(calls) == 1:
                keys = list(calls[0][0])
            else:
                keys = _unique([k for items, _ in calls for k in items])
            if self._key_writes:  # writes or removals of these keys still under way
                await self._after_writes(keys)
            found: dict[str, bytes] = {}
            failed: dict[str, BaseException] = {}
            if len(keys) <= self.options.batch_size:  # one round trip, no list of chunks
                try:
                    found = await self._call(self._get_many, keys, len(keys), "read")
                except Exception as exc:
                    failed = dict.fromkeys(keys, exc)
            else:
                for chunk, result in await self._chunked(self._get_many, keys, "read"):
                    if isinstance(result, BaseException):
                        failed.update(dict.fromkeys(chunk, result))
                    else:
                        found.update(result)
            calls = list(calls)
            pending.calls.clear()
            for items, sink in calls:
                error = next((failed[k] for k in items if k in failed), None) if failed else None
                if error is not None:
                    _deliver(sink, error, True)
                elif len(items) == 1:  # a get's read: no comprehension for one key
                    key = items[0]
                    value = found.get(key)
                    _deliver(sink, {} if value is None else {key: value}, False)
                else:
                    _deliver(sink, {k: found[k] for k in items if k in found}, False)
        finally:
            self._reading -= 1
            self._abandon(pending)  # no-op unless cancelled (close) before settling
            self._flushing.discard(pending)

    async def _run_writes(
        self,
        writes: _Pending[Entry, None],
        adds: _Pending[Entry, None],
        removes: _Pending[str, None],
        jobs: Sequence[Awaitable[None]] | None = None,
    ) -> None:
        """Run a turn's writes, adds and removals (``jobs``: already registered, see
        ``_seal_turn``)."""
        try:
            if jobs is None:
                jobs = self._register_writes(writes, adds, removes)
            if len(jobs) == 1:
                await jobs[0]
            else:
                await asyncio.gather(*jobs)
        finally:
            self._writing -= 1  # counted by _run_turn
            # On cancellation (close), the calls are still unsettled: fail them.
            self._abandon(writes)
            self._abandon(adds)
            self._abandon(removes)
            self._flushing.discard(writes)
            self._flushing.discard(adds)
            self._flushing.discard(removes)

    def _register_writes(
        self,
        writes: _Pending[Entry, None],
        adds: _Pending[Entry, None],
        removes: _Pending[str, None],
    ) -> list[Awaitable[None]]:
        """Register a turn's writes, adds and removals for ordering; what to await to run
        them and settle their calls."""
        # Every write, add and removal of the turn is registered (per key, in that order)
        # before anything is awaited: a later read or write of one of its keys waits for it,
        # and a removal waits only for the writes of its own keys, never for unrelated ones.
        # (A write or add of a key the turn removed before it seals what came first: see
        # _seal_turn.)
        jobs: list[Awaitable[None]] = []
        if writes.calls:
            jobs.append(self._flush_writes(writes, self._set_many, _last_per_key))
        if adds.calls:
            jobs.append(self._flush_writes(adds, self._add_many, _first_per_key))
        if removes.calls:
            keys = _unique([k for items, _ in removes.calls for k in items])
            removal = self._ordered(keys, lambda: self._chunked(self._remove_many, keys, "remove"))
            jobs.append(_settle_removes(removes, removal))
        return jobs

    def _flush_writes(
        self,
        pending: _Pending[Entry, None],
        op: Callable[[Sequence[Entry]], Awaitable[None]],
        pick: Callable[[Sequence[Entry]], list[Entry]],
    ) -> Awaitable[None]:
        """Register the queued writes (or adds) of ``pending`` with ``op``, ordered per key;
        the awaitable settles each call. ``pick`` keeps one entry per key (the last write,
        the first add)."""
        entries = pick([e for items, _ in pending.calls for e in items])
        keys = [e.key for e in entries]
        if any(k in self._key_writes for k in keys):
            task = self._ordered(keys, lambda: self._write_isolating(entries, op))
            return _settle_writes(pending, task)
        # Nothing of these keys under way: no task to order it after anything. The write
        # runs in the caller's task (the turn's runner), two event-loop turns sooner, and a
        # marker stands for it in the meantime.
        marker: asyncio.Future[None] = self._loop().create_future()
        self._hold(keys, marker)
        return self._write_marked(pending, entries, op, keys, marker)

    async def _write_marked(
        self,
        pending: _Pending[Entry, None],
        entries: list[Entry],
        op: Callable[[Sequence[Entry]], Awaitable[None]],
        keys: list[str],
        marker: asyncio.Future[None],
    ) -> None:
        try:
            results = await self._write_isolating(entries, op)
        finally:
            _mark_done(marker)
            self._release(keys, marker)
        failed = {e.key: r for chunk, r in results if isinstance(r, BaseException) for e in chunk}
        _settle(pending, failed, _entry_key)

    async def _write_isolating(
        self, entries: list[Entry], op: Callable[[Sequence[Entry]], Awaitable[None]]
    ) -> list[tuple[list[Entry], BaseException | None]]:
        """Write ``entries`` with ``op`` in chunks; a chunk refused for another reason than a
        timeout or the open breaker is written again entry by entry, so that one entry the
        server refuses (too large, say) fails alone instead of failing its neighbours."""
        results = await self._chunked(op, entries, "write")
        out: list[tuple[list[Entry], BaseException | None]] = []
        for chunk, result in results:
            if (
                len(chunk) > 1
                and isinstance(result, StorageError)
                and not isinstance(result, (StorageTimeoutError, StorageUnavailableError))
            ):
                singles = await asyncio.gather(
                    *(self._call(op, [e], 1, "write") for e in chunk),
                    return_exceptions=True,
                )
                out += [([e], r) for e, r in zip(chunk, singles, strict=True)]
            else:
                out.append((chunk, result))
        return out

    def _ordered(self, keys: list[str], op: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        """Start ``op`` (a write or removal of ``keys``) after the writes and removals already
        issued for those keys, and register it at once, so that what comes later waits."""
        before = {id(f): f for k in keys if (f := self._key_writes.get(k)) is not None}

        async def run() -> T:
            if before:
                await asyncio.gather(*before.values(), return_exceptions=True)
            return await op()

        task = self._spawn(run())
        self._hold(keys, task)
        task.add_done_callback(lambda done: self._release(keys, done))
        return task

    def _hold(self, keys: Sequence[str], write: asyncio.Future[Any]) -> None:
        """Register ``write`` as the latest write or removal of ``keys``: later reads,
        writes and removals of them wait for it."""
        key_writes = self._key_writes
        for key in keys:
            key_writes[key] = write

    def _release(self, keys: Sequence[str], write: asyncio.Future[Any]) -> None:
        """``write`` is done: forget it for the keys it is still the latest of."""
        key_writes = self._key_writes
        for key in keys:
            if key_writes.get(key) is write:
                del key_writes[key]

    async def _after_writes(self, keys: Sequence[str]) -> None:
        """Wait for the writes already issued for ``keys``."""
        pending = {id(f): f for k in keys if (f := self._key_writes.get(k)) is not None}
        if pending:
            await asyncio.gather(*pending.values(), return_exceptions=True)

    async def _chunked(
        self, op: Callable[[Sequence[T]], Awaitable[R]], items: list[T], kind: str
    ) -> list[tuple[list[T], R | BaseException]]:
        size = self.options.batch_size
        if len(items) <= size:  # the common case: no task for a lone chunk
            try:
                return [(items, await self._call(op, items, len(items), kind))]
            except Exception as exc:
                return [(items, exc)]
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        results = await asyncio.gather(
            *(self._call(op, chunk, len(chunk), kind) for chunk in chunks),
            return_exceptions=True,
        )
        return list(zip(chunks, results, strict=True))

    async def _call(
        self,
        op: Callable[[Sequence[T]], Awaitable[R]],
        items: Sequence[T],
        n: int,
        kind: str,
        direct: bool = False,
    ) -> R:
        """One round trip with the timeout, the breaker, error wrapping and counting.

        The first operation of a loop's driver connects it first, within the same timeout
        budget as an operation (a failed connect counts like a failed operation). ``direct``:
        a read sent from a caller's own task (``read_now``), counted in ``_reading`` while
        it runs.
        """
        if self._closed or self._dead:  # a write ordered behind others, reached after close()
            raise StorageError(f"storage {self.name!r} is closed")
        stats = self.stats
        breaker = self._breaker
        trial = 0.0
        if breaker.open_until:
            if breaker.open_until > time.monotonic():
                stats.rejected += 1
                raise StorageUnavailableError(
                    f"storage {self.name!r}: skipped for {self.options.breaker_cooldown:g}s "
                    f"after {self.options.breaker_threshold} consecutive failures"
                )
            # Half-open: this call is the one trial; others stay rejected until it settles.
            trial = breaker.open_until = time.monotonic() + self.options.breaker_cooldown
        if direct:
            self._reading += 1
        try:
            if not self._connected:
                try:
                    await self._ensure_connected()
                except asyncio.CancelledError:
                    cancelling = getattr(asyncio.current_task(), "cancelling", None)  # 3.11+
                    if self._closed and cancelling is not None and not cancelling():
                        # close() cancelled the shared connect attempt, not this caller
                        raise StorageError(
                            f"storage {self.name!r} was closed before the operation finished"
                        ) from None
                    raise
                except StorageError as exc:
                    if isinstance(exc, StorageTimeoutError):
                        stats.timeouts += 1
                    else:
                        stats.errors += 1
                    self._failed()
                    raise
            stats.round_trips += 1
            try:
                if sys.version_info >= (3, 11):  # Task.uncancel: no task per operation
                    deadlines = self._deadlines
                    token = deadlines.begin()
                    try:
                        result = await op(items)
                    except asyncio.CancelledError:
                        if deadlines.end(token):
                            raise TimeoutError from None
                        raise
                    except BaseException:
                        deadlines.end(token)
                        raise
                    deadlines.end(token)
                else:  # pragma: no cover - Python 3.10
                    result = await asyncio.wait_for(op(items), self.options.timeout)
            except Exception as exc:
                if self._closed:
                    raise StorageError(
                        f"storage {self.name!r} was closed before the operation finished"
                    ) from exc
                if isinstance(exc, (asyncio.TimeoutError, TimeoutError, *self.timeout_errors)):
                    stats.timeouts += 1
                    self._failed()
                    raise StorageTimeoutError(
                        f"storage {self.name!r}: {kind} of {n} key(s) took longer than "
                        f"{self.options.timeout:g}s"
                    ) from exc
                stats.errors += 1
                self._failed()
                raise StorageError(
                    f"storage {self.name!r}: {kind} of {n} key(s) failed: {describe(exc, self.url)}"
                ) from exc
        except asyncio.CancelledError:
            # A trial whose caller gave up before the outcome: unless another call has closed
            # or reopened the breaker since, the next call is the trial instead.
            if trial and breaker.open_until == trial:
                breaker.open_until = time.monotonic()
            raise
        finally:
            if direct:
                self._reading -= 1
        breaker.failures = 0
        breaker.open_until = 0.0
        if kind == "read":
            stats.keys_read += n
        elif kind == "write":
            stats.keys_written += n
        else:
            stats.keys_removed += n
        return result

    def _failed(self) -> None:
        breaker = self._breaker
        breaker.failures += 1
        if breaker.failures >= self.options.breaker_threshold:
            if breaker.failures == self.options.breaker_threshold:
                self.stats.breaker_opens += 1
                logger.warning(
                    "cacheme: storage %r failed %d times in a row; skipping it for %gs",
                    self.name,
                    breaker.failures,
                    self.options.breaker_cooldown,
                )
            breaker.open_until = time.monotonic() + self.options.breaker_cooldown


def _overlap(
    reads: _Pending[str, Any],
    writes: _Pending[Entry, None],
    adds: _Pending[Entry, None],
    removes: _Pending[str, None],
) -> bool:
    """Whether a key read in this turn is also written, added or removed in it."""
    changed = {e.key for p in (writes, adds) for items, _ in p.calls for e in items}
    changed.update(k for items, _ in removes.calls for k in items)
    return any(k in changed for items, _ in reads.calls for k in items)


def _same(key: str) -> str:
    return key


def _entry_key(entry: Entry) -> str:
    return entry.key


def utf8_encodable(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogate): a key a driver can send, a
    string MessagePack can hold."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sendable(keys: Sequence[str]) -> list[str]:
    """``keys`` without the ones no driver can send (they can never be stored)."""
    return [k for k in keys if utf8_encodable(k)]


def _sendable_entries(entries: Sequence[Entry]) -> list[Entry]:
    """``entries`` without the ones whose key no driver can send (never stored)."""
    return [e for e in entries if utf8_encodable(e.key)]


def _reject_bad_keys(
    pending: _Pending[T, Any], key_of: Callable[[T], str], nothing_left: Any
) -> None:
    """Take the keys no driver can send out of the calls of ``pending``: the rest of each
    call goes ahead (a bad key never fails its neighbours). A call left with nothing gets
    ``nothing_left``: what the operation gives for keys that cannot be stored ({} for a
    read: a miss; None for a write or a removal: nothing to do)."""
    calls = pending.calls
    if not calls:
        return
    # The usual batch is all ASCII: one check over the joined keys, no pass per call.
    if key_of is _same:
        joined = "".join([k for items, _ in calls for k in items])  # type: ignore[misc]
    else:
        joined = "".join([key_of(item) for items, _ in calls for item in items])
    if joined.isascii():
        return
    for i, (items, sink) in enumerate(pending.calls):
        if all(utf8_encodable(key_of(item)) for item in items):
            continue
        pending.calls[i] = ([item for item in items if utf8_encodable(key_of(item))], sink)
    for call in [c for c in pending.calls if not c[0]]:
        pending.calls.remove(call)
        _deliver(call[1], nothing_left, False)


def retrieve_outcome(fut: asyncio.Future[Any]) -> None:
    """Retrieve a fire-and-forget operation's outcome (counted and logged where it failed)."""
    if not fut.cancelled():
        fut.exception()


def _mark_done(marker: asyncio.Future[None]) -> None:
    """The write a marker stands for is over. A waiter's ``gather`` may have cancelled the
    marker meanwhile (``close`` cancels the runners): it is done then all the same."""
    if not marker.done():
        marker.set_result(None)


def _completed(value: T) -> asyncio.Future[T]:
    fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


async def _settle_writes(
    pending: _Pending[Entry, None], task: asyncio.Task[list[tuple[list[Entry], Any]]]
) -> None:
    results = await asyncio.shield(task)
    failed = {e.key: r for chunk, r in results if isinstance(r, BaseException) for e in chunk}
    _settle(pending, failed, _entry_key)


async def _settle_removes(
    pending: _Pending[str, None], task: asyncio.Task[list[tuple[list[str], Any]]]
) -> None:
    removed = await asyncio.shield(task)
    failed = {k: r for chunk, r in removed if isinstance(r, BaseException) for k in chunk}
    _settle(pending, failed, _same)


def _settle(
    pending: _Pending[T, None], failed: dict[str, BaseException], key_of: Callable[[T], str]
) -> None:
    """Settle each queued call: the error of its first failed key, if any, else done."""
    if not failed:  # the usual case: one pass, no per-call search
        for _, sink in pending.calls:
            _deliver(sink, None, False)
        return
    for items, sink in pending.calls:
        error = next((failed[k] for k in map(key_of, items) if k in failed), None)
        if error is not None:
            _deliver(sink, error, True)
        else:
            _deliver(sink, None, False)


def _unique(keys: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(keys))


def _last_per_key(entries: Sequence[Entry]) -> list[Entry]:
    return list({e.key: e for e in entries}.values())


def _first_per_key(entries: Sequence[Entry]) -> list[Entry]:
    first: dict[str, Entry] = {}
    for e in entries:
        first.setdefault(e.key, e)
    return list(first.values())


def describe(exc: BaseException, url: str) -> str:
    """``exc`` as text, with every credential of ``url`` scrubbed out."""
    return scrub(f"{type(exc).__name__}: {exc}", url)


def _shorten(text: str, limit: int = 400) -> str:
    """Driver messages can embed whole topologies or values; keep errors readable."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more chars)"
