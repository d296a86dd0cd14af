"""Must pass ``mypy --strict``: memoized functions and methods keep their signatures."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import cacheme
from cacheme import Cache, DynamicNode, Memoize, Node
from cacheme.serializer import MsgPackSerializer


@dataclass
class UserInfoNode(Node):
    user_id: int

    def key(self) -> str:
        return f"user:{self.user_id}:info"

    async def load(self) -> dict[str, int]:
        return {"id": self.user_id}

    class Meta(Node.Meta):
        version = "v1"
        caches = [
            Cache(storage="local", ttl=timedelta(seconds=30)),
            Cache(storage="my-redis", ttl=timedelta(days=10)),
        ]
        serializer = MsgPackSerializer()


@Memoize(UserInfoNode)
async def get_user_info(user_id: int, *, verbose: bool = False) -> dict[str, int]:
    return {"id": user_id}


@get_user_info.to_node
def _(user_id: int, *, verbose: bool = False) -> UserInfoNode:
    return UserInfoNode(user_id=user_id)


@Memoize(cacheme.build_node("TypingDynamic", "v1", [Cache(storage="local", ttl=None)]))
async def fn(a: int) -> int:
    return 1


@fn.to_node
def _fn_node(a: int) -> DynamicNode:
    return DynamicNode(key=f"bar:{a}")


class UserService:
    def __init__(self, base: int) -> None:
        self.base = base

    @Memoize(UserInfoNode)
    async def score(self, user_id: int) -> float:
        return float(self.base + user_id)

    @score.to_node
    def _score_node(self, user_id: int) -> UserInfoNode:
        return UserInfoNode(user_id=user_id)


async def main() -> None:
    info: dict[str, int] = await get_user_info(1)
    info = await get_user_info(user_id=2, verbose=True)
    n: int = info["id"] + await fn(3)
    service = UserService(1)
    score: float = await service.score(n)
    score = await service.score(user_id=4)
    unbound: float = await UserService.score(service, 5)
    user = await cacheme.get(UserInfoNode(user_id=1))
    users = await cacheme.get_all([UserInfoNode(user_id=1), UserInfoNode(user_id=2)])
    stats = cacheme.stats(UserInfoNode)
    rate: float = stats.hit_rate() + score + unbound
    print(user, users, rate)
