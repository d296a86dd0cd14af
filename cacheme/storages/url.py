"""Storage URLs: the scheme, and a form safe to print (no password, no secret parameter)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

# Query parameters that drivers accept as credentials (e.g. ?password=..., ?authSource is not).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|credential|apikey|api_key", re.IGNORECASE)


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased, without any ``+driver`` suffix."""
    return urlsplit(url).scheme.lower().split("+", 1)[0]


def secrets_of(url: str) -> set[str]:
    """The credential strings in ``url`` (raw and percent-decoded), to scrub from any text."""
    parts = urlsplit(url)
    found: set[str] = set()
    if parts.password:
        found |= {parts.password, unquote(parts.password)}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and _SECRET_PARAM.search(name):
            found |= {value, unquote(value)}
    return {s for s in found if s}


def redact(url: str) -> str:
    """``url`` with its password and secret query values replaced by ``***``.

    Works on multi-host URLs too (``mongodb://u:pw@h1:27017,h2:27018/db``); the rest of the
    URL is kept exactly as written.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = parts.query
    if query:
        pieces = []
        for piece in query.split("&"):
            name, eq, _ = piece.partition("=")
            pieces.append(f"{name}=***" if eq and _SECRET_PARAM.search(unquote(name)) else piece)
        query = "&".join(pieces)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, url: str) -> str:
    """``text`` with every credential of ``url`` replaced by ``***``."""
    for secret in sorted(secrets_of(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
