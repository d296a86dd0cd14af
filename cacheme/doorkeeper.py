"""Admission doorkeepers: keep one-hit wonders out of the caches.

With ``Meta.doorkeeper = BloomFilter(size, false_positive_rate)``, a loaded value is written to
the node's caches only from the second time its key is loaded on: the first sighting just
records the key in the filter. The filter forgets everything once it has seen ``size`` keys,
so stale sightings do not pile up and the false-positive rate stays near the one asked for.
"""

from __future__ import annotations

from typing import Any

import theine_core

from .errors import ConfigurationError

_MASK = (1 << 64) - 1


class DoorKeeper:
    """Decides whether a loaded key may be written to the caches."""

    def admit(self, key: str) -> bool:
        raise NotImplementedError


def adopt(obj: Any, owner: str) -> DoorKeeper:
    """``obj`` as a ``DoorKeeper``: itself, or a doorkeeper of cacheme 0.3.0's protocol (an
    object with ``put(key)`` and ``contains(key) -> bool``) wrapped: a key is admitted when
    ``contains`` says it was put before, and put otherwise. Raises ``ConfigurationError``
    naming ``owner`` (such as ``"UserNode.Meta.doorkeeper"``) for anything else."""
    if isinstance(obj, DoorKeeper):
        return obj
    if callable(getattr(obj, "put", None)) and callable(getattr(obj, "contains", None)):
        return _PutContains(obj)
    raise ConfigurationError(
        f"{owner} must be a DoorKeeper (or an object with put(key) and contains(key)), "
        f"got {type(obj).__name__} {obj!r}"
    )


class _PutContains(DoorKeeper):
    """A doorkeeper of cacheme 0.3.0's protocol."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return repr(self.inner)

    def admit(self, key: str) -> bool:
        if self.inner.contains(key):
            return True
        self.inner.put(key)
        return False


class BloomFilter(DoorKeeper):
    """A Bloom filter sized for ``size`` keys at ``false_positive_rate`` (theine's, in Rust)."""

    def __init__(self, size: int, false_positive_rate: float) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ConfigurationError(f"BloomFilter size must be a positive int, got {size!r}")
        if not 0 < false_positive_rate < 1:
            raise ConfigurationError(
                "BloomFilter false_positive_rate must be between 0 and 1, got "
                f"{false_positive_rate!r}"
            )
        self.size = size
        self.false_positive_rate = false_positive_rate
        # theine_core's bundled stubs do not match its BloomFilter(insertions, fpp) and int keys.
        self._filter: Any = theine_core.BloomFilter(size, false_positive_rate)  # type: ignore[call-arg]
        self._seen = 0

    def __repr__(self) -> str:
        return f"BloomFilter({self.size}, {self.false_positive_rate})"

    def put(self, key: str) -> None:
        """Record ``key`` as sighted (cacheme 0.3.0's doorkeeper protocol)."""
        self._filter.put(hash(key) & _MASK)

    def contains(self, key: str) -> bool:
        """Whether ``key`` was sighted since the last reset, or is a false positive (cacheme
        0.3.0's doorkeeper protocol); records nothing."""
        return bool(self._filter.contains(hash(key) & _MASK))

    def admit(self, key: str) -> bool:
        """True if ``key`` was sighted before (since the last reset); records the sighting.

        The request that brings the count to ``size`` is answered first, then the filter
        resets (resetting first would make a filter of size 2 admit nothing).
        """
        h = hash(key) & _MASK
        seen = bool(self._filter.contains(h))
        if not seen:
            self._filter.put(h)
        self._seen += 1
        if self._seen >= self.size:
            self._filter.reset()
            self._seen = 0
        return seen
