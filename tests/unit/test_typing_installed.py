"""Users' code type-checks against the *installed* cacheme: the wheel ships ``py.typed``.

A wheel is built from this tree and installed (with its dependencies) into a fresh venv
without system site-packages; mypy (this environment's) then checks ``tests/typing/user_ok.py``
and ``user_bad.py``, copied to a temporary directory outside the repository, with
``--python-executable`` pointing at that venv, so the source tree is not on any search path.
Without ``py.typed`` mypy reports cacheme as untyped (``import-untyped``) and treats every
name from it as ``Any``, so the good file fails and the bad file's errors disappear.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("mypy")
pytestmark = pytest.mark.timeout(300)  # the first test builds the wheel and the venv

ROOT = Path(__file__).resolve().parents[2]
TYPING = ROOT / "tests" / "typing"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z0-9-]+)\]$")


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=240, check=False
    )


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Without hatchling here, pip builds in an isolated environment (from the index).
    no_isolation = ["--no-build-isolation"] if _has("hatchling") else []
    done = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, "-q", "-w", out, ROOT
    )
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("cacheme-*.whl")
    return built


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="session")
def user_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv (no system site-packages) with the wheel installed."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(home)
    python = home / "bin" / "python"
    done = run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)
    assert done.returncode == 0, done.stderr
    return python


@pytest.fixture(scope="session")
def errors(
    user_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, set[tuple[int, str]]]:
    """mypy's errors by file name for the user modules, checked outside the repository."""
    work = tmp_path_factory.mktemp("user")
    for name in ("user_ok.py", "user_bad.py"):
        shutil.copy(TYPING / name, work / name)
    done = run(
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--show-error-codes",
        "--no-error-summary",
        "--no-pretty",
        "--python-executable",
        user_python,
        "--cache-dir",
        work / ".mypy_cache",
        "-v",
        "user_ok.py",
        "user_bad.py",
        cwd=work,
    )
    assert done.returncode in (0, 1), done.stderr
    # mypy found cacheme in the user's venv, not in this checkout.
    site = run(
        user_python, "-c", "import cacheme; print(cacheme.__file__)", cwd=work
    ).stdout.strip()
    assert site.startswith(str(user_python.parents[1])), site
    assert str(ROOT / "cacheme") not in done.stderr
    assert str(Path(site).parent) in done.stderr, "mypy did not read the installed cacheme"
    found: dict[str, set[tuple[int, str]]] = {}
    for line in done.stdout.splitlines():
        match = ERROR.match(line)
        if match:
            found.setdefault(Path(match["path"]).name, set()).add(
                (int(match["line"]), match["code"])
            )
    return found


def expected(path: Path) -> set[tuple[int, str]]:
    marks = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        mark = re.search(r"# E: ([a-z0-9-]+)\s*$", line)
        if mark:
            marks.add((number, mark[1]))
    return marks


def test_the_wheel_ships_py_typed(wheel: Path) -> None:
    assert "cacheme/py.typed" in zipfile.ZipFile(wheel).namelist()


def test_correct_use_type_checks_against_the_installed_package(
    errors: dict[str, set[tuple[int, str]]],
) -> None:
    assert errors.get("user_ok.py", set()) == set()


def test_wrong_use_is_reported_against_the_installed_package(
    errors: dict[str, set[tuple[int, str]]],
) -> None:
    marks = expected(TYPING / "user_bad.py")
    assert {code for _, code in marks} == {"assignment", "arg-type"}
    assert errors.get("user_bad.py", set()) == marks
