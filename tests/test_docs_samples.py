"""Every ```python block of README.md and docs/**/*.md runs, so the docs cannot rot.

The convention (also written down in docs/writing-docs.md):

- The python blocks of one page run in order, in one namespace, like cells of a notebook: a
  block may use what an earlier block of the same page defined. Top-level ``await`` is
  allowed (blocks are compiled with ``ast.PyCF_ALLOW_TOP_LEVEL_AWAIT``); all the blocks of a
  group share one event loop, so a storage registered in one block serves the next. A block
  without top-level ``await`` runs outside that loop, so it may call ``asyncio.run()``.
- Each group runs in a fresh interpreter (no state leaks between pages, or into the other
  tests), in an empty temporary working directory: files a sample creates (``cache.db``) go
  there. It holds no copy of the repository's ``sql/`` folder: a sample creates its tables
  as a user who installed the package does (``cacheme.schemas.create``, ``cacheme schema
  create``). At the end of a group the
  harness awaits ``cacheme.close_storages()``.
- An HTML comment right before a block (blank lines between are fine) steers it. Comments
  are invisible on GitHub and on the site. Clauses are separated by ``;``:

  ``<!-- sample: group NAME -->``
      Start a group: this block and the following ones of the page, until the next
      ``group``, run as one test with a namespace and loop of their own. Blocks before the
      first ``group`` form the group ``main``.
  ``<!-- sample: needs redis -->`` (``redis``, ``redis_cluster``, ``postgres``, ``mysql``,
      ``mongo``; several separated by commas)
      The group needs that server. Its URLs in the group's code (``redis://localhost:6379``,
      ``redis://localhost:7000`` for the cluster, any ``postgresql://``, ``mysql://``,
      ``mongodb://``) are replaced by the test server's URL (``tests/services.py``: the
      ``*_URL`` variables; Redis defaults to database 15 like the integration tests). The
      harness prepares what the docs tell users to prepare: the ``cacheme_data`` table from
      ``sql/*.sql``, the indexes of ``sql/mongo.js``; and it empties the keys of the
      prefixes the group uses before and after. Unreachable: the group skips with the
      reason, or fails under ``CACHEME_REQUIRE_SERVICES=1``.
  ``<!-- sample: skip REASON -->``
      The block is not run: only for fragments that cannot run on their own (a shape to
      fill in, a shell-specific snippet). Each one is listed as a skipped test with its
      reason (``pytest -rs``), and ``SKIPPED`` below must name it, so none slips in.
  ``<!-- sample: xfail REASON -->``
      The group documents a contract the core does not implement yet (work in progress
      elsewhere). Failing, it is reported as xfail with the reason; passing, it warns that
      the marker can go.

- A hidden setup block, ``<!-- sample-setup`` + code + ``-->``, runs where it stands (in the
  current group) but is not shown: for stand-ins a reader already has (``fetch_user``,
  a storage the page registered earlier). Keep them few and small.

A block that registers a storage of a server scheme in a group without the matching
``needs`` is an error (it would fail in CI with a connection error instead of skipping).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUP_TIMEOUT = 60  # seconds for one group, in its own interpreter
SERVICES = ("redis", "redis_cluster", "postgres", "mysql", "mongo")

# Fragments that are deliberately not run, as (file, reason): every skip marker in the docs
# is listed here with its exact reason, and nothing else is, so none slips in unnoticed.
SKIPPED: list[tuple[str, str]] = []


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.exists()]


@dataclass
class Block:
    path: str  # relative to the repo
    line: int  # 1-based line of the first code line
    code: str
    group: str
    hidden: bool = False
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Group:
    path: str
    name: str
    blocks: list[Block] = field(default_factory=list)
    needs: set[str] = field(default_factory=set)
    xfail: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path}::{self.name}"


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*sample:(?P<body>.*?)-->\s*$")
_SETUP_START = re.compile(r"^\s*<!--\s*sample-setup\s*$")


class DocsError(Exception):
    """A marker that is malformed or misplaced."""


def parse(path: Path) -> list[Group]:
    """The groups of python blocks of one Markdown file, in order."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text().splitlines()
    groups: dict[str, Group] = {}
    current = "main"
    pending: list[tuple[int, str]] = []  # (line, clause) waiting for their block

    def group(name: str) -> Group:
        return groups.setdefault(name, Group(rel, name))

    def apply(block_line: int) -> tuple[str | None, str | None]:
        nonlocal current
        skip = xfail = None
        for line, clause in pending:
            verb, _, arg = clause.strip().partition(" ")
            arg = arg.strip()
            if verb == "group" and re.fullmatch(r"[\w.-]+", arg):
                current = arg
            elif verb == "needs" and arg:
                for need in (n.strip() for n in arg.split(",")):
                    if need not in SERVICES:
                        raise DocsError(f"{rel}:{line}: unknown service {need!r} in needs")
                    group(current).needs.add(need)
            elif verb == "skip" and arg:
                skip = arg
            elif verb == "xfail" and arg:
                xfail = arg
            else:
                raise DocsError(f"{rel}:{line}: bad sample clause {clause.strip()!r}")
        pending.clear()
        return skip, xfail

    i = 0
    while i < len(lines):
        text = lines[i]
        if m := _DIRECTIVE.match(text):
            pending.extend((i + 1, c) for c in m["body"].split(";") if c.strip())
            i += 1
            continue
        if _SETUP_START.match(text):
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "-->":
                end += 1
            if end == len(lines):
                raise DocsError(f"{rel}:{i + 1}: sample-setup comment is never closed")
            _, xfail = apply(start)
            g = group(current)
            if xfail:
                g.xfail = xfail
            g.blocks.append(Block(rel, start + 1, "\n".join(lines[start:end]), current, True))
            i = end + 1
            continue
        if m := _FENCE.match(text):
            indent, fence, info = m["indent"], m["fence"], m["info"].lower()
            start = i + 1
            end = start
            while end < len(lines) and not lines[end].strip().startswith(fence):
                end += 1
            if info in ("python", "py"):
                body = [
                    ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start:end]
                ]
                skip, xfail = apply(start)
                g = group(current)
                if xfail:
                    g.xfail = xfail
                g.blocks.append(Block(rel, start + 1, "\n".join(body), current, skip=skip))
            elif pending:
                raise DocsError(f"{rel}:{pending[0][0]}: sample marker before a {info} block")
            i = end + 1
            continue
        if text.strip() and pending:
            raise DocsError(f"{rel}:{pending[0][0]}: sample marker not followed by a python block")
        i += 1
    if pending:
        raise DocsError(f"{rel}:{pending[0][0]}: sample marker at the end of the file")
    return list(groups.values())


def all_groups() -> list[Group]:
    return [g for f in markdown_files() for g in parse(f)]


def _safe_groups() -> list[Group]:
    try:
        return all_groups()
    except DocsError:
        return []  # test_markers reports it


# -- servers -------------------------------------------------------------------------------

_SERVER_URL = {
    "redis": re.compile(r"redis://(?:localhost|127\.0\.0\.1):6379[^\"'\s]*"),
    "redis_cluster": re.compile(r"redis://(?:localhost|127\.0\.0\.1):7000[^\"'\s]*"),
    "postgres": re.compile(r"postgres(?:ql)?://[^\"'\s]*"),
    "mysql": re.compile(r"mysql://[^\"'\s]*"),
    "mongo": re.compile(r"mongodb://[^\"'\s]*"),
}


def server_url(service: str) -> str:
    from tests import services

    if service == "redis":
        return services.REDIS_URL if "REDIS_URL" in os.environ else "redis://127.0.0.1:6379/15"
    return {
        "redis_cluster": services.REDIS_CLUSTER_URL,
        "postgres": services.POSTGRES_URL,
        "mysql": services.MYSQL_URL,
        "mongo": services.MONGO_URL,
    }[service]


def rewrite(code: str, needs: set[str]) -> str:
    for service in needs:
        code = _SERVER_URL[service].sub(server_url(service), code)
    return code


def prefixes(group: Group) -> list[str]:
    code = "\n".join(b.code for b in group.blocks)
    return sorted({"cacheme", *re.findall(r"set_prefix\(\s*[\"']([^\"']+)[\"']", code)})


SCHEMAS = ROOT / "sql"
_CREATE_INDEX = re.compile(r"\.createIndex\(\s*(\{[^{}]*\})\s*,\s*(\{[^{}]*\})\s*\)")
_BARE_NAME = re.compile(r"([{,]\s*)([A-Za-z_$][\w$]*)\s*:")


def sql_statements(file: str) -> list[str]:
    """The statements of ``sql/<file>``, comments removed: what the docs tell users to run."""
    text = re.sub(r"--[^\n]*", "", (SCHEMAS / file).read_text())
    return [s.strip() for s in text.split(";") if s.strip()]


def mongo_indexes() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(keys, options)`` of the ``createIndex`` calls of ``sql/mongo.js``."""
    code = "\n".join(
        line
        for line in (SCHEMAS / "mongo.js").read_text().splitlines()
        if not line.lstrip().startswith("//")
    )
    return [
        (json.loads(_BARE_NAME.sub(r'\1"\2":', k)), json.loads(_BARE_NAME.sub(r'\1"\2":', o)))
        for k, o in _CREATE_INDEX.findall(code)
    ]


async def _prepare(service: str, keep: list[str]) -> None:
    """Check that ``service`` answers, create what the docs tell users to create, and empty
    the entries of the prefixes in ``keep``. Deliberately imports no cacheme code."""
    url = server_url(service)
    if service in ("redis", "redis_cluster"):
        import redis.asyncio
        from redis.asyncio.cluster import RedisCluster

        client: Any = (
            RedisCluster.from_url(url, socket_timeout=5)
            if service == "redis_cluster"
            else redis.asyncio.Redis.from_url(url, socket_timeout=5)
        )
        try:
            await client.ping()
            for prefix in keep:
                keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
                for key in keys:  # one by one: on a cluster, keys live in different slots
                    await client.unlink(key)
        finally:
            await client.aclose()
    elif service == "postgres":
        import asyncpg

        conn = await asyncpg.connect(url, timeout=5)
        try:
            for statement in [*sql_statements("postgresql.sql"), "DELETE FROM cacheme_data"]:
                await conn.execute(statement)
        finally:
            await conn.close()
    elif service == "mysql":
        import asyncmy

        parts = urlsplit(url)
        my = await asyncmy.connect(
            host=parts.hostname or "localhost",
            port=parts.port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=parts.path.lstrip("/"),
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=5,
        )
        try:
            async with my.cursor() as cur:
                for statement in [*sql_statements("mysql.sql"), "DELETE FROM cacheme_data"]:
                    await cur.execute(statement)
        finally:
            await my.ensure_closed()
    elif service == "mongo":
        from pymongo import AsyncMongoClient

        mongo: Any = AsyncMongoClient(url, serverSelectionTimeoutMS=5000)
        try:
            coll = mongo.get_default_database("cacheme")["cacheme_data"]
            for keys, options in mongo_indexes():
                await coll.create_index(list(keys.items()), **options)
            await coll.delete_many({})
        finally:
            await mongo.close()


# Mistakes in this file or a missing driver must fail the test, not pass for a missing server.
_NOT_A_SERVER_PROBLEM = (ImportError, NameError, AttributeError, TypeError, SyntaxError)


def prepare(group: Group) -> None:
    from tests.services import unavailable

    for service in sorted(group.needs):
        try:
            asyncio.run(asyncio.wait_for(_prepare(service, prefixes(group)), 20))
        except _NOT_A_SERVER_PROBLEM:
            raise
        except Exception as exc:
            unavailable(service, server_url(service), exc)


# -- running a group -----------------------------------------------------------------------


def run_blocks(spec_file: str) -> None:
    """In a fresh interpreter: run the blocks of one group (the child side of ``run_group``)."""
    import cacheme

    blocks = json.loads(Path(spec_file).read_text())
    module = types.ModuleType("docs_sample")
    sys.modules["docs_sample"] = module
    namespace = module.__dict__
    loop = asyncio.new_event_loop()
    try:
        for block in blocks:
            source = "\n" * (block["line"] - 1) + block["code"]
            code = compile(
                source,
                block["path"],
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                dont_inherit=True,
            )
            result = eval(code, namespace)  # a coroutine when the block has top-level await
            if asyncio.iscoroutine(result):
                loop.run_until_complete(result)
    finally:
        try:
            loop.run_until_complete(cacheme.close_storages())
            pending = asyncio.all_tasks(loop)
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def run_group(group: Group, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    blocks = [
        {"path": b.path, "line": b.line, "code": rewrite(b.code, group.needs)}
        for b in group.blocks
        if b.skip is None
    ]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(blocks))
    work = tmp_path / "work"
    work.mkdir()
    # No copy of sql/ here: a sample runs where a pip user runs it (schemas.create, the CLI).
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
    )
    command = [
        sys.executable,
        "-c",
        "import sys; from tests.test_docs_samples import run_blocks; run_blocks(sys.argv[1])",
        str(spec),
    ]
    try:
        return subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=GROUP_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return subprocess.CompletedProcess(
            command, -9, out, f"{err}\nTimed out: the samples ran past {GROUP_TIMEOUT} s"
        )


# -- the tests -----------------------------------------------------------------------------


def test_markers() -> None:
    """Every marker parses, is placed before a python block, and servers are declared."""
    groups = all_groups()  # raises DocsError on a malformed or misplaced marker
    assert any(b for g in groups for b in g.blocks), "no python blocks found"
    problems = []
    for g in groups:
        for b in g.blocks:
            if b.skip is not None or "register_storage" not in b.code:
                continue
            for service, pattern in _SERVER_URL.items():
                if pattern.search(b.code) and service not in g.needs:
                    if service == "redis" and "redis_cluster" in g.needs and "7000" in b.code:
                        continue
                    problems.append(
                        f"{b.where}: registers a {service} storage; add "
                        f"<!-- sample: needs {service} --> to its group"
                    )
    assert not problems, "\n".join(problems)


def test_skips_are_listed() -> None:
    """Every skipped block has a reason and appears in SKIPPED; SKIPPED lists nothing else."""
    found = sorted((b.path, b.skip) for g in all_groups() for b in g.blocks if b.skip)
    assert found == sorted(SKIPPED), (
        f"skip markers in the docs: {found}\nSKIPPED in {__file__}: {sorted(SKIPPED)}"
    )


_FRAGMENTS = [b for g in _safe_groups() for b in g.blocks if b.skip is not None]

if _FRAGMENTS:  # none today: then no placeholder test is reported as skipped

    @pytest.mark.parametrize("block", _FRAGMENTS, ids=lambda b: b.where)
    def test_skipped_fragment(block: Block) -> None:
        """Listed for ``pytest -rs``: the fragments the docs show but do not run."""
        pytest.skip(f"fragment, not run: {block.skip}")


@pytest.mark.parametrize(
    "group",
    [g for g in _safe_groups() if any(b.skip is None and not b.hidden for b in g.blocks)],
    ids=lambda g: g.id,
)
def test_sample(group: Group, tmp_path: Path) -> None:
    prepare(group)
    try:
        done = run_group(group, tmp_path)
    finally:
        if group.needs:
            prepare(group)  # leave no entries behind
    output = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    if done.returncode != 0:
        if group.xfail:
            pytest.xfail(f"{group.xfail}\n{done.stderr.strip().splitlines()[-1:]}")
        pytest.fail(f"the samples of {group.id} failed:\n{output}", pytrace=False)
    if group.xfail:
        warnings.warn(
            f"{group.id} passes: remove its '<!-- sample: xfail ... -->' marker", stacklevel=1
        )
