"""The benchmark's key streams: a Zipf sampler and the two workloads built on it.

Standard library only: this module is imported by the benchmark child processes of every
virtual environment (ours, the peers', the original cacheme 0.3.0's), so each of them draws
exactly the same keys from the same seed.

The sampler draws ``k`` in ``[0, imax]`` with probability proportional to ``(v + k) ** -s``
(the parametrisation of Go's ``rand.Zipf``, which the original benchmark's ``Zipf(1.001, 10,
n)`` used), by rejection-inversion (Hörmann and Derflinger, "Rejection-inversion to generate
variates from monotone discrete distributions", ACM TOMACS 6(3), 1996): one uniform draw per
sample almost always, no table, O(1) memory.

With ``s = 1.001, v = 10, imax = requests`` and 200,000 requests the stream has about 55k
unique keys (seed 2024: see ``python benchmarks/workload.py``), as in the original README;
the batch workload (20k ``get_all`` of 20 distinct keys, same distribution) about 86k.
"""

from __future__ import annotations

import math
import random

DEFAULT_SEED = 2024
ZIPF_S = 1.001
ZIPF_V = 10.0


class Zipf:
    """Zipf(s, v, imax) sampler over ``0..imax``; ``s > 1``, ``v >= 1``."""

    def __init__(self, s: float, v: float, imax: int, rng: random.Random) -> None:
        if s <= 1.0 or v < 1.0 or imax < 1:
            raise ValueError(f"need s > 1, v >= 1, imax >= 1; got s={s}, v={v}, imax={imax}")
        self.s = s
        self.v = v
        self.imax = float(imax)
        self.rng = rng
        self._one_minus_s = 1.0 - s
        self._inv_one_minus_s = 1.0 / self._one_minus_s
        self._h_max = self._h(self.imax + 0.5)
        self._h_span = self._h(0.5) - math.exp(math.log(v) * -s) - self._h_max
        # Squeeze: a candidate this close to its rounded value is always accepted.
        self._squeeze = 1.0 - self._h_inv(self._h(1.5) - math.exp(-s * math.log(v + 1.0)))

    def _h(self, x: float) -> float:
        """The integral of the hat function (up to a constant)."""
        return math.exp(self._one_minus_s * math.log(self.v + x)) * self._inv_one_minus_s

    def _h_inv(self, y: float) -> float:
        return math.exp(self._inv_one_minus_s * math.log(self._one_minus_s * y)) - self.v

    def sample(self) -> int:
        rand = self.rng.random
        s = self.s
        v = self.v
        while True:
            u = self._h_max + rand() * self._h_span
            x = self._h_inv(u)
            k = math.floor(x + 0.5)
            if k - x <= self._squeeze:
                return int(k)
            if u >= self._h(k + 0.5) - math.exp(-math.log(k + v) * s):
                return int(k)


def trace_keys(requests: int, seed: int = DEFAULT_SEED) -> list[int]:
    """``requests`` keys of one Zipf stream (``imax = requests``, as in the original)."""
    z = Zipf(ZIPF_S, ZIPF_V, requests, random.Random(seed))
    return [z.sample() for _ in range(requests)]


def batch_keys(
    requests: int, size: int = 20, seed: int = DEFAULT_SEED, imax: int = 200_000
) -> list[list[int]]:
    """``requests`` batches of ``size`` distinct keys each, from one Zipf stream.

    Same distribution as ``trace_keys`` (``imax`` 200k by default, like the 200k-request
    trace), so 20k batches of 20 (400k keys) hit about the same set of unique keys.
    """
    z = Zipf(ZIPF_S, ZIPF_V, imax, random.Random(seed + 1))
    out: list[list[int]] = []
    for _ in range(requests):
        batch: dict[int, None] = {}
        while len(batch) < size:
            batch[z.sample()] = None
        out.append(list(batch))
    return out


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Show the unique-key counts of the streams.")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    start = time.perf_counter()
    keys = trace_keys(args.requests, args.seed)
    took = time.perf_counter() - start
    print(
        f"trace: {len(keys)} requests, {len(set(keys))} unique keys "
        f"(Zipf s={ZIPF_S}, v={ZIPF_V:g}, imax={args.requests}, seed={args.seed}; "
        f"{took:.2f}s to draw)"
    )
    batches = batch_keys(args.requests // 10, 20, args.seed, imax=args.requests)
    flat = [k for b in batches for k in b]
    print(f"batch: {len(batches)} get_all of 20 = {len(flat)} keys, {len(set(flat))} unique")


if __name__ == "__main__":
    main()
