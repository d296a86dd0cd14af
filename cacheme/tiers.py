"""Tiers: one link of a node's chain, the unit the walk loops over.

A ``Tier`` is a registered storage as one node uses it: with the node's TTL for that storage
(seconds, one unit), the node's serializer and value type, and the failure policy. Local and
remote tiers offer one interface:

- ``peek(key)``: the value if the tier can answer without waiting (a local tier), else
  ``MISS``. This is the hot path of ``get``.
- ``read(keys, done)``: look ``keys`` up and call ``done`` once with the values found (a dict
  by key), ``None`` when the tier failed and fails open (a miss of that tier, counted and
  logged), or the ``StorageError`` when it fails closed. A local tier calls ``done`` at once;
  a remote tier when its coalesced batch comes back: no task is created for a read.
- ``write(values)``: store ``values`` (by key) with the tier's TTL. Returns an awaitable that
  settles when the write landed (``None`` when it already has) and the keys whose values
  could not be encoded, with their ``EncodeError``.
- ``remove(keys)``: drop ``keys``; returns an awaitable, or ``None`` when done already.
- ``remaining_ttl(keys)``: what the tier knows of each entry's remaining lifetime, in
  seconds (``math.inf``: no expiry; absent: not stored or not known).

Failures of a tier never escape as driver errors: a remote tier raises or reports only
``StorageError`` (and ``EncodeError`` per key on writes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigurationError, EncodeError, StorageError, StorageTimeoutError
from .serializer import Serializer, as_bytes, dumps_failed
from .storages.base import (
    MISS,
    BaseStorage,
    Entry,
    LocalStorage,
    RemoteStorage,
    Unreadable,
    utf8_encodable,
)

if TYPE_CHECKING:
    from .node import Cache, Config
    from .runtime import Runtime

logger = logging.getLogger("cacheme")

ReadResult = dict[str, Any] | StorageError | None
Done = Callable[[ReadResult], None]


class Reader(Protocol):
    """What ``Tier.read_into`` reports to (``walk.KeyWalk`` is one)."""

    def arrived(self, found: ReadResult) -> None: ...

    def delivered(self, raw: Any) -> None: ...


def deliver_to(fut: asyncio.Future[Any]) -> Callable[[Any], None]:
    """A ``done`` callback that sets ``fut``'s result, or does nothing once ``fut`` is done
    (its waiter was cancelled: the storage's batch must not fail on it)."""

    def deliver(outcome: Any) -> None:
        if not fut.done():
            fut.set_result(outcome)

    return deliver


class Tier(ABC):
    """One storage in one node's chain; see the module docstring for the contract."""

    __slots__ = ("cfg", "fail_open", "index", "max_ttl", "name", "ttl")

    immediate: bool  # peek() can answer (the tier is in-process)

    def __init__(
        self, cfg: Config, index: int, name: str, ttl: float | None, max_ttl: timedelta
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.name = name  # the registered storage's name
        self.ttl = ttl  # seconds; None: no expiry
        self.max_ttl = max_ttl  # the longest TTL the storage can hold; longer: no expiry
        self.fail_open = True

    @abstractmethod
    def peek(self, key: str) -> Any:
        """The value of ``key`` if known without waiting, else ``MISS``."""

    def peek_function(self) -> Callable[[str], Any]:
        """A function doing what ``peek`` does, with as few calls in between as possible."""
        return self.peek

    @abstractmethod
    def read(self, keys: Sequence[str], done: Done) -> None:
        """Look ``keys`` up; call ``done`` exactly once (see the module docstring)."""

    def read_into(self, keys: Sequence[str], reader: Reader, rt: Runtime | None = None) -> None:
        """``read``, for a reader object: a local tier calls ``reader.arrived(result)``; a
        remote tier has its storage call ``reader.delivered(raw)``, which must hand the raw
        answer to ``accept`` and the result to ``arrived`` (no closure, no relay object).
        ``rt``: the running loop's runtime, when the caller has it (saves looking it up)."""
        self.read(keys, reader.arrived)

    def read_now(self, keys: Sequence[str], rt: Runtime | None = None) -> Awaitable[Any] | None:
        """A remote tier whose storage is idle in this loop: the raw read of ``keys`` sent at
        once (its answer for ``accept``; it raises what a storage raises), for the caller to
        await in its own task. ``None``: use ``read``/``read_into`` (a local tier, a busy
        storage, or one that cannot take it). ``rt`` as for ``read_into``."""
        return None

    def accept(self, raw: Any) -> ReadResult:
        """A remote tier's raw storage answer (values by key, or an exception) as a
        ``read`` result; local tiers never produce one."""
        raise NotImplementedError(f"tier {self.name!r} answers reads itself")

    @abstractmethod
    def write(
        self, values: dict[str, Any], now: bool = False, rt: Runtime | None = None
    ) -> tuple[Awaitable[Any] | None, dict[str, Exception]]:
        """Store ``values``; ``(pending write or None, encode errors by key)``. ``now``: the
        caller awaits the pending write at once, in its own task, so a remote tier whose
        storage is idle may send it from there (see ``RemoteStorage.write_now``). ``rt`` as
        for ``read_into``."""

    @abstractmethod
    def remove(self, keys: Sequence[str]) -> Awaitable[Any] | None:
        """Drop ``keys``; the pending removal, or ``None`` when done."""

    def write_failed(self, exc: BaseException) -> BaseException | None:
        """A pending write or removal of this tier failed with ``exc``: count and log it;
        ``None`` to go on without the tier (fail-open), else the error for the callers."""
        return exc

    def op_timeout(self) -> float:
        """Seconds one operation of the storage may take (its ``timeout``); 0 for a tier
        that never waits."""
        return 0.0

    @abstractmethod
    async def remaining_ttl(self, keys: Sequence[str]) -> dict[str, float]:
        """Seconds each stored entry has left (``math.inf``: no expiry); unknown left out."""


class LocalTier(Tier):
    """An in-process storage: Python objects, answers at once."""

    __slots__ = ("storage",)
    immediate = True

    def __init__(
        self, cfg: Config, index: int, storage: LocalStorage[Any], ttl: float | None
    ) -> None:
        super().__init__(cfg, index, storage.name, ttl, storage.max_ttl)
        self.storage = storage

    def peek(self, key: str) -> Any:
        return self.storage.get(key)

    def peek_function(self) -> Callable[[str], Any]:
        """``peek`` without the tier in between: the storage's own lookup (the hot path)."""
        return self.storage.get

    def read(self, keys: Sequence[str], done: Done) -> None:
        get = self.storage.get
        found = {}
        for key in keys:
            value = get(key)
            if value is not MISS:
                found[key] = value
        done(found)

    def write(
        self, values: dict[str, Any], now: bool = False, rt: Runtime | None = None
    ) -> tuple[Awaitable[Any] | None, dict[str, Exception]]:
        put = self.storage.set
        ttl = self.ttl
        for key, value in values.items():
            put(key, value, ttl)
        return None, {}

    def remove(self, keys: Sequence[str]) -> Awaitable[Any] | None:
        for key in keys:
            self.storage.remove(key)
        return None

    async def remaining_ttl(self, keys: Sequence[str]) -> dict[str, float]:
        return self.storage.remaining(keys)


class RemoteTier(Tier):
    """A storage behind the network or a file: the node's serializer's bytes."""

    __slots__ = ("_decode_one", "_decode_type", "serializer", "storage")
    immediate = False

    def __init__(
        self,
        cfg: Config,
        index: int,
        storage: RemoteStorage[Any],
        ttl: float | None,
        serializer: Serializer,
        fail_open: bool,
    ) -> None:
        super().__init__(cfg, index, storage.name, ttl, storage.max_ttl)
        self.storage = storage
        self.serializer = serializer
        self.fail_open = fail_open
        # The serializer's decoder for the node's value type, made at first use and again
        # if the configuration's value type changes (see Serializer.decoder).
        self._decode_one: Callable[[bytes], Any] | None = None
        self._decode_type: Any = None

    def peek(self, key: str) -> Any:
        return MISS

    def read(self, keys: Sequence[str], done: Done) -> None:
        try:
            self.storage.read_many(keys, _Relay(self, done))
        except StorageError as exc:
            done(self._failed(exc, "read"))

    def read_into(self, keys: Sequence[str], reader: Reader, rt: Runtime | None = None) -> None:
        try:
            self.storage.read_many(keys, reader, rt)
        except StorageError as exc:
            reader.arrived(self._failed(exc, "read"))

    def read_now(self, keys: Sequence[str], rt: Runtime | None = None) -> Awaitable[Any] | None:
        try:
            return self.storage.read_now(keys, rt)
        except StorageError:  # e.g. closed: read_into reports it
            return None

    def accept(self, raw: Any) -> ReadResult:
        """The storage's answer (values by key, or an exception) as a ``read`` result."""
        if isinstance(raw, dict):
            return self._decode(raw)
        if isinstance(raw, StorageError):
            return self._failed(raw, "read")
        # cancelled (storage closed) or a driver bug
        return StorageError(f"storage {self.name!r}: read failed: {raw!r}")

    def _decode(self, raw: dict[str, bytes]) -> dict[str, Any]:
        cfg = self.cfg
        value_type = cfg.value_type
        decode = self._decode_one
        if decode is None or self._decode_type is not value_type:
            decode = self._decode_one = self.serializer.decoder(value_type)
            self._decode_type = value_type
        values = {}
        for key, data in raw.items():
            if isinstance(data, Unreadable):  # a foreign value that is not bytes
                undecodable(cfg, self.name, key, data.error())
                continue
            try:
                values[key] = decode(data)
            except Exception as exc:  # DecodeError by contract; any other from a custom one
                undecodable(cfg, self.name, key, exc)
        return values

    def write(
        self, values: dict[str, Any], now: bool = False, rt: Runtime | None = None
    ) -> tuple[Awaitable[Any] | None, dict[str, Exception]]:
        errors: dict[str, Exception] = {}
        entries = []
        serializer = self.serializer
        dumps = serializer.dumps
        # What the storage contract takes: whole milliseconds, a positive TTL never rounded
        # down to 0 (straight from seconds: a timedelta would overflow near timedelta.max).
        ttl_ms = None if self.ttl is None else max(1, round(self.ttl * 1000))
        for key, value in values.items():
            if not key.isascii() and not utf8_encodable(key):
                unstorable(self.cfg.name, self.name, key)
                continue
            try:  # serializer.encode, inlined: this runs for every value written
                try:
                    data = dumps(value)
                except EncodeError:
                    raise
                except Exception as exc:
                    raise dumps_failed(serializer, value, exc) from exc
                if type(data) is not bytes:
                    data = as_bytes(serializer, data)
                entries.append(Entry(key, data, ttl_ms))
            except EncodeError as exc:
                errors[key] = EncodeError(f"node {self.cfg.name}: {exc}")
        if not entries:
            return None, errors
        try:
            if now:
                direct = self.storage.write_now(entries, rt)
                if direct is not None:
                    return direct, errors
            return self.storage.set_many(entries, rt), errors
        except StorageError as exc:  # refused before any round trip (e.g. closed)
            error = self._failed(exc, "write")
            if error is not None:
                raise error from exc
            return None, errors

    def remove(self, keys: Sequence[str]) -> Awaitable[Any] | None:
        return self.storage.remove_many(keys)

    def write_failed(self, exc: BaseException) -> BaseException | None:
        if isinstance(exc, StorageError):
            return self._failed(exc, "write")
        return exc

    def op_timeout(self) -> float:
        timeout: float = self.storage.options.timeout
        return timeout

    async def remaining_ttl(self, keys: Sequence[str]) -> dict[str, float]:
        try:
            return await self.storage.remaining_ttl(keys)
        except StorageError as exc:
            error = self._failed(exc, "ttl")
            if error is not None:
                raise error from exc
            return {}

    def _failed(self, exc: StorageError, op: str) -> StorageError | None:
        """Count a failure for the node; ``None`` to go on without the tier, else the error."""
        count_failure(self.cfg, exc)
        if not self.fail_open:
            return exc
        warn(
            self.name,
            self.cfg.name,
            op,
            f"cacheme: node {self.cfg.name}: {op} on storage {self.name!r} failed, going on "
            f"without it: {exc}",
        )
        return None


class _Relay:
    """Carries a storage's answer back to a reader: decoded by the tier, then handed on."""

    __slots__ = ("done", "tier")

    def __init__(self, tier: RemoteTier, done: Done) -> None:
        self.tier = tier
        self.done = done

    def delivered(self, raw: Any) -> None:
        try:
            result = self.tier.accept(raw)
        except Exception as exc:  # never leave the reader without an answer
            result = StorageError(f"storage {self.tier.name!r}: read failed: {exc!r}")
        self.done(result)


def undecodable(cfg: Config, storage: str, key: str, exc: BaseException) -> None:
    """Count and log an entry of ``storage`` that cannot be decoded: it is read as a miss,
    then reloaded and overwritten. ``exc`` is a ``DecodeError`` by the serializer contract,
    or whatever a serializer outside it raised."""
    cfg.stats.decode_errors += 1
    warn(
        storage,
        cfg.name,
        "decode",
        f"cacheme: node {cfg.name}: entry {key!r} in storage {storage!r} cannot be decoded "
        f"({exc}); reloading it",
    )


async def failures(
    cfg: Config, ops: Sequence[tuple[Tier, Awaitable[Any]]]
) -> list[tuple[str, StorageError]]:
    """Await one operation per tier (all at once) whatever fails; count each
    ``StorageError`` for the node and return them with their tier's name. Any other
    exception is raised. (For the calls that must report a tier they could not reach:
    ``invalidate``, ``invalidate_tag``.)"""
    outcomes = await asyncio.gather(*(op for _, op in ops), return_exceptions=True)
    failed = []
    for (tier, _), outcome in zip(ops, outcomes, strict=True):
        if isinstance(outcome, StorageError):
            count_failure(cfg, outcome)
            failed.append((tier.name, outcome))
        elif isinstance(outcome, BaseException):
            raise outcome
    return failed


async def raised(exc: StorageError) -> None:
    """An operation that failed before it could start, as an awaitable (see ``failures``)."""
    raise exc


def count_failure(cfg: Config, exc: StorageError) -> None:
    if isinstance(exc, StorageTimeoutError):
        cfg.stats.storage_timeouts += 1
    else:
        cfg.stats.storage_errors += 1


_last_warned: dict[tuple[str, str, str], float] = {}


def unstorable(node: str, storage: str, key: str) -> None:
    """Say (see ``warn``) that ``key`` cannot be stored in ``storage``: it is not UTF-8."""
    warn(
        storage,
        node,
        "key",
        f"cacheme: node {node}: key {key!r} is not valid UTF-8 (a lone surrogate, as "
        f"os.fsdecode gives for undecodable bytes), so storage {storage!r} cannot store it: "
        "it is loaded again on every get that misses the local tiers",
    )


def warn(storage: str, node: str, op: str, message: str) -> None:
    """Log a warning at most once a second per (storage, node, op); the rest at debug."""
    now = time.monotonic()
    marker = (storage, node, op)
    if now - _last_warned.get(marker, -1.0) >= 1.0:
        _last_warned[marker] = now
        logger.warning(message)
    else:
        logger.debug(message)


def seconds(ttl: timedelta | None, limit: timedelta) -> float | None:
    """A ``Cache`` TTL in seconds, ``None`` for no expiry; a TTL above ``limit`` (what the
    storage can hold) is documented to mean no expiry."""
    if ttl is None or ttl > limit:
        return None
    return ttl.total_seconds()


def make_tier(cfg: Config, index: int, storage: BaseStorage[Any], cache: Cache) -> Tier:
    """The tier ``cache`` (``Meta.caches[index]``) of ``cfg`` on the registered ``storage``."""
    if isinstance(storage, LocalStorage):
        return LocalTier(cfg, index, storage, seconds(cache.ttl, storage.max_ttl))
    if not isinstance(storage, RemoteStorage):  # pragma: no cover - the registry builds both
        raise ConfigurationError(f"storage {storage.name!r} is neither local nor remote")
    if cfg.serializer is None:
        raise ConfigurationError(
            f"node {cfg.name} caches in remote storage {storage.name!r} but has "
            f"no Meta.serializer; set one (e.g. cacheme.serializer.MsgPackSerializer())"
        )
    fail_open = storage.options.fail_open if cache.fail_open is None else cache.fail_open
    return RemoteTier(
        cfg, index, storage, seconds(cache.ttl, storage.max_ttl), cfg.serializer, fail_open
    )
