"""A lifespan for FastAPI and Starlette apps: storages registered at start-up, closed at shutdown.

::

    from fastapi import FastAPI
    import cacheme
    from cacheme.integrations.fastapi import cacheme_lifespan

    app = FastAPI(
        lifespan=cacheme_lifespan(
            {
                "local": cacheme.Storage(url="local://tlfu", size=10_000),
                "redis": cacheme.Storage(url="redis://localhost:6379"),
            }
        )
    )

The same object works as ``Starlette(lifespan=...)``: both call ``lifespan(app)`` and enter
the async context manager it returns. Nothing here imports FastAPI or Starlette.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from ..errors import ConfigurationError, StorageError, StorageMisconfiguredError
from ..storages.base import RemoteOptions
from ..storages.registry import Storage, close_storages, register_storage
from ..storages.url import redact

__all__ = ["Lifespan", "cacheme_lifespan"]

logger = logging.getLogger("cacheme")

AppT = TypeVar("AppT")
Lifespan = Callable[[AppT], AbstractAsyncContextManager[Any]]


def cacheme_lifespan(
    storages: Mapping[str, Storage],
    app_lifespan: Lifespan[AppT] | None = None,
    *,
    create_schemas: bool = False,
) -> Lifespan[AppT]:
    """A lifespan that registers ``storages`` (name -> ``cacheme.Storage``) at start-up.

    At start-up, in the mapping's order: (with ``create_schemas=True``) create the table or
    collection of each SQL / MongoDB storage if missing (``cacheme.schemas.create``, within
    the storage's ``timeout``: handy in development and tests; in production create them
    once with ``cacheme schema create``; a server that cannot be reached stops the start-up
    only for a storage with ``fail_open=False``, else it is logged and the start-up goes
    on), then ``await cacheme.register_storage(name, storage)`` for each, then enter
    ``app_lifespan(app)`` if given and hand its state to the framework. At shutdown (and if
    start-up fails part-way) ``app_lifespan`` is exited first, then
    ``await cacheme.close_storages()`` closes every registered storage, including any the
    app registered itself.

    Raises ``ConfigurationError`` at once if ``storages`` is not a mapping of non-empty
    names to ``cacheme.Storage``, or ``app_lifespan`` is not callable or is a bare
    (async) generator function; at start-up, errors of the schema step name the storage as
    ``register_storage``'s do (a setting the server or the file system refuses,
    ``StorageMisconfiguredError``, stops the start-up even failing open), and whatever
    ``register_storage`` raises (``ConfigurationError``, ``MissingDriverError``,
    ``StorageError``) makes the app fail to start.
    """
    if not isinstance(storages, Mapping):
        raise ConfigurationError(
            f"cacheme_lifespan takes a mapping of names to cacheme.Storage, got {storages!r}"
        )
    for name, storage in storages.items():
        if not isinstance(name, str) or not name or not isinstance(storage, Storage):
            raise ConfigurationError(
                f"cacheme_lifespan: {name!r}: {storage!r} must be a non-empty name and a "
                f"cacheme.Storage"
            )
    _check_app_lifespan(app_lifespan)
    wanted = dict(storages)

    @asynccontextmanager
    async def lifespan(app: AppT) -> AsyncIterator[Any]:
        try:
            if create_schemas:
                for name, storage in wanted.items():
                    await _create_schema(name, storage)
            for name, storage in wanted.items():
                await register_storage(name, storage)
            if app_lifespan is None:
                yield None
            else:
                entered = app_lifespan(app)
                if not (hasattr(entered, "__aenter__") and hasattr(entered, "__aexit__")):
                    raise ConfigurationError(
                        f"cacheme_lifespan: app_lifespan {app_lifespan!r} returned "
                        f"{entered!r}, not an async context manager"
                    )
                async with entered as state:
                    yield state
        finally:
            await close_storages()

    return lifespan


def _check_app_lifespan(app_lifespan: object) -> None:
    """``ConfigurationError`` for an ``app_lifespan`` that cannot be a lifespan, when the app
    is built rather than when it starts."""
    if app_lifespan is None:
        return
    if not callable(app_lifespan):
        raise ConfigurationError(
            f"cacheme_lifespan: app_lifespan must be a lifespan (a callable that takes the app "
            f"and returns an async context manager), got {app_lifespan!r}"
        )
    if inspect.isasyncgenfunction(app_lifespan) or inspect.isgeneratorfunction(app_lifespan):
        raise ConfigurationError(
            f"cacheme_lifespan: app_lifespan {app_lifespan!r} is a generator function; "
            f"decorate it with @contextlib.asynccontextmanager"
        )


async def _create_schema(name: str, storage: Storage) -> None:
    """``cacheme.schemas.create`` for ``storage`` (SQL or MongoDB), within its ``timeout``.
    A server that cannot be reached stops the start-up only when the storage has
    ``fail_open=False``; else a warning, and ``register_storage`` goes on as it does for an
    unreachable server."""
    from .. import schemas

    if schemas.schema_kind(storage.url) is None:
        return
    # Every option checked first, under the storage's own name (schemas.create names none).
    storage.build(name)
    options = storage.options
    where = {k: v for k, v in options.items() if k in ("table", "database", "collection")}
    timeout = options.get("timeout", RemoteOptions.model_fields["timeout"].default)
    try:
        await schemas.create(storage.url, timeout=timeout, **where)
    except StorageError as exc:
        misconfigured = isinstance(exc, StorageMisconfiguredError)
        if misconfigured or options.get("fail_open", True) is False:
            # The storage's name, as register_storage's errors give it.
            text = str(exc).removeprefix(f"{schemas.shown(storage.url)}: ")
            raise type(exc)(
                f"storage {name!r} ({redact(storage.url)}): could not create its schema: {text}"
            ) from exc
        logger.warning(
            "cacheme: storage %r: could not create its schema (%s); starting without it "
            "(fail_open): create it with `cacheme schema create` once the server answers",
            name,
            exc,
        )
