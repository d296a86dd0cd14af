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
    """``url`` with its password and secret query values replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
    query = parts.query
    if query:
        query = "&".join(
            f"{name}=***" if _SECRET_PARAM.search(name) else f"{name}={value}"
            for name, value in parse_qsl(query, keep_blank_values=True)
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, url: str) -> str:
    """``text`` with every credential of ``url`` replaced by ``***``."""
    for secret in sorted(secrets_of(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
