"""The serializer and doorkeeper a user writes: cacheme 0.3.0's protocols are taken as they
are, and a serializer is held to its contract (bytes out, ``EncodeError`` on failure).

The remote tier is SQLite (embedded, no server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import cacheme
from cacheme import BloomFilter, Cache, EncodeError, Node, Storage, schemas
from cacheme.serializer import JSONSerializer, MsgPackSerializer, Serializer

# The remote tier is SQLite: its driver is optional (scripts/minimal leaves it out).
pytestmark = pytest.mark.needs_dev


@pytest.fixture
async def sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/protocols.db"
    await schemas.create(url)
    await cacheme.register_storage("sqlite", Storage(url=url))
    return "sqlite"


class Plain:
    """A serializer of cacheme 0.3.0: no base class, ``loads(blob)``."""

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj).encode()

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob)


class OldSignature(Serializer):
    """A subclass with 0.3.0's ``loads(blob)``: no value type."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value).encode()

    def loads(self, blob: bytes) -> Any:  # type: ignore[override]
        return json.loads(blob)


class Text(Serializer):
    """A common slip: ``dumps`` returns str."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value)  # type: ignore[return-value]

    def loads(self, data: bytes, value_type: Any = Any) -> Any:
        return json.loads(data)


class Raising(Serializer):
    def dumps(self, value: Any) -> bytes:
        raise ValueError("cannot dump")


def node_class(serializer: Any, name: str, **meta: Any) -> type[Node]:
    """A node class of ``Item``s keyed ``{name}:{n}``, cached in the SQLite tier."""
    loads: list[int] = []

    class Item(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"{name}:{self.n}"

        async def load(self) -> dict[str, int]:
            loads.append(self.n)
            return {"n": self.n}

        class Meta(Node.Meta):
            caches = [Cache(storage="sqlite", ttl=None)]

        Meta.serializer = serializer
        for option, value in meta.items():
            setattr(Meta, option, value)

    Item.loads = loads  # type: ignore[attr-defined]
    return Item


@pytest.mark.parametrize("serializer", [Plain(), OldSignature()], ids=["protocol", "subclass"])
async def test_a_serializer_of_cacheme_030_round_trips(sqlite: str, serializer: Any) -> None:
    """Before: the protocol object was refused at declaration, and the subclass's
    ``loads(blob)`` raised ``TypeError`` on every read, counted as a decode error: every get
    loaded again."""
    item = node_class(serializer, f"Old{type(serializer).__name__}")
    for _ in range(3):
        assert await cacheme.get(item(1)) == {"n": 1}
    stats = cacheme.stats(item)
    assert item.loads == [1]  # type: ignore[attr-defined]
    assert stats.hit_count() == 2 and stats.decode_error_count() == 0
    assert repr(item._cacheme_config.serializer) == repr(serializer)


@pytest.mark.parametrize(
    ("serializer", "message"),
    [
        (Text(), r"node \S+Item: Text\(\)\.dumps returned str, not bytes"),
        (
            Raising(),
            r"node \S+Item: Raising\(\) cannot encode dict: ValueError\('cannot dump'\)",
        ),
    ],
)
async def test_a_serializer_breaking_its_contract_is_an_encode_error(
    sqlite: str, serializer: Serializer, message: str
) -> None:
    """Before: a str from ``dumps`` was stored, and every later read of that key failed for
    its whole batch (SQLite; PostgreSQL and MySQL failed the write with a driver error), and
    a ``ValueError`` from ``dumps`` reached the caller bare, naming nothing."""
    item = node_class(serializer, f"{type(serializer).__name__}Item")
    with pytest.raises(EncodeError, match=message):
        await cacheme.get(item(1))
    storage = cacheme.storages()["sqlite"]
    assert storage.stats.keys_written == 0  # type: ignore[attr-defined]


async def test_a_doorkeeper_of_cacheme_030(sqlite: str) -> None:
    """0.3.0's doorkeeper protocol: ``put(key)`` and ``contains(key)``."""

    class Seen:
        def __init__(self) -> None:
            self.keys: set[str] = set()

        def put(self, key: str) -> None:
            self.keys.add(key)

        def contains(self, key: str) -> bool:
            return key in self.keys

    keeper = Seen()
    item = node_class(Plain(), "Kept", doorkeeper=keeper)
    assert await cacheme.get(item(1)) == {"n": 1}  # first sighting: not written
    assert await cacheme.get(item(1)) == {"n": 1}  # second: written
    assert await cacheme.get(item(1)) == {"n": 1}  # a hit
    assert item.loads == [1, 1]  # type: ignore[attr-defined]
    assert len(keeper.keys) == 1


def test_bloom_filter_has_the_030_methods() -> None:
    bloom = BloomFilter(100, 0.01)
    assert not bloom.contains("a")
    bloom.put("a")
    assert bloom.contains("a") and not bloom.contains("b")
    assert bloom.admit("a")  # admit sees what put recorded


class NotAModel:
    def __init__(self, n: int) -> None:
        self.n = n


@pytest.mark.parametrize("serializer", [JSONSerializer(), MsgPackSerializer()])
async def test_an_annotation_pydantic_cannot_build_decodes_to_plain_data(
    sqlite: str, serializer: Serializer, caplog: pytest.LogCaptureFixture
) -> None:
    """``load()`` annotated with a type pydantic cannot validate into (a plain class here;
    ``typing.TypedDict`` on Python < 3.12 too): remote values decode to plain data, with one
    warning, as for an annotation that cannot be resolved. Before, every read failed to
    decode and every get loaded again, forever."""
    loads: list[int] = []

    class Annotated(Node):
        def key(self) -> str:
            return "annotated"

        async def load(self) -> NotAModel:
            loads.append(1)
            return {"n": 1}  # type: ignore[return-value]

        class Meta(Node.Meta):
            caches = [Cache(storage="sqlite", ttl=None)]

        Meta.serializer = serializer

    for _ in range(3):
        assert await cacheme.get(Annotated()) == {"n": 1}
    assert loads == [1]
    assert cacheme.stats(Annotated).decode_error_count() == 0
    warnings = [r for r in caplog.records if "cannot decode into the annotation" in r.message]
    assert len(warnings) == 1 and "NotAModel" in warnings[0].message


async def test_a_key_no_remote_tier_can_store_is_said_once(
    sqlite: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A key holding a lone surrogate cannot be sent to any remote tier: it is loaded on
    every get, as before, but a warning now says why (review 41: no word, no counter)."""
    item = node_class(JSONSerializer(), "Unstorable")
    for _ in range(3):
        assert await cacheme.get(item("k\udc80")) == {"n": "k\udc80"}
    assert item.loads == ["k\udc80"] * 3  # type: ignore[attr-defined]
    said = [r for r in caplog.records if "is not valid UTF-8" in r.message]
    assert len(said) == 1 and "Unstorable" in said[0].message and "'sqlite'" in said[0].message
