"""Where the test servers are, and what a test does when one is missing.

URLs come from the environment, with local defaults. A test that cannot reach its server
skips with the reason, unless CACHEME_REQUIRE_SERVICES=1 (CI sets it): then it fails.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_CLUSTER_URL = os.environ.get("REDIS_CLUSTER_URL", "redis://127.0.0.1:7000")
POSTGRES_URL = os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("MYSQL_URL", "mysql://cacheme:cacheme@127.0.0.1:3306/test")
MONGO_URL = os.environ.get("MONGO_URL", "mongodb://127.0.0.1:27017")

REQUIRE = os.environ.get("CACHEME_REQUIRE_SERVICES") == "1"


def unavailable(service: str, url: str, error: BaseException) -> NoReturn:
    """Skip (or, under CACHEME_REQUIRE_SERVICES=1, fail) a test whose server is missing."""
    from cacheme.storages.url import redact

    reason = (
        f"{service} not reachable at {redact(url)} ({type(error).__name__}: {error}); "
        f"start it (see docs/development.md, 'Test servers') or set the URL variable"
    )
    if REQUIRE:
        pytest.fail(f"CACHEME_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)
