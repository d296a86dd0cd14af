"""OpenTelemetry metrics for cacheme: observable instruments on a meter.

Install with ``pip install "cacheme[otel]"`` (the API only; the application picks the SDK
and exporter), then once at start-up, after the meter provider is set::

    import cacheme.exporters.opentelemetry

    cacheme.exporters.opentelemetry.register()   # the global meter provider

Every instrument is asynchronous (observable): the SDK's reader calls back at each
collection, and the callback reads ``cacheme.metrics.snapshot()``; the values are
cumulative. Attributes: ``node`` (the snapshot name of the node class), ``tier`` (the
storage that served a hit), ``storage`` (a remote storage's registered name).

Instruments (name, unit, kind)::

    cacheme.node.requests          {request}     counter    node
    cacheme.node.hits              {request}     counter    node, tier
    cacheme.node.misses            {request}     counter    node
    cacheme.node.loads             {load}        counter    node
    cacheme.node.load.failures     {load}        counter    node
    cacheme.node.load.duration     s             counter    node  (seconds spent in loads)
    cacheme.node.coalesced         {request}     counter    node
    cacheme.node.stale_hits        {request}     counter    node
    cacheme.node.negative_hits     {request}     counter    node
    cacheme.node.storage.errors    {error}       counter    node
    cacheme.node.storage.timeouts  {timeout}     counter    node
    cacheme.node.decode_errors     {error}       counter    node
    cacheme.storage.round_trips    {round_trip}  counter    storage (remote storages only)
    cacheme.storage.keys.read      {key}         counter    storage
    cacheme.storage.keys.written   {key}         counter    storage
    cacheme.storage.keys.removed   {key}         counter    storage
    cacheme.storage.errors         {error}       counter    storage
    cacheme.storage.timeouts       {timeout}     counter    storage
    cacheme.storage.rejected       {operation}   counter    storage
    cacheme.storage.breaker.opens  {event}       counter    storage
    cacheme.storage.breaker.open   1             gauge      storage (1 while open, else 0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..metrics import snapshot
from . import (
    HITS_DESCRIPTION,
    HITS_OTEL,
    HITS_OTEL_UNIT,
    NODE_METRICS,
    STORAGE_METRICS,
    NodeMetric,
    StorageMetric,
    hits_by_tier,
    needs_extra,
    remote_storages,
)

with needs_extra(__name__, "otel"):
    from opentelemetry.metrics import (
        CallbackOptions,
        Meter,
        MeterProvider,
        Observation,
        get_meter,
    )

__all__ = ["METER_NAME", "Registration", "register"]

METER_NAME = "cacheme"

Callback = Callable[[CallbackOptions], Iterable[Observation]]


@dataclass(frozen=True)
class Registration:
    """What ``register`` created: the meter and its instruments (by instrument name)."""

    meter: Meter
    instruments: dict[str, object]


def _node_callback(spec: NodeMetric) -> Callback:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(spec.value(stats), {"node": name})
            for name, stats in snapshot().nodes.items()
        ]

    return observe


def _hits(options: CallbackOptions) -> Iterable[Observation]:
    return [
        Observation(count, {"node": name, "tier": tier})
        for name, stats in snapshot().nodes.items()
        for tier, count in hits_by_tier(stats)
    ]


def _storage_callback(spec: StorageMetric) -> Callback:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(spec.value(storage), {"storage": storage.name})
            for storage in remote_storages(snapshot())
        ]

    return observe


def register(
    meter_provider: MeterProvider | None = None, *, meter: Meter | None = None
) -> Registration:
    """Create cacheme's observable instruments.

    On ``meter`` if given, else on the meter ``"cacheme"`` of ``meter_provider`` (default:
    the global provider, ``opentelemetry.metrics.get_meter_provider()``). Call it once per
    provider: a second call adds a second set of callbacks, and the SDK then reports
    duplicate instruments. With no SDK installed the API's no-op provider is used and
    nothing is exported.
    """
    if meter is None:
        meter = get_meter(METER_NAME, meter_provider=meter_provider)
    instruments: dict[str, object] = {}
    for spec in NODE_METRICS:
        instruments[spec.otel] = meter.create_observable_counter(
            spec.otel, [_node_callback(spec)], unit=spec.otel_unit, description=spec.description
        )
    instruments[HITS_OTEL] = meter.create_observable_counter(
        HITS_OTEL, [_hits], unit=HITS_OTEL_UNIT, description=HITS_DESCRIPTION
    )
    for sspec in STORAGE_METRICS:
        create = meter.create_observable_gauge if sspec.gauge else meter.create_observable_counter
        instruments[sspec.otel] = create(
            sspec.otel,
            [_storage_callback(sspec)],
            unit=sspec.otel_unit,
            description=sspec.description,
        )
    return Registration(meter=meter, instruments=instruments)
