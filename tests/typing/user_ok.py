"""Must pass ``mypy --strict`` against the *installed* cacheme (see test_typing_installed.py)."""

from __future__ import annotations

from typing import Any

import cacheme
from cacheme import Cache, Memoize, Node
from cacheme.serializer import MsgPackSerializer


class NameNode(Node):
    def __init__(self, user_id: int) -> None:
        self.user_id = user_id

    def key(self) -> str:
        return f"name:{self.user_id}"

    async def load(self) -> str:
        return "ada"

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]
        serializer = MsgPackSerializer()


@Memoize(NameNode)
async def get_name(user_id: int) -> str:
    return "ada"


@get_name.to_node
def _(user_id: int) -> NameNode:
    return NameNode(user_id)


async def main() -> None:
    name: str = await get_name(1)
    value: Any = await cacheme.get(NameNode(1))
    data: bytes = MsgPackSerializer().dumps([name, value])
    print(MsgPackSerializer().loads(data, list[str]))
