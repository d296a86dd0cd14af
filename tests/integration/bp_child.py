"""A worker process for the backplane and lease tests: ``python -m tests.integration.bp_child``.

It reads one JSON setup line, builds its storages and a node, then answers JSON commands, one
per line, on stdin/stdout. Every reply is one JSON line. The process kills itself after
``deadline`` seconds whatever happens (``signal.alarm``), so a stuck test leaves no orphan.

The node's value comes from a file (``source``: an integer); each load appends a line to
``loads`` (``start <pid>`` then ``done <pid>``), so the parent counts loads across processes.
``TItem`` is a tagged node on the same chain (its tag given per item, its value from the same
file; loads counted per tag in the process), for the ``tget``/``twait``/``invalidate_tag``
commands.
"""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import cacheme
from cacheme import backplane, lease
from cacheme.serializer import JSONSerializer


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def main() -> None:
    setup: dict[str, Any] = json.loads(sys.stdin.readline())
    signal.alarm(int(setup.get("deadline", 60)))
    source: str = setup["source"]
    loads: str = setup["loads"]
    load_delay: float = setup.get("load_delay", 0.0)
    failures = [setup.get("fail_loads", 0)]  # this many loads raise, after their delay
    unencodable = [setup.get("unencodable_loads", 0)]  # this many loads return an object()
    read_first: bool = setup.get("read_first", False)

    await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=1000))
    for name, spec in setup["storages"].items():
        await cacheme.register_storage(name, cacheme.Storage(**spec))
    if setup.get("apply_delay_ms"):
        # A busy process: every message from the others is handled this much later.
        apply = backplane._Backplane._apply
        delay = setup["apply_delay_ms"] / 1000

        def slow_apply(self: Any, data: bytes) -> None:
            time.sleep(delay)
            apply(self, data)

        backplane._Backplane._apply = slow_apply  # type: ignore[method-assign]
    if setup.get("backplane"):
        await backplane.enable_backplane(setup["backplane"], channel=setup["channel"])

    local_ttl = timedelta(milliseconds=setup.get("local_ttl_ms", 60_000))
    shared_ttl = timedelta(milliseconds=setup.get("shared_ttl_ms", 60_000))
    chain = [cacheme.Cache(storage="local", ttl=local_ttl)]
    if setup.get("shared"):
        chain.append(cacheme.Cache(storage=setup["shared"], ttl=shared_ttl))
    lease_ms = setup.get("lease_ms")

    class Item(cacheme.Node):
        def __init__(self, name: str) -> None:
            self.name = name

        def key(self) -> str:
            return self.name

        async def load(self) -> int:
            # A query that read the source, then took its time to return (read_first).
            early = int(Path(source).read_text().strip() or 0) if read_first else None  # noqa: ASYNC240
            _append(loads, f"start {os.getpid()}")
            if load_delay:
                await asyncio.sleep(load_delay)
            if failures[0] > 0:
                failures[0] -= 1
                _append(loads, f"failed {os.getpid()}")
                raise RuntimeError("load failed on purpose")
            if unencodable[0] > 0:
                unencodable[0] -= 1
                _append(loads, f"unencodable {os.getpid()}")
                return object()  # type: ignore[return-value]  # JSON cannot encode it
            value = int(Path(source).read_text().strip() or 0)  # noqa: ASYNC240
            _append(loads, f"done {os.getpid()}")
            return value if early is None else early

        class Meta(cacheme.Node.Meta):
            version = "v1"
            caches = chain
            serializer = JSONSerializer()
            if lease_ms:
                lease = timedelta(milliseconds=lease_ms)
            if setup.get("doorkeeper"):
                doorkeeper = cacheme.BloomFilter(1000, 0.01)
            if setup.get("stale_if_error_ms"):
                stale_if_error = timedelta(milliseconds=setup["stale_if_error_ms"])

    tagged_loads: dict[str, int] = {}

    class TItem(cacheme.Node):
        def __init__(self, name: str, tag: str) -> None:
            self.name = name
            self.tag = tag

        def key(self) -> str:
            return self.name

        def tags(self) -> list[str]:
            return [self.tag]

        async def load(self) -> int:
            tagged_loads[self.tag] = tagged_loads.get(self.tag, 0) + 1
            return int(Path(source).read_text().strip() or 0)  # noqa: ASYNC240

        class Meta(cacheme.Node.Meta):
            version = "v1"
            caches = chain
            serializer = JSONSerializer()

    def titems(cmd: dict[str, Any]) -> list[TItem]:
        return [TItem(name, tag) for name, tag in cmd["items"]]

    key = setup["key"]
    loop = asyncio.get_running_loop()
    out = sys.stdout

    def reply(**payload: Any) -> None:
        out.write(json.dumps(payload) + "\n")
        out.flush()

    reply(ready=True, pid=os.getpid(), instance=backplane.stats().instance_id)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        cmd: dict[str, Any] = json.loads(line)
        op = cmd["op"]
        try:
            if op == "get":
                try:
                    value = await cacheme.get(Item(cmd.get("key", key)))
                except (RuntimeError, cacheme.EncodeError) as exc:  # fail/unencodable_loads
                    reply(failed=str(exc), at=time.monotonic())
                else:
                    reply(value=value, at=time.monotonic())
            elif op == "invalidate":
                try:
                    await cacheme.invalidate(Item(cmd.get("key", key)))
                    reply(ok=True, at=time.monotonic())
                except cacheme.StorageError as exc:
                    reply(ok=False, detail=str(exc), at=time.monotonic())
            elif op == "change_then_exit":
                # A script whose last act is an invalidate, a refresh or an invalidate_tag:
                # it ends at once after, normally (the parent closes its stdin, so the thread
                # reading it ends too); or a multiprocessing pool worker does it as its last
                # task, and ends the way such workers do (os._exit, no atexit handlers).
                args = (cmd["change"], cmd.get("key", key), cmd["tag"])
                worker = cmd.get("worker")
                if worker:
                    _classes[:] = [Item, TItem]  # the forked worker finds them here
                    pool = multiprocessing.get_context("fork").Pool(1, maxtasksperchild=1)
                    flush = worker == "terminated"
                    try:
                        await loop.run_in_executor(None, pool.apply, _run_job, (*args, flush))
                    finally:
                        if flush:  # as a `with Pool()` block ends: SIGTERM to the worker
                            pool.terminate()
                        else:
                            pool.close()
                        await loop.run_in_executor(None, pool.join)
                    reply(ok=True, at=time.monotonic())
                    continue
                await _change(*args, Item, TItem)
                reply(ok=True, at=time.monotonic())
                raise SystemExit(0)
            elif op == "get_in_new_loop":
                # A job of a worker that runs asyncio.run per job: its loop ends with it.
                job = functools.partial(asyncio.run, cacheme.get(Item(cmd.get("key", key))))
                value = await loop.run_in_executor(None, job)
                reply(value=value, at=time.monotonic())
            elif op == "refresh":
                value = await cacheme.refresh(Item(cmd.get("key", key)))
                reply(ok=True, value=value, at=time.monotonic())
            elif op == "wait_for":
                # Poll get() every ms until it returns ``value``; report when it first did.
                end = time.monotonic() + cmd["within"]
                seen: Any = None
                while time.monotonic() < end:
                    seen = await cacheme.get(Item(key))
                    if seen == cmd["value"]:
                        reply(ok=True, at=time.monotonic())
                        break
                    await asyncio.sleep(0.001)
                else:
                    reply(ok=False, seen=seen)
            elif op == "burst":
                # ``callers`` concurrent gets of one key, starting at monotonic ``start``.
                await asyncio.sleep(max(0.0, cmd.get("start", 0.0) - time.monotonic()))
                began = time.monotonic()
                values = await asyncio.gather(
                    *(cacheme.get(Item(cmd.get("key", key))) for _ in range(cmd["callers"])),
                    return_exceptions=True,
                )
                reply(
                    values=[v if isinstance(v, int) else repr(v) for v in values],
                    began=began,
                    at=time.monotonic(),
                )
            elif op == "bench":
                # The cost of invalidate, and the propagation marks: see benchmarks/backplane.py.
                n = cmd["n"]
                t0 = time.perf_counter()
                for i in range(n):
                    await cacheme.invalidate(Item(f"{key}:{i}"))
                reply(seconds=time.perf_counter() - t0)
            elif op == "tget":
                # The tagged items' values, with this process's local-tier hits and loads so far.
                values = await cacheme.get_all(titems(cmd))
                reply(
                    values=values,
                    local_hits=cacheme.stats(TItem).tier_hits.get("local", 0),
                    loads=dict(tagged_loads),
                )
            elif op == "twait":
                # Poll get_all() of the tagged items every ms until each returns ``value``.
                nodes = titems(cmd)
                end = time.monotonic() + cmd["within"]
                seen = []
                while time.monotonic() < end:
                    seen = await cacheme.get_all(nodes)
                    if all(v == cmd["value"] for v in seen):
                        reply(ok=True, at=time.monotonic())
                        break
                    await asyncio.sleep(0.001)
                else:
                    reply(ok=False, seen=seen)
            elif op == "invalidate_tag":
                await cacheme.invalidate_tag(TItem, cmd["tag"])
                reply(ok=True, at=time.monotonic())
            elif op == "stats":
                reply(backplane=backplane.stats().__dict__, lease=lease.stats().__dict__)
            elif op == "reregister":  # every storage registered again, as at a reload
                for name, spec in setup["storages"].items():
                    await cacheme.register_storage(name, cacheme.Storage(**spec))
                reply(ok=True)
            elif op == "disable":
                await backplane.disable_backplane()
                reply(ok=True)
            elif op == "enable":
                channel = cmd.get("channel", setup["channel"])
                await backplane.enable_backplane(setup["backplane"], channel=channel)
                reply(ok=True)
            elif op == "fail_loads":  # the next ``n`` loads raise
                failures[0] = cmd["n"]
                reply(ok=True)
            elif op == "exit":
                await backplane.disable_backplane()
                await cacheme.close_storages()
                reply(ok=True)
                os._exit(0)  # a thread still blocked on stdin would delay a normal exit
            else:
                reply(error=f"unknown op {op!r}")
        except Exception as exc:
            reply(error=f"{type(exc).__name__}: {exc}")


async def _change(kind: str, key: str, tag: str, item: Any, tagged: Any) -> None:
    """One change of ``key``: ``invalidate``, ``refresh``, or ``invalidate_tag`` of ``tag``."""
    if kind == "invalidate":
        await cacheme.invalidate(item(key))
    elif kind == "refresh":
        await cacheme.refresh(item(key))
    else:
        await cacheme.invalidate_tag(tagged, tag)


_classes: list[Any] = []  # Item and TItem, for a forked pool worker (see change_then_exit)


def _run_job(kind: str, key: str, tag: str, flush: bool) -> None:
    async def job() -> None:
        # At once after the fork: the worker's backplane subscribes anew meanwhile, and then
        # clears its local tiers (a refresh begun before that wrote to no tier: fixed).
        await _change(kind, key, tag, *_classes)
        if flush:
            await cacheme.flush_backplane()

    asyncio.run(job())


if __name__ == "__main__":
    asyncio.run(main())
