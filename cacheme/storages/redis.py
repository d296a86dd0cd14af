"""Redis and Redis Cluster tier: ``redis://host:port/db`` and ``rediss://`` (TLS).

Standalone: one ``MGET`` per batch read, one non-transactional pipeline of
``SET key value [PX ms]`` per batch write, the same with ``NX`` per batch add
(set-if-absent; both sent as one script call when a batch has several keys), one ``UNLINK``
per batch remove, over a ``BlockingConnectionPool`` of ``pool_size`` connections (a burst
waits for a free connection; the storage ``timeout`` bounds that wait).

Cluster (``cluster=True``): the same commands, split by hash slot and pipelined per node,
every node at once (see ``_get_many``). The client keeps ``pool_size`` connections per node
at most, and this storage lets at most ``pool_size`` operations run at once, so a burst waits
instead of failing with redis-py's ``MaxConnectionsError``.

Values stay bytes (``decode_responses`` is forced off, whatever the URL says); TTLs are whole
milliseconds (``PX``). Query parameters of the URL reach redis-py (e.g. ``?protocol=2`` for a
server older than Redis 6, which cannot speak RESP3); one it does not take from a URL, or
that the client does not accept (``accepted_query``), is a ``StorageMisconfiguredError`` at
registration, before connecting, as are ``?max_connections`` and ``?timeout`` (the storage's
``pool_size`` and ``timeout``), ``?socket_timeout`` and ``?socket_connect_timeout`` (set
from the storage's ``timeout``).

A standalone write cut short by the storage timeout has its connection closed on the server
(``CLIENT KILL ID``, see ``stops``) before it counts as failed: bytes of it still on their
way (a slow network) would otherwise land after a later ``invalidate``. Each pooled
connection learns its id (``CLIENT ID``) when it connects; a user without the right to it
gets no stops.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
from collections.abc import Sequence
from contextvars import ContextVar
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio
from pydantic import Field
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    ConnectionPool,
    SSLConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import ConfigurationError, StorageMisconfiguredError
from .base import MAX_POOL_SIZE, Entry, RemoteOptions, RemoteStorage, describe
from .stops import CutStops
from .url import redact

__all__ = ["RedisOptions", "RedisStorage"]

# The ids of the connections a write under way in this task lost (see _Identified).
_cut_ids: ContextVar[list[int] | None] = ContextVar("cacheme_redis_cut_ids", default=None)


@cache
def _identified(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """``base`` (redis-py's connection class of the URL) that knows its id on the server,
    and notes it in ``_cut_ids`` when it drops its socket in the middle of a write."""

    class Identified(base):  # type: ignore[valid-type,misc]
        cacheme_id: int | None = None

        async def on_connect_check_health(self, check_health: bool = True) -> None:
            await super().on_connect_check_health(check_health)
            try:
                await self.send_command("CLIENT", "ID", check_health=False)
                self.cacheme_id = int(await self.read_response())
            except redis.exceptions.ResponseError:  # no right to it (ACL), or Redis < 5
                self.cacheme_id = None

        async def disconnect(self, *args: Any, **kwargs: Any) -> None:
            cut = _cut_ids.get()
            if cut is not None and self.cacheme_id is not None and self.is_connected:
                cut.append(self.cacheme_id)
            await super().disconnect(*args, **kwargs)

    Identified.__name__ = Identified.__qualname__ = f"Identified{base.__name__}"
    return Identified


# SET each KEYS[i] to ARGV[2i-1], with PX ARGV[2i] unless that is 0 (no expiry).
_SET_MANY = """
for i = 1, #KEYS do
    local ttl = tonumber(ARGV[2 * i])
    if ttl > 0 then
        redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'PX', ttl)
    else
        redis.call('SET', KEYS[i], ARGV[2 * i - 1])
    end
end
return #KEYS
"""


# The same with NX: each key is set only if it is absent (an expired key is absent).
_ADD_MANY = """
for i = 1, #KEYS do
    local ttl = tonumber(ARGV[2 * i])
    if ttl > 0 then
        redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'NX', 'PX', ttl)
    else
        redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'NX')
    end
end
return #KEYS
"""


# Query parameters redis-py passes on as text (it converts those of
# URL_QUERY_ARGUMENT_PARSERS): those that a text can set.
_TEXT_PARAMS = frozenset(
    {
        "client_name",
        "lib_name",
        "lib_version",
        "username",
        "password",
        "encoding",
        "encoding_errors",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_ciphers",
        "ssl_password",
    }
)
# Settings of redis-py that this storage sets from its options (``decode_responses``, set
# off whatever the URL says, stays accepted: URLs shared with other clients carry it).
_STORAGE_OPTION_OF = {
    "max_connections": "pool_size",
    "timeout": "timeout",
    "socket_timeout": "timeout",
    "socket_connect_timeout": "timeout",
}


def accepted_query(connection_class: type[Any], cluster: bool) -> frozenset[str]:
    """The URL query parameters a storage of this kind takes: those redis-py reads from a
    URL (``URL_QUERY_ARGUMENT_PARSERS``) or takes as text, that the client it makes accepts
    (the connection class of the URL, or ``RedisCluster``), less the storage's own."""
    if cluster:
        takes = set(inspect.signature(RedisCluster.__init__).parameters)
    else:
        takes = set()
        for cls in connection_class.__mro__:
            if "__init__" in vars(cls):
                takes |= set(inspect.signature(vars(cls)["__init__"]).parameters)
    known = set(URL_QUERY_ARGUMENT_PARSERS) | _TEXT_PARAMS | {"decode_responses"}
    return frozenset((known & takes) - set(_STORAGE_OPTION_OF) - {"self"})


def _check_query(name: str, url: str, params: dict[str, Any], cluster: bool) -> None:
    """``StorageMisconfiguredError`` for a URL query parameter the storage does not take,
    at registration: redis-py hands any name on to the connection, which refused it only
    when connecting (as a server that is down, for some)."""
    given = [key for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)]
    where = f"storage {name!r} ({redact(url)})"
    for key in given:
        if key in _STORAGE_OPTION_OF:
            raise StorageMisconfiguredError(
                f"{where}: the URL query parameter {key!r} is set by the storage option "
                f"{_STORAGE_OPTION_OF[key]!r}: give Storage(..., {_STORAGE_OPTION_OF[key]}=...)"
            )
    accepted = accepted_query(params.get("connection_class", Connection), cluster)
    unknown = [key for key in dict.fromkeys(given) if key not in accepted]
    if unknown:
        kind = "a Redis Cluster" if cluster else urlsplit(url).scheme + "://"
        raise StorageMisconfiguredError(
            f"{where}: unknown URL query parameter(s) {', '.join(map(repr, unknown))} for "
            f"{kind}; accepted: {', '.join(sorted(accepted))}"
        )


class RedisOptions(RemoteOptions):
    """Options of a Redis storage (on top of ``RemoteOptions``)."""

    pool_size: int = Field(
        default=100,
        ge=1,
        le=MAX_POOL_SIZE,
        description="most connections open at once (per node on a cluster); "
        "further operations wait for a free one",
    )
    cluster: bool = Field(default=False, description="the URL names one node of a Redis Cluster")


class RedisStorage(RemoteStorage[RedisOptions]):
    """A Redis (or Redis Cluster) tier."""

    options_model = RedisOptions

    def misconfigured(self, exc: BaseException) -> bool:
        # A wrong password or user, a database number the server does not have, or a URL
        # query option redis-py does not know (it passes it to the connection as is).
        return (
            isinstance(exc, redis.exceptions.AuthenticationError)
            or (
                isinstance(exc, redis.exceptions.ResponseError)
                and str(exc).startswith(("DB index is out of range", "WRONGPASS", "NOAUTH"))
            )
            or (isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc))
        )

    options: RedisOptions

    def __init__(self, name: str, url: str, options: RedisOptions) -> None:
        super().__init__(name, url, options)
        try:
            params: dict[str, Any] = dict(parse_url(url))
        except ValueError as exc:
            raise ConfigurationError(
                f"storage {name!r} ({redact(url)}): bad Redis URL: {describe(exc, url)}"
            ) from None
        path = unquote(urlsplit(url).path)
        if urlsplit(url).scheme != "unix" and not re.fullmatch(r"/?(\d+/?)?", path):
            # redis-py takes a path that is not a number as database 0.
            raise ConfigurationError(
                f"storage {name!r} ({redact(url)}): bad Redis URL: the path names the "
                f"database, a number from 0 (/0, /1...), got {path!r}"
            )
        _check_query(name, url, params, options.cluster)
        if options.cluster and params.get("db", 0) != 0:
            raise ConfigurationError(
                f"storage {name!r} ({redact(url)}): a Redis Cluster has only database 0"
            )
        # The URL's query may set redis-py options; these must hold regardless.
        backstop = options.timeout * 2  # the base class's timeout fires first
        params.update(
            decode_responses=False,
            socket_connect_timeout=backstop,
            socket_timeout=backstop,
        )
        self._params = params  # holds the password: never printed
        self._stops = CutStops(name, self._stopper_connect, _kill_client, _close_client)
        self._client: redis.asyncio.Redis | None = None
        self._cluster: RedisCluster | None = None
        self._script: Any = None  # the registered _SET_MANY script (standalone only)
        self._add_script: Any = None  # the registered _ADD_MANY script (standalone only)
        # Cluster only: bounds the operations in flight, since each one takes at most one
        # connection per node and the cluster client fails instead of waiting for one.
        # Made in _connect: a semaphore belongs to the loop that first waits on it.
        self._slots: asyncio.Semaphore | None = None

    # -- connect / close ------------------------------------------------------------------

    async def _connect(self) -> None:
        if self.options.cluster:
            await self._connect_cluster()
        else:
            await self._connect_standalone()

    async def _connect_standalone(self) -> None:
        params = dict(self._params)
        params["connection_class"] = _identified(params.get("connection_class", Connection))
        pool = BlockingConnectionPool(
            max_connections=self.options.pool_size,
            timeout=self.options.timeout * 2,  # backstop; the base's timeout fires first
            # One immediate retry on a connection error: a pooled connection the server
            # closed while idle is replaced at once. Anything longer would only delay the
            # failure past the storage timeout (a cache should fail fast).
            retry=Retry(NoBackoff(), 1),
            **params,
        )
        client = redis.asyncio.Redis.from_pool(pool)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def _connect_cluster(self) -> None:
        params = dict(self._params)
        params.pop("db", None)
        if params.pop("connection_class", None) is SSLConnection:
            params["ssl"] = True
        # The cluster client keeps its default retries (topology refresh on MOVED,
        # failover); the storage timeout bounds them.
        client = RedisCluster(max_connections=self.options.pool_size, **params)
        try:
            await client.initialize()
        except BaseException:
            await client.aclose()
            raise
        self._slots = asyncio.Semaphore(self.options.pool_size)
        self._cluster = client

    async def _close(self) -> None:
        client, self._client = self._client, None
        cluster, self._cluster = self._cluster, None
        if client is not None:
            await client.aclose()
        self._script = None
        self._add_script = None
        if cluster is not None:
            await cluster.aclose()
        await self._stops.aclose()

    # -- writes cut short -------------------------------------------------------------------

    async def _stop_cuts(self, cut: list[int]) -> None:
        """Close on the server the connections a standalone write lost in the middle (cut by
        the storage timeout, or broken), before the write ends (see the module docstring),
        within 0.8 x ``timeout``; not when the storage is being closed (``close_storages``
        releases its callers at once)."""
        if self._closed or self._dead:
            return
        for ident in cut:
            await self._stops.stop(ident, "connection", 0.8 * self.options.timeout)

    async def _stopper_connect(self) -> redis.asyncio.Redis:
        pool = ConnectionPool(max_connections=1, **self._params)
        client = redis.asyncio.Redis.from_pool(pool)
        await client.ping()
        return client

    # -- raw operations ---------------------------------------------------------------------

    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        keys = list(keys)
        if self._cluster is not None:
            # A cluster rejects an MGET whose keys live in different hash slots, and even
            # two slots on one node need two MGETs. mget_nonatomic groups the keys by slot
            # (CRC16, honouring {hash tags}), issues one MGET per slot through a cluster
            # pipeline, and the pipeline sends all the MGETs for one node in a single write
            # on one connection, every node concurrently: one round trip of latency and
            # at most one connection per node. Firing one independent MGET per slot instead
            # would take a connection per slot (up to a whole batch's worth per node,
            # exhausting the per-node pool) for no gain in latency. Atomicity across keys
            # is not needed: each key is an independent cache entry.
            async with self._cluster_slots:
                values = await self._cluster.mget_nonatomic(keys)
        elif len(keys) == 1:  # a lone get: GET costs a little less than MGET in redis-py
            try:
                value: Any = await self._standalone().get(keys[0])
            except redis.exceptions.ResponseError as exc:
                if not str(exc).startswith("WRONGTYPE"):
                    raise
                return {}  # a key of another type: not a cache entry (MGET reads it as nil)
            return {} if value is None else {keys[0]: value}
        else:
            values = await self._standalone().mget(keys)
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    async def _ttl_many(self, keys: Sequence[str]) -> dict[str, float]:
        # One pipeline of PTTL (-2: no such key, -1: no expiry).
        if self._cluster is not None:
            async with self._cluster_slots:
                cpipe = self._cluster.pipeline()
                for key in keys:
                    cpipe.pttl(key)
                replies = await cpipe.execute()
        else:
            pipe = self._standalone().pipeline(transaction=False)
            for key in keys:
                pipe.pttl(key)
            replies = await pipe.execute()
        return {
            k: math.inf if ms == -1 else ms / 1000
            for k, ms in zip(keys, replies, strict=True)
            if ms != -2
        }

    async def _set_many(self, entries: Sequence[Entry]) -> None:
        if self._cluster is not None:
            # Non-transactional cluster pipeline: commands are grouped by node, one write
            # per node, all nodes concurrently.
            async with self._cluster_slots:
                cpipe = self._cluster.pipeline()
                for key, value, ttl_ms in entries:
                    if ttl_ms is None:
                        cpipe.set(key, value)
                    else:
                        cpipe.set(key, value, px=ttl_ms)
                await cpipe.execute()
            return
        await self._write_standalone(entries, nx=False)

    async def _add_many(self, entries: Sequence[Entry]) -> None:
        # SET ... NX: atomic per key on the server; an expired key counts as absent.
        if self._cluster is not None:
            async with self._cluster_slots:
                cpipe = self._cluster.pipeline()
                for key, value, ttl_ms in entries:
                    cpipe.set(key, value, px=ttl_ms, nx=True)
                await cpipe.execute()
            return
        await self._write_standalone(entries, nx=True)

    async def _write_standalone(self, entries: Sequence[Entry], nx: bool) -> None:
        """``SET key value [PX ms] [NX]`` of ``entries`` on a standalone server; a write cut
        short has its connections stopped first (see ``_stop_cuts``)."""
        client = self._standalone()
        cut: list[int] = []  # see _stop_cuts
        token = _cut_ids.set(cut)
        try:
            if len(entries) == 1:
                key, value, ttl_ms = entries[0]
                await client.set(key, value, px=ttl_ms, nx=nx)
                return
            # One EVALSHA for the whole batch: one command to pack and one reply to parse,
            # where a pipeline costs a SET and a reply per key (the client's CPU, not the
            # server's, is what limits a busy asyncio process).
            if nx:
                if self._add_script is None:
                    self._add_script = client.register_script(_ADD_MANY)
                script = self._add_script
            else:
                script = self._set_script
            args: list[bytes | int] = []
            for _, value, ttl_ms in entries:
                args += (value, ttl_ms or 0)
            await script(keys=[e.key for e in entries], args=args, client=client)
        finally:
            _cut_ids.reset(token)
            if cut:
                await self._stop_cuts(cut)

    async def _remove_many(self, keys: Sequence[str]) -> None:
        # UNLINK: the keys disappear at once, their memory is reclaimed in the background
        # (a 1 MiB value does not stall the server). On a cluster redis-py splits it by
        # slot and pipelines the parts per node.
        if self._cluster is not None:
            async with self._cluster_slots:
                await self._cluster.unlink(*keys)
            return
        await self._standalone().unlink(*keys)

    @property
    def _cluster_slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            raise ConnectionError("not connected (connect() was not called or close() was)")
        return self._slots

    @property
    def _set_script(self) -> Any:
        if self._script is None:
            self._script = self._standalone().register_script(_SET_MANY)
        return self._script

    def _standalone(self) -> redis.asyncio.Redis:
        if self._client is None:
            raise ConnectionError("not connected (connect() was not called or close() was)")
        return self._client


async def _kill_client(client: redis.asyncio.Redis, ident: int) -> None:
    try:
        await client.execute_command("CLIENT", "KILL", "ID", ident)  # type: ignore[no-untyped-call]
    except redis.exceptions.ResponseError as exc:
        if "no such client" not in str(exc).lower():  # gone already: nothing to stop
            raise


async def _close_client(client: redis.asyncio.Redis) -> None:
    await client.aclose()
