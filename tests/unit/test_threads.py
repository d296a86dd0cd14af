"""Threads that each run an event loop share what is process-wide: the local storages and each
node's configuration (its stale-if-error table among them). Nothing of that may raise when
they use it at once."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from datetime import timedelta

import pytest

import cacheme
from cacheme import Cache, Node

from .helpers import threads_switching_fast


@pytest.mark.parametrize("policy", ["lru", "tlfu"])
async def test_loops_of_several_threads_share_local_tiers(policy: str) -> None:
    """Four threads, each with its own loop, get, invalidate and refresh 30 keys of a node
    with two small local tiers and stale-if-error, with a thread switch forced every
    microsecond. No call raises, and every value is its own key's. (An LRU entry removed
    between its lookup and its move to the end, an expired entry deleted twice, and the
    stale-if-error table's oldest entry dropped twice each raised ``KeyError`` in some
    caller before.)"""
    await cacheme.register_storage("front", cacheme.Storage(f"local://{policy}", size=8))
    await cacheme.register_storage("back", cacheme.Storage(f"local://{policy}", size=16))

    class Shared(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"threads:{self.n}"

        async def load(self) -> tuple[int, int]:
            await asyncio.sleep(0)
            return (self.n, threading.get_ident())

        class Meta(Node.Meta):
            caches = [
                Cache(storage="front", ttl=timedelta(microseconds=200)),
                Cache(storage="back", ttl=timedelta(milliseconds=5)),
            ]
            stale_if_error = timedelta(seconds=30)

    errors: list[BaseException] = []
    wrong: list[tuple[int, object]] = []
    stop = threading.Event()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)

        async def run() -> None:
            while not stop.is_set():
                n = rnd.randrange(30)
                op = rnd.random()
                if op < 0.7:
                    value = await cacheme.get(Shared(n))
                elif op < 0.85:
                    await cacheme.invalidate(Shared(n))
                    continue
                else:
                    value = await cacheme.refresh(Shared(n))
                if value[0] != n:
                    wrong.append((n, value))

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    with threads_switching_fast(worker) as threads:
        await asyncio.to_thread(time.sleep, 0.7)
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 30)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert not wrong, wrong[:5]
    assert cacheme.stats(Shared).requests > 100
