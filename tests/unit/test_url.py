"""cacheme.storages.url: a storage URL's secrets are masked, and nothing else changes."""

from __future__ import annotations

import pytest

from cacheme.storages.url import redact, scheme_of, scrub, secrets_of

# URLs without credentials: redact returns them exactly as written.
PLAIN = [
    "sqlite:///rel.db",
    "sqlite:////abs/x.db",
    "sqlite:////var/cache/app.db?purge_interval=60",
    "sqlite:///C:/cache/app.db",
    "sqlite:///rel.db#fragment",
    "local://tlfu",
    "local://lru",
    "redis://localhost:6379/0",
    "redis://user@localhost:6379/0",  # a user without a password is not a secret
    "rediss://cache.example:6380/2?ssl_cert_reqs=none",
    "postgresql://db.internal:5432/app?sslmode=require",
    "postgresql+asyncpg://h/db",
    "mysql://h:3306/app?charset=utf8mb4",
    "mongodb://h1:27017,h2:27018,h3/db?replicaSet=rs0&authSource=admin",
    "mongodb+srv://cluster0.example.net/app",
]


@pytest.mark.parametrize("url", PLAIN)
def test_url_without_credentials_comes_back_unchanged(url: str) -> None:
    assert redact(url) == url
    assert secrets_of(url) == set()
    assert scrub(f"cannot open {url}", url) == f"cannot open {url}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("redis://app:s3cret@localhost:6379/0", "redis://app:***@localhost:6379/0"),
        ("rediss://app:s3cret@cache.example:6380", "rediss://app:***@cache.example:6380"),
        # "@" inside the password: the host is what follows the last one
        ("redis://app:p@ss@localhost:6379/0", "redis://app:***@localhost:6379/0"),
        (
            "postgresql://app@db.internal/app?sslmode=require&password=s3cret",
            "postgresql://app@db.internal/app?sslmode=require&password=***",
        ),
        (
            "postgresql://app:s3cret@db.internal:5432/app?password=s3cret&application_name=x",
            "postgresql://app:***@db.internal:5432/app?password=***&application_name=x",
        ),
        ("mysql://app@h/db?pwd=s3cret", "mysql://app@h/db?pwd=***"),
        (
            "mongodb://app:s3cret@h1:27017,h2:27018,h3/db?replicaSet=rs0&authSource=admin",
            "mongodb://app:***@h1:27017,h2:27018,h3/db?replicaSet=rs0&authSource=admin",
        ),
        ("sqlite:////abs/x.db?password=s3cret", "sqlite:////abs/x.db?password=***"),
        ("sqlite:///rel.db?api_key=s3cret#frag", "sqlite:///rel.db?api_key=***#frag"),
    ],
)
def test_credentials_masked_structure_kept(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "s3cret" not in redact(url)
    assert "s3cret" not in scrub(f"connect {url} failed", url)
    assert redact(redact(url)) == redact(url)  # a redacted URL is a plain one


def test_percent_encoded_password_is_scrubbed_in_both_forms() -> None:
    url = "redis://app:p%40ss%2Fw@localhost:6379/0"
    assert redact(url) == "redis://app:***@localhost:6379/0"
    assert secrets_of(url) == {"p%40ss%2Fw", "p@ss/w"}
    assert scrub("auth p@ss/w and p%40ss%2Fw refused", url) == "auth *** and *** refused"


@pytest.mark.parametrize("password", ["p", "e", "o", "Error", "YES", "6379", "127"])
def test_a_password_found_inside_words_leaves_them_whole(password: str) -> None:
    # Cutting every occurrence out garbled the driver's text ("O***erationalError") and
    # showed, letter by letter, where the password occurs.
    url = f"redis://app:{password}@127.0.0.1:6379/11"
    message = (
        "OperationalError: AuthenticationError: invalid username-password pair "
        "(using password: YES) on 127.0.0.1:6379"
    )
    assert scrub(message, url) == message
    echoed = f"connecting {url} as app, then :{password}@ and ?password={password}&db=1"
    assert scrub(echoed, url) == (
        "connecting redis://app:***@127.0.0.1:6379/11 as app, then :***@ and ?password=***&db=1"
    )


def test_a_short_password_quoted_alone_is_scrubbed() -> None:
    # As in the repr of a driver's keyword arguments (review 51).
    url = "redis://app:pw12@127.0.0.1:6379/11"
    text = "kwargs {'password': 'pw12'} and \"pw12\"; 'pw12x' and pw12 are others"
    assert scrub(text, url) == "kwargs {'password': '***'} and \"***\"; 'pw12x' and pw12 are others"


def test_a_long_password_is_scrubbed_wherever_it_stands_alone() -> None:
    url = "postgresql://app:hunter22@db/app"
    assert scrub("auth hunter22 refused; hunter222 and xhunter22 are others", url) == (
        "auth *** refused; hunter222 and xhunter22 are others"
    )


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("sqlite:////abs/x.db", "sqlite"),
        ("postgresql+asyncpg://h/db", "postgresql"),
        ("REDIS://h", "redis"),
        ("mongodb+srv://h/db", "mongodb"),
    ],
)
def test_scheme_of(url: str, scheme: str) -> None:
    assert scheme_of(url) == scheme
