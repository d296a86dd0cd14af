"""Serializers: typed round trips, safe decoding, raw pickle, zlib level 3, errors, fuzzing."""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import pickle
import sqlite3
import uuid
import zlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

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


@pytest.mark.parametrize("serializer", ALL, ids=ids)
@pytest.mark.parametrize(("tp", "value"), TYPED_VALUES, ids=lambda x: repr(x)[:30])
def test_decoder_decodes_as_loads_does(serializer: Serializer, tp: Any, value: Any) -> None:
    # What a tier uses: one function per value type (MsgPack's own finds its validator once).
    data = serializer.dumps(value)
    back = serializer.decoder(tp)(data)
    assert back == serializer.loads(data, tp)
    assert type(back) is type(serializer.loads(data, tp))
    assert serializer.decoder()(data) == serializer.loads(data)


@pytest.mark.parametrize("serializer", ALL, ids=ids)
def test_decoder_errors_are_those_of_loads(serializer: Serializer) -> None:
    garbage = b"\xc1\xff not a value \x00"
    with pytest.raises(DecodeError, match=type(serializer).__name__):
        serializer.decoder(dict[str, int])(garbage)
    if serializer not in (PickleSerializer(), CompressedPickleSerializer()):
        with pytest.raises(DecodeError, match=type(serializer).__name__):
            serializer.decoder(User)(serializer.dumps({"id": "not a number"}))


def test_msgpack_decoder_keeps_tuple_keys_and_refuses_ext_types() -> None:
    serializer = MsgPackSerializer()
    data = serializer.dumps({(1, 2): "a"})
    assert serializer.decoder(dict[tuple[int, int], str])(data) == {(1, 2): "a"}
    ext = msgpack.packb(msgpack.ExtType(42, b"x"))
    with pytest.raises(DecodeError, match="extension type 42"):
        serializer.decoder(dict[str, Any])(ext)


def test_msgpack_subclass_with_its_own_loads_keeps_it_in_its_decoder() -> None:
    class Upper(MsgPackSerializer):
        def loads(self, data: bytes, value_type: Any = Any) -> Any:
            return str(super().loads(data, value_type)).upper()

    assert Upper().decoder(str)(Upper().dumps("abc")) == "ABC"


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


@pytest.mark.parametrize("serializer", [JSONSerializer(), CompressedJSONSerializer()], ids=ids)
def test_binary_bytes_are_not_json_able(serializer: Serializer) -> None:
    with pytest.raises(EncodeError, match=type(serializer).__name__) as info:
        serializer.dumps(b"\x00\xff")
    assert "MsgPackSerializer" in str(info.value)  # the error says what to use instead


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


# -- the round-trip table: values x serializers x typed/untyped -------------------------------
#
# The module docstring of cacheme.serializer lists what each serializer round-trips; this
# table is that list, with its neighbours. A value round-trips when it comes back equal and of
# the same type (NaN equal to NaN): what a hit returns is then what the miss returned.


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    LOW = 1


class Pair(NamedTuple):
    left: int
    right: str


class Aliased(BaseModel):
    user_name: str = Field(alias="userName")
    raw: bytes = b""


class Blob(BaseModel):
    data: bytes
    parts: tuple[bytes, ...] = ()


class Floats(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")
    value: float


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True)
    when: dt.datetime
    ids: tuple[int, ...]
    price: Decimal


@dataclass
class Packet:
    header: bytes
    when: dt.date
    tags: frozenset[str]


class _Same:
    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()  # the untyped decoding gives the value itself back
FAILS: Any = EncodeError  # the serializer refuses the value
NAN = float("nan")
UTC = dt.timezone.utc
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
BIN = b"\xff\x00\x80binary"

# (id, annotation, value, untyped JSON gives, untyped MsgPack gives)
TABLE: list[tuple[str, Any, Any, Any, Any]] = [
    ("none", None, None, SAME, SAME),
    ("true", bool, True, SAME, SAME),
    ("zero", int, 0, SAME, SAME),
    ("int64-min", int, -(2**63), SAME, SAME),
    ("uint64-max", int, 2**64 - 1, SAME, SAME),
    ("int-2**64", int, 2**64, SAME, FAILS),
    ("int-below-int64", int, -(2**63) - 1, SAME, FAILS),
    ("int-2**100", int, 2**100, SAME, FAILS),
    ("float", float, 1.5, SAME, SAME),
    ("float-nan", float, NAN, SAME, SAME),
    ("float-inf", float, float("inf"), SAME, SAME),
    ("float-neg-inf", float, float("-inf"), SAME, SAME),
    ("str-empty", str, "", SAME, SAME),
    ("str-unicode", str, "unicode ✓ 用户 \x00 \U0001f600", SAME, SAME),
    ("str-surrogate", str, "\ud800", FAILS, FAILS),
    ("bytes-empty", bytes, b"", "", SAME),
    ("bytes-text", bytes, b"abc", "abc", SAME),
    ("bytes-binary", bytes, BIN, FAILS, SAME),
    ("list-empty", list[int], [], SAME, SAME),
    ("dict-empty", dict[str, int], {}, SAME, SAME),
    ("tuple-empty", tuple[()], (), [], []),
    ("tuple", tuple[int, str], (1, "a"), [1, "a"], [1, "a"]),
    ("tuple-var", tuple[bytes, ...], (b"a", b"b"), ["a", "b"], [b"a", b"b"]),
    ("namedtuple", Pair, Pair(1, "x"), [1, "x"], [1, "x"]),
    ("set", set[int], {1, 2, 3}, [1, 2, 3], [1, 2, 3]),
    ("set-empty", set[str], set(), [], []),
    ("frozenset", frozenset[str], frozenset({"a"}), ["a"], ["a"]),
    ("dict-int-keys", dict[int, str], {1: "a", 2: "b"}, {"1": "a", "2": "b"}, SAME),
    ("dict-bytes-keys", dict[bytes, int], {b"\xffk": 1}, FAILS, SAME),
    ("dict-tuple-keys", dict[tuple[int, int], str], {(1, 2): "x"}, {"1,2": "x"}, SAME),
    ("nested", dict[str, list[dict[str, int | None]]], {"a": [{"b": 1, "c": None}]}, SAME, SAME),
    ("nested-binary", list[tuple[int, bytes]], [(1, BIN)], FAILS, [[1, BIN]]),
    (
        "datetime-naive",
        dt.datetime,
        dt.datetime(2020, 1, 2, 3, 4, 5, 6),
        "2020-01-02T03:04:05.000006",
        "2020-01-02T03:04:05.000006",
    ),
    (
        "datetime-utc",
        dt.datetime,
        dt.datetime(2020, 1, 2, tzinfo=UTC),
        "2020-01-02T00:00:00Z",
        "2020-01-02T00:00:00Z",
    ),
    (
        "datetime-ist",
        dt.datetime,
        dt.datetime(2020, 1, 2, tzinfo=IST),
        "2020-01-02T00:00:00+05:30",
        "2020-01-02T00:00:00+05:30",
    ),
    ("date", dt.date, dt.date(1999, 12, 31), "1999-12-31", "1999-12-31"),
    ("time", dt.time, dt.time(23, 59, 58, 999), "23:59:58.000999", "23:59:58.000999"),
    (
        "timedelta",
        dt.timedelta,
        dt.timedelta(days=1, microseconds=1),
        "P1DT0.000001S",
        "P1DT0.000001S",
    ),
    ("timedelta-negative", dt.timedelta, dt.timedelta(seconds=-5), "-PT5S", "-PT5S"),
    (
        "decimal",
        Decimal,
        Decimal("3.14159265358979323846"),
        "3.14159265358979323846",
        "3.14159265358979323846",
    ),
    ("decimal-nan", Decimal, Decimal("NaN"), "NaN", "NaN"),
    ("decimal-inf", Decimal, Decimal("-Infinity"), "-Infinity", "-Infinity"),
    ("uuid", uuid.UUID, uuid.UUID(int=7), str(uuid.UUID(int=7)), str(uuid.UUID(int=7))),
    ("enum", Color, Color.RED, "red", "red"),
    ("intenum", Level, Level.LOW, 1, 1),
    ("optional", int | None, None, SAME, SAME),
    ("union", int | str, "x", SAME, SAME),
    (
        "dataclass",
        Point,
        Point(1, 2.5, "p"),
        {"x": 1, "y": 2.5, "label": "p"},
        {"x": 1, "y": 2.5, "label": "p"},
    ),
    (
        "dataclass-binary",
        Packet,
        Packet(BIN, dt.date(2020, 1, 1), frozenset({"t"})),
        FAILS,
        {"header": BIN, "when": "2020-01-01", "tags": ["t"]},
    ),
    ("model", User, USER, dict, dict),
    (
        "model-alias",
        Aliased,
        Aliased(userName="ada", raw=b"r"),
        {"userName": "ada", "raw": "r"},
        {"userName": "ada", "raw": b"r"},
    ),
    (
        "model-binary",
        Blob,
        Blob(data=BIN, parts=(BIN, b"")),
        FAILS,
        {"data": BIN, "parts": [BIN, b""]},
    ),
    ("model-nan", Floats, Floats(value=NAN), {"value": NAN}, {"value": NAN}),
    (
        "model-strict",
        StrictModel,
        StrictModel(when=dt.datetime(2020, 1, 1), ids=(1, 2), price=Decimal("1.5")),
        dict,
        dict,
    ),
    ("list-of-models", list[User], [USER, USER], list, list),
    ("dict-of-dataclasses", dict[str, Point | None], {"a": Point(1, 2.0), "b": None}, dict, dict),
]
JSON_KIND = [JSONSerializer(), CompressedJSONSerializer()]
MSGPACK_KIND = [MsgPackSerializer(), CompressedMsgPackSerializer()]
PICKLE_KIND = [PickleSerializer(), CompressedPickleSerializer()]


def same(back: Any, value: Any) -> bool:
    """Equal and of the same type, NaN included, recursively for the NaN cases."""
    if type(back) is not type(value):
        return False
    if isinstance(value, float) and math.isnan(value):
        return math.isnan(back)
    if isinstance(value, Decimal) and value.is_nan():
        return bool(back.is_nan())
    if isinstance(value, dict):
        return back.keys() == value.keys() and all(same(back[k], value[k]) for k in value)
    if isinstance(value, Floats):
        return same(back.value, value.value)
    return bool(back == value)


def table(kind: list[Serializer], column: int) -> list[Any]:
    return [
        pytest.param(s, row[1], row[2], row[column], id=f"{ids(s)}-{row[0]}")
        for s in kind
        for row in TABLE
    ]


ROUND_TRIPS = table(JSON_KIND, 3) + table(MSGPACK_KIND, 4)


@pytest.mark.parametrize(("serializer", "tp", "value", "untyped"), ROUND_TRIPS)
def test_typed_decoding_gives_the_value_back(
    serializer: Serializer, tp: Any, value: Any, untyped: Any
) -> None:
    if untyped is FAILS:
        with pytest.raises(EncodeError, match=type(serializer).__name__) as info:
            serializer.dumps(value)
        assert type(value).__name__ in str(info.value)
        return
    data = serializer.dumps(value)
    if isinstance(serializer, _JSON) and value == {(1, 2): "x"}:
        with pytest.raises(DecodeError):
            serializer.loads(data, tp)
        return
    back = serializer.loads(data, tp)
    assert same(back, value), (back, value)


@pytest.mark.parametrize(("serializer", "tp", "value", "untyped"), ROUND_TRIPS)
def test_untyped_decoding_gives_the_documented_form(
    serializer: Serializer, tp: Any, value: Any, untyped: Any
) -> None:
    if untyped is FAILS:
        return  # the typed test checks the EncodeError
    back = serializer.loads(serializer.dumps(value))
    if untyped is SAME:
        assert same(back, value), (back, value)
    elif isinstance(untyped, type):
        assert type(back) is untyped
    else:
        assert same(back, untyped), (back, untyped)


@pytest.mark.parametrize(
    ("serializer", "tp", "value"),
    [
        pytest.param(s, row[1], row[2], id=f"{ids(s)}-{row[0]}")
        for s in PICKLE_KIND
        for row in TABLE
    ],
)
def test_pickle_gives_every_value_back_typed_and_untyped(
    serializer: Serializer, tp: Any, value: Any
) -> None:
    data = serializer.dumps(value)
    assert same(serializer.loads(data), value)
    assert same(serializer.loads(data, tp), value)


@pytest.mark.parametrize("serializer", [*JSON_KIND, *MSGPACK_KIND], ids=ids)
@pytest.mark.parametrize("value", [bytearray(b"ab"), memoryview(b"ab")], ids=type)
def test_bytearray_and_memoryview_come_back_as_bytes(serializer: Serializer, value: Any) -> None:
    if isinstance(serializer, _JSON) and isinstance(value, memoryview):
        with pytest.raises(EncodeError, match="memoryview"):
            serializer.dumps(value)
        return
    data = serializer.dumps(value)
    assert serializer.loads(data, bytes) == b"ab"
    assert type(serializer.loads(data, bytes)) is bytes
    with pytest.raises(DecodeError):
        serializer.loads(data, type(value))  # pydantic has no such type: documented


_JSON = (JSONSerializer, CompressedJSONSerializer)


def test_msgpack_writes_bytes_as_bin_and_text_as_str() -> None:
    data = MsgPackSerializer().dumps({"b": BIN, "s": "text"})
    assert msgpack.unpackb(data, raw=True) == {b"b": BIN, b"s": b"text"}
    assert data == msgpack.packb({"b": BIN, "s": "text"}, use_bin_type=True)
    assert MsgPackSerializer().loads(data) == {"b": BIN, "s": "text"}


@pytest.mark.parametrize("serializer", ALL, ids=ids)
def test_encode_error_names_the_type_inside_a_container(serializer: Serializer) -> None:
    with pytest.raises(EncodeError, match=type(serializer).__name__) as info:
        serializer.dumps({"ok": 1, "bad": [Opaque()]})
    assert "cannot encode dict" in str(info.value)
    if serializer not in PICKLE_KIND:  # pickle's message is the object's own
        assert "Opaque" in str(info.value)


def test_msgpack_refuses_big_ints_naming_the_limit() -> None:
    with pytest.raises(EncodeError, match=r"int .*64-bit"):
        MsgPackSerializer().dumps({"n": [2**64]})
    with pytest.raises(EncodeError, match=r"int .*64-bit"):
        MsgPackSerializer().dumps(Point(2**70, 1.0))


# -- hypothesis: the documented data models round-trip untyped; typed values come back ------

_keys = st.text(max_size=8)
_json_leaf = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
_json_data = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=20,
)
_int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_msgpack_leaf = (
    st.none()
    | st.booleans()
    | _int64
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_msgpack_key = st.none() | st.booleans() | _int64 | st.text(max_size=8) | st.binary(max_size=8)
_msgpack_data = st.recursive(
    _msgpack_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_msgpack_key, inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("serializer", JSON_KIND, ids=ids)
@settings(max_examples=150, deadline=None, database=None)
@given(value=_json_data)
def test_json_data_round_trips_untyped(serializer: Serializer, value: Any) -> None:
    assert same_deep(serializer.loads(serializer.dumps(value)), value)


@pytest.mark.parametrize("serializer", MSGPACK_KIND, ids=ids)
@settings(max_examples=150, deadline=None, database=None)
@given(value=_msgpack_data)
def test_msgpack_data_round_trips_untyped(serializer: Serializer, value: Any) -> None:
    assert same_deep(serializer.loads(serializer.dumps(value)), value)


def same_deep(back: Any, value: Any) -> bool:
    """Equal, with the same type at every level (so 1 and True, 1 and 1.0 differ)."""
    if type(back) is not type(value):
        return False
    if isinstance(value, dict):
        return list(back) == list(value) and all(same_deep(back[k], value[k]) for k in value)
    if isinstance(value, (list, tuple)):
        return len(back) == len(value) and all(map(same_deep, back, value))
    return bool(back == value)


Row = tuple[int, bytes, dt.datetime, dt.timedelta, frozenset[str], Decimal, list[float], uuid.UUID]
_utf8 = st.text(max_size=10).map(str.encode)
_row = st.tuples(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.binary(max_size=10),
    st.datetimes(timezones=st.none() | st.just(UTC) | st.just(IST)),
    st.timedeltas(),
    st.frozensets(st.text(max_size=5), max_size=3),
    st.decimals(allow_nan=False, allow_infinity=False, places=6),
    st.lists(st.floats(allow_nan=False), max_size=3),
    st.uuids(),
)


@pytest.mark.parametrize("serializer", [*JSON_KIND, *MSGPACK_KIND], ids=ids)
@settings(max_examples=150, deadline=None, database=None)
@given(row=_row, text_bytes=_utf8)
def test_typed_rows_round_trip(serializer: Serializer, row: Any, text_bytes: bytes) -> None:
    if isinstance(serializer, _JSON):
        row = (row[0], text_bytes, *row[2:])  # JSON keeps UTF-8 bytes only (documented)
    back = serializer.loads(serializer.dumps(row), Row)
    assert same_deep(back, row)


# -- through cacheme.get on a remote tier: the hit is what the miss returned ----------------

SCHEMA = Path(__file__).resolve().parents[2] / "sql" / "sqlite.sql"


@pytest.fixture
async def sqlite_tier(tmp_path: Path) -> str:
    pytest.importorskip("aiosqlite")
    path = tmp_path / "cache.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA.read_text())
    await cacheme.register_storage("sqlite", cacheme.Storage(url=f"sqlite:///{path}"))
    return "sqlite"


def remote_node(serializer: Serializer, tp: Any, value: Any, typed: bool) -> tuple[Node, list[int]]:
    """A node on the SQLite tier only, whose load() returns ``value`` (annotated ``tp``)."""
    calls: list[int] = []

    async def load(self: Node) -> Any:
        calls.append(1)
        return value

    load.__annotations__ = {"return": tp} if typed else {}
    meta = type(
        "Meta", (Node.Meta,), {"caches": [Cache(storage="sqlite")], "serializer": serializer}
    )
    cls = type(
        f"Remote_{uuid.uuid4().hex}", (Node,), {"key": lambda self: "k", "load": load, "Meta": meta}
    )
    return cls(), calls


def through_get() -> list[Any]:
    params = []
    for serializer in [*JSON_KIND, *MSGPACK_KIND, *PICKLE_KIND]:
        column = 3 if serializer in JSON_KIND else 4 if serializer in MSGPACK_KIND else None
        for row in TABLE:
            untyped = SAME if column is None else row[column]
            if column == 3 and row[0] == "dict-tuple-keys":
                continue  # typed JSON cannot read a tuple key back (documented)
            for typed in (True, False):
                if not typed and untyped is not SAME:
                    continue  # untyped gives the data model form: not the same value
                name = f"{ids(serializer)}-{row[0]}-{'typed' if typed else 'untyped'}"
                params.append(pytest.param(serializer, row[1], row[2], typed, untyped, id=name))
    return params


@pytest.mark.sqlite
@pytest.mark.usefixtures("sqlite_tier")
@pytest.mark.parametrize(("serializer", "tp", "value", "typed", "untyped"), through_get())
async def test_hit_from_a_remote_tier_is_what_the_miss_returned(
    serializer: Serializer, tp: Any, value: Any, typed: bool, untyped: Any
) -> None:
    node, calls = remote_node(serializer, tp, value, typed)
    if untyped is FAILS:
        with pytest.raises(EncodeError, match=type(value).__name__):
            await cacheme.get(node)
        return
    miss = await cacheme.get(node)
    hit = await cacheme.get(node)
    assert calls == [1], "the second get must be a hit on the SQLite tier"
    assert same(miss, value)
    assert same(hit, miss), (hit, miss)


@pytest.mark.sqlite
@pytest.mark.usefixtures("sqlite_tier")
async def test_msgpack_binary_value_through_get_is_bytes() -> None:
    """The example of issue 9 item 3, untyped: b"\\xff\\x00" comes back as bytes."""
    node, calls = remote_node(MsgPackSerializer(), bytes, b"\xff\x00", typed=False)
    assert await cacheme.get(node) == b"\xff\x00"
    hit = await cacheme.get(node)
    assert calls == [1]
    assert hit == b"\xff\x00"
    assert type(hit) is bytes
