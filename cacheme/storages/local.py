"""The in-process tier: ``local://tlfu`` (W-TinyLFU, on theine) and ``local://lru``.

Local tiers hold Python objects (no serializer) and answer synchronously: a local hit never
awaits. Every entry carries its own TTL, honoured to the nanosecond of ``time.monotonic_ns``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import timedelta
from typing import Any

from pydantic import Field
from theine import Cache as TheineCache

from ..errors import ConfigurationError
from .base import LocalStorage, StorageOptions
from .url import scheme_of


class LocalOptions(StorageOptions):
    size: int = Field(gt=0, description="most entries kept before the policy evicts")


class TinyLFUStorage(LocalStorage[LocalOptions]):
    """W-TinyLFU admission and eviction, by theine."""

    options_model = LocalOptions

    def __init__(self, name: str, url: str, options: LocalOptions) -> None:
        super().__init__(name, url, options)
        self._cache: TheineCache[str, Any] = TheineCache(options.size)
        # Bound methods: the hot path skips one attribute lookup per call.
        self.get = self._cache.get  # type: ignore[method-assign]

    def get(self, key: str) -> tuple[Any, bool]:  # replaced per instance in __init__
        return self._cache.get(key)

    def set(self, key: str, value: Any, ttl: timedelta | None) -> None:
        self._cache.set(key, value, ttl)

    def remove(self, key: str) -> None:
        self._cache.delete(key)

    async def close(self) -> None:
        self._cache.clear()
        # Stops theine's maintenance task, which otherwise keeps the cache alive forever.
        self._cache.close()


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

    def get(self, key: str) -> tuple[Any, bool]:
        try:
            value, deadline = self._data[key]
        except KeyError:
            return None, False
        if deadline and deadline <= time.monotonic_ns():
            del self._data[key]
            return None, False
        self._data.move_to_end(key)
        return value, True

    def set(self, key: str, value: Any, ttl: timedelta | None) -> None:
        deadline = time.monotonic_ns() + int(ttl.total_seconds() * 1e9) if ttl else 0
        data = self._data
        data[key] = (value, deadline)
        data.move_to_end(key)
        if len(data) > self._size:
            data.popitem(last=False)

    def remove(self, key: str) -> None:
        self._data.pop(key, None)

    async def close(self) -> None:
        self._data.clear()


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
