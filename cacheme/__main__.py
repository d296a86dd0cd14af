"""``python -m cacheme``: the command line (see ``cacheme.cli``)."""

from __future__ import annotations

from .cli import run

if __name__ == "__main__":
    run()
