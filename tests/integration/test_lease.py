"""Leases: one load per key across real OS processes (see ``cacheme.lease``).

Each child counts its loads in a shared file (``start``, then ``done`` or ``failed``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from .bp_harness import Child, redis_or_skip, start_children, stop_children, unique, wait_until

pytestmark = pytest.mark.redis

LOAD = 0.2  # seconds one load takes
CALLERS = 50


def _setup(tmp_path: Path, lease_ms: int, **extra: Any) -> dict[str, Any]:
    url = redis_or_skip()
    source = tmp_path / "source"
    source.write_text("7")
    return {
        "source": str(source),
        "loads": str(tmp_path / "loads"),
        "storages": {"redis": {"url": url}},
        "shared": "redis",
        "backplane": "redis",
        "channel": unique("lease-test"),
        "key": unique("cold"),
        "lease_ms": lease_ms,
        "load_delay": LOAD,
        **extra,
    }


def _loads(setup: dict[str, Any], what: str) -> list[str]:
    path = Path(setup["loads"])
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith(what)]


def _burst(children: list[Child], delay: float = 0.3) -> list[dict[str, Any]]:
    start = time.monotonic() + delay
    for child in children:
        child.send("burst", callers=CALLERS, start=start)
    return [child.recv(15) for child in children]


@pytest.fixture
def children() -> Any:
    made: list[Child] = []

    def make(n: int, setup: dict[str, Any]) -> list[Child]:
        group = start_children(n, setup)
        made.extend(group)
        return group

    yield make
    stop_children(made)


def test_one_load_for_four_processes_of_fifty_callers(tmp_path: Path, children: Any) -> None:
    setup = _setup(tmp_path, lease_ms=2000)
    group = children(4, setup)
    replies = _burst(group)
    for reply in replies:
        assert reply["values"] == [7] * CALLERS
    assert len(_loads(setup, "done")) == 1, _loads(setup, "")
    stats = [child.call("stats")["lease"] for child in group]
    assert sum(s["acquired"] for s in stats) == 1
    assert sum(s["served"] for s in stats) == 3
    # The waiters were woken by the holder's backplane message, not by polling.
    assert sum(s["woken"] for s in stats) >= 1


def test_the_holder_killed_mid_load_delays_the_others_by_the_lease_at_most(
    tmp_path: Path, children: Any
) -> None:
    lease_s = 1.0
    setup = _setup(tmp_path, lease_ms=int(lease_s * 1000))
    holder = children(1, {**setup, "load_delay": 30.0})[0]
    others = children(3, setup)
    holder.send("burst", callers=1)
    assert wait_until(lambda: _loads(setup, f"start {holder.pid}"), 5)
    began = time.monotonic()  # the lease is taken no later than this
    for child in others:
        child.send("burst", callers=CALLERS)
    time.sleep(0.05)
    holder.kill()
    replies = [child.recv(15) for child in others]
    for reply in replies:
        assert reply["values"] == [7] * CALLERS
        # Within the lease plus one load time (and a margin for polls and process noise).
        assert reply["at"] - began < lease_s + LOAD + 0.3, reply["at"] - began
    assert len(_loads(setup, "done")) == 1, _loads(setup, "")


def test_a_failed_load_is_not_cached_and_a_waiter_loads_at_once(
    tmp_path: Path, children: Any
) -> None:
    lease_s = 5.0
    setup = _setup(tmp_path, lease_ms=int(lease_s * 1000))
    failing = children(1, {**setup, "fail_loads": 1})[0]
    others = children(3, setup)
    failing.send("burst", callers=1)
    assert wait_until(lambda: _loads(setup, f"start {failing.pid}"), 5)
    began = time.monotonic()
    for child in others:
        child.send("burst", callers=CALLERS)
    failed = failing.recv(15)
    assert failed["values"] == ["RuntimeError('load failed on purpose')"]
    for reply in [child.recv(15) for child in others]:
        assert reply["values"] == [7] * CALLERS
        # Released at once: far sooner than the lease's 5 s.
        assert reply["at"] - began < 2 * LOAD + 0.5, reply["at"] - began
    assert len(_loads(setup, "failed")) == 1
    assert len(_loads(setup, "done")) == 1, _loads(setup, "")


def test_an_invalidate_during_the_holders_load_costs_one_more_load_not_a_queue(
    tmp_path: Path, children: Any
) -> None:
    """The key is invalidated while the holder loads: its value may be old, so it writes
    nothing; it gives the lease back at once, one waiter loads afresh and hands its value to
    the others. (Each waiter used to take the lease in turn after a second's grace, and each
    loaded: its write was dropped for the invalidation it had waited through.)"""
    holder_load = 0.5
    setup = _setup(tmp_path, lease_ms=5000)
    holder = children(1, {**setup, "load_delay": holder_load})[0]
    others = children(3, setup)
    invalidator = children(1, setup)[0]
    holder.send("burst", callers=1)
    assert wait_until(lambda: _loads(setup, f"start {holder.pid}"), 5)
    began = time.monotonic()
    for child in others:
        child.send("burst", callers=CALLERS)
    time.sleep(0.15)  # the others wait on the lease; the holder is still loading
    assert invalidator.call("invalidate")["ok"]
    assert holder.recv(15)["values"] == [7]
    for reply in [child.recv(15) for child in others]:
        assert reply["values"] == [7] * CALLERS
        assert reply["at"] - began < holder_load + LOAD + 0.6, reply["at"] - began
    assert len(_loads(setup, "done")) == 2, _loads(setup, "")


def test_a_doorkeeper_does_not_hold_back_the_holders_value(tmp_path: Path, children: Any) -> None:
    """Every process's doorkeeper sees the key for the first time; the holder writes its
    value anyway, since the others wait for it (each used to load in turn)."""
    setup = _setup(tmp_path, lease_ms=5000, doorkeeper=True)
    group = children(4, setup)
    for reply in _burst(group):
        assert reply["values"] == [7] * CALLERS
        assert reply["at"] - reply["began"] < 2 * LOAD + 0.5, reply["at"] - reply["began"]
    assert len(_loads(setup, "done")) == 1, _loads(setup, "")


def test_a_holder_whose_value_cannot_be_encoded_gives_the_lease_back_at_once(
    tmp_path: Path, children: Any
) -> None:
    setup = _setup(tmp_path, lease_ms=5000)
    holder = children(1, {**setup, "unencodable_loads": 1})[0]
    others = children(3, setup)
    holder.send("get")
    assert wait_until(lambda: _loads(setup, f"start {holder.pid}"), 5)
    began = time.monotonic()
    for child in others:
        child.send("burst", callers=CALLERS)
    assert "failed" in holder.recv(15)  # EncodeError, to its own caller only
    for reply in [child.recv(15) for child in others]:
        assert reply["values"] == [7] * CALLERS
        assert reply["at"] - began < 2 * LOAD + 0.5, reply["at"] - began
    assert len(_loads(setup, "unencodable")) == 1
    assert len(_loads(setup, "done")) == 1, _loads(setup, "")
