"""A ``refresh`` during a clear of every key (the backplane subscribing anew: in a forked
process, or after a lost link) still writes its value to the shared tier.

The shared tier is SQLite (embedded, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

import cacheme
from cacheme import Cache, Node, Storage, backplane, schemas
from cacheme.serializer import MsgPackSerializer

# The shared tier is SQLite: its driver is optional (scripts/minimal leaves it out).
pytestmark = pytest.mark.needs_dev


async def test_a_refresh_during_a_clear_of_every_key_writes_the_shared_tier(
    tmp_path: Path,
) -> None:
    """Found at the end of the sixth session (a pool worker refreshing at once after its
    fork, 2 of 10 runs): the clear counted as a change of the key, so the refresh wrote
    nowhere and returned normally, and the shared tier kept the old value. Only an
    invalidation of the key itself keeps a refresh from writing a shared tier now."""
    url = f"sqlite:///{tmp_path}/clears.db"
    await schemas.create(url)
    await cacheme.register_storage("shared", Storage(url=url))
    await cacheme.register_storage("local", Storage(url="local://lru", size=100))
    loads: list[int] = []

    class Refreshed(Node):
        def key(self) -> str:
            return "refreshed"

        async def load(self) -> int:
            loads.append(1)
            if len(loads) == 2:  # the refresh: the backplane subscribes anew meanwhile
                backplane._clear_local()
            return len(loads)

        class Meta(Node.Meta):
            caches = [Cache(storage="local", ttl=None), Cache(storage="shared", ttl=None)]
            serializer = MsgPackSerializer()

    class SharedOnly(Node):  # the same key, read from the shared tier alone
        def key(self) -> str:
            return "refreshed"

        class Meta(Node.Meta):
            caches = [Cache(storage="shared", ttl=None)]
            serializer = MsgPackSerializer()

    assert await cacheme.get(Refreshed()) == 1
    assert await cacheme.refresh(Refreshed()) == 2
    assert await cacheme.get(SharedOnly()) == 2
    assert await cacheme.get(Refreshed()) == 2  # the cleared local tier reads it back


def test_a_clear_keeps_what_was_invalidated_before_it() -> None:
    """A key another process invalidated after a mark, then a clear of every key: the key
    still counts as invalidated (the clear must not hide it from a refresh's write to a
    shared tier). This process's own notes do not count for a refresh (they detach the
    refreshes they overtake)."""
    mark = backplane.sequence()
    backplane._drop_local(["k1"])  # what a backplane message does
    backplane.note_invalidated(["k3"])  # this process's own
    backplane._clear_local()
    assert backplane.invalidated_elsewhere_since("k1", mark)
    assert not backplane.invalidated_elsewhere_since("k2", mark)
    assert not backplane.invalidated_elsewhere_since("k3", mark)
    assert backplane.cleared_since(mark)
    assert backplane.changed_since("k2", mark)  # the local tiers' view: everything changed
