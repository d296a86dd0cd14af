"""Backplane benchmark: propagation delay of an invalidation, and what it costs a caller.

    python benchmarks/backplane.py [--redis redis://127.0.0.1:6379/15] [--n 1000]

1. Propagation: one process invalidates ``n`` keys of a ``[local, redis]`` node, one at a
   time (1 ms apart, so messages are not batched); three other processes record when each
   key's message reached them (the moment its drop is handed to their local tiers: their
   next read misses). Delay = arrival - return of ``invalidate`` in the sender, on the one
   ``time.monotonic`` clock of a Linux machine. Median, p99 and max over all 3 x n arrivals.
2. Cost per ``invalidate``, backplane off then on, back to back in one process, for a
   ``[local, redis]`` node and a ``[local]`` node (where the publish is most visible).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import cacheme
from cacheme import backplane
from cacheme.serializer import JSONSerializer

RECEIVERS = 3


def _node_class(shared: bool) -> type[cacheme.Node]:
    chain = [cacheme.Cache(storage="local", ttl=timedelta(seconds=60))]
    if shared:
        chain.append(cacheme.Cache(storage="redis", ttl=timedelta(seconds=60)))

    class Item(cacheme.Node):
        def __init__(self, name: str) -> None:
            self.name = name

        def key(self) -> str:
            return self.name

        async def load(self) -> int:
            return 1

        class Meta(cacheme.Node.Meta):
            version = "v1"
            caches = chain
            serializer = JSONSerializer()

    return Item


async def _setup(url: str) -> None:
    await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=100_000))
    await cacheme.register_storage("redis", cacheme.Storage(url=url))


def receiver(url: str, channel: str, conn: Any) -> None:
    arrivals: dict[str, float] = {}

    def arrived(kind: str, keys: Sequence[str], remote: bool) -> None:
        if remote and kind == "k":
            now = time.monotonic()
            for key in keys:
                arrivals.setdefault(key, now)

    async def main() -> None:
        await _setup(url)
        backplane.add_listener(arrived)
        await backplane.enable_backplane("redis", channel=channel)
        conn.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
        await backplane.disable_backplane()
        await cacheme.close_storages()

    asyncio.run(main())
    conn.send(arrivals)


async def sender(url: str, channel: str, n: int) -> tuple[dict[str, float], dict[str, float]]:
    await _setup(url)
    await backplane.enable_backplane("redis", channel=channel)
    item = _node_class(shared=True)
    sent: dict[str, float] = {}
    run = uuid.uuid4().hex[:8]
    for i in range(n):
        node = item(f"bench:{run}:{i}")
        await cacheme.invalidate(node)
        sent[f"cacheme:{node.key()}:v1"] = time.monotonic()
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.5)  # the last messages land
    costs = await invalidate_costs(n=max(2000, n))
    await backplane.disable_backplane()
    await cacheme.close_storages()
    return sent, costs


async def invalidate_costs(n: int) -> dict[str, float]:
    """Microseconds per invalidate, backplane off and on, for a [local, redis] and a [local]
    node (the backplane's channel stays the same; the storage is the registered Redis)."""
    out: dict[str, float] = {}
    for shared in (True, False):
        item = _node_class(shared)
        name = "local+redis" if shared else "local"
        for state in ("off", "on"):
            if state == "off":
                await backplane.disable_backplane()
            else:
                await backplane.enable_backplane("redis", channel=f"bench-cost-{uuid.uuid4()}")
            nodes = [item(f"cost:{uuid.uuid4().hex[:6]}:{i}") for i in range(n)]
            for node in nodes[:100]:  # warm up
                await cacheme.invalidate(node)
            start = time.perf_counter()
            for node in nodes:
                await cacheme.invalidate(node)
            out[f"{name} {state}"] = (time.perf_counter() - start) / n * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    pipes = []
    procs = []
    for _ in range(RECEIVERS):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=receiver, args=(args.redis, channel, there), daemon=True)
        proc.start()
        pipes.append(here)
        procs.append(proc)
    for pipe in pipes:
        if not pipe.poll(30):
            raise SystemExit("a receiver did not start within 30 s")
        pipe.recv()
    sent, costs = asyncio.run(sender(args.redis, channel, args.n))
    delays: list[float] = []
    missing = 0
    for pipe, proc in zip(pipes, procs, strict=True):
        pipe.send("stop")
        if not pipe.poll(30):
            raise SystemExit("a receiver did not report within 30 s")
        arrivals: dict[str, float] = pipe.recv()
        proc.join(10)
        for key, at in sent.items():
            if key in arrivals:
                delays.append((arrivals[key] - at) * 1000)
            else:
                missing += 1
    delays.sort()
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    print(f"propagation over {len(delays)} arrivals ({RECEIVERS} receivers x {args.n})")
    print(
        f"  median {statistics.median(delays):.3f} ms, p99 {p99:.3f} ms, "
        f"max {delays[-1]:.3f} ms, missing {missing}"
    )
    print("cost per invalidate (us)")
    for name in ("local+redis", "local"):
        off, on = costs[f"{name} off"], costs[f"{name} on"]
        print(f"  {name:12} off {off:8.2f}   on {on:8.2f}   (+{on - off:.2f})")


if __name__ == "__main__":
    main()
