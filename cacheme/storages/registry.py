"""Storage descriptors, the URL-scheme table, and the registered storages.

``Storage(url, **options)`` only describes a storage; ``register_storage`` builds the
backend for its scheme (importing the driver only then), validates the options against the
backend's option model, connects, and publishes it under a name.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any

from pydantic import ValidationError

from ..errors import (
    ConfigurationError,
    MissingDriverError,
    StorageError,
    StorageMisconfiguredError,
    StorageNotRegisteredError,
    UnknownSchemeError,
)
from .base import BaseStorage, RemoteStorage
from .url import bad_port, redact, scheme_of

logger = logging.getLogger("cacheme")

# scheme -> (module:class, the extra that installs its driver)
SCHEMES: dict[str, tuple[str, str | None]] = {
    "local": ("cacheme.storages.local:LOCAL_POLICIES", None),
    "redis": ("cacheme.storages.redis:RedisStorage", "redis"),
    "rediss": ("cacheme.storages.redis:RedisStorage", "redis"),
    "sqlite": ("cacheme.storages.sqlite:SQLiteStorage", "sqlite"),
    "postgresql": ("cacheme.storages.postgres:PostgresStorage", "postgres"),
    "postgres": ("cacheme.storages.postgres:PostgresStorage", "postgres"),
    "mysql": ("cacheme.storages.mysql:MySQLStorage", "mysql"),
    "mongodb": ("cacheme.storages.mongo:MongoStorage", "mongo"),
}


class Storage:
    """Describes a storage: ``Storage(url="redis://localhost:6379", pool_size=50)``.

    Options are checked against the backend when the storage is registered; unknown names
    and wrong types raise ``ConfigurationError`` naming the option.
    """

    def __init__(self, url: str, **options: Any) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ConfigurationError(
                f"Storage url must be a URL string like 'redis://host', got {url!r}"
            )
        try:
            scheme = scheme_of(url)
        except ValueError as exc:  # urlsplit: "Invalid IPv6 URL", a port out of range...
            raise ConfigurationError(
                f"Storage url {redact(url)!r} is not a valid URL: {exc}"
            ) from None
        if scheme not in SCHEMES:
            raise UnknownSchemeError(
                f"Storage url {redact(url)!r}: unknown scheme {scheme!r}; supported: "
                f"{', '.join(sorted(SCHEMES))}"
            )
        port = bad_port(url)
        if port is not None:
            raise ConfigurationError(
                f"Storage url {redact(url)!r}: port {port!r} is not a number from 1 to 65535"
            )
        self.url = url
        self.scheme = scheme
        self.options = options

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"Storage(url={redact(self.url)!r}{opts})"

    def build(self, name: str) -> BaseStorage[Any]:
        """The backend object for this description (not connected yet)."""
        cls = backend_class(self.url)
        try:
            options = cls.options_model(**self.options)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'options'}: "
                f"{err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            raise ConfigurationError(
                f"storage {name!r} ({redact(self.url)}): bad option(s): {problems}"
            ) from None
        return cls(name, self.url, options)


def backend_class(url: str) -> type[BaseStorage[Any]]:
    """The backend class serving ``url``, importing its driver on first use."""
    scheme = scheme_of(url)
    target, extra = SCHEMES[scheme]
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and exc.name.startswith("cacheme"):
            raise
        raise MissingDriverError(
            f"storage scheme {scheme!r} needs the driver {exc.name!r}: "
            f'pip install "cacheme[{extra}]"'
        ) from exc
    found = getattr(module, attr)
    if isinstance(found, dict):  # local://{policy}
        from .local import policy_class

        return policy_class(url)
    return found  # type: ignore[no-any-return]


_storages: dict[str, BaseStorage[Any]] = {}
# Bumped whenever the registry changes, so nodes re-resolve their cached tiers.
generation = 0


async def register_storage(name: str, storage: Storage) -> None:
    """Build, connect and publish ``storage`` as ``name``.

    Connecting takes at most twice the storage's ``timeout`` (the attempt, then the cleanup of
    a failed attempt). If it fails and the storage fails open (``fail_open=True``, the
    default), the storage is registered anyway after a warning: it counts as failing (its
    circuit breaker opens, so nodes skip it) and comes into use by itself once the server
    answers, each event loop connecting at its first operation. With ``fail_open=False`` the
    error is raised (``StorageError``, or ``StorageTimeoutError`` when nothing answered) and
    nothing is registered. A server that answers and refuses the settings raises
    ``StorageMisconfiguredError`` whatever ``fail_open`` says. Registering a name again
    replaces the old storage (after the new one connects) and closes the old one.
    """
    global generation
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"storage name must be a non-empty string, got {name!r}")
    if not isinstance(storage, Storage):
        raise ConfigurationError(
            f"register_storage({name!r}, ...) takes a cacheme.Storage, got {storage!r}"
        )
    backend = storage.build(name)
    try:
        await backend.connect()
    except StorageError as exc:
        misconfigured = isinstance(exc, StorageMisconfiguredError)
        if misconfigured or not isinstance(backend, RemoteStorage) or not backend.options.fail_open:
            raise
        logger.warning(
            "cacheme: storage %r is unreachable at registration (%s); registered anyway "
            "(fail_open): nodes skip it until it answers",
            name,
            exc,
        )
        backend.note_unreachable(exc)
    old = _storages.get(name)
    _storages[name] = backend
    generation += 1
    if old is not None:
        await old.close()


def get_storage(name: str, *, user: str = "") -> BaseStorage[Any]:
    """The storage registered as ``name``; the error names ``user`` (a node) if given."""
    try:
        return _storages[name]
    except KeyError:
        who = f"{user} uses " if user else ""
        known = ", ".join(repr(n) for n in sorted(_storages)) or "none"
        raise StorageNotRegisteredError(
            f"{who}storage {name!r}, which is not registered "
            f"(registered: {known}); call cacheme.register_storage({name!r}, ...) first"
        ) from None


def storages() -> dict[str, BaseStorage[Any]]:
    """A copy of the registered storages by name."""
    return dict(_storages)


async def close_storages() -> None:
    """Close and forget every registered storage (for app shutdown and tests).

    Every storage is closed in every event loop that has connections to it (see
    ``RemoteStorage.close``), even when some fail; then one ``StorageError`` names those
    that failed. Waits first (at most the backplane storage's timeout + 1 s) for the
    messages the backplane has queued to go out.
    """
    global generation
    from .. import backplane  # it imports this module

    # What the backplane has queued goes out first: a process that closes its storages is
    # often about to end (and the backplane may run on one of them).
    await backplane.flush()
    items = list(_storages.values())
    _storages.clear()
    generation += 1
    # At once: each within its own timeout, not one after the other.
    outcomes = await asyncio.gather(*(b.close() for b in items), return_exceptions=True)
    failed: list[tuple[str, BaseException]] = []
    for backend, outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, Exception):
            failed.append((backend.name, outcome))
        elif isinstance(outcome, BaseException):
            raise outcome  # this task is being cancelled
    if failed:
        names = ", ".join(repr(n) for n, _ in failed)
        raise StorageError(
            f"close_storages: {len(failed)} storage(s) failed to close: {names} "
            f"(first: {failed[0][1]})"
        ) from failed[0][1]
