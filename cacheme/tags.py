"""Tags: drop every entry of a node class that carries a tag, in O(1) round trips per tier.

A node class that defines ``tags(self) -> Sequence[str]`` is *tagged*. Each of its entries
records, when it is written, the *version* of each of its tags in the tier it is written to,
and of the class tag (the tag ``""``, which every entry of the class carries). A read checks
the recorded versions against the current ones; an entry whose versions differ is a miss.
Invalidating a tag is one write of a new version per tier: no scan of the keyspace, no list
of keys per tag.

- **Remote tiers** keep each version in a small key ``{prefix}:tag:{NodeName}:{tag}`` (a
  random 8-byte token, no expiry). A read of tagged entries asks for their tag keys in the
  same batch as the entry keys (one round trip). A tag key missing at read time is added by
  the writer of the entry (a new token, set-if-absent with ``add_many``, in the same loop
  turn as the entry): if an invalidation or another writer stored the key first, its
  version stays and this writer's entries, which record the writer's token, are misses. A
  writer never adopts a version it did not read before its load: one an invalidation stored
  during the load would make the value loaded before it valid. An entry is never valid
  against a missing tag key.
- **Local tiers** compare against this process's table of versions (``_local``), bumped by
  ``invalidate_tag``/``invalidate_node`` and, with the backplane, by the messages of other
  processes (a tag invalidation is published as its tag key).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import backplane
from .errors import ConfigurationError, StorageError
from .storages.base import Entry
from .tiers import RemoteTier, failures, raised

if TYPE_CHECKING:
    from .node import Config, Node

CLASS_TAG = ""  # the tag every entry of a tagged class carries
_LOCAL_MAX = 100_000  # versions kept before the table is reset (every local entry then misses)

# tag key -> this process's version of it (local tiers record and check these)
_local: dict[str, int] = {}
_counter = itertools.count(1)


def tag_key(cfg_name: str, tag: str) -> str:
    from . import node  # node imports freshness, which imports this module

    return f"{node._prefix}:tag:{cfg_name}:{tag}"


def new_token() -> bytes:
    """A new remote version: 8 random bytes (unique across processes)."""
    return os.urandom(8)


def names_of(cfg: Config, node: Node) -> tuple[str, ...]:
    """The tags of ``node``, the class tag first; checked (non-empty strings)."""
    got: Any = node.tags()  # type: ignore[attr-defined]
    if isinstance(got, str) or not isinstance(got, (list, tuple, set, frozenset)):
        raise ConfigurationError(
            f"{cfg.name}.tags() must return a list or tuple of strings, got {got!r}"
        )
    for tag in got:
        if not isinstance(tag, str) or not tag:
            raise ConfigurationError(
                f"{cfg.name}.tags() must return non-empty strings, got {tag!r} in {got!r}"
            )
    return (CLASS_TAG, *sorted(set(got)))


def local_version(key: str) -> int:
    """This process's version of the tag key ``key`` (created at first use)."""
    version = _local.get(key)
    if version is None:
        if len(_local) >= _LOCAL_MAX:
            _local.clear()  # every recorded version is now unknown: local tagged entries miss
        version = _local.setdefault(key, next(_counter))
    return version


def local_valid(keys: Sequence[str], versions: Sequence[Any]) -> bool:
    get = _local.get
    return all(get(key) == version for key, version in zip(keys, versions, strict=True))


def bump_local(keys: Iterable[str]) -> None:
    for key in keys:
        _local[key] = next(_counter)


def _on_message(kind: str, keys: Sequence[str], remote: bool, since: float | None) -> None:
    """Backplane listener: another process invalidated these tag keys."""
    if kind != "k" or not remote:
        return
    for key in keys:
        if key in _local:
            _local[key] = next(_counter)


backplane.add_listener(_on_message)


def _config(node_cls: type[Node], what: str) -> Config:
    from .api import config_of
    from .node import Node

    if not (isinstance(node_cls, type) and issubclass(node_cls, Node)):
        raise ConfigurationError(f"{what} takes a node class, got {node_cls!r}")
    cfg = config_of(node_cls)
    if cfg.fresh is None or not cfg.fresh.tagged:
        raise ConfigurationError(
            f"{what}: node {cfg.name} has no tags; define tags(self) returning a list of "
            "strings (an empty list is fine) to invalidate its entries by tag or all at once"
        )
    return cfg


async def invalidate_tag(node_cls: type[Node], tag: str) -> None:
    """Drop every entry of ``node_cls`` whose ``tags()`` included ``tag``, in every tier.

    One write per remote tier (a new version of the tag), whatever the number of entries;
    local tiers of this process at once, of other processes through the backplane. Raises
    ``StorageError`` if a remote tier could not take the new version (as ``invalidate``).
    """
    if not isinstance(tag, str) or not tag:
        raise ConfigurationError(f"invalidate_tag takes a non-empty tag string, got {tag!r}")
    await _invalidate(_config(node_cls, "invalidate_tag"), tag)


async def invalidate_node(node_cls: type[Node]) -> None:
    """Drop every entry of the tagged node class ``node_cls``, in every tier (see
    ``invalidate_tag``: the class tag every entry carries is invalidated)."""
    await _invalidate(_config(node_cls, "invalidate_node"), CLASS_TAG)


async def _invalidate(cfg: Config, tag: str) -> None:
    from .api import detach_node_everywhere

    key = tag_key(cfg.tag_space, tag)
    # Which keys carry the tag is known only once loaded: no request made after this
    # returns joins a flight of the node begun before (their own callers still get their
    # values, and what they write carries the tag versions read before the bump).
    detach_node_everywhere(cfg.tag_space)
    bump_local((key,))
    writes = []
    for tier in cfg.tiers:
        if isinstance(tier, RemoteTier):
            try:
                writes.append((tier, tier.storage.set_many([Entry(key, new_token(), None)])))
            except StorageError as exc:
                writes.append((tier, raised(exc)))
    failed = await failures(cfg, writes)
    # Again: a walk that started after the first bump may have read a remote entry before
    # the new remote version landed, and copied it to a local tier under the new version.
    bump_local((key,))
    detach_node_everywhere(cfg.tag_space)  # flights begun while the new version was being written
    backplane.publish((key,))
    if failed:
        name, error = failed[0]
        if tag:
            what = f"invalidate of tag {tag!r} of node {cfg.name}"
            entries = "its entries of that tag"
        else:  # the empty tag is the node's own: invalidate_node
            what, entries = f"invalidate_node of node {cfg.name}", "its entries"
        raise StorageError(
            f"{what}: storage {name!r} did not take the new version; {entries} may still be "
            f"served: {error}"
        ) from error
