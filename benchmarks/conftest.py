"""Prints the cacheme / bare ratios after ``pytest benchmarks/test_micro.py --benchmark-only``."""

from __future__ import annotations

import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's cacheme (it is not installed)

from micro_report import report  # noqa: E402


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None) or []
    rows = []
    for bench in benchmarks:
        stats = getattr(bench, "stats", None)
        if stats is None or not getattr(stats, "data", None):
            continue
        rows.append((bench.name, stats.median, dict(getattr(bench, "extra_info", {}))))
    if rows:
        terminalreporter.write_line("")
        for line in report(rows):
            terminalreporter.write_line(line)
