"""The backplane: keeps local tiers coherent across processes through Redis pub/sub.

After ``await enable_backplane("my-redis")``, every key the core reports through
``publish(keys)`` (after ``invalidate``, ``refresh``, and a value written through to a shared
tier) is sent on one channel; every other process that enabled the backplane drops those keys
from its local tiers. Shared tiers are already coherent: messages never touch them.

Threads, not tasks, so that it works whatever event loops the program runs (``asyncio.run``
per task, a loop per thread, forked workers):

- **publisher** (daemon thread): callers put keys on a ``SimpleQueue`` (never blocks, never
  raises); the thread sends everything queued since its last send as one message. A failed
  send is counted and logged (at most once per 10 s) and its keys ride with the next message
  (at most ``_RETRY_MAX`` keys are kept); the local TTL stays the bound on staleness.
- **subscriber** (daemon thread): a synchronous redis-py connection subscribed to the channel.
  A message drops its keys from every registered local storage through
  ``discard_threadsafe`` (the tier applies it before its next read). The connection is pinged
  when idle; a lost subscription is re-made with a backoff of at most 1 s, and since messages
  may have been missed meanwhile, every local tier is then cleared (``clear_threadsafe``):
  stale local data never outlives a disconnect by more than the reconnect time.

On a Redis Cluster the backplane uses *sharded* pub/sub (``SSUBSCRIBE``/``SPUBLISH``, Redis
7+): classic ``PUBLISH`` is broadcast over the cluster bus to every node, whatever the
subscribers, so its cost grows with the cluster; a sharded message only travels within the
shard that owns the channel's slot. All traffic uses one channel, hence one shard: the
messages are a few keys each, so that shard's load is small. When that slot moves or its
primary fails over, the subscription is lost and re-made (clearing local tiers, as above).

A message is ``1|{sender}|{kind}|{JSON list of keys}``: ``sender`` is this process's instance
id (a uuid, new after ``fork``), so a process ignores its own messages before parsing them;
``kind`` is ``k`` (keys changed: drop them, wake lease waiters), ``i`` (the same, for keys
changed at their source, by ``invalidate`` or ``refresh``: a process that wrote one of them
to a shared tier since removes it there again, see ``repair``; the body is then ``[time of
the change (its removal or write issued), epoch ms, sender's host name, keys]``) or ``r``
(a lease was released without a value: only wake lease waiters, see ``lease``). The
publisher lingers 0.5 ms after the first key queued, so a stream of invalidations goes out
as one message per 0.5 ms.

After ``os.fork()`` the threads are gone: the child gets a new instance id, starts its
subscriber at once (its first subscription clears its local tiers, inherited from the parent
and maybe stale) and its publisher at its first ``publish``.

Counters: each is written by one thread only (the publisher's by the publisher, the
subscriber's by the subscriber); ``stats()`` reads a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import landing
from .errors import ConfigurationError
from .storages import registry

logger = logging.getLogger("cacheme.backplane")

__all__ = [
    "BackplaneStats",
    "disable_backplane",
    "enable_backplane",
    "publish",
    "stats",
]

DEFAULT_CHANNEL = "cacheme:backplane"
_VERSION = 1
_CHUNK = 1000  # keys per message at most
_RETRY_MAX = 10_000  # keys of failed messages kept for the next send
_PING_EVERY = 1.0  # seconds of silence before the subscriber pings
_DEAD_AFTER = 3.0  # seconds without any reply: the subscription is lost
_BACKOFF_MAX = 1.0  # seconds between reconnect / resend attempts, at most
# Seconds the publisher waits after the first queued key, gathering what follows into the
# same message: under a stream of invalidations it sends (and every process parses) one
# message per _LINGER instead of one per key; see docs/backplane.md for the measurements.
_LINGER = 0.0005
_CHANGED_MAX = 50_000  # keys remembered by changed_since before it turns conservative
# Seconds by which the clocks of two hosts may differ (see ``repair``); NTP keeps hosts of one
# network within a few milliseconds. Processes of one host share one clock.
CLOCK_SKEW = 0.05
_host = socket.gethostname()

# Listeners get (kind, keys, remote, since) for every message received from another process
# (remote=True, on the subscriber thread) and for every publish of this process
# (remote=False, on the caller's thread); ``since`` is the wall-clock time of a change of
# kind ``i`` (its removal or write issued), less CLOCK_SKEW when it comes from another host
# (else ``None``). ``lease`` and ``repair`` register one. They must be quick and
# must not raise.
Listener = Callable[[str, Sequence[str], bool, "float | None"], None]
_listeners: list[Listener] = []


@dataclass(frozen=True)
class BackplaneStats:
    """A snapshot of the backplane's counters (since the process started or forked)."""

    enabled: bool
    storage: str | None
    channel: str | None
    instance_id: str
    subscribed: bool
    messages_sent: int
    keys_sent: int
    publish_failures: int  # messages that could not be sent (their keys are retried)
    keys_dropped: int  # keys never sent: more than _RETRY_MAX were waiting
    messages_received: int  # from other processes
    keys_received: int
    own_ignored: int  # this process's own messages, ignored
    bad_messages: int  # undecodable payloads on the channel
    subscriptions: int  # successful subscriptions, the first included
    reconnects: int  # subscriptions that cleared the local tiers (after a loss or fork)
    repairs: int  # keys removed again from a shared tier after another process changed them
    repair_failures: int  # such removals that failed (see cacheme.repair)


class _Counters:
    def __init__(self) -> None:
        self.messages_sent = 0
        self.keys_sent = 0
        self.publish_failures = 0
        self.keys_dropped = 0
        self.messages_received = 0
        self.keys_received = 0
        self.own_ignored = 0
        self.bad_messages = 0
        self.subscriptions = 0
        self.reconnects = 0
        self.repairs = 0  # written by the event loops' threads (see repair)
        self.repair_failures = 0


_counters = _Counters()
_instance = uuid.uuid4().hex
_own_prefix = f"{_VERSION}|{_instance}|".encode()


def instance_id() -> str:
    """This process's id on the backplane (new after ``fork``)."""
    return _instance


# -- Redis clients ------------------------------------------------------------------------


class _Target:
    """How to reach the Redis (or Redis Cluster) of a registered storage, synchronously."""

    def __init__(self, name: str, url: str, cluster: bool, timeout: float) -> None:
        from redis.connection import parse_url

        self.name = name
        self.url = url
        self.cluster = cluster
        self.timeout = timeout
        params: dict[str, Any] = dict(parse_url(url))  # type: ignore[no-untyped-call]
        params.update(
            decode_responses=False, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        self.params = params  # holds the password: never printed

    def client(self) -> Any:
        """A new synchronous client: ``redis.Redis`` or ``redis.cluster.RedisCluster``."""
        import redis
        import redis.cluster
        from redis.backoff import NoBackoff
        from redis.connection import SSLConnection
        from redis.retry import Retry

        if not self.cluster:
            # No retries inside redis-py: the backplane's own loops retry, with a backoff.
            return redis.Redis(retry=Retry(NoBackoff(), 0), **self.params)
        params = dict(self.params)
        params.pop("db", None)
        if params.pop("connection_class", None) is SSLConnection:
            params["ssl"] = True
        return redis.cluster.RedisCluster(**params)

    def node_client(self, host: str, port: int) -> Any:
        """A standalone client to one node (the shard owning a sharded channel)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        params = dict(self.params)
        params.pop("db", None)
        params.update(host=host, port=port)
        return redis.Redis(retry=Retry(NoBackoff(), 0), **params)


def target_of(name: str, *, user: str = "") -> _Target:
    """The ``_Target`` of the registered Redis storage ``name``; ``ConfigurationError`` else."""
    who = f"{user}: " if user else ""
    backend = registry.storages().get(name)
    if backend is None:
        known = ", ".join(repr(n) for n in sorted(registry.storages())) or "none"
        raise ConfigurationError(
            f"{who}storage {name!r} is not registered (registered: {known}); "
            f"call cacheme.register_storage({name!r}, ...) first"
        )
    scheme = backend.url.split("://", 1)[0].lower()
    if backend.local or scheme not in ("redis", "rediss"):
        raise ConfigurationError(
            f"{who}storage {name!r} is not a Redis storage ({type(backend).__name__}); "
            "the backplane and leases need a redis:// or rediss:// storage"
        )
    options = backend.options
    return _Target(
        name,
        backend.url,
        bool(getattr(options, "cluster", False)),
        float(getattr(options, "timeout", 3.0)),
    )


_sync_clients: dict[tuple[int, str, str], Any] = {}
_sync_lock = threading.Lock()


def sync_client(name: str, *, user: str = "") -> Any:
    """A process-wide synchronous client for the Redis storage ``name`` (thread-safe).

    A new one after ``fork``, and when the storage is registered again with another URL.
    """
    target = target_of(name, user=user)
    marker = (os.getpid(), name, target.url)
    client = _sync_clients.get(marker)
    if client is None:
        with _sync_lock:
            client = _sync_clients.get(marker)
            if client is None:
                client = _sync_clients[marker] = target.client()
    return client


# -- rate-limited logging -------------------------------------------------------------------

_last_logged: dict[str, float] = {}


def _log(kind: str, message: str, *args: Any) -> None:
    """Warn at most once per 10 s per ``kind``; the rest go to debug."""
    now = time.monotonic()
    if now - _last_logged.get(kind, -100.0) >= 10.0:
        _last_logged[kind] = now
        logger.warning(message, *args)
    else:
        logger.debug(message, *args)


# -- changes seen (for the core's write-back race guard) ------------------------------------

_seq = 0  # changes noted so far (messages applied, this process's invalidations)
_floor = 0  # every key counts as changed at or below... this sequence number
_forgotten = 0  # ...of which the last time the table of changes overflowed (not a clear)
_changed: dict[str, int] = {}
# The keys of _changed that another process invalidated (a backplane message, a repair):
# what a refresh asks before it writes (see invalidated_elsewhere_since).
_remote: dict[str, int] = {}


def sequence() -> int:
    """A mark to pass to ``changed_since`` later (take it before reading a shared tier)."""
    return _seq


def changed_since(key: str, mark: int) -> bool:
    """Whether another process reported ``key`` changed after ``mark`` was taken.

    A flight that read a shared tier before the change must not copy what it read into a
    local tier (the drop was applied before its write): the core asks this before writing
    back to local tiers.
    """
    return _floor > mark or _changed.get(key, 0) > mark


def invalidated_elsewhere_since(key: str, mark: int) -> bool:
    """Whether another process reported ``key`` itself invalidated after ``mark`` (or may
    have: the table of changes overflowed), not counting the clears of every key after a
    new subscription: what a ``refresh`` asks before it writes. This process's own
    invalidations and refreshes detach the refreshes they overtake (their calls turn stale)
    and need no asking: counting them here kept a refresh from writing because of an older
    refresh's late note, or of the closing note of an invalidate it began after. A clear
    says that messages may have been missed, and a refresh that wrote nothing then would
    leave the shared tier with the value it was refreshing."""
    return _forgotten > mark or _remote.get(key, 0) > mark


def cleared_since(mark: int) -> bool:
    """Whether every key counts as changed since ``mark`` (a clear, or an overflow)."""
    return _floor > mark


# full key -> the deadlines (time.monotonic()) of this process's invalidations of it under
# way: see removing.
_removing: dict[str, list[float]] = {}


def begin_removal(key: str, bound: float) -> float:
    """Note an ``invalidate`` of ``key`` under way, for at most ``bound`` seconds (should it
    never end: its loop closed); returns the note, for ``end_removal``."""
    deadline = time.monotonic() + bound
    with _changes_lock:
        _removing.setdefault(key, []).append(deadline)
    return deadline


def end_removal(key: str, deadline: float) -> None:
    """The ``invalidate`` noted by ``begin_removal`` ended."""
    with _changes_lock:
        notes = _removing.get(key)
        if notes is not None:
            with contextlib.suppress(ValueError):
                notes.remove(deadline)
            if not notes:
                del _removing[key]


def removing(key: str) -> bool:
    """Whether an ``invalidate`` of ``key`` is under way in this process. A walk, of any
    loop, writes nothing back meanwhile: it may have read a tier whose removal had not landed
    yet (through its own loop's connection, which the removal's does not order), and its
    write could land in a tier already emptied (an invalidation made before it began is
    ``changed_since``'s)."""
    if not _removing:
        return False
    notes = _removing.get(key)
    return notes is not None and max(notes, default=0.0) > time.monotonic()


_changes_lock = threading.Lock()
# Held around "has the key changed since this walk began? then write it back" and around
# "note an invalidation, then drop the key from the local tiers", so that, across threads,
# neither can fall between the two steps of the other.
write_guard = threading.Lock()


def _record_changes(keys: Sequence[str] | None, remote: bool = False) -> None:
    """Note a change of ``keys`` (``None``: of everything), from any thread; ``remote``:
    another process invalidated them."""
    global _seq, _floor, _forgotten
    with _changes_lock:
        seq = _seq + 1
        if keys is None:  # kept: invalidated_elsewhere_since still tells the keys before
            _floor = seq
        elif len(_changed) + len(keys) > _CHANGED_MAX:
            _changed.clear()
            _remote.clear()
            _floor = _forgotten = seq
        else:
            for key in keys:
                _changed[key] = seq
                if remote:
                    _remote[key] = seq
        _seq = seq


def note_invalidated(keys: Sequence[str]) -> None:
    """Note that this process invalidated ``keys``: a walk of another event loop (another
    thread) that began before cannot write what it read or loaded (see ``changed_since``)."""
    _record_changes(keys)


# -- local tiers ----------------------------------------------------------------------------


def _local_storages() -> list[Any]:
    return [s for s in registry.storages().values() if s.local]


def _drop_local(keys: Sequence[str]) -> None:
    # Under the write guard: a walk that checked "changed since?" writes back before this
    # notes the change (and the drop then removes what it wrote), or sees the change.
    with write_guard:
        _record_changes(keys, remote=True)
        for storage in _local_storages():
            discard = getattr(storage, "discard_threadsafe", None)
            if discard is not None:
                discard(keys)


def drop_local(keys: Sequence[str]) -> None:
    """Drop ``keys`` from this process's local tiers and note them as changed by another
    process (any thread; ``repair`` removes what another process's invalidation missed)."""
    _drop_local(keys)


def count_repair(ok: bool) -> None:
    """Count a removal made by ``repair`` (``ok``) or one that failed."""
    if ok:
        _counters.repairs += 1
    else:
        _counters.repair_failures += 1


def _clear_local() -> None:
    with write_guard:  # see _drop_local
        _record_changes(None)
        for storage in _local_storages():
            clear = getattr(storage, "clear_threadsafe", None)
            if clear is not None:
                clear()


def _notify(kind: str, keys: Sequence[str], remote: bool, since: float | None) -> None:
    for listener in _listeners:
        try:
            listener(kind, keys, remote, since)
        except Exception:  # a listener must not break the backplane
            logger.exception("cacheme: backplane listener %r failed", listener)


# -- the backplane --------------------------------------------------------------------------

_STOP: Any = None  # the queue item that stops the publisher
_Sent = Callable[[], None]
_Item = tuple[str, tuple[str, ...], float, "_Sent | None"]  # kind, keys, since, sent


_enabled_before = False  # a backplane was enabled in this process before


class _Backplane:
    def __init__(self, target: _Target, channel: str) -> None:
        self.target = target
        self.channel = channel
        self._init_threading()

    def _init_threading(self) -> None:
        """Fresh queue, events, lock and no threads (at creation and in a forked child)."""
        self.queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        self.fresh = True  # the next subscription needs no clear (enable's first one)
        self.publisher: threading.Thread | None = None
        self.subscriber: threading.Thread | None = None

    def after_fork(self) -> None:
        self._init_threading()
        self.fresh = False  # inherited local data may be stale: clear once subscribed
        self.start_subscriber()

    # -- threads --------------------------------------------------------------------------

    def start_subscriber(self) -> None:
        thread = threading.Thread(
            target=self._subscribe_loop, name="cacheme-backplane-sub", daemon=True
        )
        self.subscriber = thread
        thread.start()

    def start_publisher(self) -> None:
        with self.lock:
            if self.publisher is not None:
                return
            thread = threading.Thread(
                target=self._publish_loop, name="cacheme-backplane-pub", daemon=True
            )
            self.publisher = thread
            thread.start()

    def put(
        self, kind: str, keys: tuple[str, ...], since: float, sent: _Sent | None = None
    ) -> None:
        """Queue ``keys``; ``sent`` is called (from the publisher's thread) once the message
        holding them went out, or failed to (it is then retried, and counted)."""
        if self.publisher is None:
            self.start_publisher()
        self.queue.put((kind, keys, since, sent))

    def close(self) -> list[threading.Thread]:
        """Stop both threads (the publisher sends what is queued first); the threads."""
        self.stop.set()
        self.queue.put(_STOP)
        return [t for t in (self.publisher, self.subscriber) if t is not None]

    # -- publisher ------------------------------------------------------------------------

    def _publish_loop(self) -> None:
        client: Any = None
        retry: dict[str, str] = {}  # key -> kind, of messages that failed
        retry_since = math.inf
        backoff = 0.0
        stopping = False
        while not stopping:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                if self.stop.is_set():
                    break
                if not retry:
                    continue
                item = ("k", (), 0.0, None)
            batches: dict[str, dict[str, None]] = {"i": {}, "k": {}, "r": {}}
            sent: list[_Sent] = []  # to call once this round's messages went out
            since = retry_since  # kind "i": the time of the batch's earliest change
            for key, kind in retry.items():
                batches[kind][key] = None
            retry = {}
            if item is not None and _LINGER:
                time.sleep(_LINGER)
            while True:
                if item is None:  # _STOP
                    stopping = True
                else:
                    batches[item[0]].update(dict.fromkeys(item[1]))
                    if item[0] == "i":
                        since = min(since, item[2])
                    if item[3] is not None:
                        sent.append(item[3])
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            changed = batches["k"]
            for key in batches["i"]:  # changed at the source: says all that "k" says
                changed.pop(key, None)
            for kind, pending in ((k, list(batch)) for k, batch in batches.items()):
                for i in range(0, len(pending), _CHUNK):
                    chunk = pending[i : i + _CHUNK]
                    try:
                        if client is None:
                            client = self.target.client()
                        self._send(client, kind, chunk, since)
                    except Exception as exc:
                        _counters.publish_failures += 1
                        _log(
                            "publish",
                            "cacheme: backplane: cannot publish on storage %r (%s: %s); "
                            "other processes keep these keys until their local TTL or "
                            "their next reconnect",
                            self.target.name,
                            type(exc).__name__,
                            exc,
                        )
                        _close_quietly(client)
                        client = None
                        if kind != "r":
                            if kind == "i":
                                retry_since = min(retry_since, since)
                            for key in chunk:
                                if len(retry) < _RETRY_MAX:
                                    retry[key] = kind
                                else:
                                    _counters.keys_dropped += 1
                        backoff = min(max(backoff * 2, 0.05), _BACKOFF_MAX)
                    else:
                        backoff = 0.0
            for done in sent:
                with contextlib.suppress(Exception):  # its loop closed: nobody waits
                    done()
            if not any(kind == "i" for kind in retry.values()):
                retry_since = math.inf
            if backoff and not stopping:
                self.stop.wait(backoff)
        _close_quietly(client)

    def _send(self, client: Any, kind: str, keys: list[str], since: float) -> None:
        body: Any = [round(since * 1000), _host, keys] if kind == "i" else keys
        payload = f"{_VERSION}|{_instance}|{kind}|{json.dumps(body, separators=(',', ':'))}"
        if self.target.cluster:
            client.spublish(self.channel, payload)
        else:
            client.publish(self.channel, payload)
        _counters.messages_sent += 1
        _counters.keys_sent += len(keys)

    # -- subscriber -----------------------------------------------------------------------

    def _subscribe_loop(self) -> None:
        backoff = 0.05
        while not self.stop.is_set():
            client: Any = None
            pubsub: Any = None
            try:
                client, pubsub = self._subscribe()
                with self.lock:
                    clear, self.fresh = not self.fresh, False
                if clear:
                    _clear_local()
                    _counters.reconnects += 1
                _counters.subscriptions += 1
                self.subscribed.set()
                backoff = 0.05
                self._listen(pubsub)
            except Exception as exc:
                if not self.stop.is_set():
                    _log(
                        "subscribe",
                        "cacheme: backplane: subscription on storage %r lost or refused "
                        "(%s: %s); retrying",
                        self.target.name,
                        type(exc).__name__,
                        exc,
                    )
            finally:
                self.subscribed.clear()
                _close_quietly(pubsub)
                _close_quietly(client)
            if not self.stop.wait(backoff):
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _subscribe(self) -> tuple[Any, Any]:
        """A client and a pubsub whose subscription the server has confirmed."""
        target = self.target
        if target.cluster:
            cluster = target.client()
            try:
                node = cluster.get_node_from_key(self.channel)
                client = target.node_client(node.host, node.port)
            finally:
                _close_quietly(cluster)
        else:
            client = target.client()
        pubsub = client.pubsub()
        try:
            if target.cluster:
                pubsub.ssubscribe(self.channel)
            else:
                pubsub.subscribe(self.channel)
            deadline = time.monotonic() + target.timeout
            while True:
                message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if message is not None and message["type"] in ("subscribe", "ssubscribe"):
                    return client, pubsub
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no subscribe confirmation within {target.timeout:g}s")
        except BaseException:
            _close_quietly(pubsub)
            _close_quietly(client)
            raise

    def _listen(self, pubsub: Any) -> None:
        last_reply = time.monotonic()
        pinged = False
        while not self.stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            now = time.monotonic()
            if message is None:
                if now - last_reply >= _DEAD_AFTER:
                    raise ConnectionError(f"no reply from Redis for {_DEAD_AFTER:g}s")
                if not pinged and now - last_reply >= _PING_EVERY:
                    pubsub.ping()
                    pinged = True
                continue
            last_reply = now
            pinged = False
            kind = message["type"]
            if kind in ("message", "smessage"):
                self._apply(message["data"])
            elif kind in ("unsubscribe", "sunsubscribe"):
                # The server dropped us (e.g. the channel's slot moved): subscribe again.
                raise ConnectionError(f"the server ended the subscription ({kind})")

    def _apply(self, data: bytes) -> None:
        if data.startswith(_own_prefix):  # checked before any parsing: the common case
            _counters.own_ignored += 1
            return
        try:
            version, _, kind, body = data.split(b"|", 3)
            keys = json.loads(body)
            if version != b"%d" % _VERSION or kind not in (b"k", b"i", b"r"):
                raise ValueError(f"unexpected header {data[:60]!r}")
            since = None
            if kind == b"i":  # [since in epoch ms, sender's host, keys]
                if not (isinstance(keys, list) and len(keys) == 3 and type(keys[0]) is int):
                    raise ValueError(f"a change needs [time, host, keys]: {data[:100]!r}")
                # On this host's clock, allowing for another host's.
                since = keys[0] / 1000 - (0.0 if keys[1] == _host else CLOCK_SKEW)
                keys = keys[2]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError(f"keys must be a list of strings: {data[:100]!r}")
        except Exception as exc:
            _counters.bad_messages += 1
            _log("bad", "cacheme: backplane: ignoring a bad message: %s", exc)
            return
        _counters.messages_received += 1
        _counters.keys_received += len(keys)
        if kind != b"r":
            _drop_local(keys)
        _notify(kind.decode(), keys, True, since)


def _close_quietly(thing: Any) -> None:
    if thing is None:
        return
    try:
        thing.close()
    except Exception:
        logger.debug("cacheme: backplane: close failed", exc_info=True)


_active: _Backplane | None = None
enabled = False  # whether a backplane is enabled (the core checks it on each shared write)


# -- the hook the core calls ----------------------------------------------------------------


def publish(keys: Iterable[str], kind: str = "k", since: float | None = None) -> None:
    """Tell the other processes that ``keys`` changed (``kind="i"``: changed at their source,
    by ``invalidate`` or ``refresh``, whose removal or write was issued at wall-clock
    ``since``, ``time.time()`` seconds, now if not given;
    ``"r"``: their lease was released without a value). Never blocks, never raises; a no-op
    when disabled."""
    try:
        batch = tuple(keys)
        if not batch:
            return
        if kind == "i" and since is None:
            since = time.time()
        if _listeners:
            _notify(kind, batch, False, since)
        bp = _active
        if bp is not None:
            bp.put(kind, batch, since if since is not None else 0.0)
    except Exception:  # never fail a caller
        logger.exception("cacheme: backplane: publish failed")


async def flush() -> None:
    """Wait (at most the backplane storage's timeout + 1 s) until what this process's
    backplane has queued now was sent, or failed to be (then it is retried, as ever).

    ``invalidate`` and ``refresh`` return before their message goes out (about a
    millisecond later). What is queued also goes out when the process ends normally, when
    a ``multiprocessing`` worker ends, and in ``close_storages``; a process that is killed
    (``Pool.terminate()`` and the end of a ``with Pool()`` block send SIGTERM) loses it, as
    in a crash: await this first. Never raises (but ``CancelledError``); returns at once
    when the backplane is off."""
    bp = _active
    if bp is None or bp.publisher is None:
        return
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def sent() -> None:
        loop.call_soon_threadsafe(_settle, fut)

    bp.put("k", (), 0.0, sent)
    with contextlib.suppress(asyncio.TimeoutError):  # not the builtin on Python 3.10
        await asyncio.wait_for(fut, bp.target.timeout + 1.0)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _flush_at_exit() -> None:
    """``flush`` for a process that ends: its publisher is a daemon thread, and what it has
    queued (an ``invalidate`` just before the end of a script or a pool worker's task)
    would be lost with it. Run by ``atexit``, and by ``multiprocessing`` in its workers,
    which end with ``os._exit`` (see ``_exit_hooks``)."""
    bp = _active
    if bp is None or bp.publisher is None or not bp.publisher.is_alive():
        return
    sent = threading.Event()
    bp.put("k", (), 0.0, sent.set)
    sent.wait(bp.target.timeout + 1.0)


class _Anchor:
    """What ``multiprocessing.util.register_after_fork`` holds on to (by weak reference)."""


_anchor = _Anchor()
_hooked = False  # _exit_hooks ran in this process


def _exit_hooks() -> None:
    """Have ``_flush_at_exit`` run when this process ends, whichever way Python leaves it:
    ``atexit`` for a normal exit; a ``multiprocessing`` finalizer for a worker process
    (set again in each forked worker, whose finalizers start empty)."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    import atexit
    import multiprocessing.util as mp_util

    atexit.register(_flush_at_exit)
    mp_util.Finalize(None, _flush_at_exit, exitpriority=100)
    mp_util.register_after_fork(_anchor, _hooks_in_worker)


def _hooks_in_worker(_: _Anchor) -> None:
    import multiprocessing.util as mp_util

    mp_util.Finalize(None, _flush_at_exit, exitpriority=100)


# -- public API -----------------------------------------------------------------------------


async def enable_backplane(storage: str, *, channel: str = DEFAULT_CHANNEL) -> None:
    """Keep this process's local tiers coherent with every process on the same channel.

    ``storage`` names a registered Redis storage (standalone or cluster), used as transport
    only. Waits (up to the storage's timeout) for the subscription; if Redis is unreachable
    it keeps trying in the background and clears the local tiers once subscribed. Enabling
    again replaces the previous settings, and clears the local tiers once subscribed (the
    messages sent while no backplane listened were missed).
    """
    global _active, _enabled_before, enabled
    if not isinstance(channel, str) or not channel:
        raise ConfigurationError(
            f"enable_backplane channel must be a non-empty string, got {channel!r}"
        )
    target = target_of(storage, user="enable_backplane")
    await disable_backplane()
    bp = _Backplane(target, channel)
    if _enabled_before:
        # Messages sent while no backplane listened here (or on another channel) were
        # missed: the local tiers are cleared once subscribed, as after a lost link.
        bp.fresh = False
    _enabled_before = True
    _active = bp
    enabled = True
    from . import repair  # noqa: F401  (its listener closes the race on shared tiers)

    landing.keep_landed_writes(True)
    _exit_hooks()
    bp.start_subscriber()
    bp.start_publisher()
    subscribed = await asyncio.get_running_loop().run_in_executor(
        None, bp.subscribed.wait, target.timeout
    )
    if not subscribed:
        with bp.lock:
            clear_later = bp.fresh
            bp.fresh = False
        if clear_later:
            _log(
                "enable",
                "cacheme: backplane: not subscribed on storage %r within %gs; retrying in "
                "the background (local tiers are cleared once subscribed)",
                storage,
                target.timeout,
            )


async def disable_backplane() -> None:
    """Stop publishing and listening (queued keys are sent first). Safe to call twice."""
    global _active, enabled
    bp, _active = _active, None
    enabled = False
    landing.keep_landed_writes(False)
    if bp is None:
        return
    threads = bp.close()
    loop = asyncio.get_running_loop()
    for thread in threads:
        await loop.run_in_executor(None, thread.join, bp.target.timeout + 1.0)


def stats() -> BackplaneStats:
    """A snapshot of the backplane's counters."""
    bp = _active
    c = _counters
    return BackplaneStats(
        enabled=bp is not None,
        storage=bp.target.name if bp is not None else None,
        channel=bp.channel if bp is not None else None,
        instance_id=_instance,
        subscribed=bp is not None and bp.subscribed.is_set(),
        messages_sent=c.messages_sent,
        keys_sent=c.keys_sent,
        publish_failures=c.publish_failures,
        keys_dropped=c.keys_dropped,
        messages_received=c.messages_received,
        keys_received=c.keys_received,
        own_ignored=c.own_ignored,
        bad_messages=c.bad_messages,
        subscriptions=c.subscriptions,
        reconnects=c.reconnects,
        repairs=c.repairs,
        repair_failures=c.repair_failures,
    )


backplane_stats = stats  # the names cacheme/__init__.py exports
flush_backplane = flush


def storage_name() -> str | None:
    """The storage the backplane runs on (the default storage of leases), or ``None``."""
    bp = _active
    return bp.target.name if bp is not None else None


def add_listener(listener: Listener) -> None:
    if listener not in _listeners:
        _listeners.append(listener)


def _after_fork_in_child() -> None:
    global _instance, _own_prefix, _counters, _sync_lock, _changes_lock, write_guard
    _instance = uuid.uuid4().hex
    _own_prefix = f"{_VERSION}|{_instance}|".encode()
    # A lock another thread of the parent held at the fork stays held in the child forever
    # (that thread is not in the child): every lock starts afresh.
    _sync_lock = threading.Lock()
    _changes_lock = threading.Lock()
    write_guard = threading.Lock()
    _counters = _Counters()
    _sync_clients.clear()
    # The table of changes and its sequence go on from the parent's: marks taken in the
    # parent (values kept for stale-if-error, a walk under way in a loop that runs on in
    # the child) compare with the child's changes as in the parent.
    _removing.clear()  # the parent's invalidations under way: they end in the parent
    bp = _active
    if bp is not None:
        bp.after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
