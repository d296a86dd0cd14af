"""Test factories for the SQL tiers: SQLite, PostgreSQL, MySQL/MariaDB.

Each test gets a table of its own, created from the schema file in ``sql/`` (with
``cacheme_data`` replaced by a unique name, so the files themselves are what is tested),
and dropped afterwards. Storages are built the way users build them:
``Storage(url, table=...).build(name)`` then ``connect()``.
"""

from __future__ import annotations

import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacheme.storages.registry import Storage
from cacheme.storages.sql import SQLStorage
from tests.services import MYSQL_URL, POSTGRES_URL, unavailable

from .backends import factory

SCHEMAS = Path(__file__).resolve().parents[2] / "sql"
SCHEMA_FILES = {"sqlite": "sqlite.sql", "postgres": "postgresql.sql", "mysql": "mysql.sql"}
SERVICES = {"postgres": ("PostgreSQL", POSTGRES_URL), "mysql": ("MySQL", MYSQL_URL)}
SQL_BACKENDS = ["sqlite", "postgres", "mysql"]


def schema(backend: str, table: str) -> list[str]:
    """The statements of ``sql/<backend>.sql`` for ``table``, comments removed."""
    text = (SCHEMAS / SCHEMA_FILES[backend]).read_text()
    text = re.sub(r"--[^\n]*", "", text).replace("cacheme_data", table)
    return [s.strip() for s in text.split(";") if s.strip()]


@dataclass
class SQLTable:
    """A fresh table on one backend, and a way to look into it by hand."""

    backend: str
    url: str
    table: str
    run: Callable[[str], Awaitable[list[tuple[Any, ...]]]]

    def q(self, identifier: str) -> str:
        """``identifier`` quoted for this backend."""
        return f"`{identifier}`" if self.backend == "mysql" else f'"{identifier}"'

    async def keys(self) -> list[str]:
        rows = await self.run(f"SELECT {self.q('key')} FROM {self.q(self.table)}")
        return sorted(str(r[0]) for r in rows)

    async def count(self) -> int:
        rows = await self.run(f"SELECT COUNT(*) FROM {self.q(self.table)}")
        return int(rows[0][0])


@asynccontextmanager
async def sql_table(backend: str, tmp_path: Path) -> AsyncIterator[SQLTable]:
    """A new table created from the backend's schema file; dropped afterwards."""
    table = f"cacheme_t_{uuid.uuid4().hex[:12]}"
    statements = schema(backend, table)
    if backend == "sqlite":
        path = tmp_path / f"{table}.db"
        with sqlite3.connect(path) as db:
            for statement in statements:
                db.execute(statement)

        async def run_sqlite(sql: str) -> list[tuple[Any, ...]]:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                return [tuple(r) for r in db.execute(sql).fetchall()]
            finally:
                db.close()

        yield SQLTable(backend, f"sqlite:///{path}", table, run_sqlite)
    elif backend == "postgres":
        import asyncpg

        service, url = SERVICES[backend]
        try:
            conn = await asyncpg.connect(url, timeout=5)
        except Exception as exc:
            unavailable(service, url, exc)
        try:
            for statement in statements:
                await conn.execute(statement)

            async def run_pg(sql: str) -> list[tuple[Any, ...]]:
                return [tuple(r) for r in await conn.fetch(sql)]

            yield SQLTable(backend, url, table, run_pg)
        finally:
            await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            await conn.close()
    elif backend == "mysql":
        from cacheme.storages.mysql import connect_args

        service, url = SERVICES[backend]
        import asyncmy

        try:
            conn = await asyncmy.connect(
                charset="utf8mb4", autocommit=True, connect_timeout=5, **connect_args(url)
            )
        except Exception as exc:
            unavailable(service, url, exc)
        try:
            for statement in statements:
                async with conn.cursor() as cur:
                    await cur.execute(statement)

            async def run_mysql(sql: str) -> list[tuple[Any, ...]]:
                async with conn.cursor() as cur:
                    await cur.execute(sql)
                    return [tuple(r) for r in await cur.fetchall()]

            yield SQLTable(backend, url, table, run_mysql)
        finally:
            async with conn.cursor() as cur:
                await cur.execute(f"DROP TABLE IF EXISTS `{table}`")
            await conn.ensure_closed()
    else:  # pragma: no cover
        raise ValueError(backend)


@asynccontextmanager
async def sql_storage(
    backend: str, tmp_path: Path, name: str, **options: Any
) -> AsyncIterator[tuple[SQLStorage[Any], SQLTable]]:
    """A connected storage on a fresh table, and the table."""
    async with sql_table(backend, tmp_path) as table:
        storage = Storage(table.url, table=table.table, **options).build(name)
        assert isinstance(storage, SQLStorage)
        # The server answered when the table was made: a failure here is a real one.
        await storage.connect()
        try:
            yield storage, table
        finally:
            await storage.close()


@asynccontextmanager
async def _contract(
    backend: str, tmp_path: Path, name: str, **options: Any
) -> AsyncIterator[SQLStorage[Any]]:
    async with sql_storage(backend, tmp_path, name, **options) as (storage, _):
        yield storage


@factory("sqlite")
def sqlite_storage(tmp_path: Path, name: str, **options: Any) -> Any:
    return _contract("sqlite", tmp_path, name, **options)


@factory("postgres")
def postgres_storage(tmp_path: Path, name: str, **options: Any) -> Any:
    return _contract("postgres", tmp_path, name, **options)


@factory("mysql")
def mysql_storage(tmp_path: Path, name: str, **options: Any) -> Any:
    return _contract("mysql", tmp_path, name, **options)
