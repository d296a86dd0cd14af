"""Serializers: how a value becomes bytes for a remote tier, and back.

- ``PickleSerializer``: any picklable object, stored as raw pickle bytes. Unpickling runs code
  named by the data: use it only with storages that untrusted parties cannot write.
- ``JSONSerializer`` / ``MsgPackSerializer``: primitives, dataclasses, pydantic v2 models,
  datetimes, UUIDs, Decimals, sets... encoded with pydantic-core. Decoding never imports or
  builds a class named in the data: it rebuilds the node's value type (the return annotation
  of ``load()``) with pydantic's ``TypeAdapter``, or returns plain JSON types when there is none.
- ``Compressed*``: the same, compressed with zlib level 3.

Encoding failures raise ``EncodeError``; decoding failures raise ``DecodeError`` and nothing
else, whatever the bytes.
"""

from __future__ import annotations

import json
import pickle
import zlib
from functools import lru_cache
from typing import Any

import msgpack
from pydantic import TypeAdapter
from pydantic_core import to_json, to_jsonable_python

from .errors import DecodeError, EncodeError

_ANY: Any = Any


@lru_cache(maxsize=1024)
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


class Serializer:
    """Turns values into bytes and back. ``value_type`` is the type to rebuild (or ``Any``)."""

    def dumps(self, value: Any) -> bytes:
        raise NotImplementedError

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class PickleSerializer(Serializer):
    """Any picklable value; trusted storages only."""

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise EncodeError(f"{self!r} cannot encode {type(value).__name__}: {exc}") from exc

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise DecodeError(f"{self!r} cannot decode {len(data)} bytes: {exc!r}") from exc


class JSONSerializer(Serializer):
    """JSON text, typed on the way back by pydantic."""

    def dumps(self, value: Any) -> bytes:
        try:
            return to_json(value)
        except Exception as exc:
            raise EncodeError(f"{self!r} cannot encode {type(value).__name__}: {exc}") from exc

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        try:
            if value_type is _ANY:
                return json.loads(data)
            return _adapter(value_type).validate_json(data)
        except Exception as exc:
            raise DecodeError(f"{self!r} cannot decode {len(data)} bytes: {exc!r}") from exc


class MsgPackSerializer(Serializer):
    """MessagePack of the JSON-able form, typed on the way back by pydantic."""

    def dumps(self, value: Any) -> bytes:
        try:
            packed: bytes = msgpack.packb(to_jsonable_python(value), use_bin_type=True)
        except Exception as exc:
            raise EncodeError(f"{self!r} cannot encode {type(value).__name__}: {exc}") from exc
        return packed

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        try:
            # strict_map_key=False: JSON-able dicts may have int keys after to_jsonable_python.
            raw = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
            if value_type is _ANY:
                _refuse_timestamps(raw)
                return raw
            return _adapter(value_type).validate_python(raw)
        except Exception as exc:
            raise DecodeError(f"{self!r} cannot decode {len(data)} bytes: {exc!r}") from exc


def _refuse_ext(code: int, data: bytes) -> Any:
    # dumps() never writes extension types: any found were written by someone else.
    raise ValueError(f"MessagePack extension type {code} is not accepted")


def _refuse_timestamps(value: Any) -> None:
    """msgpack decodes its timestamp extension itself, before ``ext_hook``: refuse it here."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, msgpack.Timestamp):
            raise ValueError("MessagePack timestamp extension is not accepted")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class _Compressed(Serializer):
    """zlib level 3 around another serializer."""

    inner: Serializer

    def dumps(self, value: Any) -> bytes:
        try:
            raw = self.inner.dumps(value)
        except EncodeError as exc:
            raise EncodeError(f"{self!r}: {exc}") from exc
        return zlib.compress(raw, 3)

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        try:
            raw = zlib.decompress(data)
        except Exception as exc:
            raise DecodeError(f"{self!r} cannot decompress {len(data)} bytes: {exc!r}") from exc
        try:
            return self.inner.loads(raw, value_type)
        except DecodeError as exc:
            raise DecodeError(f"{self!r}: {exc}") from exc


class CompressedPickleSerializer(_Compressed):
    inner = PickleSerializer()


class CompressedJSONSerializer(_Compressed):
    inner = JSONSerializer()


class CompressedMsgPackSerializer(_Compressed):
    inner = MsgPackSerializer()


__all__ = [
    "CompressedJSONSerializer",
    "CompressedMsgPackSerializer",
    "CompressedPickleSerializer",
    "JSONSerializer",
    "MsgPackSerializer",
    "PickleSerializer",
    "Serializer",
]
