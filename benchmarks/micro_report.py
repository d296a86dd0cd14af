"""Ratios of the micro benchmarks: cacheme's time over the bare library's, per operation.

Printed at the end of ``pytest benchmarks/test_micro.py --benchmark-only`` (by
``conftest.py``); or from a saved run:

    pytest benchmarks/test_micro.py --benchmark-only --benchmark-json=micro.json
    python benchmarks/micro_report.py micro.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

# (what, cacheme test, bare test, target ratio or None)
PAIRS = [
    (
        "local hit (prebuilt node) vs theine Cache.get",
        "test_local_hit_cacheme",
        "test_local_hit_theine",
        1.5,
    ),
    (
        "local hit (node built per call) vs theine Cache.get",
        "test_local_hit_cacheme_new_node",
        "test_local_hit_theine",
        None,
    ),
    ("Redis hit vs redis-py GET", "test_redis_hit_cacheme", "test_redis_hit_bare", None),
    (
        "get_all of 20 on Redis vs redis-py MGET",
        "test_redis_get_all20_cacheme",
        "test_redis_get_all20_bare",
        None,
    ),
    (
        "miss that loads ([redis]) vs GET + SET",
        "test_redis_miss_load_cacheme",
        "test_redis_miss_load_bare",
        None,
    ),
]


def per_op(median_s: float, extra: dict[str, object]) -> float:
    ops = extra.get("ops_per_round", 1)
    return median_s / float(ops)  # type: ignore[arg-type]


def report(rows: Iterable[tuple[str, float, dict[str, object]]]) -> list[str]:
    """Lines of the report from (test name, median seconds, extra_info)."""
    times = {name.split("[")[0]: per_op(median, extra) for name, median, extra in rows}
    lines = ["cacheme micro benchmarks (median per operation; ratio = cacheme / bare):"]
    for what, ours, bare, target in PAIRS:
        if ours not in times or bare not in times:
            continue
        ratio = times[ours] / times[bare]
        goal = ""
        if target is not None:
            goal = f"  target <= {target:g}x: {'MET' if ratio <= target else 'MISSED'}"
        lines.append(
            f"  {what:<55} {times[ours] * 1e6:9.2f} us vs {times[bare] * 1e6:9.2f} us"
            f" = {ratio:5.2f}x{goal}"
        )
    return lines


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    rows = [(b["name"], b["stats"]["median"], b.get("extra_info", {})) for b in data["benchmarks"]]
    print("\n".join(report(rows)))


if __name__ == "__main__":
    main(sys.argv[1])
