"""The child side of ``test_event_loops``: one scenario, run in a fresh interpreter.

The parent runs ``main(config_json)`` through ``python -c`` with the storage to register
(``url``, ``options``), the key prefix, the scenario and a scratch directory. The scenario
prints one line ``RESULT {json}``; the parent asserts on it. Nothing here asserts: every
step records what happened (value, error, seconds), so a failure reads as a story.

Bounds, so that a broken build fails in seconds instead of hanging:

- every ``get`` is awaited with ``asyncio.wait_for`` and timed (``BOUND``);
- ``faulthandler`` dumps every thread's stack and exits (code 1) if the whole scenario takes
  longer than ``WATCHDOG`` seconds, or if the interpreter takes longer than ``EXIT_BOUND``
  to exit once the result is printed;
- every scenario except ``exit_without_close`` leaves through ``os._exit(0)`` after printing
  its result: only that one tests how the process exits.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import cacheme
from cacheme.serializer import MsgPackSerializer

WATCHDOG = 40.0  # seconds for a whole scenario
EXIT_BOUND = 10.0  # seconds for the interpreter to exit after the result is printed
BOUND = 5.0  # seconds one get may take in a new loop
STORAGE_TIMEOUT = 3.0  # the remote storages' default per-operation timeout
FORK_BOUND = 20.0  # seconds for a forked worker

STORAGE = "remote"

# Loads: how long the load of a key sleeps, and how many times each key was loaded.
SLOW: dict[str, float] = {}
LOADS: dict[str, int] = {}


def expected(name: str) -> dict[str, str]:
    return {"name": name, "value": f"value-of-{name}"}


@dataclass
class LoopNode(cacheme.Node):
    name: str

    def key(self) -> str:
        return f"loops:{self.name}"

    async def load(self) -> dict[str, str]:
        LOADS[self.name] = LOADS.get(self.name, 0) + 1
        delay = SLOW.get(self.name, 0.0)
        if delay:
            await asyncio.sleep(delay)
        return expected(self.name)

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [cacheme.Cache(storage=STORAGE, ttl=timedelta(minutes=10))]
        serializer = MsgPackSerializer()


def describe(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


def stats() -> dict[str, int]:
    s = cacheme.stats(LoopNode)
    return {
        "requests": s.request_count(),
        "hits": s.hit_count(),
        "loads": s.load_count(),
        "storage_errors": s.storage_error_count(),
        "storage_timeouts": s.storage_timeout_count(),
    }


def held(settle: bool = False) -> dict[str, int]:
    """What this process holds: TCP connections to a server, aiosqlite worker threads.

    ``settle``: wait up to a second for them to reach zero (a close may finish a turn later).
    """
    import psutil

    deadline = time.monotonic() + (1.0 if settle else 0.0)
    while True:
        now = {
            "sockets": sum(1 for c in psutil.Process().net_connections(kind="tcp") if c.raddr),
            "sqlite_threads": sum(
                "_connection_worker_thread" in t.name for t in threading.enumerate()
            ),
        }
        if not any(now.values()) or time.monotonic() >= deadline:
            return now
        time.sleep(0.05)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


async def timed_get(name: str, bound: float = BOUND) -> dict[str, Any]:
    """Get ``LoopNode(name)``: ok when the right value came within ``bound`` seconds."""
    t0 = time.monotonic()
    try:
        value = await asyncio.wait_for(cacheme.get(LoopNode(name)), bound + 1)
    except Exception as exc:
        elapsed = time.monotonic() - t0
        error = describe(exc)
        if isinstance(exc, TimeoutError):
            error = f"no value after {elapsed:.1f} s (hang): {error}"
        return {"name": name, "ok": False, "elapsed": round(elapsed, 3), "error": error}
    elapsed = time.monotonic() - t0
    right = value == expected(name)
    error = None
    if not right:
        error = f"wrong value {value!r}"
    elif elapsed > bound:
        error = f"took {elapsed:.2f} s, more than {bound} s"
    return {"name": name, "ok": error is None, "elapsed": round(elapsed, 3), "error": error}


async def register(cfg: dict[str, Any]) -> None:
    await cacheme.register_storage(STORAGE, cacheme.Storage(cfg["url"], **cfg["options"]))


async def register_and_use(cfg: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    await register(cfg)
    return [await timed_get(n) for n in names]


# --- scenarios: each fills ``out`` and returns -----------------------------------------


def two_runs(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """``asyncio.run`` twice: the storage registered in the first works in the second."""
    out["first"] = asyncio.run(register_and_use(cfg, [f"first-{i}" for i in range(3)]))
    before = stats()

    async def second() -> list[dict[str, Any]]:
        names = [f"second-{i}" for i in range(10)]
        reads = [await timed_get(n) for n in names]  # misses: one load each
        reads += await asyncio.gather(*(timed_get(n) for n in names))  # hits
        return reads

    out["second"] = asyncio.run(second())
    out["second_delta"] = delta(stats(), before)
    out["total"] = stats()


def threads(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """Two threads, each with its own loop, get one key at once."""
    out["first"] = asyncio.run(register_and_use(cfg, ["warm"]))
    SLOW["shared"] = 0.05
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def worker(i: int) -> None:
        async def go() -> dict[str, Any]:
            barrier.wait(timeout=BOUND)
            return await timed_get("shared")

        try:
            results[i] = asyncio.run(go())
        except Exception as exc:
            results[i] = {"ok": False, "error": describe(exc)}

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=3 * BOUND)
    out["alive"] = [t.is_alive() for t in workers]
    out["threads"] = results
    out["loads"] = LOADS.get("shared", 0)


def threads_attach_at_once(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """Four threads, each with its own loop, use the storage for the first time at once,
    after the registering loop ended (its driver is free). Taking a loop's driver is made
    slow here (20 ms) to hold open the window in which two loops could both take the free
    one, which the GIL may otherwise switch threads in: errors and hangs (review 47)."""
    from cacheme.storages.base import RemoteStorage

    out["first"] = asyncio.run(register_and_use(cfg, ["warm"]))
    reset = RemoteStorage._reset_loop_state

    def slow_reset(self: Any) -> None:
        time.sleep(0.02)
        reset(self)

    RemoteStorage._reset_loop_state = slow_reset  # type: ignore[method-assign]
    barrier = threading.Barrier(4)
    results: list[Any] = [None] * 4

    def worker(i: int) -> None:
        async def go() -> list[dict[str, Any]]:
            barrier.wait(timeout=BOUND)
            return [await timed_get(f"attach-{n}") for n in range(5)]

        try:
            results[i] = asyncio.run(go())
        except Exception as exc:
            results[i] = [{"ok": False, "error": describe(exc)}]

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=3 * BOUND)
    out["alive"] = [t.is_alive() for t in workers]
    out["threads"] = [r for rs in results if rs for r in rs]
    out["total"] = stats()


def closed_mid_load(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """A loop ends while a load is in flight; a later loop gets the key within BOUND."""
    SLOW["by-run"] = SLOW["by-close"] = 30.0

    async def first() -> None:
        await register(cfg)
        task = asyncio.get_running_loop().create_task(cacheme.get(LoopNode("by-run")))
        await asyncio.sleep(0.3)  # the load has started; asyncio.run cancels the task
        out["by_run_done_before_end"] = task.done()

    asyncio.run(first())

    # A manual loop closed without cancelling: its flight task is left pending.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(cacheme.get(LoopNode("by-close")), 0.3))
        out["by_close_first"] = "returned (the load should still have been running)"
    except TimeoutError:
        out["by_close_first"] = "timed out, as intended"
    loop.close()

    SLOW.clear()

    async def last() -> list[dict[str, Any]]:
        return list(await asyncio.gather(timed_get("by-run"), timed_get("by-close")))

    out["after"] = asyncio.run(last())
    out["loads"] = LOADS


def stopped_before_flush(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """Loops stopped after a remote read was queued, before (or while) it was flushed."""
    loop = asyncio.new_event_loop()
    loop.run_until_complete(register(cfg))
    out["warm"] = [loop.run_until_complete(timed_get("warm"))]
    pending = [loop.create_task(cacheme.get(LoopNode("queued-0")))]
    loop.run_until_complete(asyncio.sleep(0))  # just enough to queue the read
    loop.stop()
    loop.close()
    # The same in new loops where the storage is in use, stopped after exactly 1-3 turns:
    # after 1 the read is queued and its flush only scheduled; after 2-3, under way.
    for turns in (1, 2, 3):
        loop = asyncio.new_event_loop()
        out["warm"].append(loop.run_until_complete(timed_get(f"warm-{turns}")))
        pending.append(loop.create_task(cacheme.get(LoopNode(f"queued-{turns}"))))
        for _ in range(turns):
            loop.call_soon(loop.stop)
            loop.run_forever()
        loop.close()
    out["left_pending"] = sum(not t.done() for t in pending)
    before = stats()

    async def after() -> list[dict[str, Any]]:
        names = [f"queued-{i}" for i in range(4)] + ["warm", "fresh"]
        return list(await asyncio.gather(*(timed_get(n, STORAGE_TIMEOUT) for n in names)))

    out["after"] = asyncio.run(after())
    out["after_delta"] = delta(stats(), before)


def in_forked_worker(
    cfg: dict[str, Any], out: dict[str, Any], work: Callable[[], tuple[dict[str, Any], bool]]
) -> None:
    """Fork a worker that runs ``work`` (bounded by SIGALRM, whose default action kills it)
    and writes the report it returns; wait for it (``FORK_BOUND``, killed if it hangs) and
    put its exit code (0 when ``work`` said ok) and report in ``out``."""
    result_path = os.path.join(cfg["workdir"], f"fork-worker-{cfg['scenario']}.json")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        signal.alarm(int(FORK_BOUND))
        code = 3
        try:
            report, ok = work()
            with open(result_path, "w") as f:
                json.dump(report, f)
            code = 0 if ok else 1
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + FORK_BOUND + 2
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        out["worker_hung"] = True
    assert status is not None
    out["worker_exit"] = os.waitstatus_to_exitcode(status)
    if os.path.exists(result_path):
        with open(result_path) as f:
            out["worker"] = json.load(f)


def fork(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """A worker forked after the parent used the storage; the parent goes on after it."""
    out["parent_before"] = asyncio.run(register_and_use(cfg, ["parent-0", "parent-1"]))
    out["threads_at_fork"] = [t.name for t in threading.enumerate()]

    def work() -> tuple[dict[str, Any], bool]:
        before = stats()

        async def reads() -> list[dict[str, Any]]:
            return [await timed_get(n) for n in ("parent-0", "parent-1", "child-0")]

        done = asyncio.run(reads())
        report = {
            "reads": done,
            "delta": delta(stats(), before),
            "threads": [t.name for t in threading.enumerate()],
        }
        return report, all(r["ok"] for r in done)

    in_forked_worker(cfg, out, work)
    before = stats()

    async def parent_after() -> list[dict[str, Any]]:
        return [await timed_get(n) for n in ("parent-0", "child-0", "parent-2")]

    out["parent_after"] = asyncio.run(parent_after())
    out["parent_after_delta"] = delta(stats(), before)


async def invalidate_read_close() -> dict[str, Any]:
    """A forked worker's steps: invalidate a key, read two, close the storages (timed)."""
    t0 = time.monotonic()
    await asyncio.wait_for(cacheme.invalidate(LoopNode("child-0")), BOUND)
    invalidated = round(time.monotonic() - t0, 3)
    reads = [await timed_get(n) for n in ("parent-0", "child-0")]
    return {"invalidate": invalidated, "reads": reads, "close": await close_all()}


def fork_in_loop(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """A worker forked from inside the parent's running loop (``multiprocessing`` started
    from a coroutine): the child, in a loop of its own, invalidates, reads and closes its
    storages within bounds (the parent's loop never runs in it); the parent's loop goes on
    with the connections it had."""

    async def parent() -> dict[str, Any]:
        result: dict[str, Any] = {"before": await register_and_use(cfg, ["parent-0"])}

        def work() -> tuple[dict[str, Any], bool]:
            report = asyncio.run(invalidate_read_close())
            return report, all(r["ok"] for r in report["reads"])

        in_forked_worker(cfg, result, work)
        before = stats()
        result["after"] = [await timed_get(n) for n in ("parent-0", "child-0", "parent-1")]
        result["after_delta"] = delta(stats(), before)
        return result

    out.update(asyncio.run(parent()))


class _Blocking(MsgPackSerializer):
    """Encodes ``BusyNode``'s value only once the test lets it: meanwhile the thread writing
    it back holds the locks a write-back holds (found by a review: a fork then left them
    held in the child for good)."""

    entered = threading.Event()
    release = threading.Event()

    def dumps(self, value: Any) -> bytes:
        _Blocking.entered.set()
        _Blocking.release.wait(FORK_BOUND)
        return super().dumps(value)


@dataclass
class BusyNode(cacheme.Node):
    name: str

    def key(self) -> str:
        return f"loops:busy:{self.name}"

    async def load(self) -> dict[str, str]:
        return expected(self.name)

    class Meta(cacheme.Node.Meta):
        version = "v1"
        caches = [cacheme.Cache(storage=STORAGE, ttl=timedelta(minutes=10))]
        serializer = _Blocking()


def fork_while_busy(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """Fork while another thread's loop is inside a write-back: the child invalidates, gets
    and closes its storages within bounds (the other thread and its loop are not in it)."""
    out["parent_before"] = asyncio.run(register_and_use(cfg, ["parent-0"]))
    busy: dict[str, Any] = {}

    def writer() -> None:
        async def go() -> Any:
            return await cacheme.get(BusyNode("busy"))

        try:
            busy["value"] = asyncio.run(go())
        except BaseException as exc:
            busy["error"] = describe(exc)

    thread = threading.Thread(target=writer, name="busy-writer")
    thread.start()
    out["writer_entered"] = _Blocking.entered.wait(BOUND)

    def work() -> tuple[dict[str, Any], bool]:
        return asyncio.run(invalidate_read_close()), True

    in_forked_worker(cfg, out, work)
    _Blocking.release.set()
    thread.join(BOUND)
    out["writer"] = busy


def exit_without_close(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """Register, use, never close: the interpreter must still exit (see ``main``)."""

    async def run() -> list[dict[str, Any]]:
        reads = await register_and_use(cfg, ["exit-0", "exit-1", "exit-0"])
        # and one write still being flushed when the loop ends
        asyncio.get_running_loop().create_task(cacheme.get(LoopNode("exit-2")))
        await asyncio.sleep(0)
        return reads

    out["reads"] = asyncio.run(run())


async def close_all() -> dict[str, Any]:
    """``close_storages()``, bounded: which outcome, how long, what stayed registered."""
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(cacheme.close_storages(), 2 * BOUND)
        outcome, message = "ok", ""
    except cacheme.StorageError as exc:
        outcome, message = "StorageError", describe(exc)
    except Exception as exc:
        outcome, message = "other", describe(exc)
    return {
        "outcome": outcome,
        "message": message,
        "elapsed": round(time.monotonic() - t0, 3),
        "left": sorted(cacheme.storages()),
    }


def close_from_new_loop(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """``close_storages()`` from a loop other than the registering one."""

    async def first() -> list[dict[str, Any]]:
        await cacheme.register_storage("side", cacheme.Storage(url="local://lru", size=100))
        return await register_and_use(cfg, ["close-0", "close-1"])

    out["first"] = asyncio.run(first())
    out["held_before_close"] = held()
    out["close"] = asyncio.run(close_all())
    out["held_after_close"] = held(settle=True)
    gc.collect()
    out["held_after_gc"] = held(settle=True)
    before = stats()

    async def again() -> list[dict[str, Any]]:
        return await register_and_use(cfg, ["close-0", "close-2"])

    out["again"] = asyncio.run(again())
    out["again_delta"] = delta(stats(), before)


def close_reaches_live_loop(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """``close_storages()`` in one loop closes what a loop still running in a thread holds."""
    out["first"] = asyncio.run(register_and_use(cfg, ["live-0"]))
    other = asyncio.new_event_loop()
    runner = threading.Thread(target=other.run_forever, name="other-loop", daemon=True)
    runner.start()

    async def use() -> list[dict[str, Any]]:
        return list(await asyncio.gather(timed_get("live-1"), timed_get("live-2")))

    out["other_loop"] = asyncio.run_coroutine_threadsafe(use(), other).result(2 * BOUND)
    out["held_before_close"] = held()
    out["close"] = asyncio.run(close_all())
    out["held_after_close"] = held(settle=True)
    out["other_loop_running"] = other.is_running()
    other.call_soon_threadsafe(other.stop)
    runner.join(BOUND)
    out["other_loop_stopped"] = not runner.is_alive()


async def _drop_table(cfg: dict[str, Any]) -> dict[str, Any]:
    """DROP the cache table from a connection of its own, waiting at most 5 s for locks."""
    backend, table, url = cfg["backend"], cfg["table"], cfg["url"]
    holders: list[Any] = []
    t0 = time.monotonic()
    try:
        if backend == "postgres":
            import asyncpg

            conn = await asyncpg.connect(url, timeout=5)
            try:
                await conn.execute("SET lock_timeout = '5s'")
                rows = await conn.fetch(
                    "SELECT a.pid, a.state, l.mode, l.granted, left(a.query, 120) AS query "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.relation = to_regclass($1) AND a.pid <> pg_backend_pid()",
                    f'"{table}"',
                )
                holders = [dict(r) for r in rows]
                t0 = time.monotonic()
                await conn.execute(f'DROP TABLE "{table}"')
            finally:
                await conn.close()
        elif backend == "mysql":
            import asyncmy

            parts = urlsplit(url)
            conn = await asyncmy.connect(
                host=parts.hostname,
                port=parts.port or 3306,
                user=unquote(parts.username or ""),
                password=unquote(parts.password or ""),
                database=parts.path.lstrip("/"),
                autocommit=True,
                connect_timeout=5,
            )
            try:
                async with conn.cursor() as cur:
                    await cur.execute("SET SESSION lock_wait_timeout = 5")
                    await cur.execute(
                        "SELECT id, command, state, left(info, 120) "
                        "FROM information_schema.processlist "
                        "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                    )
                    holders = [list(r) for r in await cur.fetchall()]
                    t0 = time.monotonic()
                    await cur.execute(f"DROP TABLE `{table}`")
            finally:
                await conn.ensure_closed()
        else:  # sqlite: the file's own lock
            db = sqlite3.connect(cfg["path"], timeout=5, isolation_level=None)
            try:
                db.execute(f'DROP TABLE "{table}"')
            finally:
                db.close()
        error = None
    except Exception as exc:
        error = describe(exc)
    return {
        "error": error,
        "elapsed": round(time.monotonic() - t0, 3),
        "holders": json.loads(json.dumps(holders, default=str)),
    }


def locks_released(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """After two loops used the storage (never closed), the cache table can be dropped."""
    out["first"] = asyncio.run(register_and_use(cfg, [f"lock-{i}" for i in range(5)]))

    async def second() -> list[dict[str, Any]]:
        reads = [await timed_get(f"lock2-{i}") for i in range(5)]
        # and one get left in flight when the loop ends
        asyncio.get_running_loop().create_task(cacheme.get(LoopNode("lock2-last")))
        await asyncio.sleep(0)
        return reads

    out["second"] = asyncio.run(second())
    out["held_after_runs"] = held()
    out["drop"] = asyncio.run(_drop_table(cfg))


SCENARIOS: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    f.__name__: f
    for f in (
        two_runs,
        threads,
        threads_attach_at_once,
        closed_mid_load,
        stopped_before_flush,
        fork,
        fork_in_loop,
        fork_while_busy,
        exit_without_close,
        close_from_new_loop,
        close_reaches_live_loop,
        locks_released,
    )
}


def main(config: str) -> None:
    cfg: dict[str, Any] = json.loads(config)
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    cacheme.set_prefix(cfg["prefix"])
    out: dict[str, Any] = {"scenario": cfg["scenario"], "backend": cfg["backend"]}
    try:
        SCENARIOS[cfg["scenario"]](cfg, out)
    except BaseException as exc:
        out["crashed"] = describe(exc)
        traceback.print_exc()
    print("RESULT " + json.dumps(out, default=repr), flush=True)
    faulthandler.cancel_dump_traceback_later()
    faulthandler.dump_traceback_later(EXIT_BOUND, exit=True)
    if cfg["scenario"] != "exit_without_close":
        sys.stderr.flush()
        os._exit(0)
