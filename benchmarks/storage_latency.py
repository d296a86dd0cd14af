"""Read latency of each remote storage: one key, and a batch of 100 keys.

    python benchmarks/storage_latency.py [--runs 300] [--backends redis,postgres,...]

Each backend is built through ``cacheme.Storage`` on its test server (URLs as in
``tests/services.py``; SQL tables created from ``sql/``, a fresh Mongo collection), filled with
100 entries of 100 bytes, then timed through the storage contract (``get_many``: coalescing,
timeout and breaker included). Prints the median and the 90th percentile in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tests.integration.backend_mongo  # noqa: E402  (each registers its factories)
import tests.integration.backend_redis  # noqa: E402
import tests.integration.backend_sql  # noqa: E402,F401
from cacheme.storages.base import Entry, RemoteStorage  # noqa: E402
from tests.integration.backends import FACTORIES  # noqa: E402


async def measure(storage: RemoteStorage[Any], runs: int) -> tuple[list[float], list[float]]:
    keys = [f"cacheme:latency:{i}:v1" for i in range(100)]
    await storage.set_many([Entry(k, b"x" * 100, None) for k in keys])
    one: list[float] = []
    batch: list[float] = []
    for i in range(runs):
        start = time.perf_counter()
        await storage.get_many(keys[i % 100 : i % 100 + 1])
        one.append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        found = await storage.get_many(keys)
        batch.append((time.perf_counter() - start) * 1e6)
        assert len(found) == 100
    return one, batch


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


async def main(backends: list[str], runs: int) -> None:
    print(f"{'backend':<14} {'1 key median':>13} {'p90':>9} {'100 keys median':>16} {'p90':>9}")
    for name in backends:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                async with FACTORIES[name](Path(tmp), f"latency-{name}") as storage:
                    one, batch = await measure(storage, runs)
            except BaseException as exc:  # a missing server skips the row, never the table
                print(f"{name:<14} unavailable: {type(exc).__name__}: {exc}"[:200])
                continue
        print(
            f"{name:<14} {statistics.median(one):>10.0f} us {p90(one):>6.0f} us "
            f"{statistics.median(batch):>13.0f} us {p90(batch):>6.0f} us"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--backends", default="redis,redis_cluster,sqlite,postgres,mysql,mongo")
    args = parser.parse_args()
    asyncio.run(main(args.backends.split(","), args.runs))
