"""Freshness: refresh-ahead, stale-while-revalidate, stale-if-error from the stored copy,
negative caching and tags (see ``tags``), for the nodes that use any of them.

A node using none of these options is untouched: its tiers hold the plain value (local) or the
serializer's bytes (remote), and ``get`` takes the ordinary path (one flag, ``Config.stamped``,
decides). A node using any of them is *stamped*: every tier holds its value with a stamp:

- ``written``: when the value was loaded (wall clock, epoch milliseconds, so every process
  agrees). It travels with the value: a copy into an earlier tier keeps it. Refresh-ahead
  compares the age against it.
- ``expires``: the end of the entry's logical life *in the tier that holds it* (written when
  it was stored there: its TTL, or the negative TTL for a negative entry; 0 for no expiry).
  The tier itself keeps the entry longer (the physical TTL): ``stale_while_revalidate`` and
  ``stale_if_error`` extend it by their grace.
- ``negative``: the load found nothing (``None``, or a ``Meta.not_found`` exception).
- the versions of its tags (``tags``).

Local tiers store a ``Stamp`` object. Remote tiers store an envelope: ``MAGIC`` (4 bytes,
starting with 0xC1, a byte MessagePack never uses, nor pickle, JSON or zlib), 2 bytes of
header length, a MessagePack header ``[written, expires, negative, tags, not_found]`` and the
serializer's bytes. An entry without the envelope (stored before the node used these options)
is a decode error: reloaded.

The age costs nothing more on any tier: it is read from the stamp, in the same read as the
value (``remaining_ttl`` stays the tiers' own report of physical lifetime).

Decisions on a hit (``now`` from ``now_ms()``, which tests replace):

- ``now < expires``: fresh. If ``refresh_after`` is set and the age reached it (a
  ``timedelta``, or a fraction of the tier's TTL), the value is returned and one background
  reload of the key starts (one per key per event loop at a time: ``Runtime.refreshing``).
- ``expires <= now < expires + stale_while_revalidate``: served, and one reload starts.
- later but ``< expires + stale_if_error``: a miss; kept, and served if the load fails.
- negative entries live ``negative_ttl`` and are never served past it.

A background reload writes the new value to every tier with fresh TTLs; if it fails, the
current value stays, ``refresh_failures`` counts it, it is logged, and no caller sees it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import Context
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import msgpack

from . import backplane, landing, runtime, tags
from .errors import ConfigurationError, DecodeError, EncodeError, LoadError, StorageError
from .flight import STALE, Call, join_all, outside_loads, propagates
from .serializer import Serializer
from .serializer import encode as encode_value
from .storages.base import MISS, Entry, utf8_encodable
from .tiers import RemoteTier, Tier, deliver_to, undecodable, unstorable, warn

if TYPE_CHECKING:
    from .node import Cache, Config, Node
    from .walk import Loader, Walk

logger = logging.getLogger("cacheme")

MAGIC = b"\xc1cm1"
_HEADER = struct.Struct(">H")
_START = len(MAGIC) + _HEADER.size


def now_ms() -> int:
    """The clock of stamps and freshness decisions (epoch ms); tests monkeypatch it."""
    return time.time_ns() // 1_000_000


# -- configuration ---------------------------------------------------------------------------


class Rule:
    """A policy as it applies to one tier (TTLs in ms, 0 for none)."""

    __slots__ = ("neg_ms", "phys_ms", "phys_neg_ms", "refresh_ms", "ttl_ms")

    def __init__(self, policy: Policy, tier: Tier, cache: Cache) -> None:
        ttl = tier.ttl
        self.ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        # What the storage can hold: as for a TTL, a longer time means no expiry (an
        # expiry date past the year 9999 overflowed the SQL and MongoDB tiers).
        limit = _ms(tier.max_ttl)
        neg = cache.negative_ttl or policy.negative_ttl
        self.neg_ms = self.ttl_ms if neg is None else _ms(neg)
        if self.neg_ms > limit:
            self.neg_ms = 0
        grace = max(policy.swr_ms, policy.sie_ms)
        phys = self.ttl_ms + grace if self.ttl_ms else 0
        self.phys_ms: int | None = phys if 0 < phys <= limit else None
        self.phys_neg_ms: int | None = self.neg_ms or None
        if policy.refresh_after_ms:
            self.refresh_ms = policy.refresh_after_ms
        elif policy.refresh_fraction and self.ttl_ms:
            self.refresh_ms = max(1, round(policy.refresh_fraction * self.ttl_ms))
        else:
            self.refresh_ms = 0


class Policy:
    """The freshness options of one node class (``Config.fresh``; ``None`` when unused)."""

    __slots__ = (
        "caches",
        "negative",
        "negative_ttl",
        "not_found",
        "refresh_after_ms",
        "refresh_fraction",
        "rules",
        "sie_ms",
        "swr_ms",
        "tagged",
    )

    def __init__(self) -> None:
        self.caches: tuple[Cache, ...] = ()
        self.refresh_after_ms = 0
        self.refresh_fraction = 0.0
        self.swr_ms = 0
        self.sie_ms = 0
        self.negative_ttl: timedelta | None = None
        self.negative = False  # None results are negative entries
        self.not_found: tuple[type[BaseException], ...] = ()
        self.tagged = False
        self.rules: dict[Tier, Rule] = {}  # by tier object (new ones after a re-registration)

    def rule(self, tier: Tier) -> Rule:
        rule = self.rules.get(tier)
        if rule is None:
            rule = self.rules[tier] = Rule(self, tier, self.caches[tier.index])
        return rule


def _ms(delta: timedelta) -> int:
    return max(1, round(delta.total_seconds() * 1000))


def policy(
    name: str,
    meta: type,
    caches: tuple[Cache, ...],
    owner: type | None,
    stale_if_error: timedelta | None,
) -> Policy | None:
    """Check the freshness options of ``meta``; ``None`` when the node uses none of them."""

    def positive(attr: str) -> timedelta | None:
        value = getattr(meta, attr, None)
        if value is None:
            return None
        if not isinstance(value, timedelta) or value <= timedelta(0):
            raise ConfigurationError(
                f"{name}.Meta.{attr} must be a positive timedelta, got {value!r}"
            )
        return value

    p = Policy()
    p.caches = caches
    refresh = getattr(meta, "refresh_after", None)
    if refresh is not None:
        if isinstance(refresh, timedelta) and refresh > timedelta(0):
            p.refresh_after_ms = _ms(refresh)
        elif isinstance(refresh, float) and 0 < refresh < 1:
            p.refresh_fraction = refresh
        else:
            raise ConfigurationError(
                f"{name}.Meta.refresh_after must be a positive timedelta or a float in (0, 1) "
                f"(a fraction of each tier's TTL), got {refresh!r}"
            )
    swr = positive("stale_while_revalidate")
    p.negative_ttl = positive("negative_ttl")
    not_found = getattr(meta, "not_found", None)
    if not_found is not None:
        kinds = not_found if isinstance(not_found, tuple) else (not_found,)
        if not kinds or not all(isinstance(k, type) and issubclass(k, Exception) for k in kinds):
            raise ConfigurationError(
                f"{name}.Meta.not_found must be an exception class or a tuple of them, got "
                f"{not_found!r}"
            )
        p.not_found = kinds
    per_tier = any(c.negative_ttl is not None for c in caches)
    p.negative = p.negative_ttl is not None or per_tier
    tags_fn = getattr(owner, "tags", None) if owner is not None else None
    if tags_fn is not None and not callable(tags_fn):
        raise ConfigurationError(f"{name}.tags must be a method returning a list of strings")
    p.tagged = tags_fn is not None
    used = p.refresh_after_ms or p.refresh_fraction or swr or p.negative or p.not_found
    if not used and not p.tagged:
        return None
    p.swr_ms = 0 if swr is None else _ms(swr)
    p.sie_ms = 0 if stale_if_error is None else _ms(stale_if_error)
    return p


# -- the stamped entry -----------------------------------------------------------------------


class Stamp:
    """A value with its stamp (see the module docstring); what stamped tiers hold locally
    and what the walk of a stamped node passes around.

    ``value`` is the value, or for a negative entry ``None`` / ``(not_found index, args)``.
    ``stale``: served past its logical expiry (never copied to another tier).
    """

    __slots__ = ("expires", "negative", "stale", "tags", "value", "versions", "written")

    def __init__(
        self,
        value: Any,
        written: int,
        negative: bool = False,
        tags: tuple[str, ...] = (),
        versions: tuple[Any, ...] = (),
        expires: int = 0,
        stale: bool = False,
    ) -> None:
        self.value = value
        self.written = written
        self.negative = negative
        self.tags = tags  # tag keys (local) or tag names (decoded from a remote tier)
        self.versions = versions
        self.expires = expires
        self.stale = stale

    def __repr__(self) -> str:
        kind = "negative " if self.negative else ""
        return f"<Stamp {kind}{self.value!r} written={self.written} expires={self.expires}>"


def encode(st: Stamp, expires: int, versions: list[Any] | None, serializer: Serializer) -> bytes:
    """The envelope of ``st`` for a remote tier (``versions`` aligned with its tag names)."""
    if st.negative:
        payload = b""
        info = None if st.value is None else list(st.value)
    else:
        payload = encode_value(serializer, st.value)
        info = None
    tag_list = (
        None if versions is None else [[n, v] for n, v in zip(st.tags, versions, strict=True)]
    )
    header = msgpack.packb([st.written, expires, st.negative, tag_list, info])
    return b"".join((MAGIC, _HEADER.pack(len(header)), header, payload))


def decode(data: bytes, loads: Callable[[bytes], Any]) -> tuple[Stamp, list[Any] | None]:
    """``(stamp, recorded [name, version] pairs)`` of an envelope; ``DecodeError`` else."""
    if not data.startswith(MAGIC):
        raise DecodeError("not a stamped entry (written before the node used freshness options)")
    try:
        (size,) = _HEADER.unpack_from(data, len(MAGIC))
        written, expires, negative, tag_list, info = msgpack.unpackb(
            data[_START : _START + size], use_list=True
        )
        if not isinstance(written, int) or not isinstance(expires, int):
            raise ValueError("bad stamp")
    except Exception as exc:
        raise DecodeError(f"bad stamp header: {exc!r}") from exc
    value = (None if info is None else _info(info)) if negative else loads(data[_START + size :])
    names = () if tag_list is None else tuple(n for n, _ in tag_list)
    return Stamp(value, written, bool(negative), names, (), expires), tag_list


def unwrap(cfg: Config, st: Stamp) -> Any:
    """The value a caller gets: the value, ``None``, or a new not-found exception."""
    if not st.negative:
        return st.value
    info = st.value
    if info is None:
        return None
    assert cfg.fresh is not None
    raise _rebuild(cfg, cfg.fresh.not_found, *info)


# What a negative entry keeps of a not_found exception: the index of the Meta.not_found
# class it matched, its args, its attributes of these types, and its own class's
# "module:qualname" when it is a subclass of that one (else "").
_SIMPLE = (str, int, float, bool, type(None))
NotFoundInfo = tuple[int, tuple[Any, ...], dict[str, Any], str]


def _info(raw: list[Any]) -> NotFoundInfo:
    """A decoded header's not-found info (entries written before attributes and classes
    were kept have the first two fields only)."""
    try:
        attrs = raw[2] if len(raw) > 2 and isinstance(raw[2], dict) else {}
        name = raw[3] if len(raw) > 3 and isinstance(raw[3], str) else ""
        return int(raw[0]), tuple(raw[1]), attrs, name
    except (TypeError, ValueError, IndexError) as exc:
        raise DecodeError(f"bad not-found info in a stamp header: {raw!r:.80}") from exc


def _shared_errors(errors: dict[str, BaseException]) -> set[int]:
    """The ids of exceptions failing more than one key: a ``load_all`` that raised for the
    whole batch cannot say which node is missing, so none is cached as not found."""
    seen: set[int] = set()
    shared: set[int] = set()
    for exc in errors.values():
        (shared if id(exc) in seen else seen).add(id(exc))
    return shared


def _storable(value: Any) -> bool:
    """A simple value MessagePack can hold: a str that is valid UTF-8, a 64-bit int..."""
    kind = type(value)
    if kind is str:
        return utf8_encodable(value)
    if kind is int:
        return bool(-(2**63) <= value < 2**64)
    return kind in _SIMPLE


def _message(exc: BaseException) -> str:
    """``str(exc)``, made storable (a lone surrogate escaped; a ``__str__`` that raises gives
    the class name)."""
    try:
        text = str(exc)
    except Exception:
        text = type(exc).__qualname__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _negative_info(p: Policy, exc: BaseException) -> NotFoundInfo:
    index = next(i for i, k in enumerate(p.not_found) if isinstance(exc, k))
    args = exc.args
    if not all(_storable(a) for a in args):
        args = (_message(exc),)
    attrs = {
        k: v
        for k, v in getattr(exc, "__dict__", {}).items()
        if _storable(v) and _storable(k) and not k.startswith("__")
    }
    cls = type(exc)
    name = "" if cls is p.not_found[index] else f"{cls.__module__}:{cls.__qualname__}"
    return index, tuple(args), attrs, name


def _rebuild(
    cfg: Config,
    kinds: tuple[type[BaseException], ...],
    index: int,
    args: tuple[Any, ...],
    attrs: dict[str, Any],
    name: str,
) -> BaseException:
    """A new instance of the stored exception: its own class (when this process has it and it
    still derives from the declared one), its args and simple attributes, set directly. Its
    ``__init__`` is not called: it may take other arguments than the ``args`` it stored (a
    message built from an id, keyword-only arguments)."""
    if not 0 <= index < len(kinds):
        return LoadError(
            f"node {cfg.name}: a negative entry names not_found class #{index}, but "
            f"Meta.not_found has {len(kinds)}; invalidate the entry"
        )
    declared = kinds[index]
    cls = _class_named(name, declared) if name else declared
    try:
        exc = cls.__new__(cls, *args)
        exc.args = args
        exc.__dict__.update(attrs)
    except Exception as error:
        return LoadError(
            f"node {cfg.name}: cannot rebuild the cached not-found exception "
            f"{cls.__qualname__}{args!r}: {error!r}"
        )
    return exc


def _class_named(name: str, declared: type[BaseException]) -> type[BaseException]:
    """The class ``module:qualname`` if its module is loaded and it derives from ``declared``;
    else ``declared`` (nothing is imported for it)."""
    module_name, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, declared):
        return found
    return declared


class _Reader:
    """A function as the ``Reader`` a remote storage's ``read_many`` hands its answer to."""

    __slots__ = ("delivered",)

    def __init__(self, fn: Callable[[Any], None]) -> None:
        self.delivered = fn


# -- local tiers -----------------------------------------------------------------------------


def _put_local(
    tier: Tier, rule: Rule, key: str, st: Stamp, versions: tuple[Any, ...], now: int
) -> None:
    if st.negative:
        ttl_ms, phys = rule.neg_ms, rule.phys_neg_ms
    else:
        ttl_ms, phys = rule.ttl_ms, rule.phys_ms
    entry = Stamp(
        st.value, st.written, st.negative, st.tags, versions, now + ttl_ms if ttl_ms else 0
    )
    tier.storage.set(key, entry, None if phys is None else phys / 1000)  # type: ignore[attr-defined]


def _classify(
    p: Policy,
    rule: Rule,
    key: str,
    st: Stamp,
    now: int,
    found: dict[str, Stamp],
    due: list[str],
    fallback: dict[str, Stamp] | None,
) -> None:
    """Put ``st`` in ``found`` if it may be served (``due`` if it wants a reload), in
    ``fallback`` if only stale-if-error may serve it."""
    expires = st.expires
    if not expires or now < expires:
        found[key] = st
        if rule.refresh_ms and not st.negative and now - st.written >= rule.refresh_ms:
            due.append(key)
    elif st.negative:
        return
    elif now < expires + p.swr_ms:
        found[key] = Stamp(st.value, st.written, False, st.tags, st.versions, expires, True)
        due.append(key)
    elif fallback is not None and now < expires + p.sie_ms:
        kept = fallback.get(key)
        if kept is None or kept.written < st.written:
            fallback[key] = st


def front(cfg: Config, key: str, now: int, due: list[str]) -> tuple[Stamp, int] | None:
    """The leading local tiers' answer for ``key``: ``(stamp, tier index)`` or ``None``
    (``_classify`` inlined: this is the hot path of a stamped node)."""
    p = cfg.fresh
    assert p is not None
    tiers = cfg.front
    mark = backplane.sequence() if len(tiers) > 1 else 0  # see api._copy_forward
    for tier in tiers:
        st = tier.storage.get(key)  # type: ignore[attr-defined]
        if st is MISS:
            continue
        if st.tags and not tags.local_valid(st.tags, st.versions):
            continue
        expires = st.expires
        if not expires or now < expires:
            got = st
            if not st.negative:
                refresh_ms = p.rule(tier).refresh_ms
                if refresh_ms and now - st.written >= refresh_ms:
                    due.append(key)
        elif st.negative or now >= expires + p.swr_ms:
            continue
        else:
            got = Stamp(st.value, st.written, False, st.tags, st.versions, expires, True)
            due.append(key)
        if tier.index and not got.stale:
            with backplane.write_guard:  # see its comment
                if not backplane.changed_since(key, mark):
                    for earlier in tiers[: tier.index]:
                        _put_local(earlier, p.rule(earlier), key, got, got.versions, now)
        return got, tier.index
    return None


# -- the walk of a stamped node --------------------------------------------------------------


class Pass:
    """What a ``Walk`` of a stamped node keeps (``walk.fresh``): reads and writes stamps."""

    __slots__ = (
        "cfg",
        "fallback",
        "local_versions",
        "names",
        "policy",
        "refreshing",
        "remote_versions",
        "revalidating",
        "tagkeys",
        "walk",
    )

    def __init__(
        self,
        cfg: Config,
        walk: Walk,
        names: dict[str, tuple[str, ...]] | None,
        refreshing: bool = False,
        revalidating: bool = False,
    ) -> None:
        assert cfg.fresh is not None
        self.cfg = cfg
        self.policy = cfg.fresh
        self.walk = walk
        self.refreshing = refreshing  # a background reload: failures are not served stale
        # A background reload of entries found expired (within stale_while_revalidate) in
        # an earlier tier: a later tier's entry counts only if it is neither expired nor due
        # for refresh-ahead (see trigger).
        self.revalidating = revalidating
        self.fallback: dict[str, Stamp] = {}
        self.remote_versions: dict[int, dict[str, Any]] = {}
        self.names = names or {}
        self.tagkeys: dict[str, tuple[str, ...]] = {}
        self.local_versions: dict[str, int] = {}
        if self.policy.tagged:
            for key, names_ in self.names.items():
                keys = self.tagkeys[key] = tuple(tags.tag_key(cfg.tag_space, n) for n in names_)
                for k in keys:
                    if k not in self.local_versions:
                        self.local_versions[k] = tags.local_version(k)

    # reading

    def read(self, tier: Tier, keys: Sequence[str], done: Callable[[Any], None]) -> None:
        if tier.immediate:
            self._read_local(tier, keys, done)
        else:
            self._read_remote(tier, keys, done)  # type: ignore[arg-type]

    def _read_local(self, tier: Tier, keys: Sequence[str], done: Callable[[Any], None]) -> None:
        p = self.policy
        rule = p.rule(tier)
        get = tier.storage.get  # type: ignore[attr-defined]
        now = now_ms()
        found: dict[str, Stamp] = {}
        due: list[str] = []
        for key in keys:
            st = get(key)
            if st is MISS or (st.tags and not tags.local_valid(st.tags, st.versions)):
                continue
            _classify(p, rule, key, st, now, found, due, self.fallback)
        done(self._served(tier, found, due))

    def _read_remote(
        self, tier: RemoteTier, keys: Sequence[str], done: Callable[[Any], None]
    ) -> None:
        tagkeys: list[str] = []
        if self.policy.tagged:
            seen = set()
            for key in keys:
                for k in self.tagkeys[key]:
                    if k not in seen:
                        seen.add(k)
                        tagkeys.append(k)

        def arrived(raw: Any) -> None:
            try:
                if isinstance(raw, dict):
                    done(self._decode(tier, keys, tagkeys, raw))
                elif isinstance(raw, StorageError):
                    done(tier._failed(raw, "read"))
                else:
                    done(StorageError(f"storage {tier.name!r}: read failed: {raw!r}"))
            except Exception as exc:  # a bug here must still settle the walk
                done(exc)

        try:
            tier.storage.read_many([*keys, *tagkeys] if tagkeys else keys, _Reader(arrived))
        except StorageError as exc:
            done(tier._failed(exc, "read"))

    def _decode(
        self, tier: RemoteTier, keys: Sequence[str], tagkeys: list[str], raw: dict[str, bytes]
    ) -> dict[str, Stamp]:
        cfg = self.cfg
        p = self.policy
        rule = p.rule(tier)
        serializer = tier.serializer
        value_type = cfg.value_type

        def loads(data: bytes) -> Any:
            return serializer.loads(data, value_type)

        current: dict[str, Any] = {}
        if tagkeys:
            current = {k: raw.get(k) for k in tagkeys}
            self.remote_versions[tier.index] = dict(current)
        now = now_ms()
        found: dict[str, Stamp] = {}
        due: list[str] = []
        for key in keys:
            data = raw.get(key)
            if data is None:
                continue
            try:
                st, recorded = decode(data, loads)
            except Exception as exc:  # DecodeError by contract; any other from a custom one
                undecodable(cfg, tier.name, key, exc)
                continue
            if p.tagged:
                expected = self.tagkeys[key]
                if recorded is None or len(recorded) != len(expected):
                    continue
                valid = True
                for (name, version), k, n in zip(recorded, expected, self.names[key], strict=True):
                    if name != n or version is None or current.get(k) != version:
                        valid = False
                        break
                if not valid:
                    continue
            _classify(p, rule, key, st, now, found, due, self.fallback)
        return self._served(tier, found, due)

    def _served(self, tier: Tier, found: dict[str, Stamp], due: list[str]) -> dict[str, Stamp]:
        """What of ``found`` (read from ``tier``) the walk takes; starts the background
        reloads of ``due`` (see ``trigger``)."""
        if self.revalidating:
            return {k: st for k, st in found.items() if not st.stale and k not in due}
        if due and not self.refreshing:
            walk = self.walk
            # The walk's context: this runs in whatever task delivered the read.
            for revalidate_from, keys in _by_start(self.cfg, tier.index, found, due).items():
                nodes = {k: walk.nodes[k] for k in keys}
                trigger(self.cfg, nodes, self.names, walk.loader, walk.context, revalidate_from)
        return found

    async def read_versions(self) -> None:
        """Read the current tag versions of every remote tier (a reload reads no entry)."""
        if not self.policy.tagged:
            return
        tagkeys = list(dict.fromkeys(k for keys in self.tagkeys.values() for k in keys))
        loop = asyncio.get_running_loop()
        for tier in self.cfg.tiers:
            if not isinstance(tier, RemoteTier):
                continue
            fut: asyncio.Future[Any] = loop.create_future()
            try:
                tier.storage.read_many(tagkeys, _Reader(deliver_to(fut)))
            except StorageError as exc:
                fut.set_result(exc)
            raw = await fut
            if isinstance(raw, dict):
                self.remote_versions[tier.index] = {k: raw.get(k) for k in tagkeys}
            else:
                self.walk.failed.add(tier.index)  # versions unknown: do not write it

    # loading

    def loading(self, keys: Iterable[str]) -> None:
        """The walk loads ``keys`` now. A background reload of them under way began earlier
        and may have read an older value than this load will: it no longer writes (see
        ``forget``). (Joining it instead would hand this walk's callers what it read before
        an invalidation, or its failure without the stale-if-error copy.) A background
        reload's own walk leaves the others alone."""
        if not self.refreshing:
            for key in keys:
                forget(key)

    def after_load(
        self, loaded: dict[str, Any], stale: dict[str, Any], errors: dict[str, BaseException]
    ) -> None:
        """Stamp what was loaded; a not-found error becomes a negative entry; a failed load
        falls back to the stored stale copy (stale-if-error)."""
        p = self.policy
        cfg = self.cfg
        now = now_ms()
        calls = self.walk.calls
        shared = _shared_errors(errors)
        for key, exc in list(errors.items()):
            if p.not_found and isinstance(exc, p.not_found) and id(exc) not in shared:
                del errors[key]
                loaded[key] = Stamp(_negative_info(p, exc), now, True, self.names.get(key, ()))
                continue
            kept = self.fallback.get(key)
            if kept is not None and not self.refreshing and not calls[key].stale:
                del errors[key]
                stale[key] = Stamp(
                    kept.value, kept.written, False, kept.tags, (), kept.expires, True
                )
                logger.warning(
                    "cacheme: node %s: load of %r failed (%r); serving the stored stale value",
                    cfg.name,
                    key,
                    exc,
                )
        negative = p.negative
        names = self.names
        for key, value in loaded.items():
            if type(value) is not Stamp:
                loaded[key] = Stamp(value, now, negative and value is None, names.get(key, ()))

    # writing

    def write(self, tier: Tier, values: dict[str, Stamp]) -> tuple[Any, dict[str, Exception]]:
        p = self.policy
        rule = p.rule(tier)
        now = now_ms()
        tagged = p.tagged
        if tier.immediate:
            lv = self.local_versions
            for key, st in values.items():
                if st.stale:
                    continue
                keys = self.tagkeys.get(key, ()) if tagged else ()
                local = Stamp(st.value, st.written, st.negative, keys)
                _put_local(tier, rule, key, local, tuple(lv[k] for k in keys), now)
            return None, {}
        assert isinstance(tier, RemoteTier)
        errors: dict[str, Exception] = {}
        entries: list[Entry] = []
        tag_entries: list[Entry] = []
        versions = self.remote_versions.setdefault(tier.index, {})
        serializer = tier.serializer
        for key, st in values.items():
            if st.stale:
                continue
            if not key.isascii() and not utf8_encodable(key):
                unstorable(self.cfg.name, tier.name, key)
                continue
            recorded = None
            if tagged:
                recorded = []
                names = self.names[key]
                st = Stamp(st.value, st.written, st.negative, names)
                for k in self.tagkeys[key]:
                    v = versions.get(k)
                    if v is None:  # missing: the writer adds it (set-if-absent, see tags)
                        v = versions[k] = tags.new_token()
                        tag_entries.append(Entry(k, v, None))
                    recorded.append(v)
            if st.negative:
                ttl_ms, phys = rule.neg_ms, rule.phys_neg_ms
            else:
                ttl_ms, phys = rule.ttl_ms, rule.phys_ms
            try:
                data = encode(st, now + ttl_ms if ttl_ms else 0, recorded, serializer)
            except EncodeError as exc:
                errors[key] = EncodeError(f"node {self.cfg.name}: {exc}")
                continue
            entries.append(Entry(key, data, phys))
        if not entries:
            return None, errors
        try:
            if not tag_entries:
                return tier.storage.set_many(entries), errors
            # The entries record this writer's new versions: they are valid only while its
            # add of the tag keys won (a tag key another writer or an invalidation stored
            # first keeps its version, and these entries stay misses).
            added = tier.storage.add_many(tag_entries)
            return asyncio.gather(added, tier.storage.set_many(entries)), errors
        except StorageError as exc:
            error = tier._failed(exc, "write")
            if error is not None:
                raise error from exc
            return None, errors


# -- refresh-ahead ---------------------------------------------------------------------------


def _by_start(
    cfg: Config, index: int, found: dict[str, Stamp], due: Iterable[str]
) -> dict[int | None, list[str]]:
    """``due`` keys (found in tier ``index``) by where their background reload starts
    (``trigger``'s ``revalidate_from``)."""
    out: dict[int | None, list[str]] = {}
    for key in due:
        out.setdefault(_revalidate_from(cfg, index, found[key]), []).append(key)
    return out


def _revalidate_from(cfg: Config, index: int, st: Stamp) -> int | None:
    """Where the background reload of ``st`` (found due in tier ``index``) starts reading:
    the next tier when ``st`` is expired and tiers follow; ``None``: it loads."""
    return index + 1 if st.stale and index + 1 < len(cfg.tiers) else None


def trigger(
    cfg: Config,
    nodes: dict[str, Node],
    names: dict[str, tuple[str, ...]] | None,
    loader: Loader | None,
    context: Context | None = None,
    revalidate_from: int | None = None,
) -> None:
    """Start one background reload of ``nodes`` (by key) that are not being reloaded, in a
    copy of ``context`` (the context of the caller whose get found them due; by default the
    running code's), outside any load.

    ``revalidate_from``: the entries were found expired (within ``stale_while_revalidate``)
    in a tier before this one: the reload first reads the tiers from there on, and takes an
    entry neither expired nor due for refresh-ahead (copying it into the tiers before, as a
    get would) instead of loading, since a later tier often keeps a fresh copy longer (a
    local tier of 30 s before Redis). Otherwise, and for what those tiers lack, it loads.
    """
    rt = runtime.current()
    table = rt.refreshing
    todo = {k: n for k, n in nodes.items() if k not in table}
    if not todo:
        return
    calls = {k: Call(k, cfg.tag_space) for k in todo}
    table.update(calls)
    cfg.stats.refreshes += len(todo)
    # No load waits for it, even when a load's get triggered it (see flight.refuse_cycle).
    task = rt.spawn(
        _refresh(cfg, rt, todo, calls, names, loader, revalidate_from), outside_loads(context)
    )
    # Also when the task is cancelled before its first step (its finally never runs): the
    # keys would stay marked as being reloaded, and never be reloaded again in this loop.
    task.add_done_callback(lambda _: _leave(rt, calls))


def _leave(rt: runtime.Runtime, calls: dict[str, Call]) -> None:
    """Take the reload of ``calls`` out of the loop's table of reloads (if still there)."""
    for key, call in calls.items():
        if rt.refreshing.get(key) is call:
            del rt.refreshing[key]


async def _refresh(
    cfg: Config,
    rt: runtime.Runtime,
    nodes: dict[str, Node],
    calls: dict[str, Call],
    names: dict[str, tuple[str, ...]] | None,
    loader: Loader | None,
    revalidate_from: int | None,
) -> None:
    from .walk import Walk

    failed: list[BaseException] = []
    try:
        waiters = [c.join() for c in calls.values()]
        walk = Walk(cfg, rt, nodes, calls, loader)
        if names is not None:
            names = {k: names[k] for k in nodes if k in names}
        revalidating = revalidate_from is not None
        state = walk.fresh = Pass(cfg, walk, names, refreshing=True, revalidating=revalidating)
        await state.read_versions()
        if revalidate_from is None:
            walk.reload(announce=False)
        else:  # read the later tiers first; load what they do not have fresh
            walk.index = revalidate_from
            walk.admit = False  # as reload's: no doorkeeper, no lease
            walk.start()
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        written = [k for k, c in calls.items() if not c.stale]
        if written and any(isinstance(t, RemoteTier) for t in cfg.tiers):
            backplane.publish(written)
    except Exception as exc:
        failed = [exc] * len(nodes)
    except asyncio.CancelledError:
        # Its loop is closing (asyncio.run cancels what a job leaves running): counted and
        # said, not silent; the entries stay due, so a later get in a loop starts another.
        cfg.stats.refresh_failures += len(nodes)
        warn(
            "-",
            cfg.name,
            "reload-cancelled",
            f"cacheme: node {cfg.name}: background reload of {len(nodes)} key(s) cancelled "
            "(its event loop was closing: with asyncio.run per job, a job's reloads end "
            "with it); the current values stay",
        )
        raise
    finally:
        _leave(rt, calls)
    if failed:
        cfg.stats.refresh_failures += len(failed)
        logger.warning(
            "cacheme: node %s: background refresh of %d key(s) failed (the current values "
            "stay): %r",
            cfg.name,
            len(failed),
            failed[0],
        )


def forget(key: str) -> None:
    """A background reload of ``key`` under way (in any loop of the process) must not write
    it back: ``invalidate`` and ``refresh`` changed the key, or a walk began to load it (the
    reload began earlier, so its value may be older than the walk's)."""
    for rt in runtime.live():
        call = rt.refreshing.get(key)
        if call is not None:
            call.stale = True


# -- get / get_all / refresh of a stamped node ------------------------------------------------


def tag_names(cfg: Config, nodes: dict[str, Node]) -> dict[str, tuple[str, ...]] | None:
    """The tag names of ``nodes`` (by key), or ``None`` for a node without tags."""
    assert cfg.fresh is not None
    if not cfg.fresh.tagged:
        return None
    return {key: tags.names_of(cfg, node) for key, node in nodes.items()}


async def fetch(node: Node, cfg: Config, loader: Loader | None, key: str) -> Any:
    """``api.fetch`` for a stamped node (``key`` built)."""
    from .walk import Walk

    rec = cfg.stats
    rec.requests += 1
    due: list[str] = []
    hit = front(cfg, key, now_ms(), due)
    if hit is not None:
        st, index = hit
        rec.hits += 1
        rec.tier_hits[index] += 1
        if st.negative:
            rec.negative_hits += 1
        if due:
            start = _revalidate_from(cfg, index, st)
            trigger(cfg, {key: node}, tag_names(cfg, {key: node}), loader, None, start)
        return unwrap(cfg, st)
    rt = runtime.current()
    flights = rt.flights
    call = flights.get(key)
    if call is None or call.detached:  # e.g. by another thread's invalidate
        names = tag_names(cfg, {key: node})
        call = flights.start(key, cfg.tag_space)
        waiter = call.join()
        walk = Walk(cfg, rt, {key: node}, {key: call}, loader)
        walk.fresh = Pass(cfg, walk, names)
        walk.start()
    else:
        rec.coalesced += 1
        waiter = call.join()
    st, source = await waiter
    if source >= 0:
        rec.hits += 1
        rec.tier_hits[source] += 1
        if st.negative:
            rec.negative_hits += 1
    elif source == STALE:
        rec.stale += 1
    return unwrap(cfg, st)


async def get_all(nodes: list[Node], cfg: Config, keys: list[str]) -> list[Any]:
    """``api.get_all`` for a stamped node class (``keys`` built, requests not yet counted)."""
    from .walk import Walk

    rec = cfg.stats
    rec.requests += len(nodes)
    stamps: list[Any] = [None] * len(nodes)
    pending: dict[str, list[int]] = {}
    due: list[str] = []
    starts: dict[int | None, list[str]] = {}  # the due keys, by trigger's revalidate_from
    now = now_ms()
    for i, key in enumerate(keys):
        seen = len(due)
        hit = front(cfg, key, now, due)
        if hit is None:
            pending.setdefault(key, []).append(i)
            continue
        st, index = hit
        rec.hits += 1
        rec.tier_hits[index] += 1
        if st.negative:
            rec.negative_hits += 1
        stamps[i] = st
        if len(due) > seen:
            for start, ks in _by_start(cfg, index, {key: st}, due[seen:]).items():
                starts.setdefault(start, []).extend(ks)
    for start, due_keys in starts.items():
        wanted = set(due_keys)
        by_key = {k: n for k, n in zip(keys, nodes, strict=True) if k in wanted}
        trigger(cfg, by_key, tag_names(cfg, by_key), None, None, start)
    if pending:
        rt = runtime.current()
        names = tag_names(cfg, {k: nodes[where[0]] for k, where in pending.items()})
        calls, outcome = join_all(rt.flights, pending, cfg.tag_space, rt.loop)
        rec.coalesced += sum(len(where) for where in pending.values()) - len(calls)
        if calls:
            started = {k: nodes[pending[k][0]] for k in calls}
            walk = Walk(cfg, rt, started, calls, None)
            walk.fresh = Pass(cfg, walk, names)
            walk.start()
        outcomes = await outcome
        for key, where in pending.items():
            st, source = outcomes[key]
            for i in where:
                stamps[i] = st
            if source >= 0:
                rec.hits += len(where)
                rec.tier_hits[source] += len(where)
                if st.negative:
                    rec.negative_hits += len(where)
            elif source == STALE:
                rec.stale += len(where)
    return [unwrap(cfg, st) for st in stamps]


async def reload(node: Node, cfg: Config, loader: Loader | None, key: str) -> Any:
    """``api.reload`` (``refresh``) for a stamped node: load, write every tier, return."""
    from .api import (
        _written_at,
        latest,
        note_changed,
        own_outcome,
        raise_missed_write,
        start_refresh,
        wait_bound,
    )
    from .walk import Walk

    names = tag_names(cfg, {key: node})
    began = time.time()
    rt = runtime.current()
    call = start_refresh(rt, key, cfg)  # a get from now on joins this refresh
    forget(key)
    waiter = call.join()
    writes = note_changed(key)

    # In a task of the loop: a cancelled caller cancels only its own wait, never the reads
    # that the callers who joined this refresh depend on.
    async def versions_then_reload() -> None:
        try:
            await landing.wait(key, writes, wait_bound(cfg))
            walk = Walk(cfg, rt, {key: node}, {key: call}, loader)  # its mark follows the note
            state = walk.fresh = Pass(cfg, walk, names)
            call.tag_versions = dict(state.local_versions)  # see api.latest
            await state.read_versions()
            walk.reload()
        except BaseException as exc:
            rt.flights.fail(key, call, exc)
            if propagates(exc):
                raise

    rt.spawn(versions_then_reload())
    outcome = await own_outcome(call, waiter)
    (st, source), final = await latest(rt, call, outcome, node, cfg, loader)
    if source == STALE:
        cfg.stats.stale += 1
    backplane.publish((key,), kind="i", since=_written_at(call, began))
    raise_missed_write(final)
    return unwrap(cfg, st)
