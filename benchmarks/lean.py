"""A lean Redis-backed read-through cache, written for the trace benchmark only.

The reference the benchmark sets beside cacheme: what the same job costs with the fewest
moving parts. Not a library: no statistics, no timeouts, no error handling (a failed Redis
call leaves its callers waiting), no local tier, next to no options.

- One future per key in flight: ``get`` returns it; every caller of that key awaits it.
- Reads: the keys asked in one turn of the event loop go out as one ``MGET`` (``get``
  collects them, ``loop.call_soon`` schedules the flush).
- Misses: each key Redis lacks is loaded in a task of its own.
- Writes: the values loaded in one turn go out as one pipeline of ``SET key value PX ttl``.
  A key's future stays registered (already resolved) until its write is sent and answered,
  so a caller in between gets the value instead of a second miss and load.
- Values are MsgPack; redis-py's asyncio client (hiredis when installed) on a blocking pool.

Imports redis and msgpack, which the repo's venv has (``cacheme[redis]``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import redis.asyncio as aioredis


class Lean:
    def __init__(
        self,
        url: str,
        load: Callable[[int], Awaitable[Any]],
        pool_size: int = 100,
        ttl_ms: int = 3_600_000,
    ) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=None
        )
        self._pool = pool
        self._client = aioredis.Redis(connection_pool=pool)
        self._load = load
        self._ttl_ms = ttl_ms
        self._flights: dict[str, asyncio.Future[Any]] = {}
        self._reads: list[tuple[str, int, asyncio.Future[Any]]] = []
        self._writes: list[tuple[str, bytes]] = []
        self._tasks: set[asyncio.Task[Any]] = set()  # strong references until done
        self._loop = asyncio.get_running_loop()

    def get(self, n: int) -> asyncio.Future[Any]:
        """The future of key ``uid:{n}``'s value (shared by every caller while in flight)."""
        key = f"uid:{n}"
        fut = self._flights.get(key)
        if fut is None:
            fut = self._loop.create_future()
            self._flights[key] = fut
            if not self._reads:
                self._loop.call_soon(self._flush_reads)
            self._reads.append((key, n, fut))
        return fut

    async def get_all(self, ns: list[int]) -> list[Any]:
        futures = [self.get(n) for n in ns]
        return [await f for f in futures]

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reads --------------------------------------------------------------------------------

    def _flush_reads(self) -> None:
        batch, self._reads = self._reads, []
        self._spawn(self._mget(batch))

    async def _mget(self, batch: list[tuple[str, int, asyncio.Future[Any]]]) -> None:
        raw = await self._client.mget([key for key, _, _ in batch])
        flights = self._flights
        for (key, n, fut), value in zip(batch, raw, strict=True):
            if value is None:
                self._spawn(self._fill(key, n, fut))
            else:
                del flights[key]
                fut.set_result(msgpack.unpackb(value))

    # -- misses and writes --------------------------------------------------------------------

    async def _fill(self, key: str, n: int, fut: asyncio.Future[Any]) -> None:
        value = await self._load(n)
        fut.set_result(value)  # the key stays in _flights until its SET is answered
        if not self._writes:
            self._loop.call_soon(self._flush_writes)
        self._writes.append((key, msgpack.packb(value)))

    def _flush_writes(self) -> None:
        batch, self._writes = self._writes, []
        self._spawn(self._pipeline(batch))

    async def _pipeline(self, batch: list[tuple[str, bytes]]) -> None:
        ttl = self._ttl_ms
        async with self._client.pipeline(transaction=False) as pipe:
            for key, data in batch:
                pipe.set(key, data, px=ttl)
            await pipe.execute()
        flights = self._flights
        for key, _ in batch:
            del flights[key]

    async def close(self) -> None:
        # The last loads' writes may still be on the wire when the workers finish.
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        await self._client.aclose()
        await self._pool.disconnect()
