"""The in-process tier: ``local://tlfu`` (W-TinyLFU, theine's policy) and ``local://lru``.

Local tiers hold Python objects (no serializer) and answer synchronously: a local hit never
awaits. Every entry carries its own TTL (seconds, honoured to the nanosecond of
``time.monotonic_ns``). A TTL longer than ``max_ttl`` (about 292 years, what a signed 64-bit
count of nanoseconds holds) means no expiry.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from time import monotonic_ns
from typing import Any

from pydantic import Field
from theine_core import TlfuCore, spread

from ..errors import ConfigurationError
from .base import MISS, LocalStorage, StorageOptions
from .url import scheme_of

_MAX_TTL_NS = 2**63 - 1
_DRAIN = 64  # accesses buffered before they go to the policy (a constant: read per hit)


class LocalOptions(StorageOptions):
    size: int = Field(gt=0, description="most entries kept before the policy evicts")


# theine-core reserves the policy's address space up front, about 155 bytes per entry of
# ``size`` (15.5 GB at 10**8; measured with VmSize, theine-core 2.1), and touches it as the
# tier fills (VmRSS: about 1.3 bytes per entry at once). A reservation the system refuses
# aborts the interpreter (10**9 did here, on 24 GiB).
TLFU_MAX_SIZE = 10**8


class TinyLFUOptions(LocalOptions):
    size: int = Field(
        gt=0,
        le=TLFU_MAX_SIZE,
        description="most entries kept before the policy evicts; its address space is "
        "reserved up front, about 155 bytes per entry",
    )


def _ttl_ns(ttl: float | None) -> int:
    """``ttl`` seconds as nanoseconds, 0 for no expiry (also for what 64 bits cannot hold)."""
    if not ttl:
        return 0
    ns = int(ttl * 1e9)
    return ns if 0 < ns < _MAX_TTL_NS - monotonic_ns() else 0


def _left(deadline: int, now: int) -> float:
    return math.inf if not deadline else max(0.0, (deadline - now) / 1e9)


class TinyLFUStorage(LocalStorage[LocalOptions]):
    """W-TinyLFU admission and eviction: theine's policy core (Rust), our own entry map.

    Why not ``theine.Cache`` itself: its ``get`` takes a lock, picks a shard and feeds a
    striped buffer (about 3 us here), because it serves threads and a maintenance thread of
    its own. A plain dict lookup plus a buffered access record does the same job in a
    fraction of that (numbers in docs/benchmarks.md). The policy decisions (admission,
    eviction, expiry wheel) are still theine's ``TlfuCore``; importing only ``theine_core``
    also starts no thread.

    Accesses are recorded in a buffer and handed to the policy every ``_DRAIN`` reads; writes
    go to the policy at once, and whatever it evicts (including, when not admitted, the new
    key itself) leaves the map. Expired entries are dropped when read, and swept from the
    policy's timer wheel on writes.
    """

    options_model = TinyLFUOptions

    def __init__(self, name: str, url: str, options: LocalOptions) -> None:
        super().__init__(name, url, options)
        self._size = options.size
        self._core = TlfuCore(options.size)
        self._map: dict[str, tuple[Any, int]] = {}  # key -> (value, deadline ns or 0)
        self._keys: dict[int, str] = {}  # policy hash -> key
        self._reads: list[str] = []
        self._writes = 0

    def get(self, key: str) -> Any:
        entry = self._map.get(key)
        if entry is None:
            return MISS
        deadline = entry[1]
        if deadline and deadline <= monotonic_ns():
            with self._lock:
                if self._map.get(key) is entry:  # not replaced by another thread meanwhile
                    self._remove(key)
            return MISS
        reads = self._reads
        reads.append(key)
        if len(reads) >= _DRAIN:
            self._drain(reads)
        return entry[0]

    def _drain(self, reads: list[str]) -> None:
        """Hand the buffered reads to the policy. Other threads may append meanwhile: only
        the reads taken here leave the buffer."""
        with self._lock:
            taken = len(reads)
            if taken < _DRAIN:  # another thread drained it first
                return
            batch = reads[:taken]
            del reads[:taken]
            self._core.access([spread(hash(k)) for k in batch])

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        ttl_ns = _ttl_ns(ttl)
        h = spread(hash(key))
        with self._lock:
            if self._handoff:
                self._apply_handoff()
            previous = self._keys.get(h)
            if previous is not None and previous != key:
                self._map.pop(previous, None)  # 64-bit hash collision: the newer key wins
            self._keys[h] = key
            self._map[key] = (value, monotonic_ns() + ttl_ns if ttl_ns else 0)
            self._drop(self._core.set([(h, ttl_ns)]))
            self._writes += 1
            if self._writes >= _DRAIN:
                self._writes = 0
                self._drop(self._core.advance())

    def remove(self, key: str) -> None:
        with self._lock:
            if self._handoff:
                self._apply_handoff()
            self._remove(key)

    def _remove(self, key: str) -> None:
        if self._map.pop(key, None) is not None:
            h = spread(hash(key))
            if self._keys.get(h) == key:
                del self._keys[h]
            self._core.remove(h)

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        # A new policy, not TlfuCore.clear(): in theine-core 2.1 a core cleared once full
        # evicts every key set afterwards at once (the tier would never hold a value again).
        # New maps too, the old ones let go of last: a value's finalizer run by that may
        # write to this storage again, and must find it whole.
        old = (self._map, self._keys, self._reads)
        self._core = TlfuCore(self._size)
        self._map, self._keys, self._reads = {}, {}, []
        del old

    def _forget_now(self, keys: list[str] | None) -> None:
        if keys is None:
            self._map.clear()
            return
        pop = self._map.pop
        for key in keys:
            pop(key, None)

    def _forgotten(self, key: str) -> None:
        h = spread(hash(key))
        if key not in self._map and self._keys.get(h) == key:
            del self._keys[h]
            self._core.remove(h)

    def remaining(self, keys: Sequence[str]) -> dict[str, float]:
        now = monotonic_ns()
        found = {}
        for key in keys:
            entry = self._map.get(key)
            if entry is not None and (not entry[1] or entry[1] > now):
                found[key] = _left(entry[1], now)
        return found

    def _drop(self, hashes: list[int]) -> None:
        for h in hashes:
            key = self._keys.pop(h, None)
            if key is not None:
                self._map.pop(key, None)

    def __len__(self) -> int:
        return len(self._map)

    async def close(self) -> None:
        self.clear()


class LRUStorage(LocalStorage[LocalOptions]):
    """Least-recently-used eviction.

    theine 2 offers W-TinyLFU only, and cachetools' LRU keeps one TTL for the whole cache;
    an ordered dict with a per-entry deadline is a few lines and as fast as either.
    """

    options_model = LocalOptions

    def __init__(self, name: str, url: str, options: LocalOptions) -> None:
        super().__init__(name, url, options)
        self._data: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._size = options.size

    def get(self, key: str) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return MISS
        if entry[1] and entry[1] <= monotonic_ns():
            with self._lock:
                if self._data.get(key) is entry:  # not replaced by another thread meanwhile
                    del self._data[key]
            return MISS
        try:  # noqa: SIM105  (the hit path: suppress() would cost a context manager)
            self._data.move_to_end(key)
        except KeyError:  # another thread removed it since the lookup, when it was live
            pass
        return entry[0]

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        ttl_ns = _ttl_ns(ttl)
        deadline = monotonic_ns() + ttl_ns if ttl_ns else 0
        with self._lock:
            if self._handoff:
                self._apply_handoff()  # may clear: a new map
            data = self._data
            data[key] = (value, deadline)
            # The backplane's thread drops keys without the lock (see discard_threadsafe).
            with contextlib.suppress(KeyError):
                data.move_to_end(key)
                while len(data) > self._size:
                    data.popitem(last=False)

    def remove(self, key: str) -> None:
        with self._lock:
            if self._handoff:
                self._apply_handoff()
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        old, self._data = self._data, OrderedDict()  # see TinyLFUStorage._clear
        del old

    def _forgotten(self, key: str) -> None:
        self._data.pop(key, None)

    def _forget_now(self, keys: list[str] | None) -> None:
        if keys is None:
            self._data.clear()
            return
        pop = self._data.pop
        for key in keys:
            pop(key, None)

    def remaining(self, keys: Sequence[str]) -> dict[str, float]:
        now = monotonic_ns()
        found = {}
        for key in keys:
            entry = self._data.get(key)
            if entry is not None and (not entry[1] or entry[1] > now):
                found[key] = _left(entry[1], now)
        return found

    def __len__(self) -> int:
        return len(self._data)

    async def close(self) -> None:
        self.clear()


LOCAL_POLICIES: dict[str, type[LocalStorage[LocalOptions]]] = {
    "tlfu": TinyLFUStorage,
    "lru": LRUStorage,
}


def policy_class(url: str) -> type[LocalStorage[LocalOptions]]:
    """The local backend for ``local://{policy}``."""
    assert scheme_of(url) == "local"
    policy = url.split("://", 1)[1].strip("/").lower()
    try:
        return LOCAL_POLICIES[policy]
    except KeyError:
        raise ConfigurationError(
            f"local storage {url!r}: unknown policy {policy!r}; supported: "
            f"{', '.join(sorted(LOCAL_POLICIES))}"
        ) from None
