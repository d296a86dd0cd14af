"""Singleflight: at most one fetch per key per burst of concurrent requests, per event loop.

The first caller of a key registers a ``Call``; later callers join it. The walk over the tiers
(see ``walk``), not any caller, owns the fetch: it settles the call with the outcome, value or
exception, and every waiter gets it. Each waiter awaits a future of its own, so a cancelled
waiter cancels only that future: never the fetch, never another waiter. The entry leaves the
table when the walk settles it, and only if it is still the same entry, so no entry outlives
its fetch. ``forget`` detaches an entry (``invalidate``/``refresh``): its waiters still get its
outcome, but the call is marked stale and nothing it produces is written or remembered.

A table belongs to one event loop (``runtime.Runtime``): futures never cross loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Iterable
from contextvars import Context, ContextVar, copy_context
from typing import Any, Union

from . import refreshes
from .errors import LoadError

# Where a value came from: the index of the tier that held it, or one of these.
LOADED = -1  # load() ran (a miss)
STALE = -2  # load() failed; a stale value was served (a miss)

Outcome = tuple[Any, int]  # (value, source)


class Group:
    """One caller waiting on many calls at once (``get_all``): one future for all of them.

    The future gets the outcomes by key once every call is settled, or the first error;
    cancelling it affects none of the calls or their other waiters.
    """

    __slots__ = ("future", "left", "outcomes")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if loop is None:
            loop = asyncio.get_running_loop()
        self.future: asyncio.Future[dict[str, Outcome]] = loop.create_future()
        self.outcomes: dict[str, Outcome] = {}
        self.left = size

    def settle(self, key: str, outcome: Outcome) -> None:
        self.outcomes[key] = outcome
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.outcomes)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            if isinstance(error, asyncio.CancelledError):
                self.future.cancel()
            else:
                self.future.set_exception(error)


# The calls whose load the running code is part of: a load sets it in its own task, and the
# tasks it starts inherit it (a context variable: per task, never shared between loops). A
# flight's load starts without it (see outside_loads): what a load waits for is told by the
# calls it joined (Call.awaits), while it waits for them.
_inside: ContextVar[tuple[Call, ...]] = ContextVar("cacheme_inside_load", default=())


def loading(calls: Iterable[Call]) -> None:
    """Mark the running task as the load of ``calls`` (see ``refuse_cycle``)."""
    _inside.set(_inside.get() + tuple(calls))


def done_loading(calls: Iterable[Call]) -> None:
    """The loads of ``calls`` returned: what remains (writing the values) waits for no
    other flight, so they are in no cycle any more (a task they started may live on)."""
    for call in calls:
        call.awaits = _SETTLED


def outside_loads(context: Context | None = None) -> Context:
    """A copy of ``context`` (else of the running code's) in which no load is under way: for
    the task of a flight's load, or of a background reload, even when a load began it (that
    load waits for it only while it awaits it: ``Call.awaits``)."""
    copy = copy_context() if context is None else context.copy()
    if copy.get(_inside):  # rarely: a load's own task begins the flight
        copy.run(_inside.set, ())
    return copy


_SETTLED: tuple[Call, ...] = ()  # Call.awaits of a call settled, or whose load returned


def refuse_cycle(call: Call) -> list[Call]:
    """Raise ``LoadError`` when waiting for ``call`` from the running code would never end;
    else note that the loads under way here wait for it, and return them (``unnote`` them
    once the wait is over).

    It never ends when the running code is part of ``call``'s own load (a ``load()`` that
    gets its own key; a node of the same ``get_all`` batch, loaded and settled together),
    or when ``call``'s load waits, through the calls its own loads wait for
    (``Call.awaits``), for a load under way here: A's load gets B while B's load gets A.
    """
    inside = [c for c in _inside.get() if c.awaits is not _SETTLED]
    if call in inside:
        raise LoadError(
            f"node {call.owner}: a load awaits a get of {call.key!r}, which is being loaded "
            "by it or with it (its own key, or a node of the same get_all batch): it would "
            "wait for itself forever"
        )
    seen = {id(call)}
    stack = [call]
    while stack:
        for waited in stack.pop().awaits or ():
            if waited in inside:
                raise LoadError(
                    f"node {call.owner}: a load awaits a get of {call.key!r}, whose load waits "
                    f"(through the keys it gets) for this one: a cycle, which would never end"
                )
            if id(waited) not in seen:
                seen.add(id(waited))
                stack.append(waited)
    for loader in inside:
        awaits = loader.awaits
        if awaits is None:
            loader.awaits = [call]
        elif isinstance(awaits, list):  # not settled
            awaits.append(call)
    return inside


def unnote(loaders: list[Call], call: Call) -> None:
    """The loads ``loaders`` no longer wait for ``call`` (their wait ended, or gave up)."""
    for loader in loaders:
        awaits = loader.awaits
        if isinstance(awaits, list):
            with contextlib.suppress(ValueError):
                awaits.remove(call)


# A waiter: a caller's own future, or the group of a get_all.
Waiter = Union["asyncio.Future[Outcome]", Group]


class Call:
    """One in-flight fetch of one key, and its waiters."""

    __slots__ = ("awaits", "detached", "first", "key", "others", "owner", "stale")

    def __init__(self, key: str, owner: str = "", first: Waiter | None = None) -> None:
        self.key = key
        self.owner = owner  # the node's name (Config.name): what invalidate_node reaches
        # The calls this call's load waits for (see refuse_cycle); _SETTLED once settled.
        self.awaits: list[Call] | tuple[Call, ...] | None = None
        # The first waiter, and a list only when more join (most calls have one).
        self.first: Waiter | None = first
        self.others: list[Waiter] | None = None
        self.stale = False  # set by forget(): the result must not be written or remembered
        # No new caller may join it (set with ``stale``, or alone by ``detach_owner``).
        self.detached = False

    def _add(self, waiter: Waiter) -> None:
        if self.first is None:
            self.first = waiter
        elif self.others is None:
            self.others = [waiter]
        else:
            self.others.append(waiter)

    def join(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[Outcome]:
        """A new future that gets this call's outcome; cancelling it affects nobody else.

        ``loop``: the running loop, when the caller has it at hand (finding it costs a
        system call, ``getpid``, in CPython's ``asyncio.get_running_loop``).
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        if _inside.get():
            loaders = refuse_cycle(self)
            if loaders:
                fut.add_done_callback(lambda _: unnote(loaders, self))
        self._add(fut)
        return fut

    def join_group(self, group: Group) -> None:
        """Hand this call's outcome to ``group``, under this call's key."""
        self._add(group)

    def _take(self) -> list[Waiter]:
        waiters: list[Waiter] = [] if self.first is None else [self.first]
        if self.others:
            waiters += self.others
        self.first = self.others = None
        return waiters

    def resolve(self, outcome: Outcome) -> None:
        self.awaits = _SETTLED
        first = self.first
        if self.others is None:  # the common case: one waiter
            self.first = None
            if isinstance(first, asyncio.Future):
                if not first.done():
                    first.set_result(outcome)
            elif first is not None:
                first.settle(self.key, outcome)
            return
        for waiter in self._take():
            if isinstance(waiter, Group):
                waiter.settle(self.key, outcome)
            elif not waiter.done():
                waiter.set_result(outcome)

    def reject(self, error: BaseException) -> None:
        self.awaits = _SETTLED
        cancelled = isinstance(error, asyncio.CancelledError)
        for waiter in self._take():
            if isinstance(waiter, Group):
                waiter.fail(error)
            elif not waiter.done():
                if cancelled:
                    waiter.cancel()
                else:
                    waiter.set_exception(error)


class Reload(Call):
    """The call of a ``refresh``: it loads without reading any tier, so no removal under way
    when it began can have been read by it (``Flights.forget``'s ``readers_only``).
    ``written_at``: the wall-clock time its writes were issued (0.0 before).
    ``write_error``: set when a shared tier did not take the new value (the refresh raises
    it; the callers who joined get the value). ``wrote``: its value went to a tier (a
    refresh detached by ``invalidate_tag`` still writes it), with ``tag_versions``, this
    process's versions of its tags when it began to load. ``overtaken_by``: the refresh
    of this loop that made this one stale (``api.latest``), and ``result``: its outcome or
    error once settled, kept for a refresh it overtook that ends later."""

    __slots__ = (
        "__weakref__",
        "_held",
        "overtaken_by",
        "result",
        "tag_versions",
        "ticket",
        "write_error",
        "written_at",
        "wrote",
    )

    def __init__(self, key: str, owner: str = "", first: Waiter | None = None) -> None:
        super().__init__(key, owner, first)
        self._held = refreshes.Ticket(key)
        self.ticket = self._held.number
        # Also when it is dropped unsettled (its load's task cancelled before it began):
        # the refreshes it overtook must not wait for it for good (see refreshes.ended).
        weakref.finalize(self, self._held.end, True)
        self.written_at = 0.0
        self.write_error: BaseException | None = None
        self.wrote = False
        self.tag_versions: dict[str, int] = {}
        self.overtaken_by: Reload | None = None
        self.result: Outcome | BaseException | None = None

    def resolve(self, outcome: Outcome) -> None:
        self.result = outcome
        self._held.end()
        super().resolve(outcome)

    def reject(self, error: BaseException) -> None:
        self.result = error
        self._held.end()
        super().reject(error)


class Flights:
    """The table of in-flight calls by full cache key (one loop's: one thread touches it)."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[str, Call] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def get(self, key: str) -> Call | None:
        return self._calls.get(key)

    def items(self) -> list[tuple[str, Call]]:
        """A copy of the table's entries (safe to take from another thread: one C call)."""
        return list(self._calls.items())

    def start(self, key: str, owner: str, kind: type[Call] = Call) -> Call:
        """Register a new call of class ``kind`` for ``key`` of the node named ``owner``
        (replacing none: check ``get`` first)."""
        call = self._calls[key] = kind(key, owner)
        return call

    def put(self, key: str, call: Call) -> None:
        """Register ``call`` (a ``Call`` or a subclass) for ``key`` (check ``get`` first)."""
        self._calls[key] = call

    def settle(self, key: str, call: Call, outcome: Outcome) -> None:
        call.resolve(outcome)
        self.drop(key, call)

    def settle_each(
        self, calls: dict[str, Call], values: dict[str, Any], sources: dict[str, int]
    ) -> None:
        """``settle`` every call of ``calls`` with its key's value and source, in one loop
        (``get_all``)."""
        table = self._calls
        for key, call in calls.items():
            group = call.first
            # resolve() inlined (get_all); a Reload's own resolve keeps its result.
            if call.others is None and type(group) is Group and type(call) is Call:
                call.first = None
                call.awaits = _SETTLED
                group.outcomes[key] = (values[key], sources[key])
                group.left -= 1
                if not group.left and not group.future.done():
                    group.future.set_result(group.outcomes)
            else:
                call.resolve((values[key], sources[key]))
            if table.get(key) is call:
                del table[key]

    def fail(self, key: str, call: Call, error: BaseException) -> None:
        call.reject(error)
        self.drop(key, call)

    def detach_owner(self, owner: str) -> None:
        """Let no new caller join a call of the node named ``owner`` (``invalidate_tag`` and
        ``_node``). Their results are still written: entries carry the tag versions read
        before the load, so what the new versions cover reads as stale anyway."""
        for key, call in self.items():
            if call.owner == owner:
                call.detached = True
                self.drop(key, call)

    def forget(self, key: str, readers_only: bool = False) -> Call | None:
        """Detach ``key``'s call: new callers start afresh; its result is not written back.
        Returns the call detached, if any.

        ``readers_only``: leave a ``Reload`` (see ``forgettable``).
        """
        call = self._calls.get(key)
        if call is not None and forgettable(call, readers_only):
            del self._calls[key]
            call.stale = call.detached = True
            return call
        return None

    def abandon(self) -> None:
        """The loop is shutting down: cancel every waiter and empty the table."""
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.stale = call.detached = True
            call.reject(asyncio.CancelledError())

    def drop(self, key: str, call: Call) -> None:
        """Remove ``call`` from the table if it is still ``key``'s entry."""
        if self._calls.get(key) is call:
            del self._calls[key]


def forgettable(call: Call, readers_only: bool) -> bool:
    """Whether an ``invalidate`` detaches ``call``. Its first pass (``readers_only`` false)
    detaches any call; its second, once the removals landed, only calls that read tiers: a
    refresh begun by then loads what is newer than the invalidate, and detaching it would
    make it return whatever an older write left in the tiers."""
    return not (readers_only and type(call) is Reload)


def join_all(
    flights: Flights,
    keys: Iterable[str],
    owner: str,
    loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[dict[str, Call], asyncio.Future[dict[str, Outcome]]]:
    """Join (or start) the call of each of ``keys`` (distinct) of the node named ``owner``,
    for one caller.

    Returns the calls this started, by key (the caller starts their walk), and one future
    that gets every key's outcome, by key. ``loop``: the running loop, if at hand.
    """
    keys = list(keys)
    table = flights._calls  # the loops below run once per key of a get_all: no calls in them
    inside = bool(_inside.get())
    if inside:
        for key in keys:
            call = table.get(key)
            if call is not None and not call.detached:
                unnote(refuse_cycle(call), call)  # only the check here: noted below
    group = Group(len(keys), loop)
    started: dict[str, Call] = {}
    waited: list[tuple[list[Call], Call]] = []
    for key in keys:
        call = table.get(key)
        if call is None or call.detached:
            call = started[key] = table[key] = Call(key, owner, group)
        else:
            call._add(group)
        if inside:
            waited.append((refuse_cycle(call), call))  # checked above: notes the wait
    if waited:

        def over(_: object) -> None:
            for loaders, call in waited:
                unnote(loaders, call)

        group.future.add_done_callback(over)
    return started, group.future


def propagates(exc: BaseException) -> bool:
    """Whether a task of cacheme that delivered ``exc`` to its flight's callers must still
    raise it: ``KeyboardInterrupt`` and ``SystemExit`` stop the loop, ``CancelledError``
    cancels the task, ``GeneratorExit`` closes the coroutine. Any other exception has reached
    every caller; raised on in a task that nobody awaits, it would only make asyncio log
    "Task exception was never retrieved"."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError))
