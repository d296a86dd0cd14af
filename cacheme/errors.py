"""The one error tree of cacheme.

Every exception cacheme raises on purpose is a ``CachemeError``::

    CachemeError
    ├── ConfigurationError (also ValueError)   a node, Meta, Cache, Storage or Memoize is wrong
    │   ├── StorageNotRegisteredError           a node uses a storage name nobody registered
    │   ├── UnknownSchemeError                  Storage(url=...) with a scheme we do not know
    │   └── MissingDriverError (also ImportError)  the backend's driver is not installed
    ├── StorageError                            a tier failed (connection, protocol, server)
    │   ├── StorageTimeoutError (also TimeoutError)  a tier did not answer within its timeout
    │   ├── StorageUnavailableError             the tier's circuit breaker is open
    │   └── InvalidKeyError (also ValueError)   kept for callers; no longer raised (see below)
    ├── SerializationError
    │   ├── EncodeError (also TypeError)        a value the node's serializer cannot encode
    │   └── DecodeError                         stored bytes that cannot be decoded
    └── LoadError                               load()/load_all() broke its contract
        └── LoadTimeoutError (also TimeoutError)  load() ran past Meta.load_timeout

Exceptions raised by a node's own ``load()`` reach the caller unchanged.
"""

from __future__ import annotations


class CachemeError(Exception):
    """Base of every error cacheme raises."""


class ConfigurationError(CachemeError, ValueError):
    """A node, Meta, Cache, Storage or Memoize is declared or used wrongly."""


class NotDefinedError(ConfigurationError, NotImplementedError):
    """A node lacks a method cacheme needs: ``key()``, or ``load()`` for a miss that has no
    other loader. (Also a ``NotImplementedError``, what these raised before.)"""


class StorageNotRegisteredError(ConfigurationError):
    """A node refers to a storage name that is not registered."""


class UnknownSchemeError(ConfigurationError):
    """A storage URL uses a scheme no backend serves."""


class MissingDriverError(ConfigurationError, ImportError):
    """The driver a backend needs is not installed."""


class StorageError(CachemeError):
    """A storage tier failed to answer."""


class StorageTimeoutError(StorageError, TimeoutError):
    """A storage tier did not answer within its timeout (pool wait included)."""


class StorageUnavailableError(StorageError):
    """A storage tier is skipped because its circuit breaker is open."""


class StorageMisconfiguredError(StorageError, ConfigurationError):
    """The server answered, and refused the storage's settings: an unknown database, role or
    password, a database number out of range, a missing cache table; or a setting found
    wrong without asking a server (a URL query option the driver does not take, a SQLite
    path that cannot be the database file: its directory is missing, say). Raised by
    ``register_storage`` even when the storage fails open (waiting would not help)."""


class InvalidKeyError(StorageError, ValueError):
    """A key that no remote tier can store (it does not encode as UTF-8).

    cacheme no longer raises it: such a key is never stored, so it reads as absent and its
    writes and removals do nothing, never failing its neighbours or counting toward the
    breaker. The class stays importable for code written against the version that did.
    """


class SerializationError(CachemeError):
    """A value could not be encoded or decoded."""


class EncodeError(SerializationError, TypeError):
    """A value the node's serializer cannot encode."""


class DecodeError(SerializationError):
    """Stored bytes that the node's serializer cannot decode."""


class LoadError(CachemeError):
    """``load()`` or ``load_all()`` broke its contract."""


class LoadTimeoutError(LoadError, TimeoutError):
    """``load()`` ran longer than the node's ``Meta.load_timeout``."""
