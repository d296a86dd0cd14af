"""A FastAPI app that caches one endpoint through a node and another through ``@cacheme.Memoize``.

Tiers: an in-process W-TinyLFU cache in front of SQLite, so no server is needed. The SQLite
table is created at start-up (``create_schemas=True``); in production create it once with
``cacheme schema create sqlite:///path/to/cache.db``.

Run it (``pip install "cacheme[sqlite,fastapi]" uvicorn``)::

    uvicorn examples.fastapi_app:app --reload
    curl localhost:8000/products/7      # loads, then caches
    curl localhost:8000/products/7      # local-tier hit
    curl localhost:8000/weather/Paris   # memoized function
    curl localhost:8000/stats           # cacheme.metrics.snapshot(), as JSON

The SQLite file is ``$CACHEME_EXAMPLE_DB`` (default: ``cacheme_example.db`` in the temporary
directory). ``tests/integration/test_fastapi_example.py`` starts this app and calls it.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import cacheme
from cacheme.integrations.fastapi import cacheme_lifespan
from cacheme.metrics import snapshot
from cacheme.serializer import JSONSerializer

# How many times each source was really called (the cache's job is to keep these low).
source_calls: Counter[str] = Counter()


class Product(BaseModel):
    id: int
    name: str
    price_cents: int


class Weather(BaseModel):
    city: str
    celsius: float


# -- a node: the endpoint calls cacheme.get(ProductNode(...)) ----------------------------


@dataclass
class ProductNode(cacheme.Node):
    product_id: int

    def key(self) -> str:
        return f"product:{self.product_id}"

    async def load(self) -> Product:
        """Stands for a slow database query."""
        source_calls["product"] += 1
        await asyncio.sleep(0.01)
        if self.product_id <= 0:
            raise LookupError(f"no product {self.product_id}")
        return Product(id=self.product_id, name=f"product {self.product_id}", price_cents=999)

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [
            cacheme.Cache(storage="local", ttl=timedelta(seconds=30)),
            cacheme.Cache(storage="sqlite", ttl=timedelta(hours=1)),
        ]
        serializer = JSONSerializer()  # values decode back to Product (load's annotation)


# -- a memoized function: its node only says where and how long -------------------------


@dataclass
class WeatherNode(cacheme.Node):
    city: str

    def key(self) -> str:
        return f"weather:{self.city.lower()}"

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [
            cacheme.Cache(storage="local", ttl=timedelta(seconds=10)),
            cacheme.Cache(storage="sqlite", ttl=timedelta(minutes=5)),
        ]
        serializer = JSONSerializer()


@cacheme.Memoize(WeatherNode)
async def current_weather(city: str) -> Weather:
    """Stands for a call to a weather service."""
    source_calls["weather"] += 1
    await asyncio.sleep(0.01)
    return Weather(city=city, celsius=float(len(city)))


@current_weather.to_node
def _weather_node(city: str) -> WeatherNode:
    return WeatherNode(city=city)


# -- the app ------------------------------------------------------------------------------


def default_db() -> Path:
    return Path(
        os.environ.get("CACHEME_EXAMPLE_DB", Path(tempfile.gettempdir()) / "cacheme_example.db")
    )


def create_app(db: Path | None = None) -> FastAPI:
    """The app, caching in SQLite file ``db`` (default: ``default_db()``)."""
    storages = {
        "local": cacheme.Storage(url="local://tlfu", size=10_000),
        "sqlite": cacheme.Storage(url=f"sqlite:///{(db or default_db()).resolve()}"),
    }

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The app's own start-up and shutdown run inside cacheme's: storages are ready here.
        yield

    app = FastAPI(
        title="cacheme example",
        lifespan=cacheme_lifespan(storages, app_lifespan, create_schemas=True),
    )

    @app.get("/products/{product_id}")
    async def product(product_id: int) -> Product:
        try:
            found: Product = await cacheme.get(ProductNode(product_id))
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        return found

    @app.get("/weather/{city}")
    async def weather(city: str) -> Weather:
        return await current_weather(city)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {"cacheme": snapshot().as_dict(), "source_calls": dict(source_calls)}

    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn  # pip install uvicorn

    uvicorn.run(app, port=8000)
