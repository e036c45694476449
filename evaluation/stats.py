"""The statistics of an evaluation: a proportion's interval and the paired test between two modes."""

from __future__ import annotations

import math
from collections.abc import Iterable

Z_95 = 1.959963984540054
"""The standard normal quantile of 0.975."""


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion: unlike the normal approximation, sensible near 0% and 100%."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def discordant(pairs: Iterable[tuple[bool, bool]]) -> tuple[int, int]:
    """b and c of paired outcomes: the pairs only the first got right, and those only the second got right."""
    b = c = 0
    for first, second in pairs:
        b += bool(first and not second)
        c += bool(second and not first)
    return b, c


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``b`` against ``b + c`` discordant pairs at 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
