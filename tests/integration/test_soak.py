"""Soak: a long, hostile workload on ``[local, redis]``; nothing hangs, leaks or lies.

200,000 ``get`` calls over 10,000 keys from 2,000 concurrent workers; 5% of the loads raise,
5% of the callers are cancelled while they wait. The local tier (W-TinyLFU, 5,000 entries,
a TTL of a few hundred milliseconds) evicts and expires, so Redis is read and written all
along. The workload runs twice: a warm-up, then the measured run; the process's RSS after
the second must be within 10% of the RSS after the first (no growth per request).

Checked: every worker finishes (the whole run is bounded), every value returned is the
right one, every error is the load's own, no in-flight entry outlives the run.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import psutil
import pytest
import redis.asyncio

import cacheme
from cacheme import runtime
from cacheme.serializer import MsgPackSerializer
from tests.services import unavailable

from .backend_redis import redis_url

pytestmark = [pytest.mark.soak, pytest.mark.redis, pytest.mark.timeout(300)]

GETS = 200_000
KEYS = 10_000
CONCURRENCY = 2_000
LOAD_FAILURE = 0.05
CANCELLED = 0.05
LOCAL_SIZE = 5_000
RUN_BOUND = 120.0  # seconds one run may take before it counts as a hang


class SoakLoadError(Exception):
    """Raised by 5% of the loads."""


class SoakNode(cacheme.Node):
    rng = random.Random(1)

    def __init__(self, n: int) -> None:
        self.n = n

    def key(self) -> str:
        return f"soak:{self.n}"

    async def load(self) -> str:
        await asyncio.sleep(0 if self.rng.random() < 0.5 else 0.001)
        if self.rng.random() < LOAD_FAILURE:
            raise SoakLoadError(self.n)
        return expected(self.n)

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [
            cacheme.Cache(storage="soak-local", ttl=timedelta(milliseconds=300)),
            cacheme.Cache(storage="soak-redis", ttl=timedelta(seconds=3)),
        ]
        serializer = MsgPackSerializer()


def expected(n: int) -> str:
    return f"soak-value-{n}"


@dataclass
class Outcomes:
    values: int = 0
    load_errors: int = 0
    cancelled: int = 0
    wrong: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.values + self.load_errors + self.cancelled + len(self.wrong)


async def worker(rng: random.Random, gets: int, out: Outcomes) -> None:
    for _ in range(gets):
        n = rng.randrange(KEYS)
        if rng.random() < CANCELLED:
            task = asyncio.ensure_future(cacheme.get(SoakNode(n)))
            await asyncio.sleep(0 if rng.random() < 0.5 else 0.001)
            task.cancel()
            try:
                value = await task
            except asyncio.CancelledError:
                out.cancelled += 1
                continue
            except SoakLoadError:
                out.load_errors += 1
                continue
            except Exception as exc:
                out.wrong.append(f"key {n} (cancelled caller): {exc!r}")
                continue
        else:
            try:
                value = await cacheme.get(SoakNode(n))
            except SoakLoadError as exc:
                if exc.args != (n,):
                    out.wrong.append(f"key {n}: another key's error {exc!r}")
                out.load_errors += 1
                continue
            except Exception as exc:
                out.wrong.append(f"key {n}: {exc!r}")
                continue
        if value == expected(n):
            out.values += 1
        else:
            out.wrong.append(f"key {n}: got {value!r}")


async def run_workload(seed: int) -> tuple[Outcomes, float]:
    rng = random.Random(seed)
    out = Outcomes()
    per_worker = GETS // CONCURRENCY
    started = time.monotonic()
    workers = [
        asyncio.ensure_future(worker(random.Random(rng.random()), per_worker, out))
        for _ in range(CONCURRENCY)
    ]
    done, pending = await asyncio.wait(workers, timeout=RUN_BOUND)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} of {CONCURRENCY} workers still running after {RUN_BOUND}s"
    for task in done:
        task.result()  # a worker that crashed fails the test here
    elapsed = time.monotonic() - started
    # The flights of cancelled callers finish on their own; give them a moment.
    await runtime.current().quiesce(10)
    return out, elapsed


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


@pytest.fixture
async def soak_storages() -> AsyncIterator[str]:
    url = redis_url()
    prefix = f"cacheme-soak-{uuid.uuid4().hex[:12]}"
    client = redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        unavailable("Redis", url, exc)
    cacheme.set_prefix(prefix)
    try:
        await cacheme.register_storage(
            "soak-local", cacheme.Storage("local://tlfu", size=LOCAL_SIZE)
        )
        await cacheme.register_storage("soak-redis", cacheme.Storage(url, timeout=5))
        yield prefix
    finally:
        cacheme.set_prefix("cacheme")
        await cacheme.close_storages()
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.unlink(*keys[i : i + 1000])
        await client.aclose()


async def test_soak_local_and_redis(soak_storages: str, capsys: pytest.CaptureFixture[str]) -> None:
    warm, warm_time = await run_workload(seed=1)
    rss_warm = rss()
    before = cacheme.stats(SoakNode)
    redis_before = cacheme.storages()["soak-redis"].stats.keys_read

    out, run_time = await run_workload(seed=2)
    rss_after = rss()
    after = cacheme.stats(SoakNode)
    redis_stats = cacheme.storages()["soak-redis"].stats

    for result in (warm, out):
        assert result.total == GETS
        assert not result.wrong, result.wrong[:10]
        assert result.values > GETS * 0.8
        assert result.load_errors > 0 and result.cancelled > 0
    assert len(runtime.current().flights) == 0, (
        f"{len(runtime.current().flights)} in-flight entries left"
    )
    assert not runtime.current().tasks

    requests = after.request_count() - before.request_count()
    loads = after.load_count() - before.load_count()
    failures = after.load_failure_count() - before.load_failure_count()
    assert requests == GETS
    assert 0.02 < failures / loads < 0.08, (failures, loads)
    assert after.storage_error_count() == after.storage_timeout_count() == 0
    assert redis_stats.keys_read > redis_before  # the local tier evicted/expired: Redis read
    assert redis_stats.errors == redis_stats.timeouts == 0

    growth = (rss_after - rss_warm) / rss_warm
    summary = Counter(values=out.values, load_errors=out.load_errors, cancelled=out.cancelled)
    with capsys.disabled():
        print(
            f"\nsoak: warm-up {warm_time:.1f}s, run {run_time:.1f}s for {GETS} gets; "
            f"{dict(summary)}; loads {loads} ({failures} failed); hit rate "
            f"{(after.hit_count() - before.hit_count()) / requests:.3f}; redis keys read "
            f"{redis_stats.keys_read - redis_before}; RSS after warm-up "
            f"{rss_warm / 2**20:.1f} MiB, after run {rss_after / 2**20:.1f} MiB "
            f"({growth:+.1%})"
        )
    assert growth < 0.10, f"RSS grew {growth:.1%} over a run of the same workload"
