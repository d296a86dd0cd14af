"""One plain, frozen snapshot of every node's and every storage's counters.

``snapshot()`` reads the counters of every node class (``cacheme.nodes()``) and of every
registered storage (``cacheme.storages()``) into a ``StatsSnapshot``: immutable values with
no reference back to the live objects, safe to keep, compare, log or serialise
(``as_dict()`` gives JSON-ready data). The exporters in ``cacheme.exporters`` are built on it.

Node names
    A node is listed under its class's ``__qualname__`` (``UserInfoNode``). When several
    node classes share a qualname, each of them is listed as ``module.qualname`` instead, and
    if even that repeats (classes made by one function called twice), ``#2``, ``#3``... is
    appended in definition order. Names are therefore unique within one snapshot and stable
    while the set of node classes does not change.

Counting rules are those of ``cacheme.stats`` (see ``cacheme/stats.py``); the storage
counters are those of ``cacheme.storages.base.StorageStats``. Nothing here takes a lock:
a snapshot taken from another thread (a metrics scrape) may see one counter a moment
ahead of another, never a torn value.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .node import Node, nodes
from .stats import NodeStats
from .storages.registry import storages
from .storages.url import redact, scheme_of

__all__ = [
    "StatsSnapshot",
    "StorageSnapshot",
    "negative_hits",
    "node_names",
    "snapshot",
    "tier_hits",
]

_EMPTY: Mapping[Any, Any] = MappingProxyType({})


@dataclass(frozen=True)
class StorageSnapshot:
    """The counters of one registered storage at one moment.

    Local tiers (``local=True``) make no round trips: their counters stay 0 and their
    breaker is never open.
    """

    name: str
    url: str  # with any password replaced by ***
    scheme: str
    local: bool
    round_trips: int = 0
    keys_read: int = 0
    keys_written: int = 0
    keys_removed: int = 0
    errors: int = 0
    timeouts: int = 0
    rejected: int = 0  # operations refused while the circuit breaker was open
    breaker_opens: int = 0  # times the breaker opened
    breaker_open: bool = False  # whether it is open now


@dataclass(frozen=True)
class StatsSnapshot:
    """Every node's ``NodeStats`` and every storage's ``StorageSnapshot``, at ``taken_at``.

    ``nodes`` maps node names (see the module docstring) to ``NodeStats``, in definition
    order; ``storages`` maps registered storage names to ``StorageSnapshot``, sorted by name.
    Both mappings are read-only. ``taken_at`` is the wall-clock time (``time.time()``,
    seconds) when the snapshot was taken.
    """

    nodes: Mapping[str, NodeStats] = field(default_factory=lambda: _EMPTY)
    storages: Mapping[str, StorageSnapshot] = field(default_factory=lambda: _EMPTY)
    taken_at: float = 0.0
    _names: Mapping[type[Node], str] = field(
        default_factory=lambda: _EMPTY, repr=False, compare=False
    )

    def name_of(self, node_cls: type[Node]) -> str:
        """The name ``node_cls`` is listed under; ``KeyError`` if it is not in the snapshot."""
        return self._names[node_cls]

    def node(self, node_cls: type[Node]) -> NodeStats:
        """The ``NodeStats`` of ``node_cls``; ``KeyError`` if it is not in the snapshot
        (a class defined after the snapshot was taken)."""
        return self.nodes[self._names[node_cls]]

    def total(self) -> NodeStats:
        """The counters of every node added up (``tier_hits`` and ``negative_hits`` too,
        when ``NodeStats`` has them)."""
        fields = NodeStats.__dataclass_fields__
        sums: dict[str, Any] = {}
        for name, f in fields.items():
            if name == "tier_hits":
                merged: Counter[str] = Counter()
                for s in self.nodes.values():
                    merged.update(tier_hits(s))
                sums[name] = dict(merged)
            elif f.type in (int, "int"):
                sums[name] = sum(getattr(s, name) for s in self.nodes.values())
        return NodeStats(**sums)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: ``{"taken_at", "nodes": {name: {...}}, "storages": {...}}``.

        Each node entry has its raw counters plus ``misses``, ``loads``, ``hit_rate`` and
        ``load_seconds`` (total load time in seconds); ``tier_hits`` and
        ``negative_hits`` are always present (empty / 0 on a core that does not count them).
        """
        out_nodes: dict[str, Any] = {}
        for name, s in self.nodes.items():
            entry: dict[str, Any] = {
                k: getattr(s, k) for k in NodeStats.__dataclass_fields__ if k != "tier_hits"
            }
            entry["tier_hits"] = dict(tier_hits(s))
            entry["negative_hits"] = negative_hits(s)
            entry["misses"] = s.miss_count()
            entry["loads"] = s.load_count()
            entry["hit_rate"] = s.hit_rate()
            entry["load_seconds"] = s.total_load_time() / 1e9
            out_nodes[name] = entry
        out_storages = {
            name: {k: getattr(st, k) for k in StorageSnapshot.__dataclass_fields__}
            for name, st in self.storages.items()
        }
        return {"taken_at": self.taken_at, "nodes": out_nodes, "storages": out_storages}


def tier_hits(stats: NodeStats) -> Mapping[str, int]:
    """Hits per storage name; empty on a core that does not count hits per tier."""
    found = getattr(stats, "tier_hits", None)
    return found if isinstance(found, Mapping) else _EMPTY


def negative_hits(stats: NodeStats) -> int:
    """Cached "not found" answers served; 0 on a core that does not count them."""
    found = getattr(stats, "negative_hits", 0)
    return found if isinstance(found, int) else 0


def node_names(classes: list[type[Node]]) -> list[str]:
    """The snapshot name of each class of ``classes`` (see the module docstring)."""
    qualnames = Counter(c.__qualname__ for c in classes)
    names = [
        c.__qualname__ if qualnames[c.__qualname__] == 1 else f"{c.__module__}.{c.__qualname__}"
        for c in classes
    ]
    seen: Counter[str] = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _storage_snapshot(name: str, backend: Any) -> StorageSnapshot:
    counters = backend.stats
    return StorageSnapshot(
        name=name,
        url=redact(backend.url),
        scheme=scheme_of(backend.url),
        local=bool(getattr(backend, "local", False)),
        round_trips=counters.round_trips,
        keys_read=counters.keys_read,
        keys_written=counters.keys_written,
        keys_removed=counters.keys_removed,
        errors=counters.errors,
        timeouts=counters.timeouts,
        rejected=counters.rejected,
        breaker_opens=counters.breaker_opens,
        breaker_open=bool(getattr(backend, "breaker_open", False)),
    )


def snapshot() -> StatsSnapshot:
    """The counters of every node class and every registered storage, right now.

    Never raises for a node or storage in any state (unconnected, closed, breaker open);
    takes no lock and does no I/O, so it may be called from any thread.
    """
    classes = nodes()
    names = dict(zip(classes, node_names(classes), strict=True))
    node_stats = {name: cls._cacheme_config.stats.snapshot() for cls, name in names.items()}
    registered = storages()
    storage_stats = {name: _storage_snapshot(name, registered[name]) for name in sorted(registered)}
    return StatsSnapshot(
        nodes=MappingProxyType(node_stats),
        storages=MappingProxyType(storage_stats),
        taken_at=time.time(),
        _names=MappingProxyType(names),
    )
