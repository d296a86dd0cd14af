"""cacheme: asyncio, node-based caching with local, Redis, SQL and MongoDB tiers.

Declare what is cached as ``Node`` classes, register storages at start-up, then ``get``,
``get_all``, ``invalidate``, ``refresh`` or ``@Memoize``. Everything public is here.
"""

from __future__ import annotations

from .api import get, get_all, invalidate, refresh, stats
from .backplane import (
    BackplaneStats,
    backplane_stats,
    disable_backplane,
    enable_backplane,
    flush_backplane,
)
from .doorkeeper import BloomFilter, DoorKeeper
from .errors import (
    CachemeError,
    ConfigurationError,
    DecodeError,
    EncodeError,
    InvalidKeyError,
    LoadError,
    LoadTimeoutError,
    MissingDriverError,
    NotDefinedError,
    SerializationError,
    StorageError,
    StorageMisconfiguredError,
    StorageNotRegisteredError,
    StorageTimeoutError,
    StorageUnavailableError,
    UnknownSchemeError,
)
from .memoize import Memoize
from .metrics import StatsSnapshot
from .node import Cache, DynamicNode, Node, build_node, nodes, set_prefix
from .stats import NodeStats
from .storages.registry import Storage, close_storages, register_storage, storages
from .tags import invalidate_node, invalidate_tag

__all__ = [
    "BackplaneStats",
    "BloomFilter",
    "Cache",
    "CachemeError",
    "ConfigurationError",
    "DecodeError",
    "DoorKeeper",
    "DynamicNode",
    "EncodeError",
    "InvalidKeyError",
    "LoadError",
    "LoadTimeoutError",
    "Memoize",
    "MissingDriverError",
    "Node",
    "NodeStats",
    "NotDefinedError",
    "SerializationError",
    "StatsSnapshot",
    "Storage",
    "StorageError",
    "StorageMisconfiguredError",
    "StorageNotRegisteredError",
    "StorageTimeoutError",
    "StorageUnavailableError",
    "UnknownSchemeError",
    "backplane_stats",
    "build_node",
    "close_storages",
    "disable_backplane",
    "enable_backplane",
    "flush_backplane",
    "get",
    "get_all",
    "invalidate",
    "invalidate_node",
    "invalidate_tag",
    "nodes",
    "refresh",
    "register_storage",
    "set_prefix",
    "stats",
    "storages",
]
