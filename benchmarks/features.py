"""The cost of each freshness feature on the hot path: a sequential ``get`` hit, on a local
tier and on Redis, against the same node without the feature, in one run.

    .venv/bin/python benchmarks/features.py [--redis redis://127.0.0.1:6379/15] [-n 20000]

Prints microseconds per hit and the ratio to the plain node of the same tier. The baseline
("off") is a node using none of the features: it takes the ordinary path.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import cacheme
from cacheme.serializer import MsgPackSerializer

FEATURES: dict[str, dict[str, Any]] = {
    "off": {},
    "negative_ttl": {"negative_ttl": timedelta(seconds=5)},
    "refresh_after": {"refresh_after": 0.5},
    "stale_while_revalidate": {"stale_while_revalidate": timedelta(seconds=30)},
    "tags": {"tagged": True},
    "all": {
        "negative_ttl": timedelta(seconds=5),
        "refresh_after": 0.5,
        "stale_while_revalidate": timedelta(seconds=30),
        "tagged": True,
    },
}


def node_class(name: str, storage: str, options: dict[str, Any]) -> Any:
    options = dict(options)
    tagged = options.pop("tagged", False)
    meta = type(
        "Meta",
        (cacheme.Node.Meta,),
        {
            "version": f"bench-{name}",
            "caches": [cacheme.Cache(storage=storage, ttl=timedelta(minutes=10))],
            "serializer": MsgPackSerializer(),
            **options,
        },
    )

    @dataclass
    class Bench(cacheme.Node):
        ident: int

        def key(self) -> str:
            return f"bench:{self.ident}"

        async def load(self) -> dict[str, Any]:
            return {"id": self.ident, "name": "x" * 40}

        if tagged:

            def tags(self) -> list[str]:
                return [f"group:{self.ident % 4}"]

        Meta = meta

    Bench.__qualname__ = f"Bench_{storage}_{name}"
    return Bench


async def per_hit(cls: Any, n: int, keys: int = 100) -> float:
    nodes = [cls(i) for i in range(keys)]
    for node in nodes:
        await cacheme.get(node)  # load once: every timed get is a hit
    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        await cacheme.get(nodes[i % keys])
    return (time.perf_counter() - start) / n * 1e6


async def main(redis_url: str | None, n: int, rounds: int) -> None:
    await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=10_000))
    tiers = ["local"]
    if redis_url:
        await cacheme.register_storage("redis", cacheme.Storage(url=redis_url))
        tiers.append("redis")
    for storage in tiers:
        count = n if storage == "local" else max(1, n // 10)
        classes = {name: node_class(name, storage, opts) for name, opts in FEATURES.items()}
        times: dict[str, list[float]] = {name: [] for name in FEATURES}
        for _ in range(rounds):  # interleaved, so drift hits every feature alike
            for name, cls in classes.items():
                times[name].append(await per_hit(cls, count))
        base = statistics.median(times["off"])
        print(f"\n{storage} hit, {count} sequential gets x {rounds} rounds (median):")
        for name in FEATURES:
            us = statistics.median(times[name])
            print(f"  {name:24s} {us:8.2f} us   x{us / base:.2f}")
    await cacheme.close_storages()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(None if args.no_redis else args.redis, args.n, args.rounds))
