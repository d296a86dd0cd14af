"""Faults a fresh reviewer found by trying the docs, each with its neighbours (local tiers).

- ``Meta.load_timeout`` bounds a load that takes its time over cancellation (or ignores it).
- ``load_timeout`` must be a positive, finite number of seconds (NaN and inf are refused).
- ``Memoize`` refuses a function that is not async, naming it, instead of a bare TypeError.
- A load that another process invalidated meanwhile (the backplane said so) writes nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import cacheme
from cacheme import backplane
from cacheme.node import Cache, Node

from .helpers import stored


def slow_node(timeout: float, swallow: bool) -> type[Node]:
    class Slow(Node):
        def key(self) -> str:
            return "slow"

        async def load(self) -> int:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await asyncio.sleep(0.5)  # a driver's cleanup on cancel
                if not swallow:
                    raise
            return 1

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]
            load_timeout = timeout

    return Slow


@pytest.mark.parametrize("swallow", [False, True])
async def test_load_timeout_does_not_wait_for_the_load_to_cancel(local: Any, swallow: bool) -> None:
    node_cls = slow_node(0.05, swallow)
    started = time.monotonic()
    results = await asyncio.gather(
        *(cacheme.get(node_cls()) for _ in range(3)), return_exceptions=True
    )
    assert time.monotonic() - started < 0.4
    assert all(isinstance(r, cacheme.LoadTimeoutError) for r in results), results
    assert stored("local", "cacheme:slow:") == (None, False)  # nothing cached
    assert cacheme.stats(node_cls).load_failure_count() == 1
    await asyncio.sleep(0.6)  # the abandoned load finishes its cleanup; nothing is logged


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0, -1.0])
def test_load_timeout_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(cacheme.ConfigurationError, match="load_timeout"):
        slow_node(bad, False)


def test_memoize_refuses_a_function_that_is_not_async() -> None:
    class Squares(Node):
        def key(self) -> str:
            return "sq"

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    def square(x: int) -> int:
        return x * x

    with pytest.raises(cacheme.ConfigurationError, match="square"):
        cacheme.Memoize(Squares)(square)  # type: ignore[arg-type]

    class Callable:
        async def __call__(self, x: int) -> int:
            return x

    cacheme.Memoize(Squares)(Callable())  # an object with an async __call__ is fine


async def test_a_load_invalidated_by_another_process_writes_nothing(local: Any) -> None:
    gate = asyncio.Event()

    class Shared(Node):
        def key(self) -> str:
            return "shared"

        async def load(self) -> int:
            await gate.wait()
            return 1

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    pending = asyncio.ensure_future(cacheme.get(Shared()))
    await asyncio.sleep(0.01)  # the load is running
    # What the backplane's subscriber does when another process invalidates the key:
    backplane._record_changes(["cacheme:shared:"])
    gate.set()
    assert await pending == 1  # its callers get what it loaded...
    assert stored("local", "cacheme:shared:") == (None, False)  # ...but nothing is kept
