"""examples/fastapi_app.py started with its lifespan and called over ASGI; the lifespan helper."""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import cacheme  # noqa: E402
from cacheme.integrations.fastapi import cacheme_lifespan  # noqa: E402

pytestmark = pytest.mark.sqlite

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_app.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """The example module, imported once (its node classes are global)."""
    spec = importlib.util.spec_from_file_location("cacheme_fastapi_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[Any]:
    """The app started (lifespan entered) and an HTTP client talking to it over ASGI."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            yield client


async def rows(db: Path, expected: int) -> list[str]:
    """The keys in the SQLite table, once write-backs have landed (they are asynchronous)."""
    keys: list[str] = []
    for _ in range(100):
        with sqlite3.connect(db) as conn:
            keys = sorted(r[0] for r in conn.execute('SELECT "key" FROM cacheme_data'))
        if len(keys) >= expected:
            break
        await asyncio.sleep(0.02)
    return keys


async def test_node_endpoint_second_call_is_a_hit(example: ModuleType, tmp_path: Path) -> None:
    db = tmp_path / "cache.db"
    app = example.create_app(db)
    node_cls = example.ProductNode
    before = cacheme.stats(node_cls)
    loads_before = example.source_calls["product"]
    async with running(app) as client:
        assert set(cacheme.storages()) == {"local", "sqlite"}
        first = await client.get("/products/7")
        assert first.status_code == 200
        assert first.json() == {"id": 7, "name": "product 7", "price_cents": 999}
        after_first = cacheme.stats(node_cls)
        assert after_first.requests - before.requests == 1
        assert after_first.hits - before.hits == 0

        second = await client.get("/products/7")
        assert second.json() == first.json()
        after_second = cacheme.stats(node_cls)
        assert after_second.requests - before.requests == 2
        assert after_second.hits - before.hits == 1  # the second call is a hit
        assert example.source_calls["product"] - loads_before == 1
        assert await rows(db, 1) == ["cacheme:product:7:v1"]

        missing = await client.get("/products/0")
        assert missing.status_code == 404 and "no product 0" in missing.json()["detail"]

        stats = (await client.get("/stats")).json()
        assert stats["source_calls"]["product"] >= 1
        assert stats["cacheme"]["storages"]["sqlite"]["keys_written"] >= 1
    assert cacheme.storages() == {}  # closed at shutdown


async def test_memoized_endpoint_second_call_is_a_hit(example: ModuleType, tmp_path: Path) -> None:
    db = tmp_path / "cache.db"
    node_cls = example.WeatherNode
    before = cacheme.stats(node_cls)
    calls_before = example.source_calls["weather"]
    async with running(example.create_app(db)) as client:
        first = await client.get("/weather/Paris")
        assert first.status_code == 200 and first.json() == {"city": "Paris", "celsius": 5.0}
        second = await client.get("/weather/Paris")
        assert second.json() == first.json()
        stats = cacheme.stats(node_cls)
        assert (stats.requests - before.requests, stats.hits - before.hits) == (2, 1)
        assert example.source_calls["weather"] - calls_before == 1
        assert await rows(db, 1) == ["cacheme:weather:paris:v1"]


async def test_restarted_app_finds_values_in_sqlite(example: ModuleType, tmp_path: Path) -> None:
    """A new process (new local tier, same SQLite file) is answered by the SQLite tier."""
    db = tmp_path / "cache.db"
    async with running(example.create_app(db)) as client:
        assert (await client.get("/products/41")).status_code == 200
        await rows(db, 1)
    node_cls = example.ProductNode
    before = cacheme.stats(node_cls)
    loads_before = example.source_calls["product"]
    async with running(example.create_app(db)) as client:
        again = await client.get("/products/41")
        assert again.json()["id"] == 41
    after = cacheme.stats(node_cls)
    assert after.hits - before.hits == 1
    assert example.source_calls["product"] == loads_before  # no load: SQLite had it
    tiers = getattr(after, "tier_hits", None)
    if tiers is not None:
        assert tiers.get("sqlite", 0) - getattr(before, "tier_hits", {}).get("sqlite", 0) == 1


# -- the lifespan helper on its own --------------------------------------------------------


async def test_lifespan_wraps_the_app_lifespan() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def app_lifespan(app: object) -> AsyncIterator[dict[str, str]]:
        events.append(f"start with {sorted(cacheme.storages())}")
        yield {"state": "yes"}
        events.append(f"stop with {sorted(cacheme.storages())}")

    lifespan = cacheme_lifespan(
        {"local": cacheme.Storage(url="local://lru", size=10)}, app_lifespan
    )
    context: AbstractAsyncContextManager[Any] = lifespan(object())
    async with context as state:
        assert state == {"state": "yes"}
        assert list(cacheme.storages()) == ["local"]
    assert cacheme.storages() == {}
    assert events == ["start with ['local']", "stop with ['local']"]


async def test_lifespan_closes_what_it_registered_when_start_up_fails() -> None:
    lifespan = cacheme_lifespan(
        {
            "local": cacheme.Storage(url="local://lru", size=10),
            "broken": cacheme.Storage(url="local://lru", size=-1),
        }
    )
    with pytest.raises(cacheme.ConfigurationError, match="size"):
        async with lifespan(object()):
            pytest.fail("the app must not start")
    assert cacheme.storages() == {}


@pytest.mark.parametrize(
    "storages", [["local://lru"], {"": cacheme.Storage(url="local://lru", size=1)}, {"a": "x"}]
)
def test_lifespan_rejects_bad_storages(storages: Any) -> None:
    with pytest.raises(cacheme.ConfigurationError, match="cacheme_lifespan"):
        cacheme_lifespan(storages)


@pytest.mark.parametrize("url", ["postgresql://127.0.0.1:1/test", "mongodb://127.0.0.1:1/rev"])
async def test_lifespan_creating_schemas_of_an_unreachable_server(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``create_schemas=True`` with a server that cannot be reached: the app starts, as the
    docs say for fail-open storages (the schema step stopped it at once), within the
    storage's timeout; a storage with ``fail_open=False`` still stops it."""
    pytest.importorskip("asyncpg" if url.startswith("postgresql") else "pymongo")
    lifespan = cacheme_lifespan({"down": cacheme.Storage(url, timeout=0.3)}, create_schemas=True)

    async def start(span: Any) -> list[str]:
        async with span(object()):
            return list(cacheme.storages())

    assert await asyncio.wait_for(start(lifespan), 10) == ["down"]
    assert "could not create its schema" in caplog.text
    strict = cacheme_lifespan(
        {"down": cacheme.Storage(url, timeout=0.3, fail_open=False)}, create_schemas=True
    )
    with pytest.raises(cacheme.StorageError) as info:
        await asyncio.wait_for(start(strict), 10)
    # The storage's name, as register_storage gives it (the error named the URL only).
    assert str(info.value).startswith(f"storage 'down' ({url}): could not create its schema: ")
    assert cacheme.storages() == {}


async def test_lifespan_creating_schemas_names_the_storage_of_a_bad_setting(
    tmp_path: Path,
) -> None:
    # A bad table name was reported for a storage named 'cacheme-cli'; a SQLite directory
    # that does not exist stops the start-up even failing open, as register_storage does.
    bad_table = cacheme_lifespan(
        {"db": cacheme.Storage(f"sqlite:///{tmp_path}/c.db", table="no;drop")},
        create_schemas=True,
    )
    with pytest.raises(cacheme.ConfigurationError, match=r"storage 'db' .*table"):
        async with bad_table(object()):
            pytest.fail("the app must not start")
    no_dir = cacheme_lifespan(
        {"db": cacheme.Storage(f"sqlite:///{tmp_path}/nodir/c.db")}, create_schemas=True
    )
    with pytest.raises(cacheme.StorageMisconfiguredError, match=r"storage 'db' .*does not exist"):
        async with no_dir(object()):
            pytest.fail("the app must not start")
    assert cacheme.storages() == {}


async def _plain_generator(app: object) -> AsyncIterator[None]:
    yield


@pytest.mark.parametrize(
    ("app_lifespan", "message"),
    [
        (5, "app_lifespan must be a lifespan"),
        ("lifespan", "app_lifespan must be a lifespan"),
        (_plain_generator, "asynccontextmanager"),
    ],
)
def test_lifespan_rejects_a_bad_app_lifespan_when_called(app_lifespan: Any, message: str) -> None:
    # app_lifespan=5 was taken, and failed only when the app started.
    with pytest.raises(cacheme.ConfigurationError, match=message):
        cacheme_lifespan({}, app_lifespan)


async def test_lifespan_whose_app_lifespan_returns_no_context_manager() -> None:
    lifespan = cacheme_lifespan(
        {"local": cacheme.Storage(url="local://lru", size=10)}, lambda app: None
    )
    with pytest.raises(cacheme.ConfigurationError, match="not an async context manager"):
        async with lifespan(object()):
            pytest.fail("the app must not start")
    assert cacheme.storages() == {}
