"""``@Memoize(NodeCls)``: cache an async function (or method) through a node class.

The decorated function is the loader; ``.to_node`` maps the same arguments to a node, whose
key is used. The node class given to ``Memoize`` supplies the tiers, TTLs and stats; values
decode to the memoized function's return annotation (each memoized function keeps its own,
so two functions memoized with one node class never decode each other's values). ``to_node``
may return an instance of that class or a plain ``DynamicNode(key=...)``; ``.node(...)``,
``.invalidate(...)`` and ``.refresh(...)`` take the function's arguments.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from .api import fetch, invalidate, reload
from .errors import ConfigurationError, LoadError
from .node import Config, DynamicNode, Node

P = ParamSpec("P")
R = TypeVar("R")
Q = ParamSpec("Q")
S = TypeVar("S")


class Memoize:
    """``@Memoize(NodeCls)`` turns an async function into a cached one; see ``to_node``."""

    def __init__(self, node_cls: type[Node]) -> None:
        if not (isinstance(node_cls, type) and issubclass(node_cls, Node)):
            raise ConfigurationError(f"Memoize takes a node class, got {node_cls!r}")
        self.node_cls = node_cls

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Memoized[P, R]:
        """Memoize ``fn``: an async function or method, or a ``classmethod`` or
        ``staticmethod`` of one (``@Memoize`` above ``@classmethod``: its ``to_node`` then
        takes the class first, as the method does). ``ConfigurationError`` otherwise."""
        kind: type[Any] | None = None
        if isinstance(fn, (classmethod, staticmethod)):
            kind, fn = type(fn), fn.__func__
        if not _is_async(fn):
            raise ConfigurationError(
                f"Memoize({self.node_cls.__qualname__}) decorates async functions; "
                f"{getattr(fn, '__qualname__', fn)!r} is not one (define it with async def)"
            )
        return Memoized(fn, self.node_cls, kind)


class Memoized(Generic[P, R]):
    """A memoized async function; call ``to_node`` once before calling it."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        node_cls: type[Node],
        kind: type[Any] | None = None,
    ) -> None:
        self._fn = fn
        self._node_cls = node_cls
        self._kind = kind  # classmethod, staticmethod, or None: a function or method
        self._to_node: Callable[P, Node] | None = None
        # Our own view of the node class's configuration: its value type is this function's.
        self._config: Config = node_cls._cacheme_config.for_function(fn)
        self._keyed: type[DynamicNode] | None = None  # see _keyed_node
        self._bound: dict[type[Node], type[Node]] = {}  # see _bound_node
        functools.update_wrapper(self, fn)
        mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
        if mark is not None:
            mark(self)  # inspect.iscoroutinefunction(self) is true, as for the function

    def to_node(self, fn: Callable[P, Node]) -> Callable[P, Node]:
        """Register the function that maps this function's arguments to its node."""
        self._to_node = fn
        return fn

    def node(self, *args: P.args, **kwargs: P.kwargs) -> Node:
        """The node these arguments map to, for ``cacheme.get``, ``cacheme.invalidate`` and
        the other functions that take nodes.

        What ``to_node`` returns, when it is an instance of the class given to ``Memoize``.
        A plain ``DynamicNode(key=...)`` from ``to_node`` becomes a node of this function:
        an instance of that class when it takes ``key=`` (``build_node``'s do), else of a
        ``DynamicNode`` subclass named after the function. Such a node decodes to this
        function's return annotation, and its ``load()`` calls the function with these
        arguments. Raises ``ConfigurationError`` when ``to_node`` is missing or returns
        another class.
        """
        to_node = self._to_node
        if to_node is None:
            raise ConfigurationError(
                f"{self._fn.__qualname__} is memoized with {self._node_cls.__qualname__} but "
                "has no .to_node yet; decorate a function with @"
                f"{self._fn.__name__}.to_node"
            )
        try:
            node = to_node(*args, **kwargs)
        except TypeError as exc:
            try:
                inspect.signature(to_node).bind(*args, **kwargs)
            except TypeError:  # not the function's arguments: name both functions
                raise ConfigurationError(
                    f"the .to_node of {self._fn.__qualname__} ({to_node.__qualname__}) does "
                    f"not take the arguments of {self._fn.__qualname__}: {exc}"
                ) from exc
            raise
        if isinstance(node, self._node_cls):
            return self._bound_node(node, args, kwargs)
        if type(node) is DynamicNode:
            return self._keyed_node(node.key(), args, kwargs)
        raise ConfigurationError(
            f"the .to_node of {self._fn.__qualname__} ({to_node.__qualname__}) must return a "
            f"{self._node_cls.__qualname__} or a DynamicNode, got {type(node).__qualname__}"
        )

    def _keyed_node(self, key: str, args: Any, kwargs: Any) -> DynamicNode:
        """A node of ``key`` that carries this function's configuration and arguments."""
        keyed = self._keyed
        if keyed is None:
            base = self._node_cls if issubclass(self._node_cls, DynamicNode) else DynamicNode
            name = base.__name__ if base is self._node_cls else f"{self._fn.__name__}.node"
            qualname = base.__qualname__ if base is self._node_cls else name
            # Abstract: not listed among the nodes; its configuration is ours (same tiers
            # and stats as the class, values of this function's type).
            # load_all too: a batch of these nodes loads each through the function, never
            # through a load_all of the class.
            keyed = type(
                name,
                (base,),
                {
                    "_cacheme_abstract": True,
                    "load": _load_through,
                    "load_all": Node.__dict__["load_all"],
                },
            )
            keyed.__qualname__ = qualname
            keyed.__module__ = base.__module__
            keyed._cacheme_config = self._config
            self._keyed = keyed
        node = keyed(key=key)
        node._cacheme_call = (self._fn, args, kwargs)  # type: ignore[attr-defined]
        return node

    def _bound_node(self, node: Node, args: Any, kwargs: Any) -> Node:
        """``node`` (an instance of the class, from ``to_node``) as a node of this function:
        a copy of it whose class is a subclass that carries this function's configuration
        and loads through it, so that ``cacheme.get`` of it decodes to this function's type
        and never copies another type's value into a local tier. It equals ``node``, hashes
        and pickles as ``node`` does; ``node`` itself is left as it is."""
        cls = type(node)
        if cls._cacheme_config is self._config:
            return node
        bound = self._bound.get(cls)
        if bound is None:
            bound = _bound_class(cls, self._config)
            self._bound[cls] = bound
        twin = copy.copy(node)
        object.__setattr__(twin, "__class__", bound)  # a frozen dataclass's refuses it
        twin.__dict__["_cacheme_call"] = (self._fn, args, kwargs)
        return twin

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        node = self.node(*args, **kwargs)
        value: R = await fetch(node, self._config, lambda: self._fn(*args, **kwargs))
        return value

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """``cacheme.invalidate`` of the node these arguments map to."""
        node = self.node(*args, **kwargs)
        await invalidate(node, self._config)

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function again for these arguments, store and return its value."""
        node = self.node(*args, **kwargs)
        value: R = await reload(node, self._config, lambda: self._fn(*args, **kwargs))
        return value

    @overload
    def __get__(self, obj: None, objtype: type[Any] | None = None) -> Memoized[P, R]: ...

    @overload
    def __get__(
        self: Memoized[Concatenate[S, Q], R], obj: S, objtype: type[Any] | None = None
    ) -> Callable[Q, Coroutine[Any, Any, R]]: ...

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        """On a class: a method whose ``self`` is passed to the function and to ``to_node``
        (the class, for a ``classmethod``; nothing, for a ``staticmethod``)."""
        if self._kind is classmethod:
            return _Bound(self.__call__, objtype if objtype is not None else type(obj))
        if obj is None or self._kind is staticmethod:
            return self
        return _Bound(self.__call__, obj)


class _Bound(functools.partial):  # type: ignore[type-arg]
    """A memoized method of one instance: call it, or use its ``node``, ``invalidate`` and
    ``refresh`` with the method's other arguments (the instance is passed first)."""

    def _memoized(self) -> Memoized[..., Any]:
        return self.func.__self__  # type: ignore[attr-defined,no-any-return]

    def node(self, *args: Any, **kwargs: Any) -> Node:
        return self._memoized().node(*self.args, *args, **kwargs)

    async def invalidate(self, *args: Any, **kwargs: Any) -> None:
        await self._memoized().invalidate(*self.args, *args, **kwargs)

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return await self._memoized().refresh(*self.args, *args, **kwargs)


async def _load_through(node: Any) -> Any:
    """``load()`` of a node from ``Memoized.node``: the function, with its arguments."""
    call = getattr(node, "_cacheme_call", None)
    if call is None:  # e.g. made by dataclasses.replace from one
        raise LoadError(
            f"{type(node).__qualname__} {node!r} is a node of a memoized function that was "
            "not made by its .node(...), so the function's arguments are unknown: make it "
            "with .node(...)"
        )
    fn, args, kwargs = call
    return await fn(*args, **kwargs)


def _bound_class(cls: type[Node], config: Config) -> type[Node]:
    """The subclass of ``cls`` for the nodes of one memoized function (see
    ``Memoized._bound_node``)."""

    def reduce_ex(self: Any, protocol: Any) -> Any:  # unpickled as the class's own
        return _rebuild, (cls, object.__reduce_ex__(_as_cls(cls, self), 2)[2])

    attrs = {
        "__slots__": (),  # the layout of cls: its instances can take this class
        "_cacheme_abstract": True,
        "load": _load_through,
        # load_all too: a batch of these nodes loads each through the function.
        "load_all": Node.__dict__["load_all"],
        # Equal to the class's own instances (a dataclass's __eq__ wants the very same
        # class), and hashed the same.
        "__eq__": _equal_as(cls),
        "__hash__": cls.__hash__,
        "__reduce_ex__": reduce_ex,
    }
    bound: type[Node] = type(cls.__name__, (cls,), attrs)
    bound.__qualname__ = cls.__qualname__
    bound.__module__ = cls.__module__
    bound._cacheme_config = config
    return bound


def _rebuild(cls: type[Node], state: Any) -> Node:
    """Unpickle a node of a memoized function as an instance of its class: ``state`` is
    what pickle took of it (its ``__getstate__``), given back as pickle would."""
    node: Node = object.__new__(cls)
    setstate = getattr(node, "__setstate__", None)
    if setstate is not None:  # the class's own (a slots dataclass has one)
        setstate(state)
        return node
    attrs, slots = state if isinstance(state, tuple) else (state, None)
    if attrs:
        node.__dict__.update(attrs)
    for name, value in (slots or {}).items():
        object.__setattr__(node, name, value)  # a frozen dataclass's refuses it
    return node


def _as_cls(cls: type[Node], node: Any) -> Any:
    """``node`` as a plain instance of ``cls`` (a copy, without its function's arguments)."""
    if type(node) is cls or not isinstance(node, cls):
        return node
    state = object.__reduce_ex__(node, 2)[2]
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if k != "_cacheme_call"}
    elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = ({k: v for k, v in state[0].items() if k != "_cacheme_call"}, state[1])
    return _rebuild(cls, state)


def _equal_as(cls: type[Node]) -> Callable[[Any, Any], Any]:
    """``__eq__`` for ``Memoized._bound_node``'s subclass of ``cls``: compare as ``cls``."""

    def eq(self: Any, other: Any) -> Any:
        if not isinstance(other, cls):
            return NotImplemented
        return cls.__eq__(_as_cls(cls, self), _as_cls(cls, other))

    return eq


def _is_async(fn: Any) -> bool:
    """``fn`` is a coroutine function, or a callable object whose ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )
