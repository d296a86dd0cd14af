"""The benchmark's virtual environments, created on demand.

- ``ours``: the interpreter running ``trace.py`` (the repo's ``.venv``), with the repo root on
  ``PYTHONPATH`` so the child imports this checkout's ``cacheme``.
- ``peers``: ``benchmarks/.venv-peers`` with the latest aiocache and cashews from PyPI (and
  redis-py, matplotlib for the chart), from ``requirements-peers.txt``.
- ``original``: ``benchmarks/.venv-original`` with cacheme 0.3.0 from PyPI, from
  ``requirements-original.txt``; it needs its own venv because it is also imported as
  ``cacheme`` (and pins pydantic 1, redis-py 4, theine 0.3).

A venv is (re)installed when its requirements file changed since the last install (a hash is
kept in the venv). Nothing here touches the repo's own ``.venv``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ENVS = {
    "peers": (os.path.join(HERE, ".venv-peers"), os.path.join(HERE, "requirements-peers.txt")),
    "original": (
        os.path.join(HERE, ".venv-original"),
        os.path.join(HERE, "requirements-original.txt"),
    ),
}


def python_of(env: str) -> str:
    if env == "ours":
        return sys.executable
    path, _ = ENVS[env]
    return os.path.join(path, "bin", "python")


def child_env(env: str) -> dict[str, str]:
    """The environment variables of a child process running in ``env``."""
    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if env == "ours":
        out["PYTHONPATH"] = ROOT  # this checkout's cacheme
    out["PYTHONHASHSEED"] = "0"
    return out


def _digest(requirements: str) -> str:
    with open(requirements, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def is_ready(env: str) -> bool:
    if env == "ours":
        return True
    path, requirements = ENVS[env]
    marker = os.path.join(path, ".cacheme-bench-ready")
    try:
        with open(marker) as f:
            return f.read().strip() == _digest(requirements)
    except OSError:
        return False


def ensure(env: str, log: callable = print) -> str:  # type: ignore[valid-type]
    """The python of ``env``, creating or updating the venv first if needed."""
    if env == "ours" or is_ready(env):
        return python_of(env)
    path, requirements = ENVS[env]
    if not os.path.exists(python_of(env)):
        log(f"creating {os.path.relpath(path, ROOT)} (python -m venv) ...")
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
    log(f"installing {os.path.relpath(requirements, ROOT)} into {os.path.relpath(path, ROOT)} ...")
    subprocess.run(
        [
            python_of(env),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            requirements,
        ],
        check=True,
    )
    with open(os.path.join(path, ".cacheme-bench-ready"), "w") as f:
        f.write(_digest(requirements))
    return python_of(env)


def has_module(python: str, module: str) -> bool:
    return (
        subprocess.run(
            [python, "-c", f"import {module}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )
