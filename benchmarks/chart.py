"""Draw a trace benchmark's JSON as a PNG: ``python benchmarks/chart.py trace.json out.png``.

Run by ``trace.py`` with whichever interpreter has matplotlib (a benchmark-only dependency:
the repo's venv if installed there, else ``benchmarks/.venv-peers``).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _short(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def main(src: str, dst: str) -> None:
    with open(src) as f:
        data = json.load(f)
    meta = data["meta"]
    runs = [r for r in data["runs"] if "failed" not in r]
    labels: list[str] = []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
    workers = sorted({r["workers"] for r in runs})
    by = {(r["label"], r["workers"]): r for r in runs}
    redis = meta["kind"] == "redis"

    def reads(r: dict) -> float:
        if redis:
            return r["redis_get"] + r["redis_mget"]
        return r.get("framework_stats", {}).get("sqlite_round_trips", 0)

    panels = [
        ("Time (s)", lambda r: r["seconds"]),
        ("Redis GET + MGET" if redis else "SQLite round trips (reads + writes)", reads),
        ("Load calls / unique keys", lambda r: r["load_calls"] / max(r["unique_keys"], 1)),
        ("Peak RSS (MiB)", lambda r: r["peak_rss_mb"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    width = 0.8 / max(len(workers), 1)
    for ax, (title, value) in zip(axes.flat, panels, strict=False):
        for j, w in enumerate(workers):
            xs, ys = [], []
            for i, label in enumerate(labels):
                r = by.get((label, w))
                if r is not None:
                    xs.append(i + (j - (len(workers) - 1) / 2) * width)
                    ys.append(value(r))
            bars = ax.bar(xs, ys, width, label=f"{w:,} workers")
            ax.bar_label(bars, fmt=_short, fontsize=7, rotation=90, padding=2)
        ax.set_title(title)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(
        f"cacheme trace benchmark ({meta['kind']}): {meta['requests']:,} Zipf requests, "
        f"load {meta['load_delay']:g} s, {meta['date']}"
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
