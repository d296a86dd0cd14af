"""Faults a fresh reviewer found by trying the docs, each with its neighbours (local tiers).

- ``Meta.load_timeout`` bounds a load that takes its time over cancellation (or ignores it).
- ``load_timeout`` must be a positive, finite number of seconds (NaN and inf are refused).
- ``Memoize`` refuses a function that is not async, naming it, instead of a bare TypeError.
- A load that another process invalidated meanwhile (the backplane said so) writes nothing.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

import cacheme
from cacheme import backplane, landing, runtime
from cacheme.node import Cache, Node

from .helpers import stored


def register_local(name: str, policy: str = "tlfu", size: int = 100) -> None:
    """Register a local tier ``name`` from outside any loop (for the tests that run loops
    of their own, in threads)."""
    asyncio.run(cacheme.register_storage(name, cacheme.Storage(url=f"local://{policy}", size=size)))


def slow_node(timeout: float, swallow: bool) -> type[Node]:
    class Slow(Node):
        def key(self) -> str:
            return "slow"

        async def load(self) -> int:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await asyncio.sleep(0.5)  # a driver's cleanup on cancel
                if not swallow:
                    raise
            return 1

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]
            load_timeout = timeout

    return Slow


@pytest.mark.parametrize("swallow", [False, True])
async def test_load_timeout_does_not_wait_for_the_load_to_cancel(local: Any, swallow: bool) -> None:
    node_cls = slow_node(0.05, swallow)
    started = time.monotonic()
    results = await asyncio.gather(
        *(cacheme.get(node_cls()) for _ in range(3)), return_exceptions=True
    )
    assert time.monotonic() - started < 0.4
    assert all(isinstance(r, cacheme.LoadTimeoutError) for r in results), results
    assert stored("local", "cacheme:slow:") == (None, False)  # nothing cached
    assert cacheme.stats(node_cls).load_failure_count() == 1
    await asyncio.sleep(0.6)  # the abandoned load finishes its cleanup; nothing is logged


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0, -1.0])
def test_load_timeout_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(cacheme.ConfigurationError, match="load_timeout"):
        slow_node(bad, False)


def test_memoize_refuses_a_function_that_is_not_async() -> None:
    class Squares(Node):
        def key(self) -> str:
            return "sq"

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    def square(x: int) -> int:
        return x * x

    with pytest.raises(cacheme.ConfigurationError, match="square"):
        cacheme.Memoize(Squares)(square)  # type: ignore[arg-type]

    class Callable:
        async def __call__(self, x: int) -> int:
            return x

    cacheme.Memoize(Squares)(Callable())  # an object with an async __call__ is fine


async def test_a_load_invalidated_by_another_process_writes_nothing(local: Any) -> None:
    gate = asyncio.Event()

    class Shared(Node):
        def key(self) -> str:
            return "shared"

        async def load(self) -> int:
            await gate.wait()
            return 1

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    pending = asyncio.ensure_future(cacheme.get(Shared()))
    await asyncio.sleep(0.01)  # the load is running
    # What the backplane's subscriber does when another process invalidates the key:
    backplane._record_changes(["cacheme:shared:"])
    gate.set()
    assert await pending == 1  # its callers get what it loaded...
    assert stored("local", "cacheme:shared:") == (None, False)  # ...but nothing is kept


class _Plain(Node):
    def key(self) -> str:
        return "plain"

    async def load(self) -> int:
        return 1

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (cacheme.get, "a string"),
        (cacheme.get, _Plain),
        (cacheme.get, None),
        (cacheme.invalidate, "a string"),
        (cacheme.invalidate, _Plain),
        (cacheme.refresh, 3),
        (cacheme.refresh, _Plain),
        (cacheme.get_all, ["a string"]),
        (cacheme.get_all, [_Plain]),
        (cacheme.get_all, "ab"),
        (cacheme.get_all, 3),
    ],
)
async def test_a_call_given_no_node_says_what_it_got(local: Any, call: Any, arg: Any) -> None:
    with pytest.raises(cacheme.ConfigurationError, match=r"takes .*got") as info:
        await call(arg)
    if arg is _Plain or arg == [_Plain]:
        assert "pass an instance, such as _Plain(...)" in str(info.value)


@pytest.mark.parametrize("load_fn", ["not a function", 3, object()])
async def test_a_load_fn_that_cannot_be_called_is_refused(local: Any, load_fn: Any) -> None:
    with pytest.raises(cacheme.ConfigurationError, match=r"load_fn=\.\.\.\) takes an async"):
        await cacheme.get(_Plain(), load_fn=load_fn)
    assert len(cacheme.runtime.current().flights) == 0


def _sync_node(name: str, **meta: Any) -> type[Node]:
    meta.setdefault("caches", [Cache(storage="local")])

    class Sync(Node):
        def key(self) -> str:
            return name

        def load(self) -> int:  # type: ignore[override]  # the mistake under test
            return 1

        Meta = type("Meta", (Node.Meta,), meta)

    return Sync


@pytest.mark.parametrize("timeout", [None, 1.0])
async def test_a_load_that_is_not_async_fails_naming_the_node(local: Any, timeout: Any) -> None:
    cls = _sync_node("sync", load_timeout=timeout)
    for call in (cacheme.get, cacheme.refresh):
        with pytest.raises(cacheme.LoadError, match=r"Sync: a load returned int 1"):
            await call(cls())
    with pytest.raises(cacheme.LoadError, match=r"Sync: .*not an awaitable"):
        await cacheme.get_all([cls(), cls()])
    with pytest.raises(cacheme.LoadError, match=r"returned str 'x'"):
        await cacheme.get(_Plain(), load_fn=lambda node: "x")
    assert stored("local", "cacheme:sync:") == (None, False)
    assert cacheme.stats(cls).load_failure_count() >= 2


async def test_a_load_all_that_is_not_async_fails_naming_the_node(local: Any) -> None:
    class Batch(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"batch:{self.n}"

        async def load(self) -> int:
            return self.n

        @classmethod
        def load_all(cls, nodes: Any) -> Any:  # type: ignore[override]
            return [(n, n.n) for n in nodes]

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    with pytest.raises(cacheme.LoadError, match=r"Batch: a load returned list"):
        await cacheme.get_all([Batch(1), Batch(2)])


SOURCE: dict[str, str] = {}


class _Slow(Node):
    """Reads the source when its load starts, answers 50 ms later."""

    def key(self) -> str:
        return "slow-source"

    async def load(self) -> str:
        value = SOURCE["v"]
        await asyncio.sleep(0.05)
        return value

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]


class _SlowStamped(_Slow):
    class Meta(Node.Meta):
        caches = [Cache(storage="local", ttl=timedelta(seconds=100))]
        refresh_after = 0.5  # stamped entries: the freshness path


@pytest.mark.parametrize("how", ["get", "get_all", "stamped get", "stamped get_all"])
async def test_a_get_after_another_threads_invalidate_never_joins_an_older_flight(
    local: Any, how: str
) -> None:
    """The other loop is busy while this one invalidates: its next get, made before that
    loop ran any callback (so before any message from here could reach it), must not join
    the flight that began before the invalidation."""
    node = _SlowStamped if how.startswith("stamped") else _Slow
    assert node._cacheme_config.stamped == how.startswith("stamped")
    SOURCE["v"] = "old"
    begun, invalidated = threading.Event(), threading.Event()
    seen: list[Any] = []

    async def other() -> None:
        first = asyncio.ensure_future(cacheme.get(node()))
        await asyncio.sleep(0.01)  # its load has read "old"
        begun.set()
        invalidated.wait(10)  # blocks this loop while the main thread invalidates
        if how.endswith("get"):
            seen.append(await cacheme.get(node()))
        else:
            seen.extend(await cacheme.get_all([node()]))
        seen.append(await first)

    thread = threading.Thread(target=lambda: asyncio.run(other()))
    thread.start()
    try:
        assert await asyncio.to_thread(begun.wait, 10)
        SOURCE["v"] = "new"
        await cacheme.invalidate(node())
        invalidated.set()
    finally:
        invalidated.set()
        await asyncio.to_thread(thread.join, 10)
    assert seen == ["new", "old"]  # the older flight's own caller still gets its value
    assert await cacheme.get(node()) == "new"


def test_a_forked_child_waits_for_none_of_its_parents_remote_writes() -> None:
    """The threads and loops sending the parent's writes are not in the child: its
    invalidates must not wait for them."""
    loop = asyncio.new_event_loop()
    entry = landing.Write(["cacheme:k:"], loop, print)
    with landing._lock:
        landing._pending["cacheme:k:"] = entry
    try:
        pid = os.fork()
        if pid == 0:  # the child: report, and leave at once
            os._exit(0 if not landing._pending and not landing.of("cacheme:k:") else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert landing.of("cacheme:k:") == [entry]  # the parent's own are still there
    finally:
        with landing._lock:
            landing._pending.clear()
        loop.close()


async def test_a_revoked_write_is_waited_for_once_and_removed_again_when_it_lands() -> None:
    """A write of another loop that does not land within the wait (its loop is stopped) is
    revoked: later invalidates do not wait for it again, and once it lands its own loop
    removes the key after it."""
    other = asyncio.new_event_loop()
    write = other.create_future()
    removed: list[list[str]] = []
    landing.note(["cacheme:r:", "cacheme:s:"], write, removed.append)
    try:
        writes = landing.of("cacheme:r:")
        assert len(writes) == 1
        started = time.monotonic()
        await landing.wait("cacheme:r:", writes, 0.05)
        assert 0.04 < time.monotonic() - started < 1
        assert landing.of("cacheme:r:") == []  # revoked: not waited for again
        assert len(landing.of("cacheme:s:")) == 1  # the write's other key was not revoked
        write.set_result(None)
        # The loop runs again (in a thread of its own): the write's callbacks run there.
        await asyncio.to_thread(other.run_until_complete, asyncio.sleep(0))
        assert removed == [["cacheme:r:"]]
        assert "cacheme:r:" not in landing._pending and "cacheme:s:" not in landing._pending
    finally:
        other.close()


async def test_quiesce_returns_when_what_is_left_is_done() -> None:
    """A task that is done but whose clean-up callback the loop has not run yet: waiting for
    the loop's work must not wait on it again (on Python 3.12+ a gather of done futures
    completes without yielding, so the clean-up never ran and the wait spun forever; the
    test suite's teardown hung on 3.12)."""
    rt = runtime.current()
    finished = rt.loop.create_future()
    finished.set_result(None)
    rt.tasks.add(finished)  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(rt.quiesce(5), 10)
    finally:
        rt.tasks.discard(finished)  # type: ignore[arg-type]


@pytest.mark.parametrize("begun", ["before", "after"])
@pytest.mark.parametrize("stamped", [False, True], ids=["plain", "stamped"])
@pytest.mark.parametrize("call", ["get", "get_all"])
def test_a_copy_between_local_tiers_never_undoes_an_invalidate(
    stamped: bool, call: str, begun: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chain [small local, local]: thread B's get misses the first tier, finds the key in the
    second and copies it forward. Thread A's invalidate between that read and the copy was
    undone: the old value went back into the first tier, served after invalidate returned
    (review 47). B is paused right after the second tier answered (a GIL switch there).
    ``begun``: B's get begins before A's invalidate, or after A noted the change but before
    it removed anything (review 51: then B's mark follows the note)."""

    register_local("front", "lru", size=2)
    register_local("back", "lru")
    source = {"v": 0}
    extra: dict[str, Any] = {"negative_ttl": timedelta(seconds=5)} if stamped else {}

    class Item(Node):
        def __init__(self, i: int) -> None:
            self.i = i

        def key(self) -> str:
            return f"copy-forward:{self.i}"

        async def load(self) -> int:
            return source["v"] if self.i == 0 else -1

        Meta = type(
            "Meta",
            (Node.Meta,),
            {
                "caches": [
                    Cache(storage="front", ttl=timedelta(seconds=30)),
                    Cache(storage="back", ttl=timedelta(seconds=60)),
                ],
                **extra,
            },
        )

    async def warm() -> None:
        assert await cacheme.get(Item(0)) == 0
        await cacheme.get(Item(1))
        await cacheme.get(Item(2))  # the front tier (size 2) lets key 0 go

    asyncio.run(warm())
    back = cacheme.storages()["back"]
    read, invalidated = threading.Event(), threading.Event()
    real_get = back.get  # type: ignore[attr-defined]

    def paused_get(key: str) -> Any:
        value = real_get(key)
        if threading.current_thread().name == "B" and key.startswith("cacheme:copy-forward:0"):
            read.set()
            invalidated.wait(5)
        return value

    back.get = paused_get  # type: ignore[attr-defined]
    noted = threading.Event()
    if begun == "after":
        from cacheme import api

        real_note = api.note_changed

        def note_then_wait(key: str) -> Any:
            writes = real_note(key)
            noted.set()
            read.wait(5)  # B reads the second tier now, before anything is removed
            return writes

        monkeypatch.setattr(api, "note_changed", note_then_wait)
    else:
        noted.set()
    try:

        def thread_b() -> None:
            noted.wait(5)
            if call == "get":
                asyncio.run(cacheme.get(Item(0)))
            else:
                asyncio.run(cacheme.get_all([Item(0)]))

        def thread_a() -> None:
            source["v"] = 1
            asyncio.run(cacheme.invalidate(Item(0)))
            invalidated.set()

        b = threading.Thread(target=thread_b, name="B", daemon=True)
        a = threading.Thread(target=thread_a, name="A", daemon=True)
        b.start()
        if begun == "before":
            assert read.wait(5)
        a.start()
        a.join(5)
        b.join(5)
        assert not a.is_alive() and not b.is_alive()
    finally:
        del back.get  # type: ignore[attr-defined]
    assert asyncio.run(cacheme.get(Item(0))) == 1


def test_a_forked_child_has_no_invalidation_of_its_parent_under_way() -> None:
    """A process forked while an invalidate of a key was under way in the parent kept the
    parent's note of it: no walk of the child wrote that key back for up to 1 + 6 x the
    storage timeout (review 51)."""
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    note = backplane.begin_removal("cacheme:forked:", 60.0)
    try:
        assert backplane.removing("cacheme:forked:")
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 when the note is gone
            os._exit(1 if backplane.removing("cacheme:forked:") else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        backplane.end_removal("cacheme:forked:", note)
    assert not backplane.removing("cacheme:forked:")


@pytest.mark.parametrize("stamped", [False, True], ids=["plain", "stamped"])
def test_two_threads_refreshing_one_key_leave_the_newer_value(
    stamped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread A's refresh registers first but notes the change after thread B's refresh
    began its walk: B, the newer one, wrote nothing (A's late note counted as a change
    since its mark), yet returned its value, and the old value stayed (review 52). A refresh
    no longer counts this process's notes: the refreshes it overtakes are detached anyway."""
    from cacheme import api

    register_local("l", "tlfu")
    source = {"v": 0}
    extra: dict[str, Any] = {"negative_ttl": timedelta(seconds=5)} if stamped else {}

    class Item(Node):
        def key(self) -> str:
            return "two-threads"

        async def load(self) -> int:
            value = source["v"]
            await asyncio.sleep(0.03)
            return value

        Meta = type(
            "Meta",
            (Node.Meta,),
            {"caches": [Cache(storage="l", ttl=timedelta(minutes=1))], **extra},
        )

    assert asyncio.run(cacheme.get(Item())) == 0
    in_window, b_began = threading.Event(), threading.Event()
    real_note = api.note_changed

    def late_note(key: str) -> Any:
        if threading.current_thread().name == "A":
            in_window.set()
            b_began.wait(5)
            time.sleep(0.01)  # B's walk took its mark
        return real_note(key)

    monkeypatch.setattr(api, "note_changed", late_note)
    out: dict[str, Any] = {}

    def thread_a() -> None:
        source["v"] = 1
        out["a"] = asyncio.run(cacheme.refresh(Item()))

    def thread_b() -> None:
        async def run() -> Any:
            in_window.wait(5)
            source["v"] = 2
            refreshing = asyncio.ensure_future(cacheme.refresh(Item()))
            await asyncio.sleep(0.005)
            b_began.set()
            return await refreshing

        out["b"] = asyncio.run(run())

    threads = [
        threading.Thread(target=thread_a, name="A", daemon=True),
        threading.Thread(target=thread_b, name="B", daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert out["b"] == 2
    assert asyncio.run(cacheme.get(Item())) == 2


def test_a_forked_child_counts_what_its_parent_kept_as_changed() -> None:
    """Marks taken in the parent (a value kept for stale-if-error carries one) compared as
    newer than the child's first changes, since the child's count started again from 0: a
    child that heard a key's invalidation still served the parent's kept value when its load
    failed (review 53)."""
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    for _ in range(5):
        backplane.note_invalidated(["cacheme:elsewhere:"])
    mark = backplane.sequence()  # what the parent's kept value carries
    pid = os.fork()
    if pid == 0:
        fresh = backplane.sequence()
        backplane._drop_local(["cacheme:kept:"])  # the message of another's invalidate
        ok = (
            backplane.changed_since("cacheme:kept:", mark)
            and backplane.changed_since("cacheme:kept:", fresh)
            and not backplane.changed_since("cacheme:other:", fresh)
        )
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_backplane_drop_waits_for_a_write_back_under_way() -> None:
    """A walk checked that the key had not changed, then wrote it to the local tier; the
    backplane's thread noted another process's invalidation and dropped the key between the
    two: the old value was written after the drop, and served for the local TTL (review 53).
    The drop now waits for the write guard: it comes after the write, and removes it."""

    register_local("l", "lru")
    source = {"v": 1}

    class Item(Node):
        def key(self) -> str:
            return "guarded"

        async def load(self) -> int:
            return source["v"]

        class Meta(Node.Meta):
            caches = [Cache(storage="l", ttl=timedelta(minutes=1))]

    storage = cacheme.storages()["l"]
    writing, dropped = threading.Event(), threading.Event()
    real_set = storage.set  # type: ignore[attr-defined]

    def slow_set(key: str, value: Any, ttl: Any) -> None:
        if key == "cacheme:guarded:" and not writing.is_set():
            writing.set()
            time.sleep(0.2)  # a thread switch between the check and the write
        real_set(key, value, ttl)

    storage.set = slow_set  # type: ignore[attr-defined]

    def message() -> None:
        writing.wait(5)
        source["v"] = 2
        backplane._drop_local(["cacheme:guarded:"])  # what the subscriber's thread does
        dropped.set()

    thread = threading.Thread(target=message, daemon=True)
    thread.start()
    try:
        assert asyncio.run(cacheme.get(Item())) == 1  # began before the invalidation
        thread.join(5)
        assert dropped.is_set()
    finally:
        del storage.set  # type: ignore[attr-defined]
    assert asyncio.run(cacheme.get(Item())) == 2


def test_a_refresh_overtaken_by_one_in_another_thread_returns_its_value() -> None:
    """Thread A's refresh (slow) is overtaken by thread B's (slower), still loading when A's
    ends: A read the tiers at once and returned the value from before both (review 54). It
    now waits for B to end (through its loop's call_soon_threadsafe), then reads."""

    register_local("l", "tlfu")
    source = {"v": 0}
    delay = {"A": 0.2, "B": 0.4}

    class Item(Node):
        def key(self) -> str:
            return "across-threads"

        async def load(self) -> int:
            value = source["v"]
            await asyncio.sleep(delay.get(threading.current_thread().name, 0.0))
            return value

        class Meta(Node.Meta):
            caches = [Cache(storage="l", ttl=None)]

    assert asyncio.run(cacheme.get(Item())) == 0
    out: dict[str, Any] = {}

    def thread_a() -> None:
        source["v"] = 1
        out["a"] = asyncio.run(cacheme.refresh(Item()))

    def thread_b() -> None:
        time.sleep(0.05)
        source["v"] = 2
        out["b"] = asyncio.run(cacheme.refresh(Item()))

    threads = [
        threading.Thread(target=thread_a, name="A", daemon=True),
        threading.Thread(target=thread_b, name="B", daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert out == {"a": 2, "b": 2}
    assert asyncio.run(cacheme.get(Item())) == 2


def test_a_refresh_under_way_when_its_loop_forks_writes_in_the_child() -> None:
    """``os.fork()`` inside a running loop, a refresh under way: in the child it wrote
    nothing (every change before the fork counted as newer than its mark) and the child
    kept serving the old value (review 54)."""
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")

    register_local("l", "tlfu")
    source = {"v": 1}

    class Item(Node):
        def key(self) -> str:
            return "forked-refresh"

        async def load(self) -> int:
            value = source["v"]
            await asyncio.sleep(0.05)
            return value

        class Meta(Node.Meta):
            caches = [Cache(storage="l", ttl=None)]

    async def run() -> int:
        assert await cacheme.get(Item()) == 1
        source["v"] = 2
        refreshing = asyncio.ensure_future(cacheme.refresh(Item()))
        await asyncio.sleep(0.01)  # its load is under way
        pid = os.fork()
        value = await refreshing
        served = await cacheme.get(Item())
        if pid == 0:
            os._exit(0 if (value, served) == (2, 2) else 1)
        assert (value, served) == (2, 2)
        return pid

    pid = asyncio.run(run())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_refresh_dropped_unsettled_keeps_no_one_waiting() -> None:
    """A refresh's call dropped without being settled (its load's task cancelled before its
    first step) gave its place back only when settled: a refresh it had overtaken in
    another loop would have waited for it for good."""
    import gc

    from cacheme import flight, refreshes

    held = [flight.Reload("cacheme:dropped:", "owner")]
    older_ticket = held[0].ticket - 1
    assert refreshes.newer("cacheme:dropped:", older_ticket)

    async def waiting() -> bool:
        ended = refreshes.ended("cacheme:dropped:", older_ticket)
        assert ended is not None
        held.clear()  # dropped, never settled
        gc.collect()
        await asyncio.wait_for(ended, 2)
        return True

    assert asyncio.run(waiting())
    assert "cacheme:dropped:" not in refreshes._by_key


def test_a_ticket_given_back_by_the_collector_under_the_lock_waits_for_nobody() -> None:
    """A refresh's call dropped in a reference cycle (a failed refresh keeps its traceback)
    is collected wherever Python allocates, also while its thread holds the table's lock:
    its finalizer waited for that lock, held by its own thread, for good (review 55). It
    now queues the ticket, given back once the lock is free."""
    import gc

    from cacheme import flight, refreshes

    def run() -> None:
        call = flight.Reload("cacheme:collected:", "owner")
        call.result = RuntimeError("failed"), call  # type: ignore[assignment]  # a cycle
        del call
        with refreshes._lock:
            gc.collect()  # the finalizer runs here, the lock held by this thread
        refreshes._drain()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert "cacheme:collected:" not in refreshes._by_key


def test_an_overtaken_refresh_follows_the_refreshes_of_another_loop_to_the_last() -> None:
    """Refresh A (thread 1) is overtaken by B1 (thread 2); while A waits, B2 overtakes B1,
    which then writes nothing: A waits for B2 too, and returns its value."""
    from cacheme import flight  # noqa: F401  # the Reload calls below are flight's

    register_local("l", "tlfu")
    gates = {v: threading.Event() for v in (1, 2, 3)}
    source = {"v": 0}

    class Item(Node):
        def key(self) -> str:
            return "overlapping"

        async def load(self) -> int:
            value = source["v"]
            gate = gates.get(value)
            if gate is not None:
                await asyncio.get_running_loop().run_in_executor(None, gate.wait, 5)
            return value

        class Meta(Node.Meta):
            caches = [Cache(storage="l", ttl=None)]

    assert asyncio.run(cacheme.get(Item())) == 0
    loop_b = asyncio.new_event_loop()
    thread_b = threading.Thread(target=loop_b.run_forever, daemon=True)
    thread_b.start()
    out: dict[str, Any] = {}

    def thread_a() -> None:
        source["v"] = 1
        out["a"] = asyncio.run(cacheme.refresh(Item()))

    a = threading.Thread(target=thread_a, daemon=True)
    try:
        a.start()
        time.sleep(0.1)  # A loads, held
        source["v"] = 2
        b1 = asyncio.run_coroutine_threadsafe(cacheme.refresh(Item()), loop_b)
        time.sleep(0.1)  # B1 loads, held
        gates[1].set()  # A's load ends: overtaken, it waits for B1
        time.sleep(0.1)
        source["v"] = 3
        b2 = asyncio.run_coroutine_threadsafe(cacheme.refresh(Item()), loop_b)
        time.sleep(0.1)  # B2 loads, held
        gates[2].set()  # B1 ends, overtaken: it wrote nothing, A waits on
        a.join(0.2)
        assert a.is_alive()
        gates[3].set()  # B2 ends and writes
        a.join(5)
        assert not a.is_alive()
        assert out["a"] == 3
        assert b1.result(5) == 3
        assert b2.result(5) == 3
        assert asyncio.run(cacheme.get(Item())) == 3
    finally:
        for gate in gates.values():
            gate.set()
        loop_b.call_soon_threadsafe(loop_b.stop)
        thread_b.join(5)
        loop_b.close()


def test_an_overtaken_refresh_returns_while_another_loop_keeps_refreshing() -> None:
    """Thread B starts a refresh of the key every 20 ms, each overtaking the last (none of
    them writes until they stop): refresh A of thread 1, overtaken, waited until no refresh
    of the key was under way, that is for good (review 55). It waits three generations at
    most, then reads."""

    register_local("l", "tlfu")
    stop = threading.Event()

    class Item(Node):
        def key(self) -> str:
            return "storm"

        async def load(self) -> float:
            await asyncio.sleep(0.05)
            return time.monotonic()

        class Meta(Node.Meta):
            caches = [Cache(storage="l", ttl=None)]

    asyncio.run(cacheme.get(Item()))

    def storm() -> None:
        async def run() -> None:
            tasks = []
            while not stop.is_set():
                tasks.append(asyncio.ensure_future(cacheme.refresh(Item())))
                await asyncio.sleep(0.02)
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(run())

    out: dict[str, Any] = {}

    def thread_a() -> None:
        out["a"] = asyncio.run(cacheme.refresh(Item()))

    b = threading.Thread(target=storm, daemon=True)
    a = threading.Thread(target=thread_a, daemon=True)
    try:
        b.start()
        time.sleep(0.05)
        a.start()
        a.join(3)
        assert not a.is_alive()
        assert isinstance(out["a"], float)
    finally:
        stop.set()
        b.join(5)
    assert not b.is_alive()


def test_an_overtaken_refresh_does_not_wait_for_an_older_one() -> None:
    """Refreshes R, then A, then B of one key, each in a thread of its own: B ends first
    and writes. A, overtaken by B, returns B's value at once, not after R (older, slow and
    overtaken too) has ended."""

    register_local("l", "tlfu")
    gates = {name: threading.Event() for name in ("R", "A")}
    source = {"v": "old"}

    class Item(Node):
        def key(self) -> str:
            return "older-one"

        async def load(self) -> str:
            value = source["v"]
            gate = gates.get(threading.current_thread().name)
            if gate is not None:
                await asyncio.get_running_loop().run_in_executor(None, gate.wait, 5)
            return value

        class Meta(Node.Meta):
            caches = [Cache(storage="l", ttl=None)]

    assert asyncio.run(cacheme.get(Item())) == "old"
    out: dict[str, Any] = {}

    def refresh_in(name: str, value: str) -> threading.Thread:
        def run() -> None:
            source["v"] = value
            out[name] = asyncio.run(cacheme.refresh(Item()))

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        time.sleep(0.1)  # its load is under way
        return thread

    try:
        r = refresh_in("R", "r")
        a = refresh_in("A", "a")
        b = refresh_in("B", "b")
        b.join(5)
        assert out.get("B") == "b"
        gates["A"].set()
        a.join(2)
        assert not a.is_alive()  # R still loading
        assert out["A"] == "b"
        gates["R"].set()
        r.join(5)
        assert out["R"] == "b"
        assert asyncio.run(cacheme.get(Item())) == "b"
    finally:
        for gate in gates.values():
            gate.set()
