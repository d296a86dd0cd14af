"""``landing``'s record of remote writes, as ``repair`` uses it: which writes of a key another
process changed must be removed again, now (landed since the change began) or once they land
(still under way)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cacheme import landing


@pytest.fixture
def repaired() -> Iterator[list[tuple[landing.Remover, list[str]]]]:
    calls: list[tuple[landing.Remover, list[str]]] = []
    before = landing.repairer
    landing.repairer = lambda remove, keys: calls.append((remove, keys))
    landing.keep_landed_writes(True)
    try:
        yield calls
    finally:
        landing.keep_landed_writes(False)
        landing.repairer = before


def _write(keys: tuple[str, ...]) -> tuple[asyncio.Future[Any], list[list[str]]]:
    removed: list[list[str]] = []
    fut = asyncio.get_running_loop().create_future()
    landing.note(keys, fut, removed.append)
    return fut, removed


async def test_a_write_under_way_is_repaired_once_it_lands(repaired: list[Any]) -> None:
    fut, _ = _write(("land:a", "land:b"))
    assert landing.to_repair(["land:a"], time.time() - 1) == []  # not landed: marked
    assert repaired == []
    fut.set_result(None)
    await asyncio.sleep(0)  # its done callbacks run
    assert [keys for _, keys in repaired] == [["land:a"]]  # only the changed key


async def test_a_write_that_landed_since_the_change_began_is_due_now(
    repaired: list[Any],
) -> None:
    before = time.time() - 0.001
    fut, _ = _write(("land:c",))
    fut.set_result(None)
    await asyncio.sleep(0)  # its done callbacks run
    due = landing.to_repair(["land:c", "land:other"], before)
    assert [key for _, key in due] == ["land:c"]
    assert landing.to_repair(["land:c"], time.time() + 1) == []  # landed before the change
    assert repaired == []


async def test_nothing_is_kept_while_the_backplane_is_off() -> None:
    fut, _ = _write(("land:d",))
    fut.set_result(None)
    await asyncio.sleep(0)  # its done callbacks run
    assert landing.to_repair(["land:d"], 0.0) == []
