"""The walk: one fetch of some keys of one node class, over its tiers, settling their calls.

``Walk.start`` reads the tiers left to right, each for the keys still missing: a local tier
answers at once, a remote tier when its coalesced batch comes back, through a callback: no
task is created for a read, so a value found in a remote tier reaches its callers without
one. Only what no tier had is loaded, in a task of its own (the one place a task is made).
Each value is then written to the tiers before the one that had it (each with its own TTL;
a loaded value to every tier, unless the doorkeeper holds it back), and the calls are
settled once those writes landed, so a caller that asks again finds the value stored.

Errors: a tier that fails open counts as a miss of that tier (and is not written back); one
that fails closed fails every call of the walk. A value that cannot be encoded fails only
its own key's callers. A load's exception fails only the callers of the keys it was for.
A call forgotten by ``invalidate``/``refresh`` still gets its value, but nothing of it is
written to a tier or remembered for stale-if-error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from contextvars import Context
from types import CoroutineType
from typing import Any

from . import backplane, lease, refreshes
from .errors import LoadError, LoadTimeoutError, StorageError
from .flight import (
    LOADED,
    STALE,
    Call,
    Outcome,
    Reload,
    done_loading,
    loading,
    outside_loads,
    propagates,
)
from .node import Config, Node
from .runtime import Runtime
from .tiers import Tier, deliver_to

logger = logging.getLogger("cacheme")

Loader = Callable[[], Awaitable[Any]]

_STALE_KEEP = 10_000  # last-good values kept per node for stale-if-error


class KeyWalk(Call):
    """The walk of one key for ``get``: the same steps as ``Walk``, without its per-key
    dictionaries, and itself the key's flight and the reader of its remote tiers (a ``get``
    is the common case, and every object it keeps alive while the load runs is work for the
    garbage collector)."""

    __slots__ = ("cfg", "context", "failed", "index", "loader", "mark", "node", "rt")

    def __init__(
        self, key: str, cfg: Config, rt: Runtime, node: Node, loader: Loader | None
    ) -> None:
        super().__init__(key, cfg.tag_space)
        self.cfg = cfg
        self.rt = rt
        self.node = node
        self.loader = loader
        self.index = 0
        self.failed = 0  # bit i: tier i failed (open) during this walk
        self.mark = backplane.sequence()  # see backplane.changed_since
        # The load runs in the context of the caller that began the flight (its context
        # variables), not in that of whatever task delivers the read (a batch of some other
        # caller's), and outside the loads of that caller (see flight.refuse_cycle).
        self.context: Context | None = outside_loads()

    def begin(self, skip: int) -> Awaitable[Outcome]:
        """Start the walk for the caller that registered it, past the first ``skip`` tiers
        (the front tiers it already peeked); what that caller awaits.

        When the first tier to read is a remote one whose storage is idle, the read runs in
        the caller's own task (see ``RemoteStorage.read_now``): no future, no extra turn.
        """
        self.index = skip
        tiers = self.cfg.tiers
        if skip < len(tiers):
            direct = tiers[skip].read_now((self.key,), self.rt)
            if direct is not None:
                return self._lead(direct)
        waiter = self.join(self.rt.loop)
        self.start()
        return waiter

    async def _lead(self, direct: Awaitable[Any]) -> Outcome:
        try:
            raw = await direct
        except asyncio.CancelledError:
            if self.first is not None:  # others joined: read again for them
                self.start()
            else:
                self._fail(asyncio.CancelledError())  # drops the flight
            raise
        except Exception as exc:  # a StorageError, or a driver bug: accept() sorts them
            raw = exc
        except BaseException as exc:
            self._fail(exc)
            raise
        i = self.index
        if i == 0 and type(raw) is dict:
            # The usual hit of a chain that starts remote: nothing to write back, so the
            # outcome is settled here, with no future for this caller.
            try:
                found = self.cfg.tiers[0].accept(raw)
            except Exception as exc:
                found = StorageError(f"storage {self.cfg.tiers[0].name!r}: read failed: {exc!r}")
            if found and type(found) is dict:
                outcome = (found[self.key], 0)
                self.index = 1
                self.rt.flights.settle(self.key, self, outcome)
                return outcome
            waiter = self.join(self.rt.loop)
            self.arrived(found)
            return await waiter
        waiter = self.join(self.rt.loop)
        self.delivered(raw)
        return await waiter

    def start(self) -> None:
        try:
            self._next()
        except BaseException as exc:
            self._fail(exc)  # the callers joined first: they get it
            if not isinstance(exc, Exception):
                raise

    def _next(self) -> None:
        tiers = self.cfg.tiers
        if self.index < len(tiers):
            tiers[self.index].read_into((self.key,), self, self.rt)
        else:
            context, self.context = self.context, None  # not kept while the load runs
            if context is None:  # a second load of this walk: cannot happen
                context = outside_loads()
            spawn_load(self.rt, self._load(), context, (self,))

    def delivered(self, raw: Any) -> None:
        """A remote tier's storage answered (see ``Tier.read_into``)."""
        try:
            result = self.cfg.tiers[self.index].accept(raw)
        except Exception as exc:  # never leave the flight unsettled
            self._fail(exc)
            return
        self.arrived(result)

    def arrived(self, found: dict[str, Any] | StorageError | None) -> None:
        try:
            i = self.index
            self.index += 1
            if found is None:
                self.failed |= 1 << i
            elif isinstance(found, StorageError):
                self._fail(found)
                return
            elif found:
                self._store(found[self.key], i, i)
                return
            self._next()
        except BaseException as exc:
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise

    def _store(self, value: Any, source: int, upto: int) -> None:
        """Write ``value`` to the tiers before ``upto`` that did not fail, then settle."""
        if upto == 0:  # found in the first tier: nothing to write back
            self.rt.flights.settle(self.key, self, (value, source))
            return
        pending, error = self._write(value, upto)
        if error is not None:
            self._fail(error)
        elif pending is None:
            self.rt.flights.settle(self.key, self, (value, source))
        else:

            def landed(fut: asyncio.Future[Any]) -> None:
                error = self._write_error(pending, fut)
                if error is not None:
                    self._fail(error)
                else:
                    self.rt.flights.settle(self.key, self, (value, source))

            done = pending[0][1]
            if len(pending) > 1:
                done = asyncio.gather(*(f for _, f in pending), return_exceptions=True)
            done.add_done_callback(landed)

    def _write(
        self, value: Any, upto: int
    ) -> tuple[list[tuple[Tier, asyncio.Future[Any]]] | None, BaseException | None]:
        """Start the writes; ``(pending writes or None, an encode error)``."""
        with backplane.write_guard:  # see its comment
            pending, error = self._write_guarded(value, upto, False)
        if pending is None:
            return None, error
        loop = self.rt.loop
        return [(tier, asyncio.ensure_future(op, loop=loop)) for tier, op in pending], error

    def _write_guarded(
        self, value: Any, upto: int, now: bool
    ) -> tuple[list[tuple[Tier, Awaitable[Any]]] | None, BaseException | None]:
        key = self.key
        # Forgotten by invalidate()/refresh(), or another process invalidated the key since
        # this walk began (the backplane said so): what it read or loaded may be the old
        # value, so it is written nowhere.
        if self.stale or backplane.changed_since(key, self.mark) or backplane.removing(key):
            return None, None
        pending: list[tuple[Tier, Awaitable[Any]]] = []
        tiers = self.cfg.tiers
        # Remote tiers first: a value their serializer refuses must not land in memory
        # either, or the next get would serve what this one failed with.
        try:
            for j in self.cfg.write_order:
                if j >= upto or self.failed >> j & 1:
                    continue
                tier = tiers[j]
                write, errors = tier.write({key: value}, now, self.rt)
                if errors:
                    self._run_aside(pending)
                    return None, errors[key]
                if write is not None:
                    pending.append((tier, write))
        except BaseException:
            self._run_aside(pending)
            raise
        return pending or None, None

    def _run_aside(self, pending: list[tuple[Tier, Awaitable[Any]]]) -> None:
        """Run writes already issued (a direct write holds its keys' place in the storage's
        order until it has run) in tasks of their own, their outcome ignored."""
        for _, op in pending:
            task = asyncio.ensure_future(op)
            self.rt.tasks.add(task)
            task.add_done_callback(self.rt.tasks.discard)
            task.add_done_callback(_discard)  # its caller has already failed otherwise

    def _write_error(
        self, pending: Sequence[tuple[Tier, asyncio.Future[Any]]], done: asyncio.Future[Any]
    ) -> BaseException | None:
        """The error of a fail-closed tier's write, if one failed."""
        for tier, fut in pending:
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is not None:
                error = tier.write_failed(exc)
                if error is not None:
                    return error
        return None

    async def _load(self) -> None:
        cfg = self.cfg
        key = self.key
        call = self
        try:
            if self.loader is None and _load_all_only(type(self.node)):
                self.loader = _by_load_all(cfg, key, self.node)
            if cfg.load_timeout is not None:
                outcome = await _timed(cfg, self.loader or self.node.load, 1)
            else:  # _timed inlined: one coroutine less alive for the whole load
                rec = cfg.stats
                started = time.perf_counter_ns()
                try:
                    # No bound method kept in this frame for the whole load (GC work).
                    loader = self.loader
                    outcome = await awaitable(cfg, self.node.load() if loader is None else loader())
                except Exception as exc:
                    outcome = exc
                    rec.load_failures += 1
                else:
                    rec.load_successes += 1
                rec.load_time_ns += time.perf_counter_ns() - started
            done_loading((self,))
            source = LOADED
            if isinstance(outcome, BaseException):
                kept = cfg.last_good.get(key)
                if kept is None or not _servable(key, kept, time.monotonic()) or call.stale:
                    self.rt.flights.fail(key, call, outcome)
                    return
                logger.warning(
                    "cacheme: node %s: load of %r failed (%r); serving the stale value",
                    cfg.name,
                    key,
                    outcome,
                )
                value, source = kept[0], STALE
            else:
                value = outcome
                if cfg.stale_if_error is not None and not call.stale:
                    _remember(cfg, key, value, time.monotonic(), self.mark)
            keeper = cfg.doorkeeper
            if source == STALE or (keeper is not None and not keeper.admit(key)):
                self.rt.flights.settle(key, call, (value, source))
                return
            # The writes are awaited right here: a remote tier may send its write from this
            # task (no batch, no extra turn) when its storage has nothing else queued.
            with backplane.write_guard:  # see its comment
                pending, error = self._write_guarded(value, len(cfg.tiers), True)
            if error is not None:
                self.rt.flights.fail(key, call, error)
                return
            if pending is not None:
                shared = any(not t.immediate for t, _ in pending)
                if len(pending) == 1:  # the usual case; gather would cost a future and more
                    written, op = pending[0]
                    pending = None  # not kept alive while the write is out (GC work)
                    try:
                        await op
                    except Exception as exc:
                        error = written.write_failed(exc)
                else:
                    futures = [(t, asyncio.ensure_future(op)) for t, op in pending]
                    await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
                    error = self._write_error(futures, futures[0][1])
                if error is not None:
                    self.rt.flights.fail(key, call, error)
                    return
                if shared and not call.stale:
                    backplane.publish((key,))
            self.rt.flights.settle(key, call, (value, source))
        except BaseException as exc:
            self._fail(exc)
            if propagates(exc):
                raise

    def _fail(self, exc: BaseException) -> None:
        self.rt.flights.fail(self.key, self, exc)


class Walk:
    """Fetch ``nodes`` (by full key) for ``calls``; every call is settled, always."""

    __slots__ = (
        "admit",
        "backfill",
        "calls",
        "cfg",
        "context",
        "failed",
        "fresh",
        "index",
        "loader",
        "mark",
        "missing",
        "nodes",
        "rt",
        "sources",
        "values",
    )

    def __init__(
        self,
        cfg: Config,
        rt: Runtime,
        nodes: dict[str, Node],
        calls: dict[str, Call],
        loader: Loader | None,
    ) -> None:
        self.cfg = cfg
        self.rt = rt
        self.nodes = nodes
        self.calls = calls
        self.loader = loader
        self.values: dict[str, Any] = {}
        self.sources: dict[str, int] = {}
        self.missing = list(nodes)
        self.index = 0
        self.failed: set[int] = set()  # tiers that failed (open) during this walk
        self.backfill: dict[int, list[str]] = {}
        self.mark = backplane.sequence()  # see backplane.changed_since
        # A stamped node's reads and writes (freshness.Pass); None: the tiers' own.
        self.fresh: Any = None
        self.context = outside_loads()  # see KeyWalk.context
        # What it loads passes the doorkeeper and takes the lease (a get's walk); not so a
        # background reload's (freshness.trigger), which replaces a value already stored.
        self.admit = True

    # -- reading ------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the tiers, then load what they lack."""
        try:
            self._next()
        except BaseException as exc:
            self._fail_all(exc)  # the callers joined first: they get it
            if not isinstance(exc, Exception):
                raise

    def begin(self, skip: int) -> Awaitable[None] | None:
        """``start``, past the first ``skip`` tiers (the front tiers its caller already
        peeked). When the first tier to read is a remote one whose storage is idle, the read
        is returned for the caller to await in its own task (see ``KeyWalk.begin``); the
        rest of the walk goes on from there as usual."""
        self.index = skip
        tiers = self.cfg.tiers
        if self.fresh is None and skip < len(tiers):
            tier = tiers[skip]
            direct = tier.read_now(self.missing, self.rt)
            if direct is not None:
                return self._lead(tier, direct)
        self.start()
        return None

    async def _lead(self, tier: Tier, direct: Awaitable[Any]) -> None:
        try:
            raw = await direct
        except asyncio.CancelledError:
            if any(call.others is not None for call in self.calls.values()):
                self.start()  # others joined: read again for them
            else:
                self._fail_all(asyncio.CancelledError())  # drops the flights
            raise
        except Exception as exc:  # a StorageError, or a driver bug: accept() sorts them
            raw = exc
        except BaseException as exc:
            self._fail_all(exc)
            raise
        try:
            result = tier.accept(raw)
        except Exception as exc:  # never leave the calls unsettled
            self._fail_all(exc)
            return
        self._arrived(result)

    def reload(self, announce: bool = True) -> None:
        """Skip the tiers: load every key and write it everywhere (``refresh``).

        ``announce``: keep walks of other loops from copying an older value over the new
        one into a shared local tier (see ``_writes``, ``_rewrite_local``); what a caller
        awaits needs it, a background refresh-ahead does not (the older value it replaces
        was still being served anyway).
        """
        coro = self._load_and_finish(admit=False, announce=announce)
        spawn_load(self.rt, coro, self.context, self.calls.values())

    def _next(self) -> None:
        tiers = self.cfg.tiers
        if self.missing and self.index < len(tiers):
            if self.fresh is None:
                tiers[self.index].read(self.missing, self._arrived)
            else:
                self.fresh.read(tiers[self.index], self.missing, self._arrived)
        elif self.missing:
            coro = self._load_and_finish(admit=self.admit)
            spawn_load(self.rt, coro, self.context, self.calls.values())
        else:
            self._write_then_settle()

    def _arrived(self, found: dict[str, Any] | StorageError | None) -> None:
        try:
            i = self.index
            self.index += 1
            if found is None:
                self.failed.add(i)
            elif isinstance(found, BaseException):
                self._fail_all(found)
                return
            elif found:
                self.values.update(found)
                self.sources.update(dict.fromkeys(found, i))
                for j in range(i):
                    if j not in self.failed:
                        self.backfill.setdefault(j, []).extend(found)
                self.missing = [k for k in self.missing if k not in found]
            self._next()
        except BaseException as exc:
            self._fail_all(exc)
            if not isinstance(exc, Exception):
                raise

    # -- writing and settling -------------------------------------------------------------

    def _writes(
        self, announce: bool = False
    ) -> tuple[list[tuple[Tier, Awaitable[Any]]], dict[str, BaseException]]:
        """Start the write-backs; ``(pending writes, errors by key)``.

        ``announce`` (``refresh``): then note the keys as changed, so that a walk of another
        loop begun before, which may have read an older remote value, writes nothing back
        over this one; this walk's later checks use the mark taken after that note.
        """
        with backplane.write_guard:  # see its comment
            result = self._writes_guarded()
            if announce:
                self._note_own([k for k in self.values if self._current(k)])
            return result

    def _current(self, key: str, local: bool = True) -> bool:
        """Whether nothing detached ``key``'s call or changed the key since ``mark``, and no
        ``invalidate`` of it is under way (``backplane.removing``). For a ``refresh``,
        whether it is not detached, no later refresh of the key began in this process
        (``refreshes.newer``), no other process invalidated the key since
        (``backplane.invalidated_elsewhere_since``), nor, for a local tier (``local``), a
        clear of every key came: this process's later invalidations detached it already,
        and the notes of earlier ones must not stop it."""
        call = self.calls[key]
        if call.stale:
            return False
        if type(call) is Reload:
            if refreshes.newer(key, call.ticket) or backplane.invalidated_elsewhere_since(
                key, self.mark
            ):
                return False
            return not (local and backplane.cleared_since(self.mark))
        return not (backplane.changed_since(key, self.mark) or backplane.removing(key))

    def _note_own(self, keys: list[str]) -> None:
        """Note ``keys`` (current: see ``_current``) as changed by this walk, and take the mark
        after that note; what it kept of them for stale-if-error carries the new mark (its
        own note does not make them stale)."""
        if not keys:
            return
        backplane.note_invalidated(keys)
        mark = self.mark = backplane.sequence()
        kept = self.cfg.last_good
        for key in keys:
            entry = kept.get(key)
            if entry is not None and entry[0] is self.values[key]:
                kept[key] = (entry[0], entry[1], mark)

    def _rewrite_local(self, errors: dict[str, BaseException]) -> None:
        """``refresh``, once its remote writes landed: write its values to the local tiers
        again. A walk of another loop may have read the older remote value before they
        landed (on its own connection) and copied it into a shared local tier; one still
        under way after this writes nothing back (the note). Keys changed since this walk's
        own note are left alone: what changed them is newer."""
        local = [t for j, t in enumerate(self.cfg.tiers) if t.immediate and j in self.backfill]
        if not local:
            return
        with backplane.write_guard:  # see its comment
            live = {k: v for k, v in self.values.items() if k not in errors and self._current(k)}
            if not live:
                return
            self._note_own(list(live))
            for tier in local:
                if self.fresh is None:
                    tier.write(live, False, self.rt)
                else:
                    self.fresh.write(tier, live)

    def _writes_guarded(
        self,
    ) -> tuple[list[tuple[Tier, Awaitable[Any]]], dict[str, BaseException]]:
        errors: dict[str, BaseException] = {}
        pending: list[tuple[Tier, Awaitable[Any]]] = []
        calls = self.calls
        tiers = self.cfg.tiers
        # Remote tiers first: a key whose value cannot be encoded is kept out of memory too.
        for j, keys in sorted(self.backfill.items(), key=lambda item: tiers[item[0]].immediate):
            # A call forgotten by invalidate()/refresh() must not write back, nor one whose
            # key another process invalidated since this walk began (see KeyWalk._write).
            tier = tiers[j]
            live = {
                k: self.values[k]
                for k in keys
                if k not in errors and self._current(k, tier.immediate)
            }
            if not live:
                continue
            issued = time.time()
            for k in live:
                call = calls[k]
                if type(call) is Reload:
                    call.wrote = True
                    if not tier.immediate:
                        # When a refresh wrote a shared tier: other processes' repairs
                        # compare with it (see repair). A refresh that writes nothing
                        # leaves 0: its start counts.
                        call.written_at = issued
            if self.fresh is None:
                write, failed = tier.write(live, False, self.rt)
            else:
                write, failed = self.fresh.write(tier, live)
            errors.update(failed)
            if write is not None:
                pending.append((tier, write))
            elif not tier.immediate:  # refused before a round trip (breaker open, closed)
                self._missed_write(tier, [k for k in live if k not in failed], None)
        return pending, errors

    def _missed_write(self, tier: Tier, keys: Iterable[str], exc: BaseException | None) -> None:
        """A shared tier did not take ``keys``' values: tell each ``refresh`` waiting for one
        of them (``Reload.write_error``), whatever the tier's ``fail_open`` says. Like a
        failed ``invalidate``, the tier may go on serving the old value to other processes.
        """
        for key in keys:
            call = self.calls.get(key)
            if type(call) is Reload and call.write_error is None:
                reason = "" if exc is None else f" ({exc})"
                call.write_error = StorageError(
                    f"refresh of node {self.cfg.name}: storage {tier.name!r} did not take the "
                    f"new value of {key!r}, so it may serve the old one until the key is "
                    f"invalidated or expires{reason}"
                )

    def _write_then_settle(self) -> None:
        if not self.backfill:  # every key came from the first tier read: nothing to write
            self._settle({})
            return
        pending, errors = self._writes()
        if not pending:
            self._settle(errors)
            return
        futures = [asyncio.ensure_future(w) for _, w in pending]
        done = futures[0] if len(futures) == 1 else asyncio.gather(*futures, return_exceptions=True)

        def landed(_: Any) -> None:
            try:
                self._settle({**errors, **self._write_errors(pending, futures)})
            except BaseException as exc:
                self._fail_all(exc)

        done.add_done_callback(landed)

    def _write_errors(
        self, pending: list[tuple[Tier, Awaitable[Any]]], futures: Sequence[asyncio.Future[Any]]
    ) -> dict[str, BaseException]:
        """The errors of fail-closed tiers' writes, for every key of the walk."""
        for (tier, _), fut in zip(pending, futures, strict=True):
            exc = None if fut.cancelled() else fut.exception()
            if exc is None:
                continue
            error = tier.write_failed(exc)
            if error is not None:
                return dict.fromkeys(self.calls, error)
        return {}

    def _settle(self, errors: dict[str, BaseException]) -> None:
        flights = self.rt.flights
        values = self.values
        sources = self.sources
        if not errors:
            flights.settle_each(self.calls, values, sources)
            return
        for key, call in self.calls.items():
            error = errors.get(key)
            if error is not None:
                flights.fail(key, call, error)
            else:
                flights.settle(key, call, (values[key], sources[key]))

    def _fail_all(self, exc: BaseException) -> None:
        flights = self.rt.flights
        for key, call in self.calls.items():
            flights.fail(key, call, exc)

    # -- loading ----------------------------------------------------------------------------

    async def _load_and_finish(self, *, admit: bool, announce: bool = False) -> None:
        try:
            cfg = self.cfg
            missing = {k: self.nodes[k] for k in self.missing}
            if self.fresh is not None:
                self.fresh.loading(missing)
            loaded, stale, errors = await self._load(missing, leased=admit)
            done_loading(self.calls.values())
            # Keys this walk loaded under a lease: other processes wait for their values in
            # the shared tier, so the doorkeeper does not hold them back.
            held = [k for k in loaded if lease.holds(k)] if admit and cfg.lease else []
            if self.fresh is not None:  # stamps, negative entries, the stored stale copy
                self.fresh.after_load(loaded, stale, errors)
            self.values.update(stale)
            self.values.update(loaded)
            for key in stale:
                self.sources[key] = STALE
            for key in loaded:
                self.sources[key] = LOADED
            keeper = cfg.doorkeeper if admit and not held else None
            admitted = [k for k in loaded if keeper is None or keeper.admit(k)]
            if admitted:
                for j in range(len(cfg.tiers)):
                    if j not in self.failed:
                        self.backfill.setdefault(j, []).extend(admitted)
                    elif announce and not cfg.tiers[j].immediate:
                        # Failed before the write (a stamped node's tag versions could not
                        # be read): the refresh did not reach it either.
                        self._missed_write(cfg.tiers[j], admitted, None)
            pending, write_errors = self._writes(announce)
            errors.update(write_errors)
            published: list[str] = []
            if pending:
                futures = [asyncio.ensure_future(w) for _, w in pending]
                await asyncio.gather(*futures, return_exceptions=True)
                errors.update(self._write_errors(pending, futures))
                if announce:
                    for (tier, _), fut in zip(pending, futures, strict=True):
                        if not tier.immediate and (fut.cancelled() or fut.exception()):
                            exc = None if fut.cancelled() else fut.exception()
                            self._missed_write(tier, admitted, exc)
                if admit and any(not t.immediate for t, _ in pending):
                    published = [k for k in admitted if not self.calls[k].stale]
                    backplane.publish(published)
                if announce:
                    self._rewrite_local(errors)
            for key in held:
                if key not in published or key in write_errors:
                    self.rt.spawn(lease.give_back(key))  # nothing for the waiters to read
            self._settle(errors)
        except BaseException as exc:
            self._fail_all(exc)
            if propagates(exc):
                raise

    async def _load(
        self, nodes: dict[str, Node], leased: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, BaseException]]:
        """Load ``nodes``: ``(loaded, stale, errors)`` by key."""
        cfg = self.cfg
        loader = self.loader
        outcomes: dict[str, Any] = {}
        first = next(iter(nodes.values()))
        cls = type(first)
        if leased and cfg.lease is not None and len(nodes) == 1:
            key = next(iter(nodes))
            try:
                if loader is None:
                    loader = _by_load_all(cfg, key, first) if _load_all_only(cls) else first.load
                outcomes[key] = await self._load_leased(key, loader)
            except _Shared:
                return {}, {}, {}  # another process loaded it: read from the shared tier
            except Exception as exc:
                outcomes[key] = exc
        elif loader is not None:
            key = next(iter(nodes))
            outcomes[key] = await _timed(cfg, loader, 1)
        elif (len(nodes) > 1 and _has_load_all(cls)) or _load_all_only(cls):
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
                # A call detached by invalidate()/refresh() leaves nothing behind.
                if cfg.stale_if_error is not None and not cfg.stamped and not self.calls[key].stale:
                    _remember(cfg, key, outcome, now, self.mark)
                continue
            kept = cfg.last_good.get(key)
            if kept is not None and _servable(key, kept, now) and not self.calls[key].stale:
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

    async def _load_leased(self, key: str, fn: Loader) -> Any:
        """Load ``key`` under a lease (see ``lease``); raises ``_Shared`` when the value was
        read from a shared tier instead (recorded as a hit of that tier)."""
        cfg = self.cfg

        async def load() -> Any:
            # This process loads now, perhaps after waiting on another's lease: a key
            # invalidated during that wait is loaded afresh, so its write stands.
            self.mark = backplane.sequence()
            outcome = await _timed(cfg, fn, 1)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        async def read_shared() -> tuple[bool, Any]:
            for tier in cfg.tiers:
                if not tier.immediate and tier.index not in self.failed:
                    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                    if self.fresh is None:
                        tier.read([key], deliver_to(fut))
                    else:
                        self.fresh.read(tier, [key], deliver_to(fut))
                    found = await fut
                    if isinstance(found, dict) and key in found:
                        return True, (tier.index, found[key])
            return False, None

        value, loaded = await lease.load_once(cfg, key, load, read_shared)
        if loaded:
            return value
        index, self.values[key] = value
        self.sources[key] = index
        for j in range(index):
            if j not in self.failed:
                self.backfill.setdefault(j, []).append(key)
        raise _Shared


class _Shared(Exception):
    """The leased key's value came from a shared tier (another process loaded it)."""


_DEFAULT_LOAD_ALL = Node.__dict__["load_all"].__func__


def _has_load_all(cls: type[Node]) -> bool:
    return getattr(cls.load_all, "__func__", None) is not _DEFAULT_LOAD_ALL


def _load_all_only(cls: type[Node]) -> bool:
    """``load_all`` is defined and ``load`` is not: every load, even of one node, goes
    through ``load_all``."""
    return cls.load is Node.load and _has_load_all(cls)


def _by_load_all(cfg: Config, key: str, node: Node) -> Loader:
    """A loader of ``node`` alone through its class's ``load_all``."""
    cls = type(node)

    async def load() -> Any:
        pairs = await awaitable(cfg, cls.load_all([node]))
        outcome = _match(cfg, cls, {key: node}, pairs, count=False)[key]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return load


def _remember(cfg: Config, key: str, value: Any, now: float, mark: int) -> None:
    """Keep ``value`` for stale-if-error, with the backplane's mark taken before the walk
    read or loaded it (see ``_servable``)."""
    assert cfg.stale_if_error is not None
    kept = cfg.last_good
    kept[key] = (value, now + cfg.stale_if_error.total_seconds(), mark)
    # The table is the node's, shared by the loops of every thread: another thread's
    # invalidate may drop the key, or its _remember the oldest entry, between two steps.
    with contextlib.suppress(KeyError):
        kept.move_to_end(key)
        if len(kept) > _STALE_KEEP:
            kept.popitem(last=False)


def spawn_load(
    rt: Runtime, coro: Coroutine[Any, Any, None], context: Context, calls: Iterable[Call]
) -> None:
    """Run the load ``coro`` of ``calls`` in a task started in ``context`` (made for it: see
    ``KeyWalk.context``), marked as their load (``flight.loading``): every call of a walk,
    the keys found in a tier too, since they are settled with the loaded ones."""
    context.run(loading, tuple(calls))
    rt.spawn(coro, context)


def _match(
    cfg: Config, cls: type[Node], nodes: dict[str, Node], pairs: Any, count: bool = True
) -> dict[str, Any]:
    """Map ``load_all``'s ``(node, value)`` pairs back to keys; a left-out node is an error
    (``count``: moved from the load successes to the failures, else the caller counts)."""
    from .api import full_key

    out: dict[str, Any] = {}
    twice: set[str] = set()
    try:
        for got, value in pairs:
            if not isinstance(got, Node):
                raise TypeError(f"{got!r} is not a node")
            key = full_key(cfg, got)
            if key in out:
                twice.add(key)
            out[key] = value
    except (TypeError, ValueError) as exc:
        error = LoadError(f"{cls.__qualname__}.load_all must return (node, value) pairs: {exc}")
        if count:
            cfg.stats.load_successes -= len(nodes)
            cfg.stats.load_failures += len(nodes)
        return dict.fromkeys(nodes, error)

    def fail(keys: Sequence[str], what: str) -> None:
        error = LoadError(
            f"{cls.__qualname__}.load_all returned {what} for {len(keys)} node(s), "
            f"e.g. key {keys[0]!r}"
        )
        if count:
            cfg.stats.load_successes -= len(keys)
            cfg.stats.load_failures += len(keys)
        for key in keys:
            out[key] = error

    left_out = [k for k in nodes if k not in out]
    if left_out:
        fail(left_out, "no value")
    twice &= nodes.keys()
    if twice:
        # Which of the values is the node's own is unknown: none is served or cached.
        fail(sorted(twice), "more than one value")
    return {k: out[k] for k in nodes}


def awaitable(cfg: Config, result: Any) -> Awaitable[Any]:
    """``result`` when it can be awaited; else ``LoadError`` naming the node (a ``load()``,
    ``load_all()`` or ``load_fn`` written without ``async``)."""
    if type(result) is CoroutineType or inspect.isawaitable(result):
        return result
    raise LoadError(
        f"node {cfg.name}: a load returned {type(result).__name__} {result!r:.80}, not an "
        "awaitable: load(), load_all() and a get's load_fn must be async (async def)"
    )


async def _timed(cfg: Config, fn: Callable[[], Awaitable[Any]], count: int) -> Any:
    """Run one load (of ``count`` nodes) with the node's timeout; the exception is returned."""
    rec = cfg.stats
    start = time.perf_counter_ns()
    try:
        if cfg.load_timeout is None:
            value = await awaitable(cfg, fn())
        else:
            value = await _bounded(cfg, fn, cfg.load_timeout)
    except Exception as exc:
        rec.load_failures += count
        rec.load_time_ns += time.perf_counter_ns() - start
        return exc
    rec.load_successes += count
    rec.load_time_ns += time.perf_counter_ns() - start
    return value


async def _bounded(cfg: Config, fn: Callable[[], Awaitable[Any]], seconds: float) -> Any:
    """``await fn()``, but for ``seconds`` at most: then ``LoadTimeoutError``.

    Unlike ``asyncio.wait_for``, the callers do not wait for the load to finish cancelling:
    a ``load()`` that takes its time over cancellation (or ignores it) is cancelled and left
    behind, its outcome discarded.
    """
    task = asyncio.ensure_future(awaitable(cfg, fn()))
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_discard)
        raise LoadTimeoutError(f"node {cfg.name}: load took longer than {seconds:g}s")
    return task.result()


def _discard(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a late failure of an abandoned load is not logged


def _servable(key: str, kept: tuple[Any, float, int], now: float) -> bool:
    """Whether a kept last-good value may still be served: not expired, and not invalidated
    by another process since it was read (a backplane message; this process's own
    ``invalidate`` drops it at once)."""
    return kept[1] > now and not backplane.changed_since(key, kept[2])
