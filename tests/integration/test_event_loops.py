"""One storage, many event loops: each scenario in a fresh interpreter, on every backend.

Real programs run several loops in one process: ``asyncio.run()`` per task or command, a
thread with its own loop, a forked worker. A storage registered once must work in each of
them (connecting again lazily in a new loop), a loop that ends with work in flight must leave
nothing behind that a later call waits on, its connections must not keep server locks,
``close_storages()`` must work from any loop, and the process must exit by itself.

Each case runs ``tests/integration/loop_child.py`` in its own interpreter
(``python -c``) with a deadline, on a table, collection or key prefix of its own, and
asserts on the ``RESULT`` JSON line it prints. The children of the whole module start
together when the first case needs them (a few at a time) and the cases collect them in
order. A failure shows the child's result, stdout and stderr (a hang: the child's own
watchdog dumps every thread's stack). An unreachable server skips its cases, or fails them
under CACHEME_REQUIRE_SERVICES=1 (see ``tests/services.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.services import MONGO_URL, MYSQL_URL, POSTGRES_URL, unavailable

from .backend_mongo import DATABASE, index_specs
from .backend_redis import cluster_url, redis_url
from .backend_sql import schema
from .backends import BACKENDS

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0  # seconds per child; the child's own watchdog fires well before
PARALLEL = 6  # children running at once
SQL_BACKENDS = ["sqlite", "postgres", "mysql"]


def backends(names: list[str]) -> list[Any]:
    return [pytest.param(b, marks=getattr(pytest.mark, b)) for b in names]


# --- the servers: one table / collection / key prefix per case ----------------------------


class Unreachable(Exception):
    def __init__(self, service: str, url: str, error: BaseException) -> None:
        super().__init__(f"{service} at {url}: {error}")
        self.service, self.url, self.error = service, url, error


def _mysql_args(url: str) -> dict[str, Any]:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    return {
        "host": parts.hostname,
        "port": parts.port or 3306,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": parts.path.lstrip("/"),
    }


async def _sql_run(backend: str, statements: list[str]) -> None:
    """Run ``statements`` on PostgreSQL or MySQL, one connection."""
    if backend == "postgres":
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()
    else:
        import asyncmy

        conn = await asyncmy.connect(autocommit=True, connect_timeout=5, **_mysql_args(MYSQL_URL))
        try:
            async with conn.cursor() as cur:
                for statement in statements:
                    await cur.execute(statement)
        finally:
            await conn.ensure_closed()


def _clear_redis(backend: str, prefixes: list[str]) -> None:
    import redis
    from redis.cluster import RedisCluster

    client: Any
    if backend == "redis_cluster":
        client = RedisCluster.from_url(cluster_url(), socket_timeout=5)
    else:
        client = redis.Redis.from_url(redis_url(), socket_timeout=5)
    try:
        for prefix in prefixes:
            for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
                client.unlink(key)
    finally:
        client.close()


@dataclass
class Prepared:
    configs: list[dict[str, Any]]
    cleanup: Callable[[], None]


def prepare(backend: str, scenarios: list[str], workdir: Path) -> Prepared:
    """A config per scenario (own prefix, own table/collection); raises ``Unreachable``."""
    configs = []
    for scenario in scenarios:
        tag = uuid.uuid4().hex[:10]
        configs.append(
            {
                "scenario": scenario,
                "backend": backend,
                "prefix": f"loops-{tag}",
                "table": f"cacheme_loops_{tag}",
                "workdir": str(workdir / f"{scenario}-{backend}-{tag}"),
                "options": {},
            }
        )
    for cfg in configs:
        os.makedirs(cfg["workdir"])
    tables = [cfg["table"] for cfg in configs]

    if backend in ("redis", "redis_cluster"):
        import redis
        from redis.cluster import RedisCluster

        url = cluster_url() if backend == "redis_cluster" else redis_url()
        service = "Redis Cluster" if backend == "redis_cluster" else "Redis"
        try:
            if backend == "redis_cluster":
                RedisCluster.from_url(url, socket_connect_timeout=3).close()
            else:
                redis.Redis.from_url(url, socket_connect_timeout=3).ping()
        except Exception as exc:
            raise Unreachable(service, url, exc) from exc
        for cfg in configs:
            cfg["url"] = url
            if backend == "redis_cluster":
                cfg["options"] = {"cluster": True}
        prefixes = [cfg["prefix"] for cfg in configs]
        return Prepared(configs, lambda: _clear_redis(backend, prefixes))

    if backend == "sqlite":
        for cfg in configs:
            path = Path(cfg["workdir"]) / "cache.db"
            with sqlite3.connect(path) as db:
                for statement in schema("sqlite", cfg["table"]):
                    db.execute(statement)
            db.close()
            cfg.update(url=f"sqlite:///{path}", path=str(path), options={"table": cfg["table"]})
        return Prepared(configs, lambda: None)

    if backend in ("postgres", "mysql"):
        url, service = (
            (POSTGRES_URL, "PostgreSQL") if backend == "postgres" else (MYSQL_URL, "MySQL")
        )
        q = "`{}`" if backend == "mysql" else '"{}"'
        try:
            asyncio.run(_sql_run(backend, [s for t in tables for s in schema(backend, t)]))
        except (OSError, asyncio.TimeoutError) as exc:
            raise Unreachable(service, url, exc) from exc
        except Exception as exc:
            if "connect" in str(exc).lower() or "access denied" in str(exc).lower():
                raise Unreachable(service, url, exc) from exc
            raise
        for cfg in configs:
            cfg.update(url=url, options={"table": cfg["table"]})
        drops = [f"DROP TABLE IF EXISTS {q.format(t)}" for t in tables]
        return Prepared(configs, lambda: asyncio.run(_sql_run(backend, drops)))

    if backend == "mongo":
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        client: MongoClient[dict[str, Any]] = MongoClient(MONGO_URL, serverSelectionTimeoutMS=3000)
        try:
            client.admin.command("ping")
        except PyMongoError as exc:
            client.close()
            raise Unreachable("MongoDB", MONGO_URL, exc) from exc
        db = client[DATABASE]
        for cfg in configs:
            db.create_collection(cfg["table"])
            for keys, options in index_specs():
                db[cfg["table"]].create_index(list(keys.items()), **options)
            cfg.update(url=MONGO_URL, options={"database": DATABASE, "collection": cfg["table"]})

        def drop() -> None:
            try:
                for t in tables:
                    db.drop_collection(t)
            finally:
                client.close()

        return Prepared(configs, drop)

    raise ValueError(backend)  # pragma: no cover


# --- the children ---------------------------------------------------------------------


@dataclass
class Child:
    """One finished (or killed) child interpreter."""

    scenario: str
    backend: str
    rc: int | None
    elapsed: float
    timed_out: bool
    stdout: str
    stderr: str
    result: dict[str, Any] | None = field(default=None)

    def report(self) -> str:
        lines = [f"--- child {self.scenario}[{self.backend}]"]
        if self.timed_out:
            lines.append(f"HUNG: killed after the {DEADLINE:.0f} s deadline")
        lines.append(f"exit code {self.rc}, {self.elapsed:.1f} s")
        if self.result is not None:
            lines.append("result:")
            for key, value in self.result.items():
                text = json.dumps(value, default=str)
                lines.append(f"  {key}: {text[:1500]}{' ...' if len(text) > 1500 else ''}")
        out = "\n".join(x for x in self.stdout.splitlines() if not x.startswith("RESULT "))
        if out.strip():
            lines.append("stdout:\n" + out[-4000:])
        if self.stderr.strip():
            lines.append("stderr:\n" + self.stderr[-8000:])
        return "\n".join(lines)

    def fail(self, what: str) -> None:
        pytest.fail(f"{self.scenario}[{self.backend}]: {what}\n{self.report()}", pytrace=False)

    def expect(self, condition: bool, what: str) -> None:
        if not condition:
            self.fail(what)

    def data(self) -> dict[str, Any]:
        """The child's result; fails if it printed none or its scenario crashed."""
        if self.result is None:
            self.fail("the child printed no RESULT line (hung or crashed)")
        assert self.result is not None
        if "crashed" in self.result:
            self.fail(f"the scenario raised {self.result['crashed']}")
        return self.result

    def expect_reads(self, reads: list[dict[str, Any]], what: str) -> None:
        bad = [r for r in reads if not r.get("ok")]
        self.expect(not bad, f"{what}: {len(bad)} of {len(reads)} gets failed: {bad}")

    def expect_no_storage_errors(self, counts: dict[str, int], what: str) -> None:
        """No storage error or timeout counted (fail-open would hide them from callers)."""
        errors, timeouts = counts["storage_errors"], counts["storage_timeouts"]
        self.expect(
            errors == 0 and timeouts == 0,
            f"{what}: {errors} storage error(s), {timeouts} storage timeout(s) counted "
            f"(stats: {counts})",
        )


def run_child(cfg: dict[str, Any]) -> Child:
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from tests.integration.loop_child import main; "
        f"main({json.dumps(cfg)!r})"
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: a hang kills a forked worker too
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    child = Child(
        cfg["scenario"], cfg["backend"], proc.returncode, time.monotonic() - t0, timed_out,
        stdout, stderr,
    )  # fmt: skip
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            child.result = json.loads(line.removeprefix("RESULT "))
    return child


class Children:
    """The module's children: started together, collected case by case."""

    def __init__(self, wanted: list[tuple[str, str]], workdir: Path) -> None:
        self.workdir = workdir
        self.pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="loop-child")
        self.futures: dict[tuple[str, str], Future[Child]] = {}
        self.unreachable: dict[str, Unreachable] = {}
        self.cleanups: list[Callable[[], None]] = []
        by_backend: dict[str, list[str]] = {}
        for scenario, backend in wanted:
            by_backend.setdefault(backend, []).append(scenario)
        configs: dict[tuple[str, str], dict[str, Any]] = {}
        for backend, scenarios in by_backend.items():
            try:
                prepared = prepare(backend, scenarios, workdir)
            except Unreachable as exc:
                self.unreachable[backend] = exc
                continue
            self.cleanups.append(prepared.cleanup)
            for cfg in prepared.configs:
                configs[(cfg["scenario"], backend)] = cfg
        for pair in wanted:  # in the order the cases will ask for them
            if pair in configs:
                self.futures[pair] = self.pool.submit(run_child, configs[pair])

    def get(self, scenario: str, backend: str) -> Child:
        if backend in self.unreachable:
            exc = self.unreachable[backend]
            unavailable(exc.service, exc.url, exc.error)
        if (scenario, backend) not in self.futures:  # not foreseen: run it now
            prepared = prepare(backend, [scenario], self.workdir)
            self.cleanups.append(prepared.cleanup)
            return run_child(prepared.configs[0])
        return self.futures[(scenario, backend)].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for cleanup in self.cleanups:
            cleanup()


@pytest.fixture(scope="module")
def children(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Children]:
    wanted = []
    for item in request.session.items:
        if getattr(item, "module", None) is not sys.modules[__name__]:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = getattr(item, "originalname", "")
        if "backend" in params and name.startswith("test_"):
            wanted.append((name.removeprefix("test_"), params["backend"]))
    launched = Children(wanted, tmp_path_factory.mktemp("loops"))
    try:
        yield launched
    finally:
        launched.close()


# --- the cases ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_two_runs(children: Children, backend: str) -> None:
    """Registered in one ``asyncio.run``, used in the next: 10 keys read twice, 10 loads."""
    child = children.get("two_runs", backend)
    r = child.data()
    child.expect_reads(r["first"], "first loop (the registering one)")
    child.expect_reads(r["second"], "second loop")
    d = r["second_delta"]
    child.expect(d["loads"] == 10, f"second loop: {d['loads']} loads for 10 new keys, not 10")
    child.expect(d["hits"] == 10, f"second loop: {d['hits']} hits on the second reads, not 10")
    child.expect_no_storage_errors(r["total"], "both loops")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_threads(children: Children, backend: str) -> None:
    """Two threads with a loop each get one key at once: both get it, neither hangs."""
    child = children.get("threads", backend)
    r = child.data()
    child.expect_reads(r["first"], "registering loop")
    child.expect(not any(r["alive"]), f"threads still running: {r['alive']}")
    child.expect_reads(r["threads"], "the two threads")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_threads_attach_at_once(children: Children, backend: str) -> None:
    """Four threads' loops take their drivers at once: each gets one of its own (they all
    took the registered one: 'attached to a different loop' errors, and hangs)."""
    child = children.get("threads_attach_at_once", backend)
    r = child.data()
    child.expect_reads(r["first"], "registering loop")
    child.expect(not any(r["alive"]), f"threads still running: {r['alive']}")
    child.expect(len(r["threads"]) == 20, f"{len(r['threads'])} gets answered of 20")
    child.expect_reads(r["threads"], "the four threads")
    child.expect_no_storage_errors(r["total"], "the four threads")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_closed_mid_load(children: Children, backend: str) -> None:
    """A loop ends while a load is in flight: a new loop gets the key within 5 s."""
    child = children.get("closed_mid_load", backend)
    r = child.data()
    child.expect_reads(r["after"], "new loop after loops closed mid-load")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_stopped_before_flush(children: Children, backend: str) -> None:
    """A loop stopped between queueing a read and its flush: later gets beat the timeout."""
    child = children.get("stopped_before_flush", backend)
    r = child.data()
    child.expect(r["warm"][0]["ok"], f"registering loop: {r['warm'][0]}")
    child.expect_reads(r["after"], "new loop after loops stopped before the flush")
    child.expect_reads(r["warm"][1:], "the later loops, before they were stopped")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_fork(children: Children, backend: str) -> None:
    """A worker forked after the parent used the storage works; the parent goes on."""
    child = children.get("fork", backend)
    r = child.data()
    child.expect_reads(r["parent_before"], "parent before the fork")
    child.expect(not r.get("worker_hung"), "the forked worker hung and was killed")
    child.expect(r["worker_exit"] == 0, f"the forked worker exited with {r['worker_exit']}")
    child.expect("worker" in r, "the forked worker wrote no report")
    child.expect_reads(r["worker"]["reads"], "forked worker")
    child.expect_no_storage_errors(r["worker"]["delta"], "forked worker")
    child.expect_reads(r["parent_after"], "parent after the fork")
    child.expect_no_storage_errors(r["parent_after_delta"], "parent after the fork")


def _expect_worker_invalidated_read_and_closed(child: Child, r: dict[str, Any]) -> None:
    """The forked worker exited 0 after invalidating, reading and closing within bounds."""
    child.expect(not r.get("worker_hung"), "the forked worker hung and was killed")
    child.expect(r["worker_exit"] == 0, f"the forked worker exited with {r['worker_exit']}")
    worker = r["worker"]
    child.expect(worker["invalidate"] < 1.0, f"invalidate took {worker['invalidate']} s")
    child.expect_reads(worker["reads"], "forked worker")
    close = worker["close"]
    child.expect(close["outcome"] == "ok", f"close_storages in the worker: {close}")
    child.expect(close["elapsed"] < 1.0, f"close_storages in the worker took {close}")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_fork_from_inside_a_running_loop(children: Children, backend: str) -> None:
    """Forked from a coroutine of the parent's running loop: that loop never runs in the
    child, so the child's ``close_storages()`` must not wait for it (it waited the storage's
    whole ``timeout``, then raised); the parent's loop goes on."""
    child = children.get("fork_in_loop", backend)
    r = child.data()
    child.expect_reads(r["before"], "parent before the fork")
    _expect_worker_invalidated_read_and_closed(child, r)
    child.expect_reads(r["after"], "parent's loop after the fork")
    child.expect_no_storage_errors(r["after_delta"], "parent's loop after the fork")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_fork_while_another_thread_writes_back(children: Children, backend: str) -> None:
    """Forked while another thread's loop was inside a write-back (holding the process-wide
    locks of one): the worker invalidates, reads and closes its storages within bounds."""
    child = children.get("fork_while_busy", backend)
    r = child.data()
    child.expect_reads(r["parent_before"], "parent before the fork")
    child.expect(r["writer_entered"], "the other thread never reached its write-back")
    _expect_worker_invalidated_read_and_closed(child, r)
    busy = {"name": "busy", "value": "value-of-busy"}
    child.expect(r["writer"].get("value") == busy, f"the writer: {r['writer']}")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_exit_without_close(children: Children, backend: str) -> None:
    """A process that used a storage and never called ``close_storages()`` exits (0)."""
    child = children.get("exit_without_close", backend)
    r = child.data()
    child.expect_reads(r["reads"], "the only loop")
    child.expect(not child.timed_out, "the process never exited")
    child.expect(
        child.rc == 0,
        f"exit code {child.rc} (1: still running 10 s after its last line, see the thread dump)",
    )


def expect_closed(child: Child, r: dict[str, Any]) -> None:
    """``close_storages()`` returned or raised one StorageError naming the failed ones, in
    time, unregistered everything and left no connection or SQLite thread behind."""
    c = r["close"]
    child.expect(
        c["outcome"] in ("ok", "StorageError"),
        f"close_storages() did not return nor raise one StorageError: {c['message']}",
    )
    if c["outcome"] == "StorageError":
        child.expect("remote" in c["message"], f"the StorageError names no storage: {c}")
    child.expect(c["left"] == [], f"storages still registered after close: {c['left']}")
    child.expect(
        not any(r["held_after_close"].values()),
        f"after close_storages() the process still holds {r['held_after_close']} "
        f"(held before: {r['held_before_close']})",
    )


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_close_from_new_loop(children: Children, backend: str) -> None:
    """``close_storages()`` once the registering loop is gone; then register and get again."""
    child = children.get("close_from_new_loop", backend)
    r = child.data()
    child.expect_reads(r["first"], "registering loop")
    expect_closed(child, r)
    child.expect_reads(r["again"], "register + get after close_storages()")
    child.expect_no_storage_errors(r["again_delta"], "register + get after close_storages()")


@pytest.mark.parametrize("backend", backends(BACKENDS))
def test_close_reaches_live_loop(children: Children, backend: str) -> None:
    """``close_storages()`` closes what a loop still running in another thread holds."""
    child = children.get("close_reaches_live_loop", backend)
    r = child.data()
    child.expect_reads(r["first"], "registering loop")
    child.expect_reads(r["other_loop"], "the loop running in a thread")
    expect_closed(child, r)
    child.expect(r["other_loop_stopped"], "the thread's loop did not stop after the close")


@pytest.mark.parametrize("backend", backends(SQL_BACKENDS))
def test_locks_released(children: Children, backend: str) -> None:
    """After loops used the storage (never closed), DROP TABLE gets its lock within 5 s."""
    child = children.get("locks_released", backend)
    r = child.data()
    child.expect_reads(r["first"], "registering loop")
    drop = r["drop"]
    child.expect(
        drop["error"] is None,
        f"DROP TABLE of the cache table failed after {drop['elapsed']} s: {drop['error']}; "
        f"lock holders: {drop['holders']}",
    )
