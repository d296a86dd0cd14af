"""One benchmark run in a fresh interpreter: ``trace.py`` starts this, once per run.

    python benchmarks/child.py --framework cacheme --workers 1000 --redis-url redis://...

Draws the workload (``workload.py``), sets the framework up (``adapters.py``), empties the
Redis database and resets the server's command statistics, then lets N workers pull requests
from one asyncio queue until it is empty. Prints heartbeat lines while it runs and, last,
one line ``RESULT {json}``.

Standard library only (plus ``redis`` for the statistics, present in every benchmark venv).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from adapters import ADAPTERS, Adapter, Context  # noqa: E402
from workload import batch_keys, trace_keys  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (MiB), from /proc (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def redis_reset(url: str) -> dict[str, Any]:
    """FLUSHDB the run's database and CONFIG RESETSTAT; the server's facts for the report."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        client.config_resetstat()
        info = client.info("server")
        return {"redis_version": info.get("redis_version")}
    finally:
        client.close()


def redis_commandstats(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    out: dict[str, int] = {}
    for name, value in stats.items():
        # cmdstat_get -> {"calls": 12, ...}; redis-py parses it into a dict
        cmd = name.removeprefix("cmdstat_")
        if isinstance(value, dict):
            out[cmd] = int(value.get("calls", 0))
    return out


class GcClock:
    """Seconds spent in the cyclic garbage collector, and its collections, while on."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


class Counter:
    def __init__(self) -> None:
        self.loads = 0
        self.done = 0
        self.keys_done = 0
        self.wrong = 0
        self.errors = 0
        self.first_error = ""


async def run(args: argparse.Namespace) -> dict[str, Any]:
    adapter: Adapter = ADAPTERS[args.framework]()
    counter = Counter()
    delay = args.load_delay

    async def load(n: int) -> int:
        counter.loads += 1
        await asyncio.sleep(delay)
        return n

    batch_mode = adapter.batch
    items: list[Any]
    if batch_mode:
        items = batch_keys(args.requests // 10, args.batch_size, args.seed, imax=args.requests)
        unique = len({k for b in items for k in b})
        keys_total = sum(len(b) for b in items)
    else:
        items = trace_keys(args.requests, args.seed)
        unique = len(set(items))
        keys_total = len(items)

    server: dict[str, Any] = {}
    if adapter.backend == "redis":
        server = redis_reset(args.redis_url)  # before setup: a fresh, empty database
    ctx = Context(load=load, redis_url=args.redis_url, sqlite_path=args.sqlite_path)
    await adapter.setup(ctx)
    if adapter.backend == "redis":
        server = redis_reset(args.redis_url)  # setup's commands are not counted
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    rss_before = rss_mb()

    async def worker() -> None:
        get = adapter.get_all if batch_mode else adapter.get
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                value = await get(item)
            except Exception as exc:  # counted, never fatal: every framework gets the same
                counter.errors += 1
                if not counter.first_error:
                    counter.first_error = f"{type(exc).__name__}: {exc}"[:300]
                value = None
            if value != item:
                counter.wrong += 1
            counter.done += 1
            counter.keys_done += len(item) if batch_mode else 1

    total = len(items)

    async def heartbeat(start: float) -> None:
        while True:
            await asyncio.sleep(args.heartbeat)
            print(
                f"    {time.perf_counter() - start:6.1f}s  {counter.done:>7}/{total} requests"
                f"  {counter.loads:>6} loads  rss {rss_mb():.0f} MiB",
                flush=True,
            )

    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold)
    start = time.perf_counter()
    beat = asyncio.ensure_future(heartbeat(start)) if args.heartbeat > 0 else None
    with GcClock() as gc_clock:
        await asyncio.gather(*(worker() for _ in range(args.workers)))
    seconds = time.perf_counter() - start
    if beat is not None:
        beat.cancel()
    framework_stats = adapter.stats()
    commands: dict[str, int] = {}
    if adapter.backend == "redis":
        commands = redis_commandstats(args.redis_url)
    with contextlib.suppress(Exception):  # a peer's close failing does not void the run
        await adapter.close()
    return {
        "framework": adapter.name,
        "label": adapter.label,
        "package": adapter.package,
        "version": adapter.version(),
        "env": adapter.env,
        "backend": adapter.backend,
        "mode": "batch" if batch_mode else "trace",
        "workers": args.workers,
        "requests": total,
        "keys": keys_total,
        "unique_keys": unique,
        "load_delay": delay,
        "seconds": round(seconds, 3),
        "load_limit_seconds": round(unique * delay / args.workers, 3),
        "load_calls": counter.loads,
        "wrong": counter.wrong,
        "errors": counter.errors,
        "first_error": counter.first_error,
        "redis_get": commands.get("get", 0),
        "redis_mget": commands.get("mget", 0),
        "redis_commands": commands,
        "framework_stats": framework_stats,
        "gc_seconds": round(gc_clock.seconds, 3),
        "gc_collections": gc_clock.collections,
        "gc_threshold": gc.get_threshold()[0],
        "rss_before_run_mb": round(rss_before, 1),
        "peak_rss_mb_self": round(peak_rss_mb(), 1),
        "python": sys.version.split()[0],
        **server,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", required=True, choices=sorted(ADAPTERS))
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--load-delay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    p.add_argument("--sqlite-path", default="")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds; 0 = none")
    p.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        help="the cyclic GC's first threshold for the run (0: Python's default, 700)",
    )
    p.add_argument("--profile", default="", help="write a cProfile of the run to this file")
    args = p.parse_args()
    try:
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            result = prof.runcall(asyncio.run, run(args))
            prof.dump_stats(args.profile)
        else:
            result = asyncio.run(run(args))
    except Exception:
        traceback.print_exc()
        sys.exit(2)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
