"""Small helpers shared by the unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cacheme.storages.base import MISS, LocalStorage
from cacheme.storages.registry import storages


class Counter:
    """A load function that counts its calls; ``gate`` (if set) holds every call back."""

    def __init__(self, value: Any = "value", gate: asyncio.Event | None = None) -> None:
        self.value = value
        self.gate = gate
        self.calls = 0

    async def __call__(self, node: Any = None) -> Any:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.value


async def settle(turns: int = 5) -> None:
    """Let the event loop run a few turns (a flight's task starts on the next turn)."""
    for _ in range(turns):
        await asyncio.sleep(0)


def tier(name: str) -> LocalStorage[Any]:
    """The registered local storage ``name``."""
    storage = storages()[name]
    assert isinstance(storage, LocalStorage)
    return storage


def stored(name: str, key: str) -> tuple[Any, bool]:
    """What the local tier ``name`` holds under the full key ``key``: ``(value, found)``."""
    value = tier(name).get(key)
    return (None, False) if value is MISS else (value, True)


@contextlib.contextmanager
def threads_switching_fast(
    target: Callable[[int], None], count: int = 4
) -> Iterator[list[threading.Thread]]:
    """Start ``count`` threads running ``target(i)``, with a thread switch forced every
    microsecond until the block ends (races that need an unlucky switch then show at once);
    the block stops them and ``join``s them (10 s each)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    try:
        for thread in threads:
            thread.start()
        yield threads
    finally:
        sys.setswitchinterval(switch)
