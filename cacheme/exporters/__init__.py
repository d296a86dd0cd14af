"""Optional metric exporters built on ``cacheme.metrics.snapshot()``.

- ``cacheme.exporters.prometheus``: a ``prometheus_client`` collector
  (``pip install "cacheme[prometheus]"``).
- ``cacheme.exporters.opentelemetry``: observable instruments on an OpenTelemetry meter
  (``pip install "cacheme[otel]"``).

Importing ``cacheme`` never imports either driver; only importing the exporter module does.
Both expose the same measurements, listed once here (``NODE_METRICS``, ``STORAGE_METRICS``)
with the name each ecosystem gives them. Node metrics carry a ``node`` label (the snapshot
name, see ``cacheme.metrics``), hits also a ``tier`` label (the storage name); storage
metrics carry a ``storage`` label and cover remote storages only (a local tier makes no round
trips and has no breaker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import MissingDriverError
from ..metrics import StatsSnapshot, StorageSnapshot, negative_hits, tier_hits
from ..stats import NodeStats

__all__ = [
    "HITS_DESCRIPTION",
    "HITS_OTEL",
    "HITS_OTEL_UNIT",
    "HITS_PROMETHEUS",
    "NODE_METRICS",
    "STORAGE_METRICS",
    "UNKNOWN_TIER",
    "NodeMetric",
    "StorageMetric",
    "hits_by_tier",
    "needs_extra",
    "remote_storages",
]


@contextmanager
def needs_extra(exporter: str, extra: str) -> Iterator[None]:
    """``with needs_extra(__name__, "prometheus"): import ...``: an exporter's driver that is
    not installed is a ``MissingDriverError`` naming the exporter, the missing package and
    the pip command, as a storage's driver is (a bare ``ModuleNotFoundError`` said none of
    that)."""
    try:
        yield
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] == "cacheme":
            raise
        raise MissingDriverError(
            f"{exporter} needs the package {exc.name!r}, which is not installed: "
            f'pip install "cacheme[{extra}]"'
        ) from exc


# The tier label of hits a core without per-tier counts cannot attribute to a tier.
UNKNOWN_TIER = "unknown"


@dataclass(frozen=True)
class NodeMetric:
    """One per-node measurement: cumulative, read from a ``NodeStats``."""

    prometheus: str  # family name; a counter's samples get the _total suffix
    otel: str
    otel_unit: str
    description: str
    value: Callable[[NodeStats], float]


@dataclass(frozen=True)
class StorageMetric:
    """One per-storage measurement, read from a ``StorageSnapshot``."""

    prometheus: str
    otel: str
    otel_unit: str
    description: str
    value: Callable[[StorageSnapshot], float]
    gauge: bool = False  # a state (0/1), not a cumulative count


NODE_METRICS: tuple[NodeMetric, ...] = (
    NodeMetric(
        "cacheme_node_requests",
        "cacheme.node.requests",
        "{request}",
        "Nodes asked for through get, get_all or a memoized call.",
        lambda s: s.requests,
    ),
    NodeMetric(
        "cacheme_node_misses",
        "cacheme.node.misses",
        "{request}",
        "Requests not answered by a cache tier (answered by a load, or failed).",
        lambda s: s.miss_count(),
    ),
    NodeMetric(
        "cacheme_node_loads",
        "cacheme.node.loads",
        "{load}",
        "Calls of load() (or of the memoized function), successful or not.",
        lambda s: s.load_count(),
    ),
    NodeMetric(
        "cacheme_node_load_failures",
        "cacheme.node.load.failures",
        "{load}",
        "Loads that raised or timed out.",
        lambda s: s.load_failures,
    ),
    NodeMetric(
        "cacheme_node_load_duration_seconds",
        "cacheme.node.load.duration",
        "s",
        "Wall time spent in loads, in seconds.",
        lambda s: s.load_time_ns / 1e9,
    ),
    NodeMetric(
        "cacheme_node_coalesced",
        "cacheme.node.coalesced",
        "{request}",
        "Requests that joined a flight already under way for their key.",
        lambda s: s.coalesced,
    ),
    NodeMetric(
        "cacheme_node_stale_hits",
        "cacheme.node.stale_hits",
        "{request}",
        "Requests served a stale value (stale-if-error) after load() failed.",
        lambda s: s.stale,
    ),
    NodeMetric(
        "cacheme_node_negative_hits",
        "cacheme.node.negative_hits",
        "{request}",
        "Requests answered by a cached 'not found'.",
        negative_hits,
    ),
    NodeMetric(
        "cacheme_node_storage_errors",
        "cacheme.node.storage.errors",
        "{error}",
        "Remote-tier operations for this node that failed.",
        lambda s: s.storage_errors,
    ),
    NodeMetric(
        "cacheme_node_storage_timeouts",
        "cacheme.node.storage.timeouts",
        "{timeout}",
        "Remote-tier operations for this node that timed out.",
        lambda s: s.storage_timeouts,
    ),
    NodeMetric(
        "cacheme_node_decode_errors",
        "cacheme.node.decode_errors",
        "{error}",
        "Stored entries this node's serializer could not decode.",
        lambda s: s.decode_errors,
    ),
)

# Hits have a tier label too, so they are described apart from NODE_METRICS.
HITS_PROMETHEUS = "cacheme_node_hits"
HITS_OTEL = "cacheme.node.hits"
HITS_OTEL_UNIT = "{request}"
HITS_DESCRIPTION = "Requests answered by a cache tier, by the tier (storage name) that answered."

STORAGE_METRICS: tuple[StorageMetric, ...] = (
    StorageMetric(
        "cacheme_storage_round_trips",
        "cacheme.storage.round_trips",
        "{round_trip}",
        "Round trips (batched operations) sent to the storage.",
        lambda s: s.round_trips,
    ),
    StorageMetric(
        "cacheme_storage_keys_read",
        "cacheme.storage.keys.read",
        "{key}",
        "Keys asked for in reads.",
        lambda s: s.keys_read,
    ),
    StorageMetric(
        "cacheme_storage_keys_written",
        "cacheme.storage.keys.written",
        "{key}",
        "Keys written.",
        lambda s: s.keys_written,
    ),
    StorageMetric(
        "cacheme_storage_keys_removed",
        "cacheme.storage.keys.removed",
        "{key}",
        "Keys removed.",
        lambda s: s.keys_removed,
    ),
    StorageMetric(
        "cacheme_storage_errors",
        "cacheme.storage.errors",
        "{error}",
        "Operations that failed (timeouts included).",
        lambda s: s.errors,
    ),
    StorageMetric(
        "cacheme_storage_timeouts",
        "cacheme.storage.timeouts",
        "{timeout}",
        "Operations that timed out.",
        lambda s: s.timeouts,
    ),
    StorageMetric(
        "cacheme_storage_rejected",
        "cacheme.storage.rejected",
        "{operation}",
        "Operations refused while the circuit breaker was open.",
        lambda s: s.rejected,
    ),
    StorageMetric(
        "cacheme_storage_breaker_opens",
        "cacheme.storage.breaker.opens",
        "{event}",
        "Times the circuit breaker opened.",
        lambda s: s.breaker_opens,
    ),
    StorageMetric(
        "cacheme_storage_breaker_open",
        "cacheme.storage.breaker.open",
        "1",
        "1 while the circuit breaker is open (the storage is skipped), else 0.",
        lambda s: 1 if s.breaker_open else 0,
        gauge=True,
    ),
)


def hits_by_tier(stats: NodeStats) -> Iterator[tuple[str, int]]:
    """``(tier, hits)`` pairs adding up to ``stats.hits``.

    Hits the core did not attribute to a tier (a core without ``tier_hits``) are reported
    under the tier ``"unknown"``. Nothing is yielded for a node without hits.
    """
    per_tier = tier_hits(stats)
    counted = 0
    for tier, hits in per_tier.items():
        counted += hits
        yield tier, hits
    if stats.hits > counted:
        yield UNKNOWN_TIER, stats.hits - counted


def remote_storages(snap: StatsSnapshot) -> list[StorageSnapshot]:
    """The storages the storage metrics cover: the remote ones, by name."""
    return [s for s in snap.storages.values() if not s.local]
