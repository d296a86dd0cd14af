"""Serializers: typed round trips, safe decoding, raw pickle, zlib level 3, errors, fuzzing."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import uuid
import zlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import cacheme
from cacheme import Cache, DecodeError, EncodeError, Node
from cacheme.serializer import (
    CompressedJSONSerializer,
    CompressedMsgPackSerializer,
    CompressedPickleSerializer,
    JSONSerializer,
    MsgPackSerializer,
    PickleSerializer,
    Serializer,
)


class Address(BaseModel):
    city: str
    zip: str | None = None


class User(BaseModel):
    id: int
    name: str
    joined: dt.datetime
    tags: set[str]
    address: Address
    balance: Decimal
    uid: uuid.UUID


@dataclass
class Point:
    x: int
    y: float
    label: str = ""


USER = User(
    id=1,
    name="Ada",
    joined=dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc),
    tags={"admin", "ops"},
    address=Address(city="London"),
    balance=Decimal("12.34"),
    uid=uuid.UUID("12345678-1234-5678-1234-567812345678"),
)

TYPED_VALUES: list[tuple[Any, Any]] = [
    (User, USER),
    (list[User], [USER, USER.model_copy(update={"id": 2})]),
    (dict[str, User], {"a": USER}),
    (Point, Point(1, 2.5, "p")),
    (list[Point], [Point(1, 2.0), Point(3, 4.0)]),
    (dt.datetime, dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)),
    (dt.date, dt.date(2020, 1, 2)),
    (dt.timedelta, dt.timedelta(seconds=90, milliseconds=5)),
    (uuid.UUID, uuid.UUID("12345678-1234-5678-1234-567812345678")),
    (Decimal, Decimal("3.14159265358979323846")),
    (set[int], {1, 2, 3}),
    (frozenset[str], frozenset({"a", "b"})),
    (tuple[int, str], (1, "a")),
    (dict[int, str], {1: "a", 2: "b"}),
    (int | None, None),
    (bytes, b"utf-8 bytes"),
    (str, "unicode ✓ 用户"),
    (float, 1.5),
]

TYPED = [
    JSONSerializer(),
    MsgPackSerializer(),
    CompressedJSONSerializer(),
    CompressedMsgPackSerializer(),
]
ALL: list[Serializer] = [*TYPED, PickleSerializer(), CompressedPickleSerializer()]


def ids(s: Serializer) -> str:
    return type(s).__name__


@pytest.mark.parametrize("serializer", TYPED, ids=ids)
@pytest.mark.parametrize(("tp", "value"), TYPED_VALUES, ids=lambda x: repr(x)[:30])
def test_typed_round_trip(serializer: Serializer, tp: Any, value: Any) -> None:
    data = serializer.dumps(value)
    assert isinstance(data, bytes)
    back = serializer.loads(data, tp)
    assert back == value
    assert type(back) is type(value)


@pytest.mark.parametrize("serializer", [PickleSerializer(), CompressedPickleSerializer()], ids=ids)
@pytest.mark.parametrize(("tp", "value"), TYPED_VALUES, ids=lambda x: repr(x)[:30])
def test_pickle_round_trip(serializer: Serializer, tp: Any, value: Any) -> None:
    back = serializer.loads(serializer.dumps(value))
    assert back == value
    assert type(back) is type(value)


@pytest.mark.parametrize("serializer", TYPED, ids=ids)
def test_untyped_decoding_gives_plain_data(serializer: Serializer) -> None:
    back = serializer.loads(serializer.dumps(USER))
    assert back["name"] == "Ada"
    assert back["address"] == {"city": "London", "zip": None}
    assert back["uid"] == "12345678-1234-5678-1234-567812345678"
    assert sorted(back["tags"]) == ["admin", "ops"]
    assert serializer.loads(serializer.dumps([1, "a", None, True])) == [1, "a", None, True]


@pytest.mark.parametrize("serializer", TYPED, ids=ids)
def test_wrong_shape_for_the_type_is_a_decode_error(serializer: Serializer) -> None:
    with pytest.raises(DecodeError, match=type(serializer).__name__):
        serializer.loads(serializer.dumps({"id": "not a number"}), User)


# -- the value type comes from load()'s return annotation ---------------------------------


class UserNode(Node):
    def key(self) -> str:
        return "user"

    async def load(self) -> User:
        return USER

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]
        serializer = MsgPackSerializer()


class UsersNode(Node):
    def key(self) -> str:
        return "users"

    async def load(self) -> list[User]:
        return [USER]

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]
        serializer = JSONSerializer()


class EarlyNode(Node):
    """Declared before the model its load() returns (a forward reference)."""

    def key(self) -> str:
        return "early"

    async def load(self) -> LateModel:
        return LateModel(x=1)

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]
        serializer = JSONSerializer()


class LateModel(BaseModel):
    x: int


@pytest.fixture
async def local() -> None:
    await cacheme.register_storage("local", cacheme.Storage(url="local://lru", size=10))


async def value_type(node: Node) -> Any:
    await cacheme.get(node)  # the type is read at first use, with the storage names
    return type(node)._cacheme_config.value_type


@pytest.mark.usefixtures("local")
async def test_node_value_type_rebuilds_a_model() -> None:
    tp = await value_type(UserNode())
    assert tp is User
    serializer = MsgPackSerializer()
    back = serializer.loads(serializer.dumps(USER), tp)
    assert isinstance(back, User)
    assert back == USER


@pytest.mark.usefixtures("local")
async def test_node_value_type_rebuilds_a_list_of_models() -> None:
    tp = await value_type(UsersNode())
    assert tp == list[User]
    back = JSONSerializer().loads(JSONSerializer().dumps([USER, USER]), tp)
    assert isinstance(back, list)
    assert all(isinstance(u, User) for u in back)


@pytest.mark.usefixtures("local")
async def test_value_type_may_be_declared_after_the_node() -> None:
    assert await value_type(EarlyNode()) is LateModel


@pytest.mark.usefixtures("local")
async def test_untyped_load_decodes_plain_data() -> None:
    class Untyped(Node):
        def key(self) -> str:
            return "untyped"

        async def load(self):  # type: ignore[no-untyped-def]
            return 1

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    assert await value_type(Untyped()) is Any


# -- decoding never imports or calls what the data names ----------------------------------

HOSTILE = {
    "__class__": "os.system",
    "py/object": "os.system",
    "__reduce__": ["os.system", ["echo pwned"]],
    "args": ["echo pwned"],
}


@pytest.mark.parametrize("serializer", TYPED, ids=ids)
def test_class_names_in_data_stay_plain_data(
    serializer: Serializer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import os

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoding tried to import or call something")

    monkeypatch.setattr(os, "system", forbidden)
    real_import = builtins.__import__

    def guarded_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in ("os", "subprocess", "posix"):
            forbidden()
        return real_import(name, *args, **kwargs)

    raw = json.dumps(HOSTILE).encode()
    data = serializer.dumps(HOSTILE) if not isinstance(serializer, JSONSerializer) else raw
    monkeypatch.setattr(builtins, "__import__", guarded_import)
    try:
        back = serializer.loads(data)
        with pytest.raises(DecodeError):
            serializer.loads(data, User)
    finally:
        monkeypatch.setattr(builtins, "__import__", real_import)
    assert back == HOSTILE
    assert serializer.loads(data, dict[str, Any]) == HOSTILE


@pytest.mark.parametrize("code", [0, 1, 42, 127])
def test_msgpack_ext_types_are_not_resolved(code: int) -> None:
    data = msgpack.packb({"v": msgpack.ExtType(code, b"os.system")}, use_bin_type=True)
    for serializer in (MsgPackSerializer(), CompressedMsgPackSerializer()):
        payload = data if isinstance(serializer, MsgPackSerializer) else zlib.compress(data, 3)
        try:
            back = serializer.loads(payload)
        except DecodeError:
            continue
        assert back == {"v": msgpack.ExtType(code, b"os.system")}
        with pytest.raises(DecodeError):
            serializer.loads(payload, dict[str, str])


# -- pickle is raw, compression is zlib level 3 ---------------------------------------------


def test_pickle_stores_raw_bytes() -> None:
    data = PickleSerializer().dumps(USER)
    assert pickle.loads(data) == USER
    assert data[:1] == b"\x80"  # a pickle protocol header, not base64 text


@pytest.mark.parametrize(
    ("compressed", "inner"),
    [
        (CompressedPickleSerializer(), PickleSerializer()),
        (CompressedJSONSerializer(), JSONSerializer()),
        (CompressedMsgPackSerializer(), MsgPackSerializer()),
    ],
    ids=lambda s: type(s).__name__,
)
def test_compressed_is_zlib_level_3_of_the_inner_bytes(
    compressed: Serializer, inner: Serializer
) -> None:
    value = {"users": [USER.model_dump(mode="json")] * 20}
    raw = inner.dumps(value)
    data = compressed.dumps(value)
    assert zlib.decompress(data) == raw
    assert data == zlib.compress(raw, 3)
    assert len(data) < len(raw)
    assert compressed.loads(data) == inner.loads(raw)


# -- errors ----------------------------------------------------------------------------------


class Opaque:
    """Neither JSON-able nor picklable."""

    def __reduce__(self) -> Any:
        raise TypeError("opaque objects cannot be pickled")


@pytest.mark.parametrize("serializer", ALL, ids=ids)
@pytest.mark.parametrize("value", [Opaque(), lambda: 1], ids=["object", "lambda"])
def test_unencodable_value_is_an_encode_error_naming_the_serializer(
    serializer: Serializer, value: Any
) -> None:
    with pytest.raises(EncodeError, match=type(serializer).__name__) as info:
        serializer.dumps(value)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("serializer", TYPED, ids=ids)
def test_binary_bytes_are_not_json_able(serializer: Serializer) -> None:
    with pytest.raises(EncodeError, match=type(serializer).__name__):
        serializer.dumps(b"\x00\xff")


@pytest.mark.parametrize("serializer", ALL, ids=ids)
def test_garbage_is_a_decode_error(serializer: Serializer) -> None:
    with pytest.raises(DecodeError, match=type(serializer).__name__):
        serializer.loads(b"\xc1\xff not a value \x00")


def test_serializers_compare_by_type() -> None:
    assert JSONSerializer() == JSONSerializer()
    assert JSONSerializer() != MsgPackSerializer()
    assert len({JSONSerializer(), JSONSerializer(), PickleSerializer()}) == 2
    assert repr(CompressedJSONSerializer()) == "CompressedJSONSerializer()"


# -- fuzz: only DecodeError comes out ---------------------------------------------------------

SAMPLES = [USER.model_dump(mode="json"), [1, 2.5, "x", None, {"a": [True]}], "text", 7]


def _check_only_decode_error(serializer: Serializer, data: bytes, tp: Any) -> None:
    try:
        if tp is None:
            serializer.loads(data)
        else:
            serializer.loads(data, tp)
    except DecodeError:
        pass


@pytest.mark.parametrize("serializer", ALL, ids=ids)
@settings(max_examples=150, deadline=None, database=None)
@given(data=st.binary(max_size=256), tp=st.sampled_from([None, User, list[int], dict[str, Any]]))
def test_fuzz_random_bytes(serializer: Serializer, data: bytes, tp: Any) -> None:
    _check_only_decode_error(serializer, data, tp)


@pytest.mark.parametrize("serializer", ALL, ids=ids)
@settings(max_examples=150, deadline=None, database=None)
@given(
    sample=st.sampled_from(SAMPLES),
    cut=st.integers(min_value=0, max_value=400),
    flip=st.integers(min_value=0, max_value=400),
    tp=st.sampled_from([None, User, list[Any]]),
)
def test_fuzz_truncated_and_flipped_bytes(
    serializer: Serializer, sample: Any, cut: int, flip: int, tp: Any
) -> None:
    data = serializer.dumps(sample)
    _check_only_decode_error(serializer, data[: cut % (len(data) + 1)], tp)
    mutated = bytearray(data)
    mutated[flip % len(mutated)] ^= 0xFF
    _check_only_decode_error(serializer, bytes(mutated), tp)
