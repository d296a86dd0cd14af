"""cacheme on embedded defaults: a local W-TinyLFU tier in front of SQLite. No server needed.

Run: bash scripts/demo   (or: python examples/demo.py [--db PATH])
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import cacheme
from cacheme.serializer import MsgPackSerializer

ROOT = Path(__file__).resolve().parent.parent
source_calls = 0


@dataclass
class User:
    id: int
    name: str


@dataclass
class UserNode(cacheme.Node):
    user_id: int

    def key(self) -> str:
        return f"user:{self.user_id}"

    async def load(self) -> User:
        """Pretend to query a slow database."""
        global source_calls
        source_calls += 1
        await asyncio.sleep(0.05)
        return User(id=self.user_id, name=f"user-{self.user_id}")

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [
            cacheme.Cache(storage="local", ttl=timedelta(seconds=30)),
            cacheme.Cache(storage="sqlite", ttl=timedelta(days=1)),
        ]
        serializer = MsgPackSerializer()


def create_table(db: Path) -> None:
    """The spec asks users to create the table first; sql/sqlite.sql is the schema."""
    with sqlite3.connect(db) as conn:
        conn.executescript((ROOT / "sql" / "sqlite.sql").read_text())


async def timed(label: str, coro: object) -> object:
    start = time.perf_counter()
    result = await coro  # type: ignore[misc]
    ms = (time.perf_counter() - start) * 1000
    print(f"  {label:<58} {ms:8.2f} ms   source loads so far: {source_calls}")
    return result


async def main(db: Path) -> None:
    create_table(db)
    await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=10_000))
    await cacheme.register_storage("sqlite", cacheme.Storage(url=f"sqlite:///{db}"))
    print(f"cacheme demo: tiers [local://tlfu, sqlite:///{db}]\n")

    print("1. First get loads from the source and writes both tiers:")
    user = await timed("get(UserNode(1))", cacheme.get(UserNode(1)))
    print(f"     -> {user!r}")
    print("2. Second get is a local hit (no await on anything slow):")
    await timed("get(UserNode(1))", cacheme.get(UserNode(1)))

    print("3. 1,000 concurrent gets of one new key share one load (singleflight):")
    await timed(
        "gather(1000 x get(UserNode(2)))",
        asyncio.gather(*(cacheme.get(UserNode(2)) for _ in range(1000))),
    )

    print("4. get_all: hits, misses and duplicates in one call (one SQLite read, one write):")
    users = await timed(
        "get_all([1, 2, 3, 4, 3])", cacheme.get_all([UserNode(i) for i in (1, 2, 3, 4, 3)])
    )
    print(f"     -> {[u.name for u in users]}")  # type: ignore[attr-defined]

    print("5. A fresh local tier (as after a restart) is refilled from SQLite, not the source:")
    await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=10_000))
    await timed("get(UserNode(1))", cacheme.get(UserNode(1)))

    print("6. invalidate removes the key from every tier; the next get loads again:")
    await cacheme.invalidate(UserNode(1))
    await timed("get(UserNode(1)) after invalidate", cacheme.get(UserNode(1)))

    s = cacheme.stats(UserNode)
    print("\nstats(UserNode):")
    print(
        f"  requests {s.request_count()}, hits {s.hit_count()}, misses {s.miss_count()}, "
        f"hit rate {s.hit_rate():.1%}"
    )
    print(
        f"  {s.coalesced_count()} of the misses joined a load already under way "
        "(singleflight) instead of starting their own"
    )
    print(
        f"  loads {s.load_count()} (failed {s.load_failure_count()}), "
        f"average load {s.average_load_time() / 1e6:.1f} ms"
    )
    print(f"source was called {source_calls} times for {s.request_count()} requests")
    await cacheme.close_storages()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    if args.db:
        asyncio.run(main(args.db))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(Path(tmp) / "cacheme-demo.sqlite3"))
