"""@Memoize(NodeCls) with .to_node, for functions and methods."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

import cacheme
from cacheme import Cache, ConfigurationError, DynamicNode, Memoize, Node, Storage

from .helpers import stored


@pytest.fixture(autouse=True)
async def _local() -> AsyncIterator[None]:
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=1000))
    yield


@dataclass
class UserInfoNode(Node):
    user_id: int

    def key(self) -> str:
        return f"user:{self.user_id}:info"

    class Meta(Node.Meta):
        version = "v7"
        caches = [Cache(storage="local", ttl=None)]


async def test_memoized_function_loads_once_per_node() -> None:
    calls: list[int] = []

    @Memoize(UserInfoNode)
    async def get_user_info(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    @get_user_info.to_node
    def _(user_id: int) -> UserInfoNode:
        return UserInfoNode(user_id=user_id)

    assert await get_user_info(1) == {"id": 1}
    assert await get_user_info(1) == {"id": 1}
    assert await get_user_info(user_id=2) == {"id": 2}
    assert calls == [1, 2]
    # The node class's Meta gives the key and the tier; its stats count the calls.
    assert stored("local", "cacheme:user:1:info:v7") == ({"id": 1}, True)
    stats = cacheme.stats(UserInfoNode)
    assert stats.request_count() >= 3
    assert get_user_info.__name__ == "get_user_info"


async def test_memoized_function_is_singleflight() -> None:
    calls = 0

    class Slow(Node):
        def __init__(self, n: int) -> None:
            self.n = n

        def key(self) -> str:
            return f"slow:{self.n}"

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    @Memoize(Slow)
    async def slow(n: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return n

    @slow.to_node
    def _(n: int) -> Slow:
        return Slow(n)

    assert await asyncio.gather(*(slow(3) for _ in range(50))) == [3] * 50
    assert calls == 1
    stats = cacheme.stats(Slow)
    assert (stats.request_count(), stats.hit_count(), stats.load_count()) == (50, 0, 1)


async def test_memoized_method() -> None:
    class UserService:
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix
            self.calls = 0

        @Memoize(UserInfoNode)
        async def get_name(self, user_id: int) -> str:
            self.calls += 1
            return f"{self.prefix}-{user_id}"

        @get_name.to_node
        def _(self, user_id: int) -> UserInfoNode:
            return UserInfoNode(user_id=user_id + 1000)

    service = UserService("svc")
    assert await service.get_name(1) == "svc-1"
    assert await service.get_name(1) == "svc-1"
    assert await service.get_name(user_id=2) == "svc-2"
    assert service.calls == 2
    assert stored("local", "cacheme:user:1001:info:v7") == ("svc-1", True)
    # The cache is per node, not per instance.
    other = UserService("other")
    assert await other.get_name(1) == "svc-1"
    assert other.calls == 0
    # Looked up on the class, it is the memoized function itself.
    assert await UserService.get_name(other, 3) == "other-3"
    # Through an instance, its operations take the method's other arguments (they raised
    # AttributeError on a functools.partial before).
    assert service.get_name.node(1) == UserInfoNode(user_id=1001)
    assert await service.get_name.refresh(1) == "svc-1" and service.calls == 3
    await service.get_name.invalidate(1)
    assert stored("local", "cacheme:user:1001:info:v7") == (None, False)
    assert await other.get_name(1) == "other-1" and other.calls == 2
    assert inspect.iscoroutinefunction(service.get_name)


async def test_build_node_with_dynamic_node_spec_sample() -> None:
    @Memoize(cacheme.build_node("TestNodeDynamic", "v1", [Cache(storage="local", ttl=None)]))
    async def fn(a: int) -> int:
        return 1

    @fn.to_node
    def _(a: int) -> DynamicNode:
        return DynamicNode(key=f"bar:{a}")

    assert await fn(1) == 1
    assert stored("local", "cacheme:bar:1:v1") == (1, True)
    built = cacheme.build_node("TestNodeDynamic", "v1", [Cache(storage="local", ttl=None)])
    assert cacheme.stats(built).request_count() == 1


async def test_to_node_may_return_the_built_class() -> None:
    built = cacheme.build_node("MemoBuilt", "v2", [Cache(storage="local")])

    @Memoize(built)
    async def fn(a: int) -> str:
        return f"a{a}"

    @fn.to_node
    def _(a: int) -> DynamicNode:
        return built(key=f"built:{a}")

    assert await fn(4) == "a4"
    assert stored("local", "cacheme:built:4:v2") == ("a4", True)


async def test_to_node_returning_another_node_class_raises() -> None:
    class Elsewhere(Node):
        def key(self) -> str:
            return "elsewhere"

    @Memoize(UserInfoNode)
    async def fn(a: int) -> int:
        return a

    @fn.to_node
    def _(a: int) -> Node:
        return Elsewhere()

    with pytest.raises(
        ConfigurationError, match=r"to_node of .*fn \(.*_\) must return a UserInfoNode.*Elsewhere"
    ):
        await fn(1)


async def test_to_node_not_taking_the_arguments_names_both_functions() -> None:
    @Memoize(UserInfoNode)
    async def mismatched(a: int, b: int) -> int:
        return a + b

    @mismatched.to_node
    def _(a: int) -> UserInfoNode:
        return UserInfoNode(a)

    with pytest.raises(ConfigurationError, match=r"to_node of .*mismatched \(.*_\) does not take"):
        await mismatched(1, 2)

    @Memoize(UserInfoNode)
    async def broken(a: int) -> int:
        return a

    @broken.to_node
    def _(a: int) -> UserInfoNode:
        raise TypeError("a bug inside to_node")

    with pytest.raises(TypeError, match="a bug inside to_node"):  # its own error, as it is
        await broken(1)


async def test_memoized_classmethod_and_staticmethod() -> None:
    calls: list[Any] = []

    class Repo:
        @Memoize(UserInfoNode)
        @classmethod
        async def by_class(cls, x: int) -> str:
            calls.append((cls.__name__, x))
            return f"{cls.__name__}:{x}"

        @by_class.to_node
        def _(cls, x: int) -> DynamicNode:
            return DynamicNode(key=f"by_class:{cls.__name__}:{x}")

        @Memoize(UserInfoNode)
        @staticmethod
        async def plain(x: int) -> int:
            calls.append(x)
            return x * 2

        @plain.to_node
        def _plain(x: int) -> DynamicNode:
            return DynamicNode(key=f"plain:{x}")

    class Sub(Repo):
        pass

    # Through the class and an instance alike; a subclass is its own key.
    assert [await Repo.by_class(1), await Repo().by_class(1), await Sub.by_class(1)] == [
        "Repo:1",
        "Repo:1",
        "Sub:1",
    ]
    assert [await Repo.plain(3), await Repo().plain(3)] == [6, 6]
    assert calls == [("Repo", 1), ("Sub", 1), 3]
    assert Repo.by_class.node(2).key() == "by_class:Repo:2"
    assert Repo.plain.node(4).key() == "plain:4"
    await Repo.by_class.invalidate(1)
    assert await Repo.by_class(1) == "Repo:1"
    assert calls[-1] == ("Repo", 1)


async def test_calling_before_to_node_raises() -> None:
    @Memoize(UserInfoNode)
    async def lonely(a: int) -> int:
        return a

    with pytest.raises(ConfigurationError, match=r"lonely.*no \.to_node.*@lonely\.to_node"):
        await lonely(1)


def test_memoize_takes_a_node_class() -> None:
    with pytest.raises(ConfigurationError, match="Memoize takes a node class"):
        Memoize(UserInfoNode(1))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Memoize takes a node class"):
        Memoize(int)  # type: ignore[arg-type]


async def test_memoized_error_reaches_caller_and_is_not_cached() -> None:
    calls = 0

    @Memoize(UserInfoNode)
    async def flaky(user_id: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first")
        return calls

    @flaky.to_node
    def _(user_id: int) -> UserInfoNode:
        return UserInfoNode(user_id=5000 + user_id)

    with pytest.raises(RuntimeError, match="first"):
        await flaky(1)
    assert await flaky(1) == 2
    assert await flaky(1) == 2


async def test_memoize_value_type_comes_from_the_function() -> None:
    class Untyped(Node):
        def key(self) -> str:
            return "untyped"

        class Meta(Node.Meta):
            caches = [Cache(storage="local")]

    @Memoize(Untyped)
    async def typed(a: int) -> list[int]:
        return [a]

    @typed.to_node
    def _(a: int) -> Untyped:
        return Untyped()

    assert await typed(1) == [1]
    # The memoized function keeps its own value type; the node class's config is untouched.
    assert typed._config.value_type == list[int]
    assert Untyped._cacheme_config.value_type is Any


async def test_a_batch_of_function_nodes_loads_through_the_function() -> None:
    """``get_all`` of ``fn.node(...)`` with a node class that has a ``load_all``: each node
    loads through the function (the class's ``load_all`` ran, and its value was then cached
    for the function too)."""
    await cacheme.register_storage("batch", cacheme.Storage(url="local://lru", size=100))
    Keyed = cacheme.build_node("MemoBatchKeyed", "v1", [cacheme.Cache(storage="batch", ttl=None)])

    async def load_all(cls: Any, nodes: list[Any]) -> list[tuple[Any, Any]]:
        return [(n, f"load_all:{n.key()}") for n in nodes]

    Keyed.load_all = classmethod(load_all)  # type: ignore[method-assign,assignment]

    @cacheme.Memoize(Keyed)
    async def f(n: int) -> str:
        return f"f({n})"

    @f.to_node
    def _(n: int) -> cacheme.DynamicNode:
        return cacheme.DynamicNode(key=f"memo-batch:{n}")

    assert await cacheme.get_all([f.node(2), f.node(3)]) == ["f(2)", "f(3)"]
    assert await f(2) == "f(2)"


@dataclass
class Point:
    x: int


@pytest.mark.needs_dev  # the remote tier is SQLite, an optional driver
async def test_get_of_fn_node_decodes_to_the_function_type(tmp_path: Any) -> None:
    """``cacheme.get(fn.node(...))`` where ``to_node`` returns an instance of a class with no
    ``load()``: the value decodes to the function's type, and the local tier it is copied
    into (which the function itself reads) keeps that type. Before, the get decoded the
    remote entry as plain data and left a dict in the local tier: the function then
    returned ``{'x': 1}`` instead of ``Point(x=1)``."""
    from cacheme import schemas
    from cacheme.serializer import JSONSerializer

    url = f"sqlite:///{tmp_path}/memo.db"
    await schemas.create(url)
    await cacheme.register_storage("memo-sqlite", Storage(url=url))

    @dataclass
    class PointNode(Node):
        a: int

        def key(self) -> str:
            return f"point:{self.a}"

        class Meta(Node.Meta):
            caches = [Cache(storage="local", ttl=None), Cache(storage="memo-sqlite", ttl=None)]
            serializer = JSONSerializer()

    loads: list[int] = []

    @Memoize(PointNode)
    async def point(a: int) -> Point:
        loads.append(a)
        return Point(a)

    @point.to_node
    def _(a: int) -> PointNode:
        return PointNode(a)

    assert await point(1) == Point(1)
    await cacheme.register_storage("local", Storage(url="local://tlfu", size=1000))  # cold
    node = point.node(1)
    assert await cacheme.get(node) == Point(1)
    assert await point(1) == Point(1)
    assert loads == [1]
    # Still a node of the class, equal to the class's own instance and hashed alike.
    assert isinstance(node, PointNode)
    assert node == PointNode(1) and PointNode(1) == node and node != PointNode(2)
    assert repr(node) == "test_get_of_fn_node_decodes_to_the_function_type.<locals>.PointNode(a=1)"
    # On a miss, get of it loads through the function.
    assert await cacheme.get(point.node(2)) == Point(2)
    assert loads == [1, 2]
    await cacheme.invalidate(point.node(1))
    assert await point(1) == Point(1)
    assert loads == [1, 2, 1]


@dataclass(frozen=True)
class FrozenNode(Node):
    uid: int

    def key(self) -> str:
        return f"frozen:{self.uid}"

    class Meta(Node.Meta):
        caches = [Cache(storage="local", ttl=None)]


async def test_fn_node_leaves_the_node_of_to_node_alone() -> None:
    """Review 43 broke the first version of ``fn.node(...)`` (it switched the class of the
    object ``to_node`` returned): a frozen dataclass raised ``FrozenInstanceError`` on every
    call, a node the app kept changed class for good, and the node did not pickle. It is a
    copy now; one made by ``dataclasses.replace`` says what is wrong when it must load."""
    import dataclasses
    import pickle

    kept: dict[int, FrozenNode] = {}

    @Memoize(FrozenNode)
    async def name(uid: int) -> str:
        return f"name {uid}"

    @name.to_node
    def _(uid: int) -> FrozenNode:
        return kept.setdefault(uid, FrozenNode(uid))

    assert await name(1) == "name 1"
    node = name.node(1)
    assert type(kept[1]) is FrozenNode and node is not kept[1]
    assert node == FrozenNode(1) and hash(node) == hash(FrozenNode(1))
    back = pickle.loads(pickle.dumps(node))
    assert type(back) is FrozenNode and back == FrozenNode(1)
    assert await cacheme.get(node) == "name 1"
    with pytest.raises(cacheme.LoadError, match=r"not made by its \.node\(\.\.\.\)"):
        await cacheme.get(dataclasses.replace(node, uid=5))


@dataclass(slots=True)
class Slotted(Node):
    uid: int

    def key(self) -> str:
        return f"slotted:{self.uid}"

    class Meta(Node.Meta):
        caches = [Cache(storage="local", ttl=None)]


async def test_fn_node_of_a_slots_dataclass() -> None:
    """Review 44: with ``@dataclass(slots=True)`` the node of ``fn.node(...)`` lost its
    fields when compared, copied or pickled (only ``__dict__`` was carried)."""
    import copy
    import pickle

    @Memoize(Slotted)
    async def user(uid: int) -> str:
        return f"user{uid}"

    @user.to_node
    def _(uid: int) -> Slotted:
        return Slotted(uid)

    node = user.node(1)
    assert node == Slotted(1) and Slotted(1) == node and node != Slotted(2)
    back = pickle.loads(pickle.dumps(node))
    assert type(back) is Slotted and back.key() == "slotted:1"
    assert copy.copy(node).key() == copy.deepcopy(node).key() == "slotted:1"
    assert await cacheme.get(node) == "user1"


@dataclass(frozen=True, slots=True)
class FrozenSlotted(Node):
    uid: int

    def key(self) -> str:
        return f"frozen-slotted:{self.uid}"

    class Meta(Node.Meta):
        caches = [Cache(storage="local", ttl=None)]


async def test_fn_node_of_a_frozen_slots_dataclass() -> None:
    """Review 45: a frozen slots dataclass pickles its fields as a list (its own
    ``__getstate__``), which the copy did not take: equality, copies and pickling raised."""
    import copy
    import pickle

    @Memoize(FrozenSlotted)
    async def user(uid: int) -> str:
        return f"user{uid}"

    @user.to_node
    def _(uid: int) -> FrozenSlotted:
        return FrozenSlotted(uid)

    node = user.node(1)
    assert node == FrozenSlotted(1) and FrozenSlotted(1) == node
    assert hash(node) == hash(FrozenSlotted(1)) and node in {FrozenSlotted(1)}
    assert pickle.loads(pickle.dumps(node)) == FrozenSlotted(1)
    assert copy.copy(node) == FrozenSlotted(1)
    assert await cacheme.get(node) == "user1"
