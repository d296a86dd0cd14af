"""Sequential cost of one cacheme call against the bare library call it sits on.

    python benchmarks/sequential.py [--rounds 41] [--ops 200] [--redis-url URL]

One process, one event loop, a lone caller (no concurrency). Each round runs ``--ops``
cacheme calls, then ``--ops`` bare calls, alternating, so that drift of the machine's speed
hits both alike; the reported figure is the median over rounds of the time per call, and
the ratio is cacheme / bare. The pairs:

- local hit: ``cacheme.get(node)`` answered by ``local://tlfu`` vs ``theine.Cache.get``.
  Both sides are driven without an event loop turn (a local hit never suspends).
- Redis hit: ``cacheme.get(node)`` on ``[redis]`` (value decoded) vs ``GET`` of the same key
  on the storage's own redis-py client, i.e. the same pool (bytes, not decoded).
- ``get_all`` of 20 keys on ``[redis]`` vs one ``MGET`` of the same keys, same pool.
- a miss that loads: a new key each call, ``[redis]``, ``load()`` returns at once, vs ``GET``
  (a miss) then ``SET`` with ``PX``, same pool.
- two references that are not targets: the Redis hit and ``get_all`` of 20 against the bare
  call followed by what any typed cache must do with the bytes, the node's serializer
  decoding them into its value type (``MsgPackSerializer.loads``: msgpack, then pydantic
  validation of ``dict[str, Any]``). What is left above those is cacheme's own work.

Redis: ``--redis-url`` (default ``redis://127.0.0.1:6379/14``; its keys under
``cacheme:seq:`` are deleted first). No targets are asserted here: the figures go to notes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import cacheme
from cacheme.serializer import MsgPackSerializer

VALUE = {"id": 1, "name": "user 1", "tags": ["a", "b"]}


class Local(cacheme.Node):
    def __init__(self, n: int) -> None:
        self.n = n

    def key(self) -> str:
        return f"seq:local:{self.n}"

    async def load(self) -> dict[str, Any]:
        return VALUE

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [cacheme.Cache(storage="local")]


class Remote(cacheme.Node):
    def __init__(self, n: int) -> None:
        self.n = n

    def key(self) -> str:
        return f"seq:redis:{self.n}"

    async def load(self) -> dict[str, Any]:
        return VALUE

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [cacheme.Cache(storage="redis")]
        serializer = MsgPackSerializer()


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (a local hit) without the event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended")


async def timed(fn: Callable[[], Awaitable[Any]], ops: int) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        await fn()
    return (time.perf_counter() - start) / ops


def timed_sync(fn: Callable[[], Any], ops: int) -> float:
    start = time.perf_counter()
    for _ in range(ops):
        fn()
    return (time.perf_counter() - start) / ops


async def main(args: argparse.Namespace) -> None:
    from theine import Cache as TheineCache

    await cacheme.register_storage("local", cacheme.Storage("local://tlfu", size=10_000))
    await cacheme.register_storage("redis", cacheme.Storage(args.redis_url))
    storage = cacheme.storages()["redis"]
    client = storage.here()._client  # type: ignore[attr-defined]
    await client.delete(*[k async for k in client.scan_iter("cacheme:seq:*")] or ["none"])

    local_node = Local(1)
    await cacheme.get(local_node)
    theine = TheineCache(10_000)
    theine.set("cacheme:seq:local:1:v1", VALUE)
    remote_node = Remote(1)
    await cacheme.get(remote_node)
    batch = [Remote(i) for i in range(100, 120)]
    await cacheme.get_all(batch)
    batch_keys = [f"cacheme:seq:redis:{i}:v1" for i in range(100, 120)]
    fresh = itertools.count(1_000_000)
    bare_fresh = itertools.count(1_000_000)
    serializer = MsgPackSerializer()
    packed = serializer.dumps(VALUE)
    value_type = dict[str, Any]

    async def bare_get_decoded() -> Any:
        return serializer.loads(await client.get("cacheme:seq:redis:1:v1"), value_type)

    async def bare_mget_decoded() -> list[Any]:
        return [serializer.loads(v, value_type) for v in await client.mget(batch_keys)]

    async def bare_miss() -> None:
        key = f"bare:seq:{next(bare_fresh)}"
        await client.get(key)
        await client.set(key, packed, px=60_000)

    pairs: dict[str, tuple[Any, Any, bool]] = {
        "local hit vs theine Cache.get": (
            lambda: drive(cacheme.get(local_node)),
            lambda: theine.get("cacheme:seq:local:1:v1"),
            False,
        ),
        "Redis hit vs GET (same pool)": (
            lambda: cacheme.get(remote_node),
            lambda: client.get("cacheme:seq:redis:1:v1"),
            True,
        ),
        "get_all of 20 vs MGET of 20": (
            lambda: cacheme.get_all(batch),
            lambda: client.mget(batch_keys),
            True,
        ),
        "miss that loads vs GET + SET": (
            lambda: cacheme.get(Remote(next(fresh))),
            bare_miss,
            True,
        ),
        "(ref) Redis hit vs GET + decode": (
            lambda: cacheme.get(remote_node),
            bare_get_decoded,
            True,
        ),
        "(ref) get_all of 20 vs MGET + decode": (
            lambda: cacheme.get_all(batch),
            bare_mget_decoded,
            True,
        ),
    }
    print(f"median of {args.rounds} interleaved rounds of {args.ops} calls, per call:")
    for name, (ours, bare, is_async) in pairs.items():
        mine: list[float] = []
        theirs: list[float] = []
        for _ in range(args.rounds):
            if is_async:
                mine.append(await timed(ours, args.ops))
                theirs.append(await timed(bare, args.ops))
            else:
                mine.append(timed_sync(ours, args.ops * 10))
                theirs.append(timed_sync(bare, args.ops * 10))
        a, b = statistics.median(mine), statistics.median(theirs)
        print(f"  {name:36s} {a * 1e6:8.2f} us vs {b * 1e6:8.2f} us = {a / b:5.2f}x")
    await client.delete(*[k async for k in client.scan_iter("*:seq:*")] or ["none"])
    await cacheme.close_storages()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    asyncio.run(main(parser.parse_args()))
