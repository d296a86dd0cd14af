"""The trace benchmark still works end to end: the embedded run (local tier + SQLite, no server)
and the reference runs (floor, lean)."""

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


@pytest.mark.redis
def test_quick_reference_trace_runs_and_loads_each_key_once(tmp_path: Path) -> None:
    """The floor and lean reference runs (benchmarks/adapters.py, benchmarks/lean.py)."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "trace.py"),
            "--quick",
            "--frameworks",
            "reference",
            "--out",
            str(tmp_path),
            "--no-chart",
            "--heartbeat",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads((tmp_path / "trace-quick.json").read_text())["runs"]
    names = {run["framework"] for run in runs}
    assert names == {"floor", "lean", "floor-batch", "lean-batch"}, names
    for run in runs:
        assert run["wrong"] == 0 and run["errors"] == 0, run["label"]
        assert run["load_calls"] == run["unique_keys"], run["label"]
        assert run["seconds_x_floor"] > 0 and run["cpu_x_floor"] > 0, run["label"]
        if run["framework"].startswith("floor"):
            assert run["seconds_x_floor"] == 1.0, run["label"]
        else:
            assert run["redis_mget"] > 0, run["label"]
    assert "x floor" in (tmp_path / "trace-quick.md").read_text()
