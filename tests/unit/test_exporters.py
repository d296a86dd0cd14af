"""The Prometheus and OpenTelemetry exporters, read back the way a scraper / reader sees them."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import cacheme
from cacheme import Cache, Node, Storage
from cacheme.metrics import snapshot
from cacheme.storages import registry
from cacheme.storages.base import StorageStats


def make_node(label: str) -> type[Node]:
    class Exported(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"{label}:{self.n}"

        async def load(self) -> int:
            return self.n

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local", ttl=None)]

    Exported.__qualname__ = label
    return Exported


class FakeRemote:
    """Stands for a registered remote storage: counters and a breaker state."""

    local = False
    url = "redis://:pw@127.0.0.1:6379/0"

    def __init__(self, breaker_open: bool) -> None:
        self.breaker_open = breaker_open
        self.stats = StorageStats(
            round_trips=3, keys_read=10, keys_written=4, keys_removed=2, errors=1, timeouts=1,
            rejected=5, breaker_opens=2,
        )  # fmt: skip


@pytest.fixture
async def traffic(monkeypatch: pytest.MonkeyPatch) -> type[Node]:
    """A node asked for 3 times (1 local hit, 2 loads) and two remote storages."""
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=100))
    node_cls = make_node("ExportedNode")
    await cacheme.get(node_cls(1))
    await cacheme.get(node_cls(1))
    await cacheme.get(node_cls(2))
    monkeypatch.setitem(registry._storages, "remote-a", FakeRemote(breaker_open=True))  # type: ignore[arg-type]
    monkeypatch.setitem(registry._storages, "remote-b", FakeRemote(breaker_open=False))  # type: ignore[arg-type]
    return node_cls


def test_importing_cacheme_imports_no_exporter_driver() -> None:
    code = (
        "import sys, cacheme, cacheme.metrics\n"
        "bad = [m for m in ('prometheus_client', 'opentelemetry') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# A finder first on sys.meta_path that refuses the driver's top-level package (and its
# submodules), as if its extra were not installed; the module under test is then imported.
_WITHOUT = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {driver!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
try:
    import {module}
except Exception as exc:
    print(type(exc).__name__, "|", isinstance(exc, ImportError), "|", exc)
else:
    print("imported")
"""


@pytest.mark.parametrize(
    ("module", "driver", "extra"),
    [
        ("cacheme.exporters.prometheus", "prometheus_client", "prometheus"),
        ("cacheme.exporters.opentelemetry", "opentelemetry", "otel"),
    ],
)
def test_exporter_without_its_extra_says_what_to_install(
    module: str, driver: str, extra: str
) -> None:
    # Was a bare ModuleNotFoundError; storages' drivers were MissingDriverError already.
    code = _WITHOUT.format(module=module, driver=driver)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    kind, is_import_error, message = result.stdout.strip().split(" | ")
    assert (kind, is_import_error) == ("MissingDriverError", "True"), result.stdout
    assert message.startswith(f"{module} needs the package {driver!r}")
    assert message.endswith(f'pip install "cacheme[{extra}]"')


# -- Prometheus ----------------------------------------------------------------------------


def prometheus_samples(registry_: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry_).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.needs_dev  # the exporter's library is an optional extra
async def test_prometheus_scrape(traffic: type[Node]) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    import cacheme.exporters.prometheus as prom

    reg = CollectorRegistry()
    collector = prom.register(registry=reg)
    name = snapshot().name_of(traffic)
    node = frozenset({("node", name)})
    samples = prometheus_samples(reg)

    assert samples[("cacheme_node_requests_total", node)] == 3
    assert samples[("cacheme_node_misses_total", node)] == 2
    assert samples[("cacheme_node_loads_total", node)] == 2
    assert samples[("cacheme_node_load_failures_total", node)] == 0
    assert samples[("cacheme_node_coalesced_total", node)] == 0
    assert samples[("cacheme_node_stale_hits_total", node)] == 0
    assert samples[("cacheme_node_negative_hits_total", node)] == 0
    seconds = samples[("cacheme_node_load_duration_seconds_total", node)]
    assert seconds == pytest.approx(cacheme.stats(traffic).load_time_ns / 1e9)
    hits = {
        dict(labels)["tier"]: value
        for (metric, labels), value in samples.items()
        if metric == "cacheme_node_hits_total" and ("node", name) in labels
    }
    assert sum(hits.values()) == 1
    assert set(hits) <= {"local", "unknown"}
    if hasattr(cacheme.stats(traffic), "tier_hits"):
        assert hits == {"local": 1}

    a = frozenset({("storage", "remote-a")})
    b = frozenset({("storage", "remote-b")})
    assert samples[("cacheme_storage_round_trips_total", a)] == 3
    assert samples[("cacheme_storage_keys_read_total", a)] == 10
    assert samples[("cacheme_storage_keys_written_total", a)] == 4
    assert samples[("cacheme_storage_keys_removed_total", a)] == 2
    assert samples[("cacheme_storage_errors_total", a)] == 1
    assert samples[("cacheme_storage_timeouts_total", a)] == 1
    assert samples[("cacheme_storage_rejected_total", a)] == 5
    assert samples[("cacheme_storage_breaker_opens_total", a)] == 2
    assert samples[("cacheme_storage_breaker_open", a)] == 1
    assert samples[("cacheme_storage_breaker_open", b)] == 0
    # Local tiers make no round trips: no storage series for them.
    assert not any(("storage", "local") in labels for _, labels in samples)

    text = generate_latest(reg).decode()
    assert "# TYPE cacheme_node_requests_total counter" in text
    assert "# TYPE cacheme_storage_breaker_open gauge" in text
    assert "# HELP cacheme_node_load_duration_seconds_total" in text

    # Each scrape reads the counters anew.
    await cacheme.get(traffic(1))
    assert prometheus_samples(reg)[("cacheme_node_requests_total", node)] == 4

    reg.unregister(collector)
    assert "cacheme_" not in generate_latest(reg).decode()


@pytest.mark.needs_dev  # the exporter's library is an optional extra
def test_prometheus_register_defaults_to_global_registry() -> None:
    from prometheus_client import REGISTRY

    import cacheme.exporters.prometheus as prom

    collector = prom.register()
    try:
        with pytest.raises(ValueError):
            prom.register()  # the same families twice on one registry
        assert REGISTRY.get_sample_value("cacheme_node_requests_total", {"node": "nope"}) is None
    finally:
        REGISTRY.unregister(collector)


# -- OpenTelemetry -------------------------------------------------------------------------


def otel_points(reader: Any) -> dict[str, tuple[str, list[tuple[dict[str, Any], float]]]]:
    """instrument name -> (unit, [(attributes, value)]) from one collection."""
    data = reader.get_metrics_data()
    out: dict[str, tuple[str, list[tuple[dict[str, Any], float]]]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "cacheme"
            for metric in scope_metrics.metrics:
                points = [(dict(p.attributes), p.value) for p in metric.data.data_points]
                out[metric.name] = (metric.unit, points)
    return out


def point(points: list[tuple[dict[str, Any], float]], **attrs: str) -> float:
    found = [value for attributes, value in points if attributes == attrs]
    assert len(found) == 1, (attrs, points)
    return found[0]


@pytest.mark.needs_dev  # the exporter's library is an optional extra
async def test_opentelemetry_reader(traffic: type[Node]) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import cacheme.exporters.opentelemetry as otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        registration = otel.register(provider)
        assert "cacheme.node.requests" in registration.instruments
        name = snapshot().name_of(traffic)
        metrics = otel_points(reader)

        unit, points = metrics["cacheme.node.requests"]
        assert unit == "{request}" and point(points, node=name) == 3
        assert point(metrics["cacheme.node.misses"][1], node=name) == 2
        assert point(metrics["cacheme.node.loads"][1], node=name) == 2
        assert point(metrics["cacheme.node.load.failures"][1], node=name) == 0
        assert point(metrics["cacheme.node.coalesced"][1], node=name) == 0
        assert point(metrics["cacheme.node.stale_hits"][1], node=name) == 0
        assert point(metrics["cacheme.node.negative_hits"][1], node=name) == 0
        unit, points = metrics["cacheme.node.load.duration"]
        assert unit == "s"
        assert point(points, node=name) == pytest.approx(cacheme.stats(traffic).load_time_ns / 1e9)
        hits = [(a, v) for a, v in metrics["cacheme.node.hits"][1] if a["node"] == name]
        assert sum(v for _, v in hits) == 1
        if hasattr(cacheme.stats(traffic), "tier_hits"):
            assert hits == [({"node": name, "tier": "local"}, 1)]

        assert point(metrics["cacheme.storage.round_trips"][1], storage="remote-a") == 3
        assert point(metrics["cacheme.storage.keys.read"][1], storage="remote-a") == 10
        assert point(metrics["cacheme.storage.keys.written"][1], storage="remote-a") == 4
        assert point(metrics["cacheme.storage.keys.removed"][1], storage="remote-a") == 2
        assert point(metrics["cacheme.storage.errors"][1], storage="remote-a") == 1
        assert point(metrics["cacheme.storage.timeouts"][1], storage="remote-a") == 1
        assert point(metrics["cacheme.storage.rejected"][1], storage="remote-a") == 5
        assert point(metrics["cacheme.storage.breaker.opens"][1], storage="remote-a") == 2
        unit, points = metrics["cacheme.storage.breaker.open"]
        assert point(points, storage="remote-a") == 1 and point(points, storage="remote-b") == 0
        assert all(a["storage"] != "local" for a, _ in points)

        # Counters are cumulative and monotonic; a new collection sees new requests.
        await cacheme.get(traffic(1))
        assert point(otel_points(reader)["cacheme.node.requests"][1], node=name) == 4
    finally:
        provider.shutdown()
