"""``get``, ``get_all``, ``invalidate``, ``refresh``, ``stats``: the public calls.

``get`` builds the key once and answers from the leading local tiers without awaiting
anything (the hot path). Otherwise it joins the key's flight in the running event loop, or
starts one: a ``Walk`` (see ``walk``) reads the remaining tiers, loads what none had, writes
the values back and settles every waiter. Counting follows the rules in ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar, overload

from . import backplane, freshness, landing, refreshes, runtime, tags
from . import node as _node
from .errors import ConfigurationError, StorageError
from .flight import (
    LOADED,
    STALE,
    Call,
    Outcome,
    Reload,
    forgettable,
    join_all,
    propagates,
)
from .metrics import StatsSnapshot, snapshot
from .node import Config, Node
from .stats import NodeStats, Recorder
from .storages import registry
from .storages.base import MISS, retrieve_outcome
from .tiers import failures, raised
from .walk import KeyWalk, Loader, Walk

N = TypeVar("N", bound=Node)


def config_of(node_cls: type[Node]) -> Config:
    cfg = node_cls._cacheme_config
    if cfg.generation != registry.generation:
        cfg.resolve()
    return cfg


def node_config(node: object, call: str) -> Config:
    """The configuration of ``node``'s class, resolved; ``ConfigurationError`` naming what was
    passed to ``call`` when it is not a node instance."""
    cfg: Config | None = getattr(type(node), "_cacheme_config", None)
    if cfg is None:
        raise not_a_node(node, call)
    if cfg.generation != registry.generation:
        cfg.resolve()
    return cfg


def not_a_node(node: object, call: str) -> ConfigurationError:
    hint = ""
    if isinstance(node, type) and issubclass(node, Node):
        hint = f" (that is a node class: pass an instance, such as {node.__qualname__}(...))"
    return ConfigurationError(
        f"{call}() takes an instance of a cacheme.Node subclass, got {node!r}{hint}"
    )


def full_key(cfg: Config, node: Node) -> str:
    return _node.whole_key(cfg.name, node.key(), cfg.version)


def get(
    node: Node, load_fn: Callable[[Any], Awaitable[Any]] | None = None
) -> Coroutine[Any, Any, Any]:
    """The node's value: from the first tier that has it, else loaded once per burst.

    Use it as ``await cacheme.get(node)``. ``load_fn``, if given, replaces ``node.load`` for
    this call: it is called as ``await load_fn(node)``, as in cacheme 0.3.0. Raises
    ``ConfigurationError`` for a node class without tiers of its own (a bare
    ``DynamicNode``), and whatever the load raises.
    """
    # A plain function returning the coroutine: one coroutine frame per get, not two.
    if load_fn is not None and not callable(load_fn):
        raise ConfigurationError(
            f"get({node!r}, load_fn=...) takes an async function of the node, got {load_fn!r}"
        )
    loader = None if load_fn is None else _bind(load_fn, node)
    try:
        cfg = type(node)._cacheme_config
    except AttributeError:
        raise not_a_node(node, "get") from None
    return fetch(node, cfg, loader)


def _bind(load_fn: Callable[[Any], Awaitable[Any]], node: Node) -> Loader:
    return lambda: load_fn(node)


async def fetch(node: Node, cfg: Config, loader: Loader | None) -> Any:
    """``get`` with the node's configuration given (``Memoize`` passes its own)."""
    if cfg.generation != registry.generation:
        cfg.resolve()
    key = node.key()
    if type(key) is not str:
        full_key(cfg, node)  # raises, naming the node
    key = f"{cfg.key_head}{key}{cfg.key_tail}"
    if cfg.stamped:  # refresh-ahead, negative entries, tags...: see freshness
        return await freshness.fetch(node, cfg, loader, key)
    rec = cfg.stats
    peek = cfg.peek  # the first tier's lookup when it answers at once (the hot path)
    if peek is not None:
        value = peek(key)
        if value is not MISS:
            rec.peek_hits += 1  # a request, and a hit of tier 0
            return value
        rec.requests += 1
        mark = backplane.sequence()  # before the reads: see _copy_forward
        for tier in cfg.front[1:]:
            value = tier.peek(key)
            if value is not MISS:
                rec.hits += 1
                rec.tier_hits[tier.index] += 1
                _copy_forward(cfg, tier.index, key, value, mark)
                return value
    else:
        rec.requests += 1
    # Every local of this frame stays alive while it waits, and the garbage collector walks
    # them on each young collection (thousands of waiting gets under load): the flight's
    # bookkeeping lives in a function of its own.
    waiter = _join(node, cfg, loader, key, rec)
    del node, loader  # a joiner's node is not needed while it waits: let it go now
    value, source = await waiter
    if source >= 0:
        rec.hits += 1
        rec.tier_hits[source] += 1
    elif source == STALE:
        rec.stale += 1
    return value


def _join(
    node: Node, cfg: Config, loader: Loader | None, key: str, rec: Recorder
) -> Awaitable[Outcome]:
    """What a ``get`` that missed the front tiers awaits: the key's flight, joined or begun."""
    rt = runtime.current()
    flights = rt.flights
    call = flights.get(key)
    if call is not None and not call.detached:  # see _forget_elsewhere
        rec.coalesced += 1
        return call.join(rt.loop)
    if cfg.lease is None:
        walk = KeyWalk(key, cfg, rt, node, loader)
        flights.put(key, walk)
        return walk.begin(len(cfg.front))
    call = flights.start(key, cfg.tag_space)
    waiter = call.join(rt.loop)
    Walk(cfg, rt, {key: node}, {key: call}, loader).start()
    return waiter


def _one_family(nodes: Sequence[Node], cfg: Config) -> bool:
    """Whether ``nodes`` of several classes all use one node class's configuration: that
    class's instances and the nodes of functions memoized with it (``Memoized.node``)."""
    owner = cfg.owner
    return owner is not None and all(
        getattr(type(n), "_cacheme_config", None) is not None
        and type(n)._cacheme_config.owner is owner
        for n in nodes
    )


async def _by_class(nodes: Sequence[Node]) -> list[Any]:
    """``get_all`` of one class's nodes and its memoized functions' nodes: each class's
    share with its own configuration (the function's value type), at once; input order."""
    positions: dict[type[Node], list[int]] = {}
    for i, node in enumerate(nodes):
        positions.setdefault(type(node), []).append(i)
    shares = list(positions.values())
    values = await asyncio.gather(*(get_all([nodes[i] for i in share]) for share in shares))
    results: list[Any] = [None] * len(nodes)
    for share, got in zip(shares, values, strict=True):
        for i, value in zip(share, got, strict=True):
            results[i] = value
    return results


def _copy_forward(cfg: Config, index: int, key: str, value: Any, mark: int) -> None:
    """A front tier after the first had ``key``: copy it into the ones before, unless the
    key changed since ``mark`` (taken before the read: an ``invalidate``, ``refresh`` or
    backplane drop, in another thread, may have come between the read and this copy)."""
    with backplane.write_guard:  # see its comment
        if backplane.changed_since(key, mark):
            return
        for tier in cfg.front[:index]:
            tier.write({key: value})


async def get_all(nodes: Sequence[N]) -> list[Any]:
    """Values of ``nodes`` (one node class), in input order, duplicates kept.

    Misses share flights with concurrent ``get``s; the remote tiers are read in one batch and
    what they lack is loaded through ``load_all``.
    """
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Iterable):
        raise ConfigurationError(f"get_all() takes a sequence of nodes, got {nodes!r}")
    nodes = list(nodes)
    if not nodes:
        return []
    cls = type(nodes[0])
    cfg = node_config(nodes[0], "get_all")
    if len(set(map(type, nodes))) > 1:
        if _one_family(nodes, cfg):
            return await _by_class(nodes)
        other = next(n for n in nodes if type(n) is not cls)
        raise ConfigurationError(
            f"get_all takes nodes of one class, got {cls.__qualname__} and "
            f"{type(other).__qualname__}"
        )
    names = [n.key() for n in nodes]
    if set(map(type, names)) != {str}:
        wrong = next(i for i, name in enumerate(names) if type(name) is not str)
        full_key(cfg, nodes[wrong])  # raises, naming the node
    head, tail = cfg.key_head, cfg.key_tail
    keys = [f"{head}{name}{tail}" for name in names]
    if cfg.stamped:
        return await freshness.get_all(nodes, cfg, keys)  # type: ignore[arg-type]
    rec = cfg.stats
    rec.requests += len(nodes)
    results: list[Any] = [None] * len(nodes)
    front = cfg.front
    if not front:  # a chain that starts remote: every position goes to the flights
        missed = list(range(len(keys)))
    else:
        missed = []  # positions the front tiers did not answer
        mark = backplane.sequence()  # before the reads: see _copy_forward
        for i, key in enumerate(keys):
            for tier in front:
                value = tier.peek(key)
                if value is not MISS:
                    rec.hits += 1
                    rec.tier_hits[tier.index] += 1
                    if tier.index:
                        _copy_forward(cfg, tier.index, key, value, mark)
                    results[i] = value
                    break
            else:
                missed.append(i)
        if not missed:
            return results
    rt = runtime.current()
    # A node for each key missed, in first-seen order (of equal keys, any node will do).
    by_key: dict[str, Node]
    if len(missed) == len(keys):
        by_key = dict(zip(keys, nodes, strict=True))
    else:
        by_key = {keys[i]: nodes[i] for i in missed}
    calls, outcome = join_all(rt.flights, by_key, cfg.tag_space, rt.loop)
    # Every request that missed the front tiers joined a flight, except one per flight begun.
    rec.coalesced += len(missed) - len(calls)
    if calls:
        started = by_key if len(calls) == len(by_key) else {k: by_key[k] for k in calls}
        walk = Walk(cfg, rt, started, calls, None)
        direct = walk.begin(len(front))
        if direct is not None:
            try:
                await direct
            except BaseException:
                outcome.cancel()  # this caller is gone: what the walk settles goes nowhere
                raise
    outcomes = await outcome
    tier_hits = rec.tier_hits
    hits = 0
    for i in missed:
        value, source = outcomes[keys[i]]
        results[i] = value
        if source >= 0:
            hits += 1
            tier_hits[source] += 1
        elif source == STALE:
            rec.stale += 1
    rec.hits += hits
    return results


async def invalidate(node: Node, cfg: Config | None = None) -> None:
    """Remove the node's key from every tier; a load in flight will not write it back.

    Every tier is tried. If a remote tier could not remove the key, ``StorageError`` is
    raised afterwards, whatever ``fail_open`` says: a lost invalidation would let the old
    value be served again once the tier is back, so the caller must know. Raises
    ``ConfigurationError`` for a node without tiers (nothing could be invalidated). (``cfg``
    is for ``Memoize``: the configuration to use instead of the node class's.)
    """
    if cfg is None:
        cfg = node_config(node, "invalidate")
    elif cfg.generation != registry.generation:
        cfg.resolve()
    if not cfg.tiers:
        raise ConfigurationError(
            f"invalidate({node!r}): node {cfg.name} has no tiers (Meta.caches is empty), "
            "so nothing can be invalidated"
        )
    key = full_key(cfg, node)
    _forget_everywhere(key)
    # Until the removals landed, no walk writes the key back (see backplane.removing); the
    # bound holds should _remove never end (its loop closed): its waits and round trips.
    removal = backplane.begin_removal(key, 1.0 + 3 * max(wait_bound(cfg), 1.0))
    try:
        writes = note_changed(key)
    except BaseException:
        backplane.end_removal(key, removal)
        raise
    if not writes:
        await _remove(cfg, key, writes, removal)  # the removals are queued before it awaits
        return
    # In a task of the loop, shielded: a caller cancelled while this waits for other loops'
    # writes (a request's timeout) does not call the invalidation off.
    task = runtime.current().spawn(_remove(cfg, key, writes, removal))
    # Its error reaches the caller if it still waits (its tier logged it anyway).
    task.add_done_callback(retrieve_outcome)
    await asyncio.shield(task)


async def _remove(cfg: Config, key: str, writes: list[landing.Write], removal: float) -> None:
    """``invalidate`` of ``key``, once noted (``removal``: ``backplane.begin_removal``'s):
    wait for ``writes``, then remove it everywhere."""
    try:
        await _remove_noted(cfg, key, writes)
    finally:
        backplane.end_removal(key, removal)


async def _remove_noted(cfg: Config, key: str, writes: list[landing.Write]) -> None:
    if writes:
        await landing.wait(key, writes, wait_bound(cfg))
    if cfg.stamped:
        freshness.forget(key)  # a background reload under way must not write it back
    cfg.last_good.pop(key, None)
    since = time.time()  # just before the removals: for the other processes' repairs
    removals = []
    for tier in cfg.tiers:
        try:
            pending = tier.remove((key,))
        except StorageError as exc:
            pending = raised(exc)
        if pending is not None:
            removals.append((tier, pending))
    failed = await failures(cfg, removals) if removals else []
    # Once the remote removals landed, drop the key from the local tiers again: a loop of
    # another thread may have read the old remote value before they landed and put it back,
    # or copied it from a later local tier before its removal (and a walk begun before this
    # point writes nothing: see backplane.changed_since).
    with backplane.write_guard:  # see its comment
        backplane.note_invalidated((key,))
        for tier in cfg.tiers:
            if tier.immediate:
                tier.remove((key,))
    # A flight begun while the removals were under way (in another loop, or in this one
    # while it waited for other loops' writes) may have read the old value: no request
    # made after this returns may join it. A refresh begun meanwhile read nothing: it stays.
    _forget_everywhere(key, readers_only=True)
    backplane.publish((key,), kind="i", since=since)
    if failed:
        names = ", ".join(repr(name) for name, _ in failed)
        raise StorageError(
            f"invalidate of node {cfg.name} key {key!r}: storage {names} could not remove it "
            f"({failed[0][1]})"
        ) from failed[0][1]


def note_changed(key: str) -> list[landing.Write]:
    """Note ``key`` as changed (a walk of any loop begun before writes nothing back to it;
    one begun after takes a later mark), and return the remote writes of it decided before,
    not landed yet (see ``landing``): what ``invalidate`` and ``refresh`` wait for before
    they touch the tiers."""
    with backplane.write_guard:  # see its comment
        backplane.note_invalidated((key,))
        return landing.of(key)


def wait_bound(cfg: Config) -> float:
    """Seconds to wait for other loops' writes: twice the slowest tier's timeout."""
    return 2 * max((t.op_timeout() for t in cfg.tiers), default=0.0)


def _forget_everywhere(key: str, readers_only: bool = False) -> Call | None:
    """Detach ``key``'s flight in this loop and in the loops of other threads
    (``readers_only``: see ``flight.forgettable``); the call detached in this loop, if any."""
    here = runtime.current()
    forgotten = here.flights.forget(key, readers_only)
    _forget_elsewhere(key, here, readers_only)
    return forgotten


def start_refresh(rt: runtime.Runtime, key: str, cfg: Config) -> Reload:
    """Register a ``refresh`` of ``key``: detach its flights in every loop (their values
    are not written) and start its ``Reload``, which a get from now on joins; a refresh
    of this loop it overtakes learns its outcome (``latest``)."""
    overtaken = _forget_everywhere(key)
    call = rt.flights.start(key, cfg.tag_space, Reload)
    assert isinstance(call, Reload)
    if isinstance(overtaken, Reload):
        overtaken.overtaken_by = call
    return call


def detach_node_everywhere(owner: str) -> None:
    """Let no new request join a flight of the node named ``owner``, in any loop:
    ``invalidate_tag`` and ``invalidate_node`` (see ``Flights.detach_owner``)."""
    here = runtime.current()
    here.flights.detach_owner(owner)
    for rt in runtime.live():
        if rt is here or rt.closed:
            continue
        for key, call in rt.flights.items():
            if call.owner == owner:
                call.detached = True
                _drop_soon(rt, key, call)


def _drop_soon(rt: runtime.Runtime, key: str, call: Call) -> None:
    """Have ``rt``'s loop drop ``call`` from its table in a turn of its own."""
    loop = rt.loop
    if loop.is_running() and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(rt.flights.drop, key, call)


def _forget_elsewhere(key: str, here: runtime.Runtime, readers_only: bool = False) -> None:
    """Mark ``key``'s flight of every other loop stale now, so that no request made after
    this returns joins it; each loop drops it from its table in a turn of its own (the
    table is that loop's: from here, it is only read)."""
    for rt in runtime.live():
        if rt is here or rt.closed:
            continue
        call = rt.flights.get(key)
        if call is None or not forgettable(call, readers_only):
            continue
        call.stale = call.detached = True
        _drop_soon(rt, key, call)


async def refresh(node: Node) -> Any:
    """Load the node again (bypassing every tier), store it in every tier, and return it.

    Raises what the load raises; and ``StorageError`` when a remote tier did not take the
    new value, whatever its ``fail_open`` says (as ``invalidate`` does): that tier may go on
    serving the old value to other processes, so the caller must know. The tiers that did
    take it keep it, and callers who joined the refresh get it.
    """
    return await reload(node, node_config(node, "refresh"), None)


async def reload(node: Node, cfg: Config, loader: Loader | None) -> Any:
    """``refresh`` with the configuration and loader given (``Memoize`` passes its own)."""
    if cfg.generation != registry.generation:
        cfg.resolve()
    key = full_key(cfg, node)
    if cfg.stamped:
        return await freshness.reload(node, cfg, loader, key)
    began = time.time()
    rt = runtime.current()
    call = start_refresh(rt, key, cfg)
    waiter = call.join()
    writes = note_changed(key)
    if writes:  # wait in a task of the loop: a cancelled caller cancels only its own wait

        async def reload_after_writes() -> None:
            try:
                await landing.wait(key, writes, wait_bound(cfg))
                Walk(cfg, rt, {key: node}, {key: call}, loader).reload()
            except BaseException as exc:
                rt.flights.fail(key, call, exc)
                if propagates(exc):
                    raise

        rt.spawn(reload_after_writes())
    else:
        Walk(cfg, rt, {key: node}, {key: call}, loader).reload()
    outcome = await own_outcome(call, waiter)
    (value, source), final = await latest(rt, call, outcome, node, cfg, loader)
    if source == STALE:
        cfg.stats.stale += 1
    # For the other processes' repairs: a write of theirs that landed before this refresh
    # wrote is overwritten by it (see repair).
    backplane.publish((key,), kind="i", since=_written_at(call, began))
    raise_missed_write(final)
    return value


def raise_missed_write(call: Call) -> None:
    """Raise the ``StorageError`` of a refresh whose new value a shared tier did not take
    (``Reload.write_error``), unless a newer refresh or invalidation overtook it."""
    if isinstance(call, Reload) and call.write_error is not None and not call.stale:
        raise call.write_error


def _written_at(call: Call, began: float) -> float:
    """When ``refresh``'s call issued its writes (wall clock), else when it began."""
    return call.written_at if isinstance(call, Reload) and call.written_at else began


async def latest(
    rt: runtime.Runtime,
    call: Call,
    outcome: Outcome,
    node: Node,
    cfg: Config,
    loader: Loader | None,
) -> tuple[Outcome, Call]:
    """A refresh's outcome, or a newer one when the refresh was overtaken, with the call
    that gave it (a later refresh's, whose ``write_error`` is then this refresh's too).

    A later ``refresh`` or an ``invalidate`` of the key makes a refresh's call stale: it
    writes nothing, so its own value may be older than what a ``get`` sees next. Such a
    refresh returns the outcome of the last of the refreshes of this loop that overtook it
    one after another (waiting for it, or as it ended: its value, or its error raised),
    even when its own load failed; else that of the key's newer flight; else that of a new
    read of every tier once the remote writes of the key under way in any loop have landed
    (the later refresh's value, or a new load after an invalidation). It raises what that
    flight raises (its own value, written nowhere, would be newer than what a ``get`` then
    serves). The refreshes that overtook it are followed to the last; of the other flights,
    after three rounds, the third one's outcome stands.

    A refresh only detached (``invalidate_tag``, ``invalidate_node``: no new get joins it)
    wrote its value all the same, and returns it, unless it wrote it nowhere (another
    process changed the key meanwhile).
    """
    rounds = hops = 0
    while call.stale or (call.detached and not _wrote(call)):
        last = _last_refresh(call) if hops < _MOST_HOPS else None
        if last is not None:  # no round used: the refreshes that overtook it are finite
            hops += 1
            call = last
            result = last.result
            if result is None:  # under way: its outcome, unless a refresh overtakes it too
                try:
                    outcome = await last.join(rt.loop)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if not last.stale:
                        raise
                continue
            if not isinstance(result, BaseException):
                outcome = result
                continue
            if not (last.stale or isinstance(result, asyncio.CancelledError)):
                raise result
            # It failed, and an invalidate overtook it since (or it was cancelled): read.
        if rounds == 3:
            break
        rounds += 1  # each round waits for a flight begun after the previous one
        if isinstance(call, Reload):
            # Overtaken by a refresh of another loop (thread), still loading: what a read
            # gives now is the value from before both. Wait for the refreshes begun so far
            # to end, and again for those begun meanwhile (the one waited for may have been
            # overtaken too, and written nothing), three times at most: refreshes that
            # keep overtaking each other write nothing until the last, and must not keep
            # this one waiting for good. Then read.
            for _ in range(3):
                ended = refreshes.ended(call.key, call.ticket)
                if ended is None:
                    break
                await ended
        newer = rt.flights.get(call.key)
        if newer is None or newer.detached:
            # What overtook it may be a refresh in another thread's loop: read after its
            # remote write lands, not before (a read on this loop's connection could
            # overtake that write and copy the older value into a shared local tier).
            await landing.wait(call.key, landing.of(call.key), wait_bound(cfg))
        call, waiter = _read_flight(rt, call.key, node, cfg, loader)
        outcome = await waiter
    return outcome, call


_MOST_HOPS = 1000  # refreshes of one key followed one after another by an overtaken one


async def own_outcome(call: Call, waiter: Awaitable[Outcome]) -> Outcome:
    """What ``refresh``'s own call settled with; for one that a later refresh or an
    invalidate overtook, a placeholder instead of its load's error (``latest`` then gives
    the outcome that stands)."""
    try:
        return await waiter
    except Exception:
        if call.stale:
            return (None, LOADED)
        raise


def _last_refresh(call: Call) -> Reload | None:
    """The last of the refreshes that overtook ``call`` one after another (this loop's),
    if any did."""
    last = call.overtaken_by if isinstance(call, Reload) else None
    while last is not None and last.overtaken_by is not None:
        last = last.overtaken_by
    return last


def _wrote(call: Call) -> bool:
    """A detached refresh's value went to a tier and none of its tags was invalidated since
    it began to load (in this process, or in another that said so on the backplane): what
    it wrote is what a get reads next."""
    if not isinstance(call, Reload) or not call.wrote:
        return False
    versions = call.tag_versions
    return tags.local_valid(tuple(versions), tuple(versions.values()))


def _read_flight(
    rt: runtime.Runtime, key: str, node: Node, cfg: Config, loader: Loader | None
) -> tuple[Call, Awaitable[Outcome]]:
    """``key``'s live flight in this loop, joined; else a new one over every tier."""
    call = rt.flights.get(key)
    if call is not None and not call.detached:
        return call, call.join(rt.loop)
    call = rt.flights.start(key, cfg.tag_space)
    waiter = call.join(rt.loop)
    walk = Walk(cfg, rt, {key: node}, {key: call}, loader)
    if cfg.stamped:
        walk.fresh = freshness.Pass(cfg, walk, freshness.tag_names(cfg, {key: node}))
    walk.start()
    return call, waiter


@overload
def stats(node_cls: type[Node]) -> NodeStats: ...


@overload
def stats(node_cls: None = None) -> StatsSnapshot: ...


def stats(node_cls: type[Node] | None = None) -> NodeStats | StatsSnapshot:
    """A snapshot of ``node_cls``'s counters (see ``stats`` for the counting rules); with no
    argument, one ``StatsSnapshot`` of every node class and every registered storage."""
    if node_cls is None:
        return snapshot()
    if not (isinstance(node_cls, type) and issubclass(node_cls, Node)):
        raise ConfigurationError(f"stats() takes a node class, got {node_cls!r}")
    return node_cls._cacheme_config.stats.snapshot()
