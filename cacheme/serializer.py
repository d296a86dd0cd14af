"""Serializers: how a value becomes bytes for a remote tier, and back.

A node's value is decoded either *typed*, when its ``load()`` has a return annotation (the
node's ``value_type``; pydantic's ``TypeAdapter`` rebuilds that type from the decoded data), or
*untyped*, when it has none (or ``Any``). Decoding never imports or builds a class named in the
stored data. Local tiers hold Python objects and use no serializer.

- ``PickleSerializer``: raw pickle bytes (highest protocol). Unpickling runs code named by the
  data: use it only with storages that untrusted parties cannot write.
- ``JSONSerializer``: UTF-8 JSON text written by pydantic-core.
- ``MsgPackSerializer``: MessagePack, with the bin type for bytes (``use_bin_type=True``) and
  str for text; types MessagePack lacks are written in their JSON form.
- ``Compressed*``: the same bytes, compressed with zlib level 3; they round-trip exactly
  what their inner serializer does.

What comes back
---------------

A value "round-trips" when the decoded value equals it and has its type (so a hit returns what
the miss returned; NaN counts as equal to NaN).

Pickle, typed or untyped: every picklable value. ``memoryview``, lambdas, open files, locks...
raise ``EncodeError``.

JSON and MsgPack, **typed**: every value pydantic can validate back into the annotation: None,
bool, int, float (NaN and +-inf included), str, bytes, list, tuple (and
NamedTuple), dict, set, frozenset, datetime (naive or aware), date, time, timedelta, Decimal
(NaN and +-Infinity included, except inside a model or dataclass whose config refuses them),
UUID, Enum/IntEnum/StrEnum, dataclasses, pydantic v2 models, and any nesting of these. Limits:

- JSON writes bytes as UTF-8 text: bytes that are not valid UTF-8 raise ``EncodeError``
  (use MsgPack or Pickle for binary data).
- JSON writes NaN and +-inf as ``NaN``/``Infinity``, except inside a pydantic model whose
  ``ser_json_inf_nan`` is ``'null'`` (pydantic's default), which writes ``null`` and then
  fails to decode into a float field (``DecodeError``; the entry is reloaded). MsgPack keeps
  them in models too.
- JSON object keys are text: int, float, bool, Enum, UUID, Decimal and date/time keys come
  back typed, but a tuple key is written as ``"1,2"`` and fails to decode (``DecodeError``;
  the entry is reloaded). MsgPack keeps keys as they are.
- MsgPack integers are 64-bit: an int outside ``[-2**63, 2**64 - 1]`` raises ``EncodeError``
  (JSON keeps ints of any size).
- A str holding a lone surrogate (``"\\ud800"``) is not UTF-8: JSON and MsgPack raise
  ``EncodeError``; only Pickle stores it.
- ``bytearray`` and ``memoryview`` are written as bytes and come back as ``bytes``: annotate
  ``bytes`` (pydantic cannot validate into either type, so such an annotation fails to decode
  with ``DecodeError`` and the entry is reloaded). JSON (like Pickle) raises ``EncodeError``
  for a ``memoryview``.

JSON and MsgPack, **untyped**: the decoded value is the format's own data model, and only
values inside that model round-trip:

- JSON: None, bool, int (any size), float (NaN and +-inf included), str, list, and dict with
  str keys. A tuple comes back as a list, a dict's int keys as str, bytes as str (their UTF-8
  text).
- MsgPack: None, bool, int (64-bit), float (NaN and +-inf included), str, bytes, list, and
  dict with keys of these types or tuples of them (a tuple key comes back as a tuple). A tuple
  value comes back as a list, a bytearray as bytes.
- For both: set and frozenset come back as a list; datetime, date, time and timedelta as
  ISO 8601 str; Decimal and UUID as str; an Enum member as its value; a dataclass or pydantic
  model as a dict of its fields (by alias).

So a hit returns a value equal to, and of the type of, what the miss returned for every typed
node, and for an untyped node whose values stay inside the data model above; annotate
``load()`` (or use Pickle) to get other types back.

Errors: a value a serializer cannot encode raises ``EncodeError`` (also a ``TypeError``) whose
message names the serializer and the value's type; decoding raises ``DecodeError`` and nothing
else, whatever the bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import pickle
import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import msgpack
from pydantic import BaseModel, ConfigDict, PydanticUserError, TypeAdapter
from pydantic_core import SchemaValidator, to_json, to_jsonable_python

from .errors import ConfigurationError, DecodeError, EncodeError

_ANY: Any = Any
_PYTHON_FORM: TypeAdapter[Any] = TypeAdapter(Any)
_ALLOW_INF_NAN = ConfigDict(allow_inf_nan=True)


@lru_cache(maxsize=1024)
def _adapter(tp: Any) -> TypeAdapter[Any]:
    # pydantic refuses Decimal NaN/Infinity by default. A config can only be given to types
    # that have none of their own: models, dataclasses and TypedDicts keep theirs.
    try:
        return TypeAdapter(tp, config=_ALLOW_INF_NAN)
    except PydanticUserError:
        return TypeAdapter(tp)


@lru_cache(maxsize=1024)
def _validators(tp: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(validate_python, validate_json)`` for ``tp``: pydantic-core's own methods when the
    adapter's schema is built (they skip ``TypeAdapter``'s wrapper, half the cost of a small
    value's validation), else the adapter's, which build it on first use."""
    adapter = _adapter(tp)
    validator = adapter.validator
    if isinstance(validator, SchemaValidator):
        return validator.validate_python, validator.validate_json
    return adapter.validate_python, adapter.validate_json


def _type_problem(value_type: Any) -> Exception | None:
    if value_type is _ANY:
        return None
    try:
        _validators(value_type)
    except Exception as exc:
        return exc
    return None


def _encode_error(serializer: Serializer, value: Any, exc: Exception) -> EncodeError:
    message = f"{serializer!r} cannot encode {type(value).__name__}: {exc}"
    if "utf-8" in str(exc).lower():
        message += " (JSON and MessagePack text must be valid UTF-8"
        if isinstance(serializer, JSONSerializer):
            message += "; JSON stores bytes as UTF-8 text: use MsgPackSerializer for binary"
        message += ")"
    return EncodeError(message)


class Serializer:
    """Turns values into bytes and back. ``value_type`` is the type to rebuild (or ``Any``).

    ``dumps`` raises ``EncodeError`` for a value it cannot encode; ``loads`` raises
    ``DecodeError`` for bytes it cannot decode into ``value_type``, and nothing else.
    """

    def dumps(self, value: Any) -> bytes:
        raise NotImplementedError

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        raise NotImplementedError

    def decoder(self, value_type: Any = _ANY) -> Callable[[bytes], Any]:
        """A one-argument function doing ``loads(data, value_type)``, for a tier that decodes
        many values of one type. This one calls ``loads``; a serializer may return a faster
        function, with the same results and errors."""
        loads = self.loads
        return lambda data: loads(data, value_type)

    def type_problem(self, value_type: Any) -> Exception | None:
        """Why ``loads`` can never decode into ``value_type`` (an annotation), else ``None``.
        A serializer that ignores the type (this one) finds no problem."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


def adopt(obj: Any, owner: str) -> Serializer:
    """``obj`` as a ``Serializer``: itself, or the serializer of cacheme 0.3.0's protocol
    (any object with ``dumps(value) -> bytes`` and ``loads(data) -> value``, or a subclass
    whose ``loads`` takes no ``value_type``) wrapped so that its ``loads`` gets the bytes
    alone (its values are untyped). Raises ``ConfigurationError`` naming ``owner`` (such as
    ``"UserNode.Meta.serializer"``) for anything else."""
    dumps, loads = getattr(obj, "dumps", None), getattr(obj, "loads", None)
    if not (callable(dumps) and callable(loads)) or isinstance(obj, type):
        raise ConfigurationError(
            f"{owner} must be a Serializer (or an object with dumps(value) -> bytes and "
            f"loads(data)), got {type(obj).__name__} {obj!r}"
        )
    if isinstance(obj, Serializer) and _takes_two(loads):
        return obj
    return _BytesOnly(obj)


def _takes_two(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called as ``fn(data, value_type)``."""
    try:
        inspect.signature(fn).bind(b"", _ANY)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): assume the documented one
        return True
    return True


class _BytesOnly(Serializer):
    """A serializer of cacheme 0.3.0's protocol: ``loads(data)``, no value type."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def dumps(self, value: Any) -> bytes:
        data: bytes = self.inner.dumps(value)
        return data

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        try:
            return self.inner.loads(data)
        except Exception as exc:
            raise DecodeError(f"{self!r} cannot decode {len(data)} bytes: {exc!r}") from exc

    def __repr__(self) -> str:
        return repr(self.inner)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BytesOnly) and other.inner is self.inner

    def __hash__(self) -> int:
        return id(self.inner)


def encode(serializer: Serializer, value: Any) -> bytes:
    """``serializer.dumps(value)``, held to its contract: ``EncodeError`` (naming the
    serializer) for whatever it raises and for a result that is not bytes (a bytearray or
    memoryview is taken as bytes)."""
    try:
        data = serializer.dumps(value)
    except EncodeError:
        raise
    except Exception as exc:
        raise dumps_failed(serializer, value, exc) from exc
    return data if type(data) is bytes else as_bytes(serializer, data)


def dumps_failed(serializer: Serializer, value: Any, exc: Exception) -> EncodeError:
    """The ``EncodeError`` of a ``dumps`` that raised ``exc``, another exception."""
    return EncodeError(f"{serializer!r} cannot encode {type(value).__name__}: {exc!r}")


def as_bytes(serializer: Serializer, data: Any) -> bytes:
    """``data``, what ``serializer.dumps`` returned, as bytes; ``EncodeError`` if not bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise EncodeError(
        f"{serializer!r}.dumps returned {type(data).__name__}, not bytes (a serializer's "
        "dumps must return bytes: encode text first)"
    )


class PickleSerializer(Serializer):
    """Any picklable value, typed or untyped; trusted storages only."""

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise _encode_error(self, value, exc) from exc

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise DecodeError(f"{self!r} cannot decode {len(data)} bytes: {exc!r}") from exc


class JSONSerializer(Serializer):
    """UTF-8 JSON, typed on the way back by pydantic (see the module docstring for the types)."""

    def type_problem(self, value_type: Any) -> Exception | None:
        """Why pydantic cannot validate into ``value_type`` (e.g. a ``typing.TypedDict`` on
        Python < 3.12, or a class that is neither a dataclass nor a model), else ``None``."""
        return _type_problem(value_type)

    def dumps(self, value: Any) -> bytes:
        try:
            return to_json(value, inf_nan_mode="constants")
        except Exception as exc:
            raise _encode_error(self, value, exc) from exc

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        try:
            if value_type is _ANY:
                return json.loads(data)
            return _validators(value_type)[1](data)
        except Exception as exc:
            raise DecodeError(f"{self!r} cannot decode {len(data)} bytes: {exc!r}") from exc


class MsgPackSerializer(Serializer):
    """MessagePack with bin for bytes, typed on the way back by pydantic (see the module
    docstring for the types)."""

    def type_problem(self, value_type: Any) -> Exception | None:
        """Why pydantic cannot validate into ``value_type`` (e.g. a ``typing.TypedDict`` on
        Python < 3.12, or a class that is neither a dataclass nor a model), else ``None``."""
        return _type_problem(value_type)

    def dumps(self, value: Any) -> bytes:
        try:
            packed: bytes = msgpack.packb(value, use_bin_type=True, default=_msgpack_form)
        except Exception as exc:
            raise _encode_error(self, value, exc) from exc
        return packed

    def loads(self, data: bytes, value_type: Any = _ANY) -> Any:
        try:
            raw = _unpack(data)
            if value_type is _ANY:
                _refuse_timestamps(raw)
                return raw
            # strict=False: the JSON forms (ISO str, lists) are valid input for strict models.
            return _validators(value_type)[0](raw, strict=False)
        except Exception as exc:
            raise DecodeError(f"{self!r} cannot decode {len(data)} bytes: {exc!r}") from exc

    def decoder(self, value_type: Any = _ANY) -> Callable[[bytes], Any]:
        """``loads`` for one typed ``value_type``, with its validator found once (a value of
        the sequential benchmark's ``dict[str, Any]`` decodes in about 0.6 us instead of
        0.8 us)."""
        if value_type is _ANY or type(self).loads is not MsgPackSerializer.loads:
            return super().decoder(value_type)  # untyped, or a subclass's own loads
        try:
            validate = _validators(value_type)[0]
        except Exception:  # e.g. an unhashable type: loads reports it per value
            return super().decoder(value_type)
        unpackb = msgpack.unpackb

        def decode(data: bytes) -> Any:
            try:
                try:
                    raw = unpackb(data, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
                except TypeError:
                    raw = _unpack(data)  # keys packed from tuples (see _unpack)
                return validate(raw, strict=False)
            except Exception as exc:
                raise DecodeError(f"{self!r} cannot decode {len(data)} bytes: {exc!r}") from exc

        return decode


def _msgpack_form(value: Any) -> Any:
    """What to pack for a value MessagePack has no type for (msgpack's ``default`` hook)."""
    if isinstance(value, int):  # msgpack packs every int that fits in 64 bits itself
        raise OverflowError(f"int {value} is outside MessagePack's 64-bit integer range")
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, BaseModel) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        # The python form keeps bytes as bytes; msgpack calls back here for what is inside.
        return _PYTHON_FORM.dump_python(value, mode="python", by_alias=True)
    form = to_jsonable_python(value)  # datetimes, Decimal, UUID...: their JSON form
    if type(form) is type(value):
        raise TypeError(f"cannot encode {type(value).__name__}")
    return form


def _unpack(data: bytes) -> Any:
    try:
        # strict_map_key=False: dicts may have int (or bytes, tuple...) keys.
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
    except TypeError:
        # A key packed from a tuple arrives as an (unhashable) list: make it a tuple again.
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            ext_hook=_refuse_ext,
            object_pairs_hook=_dict_with_hashable_keys,
        )


def _hashable(key: Any) -> Any:
    return tuple(_hashable(item) for item in key) if isinstance(key, list) else key


def _dict_with_hashable_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_hashable(key): value for key, value in pairs}


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
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
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

    def type_problem(self, value_type: Any) -> Exception | None:
        return self.inner.type_problem(value_type)

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
    """``PickleSerializer`` bytes compressed with zlib level 3; trusted storages only."""

    inner = PickleSerializer()


class CompressedJSONSerializer(_Compressed):
    """``JSONSerializer`` bytes compressed with zlib level 3."""

    inner = JSONSerializer()


class CompressedMsgPackSerializer(_Compressed):
    """``MsgPackSerializer`` bytes compressed with zlib level 3."""

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
