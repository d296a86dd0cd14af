"""Real faults for the resilience tests: private servers to kill, sockets that hang.

- ``RedisServer``: a private ``redis-server`` on a free port, in a temporary directory, with
  no persistence; ``kill()`` sends SIGKILL to its pid, ``start()`` brings it back on the
  same port.
- ``SecantusServer``: the same for a private SecantusDB (``secantusd-py``), the MongoDB
  stand-in; its data directory survives a restart.
- ``HangingServer``: accepts TCP connections and never answers (a server that is up but
  stuck: the worst case for a client, which sees neither an error nor a reply).
- ``Proxy``: forwards TCP to a real server and can be switched, at any time, to swallow
  every byte in both directions (``hang()``, a black-holed network) and back (``resume()``).

Every process started here is stopped by its own pid, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_answers(port: int) -> bool:
    """True when something accepts TCP connections on ``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], seconds: float, what: str, every: float = 0.05
) -> float:
    """Poll ``predicate`` until it holds; the seconds it took. Fails after ``seconds``."""
    start = time.monotonic()
    deadline = start + seconds
    while True:
        if await predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {seconds:g}s")
        await asyncio.sleep(every)


class _Process:
    """A server process this test started; stopped by pid only."""

    name = "server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}-{self.port}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return port_answers(self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, wait: float = 30.0) -> None:
        """Start the server (on the same port as before) and wait until it answers."""
        assert not self.running, f"{self.name} already running (pid {self.pid})"
        self.proc = self._spawn()
        deadline = time.monotonic() + wait
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} on port {self.port} exited with {self.proc.returncode}: "
                    f"{self.log.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} on port {self.port} did not answer in {wait}s")
            await asyncio.sleep(0.05)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL the server (no goodbye to its clients) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class RedisServer(_Process):
    """A private ``redis-server`` without persistence, optionally with an ACL user."""

    name = "redis-server"

    def __init__(
        self, workdir: Path, port: int | None = None, user: tuple[str, str] | None = None
    ) -> None:
        super().__init__(workdir, port)
        self.user = user

    @staticmethod
    def available() -> str | None:
        return shutil.which("redis-server")

    def command(self) -> list[str]:
        binary = self.available()
        assert binary, "redis-server not found"
        cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        if self.user is not None:
            name, password = self.user
            cmd += ["--user", name, "on", f">{password}", "~*", "&*", "+@all"]
            cmd += ["--user", "default", "off"]
        return cmd

    def url(self, db: int = 0) -> str:
        if self.user is not None:
            name, password = self.user
            return f"redis://{name}:{password}@{HOST}:{self.port}/{db}"
        return f"redis://{HOST}:{self.port}/{db}"


class SecantusServer(_Process):
    """A private SecantusDB (MongoDB wire protocol); its data survives ``kill``/``start``."""

    name = "secantusd-py"

    @staticmethod
    def available() -> str | None:
        local = Path(sys.executable).with_name("secantusd-py")
        if local.exists():
            return str(local)
        return shutil.which("secantusd-py")

    def command(self) -> list[str]:
        binary = self.available()
        assert binary, "secantusd-py not found"
        return [
            binary,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--storage-path",
            str(self.workdir / "data"),
            "--log-level",
            "WARNING",
        ]

    def url(self) -> str:
        return f"mongodb://{HOST}:{self.port}/?directConnection=true"


class HangingServer:
    """Accepts connections, reads and discards what arrives, never answers."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    async def __aenter__(self) -> HangingServer:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)


class Proxy:
    """A TCP proxy to ``HOST:target`` that can break the connections on demand.

    - ``hang()``: from now on bytes in either direction are swallowed, on the open
      connections and on new ones, which are accepted and never served (a network
      partition as the client sees it: no RST, no reply). ``resume()``: connections opened
      from then on are forwarded again; the swallowed ones stay dead (the client must give
      up on them and open new ones).
    - ``drop()``: reset every open connection (RST), as a server restart or a firewall
      flushing its state does; new connections are forwarded as usual.
    - ``stall(seconds)``: what the clients of the connections open now send reaches the
      server that much later, even after they closed (data on a congested wire); the other
      direction, and new connections, as usual.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.hanging = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = []
        self._dead: set[asyncio.StreamWriter] = set()  # client sides that are black-holed
        self._stalled: dict[asyncio.StreamWriter, float] = {}  # client side -> its delay

    def hang(self) -> None:
        self.hanging = True
        self._dead.update(client for client, _ in self._pairs)

    def resume(self) -> None:
        self.hanging = False

    def stall(self, seconds: float) -> None:
        for client, _ in self._pairs:
            self._stalled[client] = seconds

    def drop(self) -> int:
        """Reset every open connection; how many there were."""
        pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            for writer in (client, upstream):
                if writer is not None:
                    writer.transport.abort()
        return len(pairs)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        upstream = writer is not client
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if client in self._dead:
                    continue  # swallowed
                delay = self._stalled.get(client) if upstream else None
                if delay is not None:
                    loop.call_later(delay, _write_quietly, writer, data)
                    continue
                writer.write(data)
                await writer.drain()
        if client not in self._dead:
            delay = self._stalled.get(client) if upstream else None
            if delay is not None:
                loop.call_later(delay + 0.05, writer.close)
            else:
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.hanging:
            self._dead.add(writer)
            self._pairs.append((writer, None))
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pairs.append((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, writer),
            self._pipe(up_reader, writer, writer),
        )

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)


def _write_quietly(writer: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(Exception):  # the server may have closed it meanwhile
        writer.write(data)


# -- URLs --------------------------------------------------------------------------------


def port_of(url: str, default: int) -> int:
    """The port a server URL names (``default`` when it names none)."""
    return urlsplit(url).port or default


def with_port(url: str, port: int, host: str = HOST) -> str:
    """``url`` pointing at ``host:port`` instead, credentials and path kept."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query string."""
    parts = urlsplit(url)
    query = "&".join([q for q in (parts.query, urlencode(params)) if q])
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, parts.fragment))
