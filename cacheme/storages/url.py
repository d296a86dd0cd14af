"""Storage URLs: the scheme, and a form safe to print (no password, no secret parameter)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

# Query parameters that drivers accept as credentials (e.g. ?password=..., ?authSource is not).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|credential|apikey|api_key", re.IGNORECASE)
# "scheme:" as RFC 3986 (and urlsplit) reads it, and the end of an authority ("//...").
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_AUTHORITY_END = re.compile(r"[/?#]")


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased, without any ``+driver`` suffix."""
    return urlsplit(url).scheme.lower().split("+", 1)[0]


_PORT = re.compile(r"(?:\[[^\]]*\]|[^:]*)(?::(.*))?")


def bad_port(url: str) -> str | None:
    """The first port of ``url``'s host list that is not a number from 1 to 65535, if any.

    Drivers differ here: some raise a bare ``ValueError``, some take the URL and then fail
    to connect as if the server were down. Hosts may be a list (``h1:27017,h2:27018``).
    """
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    for host in netloc.split(",") if netloc else ():
        match = _PORT.fullmatch(host)
        port = match.group(1) if match else host
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return port
    return None


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

    Works on multi-host URLs too (``mongodb://u:pw@h1:27017,h2:27018/db``). Only the secrets
    change: the rest of the URL is kept character for character, so a URL without credentials
    comes back unchanged (``sqlite:////var/cache/app.db`` keeps its four slashes).
    """
    # Cut the URL as urlsplit does (scheme, "//" authority up to the first "/?#", path,
    # "?" query, "#" fragment), but never re-join it with urlunsplit, which rewrites paths
    # of URLs without a host ("sqlite:///rel.db" came back as "sqlite:/rel.db").
    scheme = _SCHEME.match(url)
    head = scheme.group(0) if scheme else ""
    rest = url[len(head) :]
    netloc = ""
    if rest.startswith("//"):
        end = _AUTHORITY_END.search(rest, 2)
        cut = end.start() if end else len(rest)
        netloc, rest = rest[2:cut], rest[cut:]
        userinfo, at, hosts = netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
        head += "//" + netloc
    rest, hash_, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    if query:
        pieces = []
        for piece in query.split("&"):
            name, eq, _ = piece.partition("=")
            pieces.append(f"{name}=***" if eq and _SECRET_PARAM.search(unquote(name)) else piece)
        query = "&".join(pieces)
    return f"{head}{path}{question}{query}{hash_}{fragment}"


# A secret shorter than this is scrubbed only where it stands as a credential (":pw@",
# "=pw"): alone, "e" or "127" is as likely to be part of the message ("127.0.0.1") as an echo
# of the password, and cutting it out would garble the text and show where it occurs.
_SHORT_SECRET = 6


def scrub(text: str, url: str) -> str:
    """``text`` with every credential of ``url`` replaced by ``***``: the URL itself where
    it appears whole (as ``redact`` prints it); each secret where it stands as a credential
    (``:secret@``, ``=secret``, or quoted alone, as in the repr of a driver's keyword
    arguments: ``'password': 'secret'``); and a secret of 6 characters or more wherever it
    stands on its own, not inside a longer run of letters and digits. A password such as
    ``e`` or ``Error`` is never cut out of the words around it ("ConnectionError" stays
    whole)."""
    if url in text:
        text = text.replace(url, redact(url))
    for secret in sorted(secrets_of(url), key=len, reverse=True):
        quoted = re.escape(secret)
        if len(secret) >= _SHORT_SECRET:
            text = re.sub(rf"(?<![^\W_]){quoted}(?![^\W_])", "***", text)
        else:
            text = re.sub(
                rf"(?<=:){quoted}(?=@)|(?<==){quoted}(?![^\W_])|(?<=')"
                rf"{quoted}(?=')|(?<=\"){quoted}(?=\")",
                "***",
                text,
            )
    return text
