"""``get``, ``get_all``, ``invalidate``, ``refresh``: the walk over a node's tiers.

``get`` builds the key once, answers from the leading local tiers without awaiting anything,
and otherwise joins or starts the key's flight (see ``flight``). A flight reads the tiers left
to right (local again, then remote: the value may have landed meanwhile), loads what no tier
had, writes each value back to the tiers that missed it, each with its own TTL, and hands the
outcome to every waiter. Remote tiers fail open by default: an error or timeout counts as a
miss of that tier (counted and logged) and the walk goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from . import node as _node
from .errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    LoadError,
    LoadTimeoutError,
    StorageError,
    StorageTimeoutError,
)
from .flight import Call, flights
from .node import Config, Node, Tier
from .stats import NodeStats
from .storages import registry
from .storages.base import Entry, RemoteStorage

logger = logging.getLogger("cacheme")

N = TypeVar("N", bound=Node)
Loader = Callable[[], Awaitable[Any]]

_STALE_KEEP = 10_000  # last-good values kept per node for stale-if-error


def config_of(node_cls: type[Node]) -> Config:
    cfg = node_cls._cacheme_config
    if cfg.generation != registry.generation:
        cfg.resolve()
    return cfg


def full_key(cfg: Config, node: Node) -> str:
    key = node.key()
    if type(key) is not str:
        raise ConfigurationError(
            f"{cfg.name}.key() must return str, got {type(key).__name__} {key!r}"
        )
    return f"{_node._prefix}:{key}:{cfg.version}"


async def get(node: Node, load_fn: Loader | None = None) -> Any:
    """The node's value: from the first tier that has it, else loaded once per burst.

    ``load_fn`` (a zero-argument coroutine function) replaces ``node.load`` for this call.
    """
    return await fetch(node, type(node)._cacheme_config, load_fn)


async def fetch(node: Node, cfg: Config, loader: Loader | None) -> Any:
    """``get`` with the node's configuration given (Memoize passes a built class's)."""
    if cfg.generation != registry.generation:
        cfg.resolve()
    key = full_key(cfg, node)
    rec = cfg.stats
    rec.requests += 1
    if cfg.front:
        value = _front_get(cfg, key)
        if value is not _MISS:
            rec.hits += 1
            return value
    call = flights.get(key)
    if call is None:
        call = flights.start(key)
        flights.run(_flight(cfg, {key: node}, {key: call}, loader))
    else:
        rec.coalesced += 1
    value, hit = await call.join()
    if hit:
        rec.hits += 1
    return value


async def get_all(nodes: Sequence[N]) -> list[Any]:
    """Values of ``nodes`` (one node class), in input order, duplicates kept.

    Misses share flights with concurrent ``get``s; the remote tiers are read in one batch and
    what they lack is loaded through ``load_all``.
    """
    nodes = list(nodes)
    if not nodes:
        return []
    cls = type(nodes[0])
    for other in nodes:
        if type(other) is not cls:
            raise ConfigurationError(
                f"get_all takes nodes of one class, got {cls.__qualname__} and "
                f"{type(other).__qualname__}"
            )
    cfg = config_of(cls)
    keys = [full_key(cfg, n) for n in nodes]
    rec = cfg.stats
    rec.requests += len(nodes)
    results: list[Any] = [None] * len(nodes)
    pending: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        value = _front_get(cfg, key) if cfg.front else _MISS
        if value is _MISS:
            pending.setdefault(key, []).append(i)
        else:
            rec.hits += 1
            results[i] = value
    if not pending:
        return results
    calls: dict[str, Call] = {}
    started: dict[str, Node] = {}
    for key, where in pending.items():
        call = flights.get(key)
        if call is None:
            call = flights.start(key)
            started[key] = nodes[where[0]]
            rec.coalesced += len(where) - 1
        else:
            rec.coalesced += len(where)
        calls[key] = call
    if started:
        flights.run(_flight(cfg, started, {k: calls[k] for k in started}, None))
    # Plain futures: gather wraps none of them in a task.
    outcomes = await asyncio.gather(*[calls[k].join() for k in pending])
    for where, (value, hit) in zip(pending.values(), outcomes, strict=True):
        for i in where:
            results[i] = value
        if hit:
            rec.hits += len(where)
    return results


_MISS: Any = object()


def _front_get(cfg: Config, key: str) -> Any:
    """The value of ``key`` in the leading local tiers (copied into the ones before the tier
    that had it), or ``_MISS``. Synchronous: this is the hot path."""
    front = cfg.front
    for local in front:
        value, found = local.get(key)
        if found:
            if local is not front[0]:
                for tier in cfg.tiers:
                    if tier.storage is local:
                        break
                    tier.storage.set(key, value, tier.ttl)  # type: ignore[attr-defined]
            return value
    return _MISS


async def invalidate(node: Node) -> None:
    """Remove the node's key from every tier; a load in flight will not write it back.

    Every tier is tried. If a remote tier could not remove the key, ``StorageError`` is
    raised afterwards, whatever ``fail_open`` says: a lost invalidation would let the old
    value be served again once the tier is back, so the caller must know.
    """
    cfg = config_of(type(node))
    key = full_key(cfg, node)
    flights.forget(key)
    cfg.last_good.pop(key, None)
    removals = []
    for tier in cfg.tiers:
        storage = tier.storage
        if isinstance(storage, RemoteStorage):
            removals.append((storage, storage.remove_many((key,))))
        else:
            storage.remove(key)  # type: ignore[attr-defined]
    if not removals:
        return
    outcomes = await asyncio.gather(*(op for _, op in removals), return_exceptions=True)
    failed: list[tuple[RemoteStorage[Any], StorageError]] = []
    for (storage, _), outcome in zip(removals, outcomes, strict=True):
        if isinstance(outcome, StorageError):
            _count_storage_failure(cfg, outcome)
            failed.append((storage, outcome))
        elif isinstance(outcome, BaseException):
            raise outcome
    if failed:
        names = ", ".join(repr(storage.name) for storage, _ in failed)
        raise StorageError(
            f"invalidate of node {cfg.name} key {key!r}: storage {names} could not remove it "
            f"({failed[0][1]})"
        ) from failed[0][1]


async def refresh(node: Node) -> Any:
    """Load the node again (bypassing every tier), store it in every tier, and return it."""
    cfg = config_of(type(node))
    key = full_key(cfg, node)
    flights.forget(key)
    call = flights.start(key)
    flights.run(_flight(cfg, {key: node}, {key: call}, None, read=False))
    value, _ = await call.join()
    return value


def stats(node_cls: type[Node]) -> NodeStats:
    """A snapshot of ``node_cls``'s counters."""
    if not (isinstance(node_cls, type) and issubclass(node_cls, Node)):
        raise ConfigurationError(f"stats() takes a node class, got {node_cls!r}")
    return node_cls._cacheme_config.stats.snapshot()


# -- the flight ---------------------------------------------------------------------------


async def _flight(
    cfg: Config,
    nodes: dict[str, Node],
    calls: dict[str, Call],
    loader: Loader | None,
    *,
    read: bool = True,
) -> None:
    """Fetch ``nodes`` (by full key) and settle ``calls``; every call is settled, always."""
    try:
        values: dict[str, Any] = {}
        hits: set[str] = set()
        backfill: dict[int, list[str]] = {}
        failed_tiers: set[int] = set()
        missing = list(nodes)
        if read:
            for i, tier in enumerate(cfg.tiers):
                if not missing:
                    break
                found = await _read_tier(cfg, tier, missing)
                if found is None:
                    failed_tiers.add(i)
                    continue
                if found:
                    values.update(found)
                    hits.update(found)
                    for j in range(i):
                        if j not in failed_tiers:
                            backfill.setdefault(j, []).extend(found)
                    missing = [k for k in missing if k not in found]
        errors: dict[str, BaseException] = {}
        if missing:
            loaded, stale, errors = await _load(cfg, {k: nodes[k] for k in missing}, loader)
            values.update(stale)
            values.update(loaded)
            keeper = cfg.doorkeeper if read else None
            admitted = [k for k in loaded if keeper is None or keeper.admit(k)]
            for j in range(len(cfg.tiers)):
                if j not in failed_tiers:
                    backfill.setdefault(j, []).extend(admitted)
        if backfill:
            errors.update(await _write_back(cfg, backfill, values, calls))
        for key, call in calls.items():
            if key in errors:
                flights.fail(key, call, errors[key])
            else:
                flights.settle(key, call, (values[key], key in hits))
    except BaseException as exc:
        for key, call in calls.items():
            flights.fail(key, call, exc)
        if not isinstance(exc, Exception):
            raise


async def _read_tier(cfg: Config, tier: Tier, keys: list[str]) -> dict[str, Any] | None:
    """Values ``tier`` holds for ``keys``; ``None`` when a fail-open tier failed."""
    storage = tier.storage
    if not isinstance(storage, RemoteStorage):
        found = {}
        for key in keys:
            value, ok = storage.get(key)  # type: ignore[attr-defined]
            if ok:
                found[key] = value
        return found
    try:
        raw = await storage.get_many(keys)
    except StorageError as exc:
        _storage_failed(cfg, storage, exc, "read")
        return None
    serializer = cfg.serializer
    assert serializer is not None  # Config.resolve guarantees it for remote tiers
    values = {}
    for key, data in raw.items():
        try:
            values[key] = serializer.loads(data, cfg.value_type)
        except DecodeError as exc:
            cfg.stats.decode_errors += 1
            _warn(
                storage.name,
                cfg.name,
                "decode",
                f"cacheme: node {cfg.name}: entry {key!r} in storage {storage.name!r} "
                f"cannot be decoded ({exc}); reloading it",
            )
    return values


async def _write_back(
    cfg: Config, backfill: dict[int, list[str]], values: dict[str, Any], calls: dict[str, Call]
) -> dict[str, BaseException]:
    """Write ``values`` to the tiers that missed them; encode errors by key."""
    errors: dict[str, BaseException] = {}
    encoded: dict[str, bytes] = {}
    serializer = cfg.serializer
    for j, keys in backfill.items():
        if cfg.tiers[j].local or serializer is None:
            continue
        for key in keys:
            if key in encoded or key in errors:
                continue
            try:
                encoded[key] = serializer.dumps(values[key])
            except EncodeError as exc:
                errors[key] = EncodeError(f"node {cfg.name}: {exc}")
    remote_writes = []
    for j, keys in backfill.items():
        tier = cfg.tiers[j]
        # A call forgotten by invalidate()/refresh() must not write back.
        live = [k for k in keys if k not in errors and not _is_stale(calls, k)]
        if not live:
            continue
        storage = tier.storage
        if isinstance(storage, RemoteStorage):
            entries = [Entry(k, encoded[k], tier.ttl_ms) for k in live]
            remote_writes.append(_write_tier(cfg, storage, entries))
        else:
            for key in live:
                storage.set(key, values[key], tier.ttl)  # type: ignore[attr-defined]
    if len(remote_writes) == 1:
        await remote_writes[0]
    elif remote_writes:
        await asyncio.gather(*remote_writes)
    return errors


def _is_stale(calls: dict[str, Call], key: str) -> bool:
    call = calls.get(key)
    return call is not None and call.stale


async def _write_tier(cfg: Config, storage: RemoteStorage[Any], entries: list[Entry]) -> None:
    try:
        await storage.set_many(entries)
    except StorageError as exc:
        _storage_failed(cfg, storage, exc, "write")


async def _load(
    cfg: Config, nodes: dict[str, Node], loader: Loader | None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, BaseException]]:
    """Load ``nodes``: ``(loaded, stale, errors)`` by key."""
    outcomes: dict[str, Any] = {}
    first = next(iter(nodes.values()))
    cls = type(first)
    if loader is not None:
        key = next(iter(nodes))
        outcomes[key] = await _timed(cfg, loader, 1)
    elif len(nodes) > 1 and cls.load_all.__func__ is not Node.load_all.__func__:  # type: ignore[attr-defined]
        batch = await _timed(cfg, lambda: cls.load_all(list(nodes.values())), len(nodes))
        if isinstance(batch, BaseException):
            outcomes = dict.fromkeys(nodes, batch)
        else:
            outcomes = _match(cfg, cls, nodes, batch)
    elif len(nodes) == 1:
        key, node = next(iter(nodes.items()))
        outcomes[key] = await _timed(cfg, node.load, 1)
    else:
        results = await asyncio.gather(*(_timed(cfg, n.load, 1) for n in nodes.values()))
        outcomes = dict(zip(nodes, results, strict=True))
    loaded: dict[str, Any] = {}
    stale: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    now = time.monotonic()
    for key, outcome in outcomes.items():
        if not isinstance(outcome, BaseException):
            loaded[key] = outcome
            if cfg.stale_if_error is not None:
                _remember(cfg, key, outcome, now)
            continue
        kept = cfg.last_good.get(key)
        if kept is not None and kept[1] > now:
            cfg.stats.stale += 1
            stale[key] = kept[0]
            logger.warning(
                "cacheme: node %s: load of %r failed (%r); serving the stale value",
                cfg.name,
                key,
                outcome,
            )
        else:
            errors[key] = outcome
    return loaded, stale, errors


def _remember(cfg: Config, key: str, value: Any, now: float) -> None:
    assert cfg.stale_if_error is not None
    kept = cfg.last_good
    kept[key] = (value, now + cfg.stale_if_error.total_seconds())
    kept.move_to_end(key)
    if len(kept) > _STALE_KEEP:
        kept.popitem(last=False)


def _match(cfg: Config, cls: type[Node], nodes: dict[str, Node], pairs: Any) -> dict[str, Any]:
    """Map ``load_all``'s ``(node, value)`` pairs back to keys; a left-out node is an error."""
    out: dict[str, Any] = {}
    try:
        for got, value in pairs:
            if not isinstance(got, Node):
                raise TypeError(f"{got!r} is not a node")
            out[full_key(cfg, got)] = value
    except (TypeError, ValueError) as exc:
        error = LoadError(f"{cls.__qualname__}.load_all must return (node, value) pairs: {exc}")
        cfg.stats.load_successes -= len(nodes)
        cfg.stats.load_failures += len(nodes)
        return dict.fromkeys(nodes, error)
    left_out = [k for k in nodes if k not in out]
    if left_out:
        error = LoadError(
            f"{cls.__qualname__}.load_all returned no value for {len(left_out)} node(s), "
            f"e.g. key {left_out[0]!r}"
        )
        cfg.stats.load_successes -= len(left_out)
        cfg.stats.load_failures += len(left_out)
        for key in left_out:
            out[key] = error
    return {k: out[k] for k in nodes}


async def _timed(cfg: Config, fn: Callable[[], Awaitable[Any]], count: int) -> Any:
    """Run one load (of ``count`` nodes) with the node's timeout; the exception is returned."""
    rec = cfg.stats
    start = time.perf_counter_ns()
    try:
        if cfg.load_timeout is None:
            value = await fn()
        else:
            try:
                value = await asyncio.wait_for(fn(), cfg.load_timeout)
            except asyncio.TimeoutError:
                raise LoadTimeoutError(
                    f"node {cfg.name}: load took longer than {cfg.load_timeout:g}s"
                ) from None
    except Exception as exc:
        rec.load_failures += count
        rec.load_time_ns += time.perf_counter_ns() - start
        return exc
    rec.load_successes += count
    rec.load_time_ns += time.perf_counter_ns() - start
    return value


def _storage_failed(cfg: Config, storage: RemoteStorage[Any], exc: StorageError, op: str) -> None:
    """Count a tier failure for the node; re-raise it if the tier fails closed."""
    _count_storage_failure(cfg, exc)
    if not storage.options.fail_open:
        raise exc
    _warn(
        storage.name,
        cfg.name,
        op,
        f"cacheme: node {cfg.name}: {op} on storage {storage.name!r} failed, going on "
        f"without it: {exc}",
    )


def _count_storage_failure(cfg: Config, exc: StorageError) -> None:
    if isinstance(exc, StorageTimeoutError):
        cfg.stats.storage_timeouts += 1
    else:
        cfg.stats.storage_errors += 1


_last_warned: dict[tuple[str, str, str], float] = {}


def _warn(storage: str, node: str, op: str, message: str) -> None:
    """Log a warning at most once a second per (storage, node, op); the rest at debug."""
    now = time.monotonic()
    marker = (storage, node, op)
    if now - _last_warned.get(marker, -1.0) >= 1.0:
        _last_warned[marker] = now
        logger.warning(message)
    else:
        logger.debug(message)
