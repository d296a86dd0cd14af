"""The trace benchmark's embedded run (local tier + SQLite, no server) still works end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.sqlite
def test_quick_embedded_trace_runs_and_loads_each_key_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "trace.py"),
            "--quick",
            "--embedded",
            "--frameworks",
            "cacheme",
            "--out",
            str(tmp_path),
            "--no-chart",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(next(tmp_path.glob("*.json")).read_text())
    runs = results["runs"]
    assert runs, "no run recorded"
    for run in runs:
        assert run["wrong"] == 0 and run["errors"] == 0, run["label"]
        assert run["load_calls"] == run["unique_keys"], run["label"]
