"""``@Memoize(NodeCls)``: cache an async function (or method) through a node class.

The decorated function is the loader; ``.to_node`` maps the same arguments to a node, whose
key is used. The node class given to ``Memoize`` supplies the tiers, TTLs and stats; values
decode to the memoized function's return annotation (each memoized function keeps its own,
so two functions memoized with one node class never decode each other's values). ``to_node``
may return an instance of that class or a plain ``DynamicNode(key=...)``; ``.node(...)``,
``.invalidate(...)`` and ``.refresh(...)`` take the function's arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from .api import fetch, invalidate, reload
from .errors import ConfigurationError
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
        if not _is_async(fn):
            raise ConfigurationError(
                f"Memoize({self.node_cls.__qualname__}) decorates async functions; "
                f"{getattr(fn, '__qualname__', fn)!r} is not one (define it with async def)"
            )
        return Memoized(fn, self.node_cls)


class Memoized(Generic[P, R]):
    """A memoized async function; call ``to_node`` once before calling it."""

    def __init__(self, fn: Callable[P, Awaitable[R]], node_cls: type[Node]) -> None:
        self._fn = fn
        self._node_cls = node_cls
        self._to_node: Callable[P, Node] | None = None
        # Our own view of the node class's configuration: its value type is this function's.
        self._config: Config = node_cls._cacheme_config.for_function(fn)
        functools.update_wrapper(self, fn)

    def to_node(self, fn: Callable[P, Node]) -> Callable[P, Node]:
        """Register the function that maps this function's arguments to its node."""
        self._to_node = fn
        return fn

    def node(self, *args: P.args, **kwargs: P.kwargs) -> Node:
        """The node these arguments map to, as an instance of the memoizing node class.

        A plain ``DynamicNode(key=...)`` from ``to_node`` becomes an instance of the class
        given to ``Memoize`` (when that class takes ``key=``, as ``build_node``'s do), so it
        can be passed to ``cacheme.invalidate`` or ``cacheme.get``. Raises
        ``ConfigurationError`` when ``to_node`` is missing or returns another class.
        """
        to_node = self._to_node
        if to_node is None:
            raise ConfigurationError(
                f"{self._fn.__qualname__} is memoized with {self._node_cls.__qualname__} but "
                "has no .to_node yet; decorate a function with @"
                f"{self._fn.__name__}.to_node"
            )
        node = to_node(*args, **kwargs)
        if isinstance(node, self._node_cls):
            return node
        if type(node) is DynamicNode:
            if issubclass(self._node_cls, DynamicNode):
                return self._node_cls(key=node.key())
            return node
        raise ConfigurationError(
            f"{to_node.__qualname__} must return a {self._node_cls.__qualname__} or a "
            f"DynamicNode, got {type(node).__qualname__}"
        )

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
        """On a class: a method whose ``self`` is passed to the function and to ``to_node``."""
        if obj is None:
            return self
        return functools.partial(self.__call__, obj)


def _is_async(fn: Any) -> bool:
    """``fn`` is a coroutine function, or a callable object whose ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )
