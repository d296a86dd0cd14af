"""Per-node counters, and the frozen snapshot ``cacheme.stats(Node)`` returns.

Counting rules (``get`` and ``get_all`` count alike, one request per node asked for, duplicates
in ``get_all`` included):

- request: every node asked for.
- hit: the value came from a cache tier, local or remote, without calling ``load``. A caller
  that joins another caller's flight counts as whatever that flight was: a hit if the flight
  found the value in a remote tier, a miss if it had to load. ``tier_hits`` splits the hits
  by the tier (storage name) that held the value.
- miss: ``request_count - hit_count``: every request answered by a load, or by an error.
- coalesced: requests that joined a flight already under way for their key (or a duplicate
  within one ``get_all``) instead of starting their own; each is also a hit or a miss.
- load: one per call of ``load()`` (or of the memoized function, or one node of ``load_all``),
  however many callers were waiting on it. Success or failure; ``total_load_time`` sums the
  wall time of the loads in nanoseconds.
- storage errors / timeouts: remote-tier operations for this node that failed or timed out
  (fail-open tiers then count the read as a miss of that tier).
- decode errors: stored entries this node's serializer could not decode (then reloaded).
- stale: values served from stale-if-error after ``load()`` failed.
- negative hits: hits on a negative entry ("not found" cached: ``Meta.negative_ttl``); each
  is also a hit.
- refreshes: background reloads started (refresh-ahead, stale-while-revalidate), one per
  key; refresh failures: those that failed (the current value stayed). Their loads count as
  loads.

Rates are zero-safe: with nothing requested ``hit_rate()`` is 1.0 and ``miss_rate()`` 0.0;
with nothing loaded ``load_failure_rate()`` and ``average_load_time()`` are 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Recorder:
    """Mutable counters of one node class; only cacheme writes them."""

    __slots__ = (
        "coalesced",
        "decode_errors",
        "hits",
        "load_failures",
        "load_successes",
        "load_time_ns",
        "negative_hits",
        "peek_hits",
        "refresh_failures",
        "refreshes",
        "requests",
        "stale",
        "storage_errors",
        "storage_timeouts",
        "tier_hits",
        "tier_names",
    )

    def __init__(self, tier_names: tuple[str, ...] = ()) -> None:
        self.tier_names = tier_names
        self.tier_hits = [0] * len(tier_names)  # by tier index
        self.requests = 0
        self.hits = 0
        # Requests answered by the first tier on get's hot path: each is a request and a hit
        # of tier 0 (one counter there instead of three; added in at snapshot time).
        self.peek_hits = 0
        self.coalesced = 0
        self.load_successes = 0
        self.load_failures = 0
        self.load_time_ns = 0
        self.storage_errors = 0
        self.storage_timeouts = 0
        self.decode_errors = 0
        self.stale = 0
        self.negative_hits = 0
        self.refreshes = 0
        self.refresh_failures = 0

    def snapshot(self) -> NodeStats:
        by_name: dict[str, int] = {}
        peek_hits = self.peek_hits
        for index, (name, count) in enumerate(zip(self.tier_names, self.tier_hits, strict=True)):
            by_name[name] = by_name.get(name, 0) + count + (peek_hits if index == 0 else 0)
        return NodeStats(
            tier_hits=by_name,
            requests=self.requests + peek_hits,
            hits=self.hits + peek_hits,
            coalesced=self.coalesced,
            load_successes=self.load_successes,
            load_failures=self.load_failures,
            load_time_ns=self.load_time_ns,
            storage_errors=self.storage_errors,
            storage_timeouts=self.storage_timeouts,
            decode_errors=self.decode_errors,
            stale=self.stale,
            negative_hits=self.negative_hits,
            refreshes=self.refreshes,
            refresh_failures=self.refresh_failures,
        )


@dataclass(frozen=True)
class NodeStats:
    """An immutable snapshot of one node class's counters (see the module for the rules)."""

    requests: int = 0
    hits: int = 0
    coalesced: int = 0
    load_successes: int = 0
    load_failures: int = 0
    load_time_ns: int = 0
    storage_errors: int = 0
    storage_timeouts: int = 0
    decode_errors: int = 0
    stale: int = 0
    negative_hits: int = 0
    refreshes: int = 0
    refresh_failures: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)  # storage name -> hits there

    def request_count(self) -> int:
        return self.requests

    def hit_count(self) -> int:
        return self.hits

    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 1.0

    def miss_count(self) -> int:
        return self.requests - self.hits

    def miss_rate(self) -> float:
        return self.miss_count() / self.requests if self.requests else 0.0

    def coalesced_count(self) -> int:
        return self.coalesced

    def load_success_count(self) -> int:
        return self.load_successes

    def load_failure_count(self) -> int:
        return self.load_failures

    def load_count(self) -> int:
        return self.load_successes + self.load_failures

    def load_failure_rate(self) -> float:
        loads = self.load_count()
        return self.load_failures / loads if loads else 0.0

    def total_load_time(self) -> int:
        """Nanoseconds spent in loads."""
        return self.load_time_ns

    def average_load_time(self) -> float:
        """Nanoseconds per load; 0 when nothing was loaded."""
        loads = self.load_count()
        return self.load_time_ns / loads if loads else 0.0

    def storage_error_count(self) -> int:
        return self.storage_errors

    def storage_timeout_count(self) -> int:
        return self.storage_timeouts

    def decode_error_count(self) -> int:
        return self.decode_errors

    def stale_count(self) -> int:
        return self.stale

    def negative_hit_count(self) -> int:
        return self.negative_hits

    def refresh_count(self) -> int:
        return self.refreshes

    def refresh_failure_count(self) -> int:
        return self.refresh_failures

    def tier_hit_count(self, storage: str) -> int:
        """Hits served by the tier on the registered storage ``storage``."""
        return self.tier_hits.get(storage, 0)
