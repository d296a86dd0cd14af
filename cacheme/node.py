"""Nodes: what is cached, under which key, in which tiers, for how long.

A node class declares ``key()``, an async ``load()`` and a ``Meta``. The ``Meta`` is checked
when the class is created (errors name the node and the option). Storage names, and the value
type remote tiers decode to (``load()``'s return annotation), are resolved at first use, so
nodes can be declared before ``register_storage`` runs and before the classes they return.
Every node class has its own configuration and its own stats: a subclass without its own
``Meta`` copies its parent's settings, never shares its counters.
"""

from __future__ import annotations

import copy
import logging
import math
import typing
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

from .doorkeeper import DoorKeeper
from .doorkeeper import adopt as adopt_doorkeeper
from .errors import ConfigurationError, NotDefinedError
from .freshness import Policy, policy
from .serializer import Serializer, adopt
from .stats import Recorder
from .storages import registry
from .storages.base import utf8_encodable
from .tiers import Tier, make_tier

logger = logging.getLogger("cacheme")

_prefix = "cacheme"


def whole_key(name: str, key: Any, version: str) -> str:
    """``{prefix}:{key}:{version}``; ``ConfigurationError`` naming the node ``name`` when
    ``key`` (what its ``key()`` returned) is not a ``str``."""
    if type(key) is not str:
        raise ConfigurationError(f"{name}.key() must return str, got {type(key).__name__} {key!r}")
    return f"{_prefix}:{key}:{version}"


def set_prefix(prefix: str) -> None:
    """Set the prefix of every key: ``{prefix}:{key()}:{version}``. Changing it orphans keys."""
    global _prefix
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError(f"set_prefix takes a non-empty string, got {prefix!r}")
    if not utf8_encodable(prefix):
        raise ConfigurationError(
            f"set_prefix takes a string that encodes as UTF-8 (no lone surrogate: no remote "
            f"tier could store a key), got {prefix!r}"
        )
    _prefix = prefix
    registry.generation += 1  # node configurations take it up (Config.key_head) at next use


def get_prefix() -> str:
    return _prefix


@dataclass(frozen=True)
class Cache:
    """One tier of a node: the registered storage's name and the TTL of entries there.

    Checked with the node that uses it (so errors name the node): ``storage`` a non-empty
    string, ``ttl`` a positive ``timedelta`` or ``None`` (no expiry). A TTL longer than the
    storage can hold (``max_ttl`` of its backend: about 292 years for local tiers, until the
    year 9999 for SQL and MongoDB) also means no expiry. ``fail_open`` (remote tiers only)
    overrides the storage's own option for this node: ``True`` makes an error or timeout of
    the tier a miss of that tier, ``False`` sends it to the caller. ``negative_ttl``
    overrides ``Meta.negative_ttl`` for this tier (how long a "not found" is cached there).
    """

    storage: str
    ttl: timedelta | None = None
    fail_open: bool | None = None
    negative_ttl: timedelta | None = None


def _check_cache(name: str, i: int, cache: object) -> None:
    where = f"{name}.Meta.caches[{i}]"
    if not isinstance(cache, Cache):
        raise ConfigurationError(f"{where} must be a cacheme.Cache, got {cache!r}")
    if not isinstance(cache.storage, str) or not cache.storage:
        raise ConfigurationError(
            f"{where}.storage must be a registered storage name, got {cache.storage!r}"
        )
    if cache.ttl is not None:
        if not isinstance(cache.ttl, timedelta):
            raise ConfigurationError(
                f"{where}.ttl must be a timedelta or None, got {type(cache.ttl).__name__} "
                f"{cache.ttl!r}"
            )
        if cache.ttl <= timedelta(0):
            raise ConfigurationError(f"{where}.ttl must be positive, got {cache.ttl!r}")
    if cache.negative_ttl is not None and (
        not isinstance(cache.negative_ttl, timedelta) or cache.negative_ttl <= timedelta(0)
    ):
        raise ConfigurationError(
            f"{where}.negative_ttl must be a positive timedelta or None, got {cache.negative_ttl!r}"
        )
    if cache.fail_open is not None and not isinstance(cache.fail_open, bool):
        raise ConfigurationError(
            f"{where}.fail_open must be True, False or None, got {cache.fail_open!r}"
        )


_META_OPTIONS = (
    "version",
    "caches",
    "serializer",
    "doorkeeper",
    "load_timeout",
    "stale_if_error",
    "lease",
    "lease_storage",
    "refresh_after",
    "stale_while_revalidate",
    "negative_ttl",
    "not_found",
)


class Config:
    """The checked ``Meta`` of one node class, its stats, and its resolved tiers."""

    def __init__(
        self, name: str, meta: type, owner: type[Node] | None = None, tag_space: str = ""
    ) -> None:
        self.name = name
        # Whose tags and flights invalidate_tag and invalidate_node reach: the class that
        # declared the Meta (a subclass without one shares its parent's entries, so its tags
        # too), else this one.
        self.tag_space = tag_space or name
        self.version: str = _option(name, meta, "version", "", str)
        if not utf8_encodable(self.version):
            raise ConfigurationError(
                f"{name}.Meta.version must encode as UTF-8 (no lone surrogate: no remote "
                f"tier could store a key), got {self.version!r}"
            )
        caches = _option(name, meta, "caches", [], (list, tuple))
        seen: dict[str, int] = {}
        for i, cache in enumerate(caches):
            _check_cache(name, i, cache)
            if cache.storage in seen:
                # Two tiers on one storage would read and write the same entries.
                raise ConfigurationError(
                    f"{name}.Meta.caches[{i}] names storage {cache.storage!r} again "
                    f"(caches[{seen[cache.storage]}]): each storage may be one tier of a node"
                )
            seen[cache.storage] = i
        self.caches: tuple[Cache, ...] = tuple(caches)
        serializer = getattr(meta, "serializer", None)
        self.serializer: Serializer | None = (
            None if serializer is None else adopt(serializer, f"{name}.Meta.serializer")
        )
        doorkeeper = getattr(meta, "doorkeeper", None)
        self.doorkeeper: DoorKeeper | None = (
            None if doorkeeper is None else adopt_doorkeeper(doorkeeper, f"{name}.Meta.doorkeeper")
        )
        timeout = _option(name, meta, "load_timeout", None, (int, float))
        if timeout is not None and not (0 < timeout < math.inf):
            raise ConfigurationError(
                f"{name}.Meta.load_timeout must be a positive, finite number of seconds, "
                f"got {timeout!r}"
            )
        self.load_timeout: float | None = timeout
        stale = _option(name, meta, "stale_if_error", None, timedelta)
        if stale is not None and stale <= timedelta(0):
            raise ConfigurationError(f"{name}.Meta.stale_if_error must be positive, got {stale!r}")
        self.stale_if_error: timedelta | None = stale
        lease = _option(name, meta, "lease", None, timedelta)
        if lease is not None and lease <= timedelta(0):
            raise ConfigurationError(f"{name}.Meta.lease must be positive, got {lease!r}")
        self.lease: timedelta | None = lease  # one load per key across processes (lease.py)
        self.lease_storage: str | None = _option(name, meta, "lease_storage", None, str)
        # Refresh-ahead, stale-while-revalidate, negative caching, tags (freshness.py): None
        # when the node uses none of them; then its entries are stored as they always were.
        self.fresh: Policy | None = policy(name, meta, self.caches, owner, stale)
        self.stamped = self.fresh is not None
        unknown = [
            attr
            for klass in meta.__mro__
            if klass not in (object, Node.Meta)
            for attr in vars(klass)
            if not attr.startswith("_") and attr not in _META_OPTIONS
        ]
        if unknown:
            raise ConfigurationError(
                f"{name}.Meta has unknown option(s) {', '.join(sorted(set(unknown)))}; "
                f"known: {', '.join(_META_OPTIONS)}"
            )
        # The type remote values decode to: the return annotation of the owner's load() or,
        # failing that, of a memoized function (type_from). Read at first use, like the storage
        # names, so annotations may name classes defined later in the module.
        self.owner = owner
        self.value_type: Any = Any
        self._type_sources: list[Callable[..., Any]] = []
        if owner is not None and owner.load is not Node.load:
            self._type_sources.append(owner.load)
        self._typed = False
        self.stats = Recorder(tuple(c.storage for c in self.caches))
        self.generation = -1
        self.tiers: tuple[Tier, ...] = ()
        self.front: tuple[Tier, ...] = ()  # the leading tiers that answer without waiting
        # The order write-backs go in: remote tiers first (a value their serializer refuses
        # must not land in memory either), then local ones; indices into ``tiers``.
        self.write_order: tuple[int, ...] = ()
        self.peek: Callable[[str], Any] | None = None  # front[0]'s lookup, bound once
        # A full key is key_head + node.key() + key_tail: "{prefix}:" and ":{version}".
        self.key_head = ""
        self.key_tail = ""

        # Last loaded values for stale-if-error: key -> (value, monotonic deadline, the
        # backplane mark taken before it was read: see walk._servable).
        self.last_good: OrderedDict[str, tuple[Any, float, int]] = OrderedDict()

    def for_function(self, fn: Callable[..., Any]) -> Config:
        """This configuration as ``Memoize`` uses it for ``fn``: the same tiers, stats and
        stale values, but values decode to ``fn``'s return annotation (else ``load()``'s).
        The node class's own configuration is left as it is."""
        derived = copy.copy(self)
        derived._type_sources = [fn, *self._type_sources]
        derived._typed = False
        derived.generation = -1
        derived.tiers = ()
        derived.write_order = ()
        derived.front = ()
        derived.peek = None
        return derived

    def resolve(self) -> None:
        """Look the tier names up in the storage registry (again, if it changed)."""
        if self.owner is not None and self.owner.__dict__.get("_cacheme_abstract", False):
            raise ConfigurationError(
                f"{self.name} has no tiers of its own: use the class build_node returned "
                f"(its instances take key=...), or the node class your Memoize was given"
            )
        if not self._typed:
            self.value_type = _value_type(self.name, self._type_sources)
            problem = (
                None if self.serializer is None else self.serializer.type_problem(self.value_type)
            )
            if problem is not None:
                logger.warning(
                    "cacheme: node %s: %r cannot decode into the annotation %r (%s); remote "
                    "values decode to plain data",
                    self.name,
                    self.serializer,
                    self.value_type,
                    str(problem).splitlines()[0],
                )
                self.value_type = Any
            self._typed = True
        tiers = tuple(
            make_tier(self, i, registry.get_storage(c.storage, user=f"node {self.name}"), c)
            for i, c in enumerate(self.caches)
        )
        if self.lease is not None and all(t.immediate for t in tiers):
            # The lease holder hands its value over through a shared tier: with none, every
            # waiter would wait out the lease and then load the key itself.
            raise ConfigurationError(
                f"{self.name}.Meta.lease needs a shared tier (Redis, SQL, MongoDB) in "
                f"Meta.caches to hand the loaded value to the other processes; its tiers "
                f"are all local: {', '.join(repr(t.name) for t in tiers) or 'none'}"
            )
        fraction = self.fresh.refresh_fraction if self.fresh is not None else 0.0
        endless = [(t, c) for t, c in zip(tiers, self.caches, strict=True) if t.ttl is None]
        if fraction and endless:
            # A share of no TTL: such a tier's entries would silently never be refreshed.
            tier, cache = endless[0]
            why = "has none"
            if cache.ttl is not None:  # longer than the storage can hold: no expiry
                why = (
                    f"has none (its ttl {cache.ttl} is longer than the storage can hold, "
                    f"max_ttl {tier.max_ttl}, and so means no expiry)"
                )
            raise ConfigurationError(
                f"{self.name}.Meta.refresh_after = {fraction} is a fraction of each tier's "
                f"TTL, but tier {tier.name!r} {why}: give that tier a TTL, or "
                "refresh_after a timedelta"
            )
        front: list[Tier] = []
        for tier in tiers:
            if not tier.immediate:
                break
            front.append(tier)
        self.tiers = tiers
        self.write_order = tuple(sorted(range(len(tiers)), key=lambda j: tiers[j].immediate))
        self.front = tuple(front)
        self.peek = front[0].peek_function() if front else None
        self.key_head = f"{_prefix}:"
        self.key_tail = f":{self.version}"
        self.generation = registry.generation

    def same_settings(self, other: Config) -> bool:
        return (
            self.version == other.version
            and self.caches == other.caches
            and self.serializer == other.serializer
            and repr(self.doorkeeper) == repr(other.doorkeeper)
        )


def _option(name: str, meta: type, attr: str, default: Any, kinds: type | tuple[type, ...]) -> Any:
    value = getattr(meta, attr, default)
    if value is default or (value is None and default is None):
        return value
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        wanted = (
            kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        )
        raise ConfigurationError(
            f"{name}.Meta.{attr} must be {wanted}, got {type(value).__name__} {value!r}"
        )
    return value


def _value_type(name: str, sources: list[Callable[..., Any]]) -> Any:
    """The first return annotation of ``sources`` that is not ``Any`` (else ``Any``)."""
    for fn in sources:
        try:
            hint = typing.get_type_hints(fn).get("return", Any)
        except Exception as exc:
            logger.warning(
                "cacheme: node %s: cannot resolve the return annotation of %s (%r); remote "
                "values decode to plain data",
                name,
                getattr(fn, "__qualname__", fn),
                exc,
            )
            continue
        if hint is not Any:
            return hint
    return Any


_registry: list[type[Node]] = []


class Node:
    """Base of every cached thing: subclass it, give it ``key()``, ``load()`` and ``Meta``."""

    _cacheme_config: ClassVar[Config]

    class Meta:
        version: str = ""
        caches: Sequence[Cache] = []
        serializer: Serializer | None = None
        doorkeeper: DoorKeeper | None = None
        load_timeout: float | None = None  # seconds; a slower load() fails every waiter
        stale_if_error: timedelta | None = None  # serve the last value this long if load() fails
        lease: timedelta | None = None  # one load per key across processes (cacheme.lease)
        lease_storage: str | None = None  # Redis storage of leases (default: the backplane's)
        refresh_after: timedelta | float | None = None  # reload in the background after this age
        stale_while_revalidate: timedelta | None = None  # serve this long past the TTL, reloading
        negative_ttl: timedelta | None = None  # cache None (and not_found) this long
        not_found: type[Exception] | tuple[type[Exception], ...] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__qualname__
        meta = cls.__dict__.get("Meta")
        if meta is not None and not isinstance(meta, type):
            raise ConfigurationError(f"{name}.Meta must be a class, got {meta!r}")
        space = name
        if meta is None:
            meta = cls.Meta  # inherited: same settings, own stats, the parent's tags
            for base in cls.__mro__[1:]:
                declared: Config | None = base.__dict__.get("_cacheme_config")
                if "Meta" in base.__dict__ and declared is not None:
                    space = declared.tag_space
                    break
        cls._cacheme_config = Config(name, meta, cls, space)
        if not cls.__dict__.get("_cacheme_abstract", False):
            _registry.append(cls)

    def key(self) -> str:
        """The node's part of the cache key; must be a ``str``."""
        raise NotDefinedError(f"{type(self).__qualname__} must define key()")

    def full_key(self) -> str:
        """The whole key the tiers store this node under, as in cacheme 0.3.0:
        ``{prefix}:{key()}:{Meta.version}`` (the prefix of ``set_prefix``). Raises
        ``ConfigurationError`` when ``key()`` returns something else than a ``str``."""
        cfg = type(self)._cacheme_config
        return whole_key(cfg.name, self.key(), cfg.version)

    async def load(self) -> Any:
        """Load the value from its source on a cache miss."""
        raise NotDefinedError(
            f"{type(self).__qualname__} has no load(); define it or use cacheme.Memoize"
        )

    @classmethod
    async def load_all(cls, nodes: Sequence[Any]) -> Sequence[tuple[Any, Any]]:
        """Load many nodes at once, as ``(node, value)`` pairs covering every node given.

        Used by ``get_all`` for the nodes no tier had. The default calls ``load()`` for each
        node concurrently (and a failing node fails only its own callers); override it to
        fetch in one query. An override that leaves a node out fails that node's callers
        with ``LoadError``. A class that overrides it and not ``load()`` loads every miss
        through it, a lone ``get`` included.
        """
        raise NotImplementedError  # never called: api.py loads node by node instead


class DynamicNode(Node):
    """A node whose key is given directly: ``DynamicNode(key="user:1")``.

    Used with ``Memoize(build_node(...))``: it then takes the built class's configuration.
    """

    _cacheme_abstract = True

    def __init__(self, key: str) -> None:
        self._key = key

    def key(self) -> str:
        return self._key

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(key={self._key!r})"


_built: dict[str, type[DynamicNode]] = {}


def build_node(
    name: str,
    version: str,
    caches: list[Cache],
    serializer: Serializer | None = None,
    doorkeeper: DoorKeeper | None = None,
) -> type[DynamicNode]:
    """Create (once per name) a node class with its own ``Meta``.

    Building the same name again with the same settings returns the same class; with other
    settings it raises ``ConfigurationError``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigurationError(f"build_node name must be an identifier, got {name!r}")
    meta = type(
        "Meta",
        (Node.Meta,),
        {"version": version, "caches": caches, "serializer": serializer, "doorkeeper": doorkeeper},
    )
    existing = _built.get(name)
    if existing is not None:
        if existing._cacheme_config.same_settings(Config(name, meta)):
            return existing
        raise ConfigurationError(
            f"build_node({name!r}) was already called with other settings; "
            "use another name or the same settings"
        )
    cls = type(name, (DynamicNode,), {"Meta": meta, "__module__": __name__})
    _built[name] = cls
    return cls


def nodes() -> list[type[Node]]:
    """Every node class defined so far, in definition order."""
    return list(_registry)
