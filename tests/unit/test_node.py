"""Keys, Meta validation at class creation, storage resolution, per-class config, build_node."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import cacheme
from cacheme import Cache, ConfigurationError, Node, StorageNotRegisteredError
from cacheme.serializer import JSONSerializer, MsgPackSerializer
from cacheme.storages.base import LocalStorage

from .helpers import stored


@dataclass
class UserNode(Node):
    user_id: int

    def key(self) -> str:
        return f"user:{self.user_id}:info"

    async def load(self) -> dict[str, int]:
        return {"id": self.user_id}

    class Meta(Node.Meta):
        version = "v1"
        caches = [Cache(storage="local", ttl=None)]


# -- keys ------------------------------------------------------------------------------


async def test_key_is_prefix_key_version(local: LocalStorage[Any]) -> None:
    assert await cacheme.get(UserNode(1)) == {"id": 1}
    assert stored("local", "cacheme:user:1:info:v1") == ({"id": 1}, True)


async def test_set_prefix_changes_the_stored_key(local: LocalStorage[Any]) -> None:
    cacheme.set_prefix("mycache")
    await cacheme.get(UserNode(2))
    assert stored("local", "mycache:user:2:info:v1") == ({"id": 2}, True)
    assert stored("local", "cacheme:user:2:info:v1") == (None, False)


async def test_changing_the_prefix_orphans_old_keys(local: LocalStorage[Any]) -> None:
    calls = 0

    @dataclass
    class Counted(Node):
        n: int

        def key(self) -> str:
            return f"counted:{self.n}"

        async def load(self) -> int:
            nonlocal calls
            calls += 1
            return self.n

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local")]

    await cacheme.get(Counted(1))
    await cacheme.get(Counted(1))
    assert calls == 1
    cacheme.set_prefix("other")
    await cacheme.get(Counted(1))
    assert calls == 2


@pytest.mark.parametrize("bad", ["", None, 3])
def test_set_prefix_rejects_non_strings(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="set_prefix"):
        cacheme.set_prefix(bad)


async def test_key_must_be_a_string(local: LocalStorage[Any]) -> None:
    class IntKey(Node):
        def key(self) -> str:
            return 1  # type: ignore[return-value]

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    with pytest.raises(ConfigurationError, match=r"IntKey\.key\(\) must return str"):
        await cacheme.get(IntKey())


# -- Meta validated at class creation --------------------------------------------------


def test_caches_must_be_a_list() -> None:
    with pytest.raises(ConfigurationError, match=r"BadCaches\.Meta\.caches must be list"):

        class BadCaches(Node):
            class Meta(Node.Meta):
                caches = Cache(storage="local")  # type: ignore[assignment]


@pytest.mark.parametrize(
    "chain",
    [
        [Cache(storage="local"), Cache(storage="local")],
        [Cache(storage="local"), Cache(storage="redis"), Cache(storage="local", ttl=None)],
        (Cache(storage="redis"), Cache(storage="redis", fail_open=False)),
    ],
    ids=["twice in a row", "apart, other options", "tuple, remote"],
)
def test_a_storage_may_be_one_tier_only(chain: list[Cache]) -> None:
    """Found by a review: a chain naming one storage twice was accepted."""
    with pytest.raises(ConfigurationError, match=r"Twice\.Meta\.caches\[\d\] names storage"):

        class Twice(Node):
            class Meta(Node.Meta):
                caches = chain


def test_caches_must_hold_cache_objects() -> None:
    with pytest.raises(ConfigurationError, match=r"BadItem\.Meta\.caches\[1\].*'local'"):

        class BadItem(Node):
            class Meta(Node.Meta):
                caches = [Cache(storage="local"), "local"]  # type: ignore[list-item]


@pytest.mark.parametrize("serializer", ["json", JSONSerializer, 1])
def test_serializer_must_be_a_serializer_instance(serializer: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"BadSer\.Meta\.serializer must be a Serializer"):

        class BadSer(Node):
            class Meta(Node.Meta):
                caches = [Cache(storage="local")]

            Meta.serializer = serializer


def test_unknown_meta_option_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"Typo\.Meta has unknown option\(s\) verison"):

        class Typo(Node):
            class Meta(Node.Meta):
                verison = "v1"


def test_wrong_option_type_names_node_and_option() -> None:
    with pytest.raises(ConfigurationError, match=r"BadVersion\.Meta\.version must be str"):

        class BadVersion(Node):
            class Meta(Node.Meta):
                version = 1  # type: ignore[assignment]


@pytest.mark.parametrize(("attr", "wanted"), [("version", "str"), ("caches", "list or tuple")])
def test_none_for_an_option_with_a_default_is_refused(attr: str, wanted: str) -> None:
    """``version = None`` became the text "None" in every key, and ``caches = None`` a bare
    ``TypeError``: None stands for "not set" only where the default is None."""
    meta = type("Meta", (Node.Meta,), {attr: None})
    with pytest.raises(ConfigurationError, match=rf"Unset\.Meta\.{attr} must be {wanted}"):
        type("Unset", (Node,), {"Meta": meta})
    with pytest.raises(ConfigurationError, match=r"B\.Meta\.version must be str"):
        cacheme.build_node("B", None, [])  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
def test_non_positive_ttl_names_node_and_field(ttl: timedelta) -> None:
    with pytest.raises(
        ConfigurationError, match=r"BadTTL\.Meta\.caches\[0\]\.ttl must be positive"
    ):

        class BadTTL(Node):
            class Meta(Node.Meta):
                caches = [Cache(storage="local", ttl=ttl)]


def test_ttl_must_be_a_timedelta() -> None:
    with pytest.raises(
        ConfigurationError, match=r"NumTTL\.Meta\.caches\[0\]\.ttl must be a timedelta"
    ):

        class NumTTL(Node):
            class Meta(Node.Meta):
                caches = [Cache(storage="local", ttl=30)]  # type: ignore[arg-type]


def test_storage_name_must_be_a_string() -> None:
    with pytest.raises(ConfigurationError, match=r"NoName\.Meta\.caches\[0\]\.storage"):

        class NoName(Node):
            class Meta(Node.Meta):
                caches = [Cache(storage="")]


def test_meta_must_be_a_class() -> None:
    with pytest.raises(ConfigurationError, match=r"NotClass\.Meta must be a class"):

        class NotClass(Node):
            Meta = {"version": "v1"}  # type: ignore[assignment]


# -- storage names are resolved at first use --------------------------------------------


async def test_node_defined_before_register_storage_works_afterwards() -> None:
    class Early(Node):
        def key(self) -> str:
            return "early"

        async def load(self) -> str:
            return "loaded"

        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="late-tier")]

    await cacheme.register_storage("late-tier", cacheme.Storage(url="local://lru", size=10))
    assert await cacheme.get(Early()) == "loaded"
    assert stored("late-tier", "cacheme:early:v1") == ("loaded", True)


async def test_unregistered_storage_names_node_and_lists_registered(
    local: LocalStorage[Any],
) -> None:
    class Orphan(Node):
        def key(self) -> str:
            return "orphan"

        async def load(self) -> str:
            return "x"

        class Meta(Node.Meta):
            caches = [Cache(storage="nowhere")]

    with pytest.raises(StorageNotRegisteredError) as info:
        await cacheme.get(Orphan())
    message = str(info.value)
    assert "Orphan" in message
    assert "'nowhere'" in message
    assert "registered: 'local'" in message


async def test_unregistered_storage_with_nothing_registered() -> None:
    class Lonely(Node):
        def key(self) -> str:
            return "lonely"

        class Meta(Node.Meta):
            caches = [Cache(storage="nowhere")]

    with pytest.raises(StorageNotRegisteredError, match=r"registered: none"):
        await cacheme.get(Lonely())


# A remote tier without a serializer: tests/integration/test_chains.py, against real servers.


# -- each class has its own config and stats ---------------------------------------------


async def test_each_node_class_has_its_own_config_and_stats(local: LocalStorage[Any]) -> None:
    class A(Node):
        def key(self) -> str:
            return "same"

        async def load(self) -> str:
            return "a"

        class Meta(Node.Meta):
            version = "va"
            caches = [Cache(storage="local")]

    class B(Node):
        def key(self) -> str:
            return "same"

        async def load(self) -> str:
            return "b"

        class Meta(Node.Meta):
            version = "vb"
            caches = [Cache(storage="local")]

    assert await cacheme.get(A()) == "a"
    assert await cacheme.get(B()) == "b"
    await cacheme.get(B())
    assert cacheme.stats(A).request_count() == 1
    assert cacheme.stats(B).request_count() == 2
    assert stored("local", "cacheme:same:va") == ("a", True)
    assert stored("local", "cacheme:same:vb") == ("b", True)


async def test_subclass_without_meta_keeps_settings_with_own_stats(
    local: LocalStorage[Any],
) -> None:
    @dataclass
    class Child(UserNode):
        pass

    @dataclass
    class GrandChild(Child):
        def key(self) -> str:
            return f"grand:{self.user_id}"

    before = cacheme.stats(UserNode)
    assert await cacheme.get(Child(7)) == {"id": 7}
    assert await cacheme.get(GrandChild(8)) == {"id": 8}
    assert stored("local", "cacheme:user:7:info:v1") == ({"id": 7}, True)
    assert stored("local", "cacheme:grand:8:v1") == ({"id": 8}, True)
    assert cacheme.stats(Child).request_count() == 1
    assert cacheme.stats(GrandChild).request_count() == 1
    assert cacheme.stats(UserNode) == before


def test_subclass_with_own_meta_overrides_only_what_it_sets() -> None:
    class Parent(Node):
        class Meta(Node.Meta):
            version = "v1"
            caches = [Cache(storage="local")]
            serializer = MsgPackSerializer()

    class Child(Parent):
        class Meta(Parent.Meta):
            version = "v2"

    cfg = Child._cacheme_config
    assert cfg.version == "v2"
    assert cfg.caches == (Cache(storage="local"),)
    assert cfg.serializer == MsgPackSerializer()
    assert Parent._cacheme_config.version == "v1"


def test_unknown_option_in_an_inherited_meta_is_caught() -> None:
    class Base(Node):
        class Meta(Node.Meta):
            version = "v1"

    with pytest.raises(ConfigurationError, match=r"Sub\.Meta has unknown option\(s\) ttl"):

        class Sub(Base):
            class Meta(Base.Meta):
                ttl = 3


# -- build_node ------------------------------------------------------------------------


def test_build_node_same_args_same_class() -> None:
    caches = [Cache(storage="local", ttl=timedelta(seconds=5))]
    first = cacheme.build_node("BuiltSame", "v1", caches)
    second = cacheme.build_node(
        "BuiltSame", "v1", [Cache(storage="local", ttl=timedelta(seconds=5))]
    )
    assert first is second
    assert issubclass(first, cacheme.DynamicNode)
    assert first.__name__ == "BuiltSame"


@pytest.mark.parametrize(
    "changes",
    [
        {"version": "v2"},
        {"caches": [Cache(storage="other")]},
        {"serializer": JSONSerializer()},
        {"doorkeeper": cacheme.BloomFilter(100, 0.01)},
    ],
)
def test_build_node_same_name_other_args_raises(changes: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "version": "v1",
        "caches": [Cache(storage="local")],
        "serializer": None,
        "doorkeeper": None,
    }
    name = f"BuiltConflict{abs(hash(repr(changes)))}"
    cacheme.build_node(name, **args)
    with pytest.raises(ConfigurationError, match=name):
        cacheme.build_node(name, **{**args, **changes})


def test_build_node_has_its_own_meta() -> None:
    node_meta = dict(vars(Node.Meta))
    built = cacheme.build_node(
        "BuiltOwnMeta", "v9", [Cache(storage="local")], serializer=JSONSerializer()
    )
    assert built.Meta is not Node.Meta
    assert built.Meta.version == "v9"
    assert dict(vars(Node.Meta)) == node_meta
    assert Node.Meta.version == ""
    assert list(Node.Meta.caches) == []
    assert Node.Meta.serializer is None
    other = cacheme.build_node("BuiltOwnMeta2", "v3", [Cache(storage="x")])
    assert built._cacheme_config.version == "v9"
    assert other._cacheme_config.version == "v3"
    assert built._cacheme_config.stats is not other._cacheme_config.stats


def test_build_node_validates_like_meta() -> None:
    with pytest.raises(ConfigurationError, match=r"BuiltBad\.Meta\.caches must be list"):
        cacheme.build_node("BuiltBad", "v1", "local")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="identifier"):
        cacheme.build_node("not a name", "v1", [])


async def test_build_node_class_is_usable(local: LocalStorage[Any]) -> None:
    built = cacheme.build_node("BuiltUsable", "v1", [Cache(storage="local")])

    async def load(_node: object) -> int:
        return 42

    assert await cacheme.get(built(key="answer"), load_fn=load) == 42
    assert stored("local", "cacheme:answer:v1") == (42, True)
    assert cacheme.stats(built).load_count() == 1


# -- nodes() ---------------------------------------------------------------------------


def test_nodes_lists_classes_in_definition_order() -> None:
    class First(Node):
        pass

    class Second(Node):
        pass

    built = cacheme.build_node("BuiltListed", "v1", [])

    class Third(Second):
        pass

    listed = cacheme.nodes()
    assert isinstance(listed, list)
    assert listed.index(First) < listed.index(Second) < listed.index(built) < listed.index(Third)
    assert UserNode in listed
    assert all(isinstance(n, type) and issubclass(n, Node) for n in listed)
    assert type(First) is type  # a plain class, not a metaclass
    assert Node not in listed
    assert cacheme.DynamicNode not in listed


def test_nodes_returns_a_copy() -> None:
    listed = cacheme.nodes()
    listed.clear()
    assert UserNode in cacheme.nodes()


def test_full_key_is_the_key_every_tier_stores() -> None:
    """``node.full_key()`` of cacheme 0.3.0: ``{prefix}:{key()}:{version}``."""

    class Versioned(Node):
        def __init__(self, i: Any) -> None:
            self.i = i

        def key(self) -> Any:
            return self.i

        class Meta(Node.Meta):
            version = "v2"

    assert Versioned("u:3").full_key() == "cacheme:u:3:v2"
    cacheme.set_prefix("app")
    try:
        assert Versioned("u:3").full_key() == "app:u:3:v2"
    finally:
        cacheme.set_prefix("cacheme")
    with pytest.raises(ConfigurationError, match=r"Versioned\.key\(\) must return str, got int"):
        Versioned(3).full_key()


def test_a_prefix_or_version_no_tier_could_store_is_refused() -> None:
    """A lone surrogate (what ``os.fsdecode`` gives for undecodable bytes) in the prefix or
    ``Meta.version`` would make every key unstorable in every remote tier: refused at once
    (review 41 found every get loading again, with no word said)."""
    with pytest.raises(ConfigurationError, match="set_prefix takes a string that encodes"):
        cacheme.set_prefix("app\udc80")
    with pytest.raises(ConfigurationError, match=r"Surrogate\.Meta\.version must encode"):

        class Surrogate(Node):
            class Meta(Node.Meta):
                version = "v\ud800"
