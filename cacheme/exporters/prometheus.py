"""Prometheus metrics for cacheme: a ``prometheus_client`` collector.

Install with ``pip install "cacheme[prometheus]"``, then once at start-up::

    import cacheme.exporters.prometheus

    cacheme.exporters.prometheus.register()   # on prometheus_client's default REGISTRY

and serve the registry as usual (``prometheus_client.start_http_server(9100)``, or
``make_asgi_app()`` mounted in a web app). Each scrape reads ``cacheme.metrics.snapshot()``:
nothing is counted twice and nothing is kept between scrapes.

Families (every counter is exposed with the ``_total`` suffix)::

    cacheme_node_requests_total{node}               counter
    cacheme_node_hits_total{node,tier}              counter  tier: the storage that answered
    cacheme_node_misses_total{node}                 counter
    cacheme_node_loads_total{node}                  counter
    cacheme_node_load_failures_total{node}          counter
    cacheme_node_load_duration_seconds_total{node}  counter  seconds spent in loads
    cacheme_node_coalesced_total{node}              counter
    cacheme_node_stale_hits_total{node}             counter
    cacheme_node_negative_hits_total{node}          counter
    cacheme_node_storage_errors_total{node}         counter
    cacheme_node_storage_timeouts_total{node}       counter
    cacheme_node_decode_errors_total{node}          counter
    cacheme_storage_round_trips_total{storage}      counter  remote storages only
    cacheme_storage_keys_read_total{storage}        counter
    cacheme_storage_keys_written_total{storage}     counter
    cacheme_storage_keys_removed_total{storage}     counter
    cacheme_storage_errors_total{storage}           counter
    cacheme_storage_timeouts_total{storage}         counter
    cacheme_storage_rejected_total{storage}         counter
    cacheme_storage_breaker_opens_total{storage}    counter
    cacheme_storage_breaker_open{storage}           gauge    1 while the breaker is open

Average load time is ``rate(cacheme_node_load_duration_seconds_total[5m]) /
rate(cacheme_node_loads_total[5m])``; hit ratio ``sum by (node)
(rate(cacheme_node_hits_total[5m])) / rate(cacheme_node_requests_total[5m])``.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..metrics import StatsSnapshot, snapshot
from . import (
    HITS_DESCRIPTION,
    HITS_PROMETHEUS,
    NODE_METRICS,
    STORAGE_METRICS,
    hits_by_tier,
    needs_extra,
    remote_storages,
)

with needs_extra(__name__, "prometheus"):
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

__all__ = ["CachemeCollector", "register"]


class CachemeCollector(Collector):
    """Exposes ``cacheme.metrics.snapshot()`` at each ``collect()`` (each scrape)."""

    def describe(self) -> Iterator[Metric]:
        """The families, without samples (so registering takes no snapshot)."""
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        """The families with one sample per node, node and tier, or remote storage."""
        return self._families(snapshot())

    def _families(self, snap: StatsSnapshot | None) -> Iterator[Metric]:
        nodes = list(snap.nodes.items()) if snap is not None else []
        for spec in NODE_METRICS:
            family = CounterMetricFamily(spec.prometheus, spec.description, labels=["node"])
            for name, stats in nodes:
                family.add_metric([name], spec.value(stats))
            yield family
        hits = CounterMetricFamily(HITS_PROMETHEUS, HITS_DESCRIPTION, labels=["node", "tier"])
        for name, stats in nodes:
            for tier, count in hits_by_tier(stats):
                hits.add_metric([name, tier], count)
        yield hits
        remote = remote_storages(snap) if snap is not None else []
        for sspec in STORAGE_METRICS:
            kind = GaugeMetricFamily if sspec.gauge else CounterMetricFamily
            sfamily = kind(sspec.prometheus, sspec.description, labels=["storage"])
            for storage in remote:
                sfamily.add_metric([storage.name], sspec.value(storage))
            yield sfamily


def register(registry: CollectorRegistry | None = None) -> CachemeCollector:
    """Register a new ``CachemeCollector`` on ``registry`` (default: ``REGISTRY``).

    Returns the collector, so ``registry.unregister(collector)`` removes it. Registering
    twice on one registry raises ``ValueError`` (duplicated timeseries), as
    ``prometheus_client`` does for any collector.
    """
    collector = CachemeCollector()
    (REGISTRY if registry is None else registry).register(collector)
    return collector
