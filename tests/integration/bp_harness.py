"""Parent side of the multi-process backplane and lease tests (children: ``bp_child``).

``Child`` runs one worker process and talks JSON lines with it, every read bounded in time;
``PrivateRedis`` runs a throw-away ``redis-server`` on a free port that a test may kill and
restart (never the shared Redis on 6379, which other tests use).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import redis.cluster

from tests.services import REDIS_CLUSTER_URL, REDIS_URL, unavailable

ROOT = Path(__file__).resolve().parents[2]


class Child:
    """A ``bp_child`` process; ``call`` sends a command and waits (bounded) for its reply."""

    def __init__(self, setup: dict[str, Any], *, deadline: int = 60) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.bp_child"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._write({"deadline": deadline, **setup})
        self.hello = self.recv(15)
        self.pid: int = self.hello["pid"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed by close() meanwhile
            for line in self.proc.stdout:
                self._lines.put(line)
        self._lines.put(None)

    def _write(self, payload: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()

    def send(self, op: str, **args: Any) -> None:
        self._write({"op": op, **args})

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"child {self.proc.pid}: no reply within {timeout:g}s") from None
        if line is None:
            raise RuntimeError(f"child {self.proc.pid} exited (code {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"child {self.proc.pid}: {reply['error']}")
        return reply

    def call(self, op: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        self.send(op, **args)
        return self.recv(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self._close_pipes()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("exit", timeout=5)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        """The pipes' file objects (ResourceWarnings otherwise); the reader thread ends at
        the child's exit."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(Exception):
                    pipe.close()


def start_children(n: int, setup: dict[str, Any], **kw: Any) -> list[Child]:
    children: list[Child] = []
    try:
        for _ in range(n):
            children.append(Child(setup, **kw))
    except BaseException:
        for child in children:
            child.kill()
        raise
    return children


def stop_children(children: list[Child]) -> None:
    for child in children:
        child.close()


def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def redis_or_skip(cluster: bool = False) -> str:
    """The Redis (or cluster) URL of the test servers; skip (or fail in CI) if unreachable."""
    url = REDIS_CLUSTER_URL if cluster else REDIS_URL
    try:
        if cluster:
            client: Any = redis.cluster.RedisCluster.from_url(url, socket_connect_timeout=2)
        else:
            client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        unavailable("Redis Cluster" if cluster else "Redis", url, exc)
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of this test only, without persistence, that may be killed."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            unavailable("redis-server", "redis-server binary", FileNotFoundError("not on PATH"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        if not wait_until(up, 5):
            raise RuntimeError(f"private redis-server on port {self.port} did not start")
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
