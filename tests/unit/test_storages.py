"""register_storage / close_storages, and the local tiers (tlfu and lru)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import cacheme
from cacheme import (
    Cache,
    ConfigurationError,
    MissingDriverError,
    Node,
    Storage,
    UnknownSchemeError,
)
from cacheme.storages import registry
from cacheme.storages.base import MISS
from cacheme.storages.local import LRUStorage, TinyLFUStorage

from .helpers import stored, tier

POLICIES = ["tlfu", "lru"]


@dataclass
class Item(Node):
    n: int

    def key(self) -> str:
        return f"item:{self.n}"

    async def load(self) -> str:
        LOADS.append(self.n)
        return f"item-{self.n}"

    class Meta(Node.Meta):
        version = "v1"
        caches = [Cache(storage="local")]


LOADS: list[int] = []


@pytest.fixture(autouse=True)
def _clear_loads() -> None:
    LOADS.clear()


# -- register_storage -------------------------------------------------------------------


def test_register_storage_is_async() -> None:
    assert inspect.iscoroutinefunction(cacheme.register_storage)
    assert inspect.iscoroutinefunction(cacheme.close_storages)


@pytest.mark.parametrize(("policy", "cls"), [("tlfu", TinyLFUStorage), ("lru", LRUStorage)])
async def test_register_local_policies(policy: str, cls: type) -> None:
    await cacheme.register_storage("local", Storage(url=f"local://{policy}", size=10))
    storage = cacheme.storages()["local"]
    assert isinstance(storage, cls)
    assert storage.name == "local"
    assert storage.local


async def test_registering_a_name_again_replaces_and_closes_the_old_one() -> None:
    await cacheme.register_storage("local", Storage(url="local://lru", size=10))
    old = tier("local")
    assert await cacheme.get(Item(1)) == "item-1"
    assert old.get("cacheme:item:1:v1") == "item-1"

    await cacheme.register_storage("local", Storage(url="local://lru", size=10))
    new = tier("local")
    assert new is not old
    assert old.get("cacheme:item:1:v1") is MISS  # closed: emptied
    # Nodes resolved against the old storage move to the new one.
    assert await cacheme.get(Item(1)) == "item-1"
    assert LOADS == [1, 1]
    assert new.get("cacheme:item:1:v1") == "item-1"


async def test_replacing_a_tlfu_storage_closes_its_cache() -> None:
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=10))
    old = tier("local")
    assert isinstance(old, TinyLFUStorage)
    old.set("k", "v", None)
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=10))
    assert tier("local") is not old
    assert old.get("k") is MISS  # closed: its entries are released


def test_unknown_scheme_lists_supported_schemes() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        Storage(url="memcached://localhost:11211")
    message = str(info.value)
    assert "'memcached'" in message
    for scheme in ("local", "redis", "postgresql", "mongodb", "sqlite", "mysql"):
        assert scheme in message


def test_storage_url_must_be_a_url() -> None:
    with pytest.raises(ConfigurationError, match="URL"):
        Storage(url="localhost")


async def test_unknown_local_policy_lists_policies() -> None:
    with pytest.raises(ConfigurationError, match=r"'fifo'.*lru, tlfu"):
        await cacheme.register_storage("local", Storage(url="local://fifo", size=10))


async def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"bad option\(s\): sise"):
        await cacheme.register_storage("local", Storage(url="local://lru", size=10, sise=3))
    assert cacheme.storages() == {}


@pytest.mark.parametrize("size", ["big", 0, -1, None, "10", True, 10.0])
async def test_bad_option_value_is_named(size: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"'local'.*bad option\(s\): size"):
        await cacheme.register_storage("local", Storage(url="local://lru", size=size))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", float("inf")),
        ("timeout", float("nan")),
        ("timeout", "3"),
        ("breaker_cooldown", float("inf")),
        ("batch_size", "100"),
        ("batch_size", True),
        ("fail_open", "yes"),
        ("fail_open", 1),
        ("coalesce", "false"),
        ("pool_size", 5.5),
    ],
)
@pytest.mark.needs_dev  # the Redis driver validates the URL
async def test_remote_options_are_not_coerced(option: str, value: Any) -> None:
    """Strict: "10" or True is not a number, "false" or 1 not a flag, inf not a timeout."""
    storage = Storage(url="redis://127.0.0.1:1/0", **{option: value})
    with pytest.raises(ConfigurationError, match=rf"'r'.*bad option\(s\): {option}"):
        await cacheme.register_storage("r", storage)
    assert cacheme.storages() == {}


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/abc",
        "redis://127.0.0.1:6379/1x",
        "redis://127.0.0.1:6379/-1",
        "redis://127.0.0.1:6379/0/extra",
        "rediss://:secret@127.0.0.1:6379/db",
    ],
)
@pytest.mark.needs_dev  # the Redis driver parses the URL
async def test_a_redis_url_path_that_is_not_a_database_number_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"'r'.*the path names the database") as info:
        await cacheme.register_storage("r", Storage(url=url))
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:abc/0",
        "postgresql://127.0.0.1:abc/test",
        "mysql://root@127.0.0.1:99999/test",
        "mongodb://127.0.0.1:27017,127.0.0.1:x/db",
        "postgresql://u:secret@127.0.0.1:0/test",
    ],
)
def test_a_port_that_is_not_a_number_is_refused_at_once(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"port '\w+' is not a number") as info:
        Storage(url=url)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["redis://[::1/1", "postgresql://u:secret@[::1:5432/db", "mongodb://[zz/db"]
)
def test_a_url_urllib_cannot_split_is_refused_naming_it(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"is not a valid URL: Invalid IPv6 URL") as info:
        Storage(url=url)
    assert "secret" not in str(info.value)


async def test_missing_required_option_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"size: Field required"):
        await cacheme.register_storage("local", Storage(url="local://tlfu"))


@pytest.mark.parametrize("name", ["", None])
async def test_storage_name_must_be_a_string(name: Any) -> None:
    with pytest.raises(ConfigurationError, match="storage name"):
        await cacheme.register_storage(name, Storage(url="local://lru", size=1))


async def test_register_takes_a_storage_description() -> None:
    with pytest.raises(ConfigurationError, match=r"takes a cacheme\.Storage"):
        await cacheme.register_storage("local", "local://lru")  # type: ignore[arg-type]


@pytest.fixture
def fake_scheme() -> Iterator[str]:
    saved = dict(registry.SCHEMES)
    registry.SCHEMES["fakedb"] = ("tests.unit._missing_driver:FakeStorage", "fakedb")
    try:
        yield "fakedb"
    finally:
        registry.SCHEMES.clear()
        registry.SCHEMES.update(saved)


async def test_missing_driver_names_the_extra(fake_scheme: str) -> None:
    storage = Storage(url=f"{fake_scheme}://localhost/db")
    with pytest.raises(MissingDriverError) as info:
        await cacheme.register_storage("fake", storage)
    message = str(info.value)
    assert "some_missing_driver_xyz" in message
    assert 'pip install "cacheme[fakedb]"' in message
    assert isinstance(info.value, ImportError)
    assert cacheme.storages() == {}


async def test_close_storages_closes_all() -> None:
    await cacheme.register_storage("a", Storage(url="local://lru", size=10))
    await cacheme.register_storage("b", Storage(url="local://tlfu", size=10))
    a, b = tier("a"), tier("b")
    a.set("k", 1, None)
    b.set("k", 2, None)
    await cacheme.close_storages()
    assert cacheme.storages() == {}
    assert a.get("k") is MISS
    assert b.get("k") is MISS
    assert isinstance(b, TinyLFUStorage) and len(b) == 0
    await cacheme.close_storages()  # twice is fine


async def test_storages_returns_a_copy() -> None:
    await cacheme.register_storage("a", Storage(url="local://lru", size=10))
    cacheme.storages().clear()
    assert list(cacheme.storages()) == ["a"]


async def test_node_after_close_storages_reports_missing_storage() -> None:
    await cacheme.register_storage("local", Storage(url="local://lru", size=10))
    await cacheme.get(Item(1))
    await cacheme.close_storages()
    with pytest.raises(cacheme.StorageNotRegisteredError, match="Item"):
        await cacheme.get(Item(1))


def test_redis_without_driver_in_a_subprocess() -> None:
    code = """
import asyncio, sys
for name in ("redis", "asyncpg", "aiosqlite", "asyncmy", "pymongo"):
    sys.modules[name] = None
import cacheme
assert "cacheme.storages.redis" not in sys.modules
try:
    asyncio.run(cacheme.register_storage("r", cacheme.Storage(url="redis://localhost:6379")))
except cacheme.MissingDriverError as exc:
    print("MISSING", exc)
else:
    print("REGISTERED")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MISSING"), out.stdout
    assert "cacheme[redis]" in out.stdout


# -- local tiers ------------------------------------------------------------------------


def ttl_node(ttl: timedelta | None) -> type[Node]:
    @dataclass
    class Timed(Node):
        n: int

        def key(self) -> str:
            return f"timed:{self.n}"

        async def load(self) -> int:
            LOADS.append(self.n)
            return self.n

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local", ttl=ttl)]

    return Timed


@pytest.mark.parametrize("policy", POLICIES)
async def test_sub_second_ttl_is_honoured(policy: str) -> None:
    await cacheme.register_storage("local", Storage(url=f"local://{policy}", size=100))
    node_cls = ttl_node(timedelta(milliseconds=50))
    node = node_cls(1)  # type: ignore[call-arg]
    assert await cacheme.get(node) == 1
    assert await cacheme.get(node) == 1
    assert LOADS == [1]
    await asyncio.sleep(0.08)
    assert stored("local", "cacheme:timed:1:v1") == (None, False)
    assert await cacheme.get(node) == 1
    assert LOADS == [1, 1]


@pytest.mark.parametrize("policy", POLICIES)
async def test_ttl_is_per_entry(policy: str) -> None:
    await cacheme.register_storage("local", Storage(url=f"local://{policy}", size=100))
    local = tier("local")
    local.set("short", "s", 0.03)
    local.set("long", "l", 10.0)
    local.set("forever", "f", None)
    await asyncio.sleep(0.05)
    assert local.get("short") is MISS
    assert local.get("long") == "l"
    assert local.get("forever") == "f"


@pytest.mark.parametrize("policy", POLICIES)
async def test_none_is_cacheable(policy: str) -> None:
    await cacheme.register_storage("local", Storage(url=f"local://{policy}", size=100))
    calls = 0

    class Nothing(Node):
        def key(self) -> str:
            return "nothing"

        async def load(self) -> None:
            nonlocal calls
            calls += 1

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    assert await cacheme.get(Nothing()) is None
    assert await cacheme.get(Nothing()) is None
    assert calls == 1
    assert cacheme.stats(Nothing).hit_count() == 1


@pytest.mark.parametrize("policy", POLICIES)
async def test_remove(policy: str) -> None:
    await cacheme.register_storage("local", Storage(url=f"local://{policy}", size=100))
    local = tier("local")
    local.set("k", 1, None)
    local.remove("k")
    local.remove("absent")
    assert local.get("k") is MISS


async def test_lru_evicts_the_least_recently_used() -> None:
    await cacheme.register_storage("local", Storage(url="local://lru", size=2))
    await cacheme.get(Item(1))
    await cacheme.get(Item(2))
    await cacheme.get(Item(1))  # hit: 1 is now the most recently used
    await cacheme.get(Item(3))  # evicts 2
    assert stored("local", "cacheme:item:2:v1") == (None, False)
    assert stored("local", "cacheme:item:1:v1") == ("item-1", True)
    assert stored("local", "cacheme:item:3:v1") == ("item-3", True)
    await cacheme.get(Item(1))
    await cacheme.get(Item(2))
    assert LOADS == [1, 2, 3, 2]


async def test_lru_overwrite_does_not_grow() -> None:
    await cacheme.register_storage("local", Storage(url="local://lru", size=2))
    local = tier("local")
    local.set("a", 1, None)
    local.set("b", 2, None)
    local.set("a", 3, None)  # a becomes the most recent
    local.set("c", 4, None)  # evicts b
    assert local.get("a") == 3
    assert local.get("b") is MISS
    assert local.get("c") == 4


async def test_tlfu_stays_within_its_size() -> None:
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=50))
    local = tier("local")
    assert isinstance(local, TinyLFUStorage)
    for i in range(2000):
        local.set(f"k{i}", i, None)
    assert len(local) <= 50


# -- values a remote storage reads that are not bytes -----------------------------------------


def test_binary_takes_bytes_and_marks_anything_else_unreadable() -> None:
    import copy

    from cacheme.errors import DecodeError
    from cacheme.serializer import JSONSerializer, MsgPackSerializer, PickleSerializer
    from cacheme.storages.base import Unreadable, binary

    raw = b"\x00\xffdata"
    assert binary("s", raw) is raw
    assert binary("s", bytearray(raw)) == raw and type(binary("s", bytearray(raw))) is bytes
    assert binary("s", memoryview(raw)) == raw
    for value in ("text", 10**15, 2.5, None, {"a": 1}):
        marker = binary("s", value)
        assert isinstance(marker, Unreadable) and marker == b""
        assert f"holds a {type(value).__name__}" in marker.reason and "'s'" in marker.reason
        assert isinstance(marker.error(), DecodeError)
        # Read as bytes all the same, it decodes to nothing (every serializer refuses it).
        for serializer in (PickleSerializer(), JSONSerializer(), MsgPackSerializer()):
            with pytest.raises(DecodeError):
                serializer.loads(marker)
        assert copy.copy(marker) == b""


# -- URL query parameters, refused at build (registration), before any connection ----------


@pytest.mark.parametrize(
    ("url", "options", "says"),
    [
        # redis-py handed any name on to the connection: a TypeError when connecting
        ("redis://127.0.0.1:6379/11?foo=bar", {}, "unknown URL query parameter(s) 'foo'"),
        ("redis://127.0.0.1:1/0?foo=bar", {"cluster": True}, "'foo' for a Redis Cluster"),
        ("redis://h:1/0?ssl_ca_path=x", {"cluster": True}, "'ssl_ca_path' for a Redis Cluster"),
        ("redis://h:1/0?ssl_certfile=x", {}, "'ssl_certfile' for redis://"),
        ("redis://h:1/0?retry=3", {}, "'retry'"),
        # these were registered as a server that is down (a TypeError on connect)
        ("redis://h:1/0?max_connections=3", {}, "storage option 'pool_size'"),
        ("redis://h:1/0?max_connections=3", {"cluster": True}, "storage option 'pool_size'"),
        ("redis://h:1/0?timeout=3", {}, "storage option 'timeout'"),
        ("redis://h:1/0?socket_timeout=3", {}, "storage option 'timeout'"),
        # these named the URL but not the storage
        ("mysql://u:secret@h:3306/db?foo=bar", {}, "unknown URL query parameter 'foo'"),
        ("sqlite:///cache.db?foo=bar", {}, "no URL query parameter or fragment"),
        ("mongodb://h:27017/db?foo=bar", {}, "'foo'"),
    ],
)
@pytest.mark.needs_dev  # the drivers
def test_unknown_url_query_parameter_names_the_storage(
    url: str, options: dict[str, Any], says: str
) -> None:
    with pytest.raises(cacheme.StorageMisconfiguredError) as info:
        cacheme.Storage(url, **options).build("shop")
    assert isinstance(info.value, cacheme.ConfigurationError)
    message = str(info.value)
    assert message.startswith("storage 'shop' (") and says in message
    assert "secret" not in message
    if url.startswith("redis") and "storage option" not in says:
        assert "accepted: client_name, db," in message


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis://h:1/0?client_name=app&protocol=2&health_check_interval=5", {}),
        ("redis://h:1/0?decode_responses=True&socket_keepalive=true", {}),
        ("rediss://h:1/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem", {}),
        ("redis://h:1/0?ssl_ca_certs=/ca.pem&client_name=app", {"cluster": True}),
    ],
)
@pytest.mark.needs_dev  # redis-py
def test_url_query_parameters_redis_takes_still_build(url: str, options: dict[str, Any]) -> None:
    cacheme.Storage(url, **options).build("shop")
