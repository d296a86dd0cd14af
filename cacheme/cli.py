"""The ``cacheme`` command line (also ``python -m cacheme``).

Commands::

    cacheme schema create URL [--table T | --database D --collection C]
    cacheme schema show KIND|URL [--table T]
    cacheme check URL [--table T | --database D --collection C]
    cacheme nodes MODULE [--json]
    cacheme stats MODULE[:FUNCTION] [--watch SECONDS] [--json]

Exit codes (for scripts):

- 0: done; for ``check``, the storage is reachable and its schema is right (a ``local://``
  URL has nothing to check: it exits 0 once the URL and options are valid).
- 1: the operation failed: the server is unreachable or refused, the schema is missing or
  wrong (``check``), the module raised while importing, or FUNCTION raised; also when
  standard output is closed before all was written (piped into ``head``), quietly.
- 2: usage error: bad arguments, an unknown scheme, a bad URL or option, a missing driver
  (``pip install "cacheme[...]"``), a module that does not exist.
- 130: interrupted (Ctrl-C).

Results go to standard output, errors and problems to standard error. ``MODULE`` is imported
as ``python -m`` would (the current directory first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn

from .errors import ConfigurationError, StorageError
from .storages.url import scheme_of

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Exit(Exception):
    """Stop the command with ``code`` after printing ``message`` to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cacheme")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


# -- storage options ----------------------------------------------------------------------


def _option_value(text: str) -> Any:
    """``--option`` values: JSON when they parse (``5``, ``1.5``, ``true``), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not 0 < timeout < float("inf"):
        raise _Exit(EXIT_USAGE, f"--timeout takes a positive number of seconds, got {timeout}")
    options: dict[str, Any] = {}
    for item in args.option or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise _Exit(EXIT_USAGE, f"--option takes NAME=VALUE, got {item!r}")
        name = name.strip()
        if name == "url":
            raise _Exit(
                EXIT_USAGE,
                f"--option {item!r}: 'url' is not a storage option; give the storage URL "
                f"as the URL argument",
            )
        options[name] = _option_value(value)
    for name in ("table", "database", "collection"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in options and options[name] != value:
            raise _Exit(
                EXIT_USAGE,
                f"--{name} {value!r} and --option {name}={options[name]!r} disagree; "
                f"give one of them",
            )
        options[name] = value
    return options


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="a storage URL, as given to cacheme.Storage")
    parser.add_argument(
        "--table", help="SQL table name (default cacheme_data); a plain SQL identifier"
    )
    parser.add_argument(
        "--database", help="MongoDB database (default: the one in the URL, else cacheme)"
    )
    parser.add_argument("--collection", help="MongoDB collection (default cacheme_data)")
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        metavar="NAME=VALUE",
        help="any other storage option, e.g. -o cluster=true or -o timeout=5 (the storage's "
        "own timeout, per operation) (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on a server that does not answer within this, per step of the command "
        "(default 10)",
    )


# -- schema / check -----------------------------------------------------------------------


def _cmd_schema_create(args: argparse.Namespace) -> int:
    from . import schemas

    # MySQL notes "table already exists" for CREATE ... IF NOT EXISTS: expected here.
    logging.getLogger("asyncmy").setLevel(logging.ERROR)
    options = _storage_options(args)
    for line in asyncio.run(
        schemas.create(args.url, timeout=args.timeout, storage_options=options)
    ):
        print(line)
    return EXIT_OK


def _cmd_schema_show(args: argparse.Namespace) -> int:
    from . import schemas

    target: str = args.target
    kind = schemas.schema_kind(target) if "://" in target else target
    if kind == "postgres":
        kind = "postgresql"
    if kind is None or kind not in schemas.SCHEMA_FILES:
        raise _Exit(
            EXIT_USAGE,
            f"no schema for {target!r}: give one of {', '.join(schemas.SCHEMA_FILES)} "
            f"or a URL of those schemes",
        )
    if kind == "mongodb" or args.table is None:
        if kind == "mongodb" and args.table is not None:
            raise _Exit(EXIT_USAGE, "--table is for SQL schemas; mongo.js takes a collection")
        sys.stdout.write(schemas.schema_text(kind))
    else:
        for statement in schemas.sql_statements(kind, args.table):
            print(f"{statement};\n")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from . import schemas

    options = _storage_options(args)
    if scheme_of(args.url) == "local":
        # Nothing outside the process to reach, and a local tier's required ``size`` is an
        # app setting: the URL and the options given are still validated (a stand-in size
        # when none is given), so a typo exits 2.
        options.setdefault("size", 1)
        asyncio.run(schemas.check(args.url, timeout=args.timeout, storage_options=options))
        print(
            f"{args.url}: ok: local storages live in the memory of each process that "
            "registers them; there is nothing to check"
        )
        return EXIT_OK
    report = asyncio.run(schemas.check(args.url, timeout=args.timeout, storage_options=options))
    for line in report.ok:
        print(f"ok: {line}")
    for line in report.problems:
        print(f"problem: {line}", file=sys.stderr)
    if report.passed:
        print(f"{report.url}: ok")
        return EXIT_OK
    print(f"{report.url}: {len(report.problems)} problem(s)", file=sys.stderr)
    return EXIT_FAILED


# -- nodes / stats ------------------------------------------------------------------------


def _import(module_name: str) -> Any:
    """Import ``module_name`` with the current directory on ``sys.path`` (as ``python -m``)."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise _Exit(EXIT_USAGE, f"no module named {module_name!r}") from exc
        raise _Exit(EXIT_FAILED, f"importing {module_name!r} failed: {exc}") from exc
    except (KeyboardInterrupt, SystemExit, BrokenPipeError):
        raise
    except BaseException as exc:
        raise _Exit(
            EXIT_FAILED, f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def _ttl(ttl: timedelta | None) -> str:
    """A TTL for people: ``30s``, ``5m``, ``1h30m``, ``250ms``, ``none``."""
    if ttl is None:
        return "none"
    ms = round(ttl.total_seconds() * 1000)
    if ms % 1000:
        return f"{ttl.total_seconds():g}s" if ms > 1000 else f"{ms}ms"
    seconds = ms // 1000
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts)


def _describe_node(name: str, cls: Any) -> dict[str, Any]:
    cfg = cls._cacheme_config
    return {
        "name": name,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "version": cfg.version,
        "caches": [
            {
                "storage": c.storage,
                "ttl": _ttl(c.ttl),
                "ttl_seconds": None if c.ttl is None else c.ttl.total_seconds(),
            }
            for c in cfg.caches
        ],
        "serializer": None if cfg.serializer is None else type(cfg.serializer).__name__,
        "doorkeeper": None if cfg.doorkeeper is None else type(cfg.doorkeeper).__name__,
        "load_timeout": getattr(cfg, "load_timeout", None),
        "stale_if_error": (
            None
            if getattr(cfg, "stale_if_error", None) is None
            else cfg.stale_if_error.total_seconds()
        ),
    }


def _cmd_nodes(args: argparse.Namespace) -> int:
    from .metrics import node_names
    from .node import nodes

    before = set(nodes())
    _import(args.module)
    every = nodes()
    names = dict(zip(every, node_names(every), strict=True))
    found = [cls for cls in every if cls not in before]
    described = [_describe_node(names[cls], cls) for cls in found]
    if args.json:
        print(json.dumps(described, indent=2))
        return EXIT_OK
    if not described:
        print(f"{args.module}: no node classes", file=sys.stderr)
        return EXIT_OK
    rows = [
        (
            d["name"],
            d["version"] or "-",
            " -> ".join(f"{c['storage']} ({c['ttl']})" for c in d["caches"]) or "(no caches)",
            d["serializer"] or "-",
        )
        for d in described
    ]
    _print_table(("NODE", "VERSION", "CHAIN (TTL)", "SERIALIZER"), rows)
    return EXIT_OK


def _print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _print_stats(as_json: bool) -> None:
    from .metrics import negative_hits, snapshot, tier_hits

    snap = snapshot()
    if as_json:
        print(json.dumps(snap.as_dict()), flush=True)
        return
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    print(f"-- cacheme stats at {stamp}")
    rows = []
    for name, s in snap.nodes.items():
        tiers = " ".join(f"{t}={n}" for t, n in tier_hits(s).items()) or "-"
        rows.append(
            (
                name,
                s.requests,
                s.hits,
                f"{s.hit_rate():.1%}",
                s.miss_count(),
                s.load_count(),
                s.load_failures,
                f"{s.average_load_time() / 1e6:.2f}",
                s.coalesced,
                s.stale,
                negative_hits(s),
                tiers,
            )
        )
    _print_table(
        (
            "NODE",
            "REQUESTS",
            "HITS",
            "HIT%",
            "MISSES",
            "LOADS",
            "FAILED",
            "AVG_LOAD_MS",
            "COALESCED",
            "STALE",
            "NEGATIVE",
            "HITS_BY_TIER",
        ),
        rows,
    )
    remote = [s for s in snap.storages.values() if not s.local]
    if remote:
        print()
        _print_table(
            ("STORAGE", "ROUND_TRIPS", "READ", "WRITTEN", "ERRORS", "TIMEOUTS", "BREAKER"),
            [
                (
                    s.name,
                    s.round_trips,
                    s.keys_read,
                    s.keys_written,
                    s.errors,
                    s.timeouts,
                    "open" if s.breaker_open else "closed",
                )
                for s in remote
            ],
        )
    sys.stdout.flush()


async def _run_watching(function: Any, watch: float | None, as_json: bool) -> None:
    result = function()
    if not inspect.isawaitable(result):
        return
    task = asyncio.ensure_future(result)
    if watch is None:
        await task
        return
    while True:
        done, _ = await asyncio.wait({task}, timeout=watch)
        if done:
            task.result()
            return
        _print_stats(as_json)


def _cmd_stats(args: argparse.Namespace) -> int:
    module_name, _, function_name = args.target.partition(":")
    if args.watch is not None and args.watch <= 0:
        raise _Exit(EXIT_USAGE, f"--watch takes a positive number of seconds, got {args.watch}")
    if args.watch is not None and not function_name:
        raise _Exit(
            EXIT_USAGE,
            "--watch needs MODULE:FUNCTION: stats live in the process that runs the nodes, "
            "so the command runs FUNCTION and shows its stats while it runs",
        )
    module = _import(module_name)
    if function_name:
        function = getattr(module, function_name, None)
        if not callable(function):
            raise _Exit(EXIT_USAGE, f"{module_name} has no function {function_name!r}")
        try:
            asyncio.run(_run_watching(function, args.watch, args.json))
        except (KeyboardInterrupt, SystemExit, BrokenPipeError):
            raise
        except BaseException as exc:
            _print_stats(args.json)
            raise _Exit(EXIT_FAILED, f"{args.target} raised {type(exc).__name__}: {exc}") from exc
    _print_stats(args.json)
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cacheme`` command."""
    parser = _Parser(
        prog="cacheme",
        description="Chores around cacheme storages and nodes.",
        epilog="Exit codes: 0 ok, 1 failed (unreachable, schema wrong, module or function "
        "raised), 2 usage error (bad arguments, URL or option, missing driver), "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"cacheme {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    schema = commands.add_parser(
        "schema",
        help="create or show the table / collection a storage needs",
        description="Create or show the schema (table or collection, and indexes) of the "
        "SQL and MongoDB tiers, from the schemas shipped with cacheme.",
    )
    schema_commands = schema.add_subparsers(
        dest="schema_command", metavar="SUBCOMMAND", parser_class=_Parser
    )
    schema_commands.required = True
    create = schema_commands.add_parser(
        "create",
        help="create the table or collection and its indexes for a storage URL",
        description="Create the table (sqlite://, postgresql://, mysql://) or the collection "
        "(mongodb://) and its indexes; what already exists is kept, so it is safe to run "
        "again. Exit 0 when done, 1 when the server is unreachable or refuses, 2 for a URL "
        "that needs no schema or a bad option.",
    )
    _add_storage_arguments(create)
    create.set_defaults(handler=_cmd_schema_create)
    show = schema_commands.add_parser(
        "show",
        help="print a shipped schema",
        description="Print the schema for KIND (sqlite, postgresql, mysql, mongodb) or for a "
        "URL of that scheme; with --table, the SQL statements for that table.",
    )
    show.add_argument("target", metavar="KIND|URL")
    show.add_argument("--table", help="print the statements for this table name")
    show.set_defaults(handler=_cmd_schema_show)

    check = commands.add_parser(
        "check",
        help="check that a storage URL is reachable and its schema right",
        description="Connect to the storage; for SQL check the table, its columns key, "
        "value, expire, its primary key and the index on expire; for MongoDB the collection, "
        "the unique index on key and the TTL index on expire; then read one key through a "
        "cacheme storage. A local:// URL has nothing to check (local storages live in the "
        "process): exit 0 once its URL and options are valid. Exit 0 when all is right, 1 "
        "when unreachable or a problem was found (listed on stderr), 2 for a bad URL or "
        "option or a missing driver.",
    )
    _add_storage_arguments(check)
    check.set_defaults(handler=_cmd_check)

    nodes = commands.add_parser(
        "nodes",
        help="list the node classes a module defines, with their chains and TTLs",
        description="Import MODULE and list the node classes that importing it defined: "
        "name, version, tiers with their TTLs, serializer. Exit 2 if MODULE does not exist, "
        "1 if importing it raised.",
    )
    nodes.add_argument("module", metavar="MODULE", help="a dotted module name, e.g. myapp.nodes")
    nodes.add_argument("--json", action="store_true", help="print JSON instead of a table")
    nodes.set_defaults(handler=_cmd_nodes)

    stats = commands.add_parser(
        "stats",
        help="show the stats of every node and storage",
        description="Import MODULE; with :FUNCTION, run FUNCTION (an async function taking no "
        "arguments, e.g. one that registers storages and serves or replays traffic) and, with "
        "--watch, print the stats every SECONDS while it runs; then print them once more. "
        "Stats are per process: to watch a running server, export them from it "
        "(cacheme.exporters.prometheus or .opentelemetry). Exit 1 if FUNCTION raised.",
    )
    stats.add_argument("target", metavar="MODULE[:FUNCTION]")
    stats.add_argument(
        "--watch", type=float, metavar="SECONDS", help="print every SECONDS while FUNCTION runs"
    )
    stats.add_argument("--json", action="store_true", help="one JSON object per print (JSON Lines)")
    stats.set_defaults(handler=_cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        return _output_closed()
    except _Exit as exc:
        print(f"cacheme: {exc}", file=sys.stderr)
        return exc.code
    except ConfigurationError as exc:
        print(f"cacheme: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:
        print(f"cacheme: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("cacheme: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _output_closed() -> int:
    """Standard output's reader went away (``cacheme stats ... | head``): stop quietly, with
    no traceback. Python flushes standard output once more at exit, which would fail again
    and print "Exception ignored": what is left goes to the null device instead."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sys.stdout.fileno())
        finally:
            os.close(null)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture)
        pass
    return EXIT_FAILED


def run() -> NoReturn:
    """``sys.exit(main())``: the entry point of ``python -m cacheme``."""
    sys.exit(main())
