"""Must fail ``mypy --strict`` against the installed cacheme, with the errors marked ``# E:``.

Without a ``py.typed`` marker mypy would treat cacheme as untyped and report none of them.
"""

from __future__ import annotations

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
    number: int = await get_name(1)  # E: assignment
    await get_name("1")  # E: arg-type
    await cacheme.get("not a node")  # E: arg-type
    text: str = MsgPackSerializer().dumps(number)  # E: assignment
    print(text)
