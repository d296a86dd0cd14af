"""Storage URLs: the scheme, and a form safe to print (no password)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased, without any ``+driver`` suffix."""
    return urlsplit(url).scheme.lower().split("+", 1)[0]


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``; safe for reprs, logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
