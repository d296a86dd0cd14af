"""The one storage contract.

A tier is either *local* (in-process, holds Python objects, answers synchronously) or
*remote* (holds bytes, answers asynchronously). Backends implement only raw operations:

- ``LocalStorage``: ``get``, ``set``, ``remove``.
- ``RemoteStorage``: ``_connect``, ``_close``, ``_get_many``, ``_set_many``, ``_remove_many``.

``RemoteStorage`` does everything else once, for every backend: coalescing the operations
issued in one event-loop turn into batches of at most ``batch_size``, the timeout (pool
waits included), the circuit breaker, wrapping driver errors into ``StorageError``, and the
per-storage counters. Keys arrive fully built (``{prefix}:{key}:{version}``); TTLs arrive as
whole milliseconds; values are the node serializer's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ..errors import StorageError, StorageTimeoutError, StorageUnavailableError
from .url import redact, scrub

logger = logging.getLogger("cacheme")

T = TypeVar("T")
R = TypeVar("R")


class Entry(NamedTuple):
    """One value to write: full key, encoded bytes, TTL in ms (``None`` = no expiry)."""

    key: str
    value: bytes
    ttl_ms: int | None


def ttl_to_ms(ttl: timedelta | None) -> int | None:
    """A tier TTL as whole milliseconds, never rounding a positive TTL down to zero."""
    if ttl is None:
        return None
    return max(1, round(ttl.total_seconds() * 1000))


class StorageOptions(BaseModel):
    """Options every storage accepts. Backends extend this; unknown options are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RemoteOptions(StorageOptions):
    """Options every remote storage accepts."""

    timeout: float = Field(
        default=3.0, gt=0, description="seconds one operation may take, pool wait included"
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
    """An in-process tier: Python objects, synchronous, no serializer."""

    local = True

    @abstractmethod
    def get(self, key: str) -> tuple[Any, bool]:
        """``(value, True)`` on a live hit, ``(None, False)`` otherwise."""

    @abstractmethod
    def set(self, key: str, value: Any, ttl: timedelta | None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` (``None``: until evicted)."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Drop ``key`` if present."""


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    """The calls of one operation kind waiting for the next flush."""

    calls: list[tuple[Sequence[T], asyncio.Future[R]]] = field(default_factory=list)


class RemoteStorage(BaseStorage[OptionsT]):
    """A tier behind the network (or a file): bytes in, bytes out, asynchronous."""

    local = False
    options_model: ClassVar[type[StorageOptions]] = RemoteOptions
    options: RemoteOptions  # type: ignore[assignment]

    def __init__(self, name: str, url: str, options: OptionsT) -> None:
        super().__init__(name, url, options)
        self._failures = 0
        self._open_until = 0.0
        self._reads: _Pending[str, dict[str, bytes]] = _Pending()
        self._writes: _Pending[Entry, None] = _Pending()
        self._removes: _Pending[str, None] = _Pending()
        self._flush_scheduled = False
        # The latest write task of each key with a write under way: later writes and removes
        # of the key wait for it, so what lands last on the server is what was issued last.
        self._key_writes: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._flushing: set[_Pending[Any, Any]] = set()  # handed to runner tasks, not settled

    # Driver exceptions that mean "the server did not answer in time"; counted as timeouts.
    timeout_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    # -- what backends implement -------------------------------------------------------

    @abstractmethod
    async def _connect(self) -> None:
        """Create the client or pool."""

    @abstractmethod
    async def _close(self) -> None:
        """Close the client or pool."""

    @abstractmethod
    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Live (unexpired) values of ``keys``, in one round trip; absent keys left out."""

    @abstractmethod
    async def _set_many(self, entries: Sequence[Entry]) -> None:
        """Upsert ``entries`` (distinct keys), each with its own TTL, in one round trip."""

    @abstractmethod
    async def _remove_many(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (distinct) in one round trip; absent keys are fine."""

    # -- what the framework calls ---------------------------------------------------------

    async def connect(self) -> None:
        try:
            await self._connect_or_raise()
        except BaseException:
            with contextlib.suppress(Exception):
                await self._close()  # release whatever _connect built before it failed
            raise

    async def _connect_or_raise(self) -> None:
        try:
            await asyncio.wait_for(self._connect(), self.options.timeout * 3)
        except StorageError:
            raise
        except Exception as exc:
            if isinstance(exc, (asyncio.TimeoutError, TimeoutError, *self.timeout_errors)):
                raise StorageTimeoutError(
                    f"storage {self.name!r} ({redact(self.url)}): cannot connect within "
                    f"{self.options.timeout * 3:g}s: {_shorten(describe(exc, self.url))}"
                ) from exc
            raise StorageError(
                f"storage {self.name!r} ({redact(self.url)}): cannot connect: "
                f"{_shorten(describe(exc, self.url))}"
            ) from exc

    async def close(self) -> None:
        """Fail queued and running operations with ``StorageError``, then close the driver."""
        self._closed = True
        for pending in (self._reads, self._writes, self._removes):
            self._abandon(pending)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # A runner cancelled before its first step never ran: settle its calls here.
        for pending in self._flushing:
            self._abandon(pending)
        self._flushing.clear()
        await self._close()

    def _abandon(self, pending: _Pending[Any, Any]) -> None:
        error = StorageError(f"storage {self.name!r} was closed before the operation finished")
        for _, fut in pending.calls:
            if not fut.done():
                fut.set_exception(error)
        pending.calls.clear()

    # get_many and set_many hand back the batch's own future when coalescing: no coroutine
    # frame between the caller and the flush (they sit on every remote read and write).

    def get_many(self, keys: Sequence[str]) -> Awaitable[dict[str, bytes]]:
        """Values found for ``keys``; raises ``StorageError`` on failure or timeout."""
        if keys and self.options.coalesce:
            return self._submit(self._reads, keys)
        return self._get_many_now(keys)

    async def _get_many_now(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        return await self._call(self._get_many, _unique(keys), len(keys), "read")

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many((key,))).get(key)

    def set_many(self, entries: Sequence[Entry]) -> Awaitable[None]:
        """Write ``entries``; raises ``StorageError`` on failure or timeout."""
        if entries and self.options.coalesce:
            return self._submit(self._writes, entries)
        return self._set_many_now(entries)

    async def _set_many_now(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        unique = _last_per_key(entries)
        await self._ordered_write(
            [e.key for e in unique],
            lambda: self._call(self._set_many, unique, len(unique), "write"),
        )

    async def remove_many(self, keys: Sequence[str]) -> None:
        """Delete ``keys``; ordered after every write already issued to this storage."""
        if not keys:
            return
        if not self.options.coalesce:
            unique_keys = _unique(keys)
            await self._after_writes(unique_keys)
            await self._call(self._remove_many, unique_keys, len(unique_keys), "remove")
            return
        await self._submit(self._removes, keys)

    @property
    def breaker_open(self) -> bool:
        return self._open_until > time.monotonic()

    # -- machinery --------------------------------------------------------------------------

    def _submit(self, pending: _Pending[T, R], items: Sequence[T]) -> asyncio.Future[R]:
        if self._closed:
            raise StorageError(f"storage {self.name!r} is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        pending.calls.append((items, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # call_soon runs after every callback already ready in this loop iteration,
            # so all the operations issued in this turn land in one flush.
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        reads, self._reads = self._reads, _Pending()
        writes, self._writes = self._writes, _Pending()
        removes, self._removes = self._removes, _Pending()
        if reads.calls:
            self._flushing.add(reads)
            self._spawn(self._run_reads(reads))
        if writes.calls or removes.calls:
            self._flushing |= {writes, removes}
            self._spawn(self._run_writes(writes, removes))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_reads(self, pending: _Pending[str, dict[str, bytes]]) -> None:
        try:
            await self._read_and_settle(pending)
        finally:
            self._abandon(pending)  # no-op unless cancelled (close) before settling
            self._flushing.discard(pending)

    async def _read_and_settle(self, pending: _Pending[str, dict[str, bytes]]) -> None:
        keys = _unique([k for items, _ in pending.calls for k in items])
        results = await self._chunked(self._get_many, keys, "read")
        found: dict[str, bytes] = {}
        failed: dict[str, BaseException] = {}
        for chunk, result in results:
            if isinstance(result, BaseException):
                failed.update(dict.fromkeys(chunk, result))
            else:
                found.update(result)
        for items, fut in pending.calls:
            if fut.done():
                continue
            error = next((failed[k] for k in items if k in failed), None)
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result({k: found[k] for k in items if k in found})

    async def _run_writes(
        self, writes: _Pending[Entry, None], removes: _Pending[str, None]
    ) -> None:
        try:
            await self._write_then_remove(writes, removes)
        finally:
            # On cancellation (close), the calls are still unsettled: fail them.
            self._abandon(writes)
            self._abandon(removes)
            self._flushing.discard(writes)
            self._flushing.discard(removes)

    async def _write_then_remove(
        self, writes: _Pending[Entry, None], removes: _Pending[str, None]
    ) -> None:
        if writes.calls:
            entries = _last_per_key([e for items, _ in writes.calls for e in items])
            results = await self._ordered_write(
                [e.key for e in entries], lambda: self._chunked(self._set_many, entries, "write")
            )
            failed = {
                e.key: r for chunk, r in results if isinstance(r, BaseException) for e in chunk
            }
            _settle(
                writes, lambda items: next((failed[e.key] for e in items if e.key in failed), None)
            )
        if removes.calls:
            keys = _unique([k for items, _ in removes.calls for k in items])
            await self._after_writes(keys)
            removed = await self._chunked(self._remove_many, keys, "remove")
            failed_keys = {
                k: r for chunk, r in removed if isinstance(r, BaseException) for k in chunk
            }
            _settle(
                removes,
                lambda items: next((failed_keys[k] for k in items if k in failed_keys), None),
            )

    async def _ordered_write(self, keys: list[str], op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` (a write of ``keys``) after the writes already issued for those keys.

        The task is registered before this coroutine first awaits, so issue order is kept;
        it is shielded, so a cancelled caller does not leave a half-known write behind.
        """
        before = {id(f): f for k in keys if (f := self._key_writes.get(k)) is not None}

        async def run() -> T:
            if before:
                await asyncio.gather(*before.values(), return_exceptions=True)
            return await op()

        task = asyncio.ensure_future(run())
        key_writes = self._key_writes
        for key in keys:
            key_writes[key] = task

        def forget(done: asyncio.Future[Any]) -> None:
            for key in keys:
                if key_writes.get(key) is done:
                    del key_writes[key]

        task.add_done_callback(forget)
        return await asyncio.shield(task)

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
        self, op: Callable[[Sequence[T]], Awaitable[R]], items: Sequence[T], n: int, kind: str
    ) -> R:
        """One round trip with the timeout, the breaker, error wrapping and counting."""
        stats = self.stats
        if self._open_until:
            if self._open_until > time.monotonic():
                stats.rejected += 1
                raise StorageUnavailableError(
                    f"storage {self.name!r}: skipped for {self.options.breaker_cooldown:g}s "
                    f"after {self.options.breaker_threshold} consecutive failures"
                )
            # Half-open: this call is the one trial; others stay rejected until it settles.
            self._open_until = time.monotonic() + self.options.breaker_cooldown
        stats.round_trips += 1
        try:
            result = await _with_timeout(op(items), self.options.timeout)
        except Exception as exc:
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
        self._failures = 0
        self._open_until = 0.0
        if kind == "read":
            stats.keys_read += n
        elif kind == "write":
            stats.keys_written += n
        else:
            stats.keys_removed += n
        return result

    def _failed(self) -> None:
        self._failures += 1
        if self._failures >= self.options.breaker_threshold:
            if self._failures == self.options.breaker_threshold:
                self.stats.breaker_opens += 1
                logger.warning(
                    "cacheme: storage %r failed %d times in a row; skipping it for %gs",
                    self.name,
                    self._failures,
                    self.options.breaker_cooldown,
                )
            self._open_until = time.monotonic() + self.options.breaker_cooldown


def _settle(
    pending: _Pending[T, None], error_of: Callable[[Sequence[T]], BaseException | None]
) -> None:
    for items, fut in pending.calls:
        if fut.done():
            continue
        error = error_of(items)
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(None)


def _unique(keys: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(keys))


def _last_per_key(entries: Sequence[Entry]) -> list[Entry]:
    return list({e.key: e for e in entries}.values())


def describe(exc: BaseException, url: str) -> str:
    """``exc`` as text, with every credential of ``url`` scrubbed out."""
    return scrub(f"{type(exc).__name__}: {exc}", url)


def _shorten(text: str, limit: int = 400) -> str:
    """Driver messages can embed whole topologies or values; keep errors readable."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more chars)"


if sys.version_info >= (3, 11):

    async def _with_timeout(aw: Awaitable[T], seconds: float) -> T:
        async with asyncio.timeout(seconds):
            return await aw

else:  # pragma: no cover - Python 3.10

    async def _with_timeout(aw: Awaitable[T], seconds: float) -> T:
        return await asyncio.wait_for(aw, seconds)
