"""Statistics of an accuracy experiment scored on the same problems under several conditions."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; unlike the normal interval it stays in [0, 1]
    and is not degenerate at k = 0, which is where a tiny model's accuracy on these problems sits."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At k = 0 or k = n the bound is exactly 0 or 1; rounding would otherwise leave 3e-17.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs of two conditions scored on the same problems."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)
