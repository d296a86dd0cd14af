"""mkdocs hook: publish the trace benchmark's chart, which lives beside its results.

``benchmarks/trace.py`` writes ``benchmarks/results/trace.png``; the benchmarks page shows it
as ``img/trace.png``. Serving it from where the benchmark writes it keeps one copy, always
the latest run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

CHARTS = {"img/trace.png": "benchmarks/results/trace.png"}


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).parent
    for uri, source in CHARTS.items():
        path = root / source
        if path.exists():
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
