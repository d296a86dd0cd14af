"""The typing contract of Memoize, checked by running mypy --strict on tests/typing/.

``memoize_ok.py`` must type-check; ``memoize_bad.py`` must fail with exactly the errors its
``# E: <code>`` comments announce, line by line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[2]
TYPING = ROOT / "tests" / "typing"
OK = TYPING / "memoize_ok.py"
BAD = TYPING / "memoize_bad.py"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z0-9-]+)\]$")


@pytest.fixture(scope="module")
def errors() -> dict[str, set[tuple[int, str]]]:
    """mypy's errors by file name (one run for both files)."""
    stdout, stderr, _ = api.run(
        [
            "--strict",
            "--show-error-codes",
            "--no-error-summary",
            "--no-pretty",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            str(OK),
            str(BAD),
        ]
    )
    assert not stderr, stderr
    found: dict[str, set[tuple[int, str]]] = {}
    for line in stdout.splitlines():
        match = ERROR.match(line)
        if match:
            name = Path(match["path"]).name
            found.setdefault(name, set()).add((int(match["line"]), match["code"]))
    return found


def expected(path: Path) -> set[tuple[int, str]]:
    marks = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        mark = re.search(r"# E: ([a-z0-9-]+)\s*$", line)
        if mark:
            marks.add((number, mark[1]))
    return marks


def test_good_usage_type_checks(errors: dict[str, set[tuple[int, str]]]) -> None:
    assert errors.get(OK.name, set()) == set()


def test_bad_usage_fails_with_the_expected_errors(
    errors: dict[str, set[tuple[int, str]]],
) -> None:
    marks = expected(BAD)
    assert {code for _, code in marks} >= {"arg-type", "call-arg", "assignment"}
    assert errors.get(BAD.name, set()) == marks
