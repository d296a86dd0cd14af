"""The ``cacheme`` command line, run as users run it: a subprocess, real servers.

SQLite always runs. PostgreSQL, MySQL, MongoDB and Redis are skipped (with the reason) when
they are not reachable, unless CACHEME_REQUIRE_SERVICES=1: then they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.services import MONGO_URL, MYSQL_URL, POSTGRES_URL, REDIS_URL, unavailable

ROOT = Path(__file__).resolve().parents[2]


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m cacheme ARGS`` on this source tree."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd or ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "cacheme", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the package ships the schemas ---------------------------------------------------------


@pytest.mark.parametrize("name", ["sqlite.sql", "postgresql.sql", "mysql.sql", "mongo.js"])
def test_shipped_schemas_match_sql_folder(name: str) -> None:
    shipped = ROOT / "cacheme" / "schemas" / name
    assert shipped.read_text() == (ROOT / "sql" / name).read_text(), (
        f"cacheme/schemas/{name} differs from sql/{name}: copy sql/{name} over it"
    )


# -- help, version, usage errors -----------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[], ["schema"], ["schema", "create"], ["schema", "show"], ["check"], ["nodes"], ["stats"]],
)
def test_help_on_every_command(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cacheme")


def test_version_and_console_script() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("cacheme ")
    script = Path(sys.executable).parent / "cacheme"
    if not script.exists():
        script = Path(shutil.which("cacheme") or "")
    if not script.is_file():
        pytest.skip("the cacheme console script is not installed (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [str(script), "check", "local://tlfu", "-o", "size=10"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["check", "foo://x"], "unknown scheme 'foo'"),
        (["check", "sqlite:///x.db", "-o", "nonsense=1"], "nonsense"),
        (["check", "sqlite:///x.db", "-o", "nonsense"], "NAME=VALUE"),
        (["check", "sqlite://"], "must name a database file"),
        (["schema", "create", "redis://127.0.0.1:6379"], "need no schema"),
        (["schema", "create", "sqlite:///x.db", "--table", "no;drop"], "plain SQL identifier"),
        (["schema", "show", "oracle"], "no schema for 'oracle'"),
        (["nodes", "no_such_module_here"], "no module named 'no_such_module_here'"),
        (["stats", "json", "--watch", "1"], "--watch needs MODULE:FUNCTION"),
        (["stats", "json:no_such_function"], "no function 'no_such_function'"),
        (["check", "sqlite:///x.db", "--timeout", "0"], "--timeout takes a positive"),
        (["schema", "create", "sqlite:///x.db", "--timeout", "-1"], "--timeout takes a positive"),
        # -o url=... was a TypeError traceback (url is the argument, not an option)
        (["check", "sqlite:///x.db", "-o", "url=x"], "'url' is not a storage option"),
        (["schema", "create", "sqlite:///x.db", "-o", "url=x"], "'url' is not a storage option"),
        # -o timeout=... is the storage's own option, validated as such
        (["check", "sqlite:///x.db", "-o", "timeout=-1"], "timeout: Input should be greater"),
        (["schema", "create", "sqlite:///x.db", "-o", "timeout=0"], "timeout"),
        (["check", "local://tlfu", "-o", "timeout=5"], "timeout"),
        (["check", "sqlite:///x.db", "-o", "table=a", "--table", "b"], "disagree"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_schema_show() -> None:
    result = cli("schema", "show", "sqlite")
    assert result.returncode == 0
    assert result.stdout == (ROOT / "sql" / "sqlite.sql").read_text()
    result = cli("schema", "show", "postgresql://u@h/db", "--table", "my_cache")
    assert result.returncode == 0
    assert 'CREATE TABLE IF NOT EXISTS "my_cache"' in result.stdout
    assert 'CREATE INDEX IF NOT EXISTS "my_cache_expire" ON "my_cache"' in result.stdout


# -- SQLite (always) -----------------------------------------------------------------------


def test_sqlite_create_then_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cache.db"
    missing = cli("check", url)
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr and "cacheme schema create" in missing.stderr
    assert not (tmp_path / "cache.db").exists()  # check never creates the file

    for _ in range(2):  # safe to run again
        created = cli("schema", "create", url, "--table", "my_cache")
        assert created.returncode == 0, created.stderr
        assert "my_cache" in created.stdout
    with sqlite3.connect(tmp_path / "cache.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert {"my_cache", "my_cache_expire"} <= tables

    ok = cli("check", url, "--table", "my_cache")
    assert ok.returncode == 0, ok.stderr
    assert "ok: expire is indexed" in ok.stdout and ok.stdout.rstrip().endswith(": ok")

    other = cli("check", url)  # the default table was not created
    assert other.returncode == 1
    assert "table 'cacheme_data' does not exist" in other.stderr


def test_storage_timeout_option_is_taken(tmp_path: Path) -> None:
    # -o timeout=5 crashed both commands with "got multiple values for keyword argument
    # 'timeout'": it is the storage's own timeout, --timeout the command's bound per step.
    url = f"sqlite:///{tmp_path}/cache.db"
    created = cli("schema", "create", url, "-o", "timeout=5", "--timeout", "20")
    assert created.returncode == 0, created.stderr
    checked = cli("check", url, "-o", "timeout=5", "-o", "table=cacheme_data")
    assert checked.returncode == 0, checked.stderr
    assert "Traceback" not in checked.stderr and checked.stdout.rstrip().endswith(": ok")


async def test_schemas_take_storage_options_as_a_mapping(tmp_path: Path) -> None:
    from cacheme import schemas
    from cacheme.errors import ConfigurationError

    url = f"sqlite:///{tmp_path}/cache.db"
    await schemas.create(url, timeout=10, storage_options={"timeout": 5, "table": "t1"})
    report = await schemas.check(url, timeout=10, storage_options={"timeout": 5}, table="t1")
    assert report.passed, report.problems
    with pytest.raises(ConfigurationError, match="'table' given both"):
        await schemas.check(url, storage_options={"table": "a"}, table="b")
    with pytest.raises(ConfigurationError, match="'url' is not a storage option"):
        await schemas.create(url, storage_options={"url": url})


def test_sqlite_missing_directory_is_a_bad_url(tmp_path: Path) -> None:
    # check reported "does not exist; create it with cacheme schema create", which failed.
    url = f"sqlite:///{tmp_path}/nodir/cache.db"
    for args in (["check", url], ["schema", "create", url]):
        result = cli(*args)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert f"the directory {tmp_path}/nodir does not exist" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_sqlite_check_finds_a_wrong_table(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    with sqlite3.connect(path) as db:
        db.execute('CREATE TABLE cacheme_data ("key" TEXT, "value" BLOB)')
    result = cli("check", f"sqlite:///{path}")
    assert result.returncode == 1
    assert "lacks the column(s) expire" in result.stderr
    assert "key is not a primary key" in result.stderr
    assert "no index on expire" in result.stderr


def test_local_url_needs_no_check() -> None:
    result = cli("check", "local://lru", "-o", "size=10")
    assert result.returncode == 0, result.stderr
    assert "nothing to check" in result.stdout


@pytest.mark.parametrize("url", ["local://tlfu", "local://lru"])
def test_local_url_without_size_says_nothing_to_check(url: str) -> None:
    # size is required by cacheme.Storage for a local tier, but it is the app's setting:
    # check used to fail with "bad option(s): size: Field required".
    result = cli("check", url)
    assert result.returncode == 0, result.stderr
    assert "local storages live in the memory of each process" in result.stdout
    assert "nothing to check" in result.stdout
    assert "size" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["local://nope"], "unknown policy 'nope'"),
        (["local://tlfu", "-o", "size=x"], "size"),
        (["local://tlfu", "-o", "sise=10"], "sise"),
    ],
)
def test_local_url_is_still_validated(args: list[str], message: str) -> None:
    result = cli("check", *args)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "nothing to check" not in result.stdout


# -- servers -------------------------------------------------------------------------------

SERVERS = {
    "postgres": ("PostgreSQL", POSTGRES_URL, 5432),
    "mysql": ("MySQL", MYSQL_URL, 3306),
    "mongo": ("MongoDB", MONGO_URL, 27017),
    "redis": ("Redis", REDIS_URL, 6379),
}


def server(backend: str) -> str:
    """The server's URL; skips (or fails) the test when nothing listens there."""
    service, url, default_port = SERVERS[backend]
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 3
        ).close()
    except OSError as exc:
        unavailable(service, url, exc)
    return url


def drop(backend: str, url: str, name: str) -> None:
    """Drop the table (or the test database) a test made, with the driver, in a subprocess."""
    code = {
        "postgres": f"import asyncpg, asyncio\n"
        f"async def m():\n c = await asyncpg.connect({url!r})\n"
        f" await c.execute('DROP TABLE IF EXISTS \"{name}\"')\n await c.close()\n"
        f"asyncio.run(m())",
        "mysql": f"import asyncmy, asyncio\nfrom cacheme.storages.mysql import connect_args\n"
        f"async def m():\n c = await asyncmy.connect(**connect_args({url!r}))\n"
        f" async with c.cursor() as cur: await cur.execute('DROP TABLE IF EXISTS `{name}`')\n"
        f" await c.ensure_closed()\n"
        f"asyncio.run(m())",
        "mongo": f"import pymongo\npymongo.MongoClient({url!r}).drop_database({name!r})",
    }[backend]
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
def test_sql_server_create_then_check(backend: str) -> None:
    url = server(backend)
    table = f"cacheme_cli_{uuid.uuid4().hex[:10]}"
    try:
        before = cli("check", url, "--table", table)
        assert before.returncode == 1, before.stderr
        assert f"table '{table}' does not exist" in before.stderr
        for _ in range(2):
            created = cli("schema", "create", url, "--table", table)
            assert created.returncode == 0, created.stderr
            assert created.stderr == ""
        ok = cli("check", url, "--table", table)
        assert ok.returncode == 0, ok.stderr
        for line in ("columns key, value, expire", "key is unique", "expire is indexed"):
            assert f"ok: {line}" in ok.stdout
    finally:
        drop(backend, url, table)


@pytest.mark.mongo
def test_mongo_create_then_check() -> None:
    url = server("mongo")
    database = f"cacheme_cli_{uuid.uuid4().hex[:10]}"
    args = ["--database", database, "--collection", "entries"]
    try:
        before = cli("check", url, *args)
        assert before.returncode == 1
        assert f"collection {database}.entries does not exist" in before.stderr
        for _ in range(2):
            created = cli("schema", "create", url, *args)
            assert created.returncode == 0, created.stderr
        ok = cli("check", url, *args)
        assert ok.returncode == 0, ok.stderr
        assert "ok: unique index on key" in ok.stdout and "ok: TTL index on expire" in ok.stdout
    finally:
        drop("mongo", url, database)


@pytest.mark.redis
def test_redis_check() -> None:
    url = server("redis")
    result = cli("check", url)
    assert result.returncode == 0, result.stderr
    assert "connected and read a key" in result.stdout


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "postgresql://postgres@127.0.0.1:1/test",
        "mysql://u:secret-pw@127.0.0.1:1/test",
        "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=500",
    ],
)
def test_unreachable_exits_1(url: str) -> None:
    result = cli("check", url, "--timeout", "5")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "cacheme:" in result.stderr and "Traceback" not in result.stderr
    assert "secret-pw" not in result.stderr + result.stdout


# -- nodes and stats -----------------------------------------------------------------------

APP = """
import asyncio
from datetime import timedelta

import cacheme
from cacheme.serializer import MsgPackSerializer


class UserNode(cacheme.Node):
    def __init__(self, user_id: int) -> None:
        self.user_id = user_id

    def key(self) -> str:
        return f"user:{self.user_id}"

    async def load(self) -> dict:
        return {"id": self.user_id}

    class Meta(cacheme.Node.Meta):
        version = "v2"
        caches = [
            cacheme.Cache(storage="local", ttl=timedelta(seconds=30)),
            cacheme.Cache(storage="sqlite", ttl=timedelta(days=1, hours=2)),
        ]
        serializer = MsgPackSerializer()


class CounterNode(cacheme.Node):
    def key(self) -> str:
        return "counter"

    async def load(self) -> int:
        return 1

    class Meta(cacheme.Node.Meta):
        caches = [cacheme.Cache(storage="local", ttl=None)]


async def main() -> None:
    await cacheme.register_storage("local", cacheme.Storage(url="local://tlfu", size=100))
    try:
        for _ in range(3):
            await cacheme.get(CounterNode())
            await asyncio.sleep(0.2)
    finally:
        await cacheme.close_storages()


async def broken() -> None:
    raise RuntimeError("the workload failed")
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    name = f"cli_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(APP))
    return tmp_path / name


def test_nodes_lists_chains_and_ttls(app: Path) -> None:
    result = cli("nodes", app.name, cwd=app.parent)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "VERSION", "CHAIN", "(TTL)", "SERIALIZER"]
    assert lines[1].split() == [
        "UserNode", "v2", "local", "(30s)", "->", "sqlite", "(1d2h)", "MsgPackSerializer",
    ]  # fmt: skip
    assert lines[2].split() == ["CounterNode", "-", "local", "(none)", "-"]

    data = json.loads(cli("nodes", app.name, "--json", cwd=app.parent).stdout)
    assert [d["name"] for d in data] == ["UserNode", "CounterNode"]
    assert data[0]["class"] == f"{app.name}.UserNode"
    assert data[0]["caches"] == [
        {"storage": "local", "ttl": "30s", "ttl_seconds": 30.0},
        {"storage": "sqlite", "ttl": "1d2h", "ttl_seconds": 93600.0},
    ]


def test_nodes_module_that_raises_exits_1(tmp_path: Path) -> None:
    (tmp_path / "raising_mod.py").write_text("raise ValueError('bad config')\n")
    result = cli("nodes", "raising_mod", cwd=tmp_path)
    assert result.returncode == 1
    assert "raised ValueError: bad config" in result.stderr


def test_stats_watch_runs_the_function(app: Path) -> None:
    result = cli("stats", f"{app.name}:main", "--watch", "0.1", "--json", cwd=app.parent)
    assert result.returncode == 0, result.stderr
    snapshots = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(snapshots) >= 3  # a few while main() ran, and the last one
    counter = [s["nodes"]["CounterNode"] for s in snapshots]
    assert [c["requests"] for c in counter] == sorted(c["requests"] for c in counter)
    assert counter[-1]["requests"] == 3 and counter[-1]["hits"] == 2
    assert counter[-1]["loads"] == 1
    assert any("local" in s["storages"] for s in snapshots[:-1])  # seen while registered


def test_stats_table(app: Path) -> None:
    result = cli("stats", f"{app.name}:main", cwd=app.parent)
    assert result.returncode == 0, result.stderr
    header, *rows = [line for line in result.stdout.splitlines() if line and line[:2] != "--"]
    assert header.split()[:4] == ["NODE", "REQUESTS", "HITS", "HIT%"]
    counter = next(r.split() for r in rows if r.startswith("CounterNode"))
    assert counter[1:5] == ["3", "2", "66.7%", "1"]

    one_shot = cli("stats", app.name, cwd=app.parent)
    assert one_shot.returncode == 0 and "UserNode" in one_shot.stdout


def test_stats_function_that_raises_exits_1(app: Path) -> None:
    result = cli("stats", f"{app.name}:broken", cwd=app.parent)
    assert result.returncode == 1
    assert "raised RuntimeError: the workload failed" in result.stderr


# -- a reader that goes away (``| head``) ---------------------------------------------------


def cli_output_closed(*args: str, cwd: Path) -> tuple[int, str]:
    """``python -m cacheme ARGS`` whose standard output is closed before it writes anything
    (what ``| head -1`` does once it has its line): the exit code and standard error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cacheme", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    try:
        err = proc.stderr.read()
        return proc.wait(timeout=60), err
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "args",
    [
        ["stats", "{app}:main", "--watch", "0.05", "--json"],
        ["stats", "{app}:main", "--watch", "0.05"],
        ["stats", "{app}"],
        ["nodes", "{app}"],
        ["nodes", "{app}", "--json"],
        ["schema", "show", "postgresql"],
        ["schema", "show", "mysql", "--table", "t"],
        ["schema", "create", "sqlite:///{tmp}/cache.db"],
        ["check", "local://tlfu"],
    ],
)
def test_closed_output_exits_quietly(args: list[str], app: Path) -> None:
    # `cacheme stats ... --json --watch 1 | head -3` printed two BrokenPipeError tracebacks.
    args = [a.format(app=app.name, tmp=app.parent) for a in args]
    code, err = cli_output_closed(*args, cwd=app.parent)
    assert err == "", err
    assert code == 1
