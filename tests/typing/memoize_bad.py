"""Must FAIL ``mypy --strict``: each marked line raises exactly the error code after ``E:``."""

from __future__ import annotations

from dataclasses import dataclass

from cacheme import Cache, Memoize, Node


@dataclass
class UserInfoNode(Node):
    user_id: int

    def key(self) -> str:
        return f"user:{self.user_id}:info"

    class Meta(Node.Meta):
        caches = [Cache(storage="local")]


@Memoize(UserInfoNode)
async def get_user_info(user_id: int) -> dict[str, int]:
    return {"id": user_id}


@get_user_info.to_node
def _(user_id: int) -> UserInfoNode:
    return UserInfoNode(user_id=user_id)


@get_user_info.to_node  # E: arg-type
def _wrong_args(user_id: str) -> UserInfoNode:
    return UserInfoNode(user_id=int(user_id))


class UserService:
    @Memoize(UserInfoNode)
    async def score(self, user_id: int) -> float:
        return 1.0

    @score.to_node
    def _score_node(self, user_id: int) -> UserInfoNode:
        return UserInfoNode(user_id=user_id)


async def main() -> None:
    await get_user_info("1")  # E: arg-type
    await get_user_info(1, 2)  # E: call-arg
    await get_user_info(uid=1)  # E: call-arg
    name: str = await get_user_info(1)  # E: assignment
    get_user_info(1).upper()  # E: attr-defined
    service = UserService()
    await service.score("1")  # E: arg-type
    label: str = await service.score(1)  # E: assignment
    print(name, label)
