"""The trace benchmark: cacheme against aiocache, cashews, the original cacheme 0.3.0 and two
references (an ideal in-process floor and a lean Redis cache).

    python benchmarks/trace.py                      # the whole comparison
    python benchmarks/trace.py --workers 1000,10000,100000
    python benchmarks/trace.py --quick              # 20k requests, 0.01 s loads (smoke run)
    python benchmarks/trace.py --embedded           # no Redis: cacheme [local tlfu, sqlite]
    python benchmarks/trace.py --frameworks cacheme,aiocache --redis-url redis://127.0.0.1:6379/13
    python benchmarks/trace.py --frameworks reference,cacheme   # floor, lean and cacheme

A Zipf stream of 200k keys (about 55k unique; see ``workload.py``) goes into one asyncio
queue; N workers take keys from it and ask the framework for each key's value. A miss calls the
load function, which sleeps 0.1 s, counts its calls and returns the key, so every answer can be
checked. Every framework talks to the same Redis through a blocking pool of 100 connections.
Each run is a fresh interpreter (``child.py``) against an emptied database whose server
statistics were just reset, so ``INFO commandstats`` counts that run's GET and MGET only. The
server is a throw-away ``redis-server`` started for the benchmark (``--redis-url`` to use
another: its database is flushed and its statistics reset before each run).
The batch workload (both cachemes and the references) asks ``get_all`` for 20 distinct keys per
request.

Two reference runs, written for the benchmark only (family ``reference``): ``floor``, an ideal
in-process cache (a dict and a future per key, no Redis, no serializer), and ``lean``, a lean
Redis-backed cache (``lean.py``). Every run's time and CPU are also given as a ratio to the
floor's at the same workload and worker count (``x floor``), beside the ratio to the load limit.

Writes ``trace[-embedded][-quick].json``, ``.md`` and ``.png`` into ``--out``. The peers
and the original cacheme run in venvs of their own, created on first use (see ``envs.py``);
the chart needs matplotlib, taken from the running interpreter or from the peers' venv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import envs  # noqa: E402
from adapters import ADAPTERS  # noqa: E402

FAMILIES: dict[str, list[str]] = {
    "reference": ["floor", "lean", "floor-batch", "lean-batch"],
    "cacheme": ["cacheme", "cacheme-local", "cacheme-batch"],
    "original": ["original", "original-local", "original-batch"],
    "aiocache": ["aiocache", "aiocache-stampede"],
    "cashews": ["cashews", "cashews-lock"],
}
EMBEDDED_FAMILIES: dict[str, list[str]] = {
    "reference": ["floor", "floor-batch"],
    "cacheme": ["cacheme-sqlite", "cacheme-local-sqlite", "cacheme-sqlite-batch"],
}
PEERS = {"aiocache", "aiocache-stampede", "cashews", "cashews-lock"}
# The reference runs (benchmarks only, see docs/benchmarks.md): the floor every run's time and
# CPU are divided by (per workload and worker count), and a lean Redis-backed cache.
FLOORS = {"floor", "floor-batch"}
REFERENCES = FLOORS | {"lean", "lean-batch"}
BATCH_MAX_WORKERS = 10_000  # as in the original: get_all x 100k workers is not run
SHARED_REDIS = "redis://127.0.0.1:6379/13"  # the tests use 0 and 15, test_micro.py 14


def log(msg: str = "") -> None:
    print(msg, flush=True)


def select(tokens: list[str], embedded: bool, batch: bool) -> list[str]:
    families = EMBEDDED_FAMILIES if embedded else FAMILIES
    chosen: list[str] = []
    for token in tokens:
        names = families.get(token) or ([token] if token in ADAPTERS else None)
        if names is None:
            known = ", ".join(sorted(families) + sorted(n for f in families.values() for n in f))
            raise SystemExit(f"unknown framework {token!r}; choose from: {known}")
        for name in names:
            backend = ADAPTERS[name].backend
            if backend != "memory" and (backend == "sqlite") != embedded:
                raise SystemExit(f"{name} runs {'without' if embedded else 'with'} --embedded only")
            if not batch and ADAPTERS[name].batch:
                continue
            if name not in chosen:
                chosen.append(name)
    # the floors first: each later run of a worker count is printed with its ratio to them
    return sorted(chosen, key=lambda name: name not in FLOORS)


# -- Redis ------------------------------------------------------------------------------------


class PrivateRedis:
    """A throw-away ``redis-server`` on a free loopback port (no persistence)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxclients",
                "200000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise SystemExit("redis-server did not start")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:
        raise SystemExit(
            f"cannot reach Redis at {url} ({exc}); start one and pass --redis-url, "
            "install redis-server (the benchmark then starts its own) or run --embedded"
        ) from None


# -- SQLite -----------------------------------------------------------------------------------


def fresh_sqlite(directory: str, name: str) -> str:
    path = os.path.join(directory, f"{name}.db")
    schema_file = os.path.join(ROOT, "sql", "sqlite.sql")
    with open(schema_file) as f:
        schema = f.read()
    con = sqlite3.connect(path)
    con.executescript(schema)
    con.close()
    return path


# -- one run ----------------------------------------------------------------------------------


def run_one(name: str, workers: int, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    adapter = ADAPTERS[name]
    try:
        python = envs.ensure(adapter.env, log=lambda m: log("  " + m))
    except Exception as exc:  # e.g. no network for pip: report the run, go on
        log(f"  cannot prepare the {adapter.env} venv: {exc}")
        return {
            "framework": name,
            "label": adapter.label,
            "mode": "batch" if adapter.batch else "trace",
            "backend": adapter.backend,
            "workers": workers,
            "failed": f"cannot prepare the {adapter.env} venv: {exc}",
        }
    cmd = [
        python,
        os.path.join(HERE, "child.py"),
        "--framework",
        name,
        "--workers",
        str(workers),
        "--requests",
        str(args.requests),
        "--load-delay",
        str(args.load_delay),
        "--seed",
        str(args.seed),
        "--heartbeat",
        str(args.heartbeat),
    ]
    if adapter.backend == "sqlite":
        cmd += ["--sqlite-path", fresh_sqlite(tmp, f"{name}-{workers}")]
    elif adapter.backend == "redis":
        cmd += ["--redis-url", args.redis_url]
    if args.gc_threshold:
        cmd += ["--gc-threshold", str(args.gc_threshold)]
    if args.profile:
        os.makedirs(args.out, exist_ok=True)
        cmd += ["--profile", os.path.join(args.out, f"{name}-{workers}.prof")]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=envs.child_env(adapter.env),
        cwd=HERE,
    )
    result: dict[str, Any] | None = None
    stderr_lines: list[str] = []

    def drain_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line)

    reader = threading.Thread(target=drain_stderr, daemon=True)
    reader.start()
    timer = threading.Timer(args.timeout, proc.kill)
    timer.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
        elif args.heartbeat > 0:
            print(line.rstrip(), flush=True)
    # os.wait4 gives this child's own rusage: its peak RSS, not the max over all children.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    timer.cancel()
    reader.join(5)
    wall = time.monotonic() - start
    if result is None:
        tail = "".join(stderr_lines[-15:])
        reason = "timed out" if wall >= args.timeout else f"exit code {proc.returncode}"
        log(f"  FAILED ({reason}) after {wall:.0f}s\n{tail}")
        return {
            "framework": name,
            "label": adapter.label,
            "mode": "batch" if adapter.batch else "trace",
            "backend": adapter.backend,
            "workers": workers,
            "failed": f"{reason}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
        }
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    result["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 2)
    result["wall_seconds_process"] = round(wall, 1)
    return result


def describe(r: dict[str, Any]) -> str:
    if "failed" in r:
        return f"FAILED: {r['failed']}"
    if r["backend"] == "redis":
        reads = f"GET {r['redis_get']:>6}  MGET {r['redis_mget']:>5}"
    elif r["backend"] == "sqlite":
        reads = f"SQL trips {sqlite_reads(r):>6}"
    else:
        reads = "in memory"
    extra = f"  errors {r['errors']} ({r['first_error']})" if r["errors"] else ""
    floor = (
        f"  x floor {r['seconds_x_floor']:.2f} (CPU x floor {r['cpu_x_floor']:.2f})"
        if "seconds_x_floor" in r
        else ""
    )
    return (
        f"{r['seconds']:7.2f}s  x limit {r['seconds'] / (r['load_limit_seconds'] or 1e-9):.1f}"
        f"{floor}  CPU {r['cpu_seconds']:.1f}s{gc_part(r)}  {reads}  loads {r['load_calls']:>6}/"
        f"{r['unique_keys']} unique  wrong {r['wrong']}  peak RSS {r['peak_rss_mb']:.0f} MiB"
        f"{extra}"
    )


def gc_part(r: dict[str, Any]) -> str:
    """The run's seconds in the cyclic garbage collector, if the result has them."""
    return f" (GC {r['gc_seconds']:.1f}s)" if "gc_seconds" in r else ""


def floor_of(r: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The floor run of ``r``'s workload and worker count, if it ran and finished."""
    return next(
        (
            f
            for f in runs
            if f["framework"] in FLOORS
            and "failed" not in f
            and f["mode"] == r["mode"]
            and f["workers"] == r["workers"]
        ),
        None,
    )


def add_floor_ratios(r: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Set ``seconds_x_floor`` and ``cpu_x_floor``: time and CPU over the floor's."""
    floor = None if "failed" in r else floor_of(r, runs)
    if floor is None:
        return
    r["floor_seconds"] = floor["seconds"]
    r["floor_cpu_seconds"] = floor["cpu_seconds"]
    r["seconds_x_floor"] = round(r["seconds"] / (floor["seconds"] or 1e-9), 3)
    r["cpu_x_floor"] = round(r["cpu_seconds"] / (floor["cpu_seconds"] or 1e-9), 3)


def sqlite_reads(r: dict[str, Any]) -> int:
    return int(r.get("framework_stats", {}).get("sqlite_round_trips", 0))


# -- the report -------------------------------------------------------------------------------


def remote_reads(r: dict[str, Any]) -> int:
    if r["backend"] == "redis":
        return int(r["redis_get"] + r["redis_mget"])
    return sqlite_reads(r)


def markdown(meta: dict[str, Any], runs: list[dict[str, Any]], checks: list[str]) -> str:
    out = [f"# Trace benchmark ({meta['kind']})", ""]
    out.append(
        f"{meta['date']}; {meta['machine']}; Python {meta['python']}; "
        f"{meta['requests']} requests (Zipf s={meta['zipf_s']}, v={meta['zipf_v']:g}, "
        f"seed {meta['seed']}); load = sleep {meta['load_delay']:g} s; "
        + (
            f"Redis {meta.get('redis_version', '?')}, blocking pool of 100."
            if meta["kind"] == "redis"
            else "SQLite file (WAL) + local W-TinyLFU of 3000, no Redis."
        )
    )
    out.append("")
    out.append(
        "Time: seconds for the whole queue. x limit: time / (unique keys x load delay / "
        "workers), the least any cache that loads each key once can take. x floor, CPU x "
        "floor: time and CPU over those of the floor run (a dict and a future per key, no "
        "Redis: see docs/benchmarks.md) of the same workload and worker count. "
        + (
            "GET, MGET: from Redis INFO commandstats for this run only. "
            "Reads/req: (GET + MGET) / requests. "
            if meta["kind"] == "redis"
            else "SQL trips: SQLite round trips, reads and writes (cacheme storage counters). "
        )
        + "Loads: calls of the load function. Wrong: answers not equal to the key's value "
        "(errors count as wrong). CPU: user + system seconds of the run's process (less "
        "disturbed than Time by other load on the machine). GC: of that CPU, the seconds "
        "spent in Python's cyclic garbage collector while the workers ran"
        + (f" (first threshold {meta['gc_threshold']})" if meta.get("gc_threshold") else "")
        + ". RSS: peak resident memory of the "
        "run's process."
    )
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["workers"]), []).append(r)
    for (mode, workers), rows in groups.items():
        first = next((r for r in rows if "failed" not in r), None)
        what = "get" if mode == "trace" else "get_all of 20 distinct keys"
        out += ["", f"## {what}, {workers:,} workers"]
        if first is not None:
            floor = floor_of(first, runs)
            out.append(
                f"{first['requests']:,} requests, {first['keys']:,} keys, "
                f"{first['unique_keys']:,} unique; load limit "
                f"{first['load_limit_seconds']:.2f} s"
                + (
                    f"; floor {floor['seconds']:.2f} s, CPU {floor['cpu_seconds']:.2f} s"
                    if floor is not None
                    else ""
                )
            )
        out.append("")
        if meta["kind"] == "redis":
            head = "| Framework | Version | Time (s) | x limit | x floor | CPU (s) | CPU x floor | GC (s) | Redis GET | Redis MGET | Reads/req | Loads | Wrong | Peak RSS (MiB) |"  # noqa: E501
        else:
            head = "| Framework | Version | Time (s) | x limit | x floor | CPU (s) | CPU x floor | GC (s) | SQL trips | Trips/req | Loads | Wrong | Peak RSS (MiB) |"  # noqa: E501
        out.append(head)
        out.append("|" + "---|" * (head.count("|") - 1))
        for r in rows:
            if "failed" in r:
                out.append(f"| {r['label']} | | failed: {r['failed']} |")
                continue
            limit = r["load_limit_seconds"] or 1e-9
            reads = f"{remote_reads(r) / r['requests']:.2f}"
            floor = "seconds_x_floor" in r
            cells = [
                r["label"],
                r["version"],
                f"{r['seconds']:.1f}",
                f"{r['seconds'] / limit:.1f}",
                f"{r['seconds_x_floor']:.2f}" if floor else "",
                f"{r['cpu_seconds']:.1f}",
                f"{r['cpu_x_floor']:.2f}" if floor else "",
                f"{r['gc_seconds']:.1f}" if "gc_seconds" in r else "",
            ]
            if meta["kind"] == "redis":
                cells += [f"{r['redis_get']:,}", f"{r['redis_mget']:,}", reads]
            else:
                cells += [f"{sqlite_reads(r):,}", reads]
            cells += [
                f"{r['load_calls']:,}",
                f"{r['wrong'] + 0:,}" + (f" ({r['errors']} errors)" if r["errors"] else ""),
                f"{r['peak_rss_mb']:.0f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
    if checks:
        out += ["", "## Targets", ""]
        out += [f"- {c}" for c in checks]
    out.append("")
    return "\n".join(out)


def target_checks(runs: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in runs if "failed" not in r]

    def find(name: str, workers: int) -> dict[str, Any] | None:
        return next((r for r in ok if r["framework"] == name and r["workers"] == workers), None)

    checks: list[str] = []
    mark = {True: "MET", False: "MISSED"}
    ours = [r for r in ok if r["env"] == "ours" and r["framework"] not in REFERENCES]
    for r in ours:
        good = r["load_calls"] == r["unique_keys"]
        checks.append(
            f"{mark[good]}: {r['label']} at {r['workers']:,} workers loads each key once: "
            f"{r['load_calls']:,} loads for {r['unique_keys']:,} unique keys"
        )
    for workers in sorted({r["workers"] for r in ok}):
        base = find("cacheme", workers)
        if base is None:
            continue
        peers = [r for r in ok if r["framework"] in PEERS and r["workers"] == workers]
        if workers == 1000:
            limit = base["load_limit_seconds"]
            checks.append(
                f"{mark[base['seconds'] <= 2 * limit]}: cacheme [redis] at 1,000 workers within "
                f"2x the load limit: {base['seconds']:.1f} s vs 2 x {limit:.2f} s"
            )
            if peers:
                fastest = min(peers, key=lambda r: r["seconds"])
                checks.append(
                    f"{mark[base['seconds'] <= fastest['seconds'] / 2]}: cacheme [redis] at "
                    f"1,000 workers at most half the fastest peer's time: "
                    f"{base['seconds']:.1f} s vs {fastest['label']} {fastest['seconds']:.1f} s"
                )
            share = remote_reads(base) / base["requests"]
            checks.append(
                f"{mark[share <= 0.10]}: cacheme [redis] at 1,000 workers sends GET+MGET for "
                f"at most 10% of requests: {remote_reads(base):,} = {share:.1%}"
            )
        if workers == 10_000 and peers:
            least = min(peers, key=lambda r: r["peak_rss_mb"])
            for name in ("cacheme", "cacheme-local"):
                r = find(name, workers)
                if r is not None:
                    checks.append(
                        f"{mark[r['peak_rss_mb'] <= least['peak_rss_mb']]}: {r['label']} peak "
                        f"RSS at 10,000 workers no more than the peers': {r['peak_rss_mb']:.0f}"
                        f" MiB vs {least['label']} {least['peak_rss_mb']:.0f} MiB (the least)"
                    )
    checks += floor_checks(ok, find)
    return checks


def floor_checks(
    ok: list[dict[str, Any]], find: Callable[[str, int], dict[str, Any] | None]
) -> list[str]:
    """The targets against the two references (docs/benchmarks.md, "Targets"): cacheme
    [redis] at most 1.25x the floor's time at 1,000 workers and 4x at 10,000; at 10,000
    its CPU at most 1.25x the lean reference's and its peak RSS at most 1.2x the floor's."""
    mark = {True: "MET", False: "MISSED"}
    checks: list[str] = []
    for workers, most in ((1000, 1.25), (10_000, 4.0)):
        r = find("cacheme", workers)
        if r is not None and "seconds_x_floor" in r:
            ratio = r["seconds_x_floor"]
            checks.append(
                f"{mark[ratio <= most]}: cacheme [redis] at {workers:,} workers at most "
                f"{most:g}x the floor's time: {ratio:.2f}x"
            )
    r = find("cacheme", 10_000)
    for what, field, ref, most, unit in (
        ("CPU", "cpu_seconds", "lean", 1.25, "s"),
        ("peak RSS", "peak_rss_mb", "floor", 1.2, "MiB"),
    ):
        other = find(ref, 10_000)
        if r is None or other is None:
            continue
        ratio = r[field] / (other[field] or 1e-9)
        checks.append(
            f"{mark[ratio <= most]}: cacheme [redis] at 10,000 workers {what} at most "
            f"{most:g}x the {ref} reference's: {r[field]:.1f} {unit} vs {other[field]:.1f} "
            f"{unit} = {ratio:.2f}x"
        )
    return checks


def embedded_checks(runs: list[dict[str, Any]]) -> list[str]:
    return [
        f"{'MET' if r['load_calls'] == r['unique_keys'] else 'MISSED'}: {r['label']} at "
        f"{r['workers']:,} workers loads each key once: {r['load_calls']:,} loads for "
        f"{r['unique_keys']:,} unique keys"
        for r in runs
        if "failed" not in r and r["framework"] not in REFERENCES
    ]


def draw_chart(json_path: str, png_path: str, quick: bool) -> str:
    """Draw the PNG with a python that has matplotlib; the reason when none does."""
    candidates = [sys.executable, envs.python_of("peers")]
    python = next(
        (p for p in candidates if os.path.exists(p) and envs.has_module(p, "matplotlib")), None
    )
    if python is None and not quick:
        try:
            python = envs.ensure("peers", log=log)
        except Exception as exc:  # no network: skip the chart, keep the results
            return f"no chart: cannot install matplotlib ({exc})"
    if python is None:
        return "no chart: matplotlib not installed (a full run installs it into .venv-peers)"
    done = subprocess.run(
        [python, os.path.join(HERE, "chart.py"), json_path, png_path],
        capture_output=True,
        text=True,
        env=envs.child_env("peers"),
    )
    if done.returncode != 0:
        return f"no chart: chart.py failed: {done.stderr.strip().splitlines()[-1:]}"
    return f"chart: {os.path.relpath(png_path)}"


def git_revision() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "cacheme"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Trace benchmark: cacheme vs aiocache, cashews and cacheme 0.3.0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workers",
        default=None,
        help="comma-separated worker counts (default 1000,10000; quick: 1000)",
    )
    p.add_argument("--huge", action="store_true", help="add a run with 100,000 workers")
    p.add_argument(
        "--frameworks",
        default=None,
        help="comma-separated: families (reference, cacheme, original, aiocache, cashews) "
        "or run names (e.g. floor, lean, cacheme-local, cashews-lock); default: all",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 20k requests, 0.01 s loads, 1000 workers"
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="no Redis: cacheme with [sqlite] and [local tlfu, sqlite] tiers",
    )
    p.add_argument("--no-batch", action="store_true", help="skip the get_all workload")
    p.add_argument("--requests", type=int, default=None, help="default 200000 (quick: 20000)")
    p.add_argument("--load-delay", type=float, default=None, help="default 0.1 (quick: 0.01)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis database (it is FLUSHDBed and the server's stats reset before "
        "each run); default: a throw-away redis-server started for the benchmark, or "
        f"{SHARED_REDIS} when redis-server is not installed",
    )
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--no-chart", action="store_true")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=5.0,
        help="seconds between progress lines of a run; 0: none",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    p.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        help="the cyclic GC's first threshold in every run (0: Python's default, 700); "
        "for seeing what the collector costs, never for the targets",
    )
    p.add_argument(
        "--report",
        metavar="JSON",
        default=None,
        help="run nothing: write the Markdown table and chart of a saved result file",
    )
    p.add_argument(
        "--profile", action="store_true", help="cProfile each run into OUT/<run>-<workers>.prof"
    )
    args = p.parse_args(argv)
    if args.requests is None:
        args.requests = 20_000 if args.quick else 200_000
    if args.load_delay is None:
        args.load_delay = 0.01 if args.quick else 0.1
    if args.workers is None:
        args.workers = "1000" if args.quick else "1000,10000"
    args.worker_counts = [int(w.replace("_", "")) for w in args.workers.split(",") if w]
    if args.huge and 100_000 not in args.worker_counts:
        args.worker_counts.append(100_000)
    default = (
        "reference,cacheme" if args.embedded else "reference,cacheme,original,aiocache,cashews"
    )
    args.names = select((args.frameworks or default).split(","), args.embedded, not args.no_batch)
    return args


def rerender(path: str, no_chart: bool) -> int:
    with open(path) as f:
        data = json.load(f)
    runs = data["runs"]
    for r in runs:
        add_floor_ratios(r, runs)
    checks = target_checks(runs) if data["meta"]["kind"] == "redis" else embedded_checks(runs)
    data["targets"] = checks
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    stem = os.path.splitext(path)[0]
    table = markdown(data["meta"], runs, checks)
    with open(stem + ".md", "w") as f:
        f.write(table)
    log(table)
    if not no_chart:
        log(draw_chart(path, stem + ".png", quick=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return rerender(args.report, args.no_chart)
    kind = "embedded" if args.embedded else "redis"
    private: PrivateRedis | None = None
    meta: dict[str, Any] = {
        "kind": kind,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "python": platform.python_version(),
        "cacheme_revision": git_revision(),
        "requests": args.requests,
        "seed": args.seed,
        "zipf_s": 1.001,
        "zipf_v": 10.0,
        "load_delay": args.load_delay,
        "quick": args.quick,
        "gc_threshold": args.gc_threshold,
    }
    if kind == "redis":
        # INFO commandstats is server-wide and other clients of a shared server (tests that
        # SCAN, FLUSHALL...) would be counted, or empty the run's keys: by default the
        # benchmark gets a server of its own.
        if args.redis_url is None:
            if shutil.which("redis-server"):
                private = PrivateRedis()
                args.redis_url = private.url
            else:
                log(
                    f"redis-server not found: using {SHARED_REDIS} (a shared server's other "
                    "clients are counted in INFO commandstats)"
                )
                args.redis_url = SHARED_REDIS
        check_redis(args.redis_url)
        meta["redis_url"] = args.redis_url
        meta["private_redis"] = bool(private)
    plan = [
        (name, w)
        for w in args.worker_counts
        for name in args.names
        if not (ADAPTERS[name].batch and w > BATCH_MAX_WORKERS)
    ]
    log(
        f"trace benchmark ({kind}): {len(plan)} runs, {args.requests:,} requests, "
        f"load {args.load_delay:g} s, workers {', '.join(f'{w:,}' for w in args.worker_counts)}"
        + (f", Redis {args.redis_url}" if kind == "redis" else ", SQLite + local tier")
    )
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="cacheme-bench-") as tmp:
            for i, (name, workers) in enumerate(plan, 1):
                adapter = ADAPTERS[name]
                what = "get_all x20" if adapter.batch else "get"
                log(f"[{i}/{len(plan)}] {adapter.label}: {what}, {workers:,} workers ...")
                r = run_one(name, workers, args, tmp)
                runs.append(r)
                add_floor_ratios(r, runs)
                log(f"[{i}/{len(plan)}] {adapter.label}, {workers:,} workers: {describe(r)}")
    finally:
        if private is not None:
            private.stop()
    meta["versions"] = {r["label"]: r["version"] for r in runs if "version" in r}
    if runs and "redis_version" in next((r for r in runs if "redis_version" in r), {}):
        meta["redis_version"] = next(r for r in runs if "redis_version" in r)["redis_version"]
    checks = target_checks(runs) if kind == "redis" else embedded_checks(runs)
    os.makedirs(args.out, exist_ok=True)
    stem = "trace" + ("-embedded" if args.embedded else "") + ("-quick" if args.quick else "")
    json_path = os.path.join(args.out, stem + ".json")
    md_path = os.path.join(args.out, stem + ".md")
    png_path = os.path.join(args.out, stem + ".png")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "runs": runs, "targets": checks}, f, indent=2)
    table = markdown(meta, runs, checks)
    with open(md_path, "w") as f:
        f.write(table)
    log("")
    log(table)
    chart = (
        "no chart (--no-chart)" if args.no_chart else draw_chart(json_path, png_path, args.quick)
    )
    log(f"results: {os.path.relpath(json_path)}, {os.path.relpath(md_path)}; {chart}")
    log(f"total {time.monotonic() - started:.0f}s")
    return 1 if any("failed" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
